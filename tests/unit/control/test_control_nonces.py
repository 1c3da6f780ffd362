"""The durable record of used MQTT nonces: refused across restarts, pruned after the window,
fail-closed for arms when the disk cannot be trusted (kills still pass)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from guardd.control.auth import KeyStore, parse_signed_command, signed_payload
from guardd.control.auth import verify_signed_command as verify
from guardd.control.nonces import NonceStore, read_nonce_file
from guardd.errors import NonceNotDurableError, ReplayError

NOW = 1_767_225_600.0
WINDOW = 30.0
SECRET = "alice-secret-key-0123456789"
KEYS = KeyStore.from_secrets({"alice": (SECRET, ["kill", "arm"])})


def store(tmp_path: Path, now: float = NOW, **kw: int) -> NonceStore:
    return NonceStore.open(tmp_path / "nonces.jsonl", window_s=WINDOW, now=now, **kw)


def command(action: str, nonce: str, ts: float = NOW) -> bytes:
    payload = signed_payload(
        action=action,  # type: ignore[arg-type]
        target="DU1",
        reason="drill",
        key_id="alice",
        secret=SECRET.encode(),
        ts=int(ts),
        nonce=nonce,
    )
    return json.dumps(payload).encode()


def accept(
    nonces: NonceStore, action: str, nonce: str, *, ts: float = NOW, now: float = NOW
) -> str:
    signed = parse_signed_command(command(action, nonce, ts), topic_action=action)  # type: ignore[arg-type]
    return verify(signed, target="DU1", keys=KEYS, nonces=nonces, now=now, window_s=WINDOW).action


def test_nonce_used_then_restarted_within_window_then_replay_refused(tmp_path: Path) -> None:
    first = store(tmp_path)
    first.remember("alice", "nonce-kill-1", ts=NOW, now=NOW)
    first.remember("alice", "nonce-arm-01", ts=NOW - 5, now=NOW + 1)
    first.close()  # or the process died: every remember had synced before returning

    second = store(tmp_path, now=NOW + 20)

    for nonce in ("nonce-kill-1", "nonce-arm-01"):
        with pytest.raises(ReplayError, match="already used"):
            second.remember("alice", nonce, ts=NOW, now=NOW + 20)
    second.remember("bob", "nonce-kill-1", ts=NOW, now=NOW + 20)  # another key's nonce is its own


def test_restart_after_window_then_entries_pruned_from_file(tmp_path: Path) -> None:
    first = store(tmp_path)
    first.remember("alice", "nonce-old-01", ts=NOW, now=NOW)
    first.remember("alice", "nonce-new-01", ts=NOW + 25, now=NOW + 25)
    first.close()

    second = store(tmp_path, now=NOW + WINDOW + 1)  # the first is past its window, not the second

    records, skipped = read_nonce_file(tmp_path / "nonces.jsonl")
    assert [r.nonce for r in records] == ["nonce-new-01"]
    assert (len(second), skipped) == (1, 0)


def test_future_timestamp_then_kept_until_its_own_window_ends(tmp_path: Path) -> None:
    first = store(tmp_path)
    first.remember("alice", "nonce-ahead1", ts=NOW + 30, now=NOW)  # valid: 30 s ahead
    first.close()

    later = store(tmp_path, now=NOW + 59)  # still valid by its timestamp until NOW + 60

    with pytest.raises(ReplayError):
        later.remember("alice", "nonce-ahead1", ts=NOW + 30, now=NOW + 59)


def test_torn_last_line_then_skipped_and_earlier_nonces_kept(tmp_path: Path) -> None:
    first = store(tmp_path)
    first.remember("alice", "nonce-kept-1", ts=NOW, now=NOW)
    first.close()
    with (tmp_path / "nonces.jsonl").open("ab") as handle:
        handle.write(b'{"key_id":"alice","nonce":"nonce-torn')  # the crash came mid-append

    second = store(tmp_path, now=NOW + 1)

    with pytest.raises(ReplayError):
        second.remember("alice", "nonce-kept-1", ts=NOW, now=NOW + 1)
    second.remember("alice", "nonce-torn-1", ts=NOW, now=NOW + 1)
    assert read_nonce_file(tmp_path / "nonces.jsonl")[1] == 0  # compacted: no torn line left


def test_nonce_on_disk_when_remember_returns_then_before_the_command_acts(tmp_path: Path) -> None:
    nonces = store(tmp_path)

    nonces.remember("alice", "nonce-durable", ts=NOW, now=NOW)

    # a second reader (a restarted guard) sees it at once: appended and synced, not buffered
    records, _ = read_nonce_file(tmp_path / "nonces.jsonl")
    assert [(r.key_id, r.nonce, r.ts, r.seen) for r in records] == [
        ("alice", "nonce-durable", NOW, NOW)
    ]


def test_many_commands_then_file_compacted_and_bounded(tmp_path: Path) -> None:
    nonces = store(tmp_path, compact_after=10)
    path = tmp_path / "nonces.jsonl"
    lines = []
    for n in range(100):
        now = NOW + n  # one command a second, window 30 s: about 31 live at any time
        nonces.remember("alice", f"nonce-{n:06d}", ts=now, now=now)
        lines.append(len(path.read_bytes().splitlines()))

    assert max(lines) <= 31 + 10
    with pytest.raises(ReplayError):
        store(tmp_path, now=NOW + 99).remember("alice", "nonce-000099", ts=NOW + 99, now=NOW + 99)


def test_unreadable_record_then_arms_signed_before_start_refused_kills_pass(
    tmp_path: Path,
) -> None:
    (tmp_path / "nonces.jsonl").mkdir()  # cannot be read nor replaced: a broken state dir

    nonces = store(tmp_path)

    with pytest.raises(NonceNotDurableError):
        accept(nonces, "arm", "nonce-arm-01", ts=NOW - 1)
    assert accept(nonces, "kill", "nonce-kill-1", ts=NOW - 1) == "kill"
    with pytest.raises(ReplayError, match="already used"):  # in memory, still one use
        accept(nonces, "kill", "nonce-kill-1", ts=NOW - 1, now=NOW + 1)


def test_append_fails_then_arm_refused_and_next_write_rewrites_whole_file(tmp_path: Path) -> None:
    nonces = store(tmp_path)
    accept(nonces, "kill", "nonce-kill-1")
    (tmp_path / "nonces.jsonl").unlink()
    (tmp_path / "nonces.jsonl").mkdir()  # the next write fails
    nonces.close()  # reopening for the append fails

    with pytest.raises(NonceNotDurableError):
        accept(nonces, "arm", "nonce-arm-01", now=NOW + 1)
    (tmp_path / "nonces.jsonl").rmdir()  # the disk is back
    assert accept(nonces, "arm", "nonce-arm-02", now=NOW + 2) == "arm"

    nonces.close()
    records, _ = read_nonce_file(tmp_path / "nonces.jsonl")
    assert {r.nonce for r in records} == {"nonce-kill-1", "nonce-arm-01", "nonce-arm-02"}


ops = st.lists(
    st.one_of(
        st.tuples(st.just("use"), st.sampled_from("abcde"), st.integers(0, 20)),
        st.tuples(st.just("restart"), st.just(""), st.integers(0, 20)),
    ),
    max_size=40,
)


@settings(max_examples=60, deadline=None)
@given(ops)
def test_any_history_of_uses_and_restarts_then_refused_exactly_within_window(
    tmp_path_factory: pytest.TempPathFactory, history: list[tuple[str, str, int]]
) -> None:
    directory = tmp_path_factory.mktemp("nonces")
    nonces = NonceStore.open(directory / "n", window_s=10, now=0, compact_after=3)
    used: dict[str, float] = {}  # nonce -> when accepted (ts = now)
    now = 0.0
    for op, nonce, step in history:
        now += step / 2
        if op == "restart":
            nonces.close()
            nonces = NonceStore.open(directory / "n", window_s=10, now=now, compact_after=3)
            continue
        seen = used.get(nonce)
        if seen is not None and now - seen <= 10:
            with pytest.raises(ReplayError):
                nonces.remember("k", nonce, ts=now, now=now)
        else:
            nonces.remember("k", nonce, ts=now, now=now)
            used[nonce] = now
    nonces.close()
    records, skipped = read_nonce_file(directory / "n")
    assert skipped == 0
    assert len(records) <= 5 + 3  # live ones (at most one per nonce) plus appends since compaction


def test_kill_nonce_then_refused_at_once_and_on_disk_only_after_sync(tmp_path: Path) -> None:
    # Arrange
    nonces = store(tmp_path)
    path = tmp_path / "nonces.jsonl"

    # Act: a kill is verified (its cancel would go out now, before any fsync)
    assert accept(nonces, "kill", "nonce-kill-1") == "kill"

    # Assert: a replay is refused at once, from memory; the disk has it only after sync
    with pytest.raises(ReplayError, match="already used"):
        accept(nonces, "kill", "nonce-kill-1", now=NOW + 1)
    assert read_nonce_file(path)[0] == []
    nonces.sync()
    assert [r.nonce for r in read_nonce_file(path)[0]] == ["nonce-kill-1"]
    with pytest.raises(ReplayError):  # a restarted guard refuses it too
        store(tmp_path, now=NOW + 2).remember("alice", "nonce-kill-1", ts=NOW, now=NOW + 2)


def test_arm_after_an_unsynced_kill_then_both_written_before_the_arm_acts(tmp_path: Path) -> None:
    nonces = store(tmp_path)
    accept(nonces, "kill", "nonce-kill-1")

    accept(nonces, "arm", "nonce-arm-01", now=NOW + 1)

    assert [r.nonce for r in read_nonce_file(tmp_path / "nonces.jsonl")[0]] == [
        "nonce-kill-1",
        "nonce-arm-01",
    ]


def test_kill_nonce_sync_fails_then_no_raise_and_next_write_rewrites_it(tmp_path: Path) -> None:
    nonces = store(tmp_path)
    accept(nonces, "kill", "nonce-kill-1")
    (tmp_path / "nonces.jsonl").unlink()
    (tmp_path / "nonces.jsonl").mkdir()  # the write fails
    nonces.close()

    nonces.sync()  # logged, never raised: the kill has been carried out

    (tmp_path / "nonces.jsonl").rmdir()
    accept(nonces, "arm", "nonce-arm-01", now=NOW + 1)
    assert {r.nonce for r in read_nonce_file(tmp_path / "nonces.jsonl")[0]} == {
        "nonce-kill-1",
        "nonce-arm-01",
    }
