"""Used MQTT command nonces, kept on disk: a captured signed command stays refused after a restart.

The file (``<state_dir>/nonces.jsonl``) holds one JSON line per accepted signed command::

    {"key_id": "alice", "nonce": "9f2c4e...", "ts": 1767225600, "seen": 1767225601.2}

``ts`` is the command's own timestamp, ``seen`` the guard's clock when it accepted it. A command is
valid only while ``|now - ts| <= window_s``, so its nonce must be remembered until
``max(ts, seen) + window_s``; after that the timestamp check refuses it anyway.

- ``remember`` checks the nonce in memory (``NonceCache``: a replay is a ``ReplayError``), then
  appends its line and ``fdatasync``s the file BEFORE returning: the command takes effect only
  once its nonce is on disk (one small append and one sync). A kill's nonce is the exception
  (``durable=False``): recorded in memory at once, written by ``sync`` after the kill was carried
  out (the MQTT listener syncs after each command), so no fsync stands before the kill's cancel;
  a kill replayed after a crash in between could only halt again.
- ``NonceStore.open`` reads the file, drops every entry older than the window (bounded: the file
  never holds more than the commands of one window plus those appended since the last compaction),
  and rewrites it with the live entries (temporary file, fsync, rename, directory fsync). A torn
  last line, from a crash during an append, is skipped: that append had not returned, so its
  command never took effect.
- The file is compacted again whenever ``compact_after`` lines were appended since the last
  compaction (the compaction replaces that command's append).

When the guard cannot know or record a nonce (the file is unreadable at start, or an append or
sync fails), ``remember`` raises ``NonceNotDurableError`` after recording the nonce in memory:
``verify_signed_command`` refuses an arm on it, and lets a kill through (its replay after a
restart can only halt again; a kill must never wait on a broken disk). Commands signed before the
start of a guard whose file was unreadable are treated the same way.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Self

import structlog

from guardd.control.auth import NonceCache
from guardd.errors import NonceNotDurableError
from guardd.state.durable import fsync_dir, write_all

__all__ = ["NonceRecord", "NonceStore", "read_nonce_file"]

log = structlog.get_logger(__name__)


@dataclass(frozen=True, slots=True)
class NonceRecord:
    """One used nonce: whose key, the command's timestamp, and when the guard accepted it."""

    key_id: str
    nonce: str
    ts: float
    seen: float

    def expires(self, window_s: float) -> float:
        """The moment after which the command's timestamp alone refuses it."""
        return max(self.ts, self.seen) + window_s

    def line(self) -> bytes:
        """The record as one JSON line."""
        data = {"key_id": self.key_id, "nonce": self.nonce, "ts": self.ts, "seen": self.seen}
        return (json.dumps(data, separators=(",", ":")) + "\n").encode()


def _parse(line: bytes) -> NonceRecord | None:
    try:
        data = json.loads(line)
    except ValueError:
        return None
    if not isinstance(data, dict):
        return None
    key_id, nonce, ts, seen = (data.get(k) for k in ("key_id", "nonce", "ts", "seen"))
    if not (isinstance(key_id, str) and isinstance(nonce, str)):
        return None
    if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in (ts, seen)):
        return None
    assert isinstance(ts, int | float) and isinstance(seen, int | float)
    if not (math.isfinite(ts) and math.isfinite(seen)):
        return None
    return NonceRecord(key_id, nonce, float(ts), float(seen))


def read_nonce_file(path: Path) -> tuple[list[NonceRecord], int]:
    """Every well-formed record of a nonce file and the number of lines skipped as torn or
    corrupt; ``OSError`` if it cannot be read (an absent file is empty)."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return [], 0
    records: list[NonceRecord] = []
    skipped = 0
    for line in raw.splitlines():
        if not line.strip():
            continue
        record = _parse(line)
        if record is None:
            skipped += 1
        else:
            records.append(record)
    return records, skipped


class NonceStore:
    """The nonces of accepted signed commands, in memory and durably on disk (see the module doc).

    Used as the ``nonces`` of ``verify_signed_command``; ``close`` it when done.
    """

    def __init__(
        self,
        path: Path,
        *,
        window_s: float,
        max_entries: int = 10_000,
        compact_after: int | None = None,
    ) -> None:
        self.path = path
        self.window_s = window_s
        self._cache = NonceCache(window_s, max_entries=max_entries)
        self._live: dict[tuple[str, str], NonceRecord] = {}
        self._compact_after = compact_after if compact_after is not None else 2 * max_entries
        self._appended = 0
        self._fd: int | None = None
        self._rewrite_next = False  # a failed append may have left a torn line: rewrite instead
        self._unknown_before: float | None = None  # the history was lost: commands before this
        self._unsynced: list[NonceRecord] = []  # recorded, not yet on disk (a kill's, until sync)

    @classmethod
    def open(
        cls,
        path: Path,
        *,
        window_s: float,
        now: float,
        max_entries: int = 10_000,
        compact_after: int | None = None,
    ) -> Self:
        """Read the file, keep the entries still within the window, compact it and open it for
        appending. Never raises for the file: a problem is logged and handled fail-closed."""
        store = cls(path, window_s=window_s, max_entries=max_entries, compact_after=compact_after)
        try:
            records, skipped = read_nonce_file(path)
        except OSError as exc:
            # What was used before is unknown: arms signed before now are refused (kills pass).
            log.error("nonce_file_unreadable", path=str(path), error=str(exc))
            store._unknown_before = now
            records, skipped = [], 0
        if skipped:
            log.warning("nonce_lines_skipped", path=str(path), count=skipped)
        for record in records:
            if record.expires(window_s) >= now:
                store._restore(record)
        dropped = len(records) - len(store._live)
        try:
            store._compact()
        except OSError as exc:
            log.error("nonce_file_not_written", path=str(path), error=str(exc))
            store._rewrite_next = True
        log.info("nonces_restored", path=str(path), live=len(store._live), pruned=dropped)
        return store

    def __len__(self) -> int:
        return len(self._live)

    def _restore(self, record: NonceRecord) -> None:
        key = (record.key_id, record.nonce)
        if key not in self._live:
            self._cache.restore(record.key_id, record.nonce, expires=record.expires(self.window_s))
            self._live[key] = record

    def _prune(self, now: float) -> None:
        expired = [k for k, r in self._live.items() if r.expires(self.window_s) < now]
        for key in expired:
            del self._live[key]

    def remember(
        self, key_id: str, nonce: str, *, ts: float, now: float, durable: bool = True
    ) -> None:
        """Record a nonce durably: ``ReplayError`` if it was used within the window (or too many
        commands are live), ``NonceNotDurableError`` if it is recorded in memory only.

        ``durable=False`` (a kill's nonce): recorded in memory now, so that a replay is refused
        at once, and written by the next ``sync`` (or durable ``remember``), after the kill."""
        self._cache.remember(key_id, nonce, ts=ts, now=now)  # ReplayError: nothing recorded
        record = NonceRecord(key_id, nonce, float(ts), float(now))
        self._live[(key_id, nonce)] = record
        self._unsynced.append(record)
        if durable:
            self._write(now)
        if self._unknown_before is not None and ts < self._unknown_before:
            raise NonceNotDurableError(
                "the record of nonces used before this start was unreadable: a command signed "
                "before the start may be a replay"
            )

    def sync(self) -> None:
        """Write the nonces recorded with ``durable=False``; a failure is logged (and the file
        rewritten on the next write), never raised: their commands have been carried out."""
        if self._unsynced:
            with contextlib.suppress(NonceNotDurableError):
                self._write(self._unsynced[-1].seen)

    def _write(self, now: float) -> None:
        """Append every record not yet on disk (or rewrite the file), then sync it."""
        pending, self._unsynced = self._unsynced, []
        try:
            if self._rewrite_next or self._appended >= self._compact_after:
                self._prune(now)
                self._compact()
            else:
                self._append(b"".join(r.line() for r in pending))
        except OSError as exc:
            self._rewrite_next = True  # the next write rewrites every live entry, these too
            keys = sorted({r.key_id for r in pending})
            log.error("nonce_not_durable", path=str(self.path), key_ids=keys, error=str(exc))
            raise NonceNotDurableError(
                f"nonce {pending[-1].nonce!r} not recorded durably ({exc.strerror or exc})"
            ) from exc

    def _append(self, line: bytes) -> None:
        if self._fd is None:
            self._fd = os.open(
                self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600
            )
        written = os.write(self._fd, line)
        if written != len(line):
            raise OSError(f"short write to {self.path} ({written} of {len(line)} bytes)")
        os.fdatasync(self._fd)
        self._appended += 1

    def _compact(self) -> None:
        """Rewrite the file with the live entries only, atomically and durably."""
        self.close()
        tmp = self.path.with_name(self.path.name + ".tmp")
        data = b"".join(r.line() for r in self._live.values())
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, self.path)
        fsync_dir(self.path.parent)
        self._appended = 0
        self._rewrite_next = False

    def close(self) -> None:
        """Close the append descriptor (reopened on the next append)."""
        if self._fd is not None:
            fd, self._fd = self._fd, None
            with contextlib.suppress(OSError):
                os.close(fd)
