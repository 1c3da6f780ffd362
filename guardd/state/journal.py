"""The audit journal: an append-only file of every decision, action and command guardd makes.

One JSON object per line: ``{"ts": <epoch seconds>, "kind": "<snake_case fact>", ...fields}``.
``Journal.append`` returns only after the line is written and fsynced, so a record the caller has
seen returned survives a crash or power loss. ``Journal.append_many`` does the same for several
records with one write and one fsync (a close round's facts and child orders: one fsync a round,
not one a child); a batch lands in one file. The API is synchronous and thread-safe; the guard
calls it on the event loop (an append with its fsync costs about a millisecond, less than a
thread hop), and the kill's cancel goes out before the decision's record (runtime/executor.py).

A crash can leave a torn last line (no newline, or not JSON). Opening the journal copies that line
to ``<path>.torn-<n>``, cuts it off and appends a ``journal_torn_tail`` record, so complete records
are never lost and new records never glue onto a torn one. ``read_journal`` skips a torn tail
without touching the file.

Values are stored as plain JSON: paths, enums, dataclasses, pydantic models and datetimes are
converted; NaN and infinities become the strings "nan", "inf", "-inf" (strict JSON has no such
numbers, and a NaN rule value is exactly what an audit must be able to record).

Any text is stored, never refused: a lone surrogate (what ``json.loads`` makes of ``"\\udcff"`` in
a refused payload) is written as its JSON escape ``\\udcff``, which reads back as the same string;
bytes are stored as UTF-8 text with each invalid byte as ``\\xNN`` (so ``b"a\\xff"`` reads back
as the four characters ``a\\xff``). A refusal that could not be journaled would be a defect.

``Journal.recent`` keeps the last ``RECENT_RECORDS`` records appended by this process in memory
(the web console shows them; nothing is read back from disk for it).

Rotation (``[journal] rotate``: by size or by UTC day; off by default). The live file keeps its
name (``journal.jsonl``); when it is due, it is renamed to the next segment, ``journal.jsonl.<n>``
(n = 1, 2, ... zero-padded, never reused), the directory is fsynced, and a new live file is
created whose first record, ``journal_segment_started``, names the segment before it; the new
file and the directory are fsynced before the record that was due is appended. Nothing is copied
and nothing is deleted, so no record is lost whatever step a crash interrupts: a crash after the
rename leaves the records in the segment, and the next open creates a new live file. A rotation
that fails leaves the records where they were and is tried again at the next append
(``Journal.rotation_error`` says why). ``read_journal`` reads every segment, oldest first, then the
live file: the latch's witness, the close's children and the order ids a previous life of the
guard sent are found whichever segment holds them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import enum
import json
import math
import os
import re
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from decimal import Decimal
from pathlib import Path
from types import TracebackType
from typing import Any, BinaryIO, Literal, Self

from guardd.errors import JournalError
from guardd.state.durable import fsync_dir, write_all

__all__ = [
    "RECENT_RECORDS",
    "SEGMENT_STARTED_KIND",
    "TORN_TAIL_KIND",
    "Journal",
    "Rotation",
    "journal_segments",
    "read_journal",
]

TORN_TAIL_KIND = "journal_torn_tail"
SEGMENT_STARTED_KIND = "journal_segment_started"
RECENT_RECORDS = 50
_BLOCK = 64 * 1024
_DAY_S = 86_400


@dataclasses.dataclass(frozen=True, slots=True)
class Rotation:
    """When the live journal file becomes a segment: ``every`` "size" (once appending a record
    would take it past ``max_bytes``; a file holding one record larger than that is still kept
    whole), "day" (at the first append of a new UTC day), or "never"."""

    every: Literal["never", "size", "day"] = "never"
    max_bytes: int = 100 * 1024 * 1024


NEVER = Rotation()


class Journal:
    """An open, append-only audit journal at ``path`` (parent directories are created)."""

    def __init__(
        self,
        path: Path,
        *,
        clock: Callable[[], float] = time.time,
        rotation: Rotation = NEVER,
    ) -> None:
        self._path = path
        self._clock = clock
        self._rotation = rotation
        self._lock = threading.Lock()
        self._recent: deque[dict[str, Any]] = deque(maxlen=RECENT_RECORDS)
        self.torn_tail: Path | None = None  # where a torn last line found on open was copied
        self.rotation_error: str | None = None  # why the last rotation failed, until one works
        self._fd: int | None = None
        # The file self._fd writes: the live path, or the segment it was renamed to when a
        # rotation could rename it but not create the new live file.
        self._fd_path = path
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            created = not path.exists()
            self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
            if created:
                fsync_dir(path.parent)  # the new file's name must survive a crash too
            torn = _cut_torn_tail(path, self._fd)
            self._size = os.fstat(self._fd).st_size  # end of the last complete record
            self._day = _first_record_day(path, default=_utc_day(clock()))
        except OSError as exc:
            self.close()
            raise JournalError(f"cannot open journal {path}: {exc.strerror or exc}") from exc
        if torn is not None:
            self.torn_tail, torn_bytes = torn
            self.append(TORN_TAIL_KIND, torn_path=str(self.torn_tail), torn_bytes=torn_bytes)

    @property
    def path(self) -> Path:
        """The journal file."""
        return self._path

    def append(self, kind: str, **fields: Any) -> dict[str, Any]:
        """Write one record durably and return it as stored (plain JSON values).

        ``ts`` defaults to the clock; pass ``ts=`` to record an event's own time (replay).
        Raises ``JournalError`` if a value has no JSON form (any text has one) or the record
        cannot be made durable; the file is then left ending with its last complete record.
        """
        return self.append_many([(kind, fields)])[0]

    def append_many(self, records: Sequence[tuple[str, Mapping[str, Any]]]) -> list[dict[str, Any]]:
        """Write several records, in order, with one write and one fsync; return them as stored.

        All or none: when the batch cannot be made durable, ``JournalError`` is raised and the
        file is left ending with the last complete record before the batch (a crash in the
        middle can leave only a prefix of the batch, which reads back as such). Nothing of the
        batch may be acted on before this returns. Each record as in ``append``.
        """
        stored: list[dict[str, Any]] = []
        lines: list[bytes] = []
        for kind, given in records:
            if not kind:
                raise JournalError("a journal record needs a kind")
            fields = dict(given)
            ts = fields.pop("ts", None)
            record = _plain({"ts": self._clock() if ts is None else ts, "kind": kind, **fields}, "")
            line = json.dumps(record, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
            # A lone surrogate (e.g. from a refused JSON payload) cannot be UTF-8: its escape
            # (backslash u, four hex digits) is exactly the JSON escape, inside a JSON string.
            lines.append(line.encode("utf-8", "backslashreplace") + b"\n")
            stored.append(record)
        if not stored:
            return stored
        data = b"".join(lines)
        with self._lock:
            if self._fd is None:
                raise JournalError(f"journal {self._path} is closed")
            why = self._rotation_due(len(data))
            if why is not None:
                self._rotate(why)
            self._write(data, *stored)
        return stored

    def _write(self, data: bytes, *records: dict[str, Any]) -> None:
        assert self._fd is not None
        try:
            write_all(self._fd, data)
            os.fsync(self._fd)
        except OSError as exc:
            self._cut_back()
            raise JournalError(f"cannot append to journal {self._fd_path}: {exc}") from exc
        self._size += len(data)
        self._recent.extend(records)

    def _rotation_due(self, incoming: int) -> str | None:
        if self._fd_path != self._path:
            return "retry"  # renamed, but the new live file is still to be created
        match self._rotation.every:
            case "size":
                due = self._size > 0 and self._size + incoming > self._rotation.max_bytes
                return "size" if due else None
            case "day":
                return "day" if _utc_day(self._clock()) != self._day else None
            case "never":
                return None

    def _rotate(self, why: str) -> None:
        """Make the live file a segment and start a new live file (see the module docstring).
        A step that fails leaves every record where it is; the next append tries again."""
        assert self._fd is not None
        try:
            if self._fd_path == self._path:
                segment = _next_segment(self._path)
                os.rename(self._path, segment)
                fsync_dir(self._path.parent)
                self._fd_path = segment
            flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
            fd = os.open(self._path, flags, 0o640)
        except OSError as exc:
            self.rotation_error = f"cannot rotate journal {self._path}: {exc.strerror or exc}"
            return
        previous, old_fd = self._fd_path, self._fd
        self._fd, self._fd_path, self._size = fd, self._path, 0
        self._day = _utc_day(self._clock())
        # The old segment is complete and fsynced; an error closing it (EIO) must not escape
        # append as a bare OSError and end the loop that journals.
        with contextlib.suppress(OSError):
            os.close(old_fd)
        header = _plain(
            {
                "ts": self._clock(),
                "kind": SEGMENT_STARTED_KIND,
                "previous": previous.name,
                "why": why,
            },
            "",
        )
        line = json.dumps(header, separators=(",", ":")).encode() + b"\n"
        try:
            self._write(line, header)
            fsync_dir(self._path.parent)
        except (JournalError, OSError) as exc:
            # The live file exists (empty or with its header): records go on into it.
            self.rotation_error = f"journal {self._path}: new segment not durable: {exc}"
            return
        self.rotation_error = None

    def recent(self) -> list[dict[str, Any]]:
        """The last records appended (and made durable) by this process, oldest first."""
        with self._lock:
            return list(self._recent)

    def close(self) -> None:
        """Close the file; later appends raise ``JournalError``. Closing twice is harmless."""
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _cut_back(self) -> None:
        # A half-written line (disk full, I/O error) would glue the next record onto it.
        assert self._fd is not None
        try:
            os.ftruncate(self._fd, self._size)
            os.fsync(self._fd)
        except OSError:
            pass  # the next open finds and moves the torn tail aside


def journal_segments(path: Path) -> list[Path]:
    """The journal's files in order: its rotated segments, oldest first, then the live file
    (each only where it exists; an empty list when there is no journal at all)."""
    pattern = re.compile(re.escape(path.name) + r"\.(\d+)")
    numbered: list[tuple[int, Path]] = []
    if path.parent.is_dir():
        for entry in path.parent.iterdir():
            match = pattern.fullmatch(entry.name)
            if match is not None:
                numbered.append((int(match.group(1)), entry))
    files = [segment for _, segment in sorted(numbered)]
    if path.exists():
        files.append(path)
    return files


def read_journal(path: Path) -> Iterator[dict[str, Any]]:
    """Yield the journal's records in order, every rotated segment's first (oldest first), then
    the live file's; a torn last line of a file is skipped.

    Raises ``JournalError`` if there is no journal at all or a file cannot be opened, or if a
    line other than a file's last is not a JSON object (that is damage, not a torn append).
    """
    files = journal_segments(path) or [path]
    handles: list[tuple[Path, BinaryIO]] = []
    try:
        for file in files:
            handles.append((file, file.open("rb")))
    except OSError as exc:
        for _, handle in handles:
            handle.close()
        raise JournalError(f"cannot read journal {exc.filename}: {exc.strerror or exc}") from exc
    return _chain(handles)


def _chain(handles: list[tuple[Path, BinaryIO]]) -> Iterator[dict[str, Any]]:
    try:
        for file, handle in handles:
            yield from _records(file, handle)
    finally:
        for _, handle in handles:
            handle.close()


def _records(path: Path, handle: BinaryIO) -> Iterator[dict[str, Any]]:
    with handle:
        previous: tuple[int, bytes] | None = None
        for number, line in enumerate(handle, start=1):
            if previous is not None:
                record = _parse_line(previous[1])
                if record is None:
                    raise JournalError(f"{path}:{previous[0]}: damaged record (not a JSON object)")
                yield record
            previous = (number, line)
        if previous is not None:
            record = _parse_line(previous[1])
            if record is not None:
                yield record


def _parse_line(line: bytes) -> dict[str, Any] | None:
    """The record on a complete line, or None for a torn or damaged one."""
    if not line.endswith(b"\n"):
        return None
    try:
        value = json.loads(line)
    except (ValueError, RecursionError):
        return None
    return value if isinstance(value, dict) else None


def _cut_torn_tail(path: Path, fd: int) -> tuple[Path, int] | None:
    """Copy a torn last line aside and cut it off; return (copy, its size) or None."""
    with path.open("rb") as handle:
        size = handle.seek(0, os.SEEK_END)
        if size == 0:
            return None
        start = _last_line_start(handle, size)
        handle.seek(start)
        tail = handle.read(size - start)
    if _parse_line(tail) is not None:
        return None
    torn_path = _free_torn_path(path)
    with torn_path.open("xb") as torn:
        torn.write(tail)
        torn.flush()
        os.fsync(torn.fileno())
    fsync_dir(path.parent)
    # Only after the copy is durable: cut the journal back to its last complete record.
    os.ftruncate(fd, start)
    os.fsync(fd)
    return torn_path, len(tail)


def _last_line_start(handle: BinaryIO, size: int) -> int:
    """Offset of the first byte of the file's last line (the final newline belongs to it)."""
    end = size - 1  # a newline in the last byte ends the last line; look before it
    while end > 0:
        begin = max(0, end - _BLOCK)
        handle.seek(begin)
        block = handle.read(end - begin)
        newline = block.rfind(b"\n")
        if newline >= 0:
            return begin + newline + 1
        end = begin
    return 0


def _next_segment(path: Path) -> Path:
    """The name the live file takes when it is rotated: one past the highest segment."""
    segments = [p for p in journal_segments(path) if p != path]
    number = int(segments[-1].name.rsplit(".", 1)[1]) + 1 if segments else 1
    return path.with_name(f"{path.name}.{number:06d}")


def _utc_day(ts: float) -> int:
    return int(ts // _DAY_S)


def _first_record_day(path: Path, *, default: int) -> int:
    """The UTC day of the file's first record (when its segment began), else `default`."""
    with path.open("rb") as handle:
        record = _parse_line(handle.readline())
    ts = record.get("ts") if record is not None else None
    return _utc_day(ts) if isinstance(ts, int | float) and math.isfinite(ts) else default


def _free_torn_path(path: Path) -> Path:
    number = 1
    while (candidate := path.with_name(f"{path.name}.torn-{number}")).exists():
        number += 1
    return candidate


def _plain(value: Any, where: str) -> Any:
    """``value`` as plain JSON data; ``where`` names the field in an error."""
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        if math.isfinite(value):
            return value
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, enum.Enum):
        return _plain(value.value, where)
    if isinstance(value, Mapping):
        plain: dict[str, Any] = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise JournalError(f"journal field {where or '<record>'}: key {key!r} is not a str")
            plain[key] = _plain(item, f"{where}.{key}" if where else key)
        return plain
    if isinstance(value, list | tuple | set | frozenset):
        items = sorted(value, key=repr) if isinstance(value, set | frozenset) else value
        return [_plain(item, f"{where}[{index}]") for index, item in enumerate(items)]
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value).decode("utf-8", "backslashreplace")
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, dt.datetime | dt.date | dt.time):
        return value.isoformat()
    if isinstance(value, Decimal):
        return str(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        fields = {field.name: getattr(value, field.name) for field in dataclasses.fields(value)}
        return _plain(fields, where)
    model_dump = getattr(value, "model_dump", None)  # pydantic models, without importing pydantic
    if callable(model_dump):
        return _plain(model_dump(mode="json"), where)
    raise JournalError(
        f"journal field {where or '<record>'}: cannot store a {type(value).__name__}"
    )
