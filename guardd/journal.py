"""The audit journal: an append-only file of every decision, action and command guardd makes.

One JSON object per line: ``{"ts": <epoch seconds>, "kind": "<snake_case fact>", ...fields}``.
``Journal.append`` returns only after the line is written and fsynced, so a record the caller has
seen returned survives a crash or power loss. The API is synchronous and thread-safe; asyncio code
calls it through ``asyncio.to_thread`` when an fsync must not stall the loop.

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
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import enum
import json
import math
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from decimal import Decimal
from pathlib import Path
from types import TracebackType
from typing import Any, BinaryIO, Self

from guardd.errors import JournalError

__all__ = ["RECENT_RECORDS", "TORN_TAIL_KIND", "Journal", "read_journal"]

TORN_TAIL_KIND = "journal_torn_tail"
RECENT_RECORDS = 50
_BLOCK = 64 * 1024


class Journal:
    """An open, append-only audit journal at ``path`` (parent directories are created)."""

    def __init__(self, path: Path, *, clock: Callable[[], float] = time.time) -> None:
        self._path = path
        self._clock = clock
        self._lock = threading.Lock()
        self._recent: deque[dict[str, Any]] = deque(maxlen=RECENT_RECORDS)
        self.torn_tail: Path | None = None  # where a torn last line found on open was copied
        self._fd: int | None = None
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            created = not path.exists()
            self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
            if created:
                _fsync_dir(path.parent)  # the new file's name must survive a crash too
            torn = _cut_torn_tail(path, self._fd)
            self._size = os.fstat(self._fd).st_size  # end of the last complete record
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
        if not kind:
            raise JournalError("a journal record needs a kind")
        ts = fields.pop("ts", None)
        record = _plain({"ts": self._clock() if ts is None else ts, "kind": kind, **fields}, "")
        line = json.dumps(record, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
        # A lone surrogate (e.g. from a refused JSON payload) cannot be UTF-8: its escape
        # (backslash u, four hex digits) is exactly the JSON escape, inside a JSON string.
        data = line.encode("utf-8", "backslashreplace") + b"\n"
        with self._lock:
            if self._fd is None:
                raise JournalError(f"journal {self._path} is closed")
            try:
                _write_all(self._fd, data)
                os.fsync(self._fd)
            except OSError as exc:
                self._cut_back()
                raise JournalError(f"cannot append to journal {self._path}: {exc}") from exc
            self._size += len(data)
            self._recent.append(record)
        result: dict[str, Any] = record
        return result

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


def read_journal(path: Path) -> Iterator[dict[str, Any]]:
    """Yield the journal's records in order, skipping a torn last line.

    Raises ``JournalError`` if the file cannot be opened, or if a line other than the last is not
    a JSON object (that is damage, not a torn append).
    """
    try:
        handle = path.open("rb")
    except OSError as exc:
        raise JournalError(f"cannot read journal {path}: {exc.strerror or exc}") from exc
    return _records(path, handle)


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
    _fsync_dir(path.parent)
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


def _free_torn_path(path: Path) -> Path:
    number = 1
    while (candidate := path.with_name(f"{path.name}.torn-{number}")).exists():
        number += 1
    return candidate


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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
