"""A junk flood on guardd's MQTT command topics, as an attacker with publish rights would send it.

`JunkFlood` is a minimal MQTT 3.1.1 publisher on a raw socket (CONNECT, then pre-encoded PUBLISH
packets written in 1 ms-scale batches at a target rate; PUBACKs are read and discarded), so that
one process can offer several thousand messages a second without a client library's per-message
cost hiding the guard's. The payloads are what a forger can make (`junk_payloads`): bytes that
are not JSON, JSON of the wrong shape, an unknown key id, a known key id with a made-up signature
(the dearest for the guard: it computes the HMAC), text with a lone surrogate escape. Used by
`bench.flood` and by tests/integration/control/test_control_flood.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

__all__ = ["JunkFlood", "junk_payloads"]


def _length(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n % 128, n // 128
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _text(value: str) -> bytes:
    raw = value.encode()
    return len(raw).to_bytes(2, "big") + raw


def _packet(first: int, body: bytes) -> bytes:
    return bytes([first]) + _length(len(body)) + body


def publish_packet(topic: str, payload: bytes, *, qos: int, packet_id: int = 1) -> bytes:
    """One MQTT 3.1.1 PUBLISH packet."""
    if qos == 0:
        return _packet(0x30, _text(topic) + payload)
    return _packet(0x32, _text(topic) + packet_id.to_bytes(2, "big") + payload)


def junk_payloads(count: int, *, known_key_ids: Sequence[str] = ("alice",)) -> list[bytes]:
    """``count`` distinct junk payloads, of every kind a forger can make, shuffled."""
    rng = random.Random(20261130)
    now = int(time.time())
    out: list[bytes] = []
    for n in range(count):
        kind = n % 6
        nonce = secrets.token_hex(12)
        base: dict[str, object] = {
            "action": "kill",
            "reason": f"junk {n}",
            "key_id": known_key_ids[n % len(known_key_ids)],
            "ts": now,
            "nonce": nonce,
            "sig": secrets.token_hex(32),
        }
        if kind == 0:
            out.append(rng.randbytes(rng.randint(20, 200)))  # not JSON (nor UTF-8)
        elif kind == 1:
            out.append(json.dumps({"action": "kill", "reason": "x", "n": n}).encode())
        elif kind == 2:
            out.append(json.dumps({**base, "key_id": f"mallory{n % 7}"}).encode())
        elif kind in (3, 4):  # a known key id, a made-up signature: the guard must HMAC it
            out.append(json.dumps(base).encode())
        else:
            out.append(json.dumps({**base, "reason": "\\ud800 x"}).encode().replace(b"\\\\", b"\\"))
    rng.shuffle(out)
    return out


@dataclass
class JunkFlood:
    """Publishes junk on ``topics`` at ``rate`` messages a second until stopped."""

    host: str
    port: int
    topics: Sequence[str]
    rate: float
    qos: int = 1
    username: str | None = None
    password: str | None = None
    payloads: list[bytes] = field(default_factory=lambda: junk_payloads(3000))
    sent: int = 0
    started: float = 0.0
    stopped: float = 0.0
    _task: asyncio.Task[None] | None = None
    _writer: asyncio.StreamWriter | None = None
    _drain: asyncio.Task[None] | None = None

    async def connect(self) -> None:
        """Connect (CONNECT / CONNACK); raises ConnectionError when the broker refuses."""
        reader, writer = await asyncio.open_connection(self.host, self.port)
        flags = 0x02
        tail = _text(f"junk-{secrets.token_hex(4)}")
        if self.username is not None:
            flags |= 0x80
            tail += _text(self.username)
        if self.password is not None:
            flags |= 0x40
            tail += _text(self.password)
        body = _text("MQTT") + bytes([4, flags]) + (60).to_bytes(2, "big") + tail
        writer.write(_packet(0x10, body))
        await writer.drain()
        connack = await asyncio.wait_for(reader.readexactly(4), 10)
        if connack[0] != 0x20 or connack[3] != 0:
            writer.close()
            raise ConnectionError(f"broker refused the junk publisher: CONNACK {connack.hex()}")
        self._writer = writer
        self._drain = asyncio.create_task(self._discard(reader), name="junk_discard")

    async def _discard(self, reader: asyncio.StreamReader) -> None:
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            while await reader.read(65536):
                pass

    async def send(self, count: int) -> None:
        """Publish ``count`` junk messages as fast as the socket takes them."""
        assert self._writer is not None
        for start in range(0, count, 500):
            self._writer.write(self._batch(min(500, count - start)))
            await self._writer.drain()

    def _batch(self, count: int) -> bytes:
        chunks = []
        for _ in range(count):
            n = self.sent
            topic = self.topics[n % len(self.topics)]
            payload = self.payloads[n % len(self.payloads)]
            chunks.append(publish_packet(topic, payload, qos=self.qos, packet_id=(n % 65535) + 1))
            self.sent += 1
        return b"".join(chunks)

    def start(self, seconds: float) -> None:
        """Publish at ``rate`` for ``seconds`` (in the background)."""
        self._task = asyncio.create_task(self._run(seconds), name="junk_flood")

    async def _run(self, seconds: float) -> None:
        assert self._writer is not None
        self.started = time.monotonic()
        end = self.started + seconds
        while (now := time.monotonic()) < end:
            due = int((now - self.started) * self.rate) - self.sent
            if due > 0:
                self._writer.write(self._batch(due))
                await self._writer.drain()
            await asyncio.sleep(0.002)
        self.stopped = time.monotonic()

    async def wait(self) -> None:
        """Until the timed flood is over."""
        if self._task is not None:
            await self._task

    @property
    def sent_per_s(self) -> float:
        """What was offered, averaged over the flood."""
        span = (self.stopped or time.monotonic()) - self.started
        return self.sent / span if span > 0 else 0.0

    async def close(self) -> None:
        """Stop publishing and disconnect."""
        if self._task is not None and not self._task.done():
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._writer is not None:
            with contextlib.suppress(ConnectionError):
                self._writer.write(b"\xe0\x00")
                await self._writer.drain()
            self._writer.close()
            with contextlib.suppress(ConnectionError):
                await self._writer.wait_closed()
        if self._drain is not None:
            self._drain.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._drain
