"""The simulated IB Gateway: an asyncio TCP server speaking the TWS API at server versions 178-226.

The handshake answers min(client's max, the gateway's own max) within the client's range, as TWS
does; from 201 frames carry 4-byte binary message ids, and requests and answers are protobuf
where ibapi sends or decodes them (`messages.PROTOBUF_FROM`, `protocodec.py`), text otherwise
(`codec.py`, laid out per version). ib_async, whose range tops out at 178, gets the text wire.

It owns the pure exchange model (`exchange.py`) and routes what the model emits to the clients that
would see it at a real gateway: an order's events go to the client that placed it and to the Master
API client; positions to every `reqPositions` subscriber; account values to `reqAccountUpdates`
subscribers. Orders live in the gateway, not in a session: a client that disconnects leaves its
orders working, and they are reported again when it reconnects.

Faults (drops, connectivity notices, rejects, delayed or duplicated position updates, price jumps,
margin changes, restarts with order-id rollback, a silent freeze of every connection, the daily
reset, modifications split into new orders during a connectivity loss, broker liquidations,
orders cancelled by someone else while their client is cut off, the Read-only API switch, fields
left out of position, portfolio, pnlSingle and orderStatus messages) are methods of
`SimGateway`; `scenario.py` drives them from a TOML file on a schedule.

Order ids, as TWS keeps them: each client id has its own sequence. A NEW order's id must be above
every id that client has seen (its own accepted orders; for the Master API client also every order
of any client reported to it in openOrder / orderStatus), else error 103 "Duplicate order id";
re-sending the id of one's own working order modifies it. nextValidId (on connect and on reqIds)
is the client's highest seen id + 1. The ids a client has seen outlive its connection; a restart
with `next_order_id` makes the gateway forget them (an id roll-back), while orders stay working.

With a state file (`guardd sim --state FILE`, ibsim/state.py) the account, the orders and
every id sequence outlive the PROCESS: `route` saves before any client hears of a change.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, ClassVar, assert_never

from ibsim import codec, messages, protocodec
from ibsim.exchange import (
    Exchange,
    ExchangeError,
    OrderFilledError,
    OrderNotCancellableError,
    OrderNotFoundError,
)
from ibsim.hours import SimClock
from ibsim.market import Quote
from ibsim.messages import MAX_SERVER_VERSION, MIN_SERVER_VERSION, Outgoing
from ibsim.options import black_scholes, implied_vol
from ibsim.state import StateFile, StateFileError
from ibsim.types import (
    AccountChanged,
    ContractHours,
    ContractSpec,
    Executed,
    Instrument,
    OrderChanged,
    OrderRejected,
    OrderRequest,
    OrderWarning,
    PositionChanged,
    PositionView,
    SimEvent,
    SimOrder,
)
from ibsim.wire import API_PREFIX, FrameBuffer, FrameError, encode_frame, split_message

log = logging.getLogger("ibsim")

# The highest server version a gateway offers when its config does not say: 226, as a current
# TWS. Only an entry point sets it (the test suite runs the whole suite on another wire with it).
DEFAULT_SERVER_VERSION = MAX_SERVER_VERSION
NO_VALID_ID = -1
DUPLICATE_ORDER_ID = 103
CANCEL_FILLED = 10148
READ_ONLY = 321
READ_ONLY_MESSAGE = (
    "Error validating request.-'{tag}' : cause - The API interface is currently in Read-Only mode."
)

# Client -> server message ids (text protocol).
REQ_MKT_DATA = 1
CANCEL_MKT_DATA = 2
PLACE_ORDER = 3
CANCEL_ORDER = 4
REQ_OPEN_ORDERS = 5
REQ_ACCOUNT_UPDATES = 6
REQ_EXECUTIONS = 7
REQ_IDS = 8
REQ_CONTRACT_DETAILS = 9
REQ_AUTO_OPEN_ORDERS = 15
REQ_ALL_OPEN_ORDERS = 16
REQ_CURRENT_TIME = 49
REQ_GLOBAL_CANCEL = 58
REQ_MARKET_DATA_TYPE = 59
REQ_POSITIONS = 61
REQ_ACCOUNT_SUMMARY = 62
CANCEL_ACCOUNT_SUMMARY = 63
CANCEL_POSITIONS = 64
START_API = 71
REQ_ACCOUNT_UPDATES_MULTI = 76
CANCEL_ACCOUNT_UPDATES_MULTI = 77
REQ_PNL = 92
CANCEL_PNL = 93
REQ_PNL_SINGLE = 94
CANCEL_PNL_SINGLE = 95
REQ_COMPLETED_ORDERS = 99

# Tick types: (bid, bid size, ask, ask size, last, last size), live and IB's delayed data.
TICK_BID_SIZE, TICK_BID, TICK_ASK, TICK_ASK_SIZE, TICK_LAST, TICK_LAST_SIZE = 0, 1, 2, 3, 4, 5
LIVE_TICKS = (TICK_BID, TICK_BID_SIZE, TICK_ASK, TICK_ASK_SIZE, TICK_LAST, TICK_LAST_SIZE)
DELAYED_TICKS = (66, 69, 67, 70, 68, 71)
# tickOptionComputation tick types: bid, ask, last, model; live and delayed
LIVE_OPTION_TICKS = (10, 11, 12, 13)
DELAYED_OPTION_TICKS = (80, 81, 82, 83)
REAL_TIME_DATA, DELAYED_DATA = 1, 3  # marketDataType

DELAYED_NOT_SUBSCRIBED = 10167
MARKET_DATA_ERRORS = {
    354: "Requested market data is not subscribed.",
    DELAYED_NOT_SUBSCRIBED: (
        "Requested market data is not subscribed. Displaying delayed market data."
    ),
    10197: "No market data during competing live session",
}

_VERSION_RANGE = re.compile(r"^v(\d+)(?:\.\.(\d+))?")

SUMMARY_TAGS = (
    "AccountType",
    "NetLiquidation",
    "TotalCashValue",
    "GrossPositionValue",
    "InitMarginReq",
    "MaintMarginReq",
    "ExcessLiquidity",
    "AvailableFunds",
    "Cushion",
    "BuyingPower",
    "EquityWithLoanValue",
)


@dataclass(frozen=True, slots=True)
class GatewayConfig:
    """How the simulated gateway behaves; every field has a sensible default."""

    host: str = "127.0.0.1"
    port: int = 0  # 0 picks a free port; read `SimGateway.port` after start
    master_client_id: int | None = 0
    pacing_limit: int = 50  # messages per `pacing_window_s` before error 100
    pacing_window_s: float = 1.0
    pacing_disconnect: bool = True
    pnl_interval_s: float = 1.0  # reqPnL / reqPnLSingle stream period
    # updatePortfolio of every position again (IB: "a fixed interval of three minutes"; a
    # position change is sent at once)
    portfolio_interval_s: float = 180.0
    market_interval_s: float = 0.1  # price steps, resting order matching, market data ticks
    fill_latency_s: float = 0.0  # an order waits PendingSubmit this long before IB has it
    cancel_latency_s: float = 0.0  # a cancel waits PendingCancel this long (fills may come)
    first_order_id: int = 1
    farm_notices: bool = True
    max_tickers: int | None = None  # market data lines per client; more: error 101
    # The highest server version the gateway offers (default DEFAULT_SERVER_VERSION).
    server_version: int = field(default_factory=lambda: DEFAULT_SERVER_VERSION)

    def __post_init__(self) -> None:
        if not MIN_SERVER_VERSION <= self.server_version <= MAX_SERVER_VERSION:
            raise ValueError(
                f"server_version {self.server_version} is outside "
                f"{MIN_SERVER_VERSION}..{MAX_SERVER_VERSION}"
            )


@dataclass(frozen=True, slots=True)
class Request:
    """One client message as the handlers read it: text fields, message id first, laid out as at
    server version `version` (a protobuf request arrives here as its 178 text layout), and for a
    protobuf placeOrder the order already decoded."""

    msg_id: int
    fields: list[str]
    version: int
    placed: codec.PlacedOrder | None = None


@dataclass(slots=True)
class _Subscriptions:
    positions: bool = False
    account_updates: str | None = None  # account code of reqAccountUpdates
    account_multi: dict[int, str] = field(default_factory=dict)  # reqId -> account
    pnl: dict[int, str] = field(default_factory=dict)  # reqId -> account
    pnl_single: dict[int, tuple[str, int]] = field(default_factory=dict)  # reqId -> (acct, conId)
    market_data: dict[int, int] = field(default_factory=dict)  # reqId -> conId
    # reqId -> (bid, bid size, ask, ask size, last, last size) last sent
    last_quote: dict[int, tuple[float, ...]] = field(default_factory=dict)


QUOTE_HISTORY_S = 120.0  # how far back a lagging market-data feed can be


@dataclass(frozen=True, slots=True)
class MarketDataFault:
    """Market data of one contract frozen (no ticks at all) or lagging `lag_s` behind the market,
    as IB's delayed-data tick types when `delayed_ticks`."""

    lag_s: float | None  # None: frozen
    delayed_ticks: bool = False


OMITTABLE_FIELDS: dict[str, frozenset[str]] = {
    "position": frozenset({"position"}),
    "portfolio": frozenset({"position"}),
    "pnl_single": frozenset({"position", "value"}),
    "order_status": frozenset({"order_id", "client_id", "perm_id", "filled", "remaining"}),
}
"""The fields the `omit_fields` fault can leave out, per message kind."""


@dataclass(frozen=True, slots=True)
class FieldOmission:
    """The `omit_fields` fault: `fields` (message kind -> field names, see `OMITTABLE_FIELDS`)
    are left out of those messages about `con_ids` (empty: every contract). On the protobuf wire
    the field is absent, and ibapi gives its unset value (UNSET_DECIMAL for a quantity,
    UNSET_INTEGER for a client or order id, UNSET_LONG for a permId, UNSET_DOUBLE for a value);
    on the text wire it is sent empty (ibapi reads an empty quantity as UNSET_DECIMAL, an empty
    id as 0)."""

    fields: dict[str, frozenset[str]]
    con_ids: frozenset[int] = frozenset()

    def __post_init__(self) -> None:
        for kind, names in self.fields.items():
            allowed = OMITTABLE_FIELDS.get(kind)
            if allowed is None or not names <= allowed:
                raise ValueError(f"cannot omit {sorted(names)} from {kind} messages")

    def applies(self, kind: str, con_id: int) -> frozenset[str]:
        if self.con_ids and con_id not in self.con_ids:
            return frozenset()
        return self.fields.get(kind, frozenset())


def _quote_at(history: deque[tuple[float, Quote]], when: float) -> Quote | None:
    """The latest quote at or before `when` (the oldest kept when none is that old)."""
    found = history[0][1] if history else None
    for ts, quote in reversed(history):
        if ts <= when:
            return quote
    return found


class Session:
    """One client connection: handshake state, pacing window and subscriptions."""

    def __init__(
        self, gateway: SimGateway, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self.gateway = gateway
        self.reader = reader
        self.writer = writer
        self.client_id: int | None = None
        self.client_version = 0
        self.subs = _Subscriptions()
        self.received = 0
        self._window: deque[float] = deque()
        self._closed = False
        self._held: list[bytes] = []  # written while the gateway is frozen, sent on thaw
        peer = writer.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)

    @property
    def is_master(self) -> bool:
        return self.client_id is not None and self.client_id == self.gateway.config.master_client_id

    @property
    def started(self) -> bool:
        return self.client_id is not None and not self._closed

    def send(self, message: Outgoing) -> None:
        """Queue one message for this client, encoded for its server version (dropped once the
        session is closing)."""
        if self._closed or self.writer.is_closing():
            return
        frame = message.encode(self.client_version)
        if self.gateway.frozen:
            self._held.append(frame)  # TCP would retransmit it after the freeze
            return
        self.writer.write(frame)

    def release_held(self) -> None:
        """Send what was held back while the gateway was frozen, in order."""
        held, self._held = self._held, []
        if self._closed or self.writer.is_closing():
            return
        for frame in held:
            self.writer.write(frame)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            with contextlib.suppress(Exception):
                self.writer.close()

    def over_pace(self, now: float) -> bool:
        """Count one message; True when this one exceeds the pacing limit."""
        cfg = self.gateway.config
        window = self._window
        window.append(now)
        while window and now - window[0] >= cfg.pacing_window_s:
            window.popleft()
        return len(window) > cfg.pacing_limit


class SimGateway:
    """The simulated IB Gateway. Use as `async with SimGateway(exchange, config) as gw:`."""

    def __init__(
        self,
        exchange: Exchange,
        config: GatewayConfig | None = None,
        *,
        clock: Callable[[], float] = time.time,
        state_file: StateFile | None = None,
    ) -> None:
        self.exchange = exchange
        # `guardd sim --state FILE`: saved before clients hear of each change (ibsim/state.py)
        self.state_file = state_file
        self._ids_changed = False  # a client saw a new order id since the last save
        self.config = config or GatewayConfig()
        self.clock = clock
        self.sessions: dict[int, Session] = {}  # started sessions by client id
        self._pending: set[Session] = set()  # connected, not yet started
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._port = self.config.port
        # Order ids: the highest id each client id has seen (see the module doc); a client not in
        # the map has seen `_id_floor_default`.
        self._id_floor: dict[int, int] = {}
        self._id_floor_default = self.config.first_order_id - 1
        self.read_only = False  # TWS's "Read-Only API": orders and cancels refused with 321
        self.read_only_refusals = 0
        self.accepting = True
        self.connectivity_ok = True
        # Faults on position updates.
        self.position_delay_s = 0.0
        self.position_duplicates = 0
        # Fields left out of messages (the `omit_fields` fault), and how many messages lost one.
        self.field_omissions: list[FieldOmission] = []
        self.omitted_messages: Counter[str] = Counter()
        # Faults on market data, by conId; each instrument's recent quotes, for a lagging feed.
        self.market_data_faults: dict[int, MarketDataFault] = {}
        self.market_data_errors: dict[int, int] = {}  # conId -> 354, 10167 or 10197
        self._quote_history: dict[int, deque[tuple[float, Quote]]] = {}
        # Silent freeze: nothing read or written on any connection, none closed.
        self.frozen = False
        self._thawed = asyncio.Event()
        self._thawed.set()
        self.freezes = 0
        # A modification sent while connectivity is lost becomes a second order.
        self.split_modifies_enabled = False
        self.split_orders = 0
        self.liquidations = 0
        # Counters for tests and benchmarks.
        self.pacing_violations = 0
        self.global_cancels = 0
        self.global_cancel_times: list[float] = []
        self.received_by_id: Counter[int] = Counter()
        self.received_by_client: Counter[int] = Counter()
        self._listeners: list[Callable[[int, int, list[str]], None]] = []
        self._order_listeners: list[Callable[[int, OrderRequest], None]] = []

    # ---- lifecycle -------------------------------------------------------------------------

    @property
    def port(self) -> int:
        return self._port

    async def start(self) -> None:
        """Listen, and start the market loop."""
        if self.state_file is not None:
            # what IB finished while this process was away; then the file exists from the start
            self.route(self.exchange.settle_pending(self.clock()))
            self.save_state()
        await self._listen()
        self._spawn(self._market_loop(), "sim_market_loop")
        self._spawn(self._pnl_loop(), "sim_pnl_loop")
        self._spawn(self._portfolio_loop(), "sim_portfolio_loop")
        log.info(
            "gateway listening on %s:%d (server versions %d..%d)",
            self.config.host,
            self._port,
            MIN_SERVER_VERSION,
            self.config.server_version,
        )

    async def _listen(self) -> None:
        self._server = await asyncio.start_server(
            self._on_connect, self.config.host, self._port, reuse_address=True
        )
        sock = self._server.sockets[0]
        self._port = sock.getsockname()[1]
        self.accepting = True

    async def stop(self) -> None:
        """Close every session and the listener, and stop the loops."""
        await self._close_listener()
        for session in list(self.sessions.values()) + list(self._pending):
            session.close()
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self.sessions.clear()
        self._pending.clear()
        if self.state_file is not None:
            self.save_state()  # the prices of the last steps

    async def _close_listener(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await self._server.wait_closed()
            self._server = None
        self.accepting = False

    async def __aenter__(self) -> SimGateway:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def _spawn(self, coro: Awaitable[None], name: str) -> asyncio.Task[None]:
        task: asyncio.Task[None] = asyncio.ensure_future(coro)
        task.set_name(name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def on_message(self, listener: Callable[[int, int, list[str]], None]) -> None:
        """Call `listener(client_id, msg_id, fields)` for every message a started client sends.

        `fields` are text fields, message id first, in the layout of the client's version; a
        protobuf request arrives as its layout at 178, except placeOrder, whose fields are only
        the id and the order id: read orders with `on_order`, which works on every wire."""
        self._listeners.append(listener)

    def on_order(self, listener: Callable[[int, OrderRequest], None]) -> None:
        """Call `listener(client_id, order)` for every readable placeOrder a started client sends
        (after its `on_message` listeners, before the gateway acts on it), on every wire."""
        self._order_listeners.append(listener)

    # ---- connections -----------------------------------------------------------------------

    async def _on_connect(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        session = Session(self, reader, writer)
        self._pending.add(session)
        log.info("client connected from %s", session.peer)
        try:
            await self._serve(session)
        except (ConnectionError, asyncio.IncompleteReadError, FrameError) as exc:
            log.info("client %s connection ended: %s", session.client_id, exc)
        finally:
            self._forget(session)
            session.close()

    def _forget(self, session: Session) -> None:
        self._pending.discard(session)
        if session.client_id is not None and self.sessions.get(session.client_id) is session:
            del self.sessions[session.client_id]
            log.info("client %d disconnected; its orders stay working", session.client_id)

    async def _serve(self, session: Session) -> None:
        buf = FrameBuffer()
        # Handshake: "API\0" then a frame "v<min>..<max>[ options]".
        while True:
            data = await session.reader.read(65536)
            await self._thawed.wait()
            if not data:
                return
            buf.append(data)
            taken = buf.take_prefix(API_PREFIX)
            if taken is False:
                log.warning("client %s sent no API prefix; closing", session.peer)
                return
            if taken:
                break
        frames = buf.frames()
        while not frames:
            data = await session.reader.read(65536)
            await self._thawed.wait()
            if not data:
                return
            frames = buf.feed(data)
        if not self._negotiate(session, frames[0]):
            return
        await session.writer.drain()
        # A client sends nothing after its version range before the answer, so frames[1:] is
        # empty; anything the handshake read did buffer past it is still framed in `buf`.
        pending = buf.payloads()
        while True:
            for payload in pending:
                self._handle_payload(session, payload)
                if session._closed:
                    return
            await session.writer.drain()
            data = await session.reader.read(65536)
            await self._thawed.wait()  # frozen: what the client sent waits, unread
            if not data:  # EOF, including a half-close (write_eof) by ib_async
                return
            pending = buf.feed_payloads(data)

    def _negotiate(self, session: Session, fields: list[str]) -> bool:
        text = fields[0] if fields else ""
        versions = _version_range(text)
        if versions is None:
            log.warning("client %s sent a bad version range %r; closing", session.peer, text[:64])
            return False
        low, high = versions
        # As TWS: the highest version both sides speak. Below 178 the layouts here would be
        # misread, so such a client is refused rather than served a version it did not offer.
        version = min(high, self.config.server_version)
        if version < low or version < MIN_SERVER_VERSION:
            log.warning(
                "client %s needs versions %d..%d; we speak %d..%d",
                session.peer,
                low,
                high,
                MIN_SERVER_VERSION,
                self.config.server_version,
            )
            return False
        session.client_version = version
        conn_time = time.strftime("%Y%m%d %H:%M:%S UTC", time.gmtime(self.clock()))
        # Exactly one frame: ibapi parses only the first frame of the handshake read.
        session.writer.write(encode_frame([version, conn_time]))
        return True

    def _start_api(self, session: Session, fields: list[str]) -> None:
        try:
            client_id = int(fields[2])
        except (IndexError, ValueError):
            session.send(self._error(NO_VALID_ID, 505, "Fatal error: bad startApi"))
            session.close()
            return
        if client_id in self.sessions:
            log.warning("client id %d already in use; refusing %s", client_id, session.peer)
            session.send(
                self._error(
                    NO_VALID_ID,
                    326,
                    "Unable to connect as the client id is already in use. "
                    "Retry with a unique client id.",
                )
            )
            session.close()
            return
        session.client_id = client_id
        self._pending.discard(session)
        self.sessions[client_id] = session
        log.info(
            "client %d started (version %d)%s",
            client_id,
            session.client_version,
            " as master" if session.is_master else "",
        )
        session.send(messages.managed_accounts(self.exchange.accounts))
        session.send(messages.next_valid_id(self.next_valid_id(client_id)))
        if self.config.farm_notices:
            for code, msg in (
                (2104, "Market data farm connection is OK:usfarm"),
                (2106, "HMDS data farm connection is OK:ushmds"),
                (2158, "Sec-def data farm connection is OK:secdefnj"),
            ):
                session.send(self._error(NO_VALID_ID, code, msg))
        # Orders survive disconnects: report this client's working orders again.
        orders = self._visible_orders(session, working_only=True)
        self._saw_orders(session, orders)
        for order in orders:
            self._report_order(session, order)

    # ---- order ids -------------------------------------------------------------------------

    def next_valid_id(self, client_id: int) -> int:
        """The id nextValidId gives `client_id` now: above every id it has seen."""
        return self._id_floor.get(client_id, self._id_floor_default) + 1

    def _saw_order_id(self, client_id: int, order_id: int) -> None:
        if order_id > 0:
            floor = self._id_floor.get(client_id, self._id_floor_default)
            if order_id > floor:
                self._id_floor[client_id] = order_id
                self._ids_changed = True

    def _saw_orders(self, session: Session, orders: Iterable[SimOrder]) -> None:
        """Count the ids of orders about to be reported to `session` as seen, and save them
        before the client hears of them."""
        if session.client_id is not None:
            for order in orders:
                self._saw_order_id(session.client_id, order.order_id)
        if self._ids_changed:
            self.save_state()

    # ---- state (guardd sim --state FILE) ---------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        """What outlives this process at IB (see ibsim/state.py): the exchange's accounts
        and orders, the ids each client has seen, and the simulated clock's offset."""
        return {
            "exchange": self.exchange.snapshot(),
            "seen_order_ids": {str(c): floor for c, floor in self._id_floor.items()},
            "seen_order_ids_default": self._id_floor_default,
            "clock_offset": self.clock.offset if isinstance(self.clock, SimClock) else None,
        }

    def restore(self, state: dict[str, Any]) -> None:
        """Take back a `snapshot` (before `start`); StateFileError when it does not fit."""
        try:
            self.exchange.restore(state["exchange"])
            self._id_floor = {int(c): int(f) for c, f in state["seen_order_ids"].items()}
            self._id_floor_default = int(state["seen_order_ids_default"])
            offset = state["clock_offset"]
            if offset is not None and isinstance(self.clock, SimClock):
                self.clock.set_offset(float(offset))
        except ExchangeError as exc:
            raise StateFileError(f"{self._state_name()}: does not fit the scenario: {exc}") from exc
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise StateFileError(
                f"{self._state_name()}: a damaged state ({type(exc).__name__}: {exc})"
            ) from exc

    def _state_name(self) -> str:
        return str(self.state_file.path) if self.state_file is not None else "state"

    def save_state(self) -> None:
        """Write the state file now (nothing without one). A write that fails stops the
        process: a gateway that cannot keep its account must not go on acknowledging fills."""
        if self.state_file is None:
            return
        self._ids_changed = False
        try:
            self.state_file.save(self.snapshot())
        except StateFileError as exc:
            log.critical("stopping: the state was not saved: %s", exc)
            raise SystemExit(74) from exc  # EX_IOERR; asyncio lets SystemExit end the run

    def _report_order(self, session: Session, order: SimOrder, *, open_order: bool = True) -> None:
        """openOrder (when `open_order`) and orderStatus of one order to one client, which has
        now seen its id."""
        if open_order:
            session.send(messages.open_order(order))
        session.send(self._order_status(order))
        if session.client_id is not None:
            self._saw_order_id(session.client_id, order.order_id)

    # ---- dispatch --------------------------------------------------------------------------

    def _handle_payload(self, session: Session, payload: bytes) -> None:
        """One frame from a started handshake: text fields, or a protobuf request read into the
        text fields of the same request at 178 (placeOrder into the decoded order)."""
        try:
            request = read_request(payload, session.client_version)
        except FrameError as exc:
            log.warning("client %s sent a bad message: %s", session.peer, exc)
            return
        except protocodec.ProtoDecodeError as exc:
            log.warning("client %s sent an unreadable protobuf message: %s", session.peer, exc)
            if session.client_id is not None:
                session.send(self._error(NO_VALID_ID, 320, f"Error reading request: {exc}"))
            return
        if request.fields:
            self._handle(session, request)

    def _error(self, req_id: int, code: int, message: str, advanced_json: str = "") -> Outgoing:
        """error (4) stamped with the gateway's clock (the error time travels from 194)."""
        return messages.error(
            req_id, code, message, advanced_json, time_ms=int(self.clock() * 1000)
        )

    def _tell_order_listeners(self, client_id: int, request: Request) -> None:
        try:
            placed = request.placed or codec.decode_place_order_in_full(
                request.fields, request.version
            )
        except codec.CodecError:
            return  # the handler reports it to the client
        for listener in self._order_listeners:
            listener(client_id, placed.order)

    def _no_security_definition(self, req_id: int) -> Outgoing:
        """Error 200: TWS's answer to a request for a contract it does not know."""
        return self._error(req_id, 200, "No security definition has been found for the request")

    def _handle(self, session: Session, request: Request) -> None:
        msg_id, fields = request.msg_id, request.fields
        now = self.clock()
        session.received += 1
        if session.client_id is None:
            if msg_id == START_API:
                self._start_api(session, fields)
            else:
                log.warning("message %d before startApi from %s ignored", msg_id, session.peer)
            return
        self.received_by_id[msg_id] += 1
        self.received_by_client[session.client_id] += 1
        if session.over_pace(now):
            self.pacing_violations += 1
            log.warning(
                "client %d exceeded %d msg/s: error 100",
                session.client_id,
                self.config.pacing_limit,
            )
            session.send(
                self._error(NO_VALID_ID, 100, "Max rate of messages per second has been exceeded.")
            )
            if self.config.pacing_disconnect:
                self._forget(session)
                session.close()
            return
        for listener in self._listeners:
            listener(session.client_id, msg_id, fields)
        if msg_id == PLACE_ORDER and self._order_listeners:
            self._tell_order_listeners(session.client_id, request)
        handler = self._handlers.get(msg_id)
        if handler is None:
            log.debug("client %d sent unsupported message %d; ignored", session.client_id, msg_id)
            return
        try:
            handler(self, session, request, now)
        except codec.CodecError as exc:
            log.warning("client %d sent a malformed message %d: %s", session.client_id, msg_id, exc)
            session.send(self._error(NO_VALID_ID, 320, f"Error reading request: {exc}"))

    def _req_ids(self, session: Session, request: Request, now: float) -> None:
        assert session.client_id is not None
        session.send(messages.next_valid_id(self.next_valid_id(session.client_id)))

    def _refuse_read_only(self, session: Session, req_id: int, tag: str) -> None:
        self.read_only_refusals += 1
        log.info("client %s refused: the API is read-only", session.client_id)
        session.send(self._error(req_id, READ_ONLY, READ_ONLY_MESSAGE.format(tag=tag)))

    def _req_current_time(self, session: Session, request: Request, now: float) -> None:
        session.send(messages.current_time(int(now)))

    def _place_order(self, session: Session, request: Request, now: float) -> None:
        assert session.client_id is not None
        placed = request.placed or codec.decode_place_order_in_full(request.fields, request.version)
        req = placed.order
        if self.read_only:
            self._refuse_read_only(session, req.order_id, "bN")
            return
        client_id = session.client_id
        own = self.exchange.order_of_client(client_id, req.order_id)
        if (own is None or not own.is_working) and req.order_id <= self._id_floor.get(
            client_id, self._id_floor_default
        ):
            # Not a modification of its own working order, and not above what it has seen.
            log.info("order %d of client %d refused: duplicate order id", req.order_id, client_id)
            session.send(self._error(req.order_id, DUPLICATE_ORDER_ID, "Duplicate order id"))
            return
        log.info(
            "client %d places order %d: %s %s %s %s%s",
            session.client_id,
            req.order_id,
            req.action,
            _qty(req.total_quantity),
            req.contract.symbol or req.contract.con_id,
            req.order_type,
            f" @ {req.lmt_price}" if req.lmt_price is not None else "",
        )
        refusal = _unsupported(placed)
        if refusal is not None:
            log.info("order %d of client %d refused: %s", req.order_id, client_id, refusal)
            session.send(self._error(req.order_id, 201, f"Order rejected - reason:{refusal}"))
            return
        latency = self.config.fill_latency_s
        if latency > 0 and own is None and not self.split_modifies_enabled:
            # a new order: PendingSubmit now, IB's acknowledgement after the latency
            self.route(self.exchange.place_order(client_id, req, now, pending=True))
            loop = asyncio.get_running_loop()
            loop.call_later(latency, self._accept, client_id, req.order_id)
        elif latency > 0:
            loop = asyncio.get_running_loop()
            loop.call_later(latency, self._place_now, client_id, req)
        else:
            self._place_now(client_id, req)

    def _accept(self, client_id: int, order_id: int) -> None:
        self.route(self.exchange.accept(client_id, order_id, self.clock()))

    def _place_now(self, client_id: int, req: OrderRequest) -> None:
        if self.split_modifies_enabled and not self.connectivity_ok:
            if any(
                o.client_id == client_id and o.order_id == req.order_id
                for o in self.exchange.working_orders()
            ):
                self.split_orders += 1
                log.warning(
                    "fault: modification of order %d of client %d taken as a NEW order",
                    req.order_id,
                    client_id,
                )
            self.route(self.exchange.place_as_new(client_id, req, self.clock()))
            return
        self.route(self.exchange.place_order(client_id, req, self.clock()))

    def _cancel_order(self, session: Session, request: Request, now: float) -> None:
        assert session.client_id is not None
        order_id = codec.decode_cancel_order(request.fields, request.version)
        if self.read_only:
            self._refuse_read_only(session, order_id, "cB")
            return
        pending = self.config.cancel_latency_s > 0
        try:
            events = self.exchange.cancel_order(session.client_id, order_id, now, pending=pending)
        except OrderNotFoundError:
            session.send(
                self._error(
                    order_id, 10147, f"OrderId {order_id} that needs to be cancelled is not found."
                )
            )
            return
        except OrderFilledError:
            session.send(
                self._error(
                    order_id,
                    CANCEL_FILLED,
                    f"OrderId {order_id} that needs to be cancelled cannot be cancelled, "
                    "state: Filled.",
                )
            )
            return
        except OrderNotCancellableError:
            session.send(
                self._error(
                    order_id,
                    161,
                    f"Cancel attempted when order {order_id} is not in a cancellable state.",
                )
            )
            return
        log.info("client %d cancels order %d", session.client_id, order_id)
        self.route(events, cancel_notice=True)
        self._finish_cancels_later()

    def _global_cancel(self, session: Session, request: Request, now: float) -> None:
        if self.read_only:
            self._refuse_read_only(session, NO_VALID_ID, "cB")
            return
        self.global_cancels += 1
        self.global_cancel_times.append(now)
        events = self.exchange.global_cancel(now, pending=self.config.cancel_latency_s > 0)
        log.info("client %d: global cancel", session.client_id)
        self.route(events, cancel_notice=True)
        self._finish_cancels_later()

    def _finish_cancels_later(self) -> None:
        """Cancels left PendingCancel complete after the cancel latency (fills may race them)."""
        perm_ids = self.exchange.pending_cancels()
        if perm_ids:
            loop = asyncio.get_running_loop()
            loop.call_later(self.config.cancel_latency_s, self._finish_cancels, perm_ids)

    def _finish_cancels(self, perm_ids: list[int]) -> None:
        for perm_id in perm_ids:
            self.route(self.exchange.finish_cancel(perm_id, self.clock()), cancel_notice=True)

    def _req_open_orders(self, session: Session, request: Request, now: float) -> None:
        self._send_open_orders(session, self._visible_orders(session, working_only=True))

    def _req_all_open_orders(self, session: Session, request: Request, now: float) -> None:
        self._send_open_orders(session, [o for o in self.exchange.orders() if o.is_working])

    def _send_open_orders(self, session: Session, orders: Iterable[SimOrder]) -> None:
        orders = list(orders)
        self._saw_orders(session, orders)
        for order in orders:
            self._report_order(session, order)
        session.send(messages.open_order_end())

    def _req_auto_open_orders(self, session: Session, request: Request, now: float) -> None:
        if session.client_id != 0:
            session.send(
                self._error(
                    NO_VALID_ID, 327, "Only the default client (i.e 0) can auto bind orders"
                )
            )

    def _req_completed_orders(self, session: Session, request: Request, now: float) -> None:
        for order in self._visible_orders(session, working_only=False):
            if not order.is_working:
                session.send(messages.completed_order(order))
        session.send(messages.completed_orders_end())

    def _req_executions(self, session: Session, request: Request, now: float) -> None:
        wanted = codec.decode_executions_request(request.fields, request.version)
        for fill in self.exchange.fills():
            if not (session.is_master or fill.client_id == session.client_id):
                continue
            if wanted.client_id and fill.client_id != wanted.client_id:
                continue
            if wanted.account and fill.account != wanted.account:
                continue
            if wanted.symbol and fill.instrument.symbol != wanted.symbol:
                continue
            session.send(messages.exec_details(wanted.req_id, fill))
            session.send(messages.commission_report(fill))
        session.send(messages.exec_details_end(wanted.req_id))

    def _req_positions(self, session: Session, request: Request, now: float) -> None:
        session.subs.positions = True
        for account in self.exchange.accounts:
            for pos in self.exchange.positions(account):
                session.send(self._position(pos))
        session.send(messages.position_end())

    def _cancel_positions(self, session: Session, request: Request, now: float) -> None:
        session.subs.positions = False

    def _req_account_summary(self, session: Session, request: Request, now: float) -> None:
        fields = request.fields
        req_id = _int(fields, 2)
        tags = {t for t in _str(fields, 4).split(",") if t}
        for account in self.exchange.accounts:
            values = {
                key: (value, cur) for key, value, cur in self.exchange.account_values(account)
            }
            values["AccountType"] = ("INDIVIDUAL", "")
            for tag in SUMMARY_TAGS:
                if tags and tag not in tags:
                    continue
                if tag in values:
                    value, cur = values[tag]
                    session.send(messages.account_summary(req_id, account, tag, value, cur))
        session.send(messages.account_summary_end(req_id))

    def _req_account_updates(self, session: Session, request: Request, now: float) -> None:
        fields = request.fields
        subscribe = _str(fields, 2) == "1"
        account = _str(fields, 3) or self.exchange.accounts[0]
        if not subscribe:
            session.subs.account_updates = None
            return
        if account not in self.exchange.accounts:
            session.send(self._error(NO_VALID_ID, 321, f"Account {account} not found"))
            return
        session.subs.account_updates = account
        for key, value, cur in self.exchange.account_values(account):
            session.send(messages.account_value(key, value, cur, account))
        for pos in self.exchange.positions(account):
            session.send(self._portfolio(pos))
        session.send(messages.account_time(time.strftime("%H:%M", time.gmtime(now))))
        session.send(messages.account_download_end(account))

    def _req_account_updates_multi(self, session: Session, request: Request, now: float) -> None:
        fields = request.fields
        req_id = _int(fields, 2)
        account = _str(fields, 3) or self.exchange.accounts[0]
        model = _str(fields, 4)
        accounts = self.exchange.accounts if account == "All" else [account]
        for acct in accounts:
            if acct not in self.exchange.accounts:
                session.send(self._error(req_id, 321, f"Account {acct} not found"))
                continue
            session.subs.account_multi[req_id] = acct
            for key, value, cur in self.exchange.account_values(acct):
                session.send(messages.account_update_multi(req_id, acct, model, key, value, cur))
        session.send(messages.account_update_multi_end(req_id))

    def _cancel_account_updates_multi(self, session: Session, request: Request, now: float) -> None:
        session.subs.account_multi.pop(_int(request.fields, 2), None)

    def _req_pnl(self, session: Session, request: Request, now: float) -> None:
        fields = request.fields
        req_id, account = _int(fields, 1), _str(fields, 2)
        if account not in self.exchange.accounts:
            session.send(self._error(req_id, 321, f"Account {account} not found"))
            return
        session.subs.pnl[req_id] = account
        session.send(messages.pnl(req_id, *self.exchange.pnl(account)))

    def _cancel_pnl(self, session: Session, request: Request, now: float) -> None:
        fields = request.fields
        session.subs.pnl.pop(_int(fields, 1), None)

    def _req_pnl_single(self, session: Session, request: Request, now: float) -> None:
        fields = request.fields
        req_id, account, con_id = _int(fields, 1), _str(fields, 2), _int(fields, 4)
        if account not in self.exchange.accounts:
            session.send(self._error(req_id, 321, f"Account {account} not found"))
            return
        if self.exchange.find_instrument(ContractSpec(con_id=con_id)) is None:
            session.send(self._no_security_definition(req_id))
            return
        session.subs.pnl_single[req_id] = (account, con_id)
        session.send(self._pnl_single(req_id, account, con_id))

    def _cancel_pnl_single(self, session: Session, request: Request, now: float) -> None:
        fields = request.fields
        session.subs.pnl_single.pop(_int(fields, 1), None)

    def _req_mkt_data(self, session: Session, request: Request, now: float) -> None:
        wanted = codec.decode_mkt_data_request(request.fields)
        instrument = self.exchange.find_instrument(wanted.contract)
        if instrument is None:
            session.send(self._no_security_definition(wanted.req_id))
            return
        limit = self.config.max_tickers
        if (
            limit is not None
            and not wanted.snapshot
            and wanted.req_id not in session.subs.market_data
            and len(session.subs.market_data) >= limit
        ):
            session.send(self._error(wanted.req_id, 101, "Max number of tickers has been reached."))
            return
        code = self.market_data_errors.get(instrument.con_id)
        if code is not None:
            session.send(self._error(wanted.req_id, code, MARKET_DATA_ERRORS[code]))
            if code != DELAYED_NOT_SUBSCRIBED:
                return
        if not wanted.snapshot:
            session.subs.market_data[wanted.req_id] = instrument.con_id
        self._send_quote(session, wanted.req_id, instrument.con_id, force=True)

    def _cancel_mkt_data(self, session: Session, request: Request, now: float) -> None:
        fields = request.fields
        req_id = _int(fields, 2)
        session.subs.market_data.pop(req_id, None)
        session.subs.last_quote.pop(req_id, None)

    def _req_market_data_type(self, session: Session, request: Request, now: float) -> None:
        fields = request.fields
        session.send(messages.market_data_type(NO_VALID_ID, _int(fields, 2)))

    def _req_contract_details(self, session: Session, request: Request, now: float) -> None:
        fields = request.fields
        req_id, spec = codec.decode_contract_details_request(fields)
        instrument = self.exchange.find_instrument(spec)
        if instrument is None:
            session.send(self._no_security_definition(req_id))
            return
        session.send(messages.contract_details(req_id, instrument, self.contract_hours(instrument)))
        session.send(messages.contract_details_end(req_id))

    def contract_hours(self, instrument: Instrument) -> ContractHours:
        """The contract's hours from today on, as contractDetails reports them."""
        calendar = self.exchange.calendar(instrument.con_id)
        now = self.clock()
        return ContractHours(
            time_zone=calendar.timezone,
            trading=calendar.ib_hours(now, extended=True),
            liquid=calendar.ib_hours(now, extended=False),
        )

    def _ignore(self, session: Session, request: Request, now: float) -> None:
        """Cancels of subscriptions we keep no state for, and a second startApi."""

    _handlers: ClassVar[dict[int, Callable[[SimGateway, Session, Request, float], None]]] = {
        REQ_MKT_DATA: _req_mkt_data,
        CANCEL_MKT_DATA: _cancel_mkt_data,
        PLACE_ORDER: _place_order,
        CANCEL_ORDER: _cancel_order,
        REQ_OPEN_ORDERS: _req_open_orders,
        REQ_ACCOUNT_UPDATES: _req_account_updates,
        REQ_EXECUTIONS: _req_executions,
        REQ_IDS: _req_ids,
        REQ_CONTRACT_DETAILS: _req_contract_details,
        REQ_AUTO_OPEN_ORDERS: _req_auto_open_orders,
        REQ_ALL_OPEN_ORDERS: _req_all_open_orders,
        REQ_CURRENT_TIME: _req_current_time,
        REQ_GLOBAL_CANCEL: _global_cancel,
        REQ_MARKET_DATA_TYPE: _req_market_data_type,
        REQ_POSITIONS: _req_positions,
        REQ_ACCOUNT_SUMMARY: _req_account_summary,
        CANCEL_ACCOUNT_SUMMARY: _ignore,
        CANCEL_POSITIONS: _cancel_positions,
        START_API: _ignore,
        REQ_ACCOUNT_UPDATES_MULTI: _req_account_updates_multi,
        CANCEL_ACCOUNT_UPDATES_MULTI: _cancel_account_updates_multi,
        REQ_PNL: _req_pnl,
        CANCEL_PNL: _cancel_pnl,
        REQ_PNL_SINGLE: _req_pnl_single,
        CANCEL_PNL_SINGLE: _cancel_pnl_single,
        REQ_COMPLETED_ORDERS: _req_completed_orders,
    }

    # ---- routing ---------------------------------------------------------------------------

    def _visible_orders(self, session: Session, *, working_only: bool) -> list[SimOrder]:
        return [
            o
            for o in self.exchange.orders()
            if (session.is_master or o.client_id == session.client_id)
            and (o.is_working or not working_only)
        ]

    def _order_audience(self, client_id: int) -> list[Session]:
        out = []
        owner = self.sessions.get(client_id)
        if owner is not None:
            out.append(owner)
        master_id = self.config.master_client_id
        if master_id is not None and master_id != client_id:
            master = self.sessions.get(master_id)
            if master is not None:
                out.append(master)
        return out

    def route(self, events: Iterable[SimEvent], *, cancel_notice: bool = False) -> None:
        """Send what the exchange model emitted to the clients that would see it; with a state
        file, save first (the ids the audience now sees included), so no client hears of a
        change that a kill -9 could lose."""
        events = list(events)
        if not events:
            return
        if self.state_file is not None:
            for event in events:
                if isinstance(event, OrderChanged):
                    self._saw_order_id(event.order.client_id, event.order.order_id)
                    for s in self._order_audience(event.order.client_id):
                        if s.client_id is not None:
                            self._saw_order_id(s.client_id, event.order.order_id)
            self.save_state()
        for event in events:
            match event:
                case OrderChanged(order=order, open_order=open_order):
                    # the owner has seen its accepted order's id, connected or not
                    self._saw_order_id(order.client_id, order.order_id)
                    for s in self._order_audience(order.client_id):
                        self._report_order(s, order, open_order=open_order)
                        if (
                            cancel_notice
                            and order.status in ("Cancelled", "ApiCancelled")
                            and s.client_id == order.client_id
                        ):
                            s.send(self._error(order.order_id, 202, "Order Canceled - reason:"))
                case OrderRejected(order=order, code=code, reason=reason):
                    log.info(
                        "order %d of client %d rejected: %s",
                        order.order_id,
                        order.client_id,
                        reason,
                    )
                    for s in self._order_audience(order.client_id):
                        if s.client_id == order.client_id:
                            s.send(self._error(order.order_id, code, reason))
                        s.send(self._order_status(order))
                case OrderWarning(order=order, code=code, message=message):
                    owner = self.sessions.get(order.client_id)
                    if owner is not None:
                        owner.send(self._error(order.order_id, code, message))
                case Executed(fill=fill):
                    log.info(
                        "fill: client %d order %d %s %s %s @ %s",
                        fill.client_id,
                        fill.order_id,
                        fill.side,
                        _qty(fill.shares),
                        fill.instrument.symbol,
                        fill.price,
                    )
                    for s in self._order_audience(fill.client_id):
                        s.send(messages.exec_details(NO_VALID_ID, fill))
                        s.send(messages.commission_report(fill))
                case PositionChanged(position=pos):
                    self._route_position(pos)
                case AccountChanged(account=account, values=values):
                    self._route_account_values(account, values)
                case _:
                    assert_never(event)

    def _route_position(self, pos: PositionView) -> None:
        for s in list(self.sessions.values()):
            if s.subs.account_updates == pos.account:
                s.send(self._portfolio(pos))
        copies = 1 + self.position_duplicates
        if self.position_delay_s > 0:
            asyncio.get_running_loop().call_later(
                self.position_delay_s, self._send_position, pos, copies
            )
        else:
            self._send_position(pos, copies)

    def _send_position(self, pos: PositionView, copies: int) -> None:
        for s in list(self.sessions.values()):
            if s.subs.positions:
                for _ in range(copies):
                    s.send(self._position(pos))

    # Messages that the `omit_fields` fault may strip of fields.

    def _omitted(self, kind: str, con_id: int) -> frozenset[str]:
        omitted: frozenset[str] = frozenset()
        for omission in self.field_omissions:
            omitted |= omission.applies(kind, con_id)
        if omitted:
            self.omitted_messages[kind] += 1
        return omitted

    def _position(self, pos: PositionView) -> Outgoing:
        return messages.position(pos, self._omitted("position", pos.instrument.con_id))

    def _portfolio(self, pos: PositionView) -> Outgoing:
        return messages.portfolio(pos, self._omitted("portfolio", pos.instrument.con_id))

    def _pnl_single(self, req_id: int, account: str, con_id: int) -> Outgoing:
        values = self.exchange.pnl_single(account, con_id)
        return messages.pnl_single(req_id, *values, self._omitted("pnl_single", con_id))

    def _order_status(self, order: SimOrder) -> Outgoing:
        return messages.order_status(order, self._omitted("order_status", order.instrument.con_id))

    def _route_account_values(self, account: str, values: Iterable[tuple[str, str, str]]) -> None:
        values = tuple(values)
        for s in list(self.sessions.values()):
            if s.subs.account_updates == account:
                for key, value, cur in values:
                    s.send(messages.account_value(key, value, cur, account))
            for req_id, acct in s.subs.account_multi.items():
                if acct == account:
                    for key, value, cur in values:
                        s.send(messages.account_update_multi(req_id, account, "", key, value, cur))

    def _send_quote(
        self, session: Session, req_id: int, con_id: int, *, force: bool = False
    ) -> None:
        """Send what changed of a quote, as TWS does: a price tick (with its size tick) where a
        price moved, a size tick alone where only the size changed; everything when `force`.
        A market-data fault holds the ticks back (frozen) or sends an older quote (lag)."""
        fault = self.market_data_faults.get(con_id)
        quote: Quote | None = self.exchange.quote(con_id)
        ticks = LIVE_TICKS
        if fault is not None:
            quote = self.lagging_quote(con_id)
            ticks = DELAYED_TICKS if fault.delayed_ticks else LIVE_TICKS
        if quote is None:
            return
        key: tuple[float, ...] = (
            quote.bid, quote.bid_size, quote.ask, quote.ask_size, quote.last, quote.last_size
        )  # fmt: skip
        option = self.exchange.option_value(con_id)
        if option is not None:
            key += (option.underlying, option.years)  # they move the greeks
        sent = session.subs.last_quote.get(req_id)
        if not force and sent == key:
            return
        session.subs.last_quote[req_id] = key
        for n in range(0, 6, 2):
            price, size = key[n], key[n + 1]
            if force or sent is None or sent[n] != price:
                session.send(messages.tick_price(req_id, ticks[n], price, size))
                session.send(messages.tick_size(req_id, ticks[n + 1], size))
            elif sent[n + 1] != size:
                session.send(messages.tick_size(req_id, ticks[n + 1], size))
        if option is not None:
            delayed = ticks is DELAYED_TICKS
            self._send_option_computations(session, req_id, con_id, quote, delayed=delayed)

    def _send_option_computations(
        self, session: Session, req_id: int, con_id: int, quote: Quote, *, delayed: bool
    ) -> None:
        """tickOptionComputation for the bid, ask and last (each at the volatility its price
        implies, -1 where none does) and the model (at the option's own volatility), as TWS
        sends them after an option's price ticks."""
        option = self.exchange.option_value(con_id)
        assert option is not None
        model, spot, years, strike = option.value, option.underlying, option.years, option.strike
        kinds = DELAYED_OPTION_TICKS if delayed else LIVE_OPTION_TICKS
        for tick_type, price in zip(kinds[:3], (quote.bid, quote.ask, quote.last), strict=True):
            vol = implied_vol(option.right, price, spot, strike, years)
            at = model if vol is None else black_scholes(option.right, spot, strike, years, vol)
            session.send(
                messages.tick_option_computation(
                    req_id, tick_type, vol, at.delta, price, at.gamma, at.vega, at.theta, spot
                )
            )
        session.send(
            messages.tick_option_computation(
                req_id,
                kinds[3],
                option.vol,
                model.delta,
                model.price,
                model.gamma,
                model.vega,
                model.theta,
                spot,
            )
        )

    async def _market_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.market_interval_s)
            self.step_market()

    def step_market(self) -> None:
        """Advance prices and resting orders to now, and send market data that changed."""
        now = self.clock()
        self.route(self.exchange.advance(now))
        self._record_quotes(now)
        for s in list(self.sessions.values()):
            for req_id, con_id in list(s.subs.market_data.items()):
                self._send_quote(s, req_id, con_id)

    async def _pnl_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.pnl_interval_s)
            self.send_pnl()

    def send_pnl(self) -> None:
        """One round of the PnL and value-per-position streams."""
        for s in list(self.sessions.values()):
            for req_id, account in s.subs.pnl.items():
                s.send(messages.pnl(req_id, *self.exchange.pnl(account)))
            for req_id, (account, con_id) in s.subs.pnl_single.items():
                s.send(self._pnl_single(req_id, account, con_id))

    async def _portfolio_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.portfolio_interval_s)
            self.send_portfolio()

    def send_portfolio(self) -> None:
        """One round of the portfolio stream (updatePortfolio of every position, as IB every
        three minutes)."""
        for s in list(self.sessions.values()):
            if s.subs.account_updates is not None:
                for pos in self.exchange.positions(s.subs.account_updates):
                    s.send(self._portfolio(pos))

    # ---- faults ----------------------------------------------------------------------------

    def broadcast_error(self, code: int, message: str) -> None:
        for s in list(self.sessions.values()):
            s.send(self._error(NO_VALID_ID, code, message))

    async def drop_all_clients(self, seconds: float) -> None:
        """Close every connection and refuse new ones for `seconds` (a network drop)."""
        log.warning("fault: dropping all clients for %.1f s", seconds)
        await self._close_listener()
        for s in list(self.sessions.values()) + list(self._pending):
            s.close()
            self._forget(s)
        await asyncio.sleep(seconds)
        await self._listen()
        log.warning("fault over: accepting clients again on port %d", self._port)

    def connectivity_lost(self) -> None:
        """Error 1100 to every client; the sockets stay up."""
        log.warning("fault: connectivity between IB and the gateway lost (1100)")
        self.connectivity_ok = False
        self.broadcast_error(1100, "Connectivity between IB and Trader Workstation has been lost.")

    def connectivity_restored(self, *, data_lost: bool = False) -> None:
        """Error 1101 (data lost: clients must resubscribe) or 1102 (data kept)."""
        self.connectivity_ok = True
        if data_lost:
            log.warning("fault over: connectivity restored, data lost (1101)")
            for s in self.sessions.values():
                s.subs = _Subscriptions()
            self.broadcast_error(
                1101, "Connectivity between IB and TWS has been restored- data lost.*"
            )
        else:
            log.warning("fault over: connectivity restored, data maintained (1102)")
            self.broadcast_error(
                1102,
                "Connectivity between IB and Trader Workstation has been restored - "
                "data maintained.",
            )

    def reject_orders(
        self, predicate: Callable[[OrderRequest, Instrument], str | None] | None
    ) -> None:
        """Reject (201) each order for which `predicate` gives a reason; None lifts the filter."""
        log.warning("fault: order reject filter %s", "set" if predicate else "cleared")
        self.exchange.set_reject_filter(predicate)

    def set_read_only(self, enabled: bool = True) -> None:
        """TWS's "Read-Only API" setting: while on, placeOrder, cancelOrder and reqGlobalCancel
        are refused with error 321 ("... API interface is currently in Read-Only mode")."""
        log.warning("fault: Read-Only API %s", "on" if enabled else "off")
        self.read_only = enabled

    def set_clock(self, when: float) -> None:
        """Move the simulated wall clock to `when` (epoch seconds); prices, sessions and held
        orders catch up at once (orders the new session releases may fill)."""
        self._sim_clock().set(when)
        log.warning("clock: set to %s", time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(when)))
        self.step_market()

    def advance_clock(self, seconds: float) -> None:
        """Move the simulated wall clock `seconds` forward, as `set_clock`."""
        self.set_clock(self.clock() + seconds)

    def _sim_clock(self) -> SimClock:
        if not isinstance(self.clock, SimClock):
            raise TypeError("this gateway runs on a clock that cannot be moved (not a SimClock)")
        return self.clock

    def fault_market_data_error(self, con_ids: Iterable[int], code: int | None) -> None:
        """reqMktData of these contracts answered with error `code` (354, 10167, 10197), or
        normally again when None. 10167 still subscribes (IB shows delayed data)."""
        for con_id in con_ids:
            if code is None:
                self.market_data_errors.pop(con_id, None)
            else:
                if code not in MARKET_DATA_ERRORS:
                    raise ValueError(f"no market data error {code}")
                self.market_data_errors[con_id] = code
        log.warning("fault: market data requests answered with %s", code or "data")

    def delay_positions(self, seconds: float) -> None:
        log.warning("fault: position updates delayed by %.2f s", seconds)
        self.position_delay_s = seconds

    def duplicate_positions(self, copies: int) -> None:
        log.warning("fault: every position update sent %d extra time(s)", copies)
        self.position_duplicates = copies

    def omit_fields(self, omission: FieldOmission) -> None:
        """Leave fields out of messages until `restore_fields(omission)` (the `omit_fields`
        fault; see `FieldOmission`)."""
        log.warning(
            "fault: fields omitted %s for %s",
            {k: sorted(v) for k, v in omission.fields.items()},
            sorted(omission.con_ids) or "every contract",
        )
        self.field_omissions.append(omission)

    def restore_fields(self, omission: FieldOmission) -> None:
        """End one `omit_fields` fault (nothing is re-sent: clients ask again, or wait for the
        next update)."""
        with contextlib.suppress(ValueError):
            self.field_omissions.remove(omission)
            log.warning("fault: fields no longer omitted %s", sorted(omission.fields))

    def _record_quotes(self, now: float) -> None:
        for instrument in self.exchange.instruments:
            history = self._quote_history.setdefault(instrument.con_id, deque())
            history.append((now, self.exchange.quote(instrument.con_id)))
            while len(history) > 1 and history[0][0] < now - QUOTE_HISTORY_S:
                history.popleft()

    def lagging_quote(self, con_id: int) -> Quote | None:
        """What a market-data fault lets through for a contract now: nothing when frozen, the
        quote of `lag_s` ago when lagging (live data when there is no fault)."""
        fault = self.market_data_faults.get(con_id)
        if fault is None:
            return self.exchange.quote(con_id)
        if fault.lag_s is None:
            return None
        history = self._quote_history.get(con_id)
        if not history:
            return None
        return _quote_at(history, self.clock() - fault.lag_s)

    def quote_history_s(self, con_id: int) -> float:
        """How many seconds of a contract's quotes the gateway holds (bounds a lag)."""
        history = self._quote_history.get(con_id)
        return 0.0 if not history else self.clock() - history[0][0]

    def fault_market_data(
        self, con_ids: Iterable[int], *, lag_s: float | None, delayed_ticks: bool = False
    ) -> None:
        """Freeze (`lag_s` None: no ticks at all, new subscriptions included) or lag the market
        data of these contracts by `lag_s` seconds (at most `QUOTE_HISTORY_S`), as IB's delayed
        tick types (66-71, announced with marketDataType 3) when `delayed_ticks`. A lagging feed
        sends the quotes of `lag_s` ago from the gateway's own record (the oldest it has while
        it has run less than that). The market itself trades on."""
        if lag_s is not None and not 0 < lag_s <= QUOTE_HISTORY_S:
            raise ValueError(f"lag_s must be in (0, {QUOTE_HISTORY_S}]")
        self._record_quotes(self.clock())
        for con_id in con_ids:
            log.warning(
                "fault: market data of %d %s",
                con_id,
                "frozen" if lag_s is None else f"{lag_s:.1f} s behind",
            )
            fault = MarketDataFault(lag_s, delayed_ticks and lag_s is not None)
            self.market_data_faults[con_id] = fault
            if fault.delayed_ticks:
                self._announce_data_type(con_id, DELAYED_DATA)

    def clear_market_data_fault(self, con_ids: Iterable[int]) -> None:
        """Live market data again for these contracts: the current quote goes out at once."""
        for con_id in con_ids:
            fault = self.market_data_faults.pop(con_id, None)
            if fault is None:
                continue
            log.warning("fault: market data of %d live again", con_id)
            if fault.delayed_ticks:
                self._announce_data_type(con_id, REAL_TIME_DATA)
            for s in list(self.sessions.values()):
                for req_id, sub_con in list(s.subs.market_data.items()):
                    if sub_con == con_id:
                        self._send_quote(s, req_id, con_id, force=True)

    def _announce_data_type(self, con_id: int, data_type: int) -> None:
        for s in list(self.sessions.values()):
            for req_id, sub_con in list(s.subs.market_data.items()):
                if sub_con == con_id:
                    s.send(messages.market_data_type(req_id, data_type))

    def jump_price(self, con_id: int, fraction: float) -> None:
        log.warning("fault: price of %d jumps by %+.1f %%", con_id, fraction * 100)
        self.route(self.exchange.jump_price(con_id, fraction, self.clock()))

    def set_volatility(self, con_id: int, daily_vol: float) -> None:
        log.warning("fault: volatility of %d set to %.4f per day", con_id, daily_vol)
        self.exchange.set_volatility(con_id, daily_vol)

    def change_margin(self, multiplier: float) -> None:
        log.warning("fault: margin requirements x%.2f", multiplier)
        self.exchange.set_margin_multiplier(multiplier)
        for account in self.exchange.accounts:
            self._route_account_values(account, self.exchange.account_values(account))

    async def freeze(self, seconds: float) -> None:
        """Silent TCP death for `seconds`: nothing is read from or written to any connection
        (new ones included), and none is closed. The exchange keeps trading. Afterwards what
        clients sent is read and what was held back is sent, as TCP would once the path heals;
        a client that gave up and closed meanwhile is then seen to be gone."""
        await self.start_freeze(seconds)

    def start_freeze(self, seconds: float) -> asyncio.Task[None]:
        """`freeze` frozen from this instant; the task thaws the gateway after `seconds`. For a
        message listener (`on_message`), which must freeze the gateway before the message it is
        told of is answered: a task of `freeze` would only start at the loop's next turn."""
        if seconds <= 0:
            raise ValueError("seconds must be positive")
        log.warning("fault: every connection frozen for %.1f s", seconds)
        self.freezes += 1
        self.frozen = True
        self._thawed.clear()
        thaw = asyncio.ensure_future(asyncio.sleep(seconds))
        thaw.add_done_callback(lambda _: self._thaw())  # cancelled too: never left frozen
        return thaw

    def _thaw(self) -> None:
        self.frozen = False
        for s in list(self.sessions.values()) + list(self._pending):
            s.release_held()
        self._thawed.set()
        log.warning("fault over: connections thawed")

    def split_modifies(self, enabled: bool = True) -> None:
        """While connectivity is lost (after `connectivity_lost`, before it is restored), a
        placeOrder that re-uses a working order's id creates a NEW order instead of modifying
        it: the original keeps working, so the client now has two orders."""
        log.warning(
            "fault: modifications during a connectivity loss %s", "split" if enabled else "normal"
        )
        self.split_modifies_enabled = enabled

    def opening_auction(self) -> None:
        """The opening auction: OPG orders execute or are cancelled."""
        log.warning("market: opening auction")
        self.route(self.exchange.opening_auction(self.clock()))

    def closing_auction(self) -> None:
        """The closing auction: MOC orders execute, LOC orders execute or are cancelled."""
        log.warning("market: closing auction")
        self.route(self.exchange.closing_auction(self.clock()))

    def expire_day_orders(self) -> None:
        """The trading day ends: DAY and OPG orders are cancelled; GTC orders keep working."""
        log.warning("market: DAY orders expire")
        self.route(self.exchange.expire_day_orders(self.clock()))

    def liquidate(self, account: str, con_id: int, quantity: float, *, client_id: int = 0) -> None:
        """IB itself closes `quantity` of a position (a margin liquidation): an execution of a
        TWS order (order id 0, `client_id`, orderRef "IB liquidation") at the touch, never past
        zero. Its openOrder, orderStatus, execDetails go to `client_id` and the Master client."""
        log.warning("fault: IB liquidates %s of %d in %s", _qty(quantity), con_id, account)
        self.liquidations += 1
        self.route(
            self.exchange.liquidate(account, con_id, quantity, self.clock(), client_id=client_id)
        )

    async def daily_reset(self, seconds: float) -> None:
        """IB's daily server reset: error 1100 to every client, then every connection dropped
        and refused for `seconds`; afterwards clients reconnect to a healthy gateway."""
        log.warning("fault: daily reset for %.1f s", seconds)
        self.connectivity_lost()
        await asyncio.sleep(0)  # let the 1100 reach the sockets before they close
        for s in list(self.sessions.values()):
            with contextlib.suppress(Exception):
                await s.writer.drain()
        try:
            await self.drop_all_clients(seconds)
        finally:
            self.connectivity_ok = True

    async def cancel_orders_while_dropped(
        self, seconds: float, *, client_id: int | None = None
    ) -> int:
        """Someone else cancels a client's orders while it is cut off: every connection is
        closed and new ones refused for `seconds`; right after the drop the working orders of
        `client_id` (of every client when None) are cancelled, as a person in TWS or IB itself
        would. The owner learns of it only from what it downloads on reconnect (no 202, no
        orderStatus reach a closed socket). Returns how many orders were cancelled."""
        who = "every client" if client_id is None else f"client {client_id}"
        log.warning("fault: clients dropped for %.1f s; orders of %s cancelled", seconds, who)
        await self._close_listener()
        for s in list(self.sessions.values()) + list(self._pending):
            s.close()
            self._forget(s)
        events = self.exchange.cancel_orders_of(client_id, self.clock())
        self.route(events)
        await asyncio.sleep(seconds)
        await self._listen()
        log.warning("fault over: accepting clients again on port %d", self._port)
        return len(events)

    async def restart(self, down_seconds: float, *, next_order_id: int | None = None) -> None:
        """Restart the gateway: clients dropped, port closed, and order ids maybe rolled back.

        Working orders live at IB, not in the gateway, so they survive the restart.
        """
        if next_order_id is not None:
            # The gateway forgets the ids its clients have seen; orders (at IB) stay working,
            # and ids reported to a client again count again.
            log.warning("fault: restart with order ids rolled back to %d", next_order_id)
            self._id_floor.clear()
            self._id_floor_default = next_order_id - 1
            self.save_state()
        await self.drop_all_clients(down_seconds)


def read_request(payload: bytes, version: int) -> Request:
    """One client frame's payload at a negotiated `version` as the handlers read it. Raises
    FrameError for a frame without a readable message id, ProtoDecodeError for a protobuf body
    that does not parse or whose request the gateway does not read."""
    msg_id, body = split_message(payload, version)
    if isinstance(body, list):
        return Request(msg_id, body, version)
    decoded = protocodec.decode_request(msg_id, body)
    if isinstance(decoded, codec.PlacedOrder):
        fields = [str(msg_id), str(decoded.order.order_id)]
        return Request(msg_id, fields, codec.SERVER_VERSION, decoded)
    return Request(msg_id, decoded, codec.SERVER_VERSION)


def _version_range(text: str) -> tuple[int, int] | None:
    """(min, max) of a handshake's `v<min>[..<max>][ options]`; None when it is not one."""
    match = _VERSION_RANGE.match(text)
    if match is None:
        return None
    try:
        return int(match.group(1)), int(match.group(2) or match.group(1))
    except ValueError:  # more digits than int() converts
        return None


def _unsupported(placed: codec.PlacedOrder) -> str | None:
    """Why the simulator will not take this order (it would rather refuse than half-execute)."""
    if placed.what_if:
        return "what-if orders are not simulated"
    if placed.features:
        return "not simulated: " + ", ".join(placed.features)
    return None


def _int(fields: list[str], index: int) -> int:
    try:
        text = fields[index]
        return int(text) if text else 0
    except (IndexError, ValueError) as exc:
        raise codec.CodecError(f"field {index} is not an integer") from exc


def _str(fields: list[str], index: int) -> str:
    return fields[index] if index < len(fields) else ""


def _qty(q: float) -> str:
    return str(int(q)) if float(q).is_integer() else str(q)
