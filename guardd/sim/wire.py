"""TWS API text-protocol framing: length-prefixed frames of NUL-terminated ASCII fields.

A frame is `[uint32 big-endian length][field\\0 field\\0 ...]`. The handshake starts with the bare
bytes `API\\0` before any frame. Field values are formatted the way TWS formats them: booleans as
`1`/`0`, None as the empty string, floats without a trailing `.0` noise only where TWS omits it.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable

API_PREFIX = b"API\0"
MAX_FRAME = 16 * 1024 * 1024  # TWS refuses larger messages; so do we
UNSET_DOUBLE = 1.7976931348623157e308
UNSET_INTEGER = 2**31 - 1
UNSET_DECIMAL_TEXT = "170141183460469231731687303715884105727"  # ibapi's UNSET_DECIMAL

_LENGTH = struct.Struct(">I")

Field = str | int | float | bool | None


class FrameError(ValueError):
    """A peer sent bytes that are not a valid TWS frame."""


def format_field(value: Field) -> str:
    """One field as TWS writes it."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, float):
        if value == UNSET_DOUBLE:
            return str(UNSET_DOUBLE)
        if value.is_integer() and abs(value) < 1e15:
            return str(int(value))
        return repr(value)
    return str(value)


def encode_frame(fields: Iterable[Field]) -> bytes:
    """A whole frame: length prefix and NUL-terminated fields."""
    payload = "".join(format_field(f) + "\0" for f in fields).encode("ascii", errors="replace")
    return _LENGTH.pack(len(payload)) + payload


def encode_raw_frame(text: str) -> bytes:
    """A frame whose payload is given verbatim (the handshake's version range, for example)."""
    payload = text.encode("ascii")
    return _LENGTH.pack(len(payload)) + payload


class FrameBuffer:
    """Accumulates bytes from a socket and yields complete frames as lists of fields."""

    __slots__ = ("_buf",)

    def __init__(self) -> None:
        self._buf = bytearray()

    def append(self, data: bytes) -> None:
        """Add bytes without parsing (before the handshake prefix has been taken)."""
        self._buf += data

    def feed(self, data: bytes) -> list[list[str]]:
        """Add bytes; return the frames now complete (each a list of fields)."""
        self._buf += data
        return self.frames()

    def frames(self) -> list[list[str]]:
        """Complete frames buffered so far, removed from the buffer."""
        frames: list[list[str]] = []
        while len(self._buf) >= 4:
            (size,) = _LENGTH.unpack_from(self._buf, 0)
            if size > MAX_FRAME:
                raise FrameError(f"frame of {size} bytes exceeds the {MAX_FRAME}-byte limit")
            if len(self._buf) < 4 + size:
                break
            payload = bytes(self._buf[4 : 4 + size])
            del self._buf[: 4 + size]
            frames.append(split_fields(payload))
        return frames

    def take_prefix(self, prefix: bytes) -> bool | None:
        """Consume `prefix` if the buffer starts with it: True; False if not; None if unsure yet."""
        if len(self._buf) < len(prefix):
            return None if prefix.startswith(bytes(self._buf)) else False
        if self._buf.startswith(prefix):
            del self._buf[: len(prefix)]
            return True
        return False


def split_fields(payload: bytes) -> list[str]:
    """Fields of one frame's payload; the trailing NUL does not make an extra empty field."""
    text = payload.decode("ascii", errors="replace")
    parts = text.split("\0")
    if parts and parts[-1] == "":
        parts.pop()
    return parts
