"""One connection to the gateway: an ibapi client that is its own wrapper, driven by the loop.

The socket is read by asyncio (`SessionProtocol`); frames are cut and decoded with ibapi's own
helpers and `Decoder` on the event loop (`guardd.broker.wire`), and requests are written through
the transport (`TransportConnection` stands in for ibapi's socket `Connection`, so EClient's
request methods work unchanged). No ibapi thread runs.

Each callback becomes a BrokerEvent (by `guardd.broker.convert`) or an internal note, stamped
with the owner's clock and handed to the owner in order, once per slice of decoded frames
(`SessionOwner.on_items`). A slice is at most `FRAMES_PER_TURN` frames and ends early once it
has taken `TURN_BUDGET_S`: a long backlog yields the loop between slices, so an HTTP kill or an
MQTT command is served while a flood is decoded, after at most about one budget.
The owner can `hold` the session (bounded buffer full): reading pauses, TCP pushes back on the
gateway, and nothing is dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, Final, Protocol

import structlog
from ibapi import errors as ibapi_errors
from ibapi.client import EClient
from ibapi.const import NO_VALID_ID
from ibapi.contract import Contract
from ibapi.decoder import Decoder
from ibapi.errors import BAD_LENGTH
from ibapi.order import Order
from ibapi.utils import BadMessage, currentTimeMillis
from ibapi.wrapper import EWrapper

from guardd.broker import convert, wire
from guardd.broker.hours import HoursFormatError
from guardd.core import events as ev

SEND_FAILURES = frozenset(
    error.code() for name, error in vars(ibapi_errors).items() if name.startswith("FAIL_SEND")
)
"""ibapi's codes for a request it could not write to the socket (538: reqGlobalCancel)."""
log = structlog.get_logger("guardd.broker.ib")

FRAMES_PER_TURN: Final = 256
"""At most this many frames are decoded before the loop gets a turn."""
TURN_BUDGET_S: Final = 0.001
"""A slice ends once it has decoded for this long (checked every FRAMES_PER_CHECK frames): the
loop's longest stretch in the decoder, whatever a frame costs on this machine."""
FRAMES_PER_CHECK: Final = 16


class SessionOwner(Protocol):
    """What a session needs of the broker that runs it."""

    account: str
    clock: Callable[[], float]

    @property
    def loop(self) -> asyncio.AbstractEventLoop: ...

    def on_items(self, session: IbSession, items: list[object]) -> None:
        """Callbacks of `session`, in the order they were decoded."""

    def on_session_ended(self, session: IbSession) -> None:
        """The session's socket closed (either side)."""


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


class TransportConnection:
    """What EClient needs of ibapi's `Connection` (`sendMsg`, `isConnected`, `disconnect`), over
    an asyncio transport: a request is written on the loop, never blocking."""

    def __init__(self, transport: asyncio.Transport) -> None:
        self.transport = transport

    def isConnected(self) -> bool:
        return not self.transport.is_closing()

    @property
    def socket(self) -> Any:
        """The transport's socket (asyncio's view of it), as ibapi's Connection exposes its own."""
        return self.transport.get_extra_info("socket")

    def sendMsg(self, msg: bytes) -> int:
        if self.transport.is_closing():
            return 0  # as ibapi's Connection: nothing sent, no error
        self.transport.write(msg)
        if self.transport.is_closing():
            # The socket refused the write (asyncio closes the transport). ibapi's Connection
            # raises here; EClient turns it into its FAIL_SEND error for the request.
            raise OSError(f"the socket refused {len(msg)} bytes")
        return len(msg)

    def disconnect(self) -> None:
        self.transport.abort()


class SessionProtocol(asyncio.Protocol):
    """The asyncio side of one session's socket."""

    def __init__(self, session: IbSession) -> None:
        self.session = session

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.session.attach(transport)

    def data_received(self, data: bytes) -> None:
        self.session.feed(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.session.lost(exc)


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
        # The handshake's answer (server version and connection time) arrived.
        self.handshaken: asyncio.Future[None] = owner.loop.create_future()
        self.handshaken.add_done_callback(lambda f: None if f.cancelled() else f.exception())
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
        # reqIds whose data IB switched to frozen or delayed (marketDataType).
        self.stale_data_req: set[int] = set()
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
        self.transport: asyncio.Transport | None = None
        self.ended = False
        self._buf = bytearray()  # read from the socket, not framed yet
        self._items: list[object] = []  # callbacks decoded, not handed to the owner yet
        self._flush_scheduled = False
        self._held = False  # the owner's buffer is full: read nothing more
        self._slice_scheduled = False

    # ---- the socket, on the loop -----------------------------------------------------------

    def attach(self, transport: asyncio.Transport) -> None:
        """The socket is connected: send the API prefix and the version range (EClient.connect)."""
        self.transport = transport
        self.conn = TransportConnection(transport)
        self.setConnState(EClient.CONNECTING)
        transport.write(wire.hello())

    def feed(self, data: bytes) -> None:
        self._buf += data
        if not self._slice_scheduled:
            self._decode_slice()

    def lost(self, exc: Exception | None) -> None:
        """The socket closed: decode what was read (unless aborted by us), then end."""
        if self.ended:
            return
        if self.connState != EClient.DISCONNECTED:
            while self._buf and self._decode_slice(final=True):
                pass
        self.ended = True
        self.setConnState(EClient.DISCONNECTED)
        if not self.handshaken.done():
            detail = self.last_error[1] if self.last_error else "connection closed"
            self.handshaken.set_exception(ConnectionError(detail))
        self._flush()
        self._owner.on_session_ended(self)

    def hold(self, held: bool) -> None:
        """Pause (True) or resume (False) reading: the owner's bounded buffer is full / has room."""
        if held == self._held:
            return
        self._held = held
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        if held:
            transport.pause_reading()
        elif not self._slice_scheduled:  # decode what is buffered, then read again
            self._slice_scheduled = True
            self._owner.loop.call_soon(self._resume_slice)

    def _decode_slice(self, *, final: bool = False) -> bool:
        """Decode at most FRAMES_PER_TURN frames, for about TURN_BUDGET_S at most; True when
        complete frames may remain."""
        if self._held and not final:
            return False
        deadline = time.perf_counter() + TURN_BUDGET_S
        decoded = 0
        while True:
            chunk = min(FRAMES_PER_CHECK, FRAMES_PER_TURN - decoded)
            try:
                frames = wire.take_frames(self._buf, chunk)
            except wire.FrameTooLongError as exc:
                self.error(
                    NO_VALID_ID, currentTimeMillis(), BAD_LENGTH.code(), f"{BAD_LENGTH.msg()}:{exc}"
                )
                self._buf = bytearray()
                self._flush()
                self.abort()
                return False
            if not self._dispatch(frames):
                return False
            decoded += len(frames)
            more = len(frames) == chunk
            if not more or decoded >= FRAMES_PER_TURN or time.perf_counter() >= deadline:
                break
        self._flush()
        if more and not final:
            transport = self.transport
            if transport is not None and not transport.is_closing():
                transport.pause_reading()  # the loop's turn first; the rest of `_buf` next
                self._slice_scheduled = True
                self._owner.loop.call_soon(self._resume_slice)
        return more

    def _dispatch(self, frames: list[bytes]) -> bool:
        """Decode `frames` in order; False when the session ended on one (aborted)."""
        for payload in frames:
            if self.connState == EClient.DISCONNECTED:
                break  # aborted by a callback (e.g. error 504): nothing more is ours
            if self.decoder is None:
                self._answer_handshake(payload)
                continue
            try:
                wire.dispatch(self.decoder, self.serverVersion_, payload)
            except BadMessage:
                log.info("ibapi_bad_message")  # as EClient.run: skipped
            except Exception as exc:  # a message ibapi cannot decode ends the session
                log.warning("ibapi_decode_failed", error=repr(exc))
                self._flush()
                self.abort()
                return False
        return True

    def _resume_slice(self) -> None:
        self._slice_scheduled = False
        if self.ended:
            return
        more = self._decode_slice()
        transport = self.transport
        if not more and not self._held and transport is not None and not transport.is_closing():
            transport.resume_reading()

    def _answer_handshake(self, payload: bytes) -> None:
        """The frame that carries the server version and connection time completes the
        handshake (anything before it is ignored, as EClient.connect does)."""
        answer = wire.server_hello(payload)
        if answer is None:
            return
        self.serverVersion_, self.connTime = answer
        self.decoder = Decoder(self, self.serverVersion_)
        self.setConnState(EClient.CONNECTED)
        if not self.handshaken.done():
            self.handshaken.set_result(None)

    # ---- bridge ----------------------------------------------------------------------------

    def _post(self, item: object) -> None:
        """Hand one callback to the owner, in order: with the slice being decoded, or (a
        callback outside one, e.g. an EClient request that failed) on the loop's next turn."""
        self._items.append(item)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is listening
                self._owner.loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        if not self._items:
            return
        items, self._items = self._items, []
        self._owner.on_items(self, items)

    def _ts(self) -> float:
        return self._owner.clock()

    def now(self) -> float:
        """The owner's clock: what every event of this session is stamped with."""
        return self._owner.clock()

    def abort(self) -> None:
        """Close the socket at once; what was read and not decoded yet is dropped."""
        self.setConnState(EClient.DISCONNECTED)
        if self.transport is not None:
            self.transport.abort()

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
        if int(errorCode) in SEND_FAILURES:  # during the request, on the loop
            self.send_error = f"{errorCode} {errorString}"
        self._post(convert.broker_message(reqId, errorCode, errorString, self._ts()))

    def connectionClosed(self) -> None:
        pass  # the socket closing is the one signal (IbConnection.on_session_ended)

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
