"""TWS API framing: length-prefixed frames, text fields or protobuf bodies.

A frame is `[uint32 big-endian length][payload]`. The handshake starts with the bare bytes `API\\0`
before any frame, and its frames are always text. After it, the payload depends on the negotiated
server version:

- below 201, `message id\\0 field\\0 field\\0 ...`: NUL-terminated ASCII fields;
- from 201 (`RAW_ID_VERSION`), the message id is a raw uint32 big-endian; an id above 200
  (`PROTOBUF_OFFSET`) is `200 + id` of a message whose body is one serialized protobuf message,
  otherwise the NUL-terminated text fields follow the id.

Field values are formatted the way TWS formats them: booleans as `1`/`0`, None as the empty string,
floats without a trailing `.0` noise only where TWS omits it.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Sequence

API_PREFIX = b"API\0"
MAX_FRAME = 16 * 1024 * 1024  # TWS refuses larger messages; so do we
UNSET_DOUBLE = 1.7976931348623157e308
UNSET_INTEGER = 2**31 - 1

RAW_ID_VERSION = 201  # ibapi MIN_SERVER_VER_PROTOBUF: 4-byte binary message ids from here on
PROTOBUF_OFFSET = 200  # ibapi PROTOBUF_MSG_ID: a protobuf message travels as 200 + its id

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


def encode_text_message(fields: Sequence[Field], version: int) -> bytes:
    """One text message (message id first) as a frame at the negotiated `version`."""
    if version < RAW_ID_VERSION:
        return encode_frame(fields)
    msg_id = fields[0]
    if not isinstance(msg_id, int):
        raise TypeError(f"a message id is an int, not {msg_id!r}")
    body = "".join(format_field(f) + "\0" for f in fields[1:]).encode("ascii", errors="replace")
    payload = _LENGTH.pack(msg_id) + body
    return _LENGTH.pack(len(payload)) + payload


def encode_proto_message(msg_id: int, body: bytes) -> bytes:
    """One protobuf message as a frame: raw id `200 + msg_id`, then the serialized body."""
    payload = _LENGTH.pack(msg_id + PROTOBUF_OFFSET) + body
    return _LENGTH.pack(len(payload)) + payload


def split_message(payload: bytes, version: int) -> tuple[int, list[str] | bytes]:
    """(message id, text fields with the id first) or, for a protobuf message, (id, body bytes).

    Below `RAW_ID_VERSION` every message is text; a non-numeric id raises FrameError.
    """
    if version < RAW_ID_VERSION:
        fields = split_fields(payload)
        try:
            return (int(fields[0]) if fields else 0), fields
        except ValueError:
            raise FrameError(f"non-numeric message id {fields[0][:16]!r}") from None
    if len(payload) < 4:
        raise FrameError(f"a {len(payload)}-byte message has no 4-byte message id")
    (raw_id,) = _LENGTH.unpack_from(payload, 0)
    if raw_id > PROTOBUF_OFFSET:
        return raw_id - PROTOBUF_OFFSET, payload[4:]
    return raw_id, [str(raw_id), *split_fields(payload[4:])]


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
        """Complete text frames buffered so far, removed from the buffer."""
        return [split_fields(payload) for payload in self.payloads()]

    def feed_payloads(self, data: bytes) -> list[bytes]:
        """Add bytes; return the payloads of the frames now complete."""
        self._buf += data
        return self.payloads()

    def payloads(self) -> list[bytes]:
        """The payloads of the complete frames buffered so far, removed from the buffer."""
        frames: list[bytes] = []
        while len(self._buf) >= 4:
            (size,) = _LENGTH.unpack_from(self._buf, 0)
            if size > MAX_FRAME:
                raise FrameError(f"frame of {size} bytes exceeds the {MAX_FRAME}-byte limit")
            if len(self._buf) < 4 + size:
                break
            payload = bytes(self._buf[4 : 4 + size])
            del self._buf[: 4 + size]
            frames.append(payload)
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
