"""The kill latch: the state file that keeps a halted account halted across restarts.

HALTED is written here (atomically, fsynced) right after a kill's global cancel and before any
closing order or command answer, and read back before guardd connects on start. The file holds
the latch as the engine knows it (`guardd.core.engine.Latch`, who killed included), or, when the
account is not halted, an `Armed` record (who re-armed, or the operator's ``--fresh-start``). It is
small JSON::

    {"version": 2, "halted": true, "reason": "leverage_breached", "source": "rule:leverage",
     "principal": "guardd", "mode": "flatten", "since": 1718000000.25, "decision_id": 42,
     "detail": ""}
    {"version": 2, "halted": false, "reason": "re-armed", "source": "arm", "principal": "alice",
     "since": 1718000100.5, "decision_id": 43, "detail": "reviewed the bot"}

A version 1 file (before the principal was kept) still reads: its halt keeps its mode, and its
principal comes from the ``principal=...`` its writer put in ``detail`` ("unknown" without one);
a decision id that is not a number reads as 0 (no decision).

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
("latch_unreadable"). Such a synthetic halt uses mode "cancel", source "latch_file", principal
"guardd" and decision id 0: orders are kept cancelled, but guardd never closes positions just
because a file vanished; the operator decides and re-arms.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Final, Self, TypeGuard, TypeVar

from guardd.core.engine import Latch, kill_mode
from guardd.errors import LatchError
from guardd.state.durable import write_all

__all__ = [
    "FRESH_START",
    "LATCH_MISSING",
    "LATCH_UNREADABLE",
    "Armed",
    "LatchFile",
    "LatchWriter",
    "later_of",
    "read_latch",
    "witness_step",
    "write_latch",
]

LATCH_MISSING: Final = "latch_missing"
LATCH_UNREADABLE: Final = "latch_unreadable"
FRESH_START: Final = "fresh_start"
_VERSION: Final = 2
_V1: Final = 1
_SOURCE_FILE: Final = "latch_file"
_UNKNOWN_PRINCIPAL: Final = "unknown"

_T = TypeVar("_T")


@dataclass(frozen=True, slots=True)
class Armed:
    """What the latch file holds while the account is not halted: why (``reason``: "re-armed" or
    "fresh_start"), from where and by whom, since when (epoch seconds), the decision that re-armed
    (0: none) and, in ``detail``, the operator's words."""

    reason: str
    source: str
    principal: str
    since: float
    decision_id: int = 0
    detail: str = ""


LatchFile = Latch | Armed
"""What the latch file holds: the engine's latch while halted, else an `Armed` record."""


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

    def write(self, state: LatchFile) -> None:
        """Replace the latch file with ``state``, or raise ``LatchError``."""
        if not math.isfinite(state.since):
            raise LatchError(f"latch since must be a finite time, got {state.since!r}")
        text = json.dumps(_document(state), ensure_ascii=False)
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


def write_latch(path: Path, state: LatchFile) -> None:
    """Replace the state file with ``state`` atomically and durably, or raise ``LatchError``
    (a one-off ``LatchWriter``; a long-running writer keeps one to hold its reserve)."""
    with LatchWriter(path) as writer:
        writer.write(state)


def read_latch(path: Path, *, allow_missing: bool, now: float | None = None) -> LatchFile:
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
            return Armed(
                reason=FRESH_START, source="operator", principal="operator", since=stamp,
                detail=f"{path} did not exist; started with --fresh-start",
            )  # fmt: skip
        return _fail_closed(LATCH_MISSING, stamp, f"{path} does not exist")
    except OSError as exc:
        return _fail_closed(LATCH_UNREADABLE, stamp, f"{path}: {exc.strerror or exc}")
    try:
        return _parse(raw)
    except ValueError as exc:
        return _fail_closed(LATCH_UNREADABLE, stamp, f"{path}: {exc}")


def witness_step(witness: Latch | None, record: Mapping[str, Any]) -> Latch | None:
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
    since = latch.get("since")
    if not _whole(decision_id) or not _time(since):
        return witness
    mode = kill_mode(latch.get("mode"))
    if mode is None:
        return witness
    return Latch(
        reason=str(latch.get("reason", "")),
        source=str(latch.get("source", "")),
        principal=str(latch.get("principal", _UNKNOWN_PRINCIPAL)),
        mode=mode,
        since=float(since),
        decision_id=decision_id,
        detail="restored from the journal",
    )


def later_of(file: LatchFile, witness: Latch | None) -> LatchFile:
    """The latch to start from: the journal's witness when it records a later decision than the
    file's state (or the file names none), else the file."""
    if witness is None:
        return file
    return witness if witness.decision_id > file.decision_id else file


def _fail_closed(reason: str, since: float, detail: str) -> Latch:
    return Latch(
        reason=reason,
        source=_SOURCE_FILE,
        principal="guardd",
        mode="cancel",
        since=since,
        decision_id=0,
        detail=detail,
    )


def _document(state: LatchFile) -> dict[str, object]:
    """The file's JSON object for ``state`` (version 2)."""
    common = {
        "reason": state.reason,
        "source": state.source,
        "principal": state.principal,
        "since": state.since,
        "decision_id": state.decision_id,
        "detail": state.detail,
    }
    if isinstance(state, Latch):
        return {"version": _VERSION, "halted": True, **common, "mode": state.mode}
    return {"version": _VERSION, "halted": False, **common}


_V2_KEYS: Final = frozenset(
    {"version", "halted", "reason", "source", "principal", "since", "decision_id", "detail"}
)
_V1_KEYS: Final = frozenset(
    {"version", "halted", "reason", "source", "since", "decision_id", "mode", "detail"}
)


def _parse(raw: bytes) -> LatchFile:
    """A state from the file's bytes; ``ValueError`` saying what is wrong otherwise."""
    try:
        document = json.loads(raw)
    except RecursionError as exc:
        raise ValueError("not a latch document (nested too deeply)") from exc
    # json.JSONDecodeError and UnicodeDecodeError are ValueErrors already.
    if not isinstance(document, dict):
        raise ValueError("not a latch document (expected a JSON object)")
    version = document.get("version")
    if isinstance(version, bool) or version not in (_V1, _VERSION):
        raise ValueError(f"unknown latch version {version!r}")
    halted = _typed(document, "halted", bool)
    if version == _V1:
        return _parse_v1(document, halted)
    _check_keys(document, _V2_KEYS | {"mode"} if halted else _V2_KEYS)
    decision_id = document["decision_id"]
    if not _whole(decision_id) or decision_id < 0:
        raise ValueError(f"latch decision_id must be a whole number >= 0, got {decision_id!r}")
    return _state(document, halted, _typed(document, "principal", str), decision_id)


def _parse_v1(document: dict[str, Any], halted: bool) -> LatchFile:
    """A version 1 file: no principal of its own (its writer put ``principal=<name>`` in
    ``detail``) and the decision id as a string."""
    _check_keys(document, _V1_KEYS)
    if kill_mode(document["mode"]) is None:  # checked even when armed, as version 1 did
        raise ValueError(f"latch mode must be 'cancel' or 'flatten', got {document['mode']!r}")
    decision_id = document["decision_id"]
    if decision_id is not None and not isinstance(decision_id, str):
        raise ValueError(f"latch decision_id must be a string or null, got {decision_id!r}")
    number = int(decision_id) if decision_id is not None and decision_id.isdecimal() else 0
    detail = _typed(document, "detail", str)
    named = detail.removeprefix("principal=") if detail.startswith("principal=") else ""
    return _state(document, halted, named or _UNKNOWN_PRINCIPAL, number)


def _state(document: dict[str, Any], halted: bool, principal: str, decision_id: int) -> LatchFile:
    since = document["since"]
    if not _time(since):
        raise ValueError(f"latch since must be a finite number, got {since!r}")
    reason = _typed(document, "reason", str)
    source = _typed(document, "source", str)
    detail = _typed(document, "detail", str)
    if not halted:
        return Armed(reason, source, principal, float(since), decision_id, detail)
    mode = kill_mode(document["mode"])
    if mode is None:
        raise ValueError(f"latch mode must be 'cancel' or 'flatten', got {document['mode']!r}")
    return Latch(reason, source, principal, mode, float(since), decision_id, detail)


def _check_keys(document: dict[str, Any], expected: frozenset[str]) -> None:
    if set(document) != expected:
        missing, unknown = sorted(expected - set(document)), sorted(set(document) - expected)
        raise ValueError(f"latch keys wrong (missing {missing}, unknown {unknown})")


def _whole(value: object) -> TypeGuard[int]:
    """Whether a JSON value is a whole number (not a boolean)."""
    return isinstance(value, int) and not isinstance(value, bool)


def _time(value: object) -> TypeGuard[int | float]:
    """Whether a JSON value is a finite number of seconds (not a boolean)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    try:
        return math.isfinite(value)
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
