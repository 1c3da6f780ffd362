"""The kill latch: the state file that keeps a halted account halted across restarts.

HALTED is written here (atomically, fsynced) right after a kill's global cancel and before any
closing order or command answer, and read back before guardd connects on start. The file is small
JSON::

    {"version": 1, "halted": true, "reason": "leverage_breached", "source": "rule:leverage",
     "since": 1718000000.25, "decision_id": "d-42", "mode": "flatten", "detail": ""}

The journal is the latch's second witness: every decision record that latches a kill carries the
latch (`latch` field), and one that leaves HALTED says so. `witness_step` folds journal records
into the latch they say holds; `later_of` picks, between the file and that witness, the one with
the later decision. So a kill whose latch write failed (disk full...) but whose decision reached
the journal still starts HALTED.

Running out of file descriptors (a connection flood, a leak) never makes the latch the first
thing to fail: `LatchWriter` keeps the state directory open and one spare descriptor in reserve,
released just before the temporary file is created and taken back after, so a write needs no
descriptor it does not already hold. The executor keeps one for the whole run.

Fail closed: a missing file reads as HALTED ("latch_missing") unless the operator passed the
explicit fresh-start flag, and a file that cannot be read or parsed always reads as HALTED
("latch_unreadable"). Such a synthetic halt uses mode "cancel": orders are kept cancelled, but
guardd never closes positions just because a file vanished; the operator decides and re-arms.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import secrets
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Final, Self, TypeVar

from guardd.core.engine import KILL_MODES, KillMode
from guardd.errors import LatchError
from guardd.state.durable import write_all

__all__ = [
    "FRESH_START",
    "LATCH_MISSING",
    "LATCH_UNREADABLE",
    "LatchState",
    "LatchWriter",
    "later_of",
    "read_latch",
    "witness_step",
    "write_latch",
]

LATCH_MISSING: Final = "latch_missing"
LATCH_UNREADABLE: Final = "latch_unreadable"
FRESH_START: Final = "fresh_start"
_VERSION: Final = 1
_SOURCE_FILE: Final = "latch_file"

_T = TypeVar("_T")


@dataclass(frozen=True, slots=True)
class LatchState:
    """The latch: whether the account is halted, why, by whom, since when, and how.

    ``since`` is epoch seconds; ``decision_id`` ties a halt to its journal records; ``mode`` is
    what the halt does ("cancel" orders, or also "flatten" positions); ``detail`` says more, e.g.
    why a state file could not be read.
    """

    halted: bool
    reason: str
    source: str
    since: float
    decision_id: str | None = None
    mode: KillMode = "cancel"
    detail: str = ""


class LatchWriter:
    """Writes the latch file at ``path`` atomically and durably, with the file descriptors it
    needs held in reserve (the state directory, open, and one spare); ``LatchError`` on failure.

    A write goes to a temporary file in the same directory, which is fsynced, renamed over
    ``path`` and followed by an fsync of the directory: after a crash the file holds either the
    old state or the new one, never a mix. The spare descriptor is closed just before the
    temporary file is created (which takes its slot) and reopened once that file is closed, so
    the write succeeds even when every other descriptor of the process is in use.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._dir_fd: int | None = None
        self._spare: int | None = None
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._dir_fd = _open_dir(path.parent)
        except OSError as exc:
            raise LatchError(f"cannot write latch {path}: {exc.strerror or exc}") from exc
        self._take_spare()

    @property
    def reserved(self) -> bool:
        """True while the spare descriptor is held (it is retaken after each write)."""
        return self._spare is not None

    def write(self, state: LatchState) -> None:
        """Replace the latch file with ``state``, or raise ``LatchError``."""
        if not math.isfinite(state.since):
            raise LatchError(f"latch since must be a finite time, got {state.since!r}")
        text = json.dumps({"version": _VERSION, **asdict(state)}, ensure_ascii=False)
        data = text.encode("utf-8", "backslashreplace")  # a lone surrogate: its JSON escape
        temp: Path | None = None
        self._release_spare()
        try:
            dir_fd = self._current_dir()
            temp = self.path.with_name(f".{self.path.name}.{secrets.token_hex(6)}.tmp")
            fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            try:
                write_all(fd, data)
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(temp, self.path)
            temp = None
            os.fsync(dir_fd)
        except OSError as exc:
            raise LatchError(f"cannot write latch {self.path}: {exc.strerror or exc}") from exc
        finally:
            if temp is not None:
                with contextlib.suppress(OSError):
                    temp.unlink(missing_ok=True)
            self._take_spare()
        _remove_stale_temps(self.path)

    def close(self) -> None:
        """Release the held descriptors; a later ``write`` raises ``LatchError``."""
        self._release_spare()
        if self._dir_fd is not None:
            os.close(self._dir_fd)
            self._dir_fd = None

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _current_dir(self) -> int:
        """The held directory descriptor, reopened if the directory was replaced meanwhile."""
        if self._dir_fd is None:
            raise OSError(9, "latch writer is closed")
        held, now = os.fstat(self._dir_fd), os.stat(self.path.parent)
        if (held.st_dev, held.st_ino) != (now.st_dev, now.st_ino):
            os.close(self._dir_fd)
            self._dir_fd = None
            self._dir_fd = _open_dir(self.path.parent)
        return self._dir_fd

    def _take_spare(self) -> None:
        if self._spare is None and self._dir_fd is not None:
            with contextlib.suppress(OSError):  # retaken after the next write, then
                self._spare = os.dup(self._dir_fd)

    def _release_spare(self) -> None:
        if self._spare is not None:
            os.close(self._spare)
            self._spare = None


def write_latch(path: Path, state: LatchState) -> None:
    """Replace the state file with ``state`` atomically and durably, or raise ``LatchError``
    (a one-off ``LatchWriter``; a long-running writer keeps one to hold its reserve)."""
    with LatchWriter(path) as writer:
        writer.write(state)


def read_latch(path: Path, *, allow_missing: bool, now: float | None = None) -> LatchState:
    """The latch in ``path``; never raises.

    Missing file: HALTED ("latch_missing"), or ARMED ("fresh_start") when ``allow_missing`` is the
    operator's explicit ``--fresh-start``. Unreadable or corrupt file: always HALTED
    ("latch_unreadable"). ``now`` (default: the clock) stamps such synthetic states.
    """
    stamp = time.time() if now is None else now
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        if allow_missing:
            return LatchState(
                halted=False, reason=FRESH_START, source="operator", since=stamp,
                detail=f"{path} did not exist; started with --fresh-start",
            )  # fmt: skip
        return _fail_closed(LATCH_MISSING, stamp, f"{path} does not exist")
    except OSError as exc:
        return _fail_closed(LATCH_UNREADABLE, stamp, f"{path}: {exc.strerror or exc}")
    try:
        return _parse(raw)
    except ValueError as exc:
        return _fail_closed(LATCH_UNREADABLE, stamp, f"{path}: {exc}")


def witness_step(witness: LatchState | None, record: Mapping[str, Any]) -> LatchState | None:
    """The latch the journal says holds after `record`, given what it said before (None: no
    kill since the last re-arm). Only `decision` records count; a malformed one changes nothing.
    """
    if record.get("kind") != "decision":
        return witness
    decision_id = record.get("decision_id")
    latch = record.get("latch")
    if record.get("previous_state") == "HALTED" and record.get("state") != "HALTED":
        return None  # re-armed
    if record.get("state") != "HALTED" or not isinstance(latch, dict):
        return witness
    mode: KillMode = "flatten" if latch.get("mode") == "flatten" else "cancel"
    since = latch.get("since")
    if (
        not isinstance(decision_id, int)
        or latch.get("mode") not in KILL_MODES
        or isinstance(since, bool)
        or not isinstance(since, int | float)
        or not _finite(since)
    ):
        return witness
    return LatchState(
        halted=True,
        reason=str(latch.get("reason", "")),
        source=str(latch.get("source", "")),
        since=float(since),
        decision_id=str(decision_id),
        mode=mode,
        detail=f"principal={latch.get('principal', '')}; restored from the journal",
    )


def later_of(file: LatchState, witness: LatchState | None) -> LatchState:
    """The latch to start from: the journal's witness when it records a later decision than the
    file's state (or the file names none), else the file."""
    if witness is None:
        return file
    return witness if _decision_number(witness) > _decision_number(file) else file


def _decision_number(state: LatchState) -> int:
    value = state.decision_id
    return int(value) if value is not None and value.isdecimal() else -1


def _fail_closed(reason: str, since: float, detail: str) -> LatchState:
    return LatchState(
        halted=True, reason=reason, source=_SOURCE_FILE, since=since, mode="cancel", detail=detail
    )


def _parse(raw: bytes) -> LatchState:
    """A state from the file's bytes; ``ValueError`` saying what is wrong otherwise."""
    try:
        document = json.loads(raw)
    except RecursionError as exc:
        raise ValueError("not a latch document (nested too deeply)") from exc
    # json.JSONDecodeError and UnicodeDecodeError are ValueErrors already.
    if not isinstance(document, dict):
        raise ValueError("not a latch document (expected a JSON object)")
    if document.get("version") != _VERSION:
        raise ValueError(f"unknown latch version {document.get('version')!r}")
    expected = {"version", "halted", "reason", "source", "since", "decision_id", "mode", "detail"}
    if set(document) != expected:
        missing, unknown = sorted(expected - set(document)), sorted(set(document) - expected)
        raise ValueError(f"latch keys wrong (missing {missing}, unknown {unknown})")
    halted = _typed(document, "halted", bool)
    since = document["since"]
    if isinstance(since, bool) or not isinstance(since, int | float) or not _finite(since):
        raise ValueError(f"latch since must be a finite number, got {since!r}")
    decision_id = document["decision_id"]
    if decision_id is not None and not isinstance(decision_id, str):
        raise ValueError(f"latch decision_id must be a string or null, got {decision_id!r}")
    mode = document["mode"]
    if mode not in KILL_MODES:
        raise ValueError(f"latch mode must be 'cancel' or 'flatten', got {mode!r}")
    return LatchState(
        halted=halted,
        reason=_typed(document, "reason", str),
        source=_typed(document, "source", str),
        since=float(since),
        decision_id=decision_id,
        mode=mode,
        detail=_typed(document, "detail", str),
    )


def _finite(number: int | float) -> bool:
    try:
        return math.isfinite(number)
    except OverflowError:  # an int too large for a float (JSON integers are unbounded)
        return False


def _typed(document: dict[str, Any], key: str, kind: type[_T]) -> _T:
    value = document[key]
    if not isinstance(value, kind):
        raise ValueError(f"latch {key} must be a {kind.__name__}, got {value!r}")
    return value


def _open_dir(directory: Path) -> int:
    return os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)


def _remove_stale_temps(path: Path) -> None:
    # Temp files left by a crash between write and rename; one guardd owns a state directory.
    # Best effort: listing the directory takes a descriptor, which may not be there to take.
    with contextlib.suppress(OSError):
        for stale in path.parent.glob(f".{path.name}.*.tmp"):
            stale.unlink(missing_ok=True)
