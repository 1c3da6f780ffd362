"""`FakeBroker`, the shipped test double of the broker port: it records what it is asked, hands
out order ids, refuses as told and passes on the events a test feeds."""

from __future__ import annotations

import pytest

from guardd.broker.fake import FakeBroker, Request
from guardd.broker.pacer import Lane
from guardd.core.events import PositionsEnd
from guardd.errors import BrokerDisconnectedError, BrokerError


async def test_requests_then_recorded_in_order_with_their_lanes() -> None:
    broker = FakeBroker(first_order_id=7)

    order_id = broker.next_order_id()
    await broker.global_cancel()
    await broker.place_order(
        order_id, con_id=1, action="SELL", quantity=5, order_type="MKT", lane=Lane.FLATTEN
    )
    await broker.cancel_order(order_id, Lane.FLATTEN)
    broker.closing([1, 0])

    assert [(r.name, r.lane, r.order_id) for r in broker.requests] == [
        ("global_cancel", Lane.KILL, None),
        ("place_order", Lane.FLATTEN, 7),
        ("cancel_order", Lane.FLATTEN, 7),
    ]
    assert broker.next_order_id() == 8
    assert broker.closing_con_ids == {1}


async def test_disconnected_then_every_request_raises_and_nothing_recorded() -> None:
    broker = FakeBroker(connected=False)

    with pytest.raises(BrokerDisconnectedError):
        await broker.global_cancel()
    with pytest.raises(BrokerDisconnectedError):
        broker.next_order_id()

    assert broker.requests == []


async def test_refused_then_raises_until_lifted() -> None:
    broker = FakeBroker()
    broker.refuse("refresh_positions", BrokerError("no"))

    with pytest.raises(BrokerError):
        await broker.refresh_positions()
    broker.refuse("refresh_positions", None)
    await broker.refresh_positions()

    assert broker.requests == [Request("refresh_positions", Lane.CLOSE_DATA, {})]
    with pytest.raises(ValueError, match="no such request"):
        broker.refuse("reqMktData", BrokerError("no"))


async def test_fed_events_then_read_in_order_until_stopped() -> None:
    broker = FakeBroker()
    events = [PositionsEnd(ts=1.0), PositionsEnd(ts=2.0)]
    for event in events:
        broker.feed(event)
    broker.stop()

    assert [e async for e in broker.events()] == events


async def test_wait_for_then_returns_once_asked_or_times_out() -> None:
    broker = FakeBroker()

    with pytest.raises(TimeoutError):
        await broker.wait_for("global_cancel", timeout_s=0.05)
    await broker.global_cancel()

    assert len(await broker.wait_for("global_cancel")) == 1
