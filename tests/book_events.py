"""Broker events and a Book built by hand, for the core's unit tests: account `ACC` at time `T`,
account values (`av`), positions (`pos`), last prices (`tick`), open orders of a client
(`order`), and `book_with(*events)`: a connected, synced Book (the guard is `GUARD_CLIENT`) that
has folded them."""

from __future__ import annotations

from guardd.core.book import Book
from guardd.core.events import (
    AccountValue,
    BrokerEvent,
    ClientId,
    ConId,
    Connected,
    OpenOrder,
    OpenOrdersEnd,
    OrderId,
    PermId,
    PositionsEnd,
    PositionUpdate,
    PriceTick,
)

ACC = "DU1"
T = 1000.0


def av(key: str, value: str, ts: float = T, currency: str = "USD") -> AccountValue:
    return AccountValue(account=ACC, key=key, value=value, currency=currency, ts=ts)


def pos(con_id: int, qty: float, symbol: str = "", currency: str = "USD", ts: float = T):
    return PositionUpdate(
        account=ACC,
        con_id=ConId(con_id),
        symbol=symbol or f"S{con_id}",
        sec_type="STK",
        currency=currency,
        multiplier=1.0,
        exchange="SMART",
        quantity=qty,
        avg_cost=1.0,
        ts=ts,
    )


def tick(con_id: int, price: float, ts: float = T) -> PriceTick:
    return PriceTick(con_id=ConId(con_id), field="last", price=price, ts=ts)


def order(
    perm: int,
    *,
    client: int = 5,
    qty: float = 10,
    lmt: float = 100.0,
    order_type: str = "LMT",
    ref: str = "",
    ts: float = T,
) -> OpenOrder:
    return OpenOrder(
        perm_id=PermId(perm),
        order_id=OrderId(perm),
        client_id=ClientId(client),
        account=ACC,
        con_id=ConId(1),
        symbol="S1",
        sec_type="STK",
        action="BUY",
        quantity=qty,
        order_type=order_type,
        lmt_price=lmt,
        order_ref=ref,
        status="Submitted",
        currency="USD",
        multiplier=1.0,
        ts=ts,
    )


GUARD_CLIENT = 0  # the guard's own API client id in these tests


def book_with(*events: BrokerEvent, synced: bool = True, claimed: tuple[int, ...] = ()) -> Book:
    book = Book(ACC, "USD", created_at=T - 10, own_client_id=ClientId(GUARD_CLIENT))
    book.fold(Connected(server_version=178, managed_accounts=(ACC,), next_order_id=1, ts=T - 10))
    if synced:
        book.fold(PositionsEnd(ts=T - 10))
        book.fold(OpenOrdersEnd(ts=T - 10))
    for order_id in claimed:
        book.claim_order_id(OrderId(order_id))
    for e in events:
        book.fold(e)
    return book
