"""A backlog from the gateway is decoded, and folded, in slices: the loop gets a turn between them.

A real `IbSession` on a real asyncio transport (one end of a socket pair); the other end plays
the gateway with ibsim's own encoders, on both wires.
"""

from __future__ import annotations

import asyncio
import itertools
import socket
import time
from collections.abc import Iterator

import pytest

from guardd.broker import connection as connection_mod
from guardd.broker import session as session_mod
from guardd.broker.ib import IbBroker
from guardd.broker.session import IbSession, Pong, SessionProtocol
from guardd.core import events as ev
from ibsim import messages
from ibsim.messages import MAX_SERVER_VERSION
from ibsim.wire import encode_frame

BACKLOG = 100


class Owner:
    """What the session hands over: every slice's callbacks, as one list each."""

    account = "DU1"

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self.slices: list[list[object]] = []
        self.clock = time.time
        self.all_pongs = asyncio.Event()  # BACKLOG pongs arrived

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        return self._loop

    def on_items(self, session: IbSession, items: list[object]) -> None:
        self.slices.append(items)
        if len(self.pongs()) >= BACKLOG:
            self.all_pongs.set()

    def on_session_ended(self, session: IbSession) -> None:
        pass

    def pongs(self) -> list[int]:
        return [item.epoch_s for s in self.slices for item in s if isinstance(item, Pong)]


@pytest.fixture
def gateway_end() -> Iterator[tuple[socket.socket, socket.socket]]:
    ours, theirs = socket.socketpair()
    yield ours, theirs
    ours.close()
    theirs.close()


@pytest.mark.parametrize("version", [178, MAX_SERVER_VERSION])
async def test_backlog_then_slices_end_at_the_turn_budget_and_every_frame_arrives_in_order(
    version: int,
    gateway_end: tuple[socket.socket, socket.socket],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Arrange: a budget already spent when a slice starts: each slice ends at its first check
    monkeypatch.setattr(session_mod, "TURN_BUDGET_S", 0.0)
    loop = asyncio.get_running_loop()
    owner = Owner(loop)
    ours, theirs = gateway_end
    transport, protocol = await loop.create_connection(
        lambda: SessionProtocol(IbSession(owner, 1)), sock=ours
    )
    session = protocol.session
    theirs.sendall(encode_frame([version, "20260101 10:00:00 UTC"]))
    await asyncio.wait_for(session.handshaken, 5)
    backlog = b"".join(
        messages.current_time(1_700_000_000 + n).encode(version) for n in range(BACKLOG)
    )

    # Act: the whole backlog in one write
    theirs.sendall(backlog)
    await asyncio.wait_for(owner.all_pongs.wait(), 5)

    # Assert: no slice longer than one check; nothing lost, nothing reordered
    assert max(len(s) for s in owner.slices) <= session_mod.FRAMES_PER_CHECK
    assert len(owner.slices) >= BACKLOG // session_mod.FRAMES_PER_CHECK
    assert owner.pongs() == [1_700_000_000 + n for n in range(BACKLOG)]
    transport.abort()


async def test_backlog_then_folded_in_turns_that_end_at_the_turn_budget(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Arrange: a backlog of events waiting for the guard, a budget spent at every check
    monkeypatch.setattr(connection_mod, "TURN_BUDGET_S", 0.0)
    broker = IbBroker("127.0.0.1", 1, 0, "DU1", heartbeat_interval_s=None)
    for n in range(BACKLOG):
        broker._emit(ev.ServerTime(server_time=float(n), ts=float(n)))
    taken: list[float] = []
    seen: list[int] = []  # events taken each time another task got the loop

    async def fold() -> None:
        async for event in broker.events():
            assert isinstance(event, ev.ServerTime)
            taken.append(event.server_time)
            if len(taken) == BACKLOG:
                return

    async def other() -> None:
        while len(taken) < BACKLOG:
            seen.append(len(taken))
            await asyncio.sleep(0)

    # Act
    async with asyncio.timeout(5):
        await asyncio.gather(fold(), other())

    # Assert: the other task ran at least every CHECK_EVERY events; none lost or reordered
    steps = [b - a for a, b in itertools.pairwise([0, *seen, BACKLOG])]
    assert max(steps) <= connection_mod.CHECK_EVERY
    assert taken == [float(n) for n in range(BACKLOG)]
