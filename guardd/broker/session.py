"""One connection to the gateway: an ibapi client that is its own wrapper, bridged to the loop.

Callbacks run on the ibapi thread; each becomes a BrokerEvent (by `guardd.broker.convert`) or an
internal note, stamped with the owner's clock and handed to the owner on the event loop in order
(`SessionOwner.on_items`). Request-id maps are written on the event loop before the request is
sent, so the ibapi thread only reads them.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, Protocol

from ibapi import errors as ibapi_errors
from ibapi.client import EClient
from ibapi.contract import Contract
from ibapi.order import Order
from ibapi.wrapper import EWrapper

from guardd.broker import convert
from guardd.broker.hours import HoursFormatError
from guardd.core import events as ev

SEND_FAILURES = frozenset(
    error.code() for name, error in vars(ibapi_errors).items() if name.startswith("FAIL_SEND")
)
"""ibapi's codes for a request it could not write to the socket (538: reqGlobalCancel)."""


class SessionOwner(Protocol):
    """What a session needs of the broker that runs it."""

    account: str
    clock: Callable[[], float]

    @property
    def loop(self) -> asyncio.AbstractEventLoop: ...

    def on_items(self, session: IbSession, items: list[object]) -> None:
        """Callbacks of `session`, in the order the ibapi thread saw them (on the loop)."""


@dataclass(frozen=True, slots=True)
class Accounts:
    """managedAccounts arrived (internal, never emitted)."""

    accounts: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Pong:
    """currentTime arrived: the answer to a heartbeat, emitted as ServerTime."""

    epoch_s: int
    ts: float


@dataclass(frozen=True, slots=True)
class HoursUnreadable:
    """contractDetails whose hours could not be read (internal, logged)."""

    con_id: ev.ConId
    why: str


@dataclass(frozen=True, slots=True)
class NextId:
    """nextValidId arrived (internal, never emitted)."""

    order_id: int


class IbSession(EWrapper, EClient):  # type: ignore[misc]
    """One connection to the gateway: an ibapi client that is its own wrapper (see module doc)."""

    def __init__(self, owner: SessionOwner, number: int) -> None:
        EWrapper.__init__(self)
        EClient.__init__(self, wrapper=self)
        self._owner = owner
        self.number = number
        self.managed: tuple[str, ...] | None = None
        self.first_order_id: int | None = None
        self.next_id: int | None = None
        self.id_waiters: list[asyncio.Future[None]] = []  # waiting for the answer to reqIds
        self.announced = False
        self.ready: asyncio.Future[None] = owner.loop.create_future()
        self.ready.add_done_callback(lambda f: None if f.cancelled() else f.exception())
        self.last_error: tuple[int, str] | None = None
        self.pnl_req: dict[int, str] = {}  # reqId -> account
        self.pnl_single_req: dict[int, ev.ConId] = {}
        self.pnl_single_con: set[int] = set()
        self.tick_req: dict[int, ev.ConId] = {}
        self.hours_req: dict[int, ev.ConId] = {}  # reqContractDetails for a contract's hours
        self.hours_con: set[int] = set()
        # The queued (or sent) price request of each contract: one still queued on NORMAL is
        # moved ahead when the contract comes into a close.
        self.price_requests: dict[ev.ConId, asyncio.Future[None]] = {}
        # reqIds whose data IB switched to frozen or delayed (marketDataType); ibapi thread only.
        self.stale_data_req: set[int] = set()
        self.run_thread: threading.Thread | None = None
        self.heard = asyncio.Event()  # set on the loop by every message of this session
        self.heartbeat_task: asyncio.Task[None] | None = None
        self.drop_reason: str | None = None  # why the broker itself dropped this session
        # ibapi reports a request it failed to write (a closed socket) as an error, not raised.
        self.send_error: str | None = None
        # Positions of the guarded account whose latest quantity arrived unset (unknown), and
        # the reqPositions sent again for them on this connection (see `guardd.broker.ib`).
        self.unknown_positions: dict[ev.ConId, str] = {}  # conId -> symbol
        self.positions_retries = 0
        self.positions_retry_task: asyncio.Task[None] | None = None
        # reqPositions written and positionEnd received on this connection (IB answers them in
        # order); `relist`: the ordinal of a reqPositions sent again and the guarded account's
        # contracts listed since it was written.
        self.positions_requests = 0
        self.positions_ends = 0
        self.relist: tuple[int, set[ev.ConId], float] | None = None
        self._inbox: deque[object] = deque()  # callbacks posted by the ibapi thread, in order
        self._inbox_lock = threading.Lock()
        self._drain_scheduled = False

    # ---- bridge ----------------------------------------------------------------------------

    def _post(self, item: object) -> None:
        """Hand one callback to the event loop, in order. Under load callbacks are batched: one
        wake-up of the loop (a self-pipe write) drains everything posted since the last one."""
        with self._inbox_lock:
            self._inbox.append(item)
            if self._drain_scheduled:
                return
            self._drain_scheduled = True
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is listening
            self._owner.loop.call_soon_threadsafe(self._drain)

    def _drain(self) -> None:
        with self._inbox_lock:
            items = list(self._inbox)
            self._inbox.clear()
            self._drain_scheduled = False
        self._owner.on_items(self, items)

    def _ts(self) -> float:
        return self._owner.clock()

    def now(self) -> float:
        """The owner's clock: what every event of this session is stamped with."""
        return self._owner.clock()

    def abort(self) -> None:
        """Close the socket so that a handshake or the reader thread ends at once (any thread)."""
        conn = self.conn
        sock = getattr(conn, "socket", None)
        if sock is None:
            return
        try:
            sock.shutdown(socket.SHUT_RDWR)  # wakes a blocked recv; the reader then disconnects
        except OSError:
            with contextlib.suppress(Exception):
                conn.disconnect()

    # ---- EWrapper --------------------------------------------------------------------------

    def connectAck(self) -> None:
        pass

    def managedAccounts(self, accountsList: str) -> None:
        self._post(Accounts(convert.managed_accounts(accountsList)))

    def nextValidId(self, orderId: int) -> None:
        self._post(NextId(int(orderId)))

    def error(
        self,
        reqId: int,
        errorTime: int,
        errorCode: int,
        errorString: str,
        advancedOrderRejectJson: str = "",
    ) -> None:
        if int(errorCode) in SEND_FAILURES:  # on the sending thread, during the request
            self.send_error = f"{errorCode} {errorString}"
        self._post(convert.broker_message(reqId, errorCode, errorString, self._ts()))

    def connectionClosed(self) -> None:
        pass  # the end of the run thread is the one signal (see IbConnection._run_session)

    def position(self, account: str, contract: Contract, position: Decimal, avgCost: float) -> None:
        self._post(convert.position_update(account, contract, position, avgCost, self._ts()))

    def positionEnd(self) -> None:
        self._post(ev.PositionsEnd(ts=self._ts()))

    def updateAccountValue(self, key: str, val: str, currency: str, accountName: str) -> None:
        self._post(convert.account_value(key, val, currency, accountName, self._ts()))

    def updatePortfolio(
        self,
        contract: Contract,
        position: Decimal,
        marketPrice: float,
        marketValue: float,
        averageCost: float,
        unrealizedPNL: float,
        realizedPNL: float,
        accountName: str,
    ) -> None:
        # Every position's value at once when the subscription starts, then about every three
        # minutes: the start-up value of every position (pnlSingle and prices come later).
        self._post(
            convert.portfolio_value(
                contract, position, marketPrice, marketValue, accountName, self._ts()
            )
        )

    def updateAccountTime(self, timeStamp: str) -> None:
        pass

    def accountDownloadEnd(self, accountName: str) -> None:
        self._post(ev.AccountDownloadEnd(account=accountName, ts=self._ts()))

    def pnl(self, reqId: int, dailyPnL: float, unrealizedPnL: float, realizedPnL: float) -> None:
        account = self.pnl_req.get(reqId)
        if account is None:
            return
        self._post(convert.pnl_update(account, dailyPnL, unrealizedPnL, realizedPnL, self._ts()))

    def pnlSingle(
        self,
        reqId: int,
        pos: Decimal,
        dailyPnL: float,
        unrealizedPnL: float,
        realizedPnL: float,
        value: float,
    ) -> None:
        con_id = self.pnl_single_req.get(reqId)
        if con_id is None:
            return
        self._post(
            convert.position_value(
                self._owner.account,
                con_id,
                pos,
                dailyPnL,
                unrealizedPnL,
                realizedPnL,
                value,
                self._ts(),
            )
        )

    def tickPrice(self, reqId: int, tickType: int, price: float, attrib: Any) -> None:
        con_id = self.tick_req.get(reqId)
        if con_id is None:
            return
        stale = reqId in self.stale_data_req
        tick = convert.price_tick(con_id, tickType, price, self._ts(), stale=stale)
        if tick is not None:
            self._post(tick)

    def tickSize(self, reqId: int, tickType: int, size: Any) -> None:
        con_id = self.tick_req.get(reqId)
        if con_id is None:
            return
        stale = reqId in self.stale_data_req
        tick = convert.size_tick(con_id, tickType, self._ts(), stale=stale)
        if tick is not None:
            self._post(tick)

    def tickOptionComputation(
        self,
        reqId: int,
        tickType: int,
        tickAttrib: Any,
        impliedVol: float | None,
        delta: float | None,
        optPrice: float | None,
        pvDividend: float | None,
        gamma: float | None,
        vega: float | None,
        theta: float | None,
        undPrice: float | None,
    ) -> None:
        con_id = self.tick_req.get(reqId)
        if con_id is None:
            return
        stale = reqId in self.stale_data_req
        computation = convert.option_computation(
            con_id,
            tickType,
            impliedVol,
            delta,
            gamma,
            vega,
            theta,
            undPrice,
            self._ts(),
            stale=stale,
        )
        if computation is not None:
            self._post(computation)

    def marketDataType(self, reqId: int, marketDataType: int) -> None:
        # Frozen and delayed data are old when they arrive: never a basis for a close limit.
        if int(marketDataType) == convert.REAL_TIME_DATA:
            self.stale_data_req.discard(reqId)
        else:
            self.stale_data_req.add(reqId)

    def tickString(self, *args: Any) -> None:
        pass

    def tickGeneric(self, *args: Any) -> None:
        pass

    def openOrder(self, orderId: int, contract: Contract, order: Order, orderState: Any) -> None:
        self._post(convert.open_order(orderId, contract, order, orderState, self._ts()))

    def orderStatus(
        self,
        orderId: int,
        status: str,
        filled: Decimal,
        remaining: Decimal,
        avgFillPrice: float,
        permId: int,
        parentId: int,
        lastFillPrice: float,
        clientId: int,
        whyHeld: str,
        mktCapPrice: float,
    ) -> None:
        self._post(
            convert.order_status(
                orderId, status, filled, remaining, avgFillPrice, permId, clientId, self._ts()
            )
        )

    def openOrderEnd(self) -> None:
        self._post(ev.OpenOrdersEnd(ts=self._ts()))

    def orderBound(self, *args: Any) -> None:
        pass

    def execDetails(self, reqId: int, contract: Contract, execution: Any) -> None:
        self._post(convert.execution(reqId, contract, execution, self._ts()))

    def execDetailsEnd(self, reqId: int) -> None:
        self._post(ev.ExecutionsEnd(ts=self._ts()))

    def commissionAndFeesReport(self, *args: Any) -> None:
        pass

    def currentTime(self, time: int) -> None:
        self._post(Pong(int(time), self._ts()))

    def contractDetails(self, reqId: int, contractDetails: Any) -> None:
        con_id = self.hours_req.get(int(reqId))
        if con_id is None:
            return
        try:
            self._post(convert.contract_hours(con_id, contractDetails, self._ts()))
        except HoursFormatError as exc:
            self._post(HoursUnreadable(con_id, str(exc)))
