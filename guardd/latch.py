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

Fail closed: a missing file reads as HALTED ("latch_missing") unless the operator passed the
explicit fresh-start flag, and a file that cannot be read or parsed always reads as HALTED
("latch_unreadable"). Such a synthetic halt uses mode "cancel": orders are kept cancelled, but
guardd never closes positions just because a file vanished; the operator decides and re-arms.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Final, Literal, TypeVar, get_args

from guardd.errors import LatchError

__all__ = [
    "FRESH_START",
    "LATCH_MISSING",
    "LATCH_UNREADABLE",
    "LatchMode",
    "LatchState",
    "later_of",
    "read_latch",
    "witness_step",
    "write_latch",
]

LatchMode = Literal["cancel", "flatten"]
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
    mode: LatchMode = "cancel"
    detail: str = ""


def write_latch(path: Path, state: LatchState) -> None:
    """Replace the state file with ``state`` atomically and durably, or raise ``LatchError``.

    The state goes to a temporary file in the same directory, which is fsynced, renamed over
    ``path`` and followed by an fsync of the directory: after a crash the file holds either the
    old state or the new one, never a mix.
    """
    if not math.isfinite(state.since):
        raise LatchError(f"latch since must be a finite time, got {state.since!r}")
    data = json.dumps({"version": _VERSION, **asdict(state)}, ensure_ascii=False).encode("utf-8")
    temp: str | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, path)
        temp = None
        _fsync_dir(path.parent)
    except OSError as exc:
        raise LatchError(f"cannot write latch {path}: {exc.strerror or exc}") from exc
    finally:
        if temp is not None:
            Path(temp).unlink(missing_ok=True)
    _remove_stale_temps(path)


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
    mode: LatchMode = "flatten" if latch.get("mode") == "flatten" else "cancel"
    since = latch.get("since")
    if (
        not isinstance(decision_id, int)
        or latch.get("mode") not in get_args(LatchMode)
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
    if mode not in get_args(LatchMode):
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


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove_stale_temps(path: Path) -> None:
    # Temp files left by a crash between write and rename; one guardd owns a state directory.
    for stale in path.parent.glob(f".{path.name}.*.tmp"):
        stale.unlink(missing_ok=True)
