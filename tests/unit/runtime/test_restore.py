"""Start-up: the latch and the journal read once, and what a restart takes from them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from guardd.config import load_config
from guardd.core.engine import Latch
from guardd.demo import DEMO_CONFIG, demo_config
from guardd.runtime.startup import JournalScan, restore
from guardd.state.journal import Journal
from guardd.state.latch import Armed, write_latch


def _kill(decision_id: int, mode: str) -> dict[str, Any]:
    latch = {"reason": "runaway", "source": "http", "principal": "alice", "mode": mode}
    return {
        "kind": "decision",
        "decision_id": decision_id,
        "state": "HALTED",
        "previous_state": "ARMED",
        "latch": {**latch, "since": 100.0 + decision_id},
    }


def _rearm(decision_id: int) -> dict[str, Any]:
    return {
        "kind": "decision",
        "decision_id": decision_id,
        "state": "ARMED",
        "previous_state": "HALTED",
        "latch": None,
    }


def _child(decision_id: int, order_id: int, kind: str = "child_order_sent") -> dict[str, Any]:
    return {"kind": kind, "decision_id": decision_id, "order_id": order_id, "perm_id": 900}


def _write(path: Path, records: list[dict[str, Any]]) -> None:
    journal = Journal(path)
    for record in records:
        fields = {k: v for k, v in record.items() if k != "kind"}
        journal.append(record["kind"], **fields)
    journal.close()


def test_journal_kill_later_than_the_file_then_restored_with_its_children_and_every_order_id(
    tmp_path: Path,
) -> None:
    # Arrange: the file says ARMED (fresh start); the journal has a flatten, a re-arm, and a
    # second flatten whose latch write never landed
    cfg = demo_config(load_config(DEMO_CONFIG), ib_port=7497, state_dir=tmp_path)
    write_latch(cfg.latch_path, Armed("fresh_start", "operator", "operator", since=1.0))
    first = [_kill(3, "flatten"), _child(3, 10), _child(3, 11), _rearm(4)]
    second = [_kill(6, "flatten"), _child(6, 12), _child(6, 12, "child_order_acknowledged")]
    _write(cfg.journal_path, first + second)

    # Act
    restored = restore(cfg, fresh_start=False, now=1000.0)

    # Assert
    latch = restored.halted
    assert restored.from_journal
    assert latch is not None and (latch.decision_id, latch.mode) == (6, "flatten")
    assert restored.last_decision_id == 6
    assert restored.order_ids == {10, 11, 12}
    assert [(r["kind"], r["order_id"]) for r in restored.children] == [
        ("child_order_sent", 12),
        ("child_order_acknowledged", 12),
    ]


def test_file_halted_while_the_journal_says_re_armed_then_the_files_children(
    tmp_path: Path,
) -> None:
    # Arrange: the re-arm's latch write failed; the file still holds kill 3
    cfg = demo_config(load_config(DEMO_CONFIG), ib_port=7497, state_dir=tmp_path)
    kill = Latch("runaway", "http", "alice", "flatten", since=103.0, decision_id=3)
    write_latch(cfg.latch_path, kill)
    _write(cfg.journal_path, [_kill(3, "flatten"), _child(3, 10), _rearm(4), _kill(5, "cancel")])
    _write(cfg.journal_path, [_rearm(7)])

    # Act
    restored = restore(cfg, fresh_start=False, now=1000.0)

    # Assert: the file wins (the journal's witness is gone), and its children come back
    assert not restored.from_journal and restored.halted == kill
    assert [r["order_id"] for r in restored.children] == [10]


def test_no_journal_and_fresh_start_then_armed_and_the_file_written(tmp_path: Path) -> None:
    cfg = demo_config(load_config(DEMO_CONFIG), ib_port=7497, state_dir=tmp_path)
    tmp_path.mkdir(exist_ok=True)

    restored = restore(cfg, fresh_start=True, now=1000.0)

    assert restored.halted is None and restored.last_decision_id == 0
    assert restored.order_ids == frozenset() and restored.children == ()
    assert cfg.latch_path.exists()


_RECORDS = st.one_of(
    st.builds(_kill, st.just(0), st.sampled_from(["cancel", "flatten"])),
    st.builds(_rearm, st.just(0)),
    st.builds(
        _child,
        st.integers(min_value=-3, max_value=0),  # 0: this decision; -k: k decisions back
        st.integers(min_value=1, max_value=50),
        st.sampled_from(["child_order_sent", "child_order_acknowledged", "close_anchor"]),
    ),
)


@given(st.lists(_RECORDS, max_size=30), st.integers(min_value=0, max_value=12))
def test_any_journal_then_the_scan_keeps_what_a_full_read_finds_for_the_latch(
    drafts: list[dict[str, Any]], file_decision_id: int
) -> None:
    # Arrange: decisions numbered in journal order; a child names its decision or an earlier one
    records: list[dict[str, Any]] = []
    decision_id = 0
    for draft in drafts:
        record = dict(draft)
        if record["kind"] == "decision":
            decision_id += 1
            record["decision_id"] = decision_id
        else:
            record["decision_id"] = max(decision_id + record["decision_id"], 0)
        records.append(record)

    # Act
    scan = JournalScan(file_decision_id)
    for record in records:
        scan.add(record)

    # Assert: for the decisions that can be the latch, the records a full read filters out
    candidates = {file_decision_id} | ({scan.witness.decision_id} if scan.witness else set())
    for candidate in candidates:
        expected = [r for r in records if r["kind"] != "decision" and r["decision_id"] == candidate]
        assert list(scan.children(candidate)) == expected
    sent = {r["order_id"] for r in records if r["kind"] == "child_order_sent"}
    assert scan.order_ids == sent
    assert scan.last_decision_id == decision_id
