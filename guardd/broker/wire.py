"""The TWS API wire as ibapi 10.50.2 speaks it, for a connection driven by the event loop.

ibapi's `EClient.connect` does a blocking handshake and starts a reader thread, and
`EClient.run` decodes on a thread of its own. The guard reads the socket with asyncio instead
and uses ibapi's own pieces for everything else: `comm.make_initial_msg` for the version range,
`comm.read_msg` / `comm.read_fields` to frame, ibapi's `Decoder` to call the EWrapper, and
EClient's request methods (`startApi` included) to write. What `EClient.connect` and
`EClient.run` do around those pieces is repeated here, line for line, and tied to the ibapi
version it was read from (`IBAPI_VERSION`; a test fails when the installed ibapi differs):

1. send `API\\0` and a frame `v<MIN_CLIENT_VER>..<MAX_CLIENT_VER>`;
2. read frames until one has exactly two fields: the server version and the connection time
   (anything before it is ignored, as ibapi does);
3. then, with the server version known, EClient's `startApi` (text below server version 201,
   protobuf from `MIN_SERVER_VER_PROTOBUF` on: ibapi's `useProtoBuf` decides) and `connectAck`;
4. every later frame: from server version 201 a 4-byte binary message id, below it a text id
   ended by NUL; an id above `PROTOBUF_MSG_ID` is a protobuf message (`processProtoBuf`), any
   other a text one (`interpret`); a frame longer than `MAX_MSG_LEN` is error 507 and ends the
   connection; a `BadMessage` is skipped (ibapi logs it and goes on).
"""

from __future__ import annotations

from typing import Any, Final

from ibapi import comm
from ibapi.common import PROTOBUF_MSG_ID
from ibapi.const import MAX_MSG_LEN
from ibapi.server_versions import MAX_CLIENT_VER, MIN_CLIENT_VER, MIN_SERVER_VER_PROTOBUF

IBAPI_VERSION: Final = "10.50.02"
"""The ibapi whose `EClient.connect` and `EClient.run` this module repeats (`ibapi.__version__`)."""

API_PREFIX: Final = b"API\0"
HEADER_LEN: Final = 4


class FrameTooLongError(Exception):
    """A frame longer than ibapi's MAX_MSG_LEN (error 507, "Bad message length")."""


def hello() -> bytes:
    """The client's first bytes: the API prefix and the version range ibapi supports."""
    versions: bytes = comm.make_initial_msg(f"v{MIN_CLIENT_VER}..{MAX_CLIENT_VER}")
    return API_PREFIX + versions


def take_frames(buf: bytearray, limit: int) -> list[bytes]:
    """Up to `limit` complete frames' payloads from the front of `buf`, removed from it (ibapi's
    `comm.read_msg` on a view: no copy of the rest per frame). A frame too long for ibapi raises
    FrameTooLongError (and `buf` may no longer be resized: replace it)."""
    with memoryview(buf) as view:
        frames, taken = _read_frames(view, limit)  # every slice of `view` is gone on return
    del buf[:taken]
    return frames


def _read_frames(view: memoryview, limit: int) -> tuple[list[bytes], int]:
    frames: list[bytes] = []
    taken = 0
    while len(frames) < limit:
        size, payload, rest = comm.read_msg(view[taken:])
        if size > MAX_MSG_LEN:
            raise FrameTooLongError(f"{size} bytes")
        if not payload:
            if size == 0 and len(rest) >= HEADER_LEN:  # an empty frame: nothing to decode
                taken += HEADER_LEN
                continue
            break
        frames.append(payload)
        taken = len(view) - len(rest)
    return frames, taken


def server_hello(payload: bytes) -> tuple[int, str] | None:
    """The handshake's answer (server version, connection time) when `payload` is it."""
    fields = comm.read_fields(payload)
    if len(fields) != 2:
        return None
    return int(fields[0]), fields[1].decode(errors="replace")


def dispatch(decoder: Any, server_version: int, payload: bytes) -> None:
    """Decode one frame after the handshake and call the EWrapper, as `EClient.run` does."""
    if server_version >= MIN_SERVER_VER_PROTOBUF:
        msg_id = int.from_bytes(payload[:4], "big")
        text = payload[4:]
    else:
        end = payload.index(b"\0")
        msg_id = int(payload[:end])
        text = payload[end + 1 :]
    if msg_id > PROTOBUF_MSG_ID:
        decoder.processProtoBuf(text, msg_id - PROTOBUF_MSG_ID)
    else:
        decoder.interpret(comm.read_fields(text), msg_id)
