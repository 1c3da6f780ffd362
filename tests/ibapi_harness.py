"""A recording client on the official `ibapi` EClient/EWrapper, for tests against the simulator.

The client runs exactly as a bot would: `connect()` does the blocking handshake, and `run()` decodes
messages on its own thread. Every EWrapper callback named in `RECORDED` is appended to `events` as
`(name, args)`; tests wait on them from asyncio with `await client.wait_for(...)`.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

from ibapi.client import EClient
from ibapi.contract import Contract
from ibapi.order import Order
from ibapi.order_cancel import OrderCancel
from ibapi.wrapper import EWrapper

RECORDED = (
    "nextValidId",
    "managedAccounts",
    "error",
    "position",
    "positionEnd",
    "accountSummary",
    "accountSummaryEnd",
    "updateAccountValue",
    "updatePortfolio",
    "accountDownloadEnd",
    "pnl",
    "pnlSingle",
    "openOrder",
    "orderStatus",
    "openOrderEnd",
    "execDetails",
    "execDetailsEnd",
    "commissionAndFeesReport",
    "tickPrice",
    "tickSize",
    "tickOptionComputation",
    "marketDataType",
    "contractDetails",
    "contractDetailsEnd",
    "currentTime",
    "connectionClosed",
)

Event = tuple[str, tuple[Any, ...]]


class _Recorder(EWrapper):
    def __init__(self) -> None:
        super().__init__()
        self.events: list[Event] = []
        self.cond = threading.Condition()


def _recording(name: str) -> Callable[..., None]:
    def method(self: _Recorder, *args: Any) -> None:
        with self.cond:
            self.events.append((name, args))
            self.cond.notify_all()

    method.__name__ = name
    return method


for _name in RECORDED:
    setattr(_Recorder, _name, _recording(_name))


class IbapiClient(EClient):
    """The official client with a recording wrapper."""

    def __init__(self) -> None:
        self.recorder = _Recorder()
        super().__init__(self.recorder)
        self._thread: threading.Thread | None = None

    @property
    def events(self) -> list[Event]:
        with self.recorder.cond:
            return list(self.recorder.events)

    def named(self, name: str) -> list[tuple[Any, ...]]:
        return [args for n, args in self.events if n == name]

    def error_codes(self) -> list[int]:
        # error(reqId, errorTime, errorCode, errorString, advancedOrderRejectJson)
        return [args[2] for args in self.named("error")]

    async def start(self, port: int, client_id: int, *, timeout: float = 5.0) -> None:
        """Connect, start the reader thread, and wait for nextValidId."""
        await asyncio.wait_for(
            asyncio.to_thread(self.connect, "127.0.0.1", port, client_id), timeout
        )
        self._thread = threading.Thread(target=self.run, name=f"ibapi-{client_id}", daemon=True)
        self._thread.start()
        await self.wait_for("nextValidId", timeout=timeout)

    async def stop(self) -> None:
        """Close the socket, let `run()` drain its queue and end, then disconnect.

        `EClient.disconnect()` first would reset the client's server version while `run()` may
        still be decoding queued messages, and the run thread would die with a TypeError.
        """
        sock = getattr(self.conn, "socket", None)
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, 5.0)
        self.disconnect()

    def _wait(
        self, name: str, pred: Callable[[tuple[Any, ...]], bool], count: int, timeout: float
    ) -> list[tuple[Any, ...]]:
        deadline = time.monotonic() + timeout
        with self.recorder.cond:
            while True:
                hits = [a for n, a in self.recorder.events if n == name and pred(a)]
                if len(hits) >= count:
                    return hits
                left = deadline - time.monotonic()
                if left <= 0:
                    seen = sorted({n for n, _ in self.recorder.events})
                    raise TimeoutError(f"no {count}x {name} within {timeout} s; saw {seen}")
                self.recorder.cond.wait(left)

    async def wait_for(
        self,
        name: str,
        pred: Callable[[tuple[Any, ...]], bool] = lambda a: True,
        *,
        count: int = 1,
        timeout: float = 5.0,
    ) -> list[tuple[Any, ...]]:
        """The recorded arguments of `name` callbacks matching `pred`, once there are `count`."""
        return await asyncio.to_thread(self._wait, name, pred, count, timeout)

    def cancel(self, order_id: int) -> None:
        self.cancelOrder(order_id, OrderCancel())

    def global_cancel(self) -> None:
        self.reqGlobalCancel(OrderCancel())


async def connected(port: int, client_id: int) -> IbapiClient:
    """A started client on `port` as `client_id`, past nextValidId."""
    client = IbapiClient()
    await client.start(port, client_id)
    return client


def stock(symbol: str) -> Contract:
    contract = Contract()
    contract.symbol = symbol
    contract.secType = "STK"
    contract.exchange = "SMART"
    contract.currency = "USD"
    return contract


def limit_order(action: str, quantity: float, price: float) -> Order:
    order = Order()
    order.action = action
    order.orderType = "LMT"
    order.totalQuantity = quantity
    order.lmtPrice = price
    order.tif = "DAY"
    return order


def market_order(action: str, quantity: float) -> Order:
    order = Order()
    order.action = action
    order.orderType = "MKT"
    order.totalQuantity = quantity
    return order
