"""The broker port: what the runtime asks of a broker, whatever is behind it."""

from __future__ import annotations

from collections.abc import Iterable
from decimal import Decimal
from typing import Protocol

from guardd.broker.pacer import Lane
from guardd.core.events import OrderId


class BrokerPort(Protocol):
    """What the executor needs of the broker: `guardd.broker.ib.IbBroker` against IB, and
    `guardd.broker.fake.FakeBroker` in tests. A request made while not connected raises
    `BrokerDisconnectedError`; any request may raise another `GuarddError`."""

    @property
    def connected(self) -> bool: ...

    def next_order_id(self) -> OrderId: ...

    async def global_cancel(self) -> None: ...

    def closing(self, con_ids: Iterable[int]) -> None: ...

    async def cancel_order(self, order_id: int, lane: Lane) -> None: ...

    async def refresh_order_ids(self, lane: Lane = Lane.FLATTEN) -> None: ...

    async def refresh_positions(self) -> None: ...

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
    ) -> None: ...
