"""The buffer between the gateway's socket and the core: value updates coalesced, nothing else."""

from __future__ import annotations

import asyncio

from hypothesis import given
from hypothesis import strategies as st

from guardd.broker.buffer import EventBuffer
from guardd.core import events as ev

AAPL, MSFT = ev.ConId(1), ev.ConId(2)


def value(con_id: ev.ConId, figure: float) -> ev.PositionValue:
    return ev.PositionValue(
        account="DU1",
        con_id=con_id,
        position=1.0,
        daily=0.0,
        unrealized=0.0,
        realized=0.0,
        value=figure,
        ts=figure,
    )


def status(order_id: int) -> ev.OrderStatus:
    return ev.OrderStatus(
        perm_id=ev.PermId(order_id),
        order_id=ev.OrderId(order_id),
        client_id=ev.ClientId(0),
        status="Submitted",
        filled=0.0,
        remaining=1.0,
        avg_fill_price=0.0,
        ts=0.0,
    )


async def drain(buffer: EventBuffer) -> list[ev.BrokerEvent]:
    buffer.close()
    out = []
    while (event := await buffer.get()) is not None:
        out.append(event)
    return out


async def test_values_of_one_contract_waiting_then_only_the_latest_where_it_arrived() -> None:
    buffer = EventBuffer()
    for event in (value(AAPL, 1), status(7), value(MSFT, 2), value(AAPL, 3)):
        buffer.put(event)

    assert await drain(buffer) == [status(7), value(MSFT, 2), value(AAPL, 3)]
    assert buffer.coalesced == 1


async def test_a_value_taken_then_the_next_one_queued_anew() -> None:
    buffer = EventBuffer()
    buffer.put(value(AAPL, 1))
    first = await buffer.get()
    buffer.put(value(AAPL, 2))

    assert first == value(AAPL, 1)
    assert await drain(buffer) == [value(AAPL, 2)]


@given(st.lists(st.tuples(st.booleans(), st.integers(0, 3)), max_size=60))
def test_any_mix_then_arrival_order_less_the_superseded_values(
    mix: list[tuple[bool, int]],
) -> None:
    events: list[ev.BrokerEvent] = [
        status(n) if is_order else value(ev.ConId(key), float(n))
        for n, (is_order, key) in enumerate(mix)
    ]
    buffer = EventBuffer()
    for event in events:
        buffer.put(event)

    out = asyncio.run(drain(buffer))

    # Nothing of an order is dropped; a value is dropped only when a later one of its contract
    # arrived before it was taken; the rest keeps the order of arrival.
    last_of: dict[ev.ConId, int] = {}
    for n, event in enumerate(events):
        if isinstance(event, ev.PositionValue):
            last_of[event.con_id] = n
    expected = [
        e
        for n, e in enumerate(events)
        if not isinstance(e, ev.PositionValue) or last_of[e.con_id] == n
    ]
    assert out == expected
    assert buffer.coalesced == len(events) - len(expected)


async def test_closed_and_empty_then_none_for_every_reader() -> None:
    buffer = EventBuffer()
    buffer.close()

    assert await buffer.get() is None
    assert await buffer.get() is None
