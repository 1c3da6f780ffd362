"""The TWS API wire as the guard drives it on the event loop: ibapi's own framing and Decoder."""

from __future__ import annotations

import struct

import ibapi
import pytest
from ibapi import comm
from ibapi.const import MAX_MSG_LEN
from ibapi.decoder import Decoder
from ibapi.server_versions import MAX_CLIENT_VER, MIN_CLIENT_VER
from ibapi.wrapper import EWrapper

from guardd.broker import wire


def test_installed_ibapi_then_the_one_the_handshake_was_written_for() -> None:
    # The handshake and dispatch repeat EClient.connect / EClient.run of this version: an
    # upgrade must be read again before this passes.
    assert ibapi.__version__ == wire.IBAPI_VERSION


def test_hello_then_prefix_and_ibapis_version_range() -> None:
    hello = wire.hello()

    assert hello.startswith(b"API\0")
    _size, payload, rest = comm.read_msg(hello[4:])
    assert payload == f"v{MIN_CLIENT_VER}..{MAX_CLIENT_VER}".encode() and rest == b""


def test_frames_split_anywhere_then_whole_payloads_in_order() -> None:
    stream = b"".join(comm.make_msg(n, False, f"{n}\0") for n in (1, 2, 3))
    buf = bytearray()
    got: list[bytes] = []

    for byte in stream:  # one byte at a time: the worst split
        buf.append(byte)
        got += wire.take_frames(buf, 100)

    assert got == [b"1\x001\x00", b"2\x002\x00", b"3\x003\x00"] and buf == b""


def test_more_frames_than_the_limit_then_the_rest_stays_buffered() -> None:
    buf = bytearray(b"".join(comm.make_msg(n, False, "") for n in range(10)))

    first = wire.take_frames(buf, 4)
    rest = wire.take_frames(buf, 100)

    assert len(first) == 4 and len(rest) == 6 and buf == b""


def test_a_frame_longer_than_ibapi_allows_then_refused_before_it_is_read() -> None:
    buf = bytearray(struct.pack("!I", MAX_MSG_LEN + 1) + b"x")

    with pytest.raises(wire.FrameTooLongError):
        wire.take_frames(buf, 10)


def test_handshake_answer_then_version_and_time_other_frames_ignored() -> None:
    assert wire.server_hello(b"226\x0020261130 08:00:00 UTC\x00") == (
        226,
        "20261130 08:00:00 UTC",
    )
    assert wire.server_hello(b"4\x002\x00-1\x002104\x00farm OK\x00") is None


class Recorder(EWrapper):  # type: ignore[misc]
    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[str, object]] = []

    def currentTime(self, time: int) -> None:
        self.calls.append(("currentTime", time))

    def nextValidId(self, orderId: int) -> None:
        self.calls.append(("nextValidId", orderId))


@pytest.mark.parametrize("server_version", [178, 200])
def test_text_frame_then_ibapis_decoder_calls_the_wrapper(server_version: int) -> None:
    recorder = Recorder()
    decoder = Decoder(recorder, server_version)
    raw_id = server_version >= 201
    frame = comm.make_msg(49, raw_id, "1\x001764489600\x00")  # CURRENT_TIME, version 1
    [payload] = wire.take_frames(bytearray(frame), 10)

    wire.dispatch(decoder, server_version, payload)

    assert recorder.calls == [("currentTime", 1764489600)]


def test_binary_id_frame_at_201_or_later_then_decoded() -> None:
    recorder = Recorder()
    decoder = Decoder(recorder, 226)
    frame = comm.make_msg(9, True, "1\x0042\x00")  # NEXT_VALID_ID as text, 4-byte id
    [payload] = wire.take_frames(bytearray(frame), 10)

    wire.dispatch(decoder, 226, payload)

    assert recorder.calls == [("nextValidId", 42)]
