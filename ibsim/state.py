"""The simulated gateway's state file (`guardd sim --state FILE`): the account outlives the
gateway process, as it does at IB.

The file is one JSON document: what `SimGateway.snapshot` returns (the exchange's accounts,
positions, cash, orders with their terms and statuses, fills, permId and execId sequences, prices;
the gateway's per-client seen order ids and its clock offset) under a format marker and a
version. Every write is atomic and durable: a temporary file in the same directory, fsynced,
renamed over FILE, then the directory fsynced; after a crash FILE holds the old state or the new
one, never a mix.

When it is written: synchronously after every change that matters and BEFORE any client hears of
it (an order accepted, modified, cancelled, filled or refused with a new permId; an order id a
client has now seen; see `SimGateway.route`). No debounce: a fill a client was told of is on disk
first, so a kill -9 at any instant never loses an acknowledged fill. Price steps alone are not a
change that matters: prices are saved with the next change and on a clean stop.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
from pathlib import Path
from typing import Any

FORMAT = "guardd-sim-state"
VERSION = 1


class StateFileError(Exception):
    """The state file cannot be read or written; the message is one line naming the file."""


class StateFile:
    """Reads and writes one gateway state file (see the module doc)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def load(self) -> dict[str, Any] | None:
        """The saved state, None when the file does not exist; StateFileError when it exists
        but is not a state file this version reads."""
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise StateFileError(f"{self.path}: cannot read: {exc.strerror or exc}") from exc
        try:
            document = json.loads(raw, parse_constant=_no_constant)
        except (ValueError, UnicodeDecodeError) as exc:
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise StateFileError(f"{self.path}: not valid JSON ({reason})") from exc
        if not isinstance(document, dict) or document.get("format") != FORMAT:
            raise StateFileError(f"{self.path}: not a guardd sim state file")
        if document.get("version") != VERSION:
            raise StateFileError(
                f"{self.path}: state version {document.get('version')!r}, this gateway reads "
                f"{VERSION}"
            )
        state = document.get("state")
        if not isinstance(state, dict):
            raise StateFileError(f"{self.path}: no state in the file")
        return state

    def save(self, state: dict[str, Any]) -> None:
        """Replace the file with `state`, atomically and durably (see the module doc)."""
        document = {"format": FORMAT, "version": VERSION, "state": state}
        data = json.dumps(document, allow_nan=False, separators=(",", ":")).encode()
        directory = self.path.parent
        temp = directory / f".{self.path.name}.{secrets.token_hex(6)}.tmp"
        try:
            fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(temp, self.path)
            dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        except OSError as exc:
            with contextlib.suppress(OSError):
                temp.unlink(missing_ok=True)
            raise StateFileError(f"{self.path}: cannot write: {exc.strerror or exc}") from exc


def _no_constant(name: str) -> float:
    # NaN and Infinity are not JSON; a file carrying them was not written by `save`.
    raise ValueError(f"{name} is not a number a state file holds")
