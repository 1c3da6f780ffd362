"""Tests for guardd.state.latch: round trip, atomic replace, fail-closed reads."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from guardd.core.engine import Latch
from guardd.errors import LatchError
from guardd.state.latch import (
    FRESH_START,
    LATCH_MISSING,
    LATCH_UNREADABLE,
    Armed,
    LatchFile,
    later_of,
    read_latch,
    witness_step,
    write_latch,
)

HALTED = Latch(
    reason="leverage_breached",
    source="rule:leverage",
    principal="guardd",
    mode="flatten",
    since=1_718_000_000.25,
    decision_id=42,
)
ARMED = Armed(reason="re-armed after review", source="http:arm", principal="alice", since=5.0)


def test_write_then_read_back_same_state(tmp_path: Path) -> None:
    path = tmp_path / "state" / "latch.json"  # the directory does not exist yet

    write_latch(path, HALTED)

    assert read_latch(path, allow_missing=False) == HALTED


def test_overwrite_then_latest_state_read(tmp_path: Path) -> None:
    path = tmp_path / "latch.json"
    write_latch(path, HALTED)

    write_latch(path, ARMED)

    assert read_latch(path, allow_missing=False) == ARMED


states = st.builds(
    Latch,
    reason=st.text(),
    source=st.text(),
    principal=st.text(),
    mode=st.sampled_from(["cancel", "flatten"]),
    since=st.floats(allow_nan=False, allow_infinity=False),
    decision_id=st.integers(min_value=0),
    detail=st.text(),
) | st.builds(
    Armed,
    reason=st.text(),
    source=st.text(),
    principal=st.text(),
    since=st.floats(allow_nan=False, allow_infinity=False),
    decision_id=st.integers(min_value=0),
    detail=st.text(),
)


@settings(max_examples=50, deadline=None)
@given(state=states)
def test_any_state_then_round_trips(state: LatchFile) -> None:
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "latch.json"

        write_latch(path, state)

        assert read_latch(path, allow_missing=False) == state


def test_crash_between_temp_write_and_rename_then_old_state_kept(tmp_path: Path) -> None:
    path = tmp_path / "latch.json"
    write_latch(path, HALTED)
    # What a crash after writing the temp file but before the rename leaves behind.
    stale = tmp_path / ".latch.json.abc123.tmp"
    stale.write_text(json.dumps({"version": 1, "halted": False}))

    state = read_latch(path, allow_missing=False)

    assert state == HALTED


def test_stale_temp_file_then_next_write_succeeds_and_removes_it(tmp_path: Path) -> None:
    path = tmp_path / "latch.json"
    stale = tmp_path / ".latch.json.abc123.tmp"
    stale.write_text("half")

    write_latch(path, ARMED)

    assert read_latch(path, allow_missing=False) == ARMED
    assert not stale.exists()


def test_rename_fails_then_latch_error_and_old_state_intact(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "latch.json"
    write_latch(path, HALTED)

    def replace(src: str, dst: Path) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(LatchError, match="Input/output error"):
        write_latch(path, ARMED)
    monkeypatch.undo()

    assert read_latch(path, allow_missing=False) == HALTED
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latch.json"]  # no temp left


def test_write_then_file_synced_before_rename_and_directory_after(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "latch.json"
    events: list[str] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        events.append("fsync_dir" if os.path.isdir(f"/proc/self/fd/{fd}") else "fsync_file")
        real_fsync(fd)

    def replace(src: str, dst: Path) -> None:
        events.append("rename")
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)

    write_latch(path, HALTED)

    assert events == ["fsync_file", "rename", "fsync_dir"]


def test_non_finite_since_then_latch_error(tmp_path: Path) -> None:
    state = Latch("x", "y", "z", "cancel", since=float("nan"), decision_id=1)

    with pytest.raises(LatchError, match="finite"):
        write_latch(tmp_path / "latch.json", state)


def test_unwritable_directory_then_latch_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")

    with pytest.raises(LatchError, match="cannot write latch"):
        write_latch(blocker / "latch.json", HALTED)


def test_missing_file_then_halted_latch_missing(tmp_path: Path) -> None:
    state = read_latch(tmp_path / "latch.json", allow_missing=False, now=77.0)

    assert isinstance(state, Latch)
    assert state.reason == LATCH_MISSING
    assert state.mode == "cancel"  # never flatten because a file vanished
    assert state.since == 77.0


def test_missing_file_with_fresh_start_then_armed(tmp_path: Path) -> None:
    state = read_latch(tmp_path / "latch.json", allow_missing=True, now=77.0)

    assert isinstance(state, Armed)
    assert state.reason == FRESH_START
    assert state.since == 77.0


CORRUPT = {
    "empty": b"",
    "garbage": b"\x00\xffnot json",
    "truncated": b'{"version": 2, "halted": fal',
    "a list": b"[1, 2]",
    "deep nesting": b"[" * 100_000,
    "no version": json.dumps({"halted": False}).encode(),
    "future version": json.dumps({"version": 3}).encode(),
    "version as bool": b'{"version":true,"halted":false,"reason":"r","source":"s","since":1,'
    b'"decision_id":null,"mode":"cancel","detail":""}',
    "v2 halted without principal": b'{"version":2,"halted":true,"reason":"r","source":"s",'
    b'"since":1,"decision_id":7,"mode":"cancel","detail":""}',
    "v2 unknown mode": b'{"version":2,"halted":true,"reason":"r","source":"s",'
    b'"principal":"p","since":1,"decision_id":7,"mode":"nuke","detail":""}',
    "v2 halted without mode": b'{"version":2,"halted":true,"reason":"r","source":"s",'
    b'"principal":"p","since":1,"decision_id":7,"detail":""}',
    "v2 decision id a string": b'{"version":2,"halted":true,"reason":"r","source":"s",'
    b'"principal":"p","since":1,"decision_id":"7","mode":"cancel","detail":""}',
    "v2 decision id negative": b'{"version":2,"halted":false,"reason":"r","source":"s",'
    b'"principal":"p","since":1,"decision_id":-1,"detail":""}',
    "v2 principal a number": b'{"version":2,"halted":false,"reason":"r","source":"s",'
    b'"principal":1,"since":1,"decision_id":1,"detail":""}',
    "halted as string": b'{"version":1,"halted":"false","reason":"r","source":"s","since":1,'
    b'"decision_id":null,"mode":"cancel","detail":""}',
    "since as bool": b'{"version":1,"halted":false,"reason":"r","source":"s","since":true,'
    b'"decision_id":null,"mode":"cancel","detail":""}',
    "since NaN": b'{"version":1,"halted":false,"reason":"r","source":"s","since":NaN,'
    b'"decision_id":null,"mode":"cancel","detail":""}',
    "since beyond float range": b'{"version":1,"halted":false,"reason":"r","source":"s",'
    b'"since":1' + b"0" * 400 + b',"decision_id":null,"mode":"cancel","detail":""}',
    "unknown mode": b'{"version":1,"halted":false,"reason":"r","source":"s","since":1,'
    b'"decision_id":null,"mode":"nuke","detail":""}',
    "decision id a number": b'{"version":1,"halted":false,"reason":"r","source":"s","since":1,'
    b'"decision_id":7,"mode":"cancel","detail":""}',
    "missing key": b'{"version":1,"halted":false,"reason":"r","source":"s","since":1,'
    b'"mode":"cancel","detail":""}',
    "extra key": b'{"version":1,"halted":false,"reason":"r","source":"s","since":1,'
    b'"decision_id":null,"mode":"cancel","detail":"","armed_forever":true}',
}


@pytest.mark.parametrize("allow_missing", [False, True])
@pytest.mark.parametrize("content", list(CORRUPT.values()), ids=list(CORRUPT))
def test_corrupt_file_then_halted_latch_unreadable(
    tmp_path: Path, content: bytes, allow_missing: bool
) -> None:
    path = tmp_path / "latch.json"
    path.write_bytes(content)

    state = read_latch(path, allow_missing=allow_missing)

    assert isinstance(state, Latch)
    assert (state.reason, state.mode, state.decision_id) == (LATCH_UNREADABLE, "cancel", 0)
    assert state.detail.startswith(str(path))


def test_valid_armed_document_then_read_armed(tmp_path: Path) -> None:
    # Guards the corrupt cases above: they differ from a valid document in one thing each.
    path = tmp_path / "latch.json"
    path.write_bytes(
        b'{"version":1,"halted":false,"reason":"r","source":"s","since":1,'
        b'"decision_id":null,"mode":"cancel","detail":""}'
    )
    assert isinstance(read_latch(path, allow_missing=False), Armed)

    path.write_bytes(
        b'{"version":2,"halted":false,"reason":"r","source":"s","principal":"p","since":1,'
        b'"decision_id":1,"detail":""}'
    )
    assert read_latch(path, allow_missing=False) == Armed("r", "s", "p", 1.0, 1)

    path.write_bytes(
        b'{"version":2,"halted":true,"reason":"r","source":"s","principal":"p","since":1,'
        b'"decision_id":7,"mode":"cancel","detail":""}'
    )
    assert read_latch(path, allow_missing=False) == Latch("r", "s", "p", "cancel", 1.0, 7)


def test_kill_by_a_principal_written_then_read_back_with_that_principal(tmp_path: Path) -> None:
    path = tmp_path / "latch.json"
    kill = Latch("runaway bot", "http", "alice", "flatten", 100.0, 3)

    write_latch(path, kill)

    assert json.loads(path.read_text())["principal"] == "alice"
    assert read_latch(path, allow_missing=False) == kill


def test_version_1_halt_then_read_halted_with_the_principal_its_detail_named(
    tmp_path: Path,
) -> None:
    # What guardd wrote before the latch kept its principal: "principal=<name>" in detail.
    path = tmp_path / "latch.json"
    path.write_bytes(
        b'{"version":1,"halted":true,"reason":"runaway","source":"http","since":100.5,'
        b'"decision_id":"12","mode":"flatten","detail":"principal=alice"}'
    )

    state = read_latch(path, allow_missing=False)

    assert state == Latch(
        "runaway", "http", "alice", "flatten", 100.5, 12, detail="principal=alice"
    )


def test_version_1_halt_without_principal_then_halted_by_unknown(tmp_path: Path) -> None:
    path = tmp_path / "latch.json"
    path.write_bytes(
        b'{"version":1,"halted":true,"reason":"latch_missing","source":"latch_file","since":1,'
        b'"decision_id":"d-42","mode":"cancel","detail":"gone"}'
    )

    state = read_latch(path, allow_missing=True)

    assert state == Latch("latch_missing", "latch_file", "unknown", "cancel", 1.0, 0, "gone")


def test_unreadable_path_then_halted(tmp_path: Path) -> None:
    path = tmp_path / "latch.json"
    path.mkdir()  # reading a directory fails with an OSError other than "not found"

    state = read_latch(path, allow_missing=True)

    assert isinstance(state, Latch)
    assert state.reason == LATCH_UNREADABLE


@settings(max_examples=100, deadline=None)
@given(content=st.binary(max_size=200))
def test_any_bytes_then_read_never_raises_and_fails_closed(content: bytes) -> None:
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "latch.json"
        path.write_bytes(content)

        state = read_latch(path, allow_missing=True)

        assert isinstance(state, Latch) or json.loads(content)["halted"] is False


# ------------------------------------------------------------------ the journal as second witness


def _decision(decision_id: int, state: str, previous: str, mode: str | None = None) -> dict:
    record: dict[str, object] = {
        "kind": "decision",
        "decision_id": decision_id,
        "state": state,
        "previous_state": previous,
        "latch": None,
    }
    if mode is not None:
        record["latch"] = {
            "reason": "runaway",
            "source": "http",
            "principal": "alice",
            "mode": mode,
            "since": 100.0 + decision_id,
        }
    return record


def _witness(records: list[dict]) -> Latch | None:
    witness = None
    for record in records:
        witness = witness_step(witness, record)
    return witness


def test_journal_kill_then_witness_halted_with_its_latch() -> None:
    witness = _witness([_decision(3, "HALTED", "ARMED", "flatten")])

    assert witness is not None
    assert (witness.principal, witness.mode, witness.decision_id, witness.since) == (
        "alice",
        "flatten",
        3,
        103.0,
    )


def test_journal_kill_then_rearm_then_no_witness() -> None:
    records = [_decision(3, "HALTED", "ARMED", "cancel"), _decision(4, "ARMED", "HALTED")]

    assert _witness(records) is None


def test_second_kill_escalates_then_witness_has_the_later_mode() -> None:
    records = [
        _decision(3, "HALTED", "ARMED", "cancel"),
        _decision(5, "HALTED", "HALTED", "flatten"),
    ]

    witness = _witness(records)

    assert witness is not None and (witness.mode, witness.decision_id) == ("flatten", 5)


def test_sweeps_and_other_records_then_witness_unchanged() -> None:
    kill = _decision(3, "HALTED", "ARMED", "cancel")
    sweep = _decision(4, "HALTED", "HALTED")  # a sweep carries no latch
    records = [kill, sweep, {"kind": "latch_written", "decision_id": 3}, {"kind": "decision"}]

    witness = _witness(records)

    assert witness is not None and witness.decision_id == 3


def test_malformed_latch_in_journal_then_ignored() -> None:
    bad = _decision(3, "HALTED", "ARMED", "cancel")
    bad["latch"] = {"mode": "explode", "since": "soon"}

    assert _witness([bad]) is None


def test_file_armed_before_journal_kill_then_journal_wins() -> None:
    armed = Armed(reason="re-armed", source="arm", principal="bob", since=1.0, decision_id=2)
    witness = _witness([_decision(3, "HALTED", "ARMED", "flatten")])

    assert later_of(armed, witness) is witness


def test_file_fresh_start_without_decision_then_journal_kill_wins() -> None:
    fresh = Armed(reason=FRESH_START, source="operator", principal="operator", since=1.0)
    witness = _witness([_decision(3, "HALTED", "ARMED", "cancel")])

    assert later_of(fresh, witness) is witness


def test_file_rearmed_after_journal_kill_then_file_wins() -> None:
    # The re-arm reached the file but not the journal (a journal write failed).
    armed = Armed(reason="re-armed", source="arm", principal="bob", since=9.0, decision_id=7)
    witness = _witness([_decision(3, "HALTED", "ARMED", "flatten")])

    assert later_of(armed, witness) is armed
    assert later_of(armed, None) is armed


EXHAUST_FDS = """
import json, os, resource, sys
from pathlib import Path
from guardd.errors import LatchError
from guardd.core.engine import Latch
from guardd.state.latch import LatchWriter, write_latch

directory = Path(sys.argv[1])
resource.setrlimit(resource.RLIMIT_NOFILE, (64, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
writer = LatchWriter(directory / "latch.json")  # held from the start, as the executor holds it
hog = []
while True:  # every descriptor the process may have, taken (as a connection flood would)
    try:
        hog.append(os.open("/dev/null", os.O_RDONLY))
    except OSError:
        break
halted = Latch("kill", "http", "alice", "cancel", 1.0, 1)
outcome = {}
try:
    write_latch(directory / "other.json", halted)
    outcome["one_off"] = "written"
except LatchError as exc:
    outcome["one_off"] = str(exc)
for n in range(3):  # again and again: the reserve is taken back after each write
    writer.write(Latch(f"kill {n}", "http", "alice", "cancel", 1.0, n))
outcome["reserved"] = writer.reserved
for fd in hog:
    os.close(fd)
outcome["reason"] = json.loads((directory / "latch.json").read_text())["reason"]
print(json.dumps(outcome))
"""


def test_every_descriptor_in_use_then_latch_writer_still_writes(tmp_path: Path) -> None:
    # Arrange / Act: in a child process whose descriptors are all taken
    done = subprocess.run(
        [sys.executable, "-c", EXHAUST_FDS, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    outcome = json.loads(done.stdout)

    # Assert: the writer with its reserve wrote every time; a writer without one could not
    assert outcome["reason"] == "kill 2"
    assert outcome["reserved"] is True
    assert "Too many open files" in outcome["one_off"]
    assert read_latch(tmp_path / "latch.json", allow_missing=False).reason == "kill 2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latch.json"]  # no temp left
