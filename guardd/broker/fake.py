"""A test double of the broker port, shipped so that tests of the executor and the runtime need
no gateway: `FakeBroker` implements `guardd.broker.port.BrokerPort`.

It records every request the runtime makes (`requests`, in order, each with its lane and
arguments) and answers none by itself: no order fills, no status comes back unless the test feeds
it. A test

- reads what was asked: `named("place_order")`, or awaits it: `await wait_for("global_cancel")`;
- feeds broker events to whoever reads `events()`: `fake.feed(event)`; `stop()` ends the stream;
- drops the connection: `fake.connected = False` (every request then raises
  `BrokerDisconnectedError`, as `IbBroker` does), or makes one kind of request fail:
  `fake.refuse("global_cancel", BrokerError("..."))` (`refuse(name, None)` lifts it);
- chooses the order ids handed out: `FakeBroker(first_order_id=100)`.

It is no model of IB: what the gateway does (fills, rejects, pacing, order ids after a reconnect)
is tested against the simulated gateway (`ibsim`) over real TCP.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterable, Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from typing import TYPE_CHECKING

from guardd.broker.pacer import Lane
from guardd.broker.port import BrokerPort
from guardd.core.events import BrokerEvent, OrderId
from guardd.errors import BrokerDisconnectedError, GuarddError

REQUESTS = frozenset(
    {"global_cancel", "cancel_order", "refresh_order_ids", "refresh_positions", "place_order"}
)
"""The names of the requests `FakeBroker` records (the port's coroutine methods)."""


@dataclass(frozen=True)
class Request:
    """One request made of the broker: the port method's name, its lane and its arguments."""

    name: str
    lane: Lane | None = None
    args: Mapping[str, object] = field(default_factory=dict)

    @property
    def order_id(self) -> int | None:
        """The order id of a `place_order` or `cancel_order` (None for the others)."""
        value = self.args.get("order_id")
        return value if isinstance(value, int) else None


class FakeBroker:
    """The broker port without a broker: records requests, hands out order ids, passes on the
    events a test feeds. Use it on the event loop that runs the code under test."""

    def __init__(self, *, connected: bool = True, first_order_id: int = 1) -> None:
        self.connected = connected
        self.next_id = first_order_id
        self.requests: list[Request] = []
        self.closing_con_ids: frozenset[int] = frozenset()
        self._refusals: dict[str, GuarddError] = {}
        self._changed = asyncio.Condition()
        self._events: asyncio.Queue[BrokerEvent | None] = asyncio.Queue()

    # ---- what a test drives ----------------------------------------------------------------

    def named(self, name: str) -> list[Request]:
        """The requests called `name`, in the order they were made."""
        return [r for r in self.requests if r.name == name]

    async def wait_for(self, name: str, *, count: int = 1, timeout_s: float = 5.0) -> list[Request]:
        """The requests called `name` once there are `count` of them; TimeoutError after
        `timeout_s`."""
        async with asyncio.timeout(timeout_s), self._changed:
            await self._changed.wait_for(lambda: len(self.named(name)) >= count)
        return self.named(name)

    def refuse(self, name: str, error: GuarddError | None) -> None:
        """Make every request called `name` raise `error` from now on (None: answer again)."""
        if name not in REQUESTS:
            raise ValueError(f"no such request: {name}")
        if error is None:
            self._refusals.pop(name, None)
        else:
            self._refusals[name] = error

    def feed(self, event: BrokerEvent) -> None:
        """Pass `event` on to the reader of `events()`."""
        self._events.put_nowait(event)

    def stop(self) -> None:
        """End `events()` once the events fed before are read."""
        self._events.put_nowait(None)

    async def events(self) -> AsyncIterator[BrokerEvent]:
        """Every event fed, in order, until `stop()`."""
        while (event := await self._events.get()) is not None:
            yield event

    # ---- the port --------------------------------------------------------------------------

    def next_order_id(self) -> OrderId:
        self._check_connected("next_order_id")
        order_id = self.next_id
        self.next_id += 1
        return OrderId(order_id)

    def closing(self, con_ids: Iterable[int]) -> None:
        self.closing_con_ids = frozenset(int(c) for c in con_ids if int(c))

    async def global_cancel(self) -> None:
        await self._record("global_cancel", Lane.KILL, {})

    async def cancel_order(self, order_id: int, lane: Lane) -> None:
        await self._record("cancel_order", lane, {"order_id": order_id})

    async def refresh_order_ids(self, lane: Lane = Lane.FLATTEN) -> None:
        await self._record("refresh_order_ids", lane, {})

    async def refresh_positions(self) -> None:
        await self._record("refresh_positions", Lane.CLOSE_DATA, {})

    async def place_order(
        self,
        order_id: int,
        *,
        con_id: int = 0,
        symbol: str = "",
        sec_type: str = "STK",
        exchange: str = "SMART",
        currency: str = "USD",
        action: str,
        quantity: Decimal | float,
        order_type: str,
        lmt_price: float | None = None,
        order_ref: str = "",
        outside_rth: bool = False,
        account: str | None = None,
        lane: Lane,
    ) -> None:
        args: dict[str, object] = {
            "order_id": order_id,
            "con_id": con_id,
            "symbol": symbol,
            "sec_type": sec_type,
            "exchange": exchange,
            "currency": currency,
            "action": action,
            "quantity": quantity,
            "order_type": order_type,
            "lmt_price": lmt_price,
            "order_ref": order_ref,
            "outside_rth": outside_rth,
            "account": account,
        }
        await self._record("place_order", lane, args)

    # ---- inside ----------------------------------------------------------------------------

    def _check_connected(self, what: str) -> None:
        if not self.connected:
            raise BrokerDisconnectedError(f"{what}: not connected (FakeBroker)")

    async def _record(self, name: str, lane: Lane, args: Mapping[str, object]) -> None:
        self._check_connected(name)
        refusal = self._refusals.get(name)
        if refusal is not None:
            raise refusal
        async with self._changed:
            self.requests.append(Request(name, lane, args))
            self._changed.notify_all()


if TYPE_CHECKING:
    _PORT: BrokerPort = FakeBroker()  # mypy checks that FakeBroker implements the port
