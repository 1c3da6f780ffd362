"""Tests for guardd.state.journal: durable appends, torn tails moved aside, never a lost record."""

from __future__ import annotations

import enum
import errno
import json
import math
import os
import tempfile
import threading
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from guardd.errors import JournalError
from guardd.state.journal import (
    SEGMENT_STARTED_KIND,
    TORN_TAIL_KIND,
    Journal,
    Rotation,
    journal_segments,
    read_journal,
)


def _clock() -> float:
    return 1_700_000_000.5


def _write_records(path: Path, count: int) -> list[dict[str, Any]]:
    with Journal(path, clock=_clock) as journal:
        return [journal.append("decision", n=n) for n in range(count)]


def test_append_then_record_returned_and_read_back(tmp_path: Path) -> None:
    path = tmp_path / "deep" / "dir" / "journal.jsonl"

    with Journal(path, clock=_clock) as journal:
        record = journal.append("kill_requested", source="http", reason="runaway bot")

    assert record == {"ts": 1_700_000_000.5, "kind": "kill_requested", "source": "http",
                      "reason": "runaway bot"}  # fmt: skip
    assert list(read_journal(path)) == [record]
    assert path.read_bytes().count(b"\n") == 1


def test_explicit_ts_then_kept(tmp_path: Path) -> None:
    with Journal(tmp_path / "j", clock=_clock) as journal:
        record = journal.append("event", ts=12.0)

    assert record["ts"] == 12.0


def fsynced_sizes(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The size of the file at each fsync from now on (the list fills as fsyncs happen)."""
    sizes: list[int] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        sizes.append(os.fstat(fd).st_size)
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    return sizes


def test_append_then_fsynced_before_returning(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    journal = Journal(tmp_path / "j", clock=_clock)
    calls = fsynced_sizes(monkeypatch)

    record = journal.append("order_cancelled", perm_id=7)

    line = json.dumps(record, separators=(",", ":")).encode() + b"\n"
    assert calls == [len(line)]  # synced once, with the whole line in the file
    journal.close()


def test_append_many_then_one_fsync_with_every_record_in_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Arrange
    path = tmp_path / "j"
    journal = Journal(path, clock=_clock)
    before = journal.append("decision", n=0)
    calls = fsynced_sizes(monkeypatch)

    # Act: a close round's three child records
    records = journal.append_many(
        [("child_order_sent", {"order_id": n, "quantity": Decimal(n)}) for n in (1, 2, 3)]
    )

    # Assert: synced once, with the whole batch in the file; read back in order
    monkeypatch.undo()
    assert calls == [path.stat().st_size]
    assert list(read_journal(path)) == [before, *records]
    assert [r["order_id"] for r in records] == [1, 2, 3]
    assert records[0]["quantity"] == "1"
    assert journal.recent()[-3:] == records
    assert journal.append_many([]) == []
    journal.close()


def test_reopen_then_appends_after_existing_records(tmp_path: Path) -> None:
    path = tmp_path / "j"
    first = _write_records(path, 2)

    second = _write_records(path, 1)

    assert list(read_journal(path)) == first + second


@pytest.mark.parametrize(
    "tail",
    [b'{"ts":1,"kind":"dec', b'{"ts":1,"kind":"decision"}', b"garbage\n", b"[1,2]\n", b"\n"],
    ids=["cut mid-record", "no newline", "not json", "not an object", "empty line"],
)
def test_torn_tail_on_open_then_moved_aside_and_recorded(tmp_path: Path, tail: bytes) -> None:
    path = tmp_path / "j"
    complete = _write_records(path, 3)
    with path.open("ab") as handle:
        handle.write(tail)

    journal = Journal(path, clock=_clock)
    after = journal.append("decision", n=99)
    journal.close()

    records = list(read_journal(path))
    assert records[:3] == complete  # no complete record lost
    assert records[3]["kind"] == TORN_TAIL_KIND
    assert records[3]["torn_bytes"] == len(tail)
    assert records[4] == after
    torn = tmp_path / "j.torn-1"
    assert journal.torn_tail == torn
    assert records[3]["torn_path"] == str(torn)
    assert torn.read_bytes() == tail


def test_torn_tail_twice_then_second_copy_gets_next_number(tmp_path: Path) -> None:
    path = tmp_path / "j"
    _write_records(path, 1)
    for _ in range(2):
        with path.open("ab") as handle:
            handle.write(b'{"torn')
        Journal(path).close()

    assert (tmp_path / "j.torn-1").read_bytes() == b'{"torn'
    assert (tmp_path / "j.torn-2").read_bytes() == b'{"torn'
    assert [r["kind"] for r in read_journal(path)] == ["decision", TORN_TAIL_KIND, TORN_TAIL_KIND]


def test_only_a_torn_line_then_file_keeps_just_the_torn_record(tmp_path: Path) -> None:
    path = tmp_path / "j"
    path.write_bytes(b"x" * 200_000)  # one huge torn line, longer than a read block

    Journal(path, clock=_clock).close()

    records = list(read_journal(path))
    assert [r["kind"] for r in records] == [TORN_TAIL_KIND]
    assert records[0]["torn_bytes"] == 200_000


def test_clean_journal_on_open_then_nothing_moved(tmp_path: Path) -> None:
    path = tmp_path / "j"
    records = _write_records(path, 2)

    journal = Journal(path)
    journal.close()

    assert journal.torn_tail is None
    assert list(read_journal(path)) == records
    assert list(tmp_path.iterdir()) == [path]


def test_read_torn_tail_then_skipped_without_changing_file(tmp_path: Path) -> None:
    path = tmp_path / "j"
    records = _write_records(path, 2)
    with path.open("ab") as handle:
        handle.write(b'{"ts":')
    before = path.read_bytes()

    assert list(read_journal(path)) == records
    assert path.read_bytes() == before


def test_damaged_middle_line_then_read_raises_journal_error(tmp_path: Path) -> None:
    path = tmp_path / "j"
    _write_records(path, 2)
    first, second = path.read_bytes().splitlines(keepends=True)
    path.write_bytes(first + b"not json\n" + second)

    with pytest.raises(JournalError, match=r":2: damaged"):
        list(read_journal(path))


def test_missing_journal_then_read_raises_journal_error(tmp_path: Path) -> None:
    with pytest.raises(JournalError, match="cannot read"):
        read_journal(tmp_path / "absent")


def test_unopenable_path_then_journal_error(tmp_path: Path) -> None:
    with pytest.raises(JournalError, match="cannot open"):
        Journal(tmp_path)  # a directory


class _Side(enum.Enum):
    BUY = "BUY"


@dataclass(frozen=True, slots=True)
class _Order:
    perm_id: int
    side: _Side


def test_rich_values_then_stored_as_plain_json(tmp_path: Path) -> None:
    path = tmp_path / "j"

    with Journal(path, clock=_clock) as journal:
        record = journal.append(
            "finding",
            value=math.nan,
            limits=(math.inf, -math.inf, 1.5),
            order=_Order(perm_id=5, side=_Side.BUY),
            file=Path("/x/y"),
            tags={"b", "a"},
        )

    assert record["value"] == "nan"
    assert record["limits"] == ["inf", "-inf", 1.5]
    assert record["order"] == {"perm_id": 5, "side": "BUY"}
    assert record["file"] == "/x/y"
    assert record["tags"] == ["a", "b"]
    assert list(read_journal(path)) == [record]


def test_unstorable_value_then_journal_error_and_file_untouched(tmp_path: Path) -> None:
    path = tmp_path / "j"
    journal = Journal(path, clock=_clock)
    kept = journal.append("decision")

    with pytest.raises(JournalError, match=r"detail\.callback"):
        journal.append("decision", detail={"callback": object()})

    journal.close()
    assert list(read_journal(path)) == [kept]


def test_lone_surrogate_then_journaled_escaped_and_read_back_equal(tmp_path: Path) -> None:
    # json.loads accepts "\\ud800", so a refused command's reason can carry a lone surrogate
    path = tmp_path / "j"
    journal = Journal(path, clock=_clock)
    reason = json.loads('"kill \\ud800 now"')

    record = journal.append("command_refused", reason=reason)

    journal.close()
    raw = path.read_bytes()
    raw.decode("utf-8")  # the file stays valid UTF-8
    assert b"kill \\ud800 now" in raw
    assert list(read_journal(path)) == [record]
    assert record["reason"] == reason


def test_invalid_utf8_bytes_then_journaled_as_escaped_text(tmp_path: Path) -> None:
    path = tmp_path / "j"
    with Journal(path, clock=_clock) as journal:
        record = journal.append("command_refused", payload=b"ok \xff\xfe\x00 end")

    [back] = read_journal(path)
    assert back == record
    assert back["payload"] == "ok \\xff\\xfe\x00 end"


any_text = st.text(
    alphabet=st.characters(exclude_categories=[])
    | st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF, exclude_categories=[]),
    max_size=40,
)


@settings(max_examples=200, deadline=None)
@given(reason=any_text, key=any_text, raw=st.binary(max_size=40))
def test_any_text_or_bytes_then_journaled_never_refused(reason: str, key: str, raw: bytes) -> None:
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "j"
        with Journal(path, clock=_clock) as journal:
            record = journal.append("command_refused", reason=reason, where={key: raw})

        assert list(read_journal(path)) == [record]
        assert record["reason"] == reason
        assert record["where"] == {key: raw.decode("utf-8", "backslashreplace")}


@pytest.mark.parametrize("batch", [0, 5])  # one append, or a batch of five (append_many)
def test_failed_write_then_partial_line_cut_back(
    batch: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "j"
    journal = Journal(path, clock=_clock)
    kept = journal.append("decision", n=1)
    real_write = os.write

    def half_then_disk_full(fd: int, data: bytes | memoryview) -> int:
        real_write(fd, bytes(data[: len(data) // 2]))
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "write", half_then_disk_full)
    with pytest.raises(JournalError, match="No space"):
        if batch:  # none of the batch is kept, not even the records before the cut
            journal.append_many([("child_order_sent", {"order_id": n}) for n in range(batch)])
        else:
            journal.append("decision", n=2)
    monkeypatch.undo()

    later = journal.append("decision", n=3)
    journal.close()
    assert list(read_journal(path)) == [kept, later]


def test_append_after_close_then_journal_error(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "j")
    journal.close()

    with pytest.raises(JournalError, match="closed"):
        journal.append("decision")


def test_appends_from_many_threads_then_every_line_whole(tmp_path: Path) -> None:
    path = tmp_path / "j"
    journal = Journal(path, clock=_clock)
    payload = "x" * 5000  # long lines make interleaving visible if the lock were missing

    def worker(thread: int) -> None:
        for n in range(25):
            journal.append("decision", thread=thread, n=n, payload=payload)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    journal.close()

    records = list(read_journal(path))
    assert len(records) == 100
    assert {(r["thread"], r["n"]) for r in records} == {(t, n) for t in range(4) for n in range(25)}


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(), inner, max_size=3),
    max_leaves=8,
)


@settings(max_examples=60, deadline=None)
@given(fields=st.dictionaries(st.from_regex(r"[a-z_]{1,8}", fullmatch=True), json_values))
def test_any_json_fields_then_read_back_equal(fields: dict[str, Any]) -> None:
    fields.pop("ts", None)
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "j"
        with Journal(path, clock=_clock) as journal:
            record = journal.append("event", **fields)

        assert list(read_journal(path)) == [record]


@settings(max_examples=60, deadline=None)
@given(count=st.integers(min_value=1, max_value=5), data=st.data())
def test_crash_cut_anywhere_then_every_complete_record_survives(
    count: int, data: st.DataObject
) -> None:
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "j"
        written = _write_records(path, count)
        content = path.read_bytes()
        cut = data.draw(st.integers(min_value=0, max_value=len(content)), label="cut")
        path.write_bytes(content[:cut])
        complete = content[:cut].count(b"\n")

        Journal(path, clock=_clock).close()

        records = list(read_journal(path))
        assert records[:complete] == written[:complete]
        torn = cut not in (0, *(i + 1 for i, b in enumerate(content) if b == ord("\n")))
        assert [r["kind"] for r in records[complete:]] == ([TORN_TAIL_KIND] if torn else [])


# ---- rotation ------------------------------------------------------------------------------------

DAY = 86_400.0


def _payloads(records: list[dict[str, Any]]) -> list[Any]:
    """The records a caller appended, without the rotation's own segment headers."""
    return [r.get("n") for r in records if r["kind"] != SEGMENT_STARTED_KIND]


def test_size_rotation_then_segments_bounded_and_every_record_read_in_order(
    tmp_path: Path,
) -> None:
    path = tmp_path / "journal.jsonl"

    with Journal(path, clock=_clock, rotation=Rotation("size", 1024)) as journal:
        for n in range(40):
            journal.append("decision", n=n, pad="x" * 60)

    files = journal_segments(path)
    assert len(files) > 3 and files[-1] == path
    assert [f.name for f in files[:2]] == ["journal.jsonl.000001", "journal.jsonl.000002"]
    assert all(f.stat().st_size <= 1024 for f in files)
    records = list(read_journal(path))
    assert _payloads(records) == list(range(40))
    headers = [r for r in records if r["kind"] == SEGMENT_STARTED_KIND]
    assert [h["previous"] for h in headers] == [f.name for f in files[:-1]]
    assert {h["why"] for h in headers} == {"size"}


def test_day_rotation_then_a_new_segment_at_the_first_append_of_each_utc_day(
    tmp_path: Path,
) -> None:
    path = tmp_path / "journal.jsonl"
    now = [10 * DAY + 100.0]

    with Journal(path, clock=lambda: now[0], rotation=Rotation("day")) as journal:
        journal.append("decision", n=0)
        now[0] = 10 * DAY + DAY - 1  # the same day, its last second
        journal.append("decision", n=1)
        now[0] = 11 * DAY + 5
        journal.append("decision", n=2)
        now[0] = 13 * DAY
        journal.append("decision", n=3)

    files = journal_segments(path)
    by_file = [_payloads([json.loads(line) for line in f.read_bytes().splitlines()]) for f in files]
    assert by_file == [[0, 1], [2], [3]]
    assert _payloads(list(read_journal(path))) == [0, 1, 2, 3]


def test_rotation_across_a_restart_then_numbers_continue_and_the_day_is_the_files(
    tmp_path: Path,
) -> None:
    path = tmp_path / "journal.jsonl"
    now = [20 * DAY + 10.0]
    rotation = Rotation("day")
    with Journal(path, clock=lambda: now[0], rotation=rotation) as journal:
        journal.append("decision", n=0)
        now[0] += DAY
        journal.append("decision", n=1)  # segment 1 holds n=0

    # Act: restarted the next day; the live file's day is its first record's, not the clock's
    now[0] += DAY
    with Journal(path, clock=lambda: now[0], rotation=rotation) as journal:
        journal.append("decision", n=2)
    with Journal(path, clock=lambda: now[0], rotation=rotation) as journal:
        journal.append("decision", n=3)  # same day as n=2: no rotation

    assert [f.name for f in journal_segments(path)] == [
        "journal.jsonl.000001",
        "journal.jsonl.000002",
        "journal.jsonl",
    ]
    assert _payloads(list(read_journal(path))) == [0, 1, 2, 3]


def test_crash_after_rename_before_the_new_file_then_reopen_loses_nothing(
    tmp_path: Path,
) -> None:
    path = tmp_path / "journal.jsonl"
    _write_records(path, 3)
    path.rename(tmp_path / "journal.jsonl.000001")  # the rotation's rename, then the crash

    with Journal(path, clock=_clock, rotation=Rotation("size", 1024)) as journal:
        journal.append("decision", n=3)

    assert _payloads(list(read_journal(path))) == [0, 1, 2, 3]


def test_new_live_file_cannot_be_created_then_records_stay_in_the_segment_and_retried(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "journal.jsonl"
    journal = Journal(path, clock=_clock, rotation=Rotation("size", 1024))
    real_open = os.open

    def no_new_file(file: Any, flags: int, *args: Any, **kwargs: Any) -> int:
        if flags & os.O_EXCL:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_open(file, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", no_new_file)
    for n in range(20):
        journal.append("decision", n=n, pad="x" * 60)  # never raises: records come first
    assert journal.rotation_error is not None and "No space" in journal.rotation_error
    assert not path.exists()  # renamed; every record since went on into the segment
    monkeypatch.undo()

    journal.append("decision", n=20)
    journal.close()

    assert journal.rotation_error is None
    assert [f.name for f in journal_segments(path)] == ["journal.jsonl.000001", "journal.jsonl"]
    assert _payloads(list(read_journal(path))) == list(range(21))


def test_torn_copies_are_not_segments(tmp_path: Path) -> None:
    path = tmp_path / "journal.jsonl"
    _write_records(path, 1)
    with path.open("ab") as handle:
        handle.write(b'{"torn')
    Journal(path, clock=_clock).close()  # moves the torn line to journal.jsonl.torn-1

    assert journal_segments(path) == [path]


@settings(max_examples=40, deadline=None)
@given(
    sizes=st.lists(st.integers(min_value=0, max_value=700), min_size=1, max_size=40),
    restarts=st.sets(st.integers(min_value=0, max_value=39), max_size=5),
    max_bytes=st.integers(min_value=200, max_value=2000),
)
def test_any_sizes_and_restarts_then_every_record_once_in_order(
    sizes: list[int], restarts: set[int], max_bytes: int
) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "journal.jsonl"
        rotation = Rotation("size", max_bytes)
        journal = Journal(path, clock=_clock, rotation=rotation)
        for n, size in enumerate(sizes):
            if n in restarts:
                journal.close()
                journal = Journal(path, clock=_clock, rotation=rotation)
            journal.append("decision", n=n, pad="x" * size)
        journal.close()

        assert _payloads(list(read_journal(path))) == list(range(len(sizes)))
        for file in journal_segments(path):
            lines = file.read_bytes().splitlines()
            # a segment passes max_bytes only when it holds a single caller's record
            assert file.stat().st_size <= max_bytes or len(lines) <= 2
