"""Framing of the TWS API: text frames, and from server version 201 binary ids and protobuf."""

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ibsim.wire import (
    FrameBuffer,
    FrameError,
    encode_frame,
    encode_proto_message,
    encode_text_message,
    format_field,
    split_message,
)

field_text = st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=20)


@given(st.lists(st.lists(field_text, min_size=1, max_size=8), max_size=5), st.integers(1, 7))
def test_frames_split_at_any_boundary_then_decode_intact(
    frames: list[list[str]], chunk: int
) -> None:
    data = b"".join(encode_frame(f) for f in frames)
    buf = FrameBuffer()
    out: list[list[str]] = []
    for i in range(0, len(data), chunk):
        out.extend(buf.feed(data[i : i + chunk]))
    assert out == frames


def test_fields_formatted_as_tws_writes_them() -> None:
    assert [format_field(v) for v in (True, False, None, 3, 2.5, 100.0)] == [
        "1",
        "0",
        "",
        "3",
        "2.5",
        "100",
    ]


def test_oversized_frame_then_frame_error() -> None:
    with pytest.raises(FrameError):
        FrameBuffer().feed(struct.pack(">I", 1 << 30))


def test_api_prefix_taken_only_when_present() -> None:
    buf = FrameBuffer()
    buf.append(b"AP")
    assert buf.take_prefix(b"API\0") is None
    buf.append(b"I\0")
    assert buf.take_prefix(b"API\0") is True
    other = FrameBuffer()
    other.append(b"GET / HTTP/1.1")
    assert other.take_prefix(b"API\0") is False


@given(
    st.integers(1, 199),
    st.lists(field_text, max_size=6),
    st.sampled_from([178, 200, 201, 226]),
)
def test_text_message_at_any_version_then_split_back_intact(
    msg_id: int, fields: list[str], version: int
) -> None:
    (payload,) = FrameBuffer().feed_payloads(encode_text_message([msg_id, *fields], version))

    assert split_message(payload, version) == (msg_id, [str(msg_id), *fields])
    assert payload.startswith(struct.pack(">I", msg_id)) == (version >= 201)


def test_protobuf_message_then_id_offset_by_200_and_body_verbatim() -> None:
    (payload,) = FrameBuffer().feed_payloads(encode_proto_message(61, b"\x0a\x03DU1"))

    assert payload[:4] == struct.pack(">I", 261)
    assert split_message(payload, 226) == (61, b"\x0a\x03DU1")


@pytest.mark.parametrize(("payload", "version"), [(b"abc\0", 178), (b"\0\0", 226)])
def test_unreadable_message_id_then_frame_error(payload: bytes, version: int) -> None:
    with pytest.raises(FrameError):
        split_message(payload, version)
