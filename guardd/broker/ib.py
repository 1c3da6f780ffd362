"""The broker adapter: the official `ibapi` client bridged into asyncio as a stream of BrokerEvents.

Threads: ibapi's `connect()` does a blocking handshake (no timeout of its own) and starts an
EReader thread; `EClient.run()` decodes frames and calls the EWrapper on its own thread. Each
connection attempt is an `_IbSession` (one EClient + EWrapper); its callbacks become BrokerEvents
on the ibapi thread and cross into the event loop with `loop.call_soon_threadsafe`. Requests are
sent from the event loop through the one `PacedSender` (ibapi's socket send holds a lock).

Connection life: `IbBroker.__aenter__` (`start`) connects once and raises BrokerConnectError when
it cannot (timeout, refused, client id in use, account not managed by the login); `connect` keeps
trying with the reconnect back-off instead (a guard started while its gateway is down), raising
only AccountNotManagedError. After that the `_reconnect_loop` keeps the session alive: a drop
emits `Disconnected`, then the broker reconnects with bounded, jittered exponential backoff (slower
after error 326), never giving up while it runs.

Stopping is bounded: `stop` closes the socket of every session and connect attempt (again and
again while it waits: ibapi's blocking connect and handshake have no timeout of their own, and a
connect thread may create its socket just after a first close found none) and waits at most
`JOIN_TIMEOUT_S` for the ibapi threads; a thread still stuck is a daemon and is left behind.

Liveness (`alive`, for the systemd watchdog): the adapter promises its next sign of life and
keeps the promise. Connected, every message from the gateway is one, and the heartbeat makes one
due every `heartbeat_interval_s + heartbeat_timeout_s`; disconnected, each connect attempt and
each back-off sleep promise the next attempt. A reconnect loop that keeps retrying is alive; one
wedged (a callback that never returns, an attempt that never ends, a session whose threads never
end) breaks its promise and is not.

Silent TCP death (a NAT or firewall forgets the connection; nothing is closed, nothing arrives) is
noticed by an application heartbeat: every `heartbeat_interval_s` the session sends reqCurrentTime
on the NORMAL lane, and when nothing at all (the answer or any other message) arrives within
`heartbeat_timeout_s` of it being written, the session is dropped as dead and the reconnect loop
takes over.
After every (re)connect it emits `Connected` and resubscribes: positions, account updates, PnL,
every client's open orders, executions, per-position PnL and watched prices. The `PositionsEnd`
and `OpenOrdersEnd` barriers therefore follow every `Connected`.

Unset values: a field a protobuf message leaves out (server version 201+) reaches the EWrapper
as ibapi's unset marker (`ibapi.const`: UNSET_DECIMAL for an absent quantity, UNSET_INTEGER
2147483647 for an absent client or order id, UNSET_LONG for an absent permId, UNSET_DOUBLE for
an absent price). They are recognised by equality with those constants, never by magnitude: a
quantity, price or fill count becomes NaN ("unknown", never 0 and never a number the Book
folds), an order id 0 (none reported), a client id `ev.UNKNOWN_CLIENT_ID` and a permId 0 (not
known yet), so an unset id never matches the guard's own identity. A position of the guarded
account whose quantity arrives unset is asked for again: reqPositions after
`positions_retry_s`, doubling up to `positions_retry_max_s`, at most `positions_retries` times
until every quantity is known again (logged `positions_rerequested`; `positions_retries_exhausted`
once the bound is reached; a new connection starts afresh).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import math
import random
import socket
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, Final, cast
from zoneinfo import ZoneInfo

import structlog
from ibapi.client import EClient
from ibapi.const import UNSET_DECIMAL, UNSET_DOUBLE, UNSET_INTEGER, UNSET_LONG
from ibapi.contract import Contract
from ibapi.execution import ExecutionFilter
from ibapi.order import Order
from ibapi.order_cancel import OrderCancel
from ibapi.wrapper import EWrapper
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception_type, stop_never

from guardd.broker.hours import HoursFormatError, market_hours
from guardd.broker.pacer import DEFAULT_MESSAGES_PER_SECOND, Lane, PacedSender
from guardd.core import events as ev
from guardd.core.options import expiry_time
from guardd.errors import (
    AccountNotManagedError,
    BrokerConnectError,
    BrokerDisconnectedError,
    GuarddError,
)

__all__ = ["ClientIdInUseError", "IbBroker", "reconnect_delay"]

log = structlog.get_logger(__name__)

NO_REQ_ID: Final = -1

# IB error and notice codes the adapter acts on.
PACING_VIOLATION: Final = 100
CLIENT_ID_IN_USE: Final = 326
NOT_CONNECTED: Final = 504
CONNECTIVITY_LOST: Final = 1100
RESTORED_DATA_LOST: Final = 1101
RESTORED_DATA_KEPT: Final = 1102
SERVER_CONNECTIVITY_BROKEN: Final = 2110
READ_ONLY: Final = 321  # "... The API interface is currently in Read-Only mode." (and others)
ORDER_TO_CANCEL_NOT_FOUND: Final = 10147
NOTICES: Final = frozenset({2104, 2106, 2107, 2108, 2158})  # farm OK / inactive: informational

# tickPrice tick types -> price field (live and delayed).
TICK_FIELDS: Final[dict[int, ev.PriceField]] = {
    1: "bid",
    2: "ask",
    4: "last",
    37: "mark",
    66: "bid",
    67: "ask",
    68: "last",
}
# tickSize tick types -> the price field whose size they give (live and delayed).
SIZE_FIELDS: Final[dict[int, ev.PriceField]] = {
    0: "bid",
    3: "ask",
    5: "last",
    69: "bid",
    70: "ask",
    71: "last",
}
DELAYED_TICKS: Final = frozenset({66, 67, 68, 69, 70, 71})
# tickOptionComputation tick types -> the price IB's option model was computed at (live, delayed).
OPTION_SOURCES: Final[dict[int, ev.OptionSource]] = {
    10: "bid",
    11: "ask",
    12: "last",
    13: "model",
    80: "bid",
    81: "ask",
    82: "last",
    83: "model",
}
DELAYED_OPTION_TICKS: Final = frozenset({80, 81, 82, 83})
REAL_TIME_DATA: Final = 1  # marketDataType: 1 real-time; 2 frozen, 3 delayed, 4 delayed frozen

_SENTINEL: Final = object()

DATA_REQ_ID_BASE: Final = 1 << 30
"""Request ids of data subscriptions start here: an IB error names a request or an order by the
same field (reqId), and an error of a price or PnL request must never be taken for one of an
order of ours (order ids stay far below)."""
READ_ONLY_PROBE_ID: Final = (1 << 31) - 2
"""The order id of the Read-only probe: a cancel of an order that never exists (the largest
32-bit id below ibapi's "unset" marker, which it would send as empty). Refused with 321
while the API is read-only, answered 10147 (not found) once it is not."""
ORDER_IDS_TIMEOUT_S: Final = 2.0
"""How long `refresh_order_ids` waits for the answer to reqIds."""
POSITIONS_RETRY_S: Final = 1.0
"""After a position quantity arrives unset: the first reqPositions again after this long,
each next one after twice as long as the one before (capped at `POSITIONS_RETRY_MAX_S`)."""
POSITIONS_RETRY_MAX_S: Final = 30.0
POSITIONS_RETRIES: Final = 8
"""At most this many reqPositions again per connection while quantities stay unknown (the
bound resets once every quantity is known again)."""

JOIN_TIMEOUT_S: Final = 0.75
"""How long `stop` (and a failed `start`) waits for the ibapi threads to end."""
ABORT_GRACE_S: Final = 2.5
"""How long a timed-out connect attempt may take to end after its socket is closed."""


class ClientIdInUseError(BrokerConnectError):
    """Error 326: another session already uses guardd's client id at the gateway."""


def _number(value: Any) -> float:
    """IB's number as a float; ibapi's unset markers (UNSET_DECIMAL, UNSET_DOUBLE, and
    UNSET_INTEGER / UNSET_LONG where a count arrives as an int) and non-finite values become NaN:
    unknown, never a number."""
    if value is None or value == "":
        return math.nan
    if isinstance(value, Decimal):
        if value == UNSET_DECIMAL or not value.is_finite():
            return math.nan
        return float(value)
    if isinstance(value, int) and value in (UNSET_INTEGER, UNSET_LONG):
        return math.nan
    number = float(value)
    if number == UNSET_DOUBLE or not math.isfinite(number):
        return math.nan
    return number


def _order_id(value: Any) -> ev.OrderId:
    """An order id; unset (UNSET_INTEGER, e.g. left out of a protobuf orderStatus) becomes 0,
    "no API order id", which never names an order of ours."""
    number = int(value)
    return ev.OrderId(0 if number in (UNSET_INTEGER, UNSET_LONG) else number)


def _client_id(value: Any) -> ev.ClientId:
    """A client id; unset (UNSET_INTEGER 2147483647) becomes `ev.UNKNOWN_CLIENT_ID`, which is
    never the guard's."""
    number = int(value)
    return ev.ClientId(ev.UNKNOWN_CLIENT_ID if number in (UNSET_INTEGER, UNSET_LONG) else number)


def _perm_id(value: Any) -> ev.PermId:
    """A permId; unset (UNSET_LONG, or UNSET_INTEGER) becomes 0, "not known yet"."""
    number = int(value)
    return ev.PermId(0 if number in (UNSET_INTEGER, UNSET_LONG) else number)


_OPTION_ZONE: Final = ZoneInfo("America/New_York")


def _option_terms(contract: Contract) -> dict[str, Any]:
    """An option's strike, right and expiry (epoch seconds) from its contract, as the Book
    keeps them; nothing for any other contract (the Book's NaN / "": not an option's terms)."""
    if contract.secType != "OPT":
        return {}
    strike = _number(contract.strike)
    right = {"C": "C", "CALL": "C", "P": "P", "PUT": "P"}.get(str(contract.right).upper(), "")
    return {
        "strike": strike if strike > 0 else math.nan,
        "right": right,
        "expiry": expiry_time(str(contract.lastTradeDateOrContractMonth), _OPTION_ZONE),
    }


def _multiplier(text: str) -> float:
    try:
        return float(text) if text else 1.0
    except ValueError:
        return 1.0


@dataclass(frozen=True, slots=True)
class _Accounts:
    """managedAccounts arrived (internal, never emitted)."""

    accounts: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class _Pong:
    """currentTime arrived: the answer to a heartbeat, emitted as ServerTime."""

    epoch_s: int
    ts: float


@dataclass(frozen=True, slots=True)
class _HoursUnreadable:
    """contractDetails whose hours could not be read (internal, logged)."""

    con_id: ev.ConId
    why: str


@dataclass(frozen=True, slots=True)
class _NextId:
    """nextValidId arrived (internal, never emitted)."""

    order_id: int


class _IbSession(EWrapper, EClient):  # type: ignore[misc]
    """One connection to the gateway: an ibapi client that is its own wrapper.

    Callbacks run on the ibapi thread; each becomes a BrokerEvent (or an internal note) stamped
    with the broker's clock and handed to the broker on the event loop. Request-id maps are
    written on the event loop before the request is sent, so the ibapi thread only reads them.
    """

    def __init__(self, broker: IbBroker, number: int) -> None:
        EWrapper.__init__(self)
        EClient.__init__(self, wrapper=self)
        self._broker = broker
        self.number = number
        self.managed: tuple[str, ...] | None = None
        self.first_order_id: int | None = None
        self.next_id: int | None = None
        self.id_waiters: list[asyncio.Future[None]] = []  # waiting for the answer to reqIds
        self.announced = False
        self.ready: asyncio.Future[None] = broker.loop.create_future()
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
        # Positions of the guarded account whose latest quantity arrived unset (unknown), and
        # the reqPositions sent again for them on this connection (see the module doc).
        self.unknown_positions: dict[ev.ConId, str] = {}  # conId -> symbol
        self.positions_retries = 0
        self.positions_retry_task: asyncio.Task[None] | None = None
        # reqPositions written and positionEnd received on this connection (IB answers them in
        # order); `relist`: the ordinal of a reqPositions sent again and the guarded account's
        # contracts listed since it was written.
        self.positions_requests = 0
        self.positions_ends = 0
        self.relist: tuple[int, set[ev.ConId]] | None = None
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
            self._broker.loop.call_soon_threadsafe(self._drain)

    def _drain(self) -> None:
        with self._inbox_lock:
            items = list(self._inbox)
            self._inbox.clear()
            self._drain_scheduled = False
        if self is self._broker._session:
            self._broker._heard()
        for item in items:
            self._broker._on_item(self, item)

    def _ts(self) -> float:
        return self._broker.clock()

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
        accounts = tuple(a.strip() for a in accountsList.split(",") if a.strip())
        self._post(_Accounts(accounts))

    def nextValidId(self, orderId: int) -> None:
        self._post(_NextId(int(orderId)))

    def error(
        self,
        reqId: int,
        errorTime: int,
        errorCode: int,
        errorString: str,
        advancedOrderRejectJson: str = "",
    ) -> None:
        self._post(
            ev.BrokerError(
                req_id=int(reqId), code=int(errorCode), message=str(errorString), ts=self._ts()
            )
        )

    def connectionClosed(self) -> None:
        pass  # the end of the run thread is the one signal (see IbBroker._run_session)

    def position(self, account: str, contract: Contract, position: Decimal, avgCost: float) -> None:
        self._post(
            ev.PositionUpdate(
                account=account,
                con_id=ev.ConId(int(contract.conId)),
                symbol=contract.symbol,
                sec_type=contract.secType,
                currency=contract.currency,
                multiplier=_multiplier(contract.multiplier),
                exchange=contract.exchange or contract.primaryExchange,
                quantity=_number(position),
                avg_cost=_number(avgCost),
                ts=self._ts(),
                **_option_terms(contract),
            )
        )

    def positionEnd(self) -> None:
        self._post(ev.PositionsEnd(ts=self._ts()))

    def updateAccountValue(self, key: str, val: str, currency: str, accountName: str) -> None:
        self._post(
            ev.AccountValue(
                account=accountName, key=key, value=val, currency=currency, ts=self._ts()
            )
        )

    def updatePortfolio(self, *args: Any) -> None:
        pass  # per-position values come from reqPnLSingle, which IB refreshes about once a second

    def updateAccountTime(self, timeStamp: str) -> None:
        pass

    def accountDownloadEnd(self, accountName: str) -> None:
        self._post(ev.AccountDownloadEnd(account=accountName, ts=self._ts()))

    def pnl(self, reqId: int, dailyPnL: float, unrealizedPnL: float, realizedPnL: float) -> None:
        account = self.pnl_req.get(reqId)
        if account is None:
            return
        self._post(
            ev.PnLUpdate(
                account=account,
                daily=_number(dailyPnL),
                unrealized=_number(unrealizedPnL),
                realized=_number(realizedPnL),
                ts=self._ts(),
            )
        )

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
            ev.PositionValue(
                account=self._broker.account,
                con_id=con_id,
                position=_number(pos),
                daily=_number(dailyPnL),
                unrealized=_number(unrealizedPnL),
                realized=_number(realizedPnL),
                value=_number(value),
                ts=self._ts(),
            )
        )

    def tickPrice(self, reqId: int, tickType: int, price: float, attrib: Any) -> None:
        con_id = self.tick_req.get(reqId)
        price_field = TICK_FIELDS.get(int(tickType))
        if con_id is None or price_field is None:
            return
        value = _number(price)
        if value == -1.0:  # IB's "no price available"
            value = math.nan
        delayed = int(tickType) in DELAYED_TICKS or reqId in self.stale_data_req
        self._post(
            ev.PriceTick(
                con_id=con_id, field=price_field, price=value, ts=self._ts(), delayed=delayed
            )
        )

    def tickSize(self, reqId: int, tickType: int, size: Any) -> None:
        con_id = self.tick_req.get(reqId)
        price_field = SIZE_FIELDS.get(int(tickType))
        if con_id is None or price_field is None:
            return
        delayed = int(tickType) in DELAYED_TICKS or reqId in self.stale_data_req
        self._post(ev.SizeTick(con_id=con_id, field=price_field, ts=self._ts(), delayed=delayed))

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
        # ibapi passes None for a figure IB did not compute (-1 / -2) on both wires
        con_id = self.tick_req.get(reqId)
        source = OPTION_SOURCES.get(int(tickType))
        if con_id is None or source is None:
            return
        delayed = int(tickType) in DELAYED_OPTION_TICKS or reqId in self.stale_data_req
        self._post(
            ev.OptionComputation(
                con_id=con_id,
                source=source,
                implied_vol=_number(impliedVol),
                delta=_number(delta),
                gamma=_number(gamma),
                vega=_number(vega),
                theta=_number(theta),
                underlying_price=_number(undPrice),
                ts=self._ts(),
                delayed=delayed,
            )
        )

    def marketDataType(self, reqId: int, marketDataType: int) -> None:
        # Frozen and delayed data are old when they arrive: never a basis for a close limit.
        if int(marketDataType) == REAL_TIME_DATA:
            self.stale_data_req.discard(reqId)
        else:
            self.stale_data_req.add(reqId)

    def tickString(self, *args: Any) -> None:
        pass

    def tickGeneric(self, *args: Any) -> None:
        pass

    def openOrder(self, orderId: int, contract: Contract, order: Order, orderState: Any) -> None:
        self._post(
            ev.OpenOrder(
                perm_id=_perm_id(order.permId),
                order_id=_order_id(orderId),
                client_id=_client_id(order.clientId),
                account=order.account,
                con_id=ev.ConId(int(contract.conId)),
                symbol=contract.symbol,
                sec_type=contract.secType,
                action=order.action,
                quantity=_number(order.totalQuantity),
                order_type=order.orderType,
                lmt_price=_number(order.lmtPrice),
                order_ref=order.orderRef or "",
                status=orderState.status,
                currency=contract.currency,
                multiplier=_multiplier(contract.multiplier),
                ts=self._ts(),
                aux_price=_number(order.auxPrice),
                trail_stop_price=_number(order.trailStopPrice),
                trailing_percent=_number(order.trailingPercent),
                tif=order.tif or "",
                outside_rth=bool(order.outsideRth),
                parent_id=int(order.parentId or 0),
                oca_group=order.ocaGroup or "",
            )
        )

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
            ev.OrderStatus(
                perm_id=_perm_id(permId),
                order_id=_order_id(orderId),
                client_id=_client_id(clientId),
                status=status,
                filled=_number(filled),
                remaining=_number(remaining),
                avg_fill_price=_number(avgFillPrice),
                ts=self._ts(),
            )
        )

    def openOrderEnd(self) -> None:
        self._post(ev.OpenOrdersEnd(ts=self._ts()))

    def orderBound(self, *args: Any) -> None:
        pass

    def execDetails(self, reqId: int, contract: Contract, execution: Any) -> None:
        self._post(
            ev.Execution(
                exec_id=execution.execId,
                perm_id=_perm_id(execution.permId),
                order_id=_order_id(execution.orderId),
                client_id=_client_id(execution.clientId),
                account=execution.acctNumber,
                con_id=ev.ConId(int(contract.conId)),
                symbol=contract.symbol,
                side=execution.side,
                shares=_number(execution.shares),
                price=_number(execution.price),
                time=execution.time,
                order_ref=execution.orderRef or "",
                ts=self._ts(),
                live=reqId == -1,
            )
        )

    def execDetailsEnd(self, reqId: int) -> None:
        self._post(ev.ExecutionsEnd(ts=self._ts()))

    def commissionAndFeesReport(self, *args: Any) -> None:
        pass

    def currentTime(self, time: int) -> None:
        self._post(_Pong(int(time), self._ts()))

    def contractDetails(self, reqId: int, contractDetails: Any) -> None:
        con_id = self.hours_req.get(int(reqId))
        if con_id is None:
            return
        try:
            hours = market_hours(
                str(contractDetails.timeZoneId or ""),
                str(contractDetails.tradingHours or ""),
                str(contractDetails.liquidHours or ""),
            )
        except HoursFormatError as exc:
            self._post(_HoursUnreadable(con_id, str(exc)))
            return
        self._post(ev.ContractHours(con_id=con_id, hours=hours, ts=self._ts()))


def reconnect_delay(
    attempt: int,
    error: BaseException | None,
    *,
    initial_s: float,
    max_s: float,
    client_id_in_use_s: float,
    jitter: float,
) -> float:
    """Seconds before reconnect attempt `attempt + 1`: exponential, capped, jittered.

    `initial_s * 2**(attempt - 1)` capped at `max_s`, plus `jitter * initial_s` (jitter in [0, 1)
    spreads guards that lost the same gateway). After error 326 (our client id still held by a
    session the gateway has not noticed is dead) wait at least `client_id_in_use_s`.
    """
    wait = min(max_s, initial_s * 2.0 ** min(max(attempt - 1, 0), 30))
    wait += jitter * initial_s
    if isinstance(error, ClientIdInUseError):
        wait = max(wait, client_id_in_use_s)
    return wait


def _order_contract(
    *,
    con_id: int,
    symbol: str,
    sec_type: str,
    exchange: str,
    currency: str,
    last_trade_date: str,
    multiplier: str,
    local_symbol: str,
) -> Contract:
    contract = Contract()
    contract.conId = con_id
    contract.symbol = symbol
    contract.secType = sec_type
    contract.exchange = exchange
    contract.currency = currency
    contract.lastTradeDateOrContractMonth = last_trade_date
    contract.multiplier = multiplier
    contract.localSymbol = local_symbol
    return contract


class IbBroker:
    """guardd's connection to TWS / IB Gateway as the Master API client.

    Use as `async with IbBroker(host, port, client_id, account) as broker:` and read
    `async for event in broker.events()`. Every request goes through one PacedSender; a request
    made while disconnected raises BrokerDisconnectedError (the caller's latch carries a kill
    over to the next `Connected`).
    """

    def __init__(
        self,
        host: str,
        port: int,
        client_id: int,
        account: str,
        connect_timeout_s: float = 10.0,
        messages_per_second: float = DEFAULT_MESSAGES_PER_SECOND,
        *,
        kill_reserve: int = 0,
        clock: Callable[[], float] = time.time,
        reconnect_initial_s: float = 0.5,
        reconnect_max_s: float = 30.0,
        client_id_in_use_wait_s: float = 15.0,
        heartbeat_interval_s: float | None = 5.0,
        heartbeat_timeout_s: float = 5.0,
        progress_slack_s: float = 5.0,
    ) -> None:
        self.host = host
        self.port = port
        self.client_id = client_id
        self.account = account
        self.connect_timeout_s = connect_timeout_s
        self.clock = clock
        self.reconnect_initial_s = reconnect_initial_s
        self.reconnect_max_s = reconnect_max_s
        self.client_id_in_use_wait_s = client_id_in_use_wait_s
        self.heartbeat_interval_s = heartbeat_interval_s  # None: no heartbeat
        self.heartbeat_timeout_s = heartbeat_timeout_s
        self.heartbeat_failures = 0
        # Liveness: the monotonic time by which the adapter promised its next sign of life
        # (None: nothing promised yet, not started); `progress_slack_s` is added to each promise.
        self.progress_slack_s = progress_slack_s
        self._alive_until: float | None = None
        # The highest order id seen from ANY client (ours sent, any reported in openOrder,
        # orderStatus or execDetails, reserved): IB refuses a Master API client's new order whose
        # id is not above every id reported to it (error 103), and nextValidId lags behind the
        # ids of other clients' orders reported after it. New ids start above it, so an id of
        # ours already sent or reported is never re-used (after a gateway restart nextValidId
        # may roll back, and re-sending a still-working order's id would MODIFY that order).
        self.highest_order_id_seen = 0
        self.order_ids_skipped = 0
        # TWS's Read-Only API (error 321): orders and cancels are refused until it is switched off.
        self.read_only = False
        self.read_only_probe_s = 5.0
        self._read_only_task: asyncio.Task[None] | None = None
        self._messages_per_second = messages_per_second
        self._kill_reserve = kill_reserve
        self._loop: asyncio.AbstractEventLoop | None = None
        self._sender: PacedSender | None = None
        self._events: asyncio.Queue[object] = asyncio.Queue()
        self._session: _IbSession | None = None
        self._attempt: _IbSession | None = None  # the latest connect attempt's session
        self._sessions = itertools.count(1)
        self._req_ids = itertools.count(DATA_REQ_ID_BASE)
        self._lost = asyncio.Event()
        self._reconnect_task: asyncio.Task[None] | None = None
        self._stopping = False
        self._stopped = False
        self._watched: set[ev.ConId] = set()
        self._closing: frozenset[ev.ConId] = frozenset()  # contracts a close is working on
        self._exchanges: dict[ev.ConId, str] = {}
        self._threads: list[threading.Thread] = []
        self.pacing_violations = 0
        self.reconnects = 0
        # Asking again for positions whose quantity arrived unset (see the module doc).
        self.positions_retry_s = POSITIONS_RETRY_S
        self.positions_retry_max_s = POSITIONS_RETRY_MAX_S
        self.positions_retries = POSITIONS_RETRIES
        self.positions_rerequests = 0

    # ---- lifecycle -------------------------------------------------------------------------

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        assert self._loop is not None, "IbBroker is used outside `async with`"
        return self._loop

    @property
    def connected(self) -> bool:
        """True while a session is up and announced (`Connected` emitted, not yet dropped)."""
        return self._session is not None and self._session.announced

    async def __aenter__(self) -> IbBroker:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def alive(self) -> bool:
        """True while the adapter keeps its promise of a next sign of life (see the module doc):
        it answers "is the adapter working?", not "is IB up?"."""
        if self._stopped or self._alive_until is None:
            return True  # not started, or stopped on purpose: nothing is due
        task = self._reconnect_task
        if task is not None and task.done():
            return False  # nothing would ever reconnect
        if self.heartbeat_interval_s is None and self.connected:
            return True  # without a heartbeat a quiet session cannot be told from a dead one
        return time.monotonic() <= self._alive_until

    def _expect_progress(self, within_s: float) -> None:
        self._alive_until = time.monotonic() + within_s + self.progress_slack_s

    def _heard(self) -> None:
        """A message of the live session arrived: the next one is due within a heartbeat."""
        interval = self.heartbeat_interval_s
        if interval is not None:
            self._expect_progress(interval + self.heartbeat_timeout_s)

    async def connect(self) -> None:
        """Connect, retrying with the reconnect back-off until connected, then keep the
        connection alive (as `start`). Only AccountNotManagedError is raised: the login does not
        manage the account, which no retry mends. Cancel it to give up (bounded, see `stop`)."""
        attempt = 0
        while True:
            try:
                await self.start()
                return
            except AccountNotManagedError:
                raise
            except BrokerConnectError as exc:
                # Not fatal: the gateway may be restarting (it does every night).
                attempt += 1
                delay = reconnect_delay(
                    attempt,
                    exc,
                    initial_s=self.reconnect_initial_s,
                    max_s=self.reconnect_max_s,
                    client_id_in_use_s=self.client_id_in_use_wait_s,
                    jitter=random.random(),
                )
                log.warning(
                    "ib_connect_failed", error=str(exc), attempt=attempt, retry_in_s=round(delay, 3)
                )
                self._expect_progress(delay)
                await asyncio.sleep(delay)

    async def start(self) -> None:
        """Connect once (raising BrokerConnectError on failure), then keep the connection alive."""
        self._loop = asyncio.get_running_loop()
        self._sender = PacedSender(self._messages_per_second, kill_reserve=self._kill_reserve)
        self._sender.start()
        try:
            await self._connect_once()
        except BaseException:
            await self._sender.stop()
            # A refused or abandoned attempt leaves no ibapi thread behind (bounded).
            await self._join_threads(self._attempt)
            raise
        self._reconnect_task = asyncio.create_task(self._reconnect_loop(), name="ib_reconnect_loop")

    async def stop(self) -> None:
        """Disconnect, end the reconnect loop and the sender, join the ibapi threads."""
        if self._stopped:
            return
        self._stopping = True
        task, self._reconnect_task = self._reconnect_task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await _cancelled(self._read_only_task)
        session = self._session
        if session is not None:
            session.abort()
            await _cancelled(session.heartbeat_task)
            await _cancelled(session.positions_retry_task)
        if self._sender is not None:
            await self._sender.stop()
        await self._join_threads(session, self._attempt)
        if session is not None and self._session is session:
            self._end_session(session, "stopped")
        self._stopped = True
        self._events.put_nowait(_SENTINEL)
        log.info("broker_stopped", client_id=self.client_id)

    async def events(self) -> AsyncIterator[ev.BrokerEvent]:
        """Every BrokerEvent in arrival order, until the broker stops."""
        while True:
            item = await self._events.get()
            if item is _SENTINEL:
                self._events.put_nowait(_SENTINEL)  # a second reader ends too
                return
            yield cast(ev.BrokerEvent, item)

    # ---- connecting ------------------------------------------------------------------------

    def _spawn_thread(self, target: Callable[[], None], name: str) -> threading.Thread:
        thread = threading.Thread(target=target, name=name, daemon=True)
        self._threads = [t for t in self._threads if t.is_alive()]
        self._threads.append(thread)
        thread.start()
        return thread

    async def _join_threads(
        self, *sessions: _IbSession | None, timeout_s: float = JOIN_TIMEOUT_S
    ) -> None:
        """Wait at most `timeout_s` for the ibapi threads to end, closing `sessions`' sockets
        again while waiting (a connect thread may open its socket after a first close found
        none); a thread still alive then is a daemon, logged and left behind."""
        threads, self._threads = self._threads, []
        alive = [t for t in threads if t.is_alive()]
        deadline = time.monotonic() + timeout_s
        while alive and time.monotonic() < deadline:
            for session in sessions:
                if session is not None:
                    session.abort()
            await asyncio.sleep(0.01)
            alive = [t for t in alive if t.is_alive()]
        stuck = [t.name for t in alive if t.is_alive()]
        if stuck:
            log.warning("ibapi_threads_not_joined", threads=stuck)
            self._threads.extend(t for t in alive if t.is_alive())

    async def _connect_once(self) -> None:
        """One attempt: handshake, run thread, managedAccounts and nextValidId, resubscribe."""
        session = _IbSession(self, next(self._sessions))
        self._attempt = session
        deadline = self.loop.time() + self.connect_timeout_s
        handshake: asyncio.Future[None] = self.loop.create_future()
        self._expect_progress(self.connect_timeout_s + ABORT_GRACE_S)

        def do_connect() -> None:
            exc: BaseException | None = None
            try:
                session.connect(self.host, self.port, self.client_id)
            except Exception as err:  # ibapi raises on odd states; report it to the loop
                exc = err
            with contextlib.suppress(RuntimeError):
                self.loop.call_soon_threadsafe(_settle, handshake, exc)

        log.info("broker_connecting", host=self.host, port=self.port, client_id=self.client_id)
        connect_thread = self._spawn_thread(do_connect, f"ibapi-connect-{self.client_id}")
        try:
            done, _ = await asyncio.wait({handshake}, timeout=self.connect_timeout_s)
        except BaseException:  # cancelled (stopping): end the blocking handshake now
            session.abort()
            raise
        if not done:
            session.abort()
            await asyncio.wait({handshake}, timeout=2.0)
            await asyncio.to_thread(connect_thread.join, 0.5)
            raise BrokerConnectError(
                f"no API handshake from {self.host}:{self.port} within {self.connect_timeout_s} s"
            )
        if (exc := handshake.exception()) is not None:
            raise BrokerConnectError(f"cannot connect to {self.host}:{self.port}: {exc}") from exc
        if session.connState != EClient.CONNECTED:  # the handshake itself failed
            detail = session.last_error[1] if session.last_error else "connection failed"
            raise BrokerConnectError(f"cannot connect to {self.host}:{self.port}: {detail}")
        # Even if the socket has closed already (error 326 then close), the run thread decodes
        # what was received, and its end settles `session.ready`.

        self._session = session
        session.run_thread = self._spawn_thread(
            lambda: self._run_session(session), f"ibapi-run-{self.client_id}"
        )
        if session.reader is not None:  # ibapi's EReader thread
            self._threads.append(session.reader)
        try:
            remaining = max(0.0, deadline - self.loop.time())
            await asyncio.wait_for(asyncio.shield(session.ready), remaining)
        except TimeoutError as exc:
            self._give_up(session)
            raise BrokerConnectError(
                f"no managedAccounts / nextValidId within {self.connect_timeout_s} s"
            ) from exc
        except BaseException:
            self._give_up(session)
            raise
        log.info(
            "broker_connected",
            client_id=self.client_id,
            server_version=session.serverVersion(),
            accounts=list(session.managed or ()),
            next_order_id=session.next_id,
        )
        self._resubscribe(session)
        # The gateway's clock at once: market hours are judged at its time.
        self._request(session, Lane.NORMAL, "reqCurrentTime", lambda s: s.reqCurrentTime())
        if self.heartbeat_interval_s is not None:
            session.heartbeat_task = asyncio.create_task(
                self._heartbeat_loop(session), name="ib_heartbeat_loop"
            )

    async def _heartbeat_loop(self, session: _IbSession) -> None:
        """Send reqCurrentTime every interval; drop the session when nothing answers in time.

        The timeout counts from the moment the request was written to the socket, so a paced
        queue full of kill-lane work never passes for a dead connection; any message after the
        write counts as an answer (a gateway busy streaming is alive).
        """
        interval = self.heartbeat_interval_s
        assert interval is not None
        timeout = self.heartbeat_timeout_s
        while self._session is session:
            await asyncio.sleep(interval)
            if self._session is not session:
                return
            session.heard.clear()  # before the write, so a quick answer is never missed
            sent = self._request(
                session, Lane.NORMAL, "reqCurrentTime", lambda s: s.reqCurrentTime()
            )
            try:
                await sent
            except GuarddError:
                return  # the session is already gone
            try:
                await asyncio.wait_for(session.heard.wait(), timeout)
            except TimeoutError:
                if self._session is not session:
                    return
                self.heartbeat_failures += 1
                session.drop_reason = f"no answer to a heartbeat within {timeout:g} s"
                log.error(
                    "ib_heartbeat_missed",
                    timeout_s=timeout,
                    client_id=self.client_id,
                    total=self.heartbeat_failures,
                )
                session.abort()  # the run thread ends; the reconnect loop takes over
                return

    def _give_up(self, session: _IbSession) -> None:
        session.abort()
        if self._session is session:
            self._end_session(session, "connect attempt abandoned")

    def _run_session(self, session: _IbSession) -> None:
        """Target of the run thread: decode until the socket closes, then tell the loop."""
        try:
            session.run()
        except Exception as exc:  # e.g. a message decoded after ibapi reset its state
            log.warning("ibapi_run_failed", error=repr(exc))
        finally:
            with contextlib.suppress(RuntimeError):
                self.loop.call_soon_threadsafe(self._on_session_ended, session)

    def _on_session_ended(self, session: _IbSession) -> None:
        if not session.ready.done():
            code, text = session.last_error or (0, "connection closed during the handshake")
            error_type = ClientIdInUseError if code == CLIENT_ID_IN_USE else BrokerConnectError
            session.ready.set_exception(error_type(f"IB error {code}: {text}"))
        if self._session is session:
            reason = "connection closed"
            if self._stopping:
                reason = "stopped"
            elif session.drop_reason is not None:
                reason = session.drop_reason
            elif session.last_error is not None:
                reason = f"connection closed after IB error {session.last_error[0]}"
            was_up = session.announced
            self._end_session(session, reason)
            if was_up and not self._stopping:
                self._lost.set()  # a failed attempt is retried by the attempt's own caller

    def _end_session(self, session: _IbSession, reason: str) -> None:
        self._session = None
        for task in (session.heartbeat_task, session.positions_retry_task):
            if task is not None and task is not asyncio.current_task():
                task.cancel()
        if session.announced:
            self._emit(ev.Disconnected(reason=reason, ts=self.clock()))
            log.warning("broker_disconnected", reason=reason, client_id=self.client_id)
        if self._sender is not None:
            self._sender.fail_pending(reason)

    def _backoff(self, state: RetryCallState) -> float:
        outcome = state.outcome
        return reconnect_delay(
            state.attempt_number,
            outcome.exception() if outcome is not None else None,
            initial_s=self.reconnect_initial_s,
            max_s=self.reconnect_max_s,
            client_id_in_use_s=self.client_id_in_use_wait_s,
            jitter=random.random(),
        )

    async def _reconnect_loop(self) -> None:
        """Wait for a lost session and connect again, backing off, for as long as we run."""
        while True:
            await self._lost.wait()
            self._lost.clear()
            retrying = AsyncRetrying(
                wait=self._backoff,
                retry=retry_if_exception_type(Exception),  # log, back off, never give up
                stop=stop_never,
                before_sleep=self._log_retry,
                reraise=True,
            )
            try:
                async for attempt in retrying:
                    with attempt:
                        await self._connect_once()
            except Exception as exc:  # a bug in the retry machinery must not end the guard
                log.exception("broker_reconnect_loop_failed", error=repr(exc))
                self._expect_progress(self.reconnect_max_s)
                await asyncio.sleep(self.reconnect_max_s)
                self._lost.set()
                continue
            self.reconnects += 1

    def _log_retry(self, state: RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome is not None else None
        sleep = state.next_action.sleep if state.next_action is not None else 0.0
        self._expect_progress(sleep)  # the back-off promises the next attempt
        log.warning(
            "broker_reconnect_failed",
            attempt=state.attempt_number,
            error=str(exc),
            retry_in_s=sleep,
        )

    # ---- callbacks on the loop -------------------------------------------------------------

    def _emit(self, event: ev.BrokerEvent) -> None:
        self._events.put_nowait(event)

    def _on_item(self, session: _IbSession, item: object) -> None:
        """Handle one bridged callback on the event loop, in the order the ibapi thread saw it."""
        if session is not self._session:
            if isinstance(item, ev.BrokerError):
                session.last_error = (item.code, item.message)
            return  # a late message of a session we already gave up
        session.heard.set()
        match item:
            case _Pong(epoch_s=epoch_s, ts=ts):
                # An answer without its time field arrives from ibapi as 0: no time, not 1970
                # (it would put the gateway's clock 56 years behind and misjudge market hours).
                if epoch_s > 0:
                    self._emit(ev.ServerTime(server_time=float(epoch_s), ts=ts))
            case _HoursUnreadable(con_id=con_id, why=why):
                log.warning("contract_hours_unreadable", con_id=con_id, error=why)
            case _Accounts(accounts=accounts):
                session.managed = accounts
                self._maybe_announce(session)
            case _NextId(order_id=order_id):
                if session.first_order_id is None:
                    session.first_order_id = order_id
                    session.next_id = order_id
                    self._maybe_announce(session)
                else:  # an answer to reqIds: never go below what this session already used
                    session.next_id = max(session.next_id or order_id, order_id)
                waiters, session.id_waiters = session.id_waiters, []
                for waiter in waiters:
                    _settle(waiter, None)
            case ev.BrokerError():
                self._on_error(session, item)
            case ev.OpenOrder() | ev.OrderStatus() | ev.Execution():
                self._saw_order_id(item.order_id)
                self._emit(item)
            case ev.PositionUpdate():
                # IB's position() often leaves the exchange empty: FX is on IDEALPRO only
                fx = item.sec_type == "CASH"
                self._exchanges.setdefault(item.con_id, item.exchange or ("IDEALPRO" if fx else ""))
                self._emit(item)
                if item.account == self.account:
                    if session.relist is not None:
                        session.relist[1].add(item.con_id)
                    self._position_quantity(session, item)
                if item.account == self.account and item.con_id not in session.pnl_single_con:
                    self._request_position_value(session, item.con_id)
                if item.account == self.account and item.con_id not in session.hours_con:
                    self._request_hours(session, item.con_id)
            case ev.PositionsEnd():
                self._positions_end(session, item)
            case _:
                self._emit(cast(ev.BrokerEvent, item))

    def _positions_end(self, session: _IbSession, item: ev.PositionsEnd) -> None:
        """positionEnd: the end of a download; the one asked for again says which contracts
        IB still lists (an unknown position it leaves out is no longer held)."""
        self._emit(item)
        session.positions_ends += 1
        relist = session.relist
        if relist is None or relist[0] != session.positions_ends:
            return
        session.relist = None
        listed = frozenset(relist[1])
        self._emit(ev.PositionsListed(account=self.account, con_ids=listed, ts=item.ts))
        for con_id in [c for c in session.unknown_positions if c not in listed]:
            symbol = session.unknown_positions.pop(con_id)
            log.warning("position_not_listed", con_id=con_id, symbol=symbol)
        if not session.unknown_positions:
            session.positions_retries = 0

    def _position_quantity(self, session: _IbSession, item: ev.PositionUpdate) -> None:
        """Track positions of the guarded account whose quantity arrived unset; ask again."""
        con_id = item.con_id
        if math.isnan(item.quantity):
            if con_id not in session.unknown_positions:
                session.unknown_positions[con_id] = item.symbol
                log.warning("position_quantity_unknown", con_id=con_id, symbol=item.symbol)
            self._schedule_positions_retry(session)
            return
        if session.unknown_positions.pop(con_id, None) is None:
            return
        log.warning(
            "position_quantity_known", con_id=con_id, symbol=item.symbol, quantity=item.quantity
        )
        if not session.unknown_positions:
            session.positions_retries = 0  # a later unset quantity gets the whole bound again

    def _schedule_positions_retry(self, session: _IbSession) -> None:
        task = session.positions_retry_task
        if task is not None and not task.done():
            return
        if session.positions_retries >= self.positions_retries:
            return  # exhausted on this connection (said once, by the loop)
        session.positions_retry_task = asyncio.create_task(
            self._positions_retry_loop(session), name="ib_positions_retry_loop"
        )

    async def _positions_retry_loop(self, session: _IbSession) -> None:
        """reqPositions again, backing off, while a position quantity of the guarded account is
        unknown (at most `positions_retries` times per connection)."""
        while self._session is session and session.unknown_positions:
            if session.positions_retries >= self.positions_retries:
                log.error(
                    "positions_retries_exhausted",
                    con_ids=sorted(session.unknown_positions),
                    symbols=sorted(set(session.unknown_positions.values())),
                    retries=session.positions_retries,
                )
                return
            delay = min(
                self.positions_retry_max_s,
                self.positions_retry_s * 2.0 ** min(session.positions_retries, 30),
            )
            await asyncio.sleep(delay)
            if self._session is not session or not session.unknown_positions:
                return
            session.positions_retries += 1
            self.positions_rerequests += 1
            unknown = sorted(session.unknown_positions)
            log.warning(
                "positions_rerequested",
                con_ids=unknown,
                symbols=sorted(set(session.unknown_positions.values())),
                attempt=session.positions_retries,
                of=self.positions_retries,
                after_s=delay,
            )
            # A close waiting for the figure gets it ahead of other subscriptions.
            lane = Lane.CLOSE_DATA if self._closing & set(unknown) else Lane.NORMAL

            def relist(s: _IbSession) -> None:
                _req_positions(s)
                s.relist = (s.positions_requests, set())

            try:
                await self._request(session, lane, "reqPositions", relist)
            except GuarddError:
                return  # the session is gone; the next one downloads positions afresh

    async def refresh_positions(self) -> None:
        """reqPositions again because a close doubts a position figure (it disagrees with every
        fill the guard knows): on `Lane.CLOSE_DATA`, ahead of other subscriptions."""
        session = self._live_session("refresh_positions")
        log.warning("positions_rerequested", why="close_figure_disagrees")

        def relist(s: _IbSession) -> None:
            _req_positions(s)
            s.relist = (s.positions_requests, set())

        await self._request(session, Lane.CLOSE_DATA, "reqPositions", relist)

    def _maybe_announce(self, session: _IbSession) -> None:
        if session.managed is None or session.first_order_id is None or session.ready.done():
            return
        if self.account not in session.managed:
            session.ready.set_exception(
                AccountNotManagedError(
                    f"account {self.account} is not managed by this login "
                    f"(managedAccounts: {', '.join(session.managed) or 'none'}); "
                    "reqGlobalCancel reaches every account of a login: run one guardd per login"
                )
            )
            return
        session.announced = True
        self._emit(
            ev.Connected(
                server_version=int(session.serverVersion() or 0),
                managed_accounts=session.managed,
                next_order_id=session.first_order_id,
                ts=self.clock(),
            )
        )
        session.ready.set_result(None)

    def _saw_order_id(self, order_id: int) -> None:
        if 0 < order_id < READ_ONLY_PROBE_ID:
            self.highest_order_id_seen = max(self.highest_order_id_seen, int(order_id))

    def _on_error(self, session: _IbSession, error: ev.BrokerError) -> None:
        code = error.code
        if code not in NOTICES:
            session.last_error = (code, error.message)
        if error.req_id == READ_ONLY_PROBE_ID:
            self._on_probe_answer(error)
            return
        if code == READ_ONLY and "read-only" in error.message.lower():
            self._read_only_seen(error)
        match code:
            case 1100:
                log.warning("ib_connectivity_lost", code=code, message=error.message)
                self._emit(ev.ConnectivityLost(ts=error.ts))
            case 2110:
                log.warning("ib_server_connectivity_broken", code=code, message=error.message)
                self._emit(ev.ConnectivityLost(ts=error.ts))
            case 1101 | 1102:
                data_lost = code == RESTORED_DATA_LOST
                log.warning("ib_connectivity_restored", code=code, data_lost=data_lost)
                self._emit(ev.ConnectivityRestored(data_lost=data_lost, ts=error.ts))
                if data_lost and session.announced:
                    self._resubscribe(session)
            case 100:
                self.pacing_violations += 1
                log.error(
                    "ib_pacing_violated",
                    total=self.pacing_violations,
                    message=error.message,
                    client_id=self.client_id,
                )
                self._emit(error)
            case 326:
                log.error("ib_client_id_in_use", client_id=self.client_id, message=error.message)
                self._emit(error)
            case 504:
                log.warning("ib_not_connected", message=error.message)
                self._emit(error)
                session.abort()  # the run thread ends and the reconnect loop takes over
            case _:
                if code in NOTICES:
                    log.info("ib_notice", code=code, message=error.message)
                else:
                    log.warning("ib_error", req_id=error.req_id, code=code, message=error.message)
                self._emit(error)

    # ---- Read-only API ---------------------------------------------------------------------

    def _read_only_seen(self, error: ev.BrokerError) -> None:
        """Error 321 "... Read-Only mode": say so once, then probe until it is switched off."""
        if self.read_only:
            return
        self.read_only = True
        log.error(
            "ib_read_only",
            code=error.code,
            req_id=error.req_id,
            message=error.message,
            client_id=self.client_id,
        )
        self._emit(ev.ApiReadOnly(read_only=True, ts=error.ts))
        if self._read_only_task is None or self._read_only_task.done():
            self._read_only_task = asyncio.create_task(
                self._read_only_probe_loop(), name="ib_read_only_probe_loop"
            )

    def _on_probe_answer(self, error: ev.BrokerError) -> None:
        if error.code == READ_ONLY:
            return  # still read-only
        if self.read_only:
            # Any other answer (10147: not found) means the cancel was taken up as usual.
            self.read_only = False
            log.warning("ib_read_only_lifted", code=error.code, client_id=self.client_id)
            self._emit(ev.ApiReadOnly(read_only=False, ts=error.ts))

    async def _read_only_probe_loop(self) -> None:
        """While read-only, every `read_only_probe_s` cancel an order that never exists: 321
        means still read-only, 10147 (not found) that orders and cancels work again."""
        while self.read_only and not self._stopping:
            await asyncio.sleep(self.read_only_probe_s)
            session = self._session
            if session is None or not session.announced or not self.read_only:
                continue
            with contextlib.suppress(GuarddError):
                await self._request(
                    session,
                    Lane.NORMAL,
                    "cancelOrder read-only probe",
                    lambda s: s.cancelOrder(READ_ONLY_PROBE_ID, OrderCancel()),
                )

    # ---- subscriptions ---------------------------------------------------------------------

    def _request(
        self, session: _IbSession, lane: Lane, label: str, call: Callable[[_IbSession], None]
    ) -> asyncio.Future[None]:
        """Queue one ibapi request for `session` on the paced sender."""
        assert self._sender is not None

        def send() -> None:
            if session is not self._session or not session.isConnected():
                raise BrokerDisconnectedError(f"{label}: not connected to IB")
            call(session)

        return self._sender.submit(lane, label, send)

    def _resubscribe(self, session: _IbSession) -> None:
        """Everything the Book needs after a (re)connect or a 1101; both barriers follow."""
        session.pnl_req.clear()
        session.pnl_single_req.clear()
        session.pnl_single_con.clear()
        session.tick_req.clear()
        session.price_requests.clear()
        session.stale_data_req.clear()
        account = self.account
        pnl_id = next(self._req_ids)
        session.pnl_req[pnl_id] = account
        exec_id = next(self._req_ids)
        normal = Lane.NORMAL
        # A close in progress waits for the positions, open-orders and executions downloads:
        # they go ahead of every subscription then.
        sync = Lane.CLOSE_DATA if self._closing else Lane.NORMAL
        self._request(session, sync, "reqPositions", _req_positions)
        self._request(session, sync, "reqAllOpenOrders", lambda s: s.reqAllOpenOrders())
        self._request(
            session, sync, "reqExecutions", lambda s: s.reqExecutions(exec_id, ExecutionFilter())
        )
        self._request(
            session, normal, "reqAccountUpdates", lambda s: s.reqAccountUpdates(True, account)
        )
        self._request(session, normal, "reqPnL", lambda s: s.reqPnL(pnl_id, account, ""))
        for con_id in sorted(self._watched):
            self._request_prices(session, con_id)

    def _request_position_value(self, session: _IbSession, con_id: ev.ConId) -> None:
        req_id = next(self._req_ids)
        session.pnl_single_req[req_id] = con_id
        session.pnl_single_con.add(con_id)
        account = self.account
        self._request(
            session,
            Lane.NORMAL,
            "reqPnLSingle",
            lambda s: s.reqPnLSingle(req_id, account, "", con_id),
        )

    def _request_hours(self, session: _IbSession, con_id: ev.ConId) -> None:
        """contractDetails of a position's contract, for its market hours (once a connection:
        IB's hours cover about a week, and the gateway's daily reset brings a new connection)."""
        req_id = next(self._req_ids)
        session.hours_req[req_id] = con_id
        session.hours_con.add(con_id)
        contract = Contract()
        contract.conId = con_id
        contract.exchange = self._exchanges.get(con_id) or "SMART"
        self._request(
            session,
            Lane.NORMAL,
            "reqContractDetails",
            lambda s: s.reqContractDetails(req_id, contract),
        )

    def _request_prices(self, session: _IbSession, con_id: ev.ConId) -> None:
        req_id = next(self._req_ids)
        session.tick_req[req_id] = con_id
        contract = Contract()
        contract.conId = con_id
        contract.exchange = self._exchanges.get(con_id) or "SMART"
        # The price of a position being closed is what its close orders are priced from.
        lane = Lane.CLOSE_DATA if con_id in self._closing else Lane.NORMAL
        session.price_requests[con_id] = self._request(
            session,
            lane,
            "reqMktData",
            lambda s: s.reqMktData(req_id, contract, "", False, False, []),
        )

    def closing(self, con_ids: Iterable[int]) -> None:
        """The contracts a close is working on now (empty: no close). Their prices are watched,
        and their price requests (and, after a reconnect, the downloads a close waits for) go on
        `Lane.CLOSE_DATA`, ahead of every other subscription: a flood of other requests never
        starves a close of its prices. A price request still queued on NORMAL is moved ahead."""
        closing = frozenset(ev.ConId(int(c)) for c in con_ids if int(c))
        new = closing - self._closing
        self._closing = closing
        session = self._session
        live = session is not None and session.announced
        for con_id in sorted(new):
            if con_id not in self._watched:
                self._watched.add(con_id)
                if live:
                    assert session is not None
                    self._request_prices(session, con_id)
                continue
            queued = session.price_requests.get(con_id) if session is not None else None
            if live and queued is not None and not queued.done():
                assert session is not None
                queued.cancel()  # the sender skips it; the same request goes ahead instead
                self._request_prices(session, con_id)

    def watch_prices(
        self, con_ids: Iterable[int], *, exchanges: dict[int, str] | None = None
    ) -> None:
        """Stream bid/ask/last for these contracts, now and after every reconnect.

        The exchange for reqMktData is taken from `exchanges`, else from the contract's position,
        else SMART.
        """
        for con_id, exchange in (exchanges or {}).items():
            self._exchanges[ev.ConId(con_id)] = exchange
        session = self._session
        for raw in con_ids:
            con_id = ev.ConId(raw)
            if con_id in self._watched:
                continue
            self._watched.add(con_id)
            if session is not None and session.announced:
                self._request_prices(session, con_id)

    # ---- requests --------------------------------------------------------------------------

    def _live_session(self, what: str) -> _IbSession:
        session = self._session
        if session is None or not session.announced:
            raise BrokerDisconnectedError(f"{what}: not connected to IB")
        return session

    def reserve_order_ids(self, order_ids: Iterable[int]) -> None:
        """Never hand out these ids (e.g. child orders a previous life of the guard journaled:
        they may be working at the gateway under our client id, or may arrive there late)."""
        for order_id in order_ids:
            if int(order_id) > 0:
                self._saw_order_id(int(order_id))

    def next_order_id(self) -> ev.OrderId:
        """A fresh order id: this session's nextValidId, or above every order id seen from any
        client when that is higher (IB refuses a Master API client's id that is not above every
        id reported to it, error 103; ids roll back after a gateway restart, and re-using a
        working order's id would modify it)."""
        session = self._live_session("next_order_id")
        assert session.next_id is not None
        order_id = session.next_id
        floor = self.highest_order_id_seen + 1
        if order_id < floor:
            self.order_ids_skipped += floor - order_id
            log.warning("order_ids_behind", next_valid_id=order_id, using=floor)
            order_id = floor
        session.next_id = order_id + 1
        return ev.OrderId(order_id)

    async def refresh_order_ids(self, lane: Lane = Lane.FLATTEN) -> None:
        """Ask the gateway for the next valid id (reqIds) and wait, at most
        `ORDER_IDS_TIMEOUT_S`, for the answer: `next_order_id` then goes by it. For when an id
        was refused (103) or is in doubt; a missing answer leaves the ids as they were."""
        session = self._live_session("refresh_order_ids")
        waiter: asyncio.Future[None] = self.loop.create_future()
        session.id_waiters.append(waiter)
        try:
            await self._request(session, lane, "reqIds", lambda s: s.reqIds(-1))
            await asyncio.wait_for(asyncio.shield(waiter), ORDER_IDS_TIMEOUT_S)
        except TimeoutError:
            log.warning("order_ids_not_answered", timeout_s=ORDER_IDS_TIMEOUT_S)
        finally:
            if waiter in session.id_waiters:
                session.id_waiters.remove(waiter)

    async def place_order(
        self,
        order_id: int,
        *,
        con_id: int = 0,
        symbol: str = "",
        sec_type: str = "STK",
        exchange: str = "SMART",
        currency: str = "USD",
        last_trade_date: str = "",
        multiplier: str = "",
        local_symbol: str = "",
        action: str,
        quantity: Decimal | float,
        order_type: str,
        lmt_price: float | None = None,
        order_ref: str = "",
        outside_rth: bool = False,
        account: str | None = None,
        tif: str = "DAY",
        lane: Lane,
    ) -> None:
        """Send one order (paced on `lane`); returns once it has been written to the socket."""
        session = self._live_session("place_order")
        self._saw_order_id(int(order_id))
        contract = _order_contract(
            con_id=con_id,
            symbol=symbol,
            sec_type=sec_type,
            exchange=exchange,
            currency=currency,
            last_trade_date=last_trade_date,
            multiplier=multiplier,
            local_symbol=local_symbol,
        )
        order = Order()
        order.action = action
        order.totalQuantity = quantity if isinstance(quantity, Decimal) else Decimal(str(quantity))
        order.orderType = order_type
        if lmt_price is not None:
            order.lmtPrice = lmt_price
        order.orderRef = order_ref
        order.outsideRth = outside_rth
        order.account = account or self.account
        order.tif = tif
        order.transmit = True
        log.info(
            "order_sending",
            order_id=order_id,
            symbol=symbol,
            con_id=con_id,
            action=action,
            quantity=str(quantity),
            order_type=order_type,
            lmt_price=lmt_price,
            order_ref=order_ref,
            lane=lane.name,
        )
        await self._request(
            session,
            lane,
            f"placeOrder {order_id}",
            lambda s: s.placeOrder(order_id, contract, order),
        )

    async def cancel_order(self, order_id: int, lane: Lane) -> None:
        """Cancel one of guardd's own orders by id (foreign orders need `global_cancel`)."""
        session = self._live_session("cancel_order")
        await self._request(
            session,
            lane,
            f"cancelOrder {order_id}",
            lambda s: s.cancelOrder(order_id, OrderCancel()),
        )

    async def global_cancel(self) -> None:
        """reqGlobalCancel on the kill lane: every open order of the login, every client's."""
        session = self._live_session("global_cancel")
        log.warning("global_cancel_sending", client_id=self.client_id)
        await self._request(
            session, Lane.KILL, "reqGlobalCancel", lambda s: s.reqGlobalCancel(OrderCancel())
        )


def _req_positions(session: _IbSession) -> None:
    """reqPositions, counted (`positions_requests`: positionEnd answers them in order)."""
    session.reqPositions()
    session.positions_requests += 1


async def _cancelled(task: asyncio.Task[None] | None) -> None:
    """Cancel a task and wait for it to end."""
    if task is None or task.done():
        return
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


def _settle(future: asyncio.Future[None], exc: BaseException | None) -> None:
    if future.done():
        return
    if exc is None:
        future.set_result(None)
    else:
        future.set_exception(exc)
