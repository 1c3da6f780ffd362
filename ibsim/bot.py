"""A scripted trading bot on the official `ibapi` client, for the demo, drills and benchmarks.

It behaves like the bots guardd guards: its own client id, its own orders, no idea a guard exists.
`RunawayBot.run_away(rate, count)` sends limit orders far from the market (they rest) at `rate`
per second: the runaway algorithm the order-rate rule exists for.
"""

from __future__ import annotations

import asyncio
import threading
from decimal import Decimal
from typing import Any

from ibapi.client import EClient
from ibapi.contract import Contract
from ibapi.order import Order
from ibapi.wrapper import EWrapper


class _BotWrapper(EWrapper):  # type: ignore[misc]
    def __init__(self) -> None:
        super().__init__()
        self.next_id: int | None = None
        self.ready = threading.Event()
        self.errors: list[tuple[int, int, str]] = []
        self.lock = threading.Lock()

    def nextValidId(self, orderId: int) -> None:
        with self.lock:
            self.next_id = orderId if self.next_id is None else max(self.next_id, orderId)
        self.ready.set()

    def error(self, reqId: Any, errorTime: Any, errorCode: int, errorString: str, *a: Any) -> None:
        with self.lock:
            self.errors.append((int(reqId), int(errorCode), errorString))


class RunawayBot:
    """A bot client: connect, place orders, disconnect. Blocking calls run in threads."""

    def __init__(self, host: str, port: int, client_id: int) -> None:
        self.host = host
        self.port = port
        self.client_id = client_id
        self.wrapper = _BotWrapper()
        self.client = EClient(self.wrapper)
        self._thread: threading.Thread | None = None
        self.placed: list[tuple[int, str, str, Decimal, float]] = []

    async def connect(self, timeout_s: float = 5.0) -> None:
        """Connect and wait for nextValidId."""
        await asyncio.wait_for(
            asyncio.to_thread(self.client.connect, self.host, self.port, self.client_id),
            timeout_s,
        )
        self._thread = threading.Thread(
            target=self.client.run, name=f"bot-{self.client_id}", daemon=True
        )
        self._thread.start()
        ok = await asyncio.to_thread(self.wrapper.ready.wait, timeout_s)
        if not ok:
            raise TimeoutError("the bot got no nextValidId")

    def place_limit(
        self, symbol: str, action: str, quantity: float, price: float, *, order_ref: str = ""
    ) -> int:
        """Place one stock limit order (labelled `order_ref`); returns its order id."""
        with self.wrapper.lock:
            assert self.wrapper.next_id is not None
            order_id = self.wrapper.next_id
            self.wrapper.next_id += 1
        contract = Contract()
        contract.symbol = symbol
        contract.secType = "STK"
        contract.exchange = "SMART"
        contract.currency = "USD"
        order = Order()
        order.action = action
        order.orderType = "LMT"
        order.totalQuantity = Decimal(str(quantity))
        order.lmtPrice = price
        order.tif = "DAY"
        order.orderRef = order_ref
        self.client.placeOrder(order_id, contract, order)
        self.placed.append((order_id, symbol, action, Decimal(str(quantity)), price))
        return order_id

    async def run_away(
        self, *, symbol: str, price: float, rate: float, count: int, quantity: float = 100
    ) -> None:
        """Send `count` resting buy orders at `rate` per second, each a cent lower."""
        if rate <= 0:
            raise ValueError(f"rate must be positive, got {rate}")
        for n in range(count):
            if not self.client.isConnected():
                return
            self.place_limit(symbol, "BUY", quantity, round(price - 0.01 * n, 2))
            await asyncio.sleep(1.0 / rate)

    def error_codes(self) -> list[int]:
        with self.wrapper.lock:
            return [code for _, code, _ in self.wrapper.errors]

    async def disconnect(self) -> None:
        # End the message loop before closing the socket: ibapi's run() reads serverVersion()
        # for every queued message, and disconnect() resets it to None under a running loop
        # (a TypeError in the bot's thread when a message was still queued).
        self.client.setConnState(EClient.DISCONNECTED)
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, 5.0)
        self.client.disconnect()
