"""Drive the real client libraries (ibapi 10.50.2, ib_async 2.1.0) for the codec's conformance
tests: deliver our frames to their decoders, and capture the frames their clients write. ib_async
speaks server version 178; ibapi any version from 178 to 226 (`*_at` helpers), where from 201 a
frame carries a 4-byte id and maybe a protobuf body."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import socket
from collections.abc import Callable, Iterator
from datetime import UTC
from typing import Any

import ibapi.decoder
from ib_async.client import Client as IbAsyncClient
from ib_async.decoder import Decoder as IbAsyncDecoder
from ibapi import comm
from ibapi.client import EClient
from ibapi.connection import Connection
from ibapi.decoder import Decoder as IbapiDecoder
from ibapi.wrapper import EWrapper

from ibsim import codec
from ibsim.gateway import Request, read_request
from ibsim.messages import Outgoing
from ibsim.wire import (
    PROTOBUF_OFFSET,
    RAW_ID_VERSION,
    Field,
    FrameBuffer,
    encode_frame,
    encode_raw_frame,
)

Call = tuple[str, tuple[Any, ...]]


class IbapiRecorder(EWrapper):  # type: ignore[misc]
    """An EWrapper whose every callback records (name, args)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[Call] = []


def _recorder(name: str) -> Callable[..., None]:
    def record(self: IbapiRecorder, *args: Any) -> None:
        self.calls.append((name, args))

    record.__name__ = name
    return record


for _name, _ in inspect.getmembers(EWrapper, inspect.isfunction):
    if not _name.startswith("_"):
        setattr(IbapiRecorder, _name, _recorder(_name))


class _CountingIterator:
    def __init__(self, items: tuple[bytes, ...]) -> None:
        self._it = iter(items)
        self.left: list[bytes] | None = None

    def __iter__(self) -> _CountingIterator:
        return self

    def __next__(self) -> bytes:
        return next(self._it)


class _TrackedFields(tuple):  # type: ignore[type-arg]
    """The decoder's field tuple, remembering its iterator so leftovers can be counted."""

    iterator: _CountingIterator | None = None

    def __iter__(self) -> Iterator[bytes]:
        self.iterator = _CountingIterator(tuple(super().__iter__()))
        return self.iterator


def ibapi_deliver(fields: list[Field]) -> list[Call]:
    """Frame our fields, then take them apart exactly as EClient.run does and let ibapi's Decoder
    at 178 call the wrapper. Fails when ibapi leaves fields unread."""
    frame = encode_frame(fields)
    _size, text, rest = comm.read_msg(frame)
    assert rest == b""
    msg_id = int(text[: text.index(b"\0")])
    body = _TrackedFields(comm.read_fields(text[text.index(b"\0") + 1 :]))
    wrapper = IbapiRecorder()
    IbapiDecoder(wrapper, codec.SERVER_VERSION).interpret(body, msg_id)
    if body.iterator is not None:
        leftover = list(body.iterator)
        assert leftover == [], f"ibapi left {len(leftover)} field(s) unread: {leftover}"
    return wrapper.calls


def ibapi_reads_at(call: Callable[[EClient], None], version: int) -> list[Request]:
    """What the gateway's handlers get from the frames ibapi writes for `call` at `version`."""
    return [read_request(payload, version) for payload in ibapi_sent_at(call, version)]


def ibapi_deliver_at(message: Outgoing, version: int) -> list[Call]:
    """Encode `message` for `version`, take the frame apart exactly as EClient.run does, and let
    ibapi's Decoder at `version` call the wrapper. Fails when ibapi leaves a text field unread, or
    does not read a field our protobuf message sets."""
    frame = message.encode(version)
    _size, payload, rest = comm.read_msg(frame)
    assert rest == b""
    if version >= RAW_ID_VERSION:
        msg_id, payload = int.from_bytes(payload[:4], "big"), payload[4:]
    else:
        msg_id = int(payload[: payload.index(b"\0")])
        payload = payload[payload.index(b"\0") + 1 :]
    wrapper = IbapiRecorder()
    decoder = IbapiDecoder(wrapper, version)
    if msg_id > PROTOBUF_OFFSET:
        assert message.is_protobuf(version)
        reads: set[str] = set()
        with _tracking_protobuf_reads(reads):
            decoder.processProtoBuf(payload, msg_id - PROTOBUF_OFFSET)
        sent = _set_fields(type(message.proto()).FromString(payload))
        unread = sent - reads
        assert not unread, f"ibapi did not read {sorted(unread)}"
    else:
        assert not message.is_protobuf(version)
        body = _TrackedFields(comm.read_fields(payload))
        decoder.interpret(body, msg_id)
        if body.iterator is not None:
            leftover = list(body.iterator)
            assert leftover == [], f"ibapi left {len(leftover)} field(s) unread: {leftover}"
    return wrapper.calls


def _set_fields(msg: Any, prefix: str = "") -> set[str]:
    """Dotted paths of the scalar fields set in a protobuf message, submessages walked."""
    out: set[str] = set()
    for fd, value in msg.ListFields():
        path = prefix + fd.name
        if fd.message_type is not None and not fd.message_type.GetOptions().map_entry:
            items = value if fd.is_repeated else [value]
            for item in items:
                out |= _set_fields(item, path + ("[]." if fd.is_repeated else "."))
        else:
            out.add(path)
    return out


class _TrackedProto:
    """A parsed protobuf message that records which fields its reader takes the value of."""

    def __init__(self, msg: Any, prefix: str, reads: set[str]) -> None:
        self.__dict__.update(_msg=msg, _prefix=prefix, _reads=reads)

    def ParseFromString(self, data: bytes) -> int:
        return int(self._msg.ParseFromString(data))

    def HasField(self, name: str) -> bool:
        return bool(self._msg.HasField(name))

    def __getattr__(self, name: str) -> Any:
        value = getattr(self._msg, name)
        fd = self._msg.DESCRIPTOR.fields_by_name.get(name)
        if fd is None:
            return value
        path = self._prefix + name
        self._reads.add(path)
        if fd.message_type is None or fd.message_type.GetOptions().map_entry:
            return value
        if fd.is_repeated:
            return [_TrackedProto(v, path + "[].", self._reads) for v in value]
        return _TrackedProto(value, path + ".", self._reads)


@contextlib.contextmanager
def _tracking_protobuf_reads(reads: set[str]) -> Iterator[None]:
    """Make ibapi's Decoder build `_TrackedProto` messages instead of the generated classes."""
    originals = {
        name: value
        for name, value in vars(ibapi.decoder).items()
        if name.endswith("Proto") and hasattr(value, "DESCRIPTOR") and isinstance(value, type)
    }

    def factory(cls: type) -> Callable[[], _TrackedProto]:
        return lambda: _TrackedProto(cls(), "", reads)

    try:
        for name, cls in originals.items():
            setattr(ibapi.decoder, name, factory(cls))
        yield
    finally:
        for name, cls in originals.items():
            setattr(ibapi.decoder, name, cls)


class IbAsyncRecorder:
    """Stands in for ib_async's Wrapper: records every method ib_async's Decoder calls."""

    defaultTimezone = UTC

    def __init__(self) -> None:
        self.calls: list[Call] = []

    def __getattr__(self, name: str) -> Callable[..., None]:
        if name.startswith("_"):
            raise AttributeError(name)

        def record(*args: Any) -> None:
            self.calls.append((name, args))

        return record


class _ErrorLog(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@contextlib.contextmanager
def _ib_async_errors_fail() -> Iterator[None]:
    """ib_async's Decoder logs and swallows exceptions; turn them into failures."""
    handler = _ErrorLog()
    logger = logging.getLogger("ib_async")
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)
    assert not handler.records, [r.getMessage() for r in handler.records]


def ib_async_deliver(fields: list[Field]) -> list[Call]:
    """Frame our fields, split them as ib_async's Client does, and decode at 178."""
    frame = encode_frame(fields)
    text = frame[4:].decode()
    parts = text.split("\0")
    parts.pop()
    wrapper = IbAsyncRecorder()
    with _ib_async_errors_fail():
        IbAsyncDecoder(wrapper, codec.SERVER_VERSION).interpret(parts)  # type: ignore[arg-type]
    return wrapper.calls


def ibapi_sent(call: Callable[[EClient], None]) -> list[list[str]]:
    """The frames ibapi's EClient writes for `call` at server version 178 (over a socket pair)."""
    return [read_request(p, codec.SERVER_VERSION).fields for p in ibapi_sent_at(call, 178)]


def ibapi_sent_at(call: Callable[[EClient], None], version: int) -> list[bytes]:
    """The frame payloads ibapi's EClient writes for `call` at `version` (over a socket pair)."""
    ours, theirs = socket.socketpair()
    try:
        wrapper = IbapiRecorder()
        client = EClient(wrapper)
        conn = Connection("127.0.0.1", 0)
        conn.socket = theirs
        client.conn = conn
        client.serverVersion_ = version
        client.setConnState(EClient.CONNECTED)
        call(client)
        assert [c for c in wrapper.calls if c[0] == "error"] == []
        ours.setblocking(False)
        data = b""
        with contextlib.suppress(BlockingIOError):
            while chunk := ours.recv(65536):
                data += chunk
        return FrameBuffer().feed_payloads(data)
    finally:
        ours.close()
        theirs.close()


async def ib_async_sent(
    call: Callable[[IbAsyncClient], None], expect: int = 1
) -> tuple[list[list[str]], list[str]]:
    """Serve a minimal 178 handshake on loopback with our codec, connect ib_async's Client, run
    `call`, and return (the frames it wrote after startApi, the startApi frame)."""
    frames: asyncio.Queue[list[str]] = asyncio.Queue()
    start_api: list[str] = []
    writers: list[asyncio.StreamWriter] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writers.append(writer)
        assert await reader.readexactly(4) == b"API\0"
        buf = FrameBuffer()
        hello: list[list[str]] = []
        while not hello:
            data = await reader.read(4096)
            if not data:  # the client gave up before its version range: no busy loop on EOF
                return
            hello = buf.feed(data)
        assert hello[0][0].startswith("v157..178")
        writer.write(encode_raw_frame(f"{codec.SERVER_VERSION}\x0020250625 09:26:58 EST\x00"))
        while True:
            data = await reader.read(65536)
            if not data:
                break
            for frame in buf.feed(data):
                if frame[0] == "71":
                    start_api.extend(frame)
                    writer.write(encode_frame(codec.managed_accounts_fields(["DU111", "DU222"])))
                    writer.write(encode_frame(codec.next_valid_id_fields(1)))
                else:
                    frames.put_nowait(frame)

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    client = IbAsyncClient(IbAsyncRecorder())
    try:
        with _ib_async_errors_fail():
            await client.connectAsync("127.0.0.1", port, 7, timeout=5)
            call(client)
            got = [await asyncio.wait_for(frames.get(), 5) for _ in range(expect)]
    finally:
        client.disconnect()
        server.close()
        for writer in writers:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()
        await server.wait_closed()
    return got, start_api
