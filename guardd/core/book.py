"""The Book: guardd's picture of one IB account, folded incrementally from broker events.

`Book.fold(event)` is O(1) amortised per event: running totals (gross position value per currency,
count of working orders, new-order rate windows) are adjusted as events arrive, never recomputed
over all positions or orders. The only O(n) steps are the re-sync sweeps at the End barriers after
a (re)connect, once per connection.

Design choice: the Book is a mutable object owned by one task, and every read returns frozen
values (`Position`, `Order`, `Quote`, `Exposure`) or read-only mapping views, so rules and the
planner can hold what they read without it changing under them.

Scope: positions, account values and PnL are totalled for the guarded `account` only (one guardd
guards one account; a multi-account login's other positions are kept but not totalled). Orders of
every account and client are kept, because reqGlobalCancel reaches all of them.

Own orders: guardd's own close orders are known by identity, never by their orderRef. The
executor claims each order id it allocates (`claim_order_id`, before the order is sent); an order
is guardd's own when it was placed by guardd's API client id with a claimed order id, or carries
the permId learned for one. The orderRef `guardd:...` is a label for people: a foreign order that
carries it is checked and swept like any other, and reported once as an `ImpersonatingOrder`.

Sync: after `Connected` (or a 1101 "data lost" restore) the Book is unsynced until both
`PositionsEnd` and `OpenOrdersEnd` arrive; at those barriers positions and orders that were not
re-reported since the (re)connect are swept away. Nothing else is cleared: prices and account
values keep their timestamps, and the rules judge their age. `executions_synced` says whether
the executions download of the current connection has ended (`ExecutionsEnd`): the close
episode judges a child the broker stopped reporting only once every fill of it is in.

Unknown quantities: a position update whose quantity IB left unset (NaN, see `events`) is never
folded as a number or as 0. The position keeps its last known figure (NaN when none was ever
received) and is marked unknown (`unknown_since`) until a figure arrives: it counts as held
and as unvalued (the exposure cannot be trusted), it is not swept at `PositionsEnd` (it was
reported), and the close episode neither anchors on it nor confirms it flat. When a positions
download asked for again (`PositionsListed`) no longer lists it, it is gone, as at a re-sync;
so is a known position that download did not list and that no message has named since it was
asked for (IB lists every position it holds). `positions_listed_asked` keeps when the last such
download was asked for: a figure received since then is at least as new as IB's answer (the
close episode trusts a figure farther from its target than the fills only on that evidence).
An order status or order terms with an unset fill count, remaining quantity, average fill price
or order quantity keep the last known value.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, replace
from types import MappingProxyType
from typing import assert_never

from guardd.core.events import (
    AccountDownloadEnd,
    AccountValue,
    ApiReadOnly,
    BrokerEvent,
    BrokerMessage,
    ClientId,
    ConId,
    Connected,
    ConnectivityLost,
    ConnectivityRestored,
    ContractHours,
    Disconnected,
    Execution,
    ExecutionsEnd,
    Heartbeat,
    OpenOrder,
    OpenOrdersEnd,
    OptionComputation,
    OptionSource,
    OrderId,
    OrderStatus,
    PermId,
    PnLUpdate,
    PortfolioValue,
    PositionsEnd,
    PositionsListed,
    PositionUpdate,
    PositionValue,
    PriceField,
    PriceTick,
    ServerTime,
    SizeTick,
)
from guardd.core.hours import MarketHours, Session
from guardd.core.ibcodes import TERMINAL_STATUSES
from guardd.core.planner import ORDER_REF_PREFIX
from guardd.core.pricing import ClosePrices, PricePoint

"""Order statuses after which an order no longer works (Inactive counts as done: rejected)."""

BASE = "BASE"
NO_CONTRACT = ConId(0)

PORTFOLIO_MAX_AGE_S = 200.0
"""How old a position value from the account-updates stream (`PortfolioValue`) may be and still
count as current: IB sends each position again when it changes and otherwise at a fixed interval
of three minutes; 20 s of slack on top. Older, and nothing newer came: the value is stale."""

BASE_CURRENCY_KEYS = frozenset(
    {
        "AvailableFunds",
        "BuyingPower",
        "EquityWithLoanValue",
        "ExcessLiquidity",
        "GrossPositionValue",
        "InitMarginReq",
        "MaintMarginReq",
        "NetLiquidation",
        "TotalCashValue",
    }
)
"""Account values TWS reports in the account's base currency only, the currency named with
them: what names the base currency (per-currency rows come as `...ByCurrency`, `CashBalance`,
`TotalCashBalance`, `ExchangeRate`, `Currency`, with `BASE` for the base-currency total)."""


@dataclass(frozen=True, slots=True)
class Position:
    """One position as the broker confirmed it, with its latest market value.

    `value` is signed, in the position's own `currency`, or None while unknown (no price, no
    pnlSingle and no portfolio value yet); `value_ts` is when the price or value behind it was
    received, whichever source it came from (the latest wins); `portfolio_ts` is when the
    account-updates stream last valued it (see `value_fresh`).
    """

    account: str
    con_id: ConId
    symbol: str
    sec_type: str
    currency: str
    multiplier: float
    exchange: str
    quantity: float
    avg_cost: float
    updated: float
    value: float | None = None
    value_ts: float | None = None
    daily_pnl: float | None = None
    portfolio_ts: float | None = None
    generation: int = 0
    unknown_since: float | None = None  # when its quantity last arrived unset (None: known)
    # an option's terms (NaN / "" when not an option or not reported): strike, right "C"/"P",
    # expiry in epoch seconds
    strike: float = math.nan
    right: str = ""
    expiry: float = math.nan

    @property
    def known(self) -> bool:
        """Whether `quantity` is the broker's current figure (False: IB left the latest one
        unset; `quantity` is then the last known figure, or NaN when there never was one)."""
        return self.unknown_since is None

    @property
    def held(self) -> bool:
        """Non-zero, or unknown (it may be)."""
        return self.quantity != 0 or not self.known


@dataclass(frozen=True, slots=True)
class Order:
    """One order keyed by permId. `has_terms` is False while only orderStatus has been seen."""

    perm_id: PermId
    order_id: OrderId
    client_id: ClientId
    status: str
    first_seen: float
    updated: float
    has_terms: bool = False
    account: str = ""
    con_id: ConId = NO_CONTRACT
    symbol: str = ""
    sec_type: str = ""
    action: str = ""
    quantity: float = math.nan
    order_type: str = ""
    lmt_price: float = math.nan
    aux_price: float = math.nan
    trail_stop_price: float = math.nan
    trailing_percent: float = math.nan
    tif: str = ""
    outside_rth: bool = False
    parent_id: int = 0
    oca_group: str = ""
    order_ref: str = ""
    currency: str = ""
    multiplier: float = 1.0
    filled: float = 0.0
    remaining: float = math.nan
    avg_fill_price: float = math.nan
    generation: int = 0

    @property
    def working(self) -> bool:
        """True until the order reaches a terminal status (filled, cancelled, inactive)."""
        return self.status not in TERMINAL_STATUSES


@dataclass(frozen=True, slots=True)
class ImpersonatingOrder:
    """A foreign order labelled as one of guardd's own (orderRef `guardd:...`): someone other than
    the guard placed it, or the guard's client id with an order id the guard never allocated."""

    perm_id: PermId
    order_id: OrderId
    client_id: ClientId
    order_ref: str
    account: str
    symbol: str
    ts: float


@dataclass(frozen=True, slots=True)
class Quote:
    """Latest prices of one contract; NaN where a field was never received.

    `ts` is when any field last ticked; `bid_ts` ... `mark_ts` when each field's price was last
    heard to stand (its price tick, or a size tick at that price); `delayed` names the fields
    whose latest tick was IB's delayed or frozen market data.
    """

    bid: float = math.nan
    ask: float = math.nan
    last: float = math.nan
    mark: float = math.nan
    ts: float = math.nan
    bid_ts: float = math.nan
    ask_ts: float = math.nan
    last_ts: float = math.nan
    mark_ts: float = math.nan
    delayed: frozenset[PriceField] = frozenset()

    def close_prices(self) -> ClosePrices:
        """The prices a close limit may be derived from, each with its time (see pricing)."""

        def point(price: float, ts: float, name: PriceField) -> PricePoint | None:
            if not (math.isfinite(price) and price > 0):
                return None
            return PricePoint(price, ts, name in self.delayed)

        return ClosePrices(
            bid=point(self.bid, self.bid_ts, "bid"),
            ask=point(self.ask, self.ask_ts, "ask"),
            last=point(self.last, self.last_ts, "last"),
            mark=point(self.mark, self.mark_ts, "mark"),
        )

    @property
    def reference(self) -> float:
        """Price to value a position with: mark, else last, else the bid/ask midpoint, else NaN."""
        if math.isfinite(self.mark) and self.mark > 0:
            return self.mark
        if math.isfinite(self.last) and self.last > 0:
            return self.last
        if math.isfinite(self.bid) and math.isfinite(self.ask) and self.bid > 0 and self.ask > 0:
            return (self.bid + self.ask) / 2.0
        return math.nan


@dataclass(frozen=True, slots=True)
class Exposure:
    """Gross position value of the guarded account in the base currency.

    `gross` is None when it cannot be trusted: `missing_rates` lists currencies held without an
    ExchangeRate, `unvalued` counts non-zero positions without a value.
    """

    gross: float | None
    missing_rates: tuple[str, ...]
    unvalued: int


@dataclass(frozen=True, slots=True)
class Sample:
    """A timestamped number (an account value, a PnL figure)."""

    value: float
    ts: float


@dataclass(frozen=True, slots=True)
class MarginChange:
    """The last two MaintMarginReq readings and the positions version at each."""

    previous: float
    previous_positions_version: int
    current: float
    current_positions_version: int
    ts: float


class RateWindow:
    """Timestamps of events within the last `span` seconds; O(1) amortised per add and count."""

    __slots__ = ("_times", "span")

    def __init__(self, span: float) -> None:
        self.span = span
        self._times: deque[float] = deque()

    def add(self, ts: float) -> None:
        """Record one event at `ts` and drop those older than the span."""
        self._times.append(ts)
        self._expire(ts)

    def count(self, now: float) -> int:
        """Events in (now - span, now]; drops expired ones (calls must use non-decreasing `now`)."""
        self._expire(now)
        return len(self._times)

    def _expire(self, now: float) -> None:
        times = self._times
        while times and times[0] <= now - self.span:
            times.popleft()


def _first_seen(key: PermId, event: OpenOrder | OrderStatus) -> Order:
    """A new order as its first message (openOrder or orderStatus) reveals it."""
    return Order(
        perm_id=key,
        order_id=event.order_id,
        client_id=event.client_id,
        status=event.status,
        first_seen=event.ts,
        updated=event.ts,
    )


def parse_number(text: str) -> float:
    """Parse an IB account value string; NaN when it is not a number."""
    try:
        return float(text)
    except ValueError:
        return math.nan


class Book:
    """Positions, orders, account values, PnL and prices of one guarded IB account.

    `fold(event)` applies one broker event; reads return frozen values.
    """

    def __init__(
        self,
        account: str,
        base_currency: str | None = None,
        *,
        created_at: float,
        rate_windows_s: tuple[float, ...] = (1.0, 60.0),
        price_history_s: float = 900.0,
        price_sample_s: float = 1.0,
        own_client_id: ClientId | None = None,
    ) -> None:
        self.account = account
        # guardd's own API client id: with a claimed order id, what makes an order its own
        self.own_client_id = own_client_id
        # The account's base currency, as IB names it with the values it reports in it
        # (`BASE_CURRENCY_KEYS`); None until then: no currency converts (no rate is assumed).
        self.base_currency = base_currency
        self.created_at = created_at
        self.rate_windows_s = rate_windows_s
        self.price_history_s = price_history_s
        self.price_sample_s = price_sample_s

        # connection and sync
        self.connected = False
        self.disconnected_since: float | None = created_at
        self.server_lost_since: float | None = None
        self.generation = 0
        self.positions_synced = False
        self.orders_synced = False
        self.executions_synced = False  # the executions download of this connection has ended
        self.account_download_done = False  # the account-updates download of this connection
        self.managed_accounts: tuple[str, ...] = ()
        self.next_order_id = 0
        self.server_version = 0
        self.last_event_ts: float | None = None
        self.last_error: BrokerMessage | None = None
        # TWS's Read-Only API: orders and cancels are refused (error 321); since when (None: not)
        self.read_only_since: float | None = None

        # positions and running totals (guarded account only)
        self._positions: dict[tuple[str, ConId], Position] = {}
        self._gross_local: dict[str, float] = {}
        self._valued_count: dict[str, int] = {}
        self._unvalued = 0
        self._nonzero = 0
        self.positions_version = 0
        self.positions_listed_asked: float | None = None  # the last relisting's request time

        # account values, PnL, equity
        self._values: dict[tuple[str, str], Sample] = {}
        self._margin_change: MarginChange | None = None
        self.pnl_daily: Sample | None = None
        self._start_of_day: float | None = None
        self._peak_equity: float | None = None
        self._equity_history: deque[tuple[float, float]] = deque()

        # prices
        self._quotes: dict[ConId, Quote] = {}
        self._price_history: dict[ConId, deque[tuple[float, float]]] = {}
        # options: IB's latest model computation per contract and the price it was made at
        self._option_computations: dict[tuple[ConId, OptionSource], OptionComputation] = {}

        # own orders: order ids the guard allocated (with the permId once learned), and back
        self._claimed: dict[OrderId, PermId | None] = {}
        self._own_perms: dict[PermId, OrderId] = {}
        # foreign orders labelled `guardd:`: reported once per order
        self._impersonating: set[PermId] = set()
        self._impersonations_unreported: list[ImpersonatingOrder] = []
        self.impersonations_seen = 0
        self.last_impersonation: ImpersonatingOrder | None = None

        # orders
        self._orders: dict[PermId, Order] = {}
        self._working: set[PermId] = set()
        # Working orders that are not guardd's own close orders (by identity, `is_own`) and whose
        # terms are known: what a sweep while HALTED must cancel. Kept apart so that guardd's
        # flatten children never trigger a sweep that would cancel them.
        self._working_foreign: set[PermId] = set()
        self.foreign_order_seq = 0
        self._provisional: dict[tuple[ClientId, OrderId], PermId] = {}
        self._perm_by_client_order: dict[tuple[ClientId, OrderId], PermId] = {}
        self._next_provisional = -1
        self.order_seq = 0
        self._rates_total = tuple(RateWindow(s) for s in rate_windows_s)
        self._rates_by_client: dict[ClientId, tuple[RateWindow, ...]] = {}

        # fills and heartbeats
        self._executions: dict[str, Execution] = {}
        self._heartbeats: dict[str, float] = {}
        self._heartbeats_watched_since: dict[str, float] = {}
        # The gateway's clock minus ours (currentTime); market hours are judged at its time.
        self.server_offset_s = 0.0
        self.market_hours: dict[ConId, MarketHours] = {}

    # ------------------------------------------------------------------ folding

    def market_session(self, con_id: int, now: float) -> Session:
        """The contract's session at guardd's `now` judged at the gateway's clock; "unknown"
        without contract hours covering that instant."""
        hours = self.market_hours.get(ConId(con_id))
        if hours is None:
            return "unknown"
        return hours.session_at(now + self.server_offset_s)

    def fold(self, event: BrokerEvent) -> None:
        """Apply one broker event to the Book (O(1) amortised, except the re-sync sweeps)."""
        if not isinstance(event, Heartbeat):
            self.last_event_ts = event.ts  # a bot's heartbeat says nothing about IB's data
        match event:
            case Connected():
                self._on_connected(event)
            case Disconnected():
                self.connected = False
                self.positions_synced = False
                self.orders_synced = False
                self.executions_synced = False
                if self.disconnected_since is None:
                    self.disconnected_since = event.ts
            case ConnectivityLost():
                if self.server_lost_since is None:
                    self.server_lost_since = event.ts
            case ConnectivityRestored():
                self.server_lost_since = None
                if event.data_lost:
                    self._begin_resync()
            case PositionUpdate():
                self._on_position(event)
            case PositionsEnd():
                self._on_positions_end()
            case PositionsListed():
                self._on_positions_listed(event)
            case AccountValue():
                self._on_account_value(event)
            case AccountDownloadEnd():
                # each account value counts from its own arrival; the download's end says every
                # position has been valued once (updatePortfolio comes with it)
                if event.account == self.account:
                    self.account_download_done = True
            case PnLUpdate():
                self._on_pnl(event)
            case PositionValue():
                self._on_position_value(event)
            case PortfolioValue():
                self._on_portfolio_value(event)
            case PriceTick():
                self._on_price(event)
            case SizeTick():
                self._on_size(event)
            case OptionComputation():
                self._option_computations[(event.con_id, event.source)] = event
            case OpenOrder():
                self._on_open_order(event)
            case OrderStatus():
                self._on_order_status(event)
            case OpenOrdersEnd():
                self._on_open_orders_end()
            case Execution():
                known = self._executions.get(event.exec_id)
                # Each execId once; a copy with its shares known replaces one IB left unset.
                if known is None or (math.isnan(known.shares) and not math.isnan(event.shares)):
                    self._executions[event.exec_id] = event
                self._learn_perm(event.perm_id, event.client_id, event.order_id)
            case ExecutionsEnd():
                self.executions_synced = True
            case BrokerMessage():
                self.last_error = event
            case ApiReadOnly(read_only=read_only):
                if not read_only:
                    self.read_only_since = None
                elif self.read_only_since is None:
                    self.read_only_since = event.ts
            case ServerTime(server_time=server_time, ts=ts):
                self.server_offset_s = server_time - ts
            case ContractHours(con_id=con_id, hours=hours):
                self.market_hours[con_id] = hours
            case Heartbeat():
                self._heartbeats[event.bot] = event.ts
            case _:
                assert_never(event)

    def _on_connected(self, event: Connected) -> None:
        self.connected = True
        self.disconnected_since = None
        self.server_lost_since = None
        self.managed_accounts = event.managed_accounts
        self.next_order_id = event.next_order_id
        self.server_version = event.server_version
        self.account_download_done = False
        self._begin_resync()

    def _begin_resync(self) -> None:
        self.generation += 1
        self.positions_synced = False
        self.orders_synced = False
        self.executions_synced = False

    # positions -------------------------------------------------------------

    def _on_position(self, event: PositionUpdate) -> None:
        key = (event.account, event.con_id)
        old = self._positions.get(key)
        if math.isnan(event.quantity):
            self._on_unknown_quantity(key, old, event)
            return
        value: float | None
        value_ts: float | None
        if event.quantity == 0:
            value, value_ts = 0.0, event.ts
        elif old is not None and old.known and old.value is not None and old.quantity != 0:
            # same implied price, new size
            value, value_ts = old.value * (event.quantity / old.quantity), old.value_ts
        else:
            price = self.quote(event.con_id).reference
            if math.isfinite(price):
                value = event.quantity * event.multiplier * price
                value_ts = self._quotes[event.con_id].ts
            else:
                value, value_ts = None, None
        new = Position(
            account=event.account,
            con_id=event.con_id,
            symbol=event.symbol,
            sec_type=event.sec_type,
            currency=event.currency,
            multiplier=event.multiplier,
            exchange=event.exchange,
            quantity=event.quantity,
            avg_cost=event.avg_cost,
            updated=event.ts,
            value=value,
            value_ts=value_ts,
            daily_pnl=old.daily_pnl if old is not None else None,
            portfolio_ts=old.portfolio_ts if old is not None else None,
            generation=self.generation,
            strike=event.strike,
            right=event.right,
            expiry=event.expiry,
        )
        if event.account == self.account and (
            old is None or not old.known or old.quantity != event.quantity
        ):
            self.positions_version += 1
        self._replace_position(key, old, new)

    def _on_unknown_quantity(
        self, key: tuple[str, ConId], old: Position | None, event: PositionUpdate
    ) -> None:
        """A position reported with its quantity unset: keep the last known figure, marked
        unknown, and its value unknown too; it stays held (it was reported) until a figure
        arrives."""
        if old is None:
            new = Position(
                account=event.account,
                con_id=event.con_id,
                symbol=event.symbol,
                sec_type=event.sec_type,
                currency=event.currency,
                multiplier=event.multiplier,
                exchange=event.exchange,
                quantity=math.nan,
                avg_cost=event.avg_cost,
                updated=event.ts,
                generation=self.generation,
                unknown_since=event.ts,
                strike=event.strike,
                right=event.right,
                expiry=event.expiry,
            )
        else:
            new = replace(
                old,
                value=None,
                value_ts=None,
                generation=self.generation,
                unknown_since=old.unknown_since if old.unknown_since is not None else event.ts,
            )
        if event.account == self.account and (old is None or old.known):
            self.positions_version += 1
        self._replace_position(key, old, new)

    def _replace_position(
        self, key: tuple[str, ConId], old: Position | None, new: Position | None
    ) -> None:
        """Swap one position and adjust the running totals by the difference only."""
        if old is not None and old.account == self.account:
            self._untally(old)
        if new is None:
            self._positions.pop(key, None)
        else:
            self._positions[key] = new
            if new.account == self.account:
                self._tally(new)

    def _tally(self, p: Position) -> None:
        if p.held:
            self._nonzero += 1
        if p.value is None:
            if p.held:
                self._unvalued += 1
            return
        self._gross_local[p.currency] = self._gross_local.get(p.currency, 0.0) + abs(p.value)
        self._valued_count[p.currency] = self._valued_count.get(p.currency, 0) + 1

    def _untally(self, p: Position) -> None:
        if p.held:
            self._nonzero -= 1
        if p.value is None:
            if p.held:
                self._unvalued -= 1
            return
        left = self._valued_count[p.currency] - 1
        if left == 0:
            # reset exactly so float drift cannot outlive the positions behind it
            del self._valued_count[p.currency]
            del self._gross_local[p.currency]
        else:
            self._valued_count[p.currency] = left
            self._gross_local[p.currency] -= abs(p.value)

    def _on_positions_end(self) -> None:
        if not self.positions_synced:
            stale = [k for k, p in self._positions.items() if p.generation < self.generation]
            for key in stale:
                old = self._positions[key]
                if old.account == self.account and old.held:
                    self.positions_version += 1
                self._replace_position(key, old, None)
        self.positions_synced = True

    def _on_positions_listed(self, event: PositionsListed) -> None:
        """A download asked for again has ended: a position it did not list is gone (an unknown
        one at any rate, a known one unless a message named it after the download was asked
        for)."""
        gone = [
            key
            for key, p in self._positions.items()
            if p.account == event.account
            and p.con_id not in event.con_ids
            and (not p.known or p.updated < event.asked)
        ]
        if event.account == self.account:
            self.positions_listed_asked = event.asked  # downloads end in the order asked
        for key in gone:
            old = self._positions[key]
            if old.account == self.account:
                self.positions_version += 1
            self._replace_position(key, old, None)

    def _on_position_value(self, event: PositionValue) -> None:
        key = (event.account, event.con_id)
        old = self._positions.get(key)
        if old is None:
            return  # the position message will come; a value alone has no currency
        value = event.value if math.isfinite(event.value) else None
        if not old.known:
            # A value of a position whose quantity is unknown is not trusted either.
            new = replace(old, daily_pnl=event.daily)
        elif value is None and old.quantity != 0:
            new = replace(old, daily_pnl=event.daily)
        else:
            new = replace(old, value=value, value_ts=event.ts, daily_pnl=event.daily)
        self._replace_position(key, old, new)

    def _on_portfolio_value(self, event: PortfolioValue) -> None:
        """updatePortfolio: the position's market value as of now, unless a newer value is held
        (a live price or pnlSingle received later wins: the latest received is the value)."""
        key = (event.account, event.con_id)
        old = self._positions.get(key)
        if old is None or not old.known or old.quantity == 0:
            return  # no position yet (no currency), an untrusted quantity, or flat (value 0)
        if not math.isfinite(event.market_value):
            return
        if old.value_ts is not None and event.ts < old.value_ts:
            return
        value = event.market_value
        if event.position != old.quantity:
            # The stream and the positions download disagree for a moment (a fill between
            # them): the position's figure counts, at the stream's price.
            if not math.isfinite(event.position) or event.position == 0:
                return
            value = event.market_value * (old.quantity / event.position)
        new = replace(old, value=value, value_ts=event.ts, portfolio_ts=event.ts)
        self._replace_position(key, old, new)

    # prices -----------------------------------------------------------------

    def _on_price(self, event: PriceTick) -> None:
        if not math.isfinite(event.price) or event.price <= 0:
            return  # IB sends -1 / 0 for "no price"; keep the last good one
        q = self._quotes.get(event.con_id, Quote())
        delayed = _mark_delayed(q.delayed, event.field, event.delayed)
        match event.field:
            case "bid":
                q = replace(q, bid=event.price, bid_ts=event.ts, ts=event.ts, delayed=delayed)
            case "ask":
                q = replace(q, ask=event.price, ask_ts=event.ts, ts=event.ts, delayed=delayed)
            case "last":
                q = replace(q, last=event.price, last_ts=event.ts, ts=event.ts, delayed=delayed)
            case "mark":
                q = replace(q, mark=event.price, mark_ts=event.ts, ts=event.ts, delayed=delayed)
            case _:
                assert_never(event.field)
        self._quotes[event.con_id] = q
        ref = q.reference
        if not math.isfinite(ref):
            return
        self._record_sample(self._price_history.setdefault(event.con_id, deque()), event.ts, ref)
        key = (self.account, event.con_id)
        old = self._positions.get(key)
        if old is not None and old.known and old.quantity != 0:
            new = replace(old, value=old.quantity * old.multiplier * ref, value_ts=event.ts)
            self._replace_position(key, old, new)

    def _on_size(self, event: SizeTick) -> None:
        """A size tick confirms the price at its field as of its time (never creates a price)."""
        q = self._quotes.get(event.con_id)
        if q is None:
            return
        delayed = _mark_delayed(q.delayed, event.field, event.delayed)
        match event.field:
            case "bid" if math.isfinite(q.bid):
                q = replace(q, bid_ts=event.ts, delayed=delayed)
            case "ask" if math.isfinite(q.ask):
                q = replace(q, ask_ts=event.ts, delayed=delayed)
            case "last" if math.isfinite(q.last):
                q = replace(q, last_ts=event.ts, delayed=delayed)
            case "mark" if math.isfinite(q.mark):
                q = replace(q, mark_ts=event.ts, delayed=delayed)
            case _:
                return
        self._quotes[event.con_id] = q

    def _record_sample(self, history: deque[tuple[float, float]], ts: float, x: float) -> None:
        """Keep at most one sample per `price_sample_s`, and only `price_history_s` of them."""
        if history and ts - history[-1][0] < self.price_sample_s:
            history[-1] = (history[-1][0], x)
        else:
            history.append((ts, x))
        while history and history[0][0] < ts - self.price_history_s:
            history.popleft()

    # account values and PnL ------------------------------------------------------

    def _on_account_value(self, event: AccountValue) -> None:
        if event.account != self.account:
            return
        number = parse_number(event.value)
        if event.key in BASE_CURRENCY_KEYS and event.currency not in ("", BASE):
            self.base_currency = event.currency  # IB's word wins over any assumption
        if event.key == "MaintMarginReq" and event.currency in (self.base_currency, BASE, ""):
            prev = self._values.get((event.key, event.currency))
            if prev is not None:
                prev_version = (
                    self._margin_change.current_positions_version
                    if self._margin_change is not None
                    else self.positions_version
                )
                self._margin_change = MarginChange(
                    previous=prev.value,
                    previous_positions_version=prev_version,
                    current=number,
                    current_positions_version=self.positions_version,
                    ts=event.ts,
                )
            else:
                self._margin_change = MarginChange(
                    previous=math.nan,
                    previous_positions_version=self.positions_version,
                    current=number,
                    current_positions_version=self.positions_version,
                    ts=event.ts,
                )
        self._values[(event.key, event.currency)] = Sample(number, event.ts)
        if event.key == "NetLiquidation":
            self._maybe_start_day(event.ts)

    def _on_pnl(self, event: PnLUpdate) -> None:
        if event.account != self.account:
            return
        self.pnl_daily = Sample(event.daily, event.ts)
        self._maybe_start_day(event.ts)
        self._track_equity(event.ts)

    def _maybe_start_day(self, ts: float) -> None:
        """Latch start-of-day net liquidation as NetLiq − daily PnL when both are first known."""
        if self._start_of_day is not None:
            return
        nl = self.net_liquidation
        if nl is None or self.pnl_daily is None:
            return
        if math.isfinite(nl.value) and math.isfinite(self.pnl_daily.value) and nl.value > 0:
            self._start_of_day = nl.value - self.pnl_daily.value
            self._track_equity(ts)

    def _track_equity(self, ts: float) -> None:
        equity = self.equity
        if equity is None:
            return
        if self._peak_equity is None or equity > self._peak_equity:
            self._peak_equity = equity
        self._record_sample(self._equity_history, ts, equity)

    def set_start_of_day(self, net_liquidation: float) -> None:
        """Set start-of-day net liquidation explicitly (a test's seam: the Book derives it from
        NetLiquidation minus IB's daily PnL, so a restart needs nothing restored)."""
        self._start_of_day = net_liquidation
        self._peak_equity = None
        self._equity_history.clear()

    def start_new_day(self) -> None:
        """Forget start-of-day equity and the intraday peak; they re-latch from the next values."""
        self._start_of_day = None
        self._peak_equity = None
        self._equity_history.clear()

    # orders -----------------------------------------------------------------

    def _resolve(self, perm_id: PermId, client_id: ClientId, order_id: OrderId) -> PermId:
        """Find the key of an order, re-keying a provisional (permId 0) order once its permId is
        known. Unknown orders with permId 0 get a negative provisional key."""
        co = (client_id, order_id)
        if perm_id != 0:
            prov = self._provisional.pop(co, None) if order_id != 0 else None
            if prov is not None and prov in self._orders:
                order = replace(self._orders.pop(prov), perm_id=perm_id)
                self._orders[perm_id] = order
                if prov in self._working:
                    self._working.discard(prov)
                    self._working.add(perm_id)
                if prov in self._working_foreign:
                    self._working_foreign.discard(prov)
                    self._working_foreign.add(perm_id)
                if prov in self._impersonating:
                    self._impersonating.discard(prov)
                    self._impersonating.add(perm_id)
            if order_id != 0:
                self._perm_by_client_order[co] = perm_id
            return perm_id
        known = self._perm_by_client_order.get(co) if order_id != 0 else None
        if known is not None:
            return known
        prov = self._provisional.get(co) if order_id != 0 else None
        if prov is None:
            prov = PermId(self._next_provisional)
            self._next_provisional -= 1
            if order_id != 0:
                self._provisional[co] = prov
        return prov

    def _store_order(self, key: PermId, old: Order | None, new: Order) -> None:
        if old is not None and not old.working:
            new = replace(new, status=old.status)  # terminal is final
        self._orders[key] = new
        if new.working:
            self._working.add(key)
        else:
            self._working.discard(key)
        self._learn_perm(key, new.client_id, new.order_id)
        own = self.is_own(new)
        self._classify(key, new, own)
        if old is None:
            self.order_seq += 1
            if self.orders_synced and not own:
                self._count_new_order(new.client_id, new.first_seen)

    def _classify(self, key: PermId, order: Order, own: bool) -> None:
        """Count a working foreign order for the sweep; report one labelled as ours, once."""
        if order.working and order.has_terms and not own:
            if key not in self._working_foreign:
                self.foreign_order_seq += 1
            self._working_foreign.add(key)
        else:
            self._working_foreign.discard(key)
        if (
            not own
            and order.has_terms
            and order.order_ref.startswith(ORDER_REF_PREFIX)
            and key not in self._impersonating
        ):
            self._impersonating.add(key)
            found = ImpersonatingOrder(
                perm_id=order.perm_id,
                order_id=order.order_id,
                client_id=order.client_id,
                order_ref=order.order_ref,
                account=order.account,
                symbol=order.symbol,
                ts=order.updated,
            )
            self.impersonations_seen += 1
            self.last_impersonation = found
            self._impersonations_unreported.append(found)

    def _learn_perm(self, perm_id: PermId, client_id: ClientId, order_id: OrderId) -> None:
        """Remember the permId of a claimed order the first time the broker reports it."""
        if (
            perm_id > 0
            and client_id == self.own_client_id
            and order_id in self._claimed
            and self._claimed[order_id] is None
            and perm_id not in self._own_perms
        ):
            self._claimed[order_id] = perm_id
            self._own_perms[perm_id] = order_id

    def _count_new_order(self, client_id: ClientId, ts: float) -> None:
        windows = self._rates_by_client.get(client_id)
        if windows is None:
            windows = tuple(RateWindow(s) for s in self.rate_windows_s)
            self._rates_by_client[client_id] = windows
        for w in windows:
            w.add(ts)
        for w in self._rates_total:
            w.add(ts)

    def _on_open_order(self, event: OpenOrder) -> None:
        key = self._resolve(event.perm_id, event.client_id, event.order_id)
        old = self._orders.get(key)
        base = old or _first_seen(key, event)
        new = replace(
            base,
            order_id=event.order_id or base.order_id,
            client_id=event.client_id,
            status=event.status or base.status,
            updated=event.ts,
            has_terms=True,
            account=event.account,
            con_id=event.con_id,
            symbol=event.symbol,
            sec_type=event.sec_type,
            action=event.action,
            quantity=_known(event.quantity, base.quantity),
            order_type=event.order_type,
            lmt_price=event.lmt_price,
            aux_price=event.aux_price,
            trail_stop_price=event.trail_stop_price,
            trailing_percent=event.trailing_percent,
            tif=event.tif,
            outside_rth=event.outside_rth,
            parent_id=event.parent_id,
            oca_group=event.oca_group,
            order_ref=event.order_ref,
            currency=event.currency,
            multiplier=event.multiplier,
            generation=self.generation,
        )
        self._store_order(key, old, new)

    def _on_order_status(self, event: OrderStatus) -> None:
        key = self._resolve(event.perm_id, event.client_id, event.order_id)
        old = self._orders.get(key)
        base = old or _first_seen(key, event)
        new = replace(
            base,
            order_id=event.order_id or base.order_id,
            status=event.status or base.status,
            updated=event.ts,
            filled=_known(event.filled, base.filled),
            remaining=_known(event.remaining, base.remaining),
            avg_fill_price=_known(event.avg_fill_price, base.avg_fill_price),
            generation=self.generation,
        )
        self._store_order(key, old, new)

    def _on_open_orders_end(self) -> None:
        if not self.orders_synced:
            # orders not re-reported since the (re)connect ended while we were away; order ids
            # may have rolled back after a gateway restart, so rebuild the id index too
            for key in [k for k, o in self._orders.items() if o.generation < self.generation]:
                self._working.discard(key)
                self._working_foreign.discard(key)
                self._impersonating.discard(key)
                del self._orders[key]
            self._perm_by_client_order = {
                (o.client_id, o.order_id): k
                for k, o in self._orders.items()
                if k > 0 and o.order_id != 0
            }
            self._provisional = {co: k for co, k in self._provisional.items() if k in self._orders}
        self.orders_synced = True

    # ------------------------------------------------------------------ reads

    @property
    def synced(self) -> bool:
        """True once connected and both End barriers arrived since the last (re)connect."""
        return self.connected and self.positions_synced and self.orders_synced

    @property
    def read_only(self) -> bool:
        """True while TWS's Read-Only API refuses orders and cancels (error 321)."""
        return self.read_only_since is not None

    @property
    def can_act(self) -> bool:
        """Whether a cancel or a close order sent now could work: connected to IB and the API
        not read-only."""
        return self.connected and not self.read_only

    @property
    def positions(self) -> Mapping[tuple[str, ConId], Position]:
        """All positions of every account, keyed by (account, con_id); read-only view."""
        return MappingProxyType(self._positions)

    def position(self, con_id: ConId, account: str | None = None) -> Position | None:
        """The position in `con_id` of `account` (default: the guarded account)."""
        return self._positions.get((account or self.account, con_id))

    def guarded_positions(self) -> Iterator[Position]:
        """Non-zero positions of the guarded account, and those whose quantity is unknown."""
        return (p for p in self._positions.values() if p.account == self.account and p.held)

    @property
    def position_count(self) -> int:
        """Number of non-zero (or unknown) positions in the guarded account (running count)."""
        return self._nonzero

    def unknown_positions(self) -> Iterator[Position]:
        """Positions of the guarded account whose latest quantity IB left unset."""
        return (p for p in self._positions.values() if p.account == self.account and not p.known)

    @property
    def orders(self) -> Mapping[PermId, Order]:
        """Every known order keyed by permId (negative: provisional, permId not yet known)."""
        return MappingProxyType(self._orders)

    def order(self, perm_id: PermId) -> Order | None:
        """The order with this permId, if known."""
        return self._orders.get(perm_id)

    def working_orders(self) -> Iterator[Order]:
        """Orders not yet filled, cancelled or inactive, of every client and account."""
        return (self._orders[k] for k in self._working)

    @property
    def working_order_count(self) -> int:
        """How many orders are working, across every client and account."""
        return len(self._working)

    @property
    def foreign_working_count(self) -> int:
        """Working orders with known terms that are not guardd's own close orders."""
        return len(self._working_foreign)

    # own orders --------------------------------------------------------------

    def claim_order_id(self, order_id: OrderId | int, perm_id: PermId | int | None = None) -> None:
        """Mark an order id as allocated by guardd, before the order is sent (or, after a
        restart, for the children the journal says a previous process sent, with the permId
        the journal recorded for it when known). Orders of `own_client_id` with this id are
        guardd's own from then on; with a permId, the order with that permId (and no other
        order re-using the id) is."""
        oid = OrderId(int(order_id))
        perm = PermId(int(perm_id)) if perm_id is not None and int(perm_id) > 0 else None
        if oid <= 0:
            return
        known = oid in self._claimed
        if not known:
            self._claimed[oid] = None
        if perm is not None and self._claimed[oid] is None and perm not in self._own_perms:
            self._claimed[oid] = perm
            self._own_perms[perm] = oid
            self._reclassify(perm)
        if known or self.own_client_id is None:
            return
        # Normally nothing is known yet; an order already reported is re-classified.
        co = (self.own_client_id, oid)
        key = self._perm_by_client_order.get(co, self._provisional.get(co))
        order = None if key is None else self._orders.get(key)
        if key is not None and order is not None:
            self._learn_perm(key, order.client_id, order.order_id)
            self._classify(key, order, self.is_own(order))

    def _reclassify(self, key: PermId) -> None:
        order = self._orders.get(key)
        if order is not None:
            self._classify(key, order, self.is_own(order))

    @property
    def claimed_order_ids(self) -> frozenset[OrderId]:
        """Every order id guardd claimed in this process."""
        return frozenset(self._claimed)

    def own_order_id(
        self, perm_id: PermId, client_id: ClientId, order_id: OrderId
    ) -> OrderId | None:
        """The claimed order id an order or a fill belongs to, or None when it is not guardd's.

        Own: the permId learned for a claimed id, or guardd's client id with a claimed id whose
        permId is not known yet (or not reported: provisional). A claimed id reported with
        another permId than the one learned is someone else's order.
        """
        if perm_id > 0:
            known = self._own_perms.get(perm_id)
            if known is not None:
                return known
        if self.own_client_id is None or client_id != self.own_client_id:
            return None
        if order_id not in self._claimed:
            return None
        learned = self._claimed[order_id]
        if learned is None or perm_id <= 0 or learned == perm_id:
            return order_id
        return None

    def is_own(self, order: Order) -> bool:
        """Is this one of guardd's own close orders? By identity (client id + claimed order id,
        or its learned permId), never by orderRef."""
        return self.own_order_id(order.perm_id, order.client_id, order.order_id) is not None

    def is_own_execution(self, execution: Execution) -> bool:
        """Is this a fill of one of guardd's own close orders (same identity as `is_own`)?"""
        found = self.own_order_id(execution.perm_id, execution.client_id, execution.order_id)
        return found is not None

    @property
    def impersonating_working_count(self) -> int:
        """Foreign orders labelled `guardd:` that are still working."""
        return sum(1 for k in self._impersonating if k in self._working)

    def take_impersonations(self) -> tuple[ImpersonatingOrder, ...]:
        """Foreign orders labelled `guardd:` first seen since the last call (each once)."""
        found = tuple(self._impersonations_unreported)
        self._impersonations_unreported.clear()
        return found

    def new_orders(self, client_id: ClientId | None, span: float, now: float) -> int:
        """New orders first seen in (now − span, now] from `client_id`, or from all when None.

        `span` must be one of `rate_windows_s`. Orders seen while the open-order download was
        incomplete are pre-existing, not new, and are not counted.
        """
        i = self.rate_windows_s.index(span)
        if client_id is None:
            return self._rates_total[i].count(now)
        windows = self._rates_by_client.get(client_id)
        return 0 if windows is None else windows[i].count(now)

    @property
    def order_clients(self) -> tuple[ClientId, ...]:
        """Client ids that have placed new orders since the Book started."""
        return tuple(self._rates_by_client)

    def quote(self, con_id: ConId) -> Quote:
        """Latest prices of a contract (all NaN when none were received)."""
        return self._quotes.get(con_id, Quote())

    def option_greeks(self, con_id: ConId) -> OptionComputation | None:
        """IB's latest option computation of a contract (implied volatility, delta, gamma, vega,
        theta, underlying price, with its receive time `ts`): the one at IB's model price (tick
        type 13/83) when there is one, else the latest at the bid, ask or last; None when none
        was received. A figure IB did not compute is NaN."""
        model = self._option_computations.get((con_id, "model"))
        if model is not None:
            return model
        found = [
            c
            for source in ("bid", "ask", "last")
            if (c := self._option_computations.get((con_id, source))) is not None
        ]
        return max(found, key=lambda c: c.ts) if found else None

    def price_history(self, con_id: ConId) -> tuple[tuple[float, float], ...]:
        """(ts, reference price) samples of a contract, oldest first."""
        return tuple(self._price_history.get(con_id, ()))

    @property
    def equity_history(self) -> tuple[tuple[float, float], ...]:
        """(ts, equity) samples, equity = start-of-day net liquidation + daily PnL."""
        return tuple(self._equity_history)

    def value(self, key: str, currency: str | None = None) -> Sample | None:
        """A numeric account value of the guarded account; NaN value when it did not parse.

        With no currency: the base currency's, else "BASE", else a currency-less one.
        """
        if currency is not None:
            return self._values.get((key, currency))
        for ccy in (self.base_currency, BASE, ""):
            if ccy is None:
                continue
            found = self._values.get((key, ccy))
            if found is not None:
                return found
        return None

    @property
    def net_liquidation(self) -> Sample | None:
        """NetLiquidation in the base currency."""
        return self.value("NetLiquidation")

    @property
    def margin_change(self) -> MarginChange | None:
        """The last MaintMarginReq change and whether positions moved in between."""
        return self._margin_change

    def exchange_rate(self, currency: str) -> float | None:
        """Base-currency units per unit of `currency`; None when IB has not sent a usable one,
        and for every currency but "BASE" while the base currency is not known (a USD position
        of a EUR account is never valued 1:1)."""
        if currency == BASE or (self.base_currency is not None and currency == self.base_currency):
            return 1.0
        s = self._values.get(("ExchangeRate", currency))
        if s is None or not math.isfinite(s.value) or s.value <= 0:
            return None
        return s.value

    def cash_balances(self) -> Mapping[str, Sample]:
        """`TotalCashBalance` per currency other than the base currency (the `BASE` total and
        the base currency's own row left out): the cash an FX move revalues."""
        return {
            ccy: sample
            for (key, ccy), sample in self._values.items()
            if key == "TotalCashBalance" and ccy not in (BASE, "", self.base_currency)
        }

    def gross_local(self) -> Mapping[str, float]:
        """Running gross (absolute) position value per currency, guarded account."""
        return MappingProxyType(self._gross_local)

    def exposure(self) -> Exposure:
        """Gross position value converted to the base currency (O(number of currencies))."""
        gross = 0.0
        missing: list[str] = []
        for ccy, local in self._gross_local.items():
            rate = self.exchange_rate(ccy)
            if rate is None:
                if local != 0:
                    missing.append(ccy)
                continue
            gross += local * rate
        trusted = not missing and self._unvalued == 0
        return Exposure(
            gross=gross if trusted else None,
            missing_rates=tuple(sorted(missing)),
            unvalued=self._unvalued,
        )

    @property
    def start_of_day(self) -> float | None:
        """Start-of-day net liquidation (base currency), once known."""
        return self._start_of_day

    @property
    def equity(self) -> float | None:
        """Live equity estimate: start-of-day net liquidation + daily PnL (base currency)."""
        if self._start_of_day is None or self.pnl_daily is None:
            return None
        if not math.isfinite(self.pnl_daily.value):
            return None
        return self._start_of_day + self.pnl_daily.value

    @property
    def peak_equity(self) -> float | None:
        """Highest equity seen since the start of day."""
        return self._peak_equity

    @property
    def executions(self) -> Mapping[str, Execution]:
        """Fills by exec id; a repeated exec id is kept once."""
        return MappingProxyType(self._executions)

    @property
    def heartbeats(self) -> Mapping[str, float]:
        """Last heartbeat receive time per bot."""
        return MappingProxyType(self._heartbeats)

    def watch_heartbeats(self, bots: Iterable[str], since: float) -> None:
        """Bots watched from `since` on (the limits were reloaded with them): until one is
        heard from, its silence counts from `since`, not from the Book's creation."""
        for bot in bots:
            self._heartbeats_watched_since[bot] = since

    def silent_since(self, bot: str) -> float:
        """Since when `bot` has been silent: its last heartbeat, else since it was watched
        (`watch_heartbeats`), else the Book's creation."""
        heard = self._heartbeats.get(bot)
        if heard is not None:
            return heard
        return self._heartbeats_watched_since.get(bot, self.created_at)


def value_fresh(
    p: Position, now: float, max_age_s: float, portfolio_max_age_s: float = PORTFOLIO_MAX_AGE_S
) -> bool:
    """Whether the position's value is current: received at most `max_age_s` ago (a live price
    or pnlSingle), or the account-updates stream valued it at most `portfolio_max_age_s` ago
    (IB refreshes that stream every three minutes: a position without a market-data line is
    as current as that stream promises). Neither: stale, and the rules say so."""
    if p.value is None or p.value_ts is None:
        return False
    if now - p.value_ts <= max_age_s:
        return True
    return p.portfolio_ts is not None and now - p.portfolio_ts <= portfolio_max_age_s


def _known(value: float, last: float) -> float:
    """An order's figure as reported, or the last known one when IB left it unset (NaN)."""
    return last if math.isnan(value) else value


def _mark_delayed(
    delayed: frozenset[PriceField], name: PriceField, is_delayed: bool
) -> frozenset[PriceField]:
    if is_delayed:
        return delayed | {name}
    return delayed - {name}
