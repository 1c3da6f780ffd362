"""The simulated gateway's exchange model: market, accounts, margin, PnL and order matching.

Pure and deterministic: no clock reads, no I/O. Every mutating call takes `now` (epoch seconds)
and returns the events (`ibsim.types.SimEvent`) the gateway turns into TWS messages. Events
carry SNAPSHOTS of orders, so later changes never leak into events already returned. Prices move
only in `advance` (and `jump_price`); `place_order` trades against the quote as it stands.

Matching
    MKT buys fill at the ask, sells at the bid. A LMT order is marketable when a buy's limit is
    at or above the ask (a sell's at or below the bid) and fills at the touch, which is the better
    of limit and touch. Non-marketable LMT orders rest and are re-checked on every `advance`.
    With `partial_fill_quantity` set, one matching pass fills at most that much of an order; the
    rest keeps working (a MKT remainder fills on the next passes). Book depth is not modelled.

Order types, brackets and OCA (see docs/simulator.md for the whole table)
    A stop (STP, STP LMT, TRAIL, TRAIL LIMIT) is held (PreSubmitted) until the last price reaches
    its stop (a sell's at or below, a buy's at or above), then works as MKT or at its limit; a
    trailing stop follows the last price on every pass. A transmit=False order is held until an
    order of its bracket is transmitted; a child works once its parent has filled. A fill of an
    OCA member cancels the others (type 1), reduces them at once (2) or after the pass (3); the
    children of one parent reduce each other with block. MOC / LOC / OPG orders wait for
    `closing_auction` / `opening_auction`; IOC cancels what one pass does not fill.

Accounts, cash and PnL (average-cost method, commissions kept apart)
    Cash is kept per currency; values in another currency are converted to the base currency with
    `exchange_rates` (units of base per unit of currency; reported as `ExchangeRate`): fixed, except
    where an FX pair against the base currency is listed: then its last price is the rate (EUR.USD
    at 1.10 in a USD account: EUR = 1.10; USD.JPY at 150: JPY = 1/150), moving with the pair.
    A stock fill moves cash by -signed quantity × price × multiplier; a futures fill moves no
    notional (futures are marked to market): only realized PnL reaches cash. Commissions
    (stocks: max(min_commission, per_share × shares); futures: per_future × contracts, in the
    instrument's currency) reduce cash and are NOT part of realized PnL or average cost, so
        NetLiquidation = starting cash + realized + unrealized − commissions
    holds exactly (with fixed rates). Realized PnL arises when a position is reduced or closed:
    closed quantity × (fill price − average price) × multiplier × sign(position). Positions are
    marked at the last price.

FX (secType CASH on IDEALPRO, e.g. EUR.USD: symbol EUR, currency USD), as IB counts them
    Quantity is in the pair's base currency (BUY 100,000 EUR.USD buys 100,000 EUR), price is quote
    currency per unit, value = quantity × price in the quote currency. A fill moves cash in both
    currencies (EUR +100,000, USD −100,000 × price): the position's value lives in those cash
    balances, so it adds to GrossPositionValue and margin but not again to NetLiquidation.
    Commission: 0.2 basis points of the value, at least 2 of the base currency (in the quote
    currency). An order below the IDEALPRO minimum of its quantity currency (`IDEALPRO_MINIMUM`,
    USD 25,000 or about as much) is an odd lot: IB routes it to its odd-lot venue and it fills like
    any other, unless `reject_fx_odd_lots` makes it refused (201).

Options (secType OPT; see ibsim.market.OptionProcess for the price)
    Valued and settled like a stock (cash moves by the premium × multiplier; the value is in
    NetLiquidation); commission `OPTION_COMMISSION` a contract, at least `OPTION_MIN_COMMISSION`.
    A long option has no margin (paid in full); a short one needs its value + margin rate × the
    underlying's last price, per share, × multiplier × contracts. When `advance` passes the close
    of its last trading day an option expires: exercised by exception when at least
    `EXERCISE_THRESHOLD` in the money (quantity × multiplier shares of the underlying at the
    strike), else worthless (`_expire_options`).

Account values (base currency: the currency field of each names it, as TWS's do; per-currency
rows `Currency`, `CashBalance`, `TotalCashBalance`, `ExchangeRate` for every currency with a rate,
and a `BASE` row of each)
    NetLiquidation      = cash (every currency, at its rate) + Σ stock market value
                          + Σ futures unrealized PnL
    GrossPositionValue  = Σ |quantity × last × multiplier| over ALL positions. IB's own GPV counts
                          securities only (futures notional is not a security value); we include
                          futures notional because guardd's leverage rule (gross exposure / NetLiq)
                          needs it, and a simulator that hid it would hide futures leverage.
    InitMarginReq       = Σ initial margin × margin multiplier, per position:
    MaintMarginReq        STK: rate × |notional|; FUT: per-contract amount × |quantity| when the
                          instrument sets one (> 0), else rate × |notional|
    ExcessLiquidity     = NetLiq − Maint        AvailableFunds = NetLiq − Init
    Cushion             = Excess / NetLiq (0 when NetLiq <= 0)
    BuyingPower         = 4 × AvailableFunds (Reg-T intraday leverage of a margin account)
    EquityWithLoanValue = NetLiq (no option or loan value is modelled)
    UnrealizedPnL       = Σ (last − average price) × quantity × multiplier
    RealizedPnL         = realized since the start of the day
    Daily PnL (`pnl`)   = NetLiq − NetLiq at the start of the day (`start_new_day`); seeding a
                          position with `set_position` moves the baseline too, so it is not PnL.
    Per position (`pnl_single`), daily = (realized + unrealized) now − the same at day start;
    it excludes commissions, which only the account's daily PnL includes.

Cost
    A fill updates its account's running totals in O(1); a price move revalues every position
    once (O(positions)); `advance` with no time passed does nothing.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields, replace
from datetime import datetime
from typing import Any, get_args
from zoneinfo import ZoneInfo

from ibsim.hours import ALWAYS, Calendar, MarketSession
from ibsim.market import OptionProcess, PriceProcess, Quote
from ibsim.options import OptionValue, Right, intrinsic_value
from ibsim.types import (
    AUCTION_TYPES,
    LIMIT_TYPES,
    ORDER_TYPES,
    STOP_TYPES,
    TIFS,
    TRAIL_TYPES,
    AccountChanged,
    Action,
    ContractSpec,
    Executed,
    Fill,
    Instrument,
    OrderChanged,
    OrderRejected,
    OrderRequest,
    OrderStatusName,
    OrderType,
    OrderWarning,
    PositionChanged,
    PositionView,
    SecType,
    SimEvent,
    SimOrder,
)

FIRST_PERM_ID = 1_000_000_001
NO_SECURITY_DEFINITION = 200
ORDER_REJECTED = 201
DUPLICATE_ORDER_ID = 103
ORDER_MESSAGE = 399  # a warning: the order waits (e.g. for the regular session)
OUTSIDE_RTH_IGNORED = 2109  # a warning: outsideRth does not apply to this order type
MAX_ORDERS_PER_SIDE = 20  # IB: 20 active orders per contract per side per account
REJECTED = "Order rejected - reason:"  # how IB opens the text of a 201
EXCHANGE_CLOSED = REJECTED + "Exchange is closed."
MAX_ORDER_QUANTITY = 1e9  # larger is a typo or an attack, never a trade: refused with 201
BUYING_POWER_FACTOR = 4.0  # Reg-T intraday: four times the excess of equity over initial margin
_EXEC_ID_BASE = 0xE1A7  # execIds look like IB's: "0000e1a7.65f1e2b3.01.01"
_ZERO = 1e-9  # quantities below this are float noise, not a position
FX_COMMISSION_RATE = 0.00002  # 0.2 basis points of the value traded
OPTION_COMMISSION = 0.65  # per contract ...
OPTION_MIN_COMMISSION = 1.0  # ... at least this per order fill
EXERCISE_THRESHOLD = 0.01  # IB exercises an expiring option this far in the money or more
# US equity options expire at the close of their last trading day
OPTION_EXPIRY_ZONE, OPTION_EXPIRY_HOUR = ZoneInfo("America/New_York"), 16
FX_MIN_COMMISSION = 2.0  # in the base currency
# The smallest IDEALPRO order per quantity currency (IB: USD 25,000 or its equivalent); smaller
# ones are odd lots. A currency not listed takes USD's figure.
IDEALPRO_MINIMUM: dict[str, float] = {
    "USD": 25_000,
    "EUR": 20_000,
    "GBP": 20_000,
    "CHF": 25_000,
    "CAD": 25_000,
    "AUD": 25_000,
    "JPY": 2_500_000,
}
BASE_ROW = "BASE"  # the currency TWS gives the account values totalled in the base currency

_STATUSES = frozenset(get_args(OrderStatusName))
RejectFilter = Callable[[OrderRequest, Instrument], str | None]


class ExchangeError(Exception):
    """Base of the exchange model's errors."""


class OrderNotFoundError(ExchangeError):
    """No order with that id of that client exists (the gateway answers error 10147)."""


class OrderNotCancellableError(ExchangeError):
    """The order exists but has already finished (the gateway answers error 161)."""


class OrderFilledError(OrderNotCancellableError):
    """The order to cancel has already filled (the gateway answers error 10148)."""


class UnknownAccountError(ExchangeError, KeyError):
    """An account id the exchange does not manage."""


class UnknownInstrumentError(ExchangeError, KeyError):
    """A conId the exchange does not list."""


@dataclass(frozen=True, slots=True)
class OptionState:
    """An option's model value (per share) and its inputs: the underlying's last price, the
    years left to expiry (0 once expired), the annualised volatility."""

    value: OptionValue
    right: Right
    strike: float
    underlying: float
    years: float
    vol: float


@dataclass(frozen=True, slots=True)
class _Contribution:
    """One position's share of its account's running totals, in the base currency."""

    stock_value: float = 0.0
    futures_unrealized: float = 0.0
    gross: float = 0.0
    init_margin: float = 0.0
    maint_margin: float = 0.0
    unrealized: float = 0.0


_NOTHING = _Contribution()


@dataclass(slots=True)
class _Position:
    instrument: Instrument
    quantity: float = 0.0
    avg_price: float = 0.0  # per unit, without the multiplier
    realized: float = 0.0  # cumulative, instrument currency
    realized_at_day_start: float = 0.0
    total_at_day_start: float = 0.0  # realized + unrealized at the start of the day
    contribution: _Contribution = _NOTHING


@dataclass(slots=True)
class _Account:
    cash: dict[str, float]
    positions: dict[int, _Position]
    stock_value: float = 0.0
    futures_unrealized: float = 0.0
    gross: float = 0.0
    init_margin: float = 0.0  # before the margin multiplier
    maint_margin: float = 0.0
    unrealized: float = 0.0
    realized: float = 0.0  # cumulative, base currency
    realized_at_day_start: float = 0.0
    commissions: float = 0.0  # cumulative, base currency
    net_liq_at_day_start: float = 0.0

    def add(self, c: _Contribution, sign: float) -> None:
        self.stock_value += sign * c.stock_value
        self.futures_unrealized += sign * c.futures_unrealized
        self.gross += sign * c.gross
        self.init_margin += sign * c.init_margin
        self.maint_margin += sign * c.maint_margin
        self.unrealized += sign * c.unrealized

    def reset_totals(self) -> None:
        self.stock_value = self.futures_unrealized = self.gross = 0.0
        self.init_margin = self.maint_margin = self.unrealized = 0.0


def _money(value: float) -> str:
    return f"{value:.2f}"


class Exchange:
    """A simulated market with accounts: matches orders, keeps cash, positions, margin and PnL."""

    def __init__(
        self,
        instruments: Sequence[Instrument],
        cash: Mapping[str, float],
        *,
        seed: int = 1,
        base_currency: str = "USD",
        commission_per_share: float = 0.005,
        min_commission: float = 1.0,
        commission_per_future: float = 2.0,
        partial_fill_quantity: float | None = None,
        now: float = 0.0,
        exchange_rates: Mapping[str, float] | None = None,
    ) -> None:
        if not cash:
            raise ValueError("the exchange needs at least one account")
        if partial_fill_quantity is not None and not partial_fill_quantity > 0:
            raise ValueError(f"partial_fill_quantity must be > 0, got {partial_fill_quantity}")
        self._base = base_currency
        self._rates: dict[str, float] = {base_currency: 1.0}
        for currency, rate in (exchange_rates or {}).items():
            if not rate > 0:
                raise ValueError(f"exchange rate for {currency} must be > 0, got {rate}")
            self._rates[currency] = float(rate)
        self._instruments: dict[int, Instrument] = {}
        self._processes: dict[int, PriceProcess] = {}
        # currency -> (the FX pair against the base currency that prices it, inverted?)
        self._rate_pairs: dict[str, tuple[int, bool]] = {}
        for inst in instruments:
            if inst.con_id in self._instruments:
                raise ValueError(f"duplicate conId {inst.con_id}")
            if inst.is_fx and base_currency in (inst.symbol, inst.currency):
                other, inverted = (
                    (inst.currency, True) if inst.symbol == base_currency else (inst.symbol, False)
                )
                if other in self._rates or other in self._rate_pairs:
                    raise ValueError(f"{other}'s rate is the price of {inst.local_symbol}")
                self._rate_pairs[other] = (inst.con_id, inverted)
            self._instruments[inst.con_id] = inst
            if inst.is_option:
                continue
            # one stream per instrument: adding an instrument does not change the others' prices
            self._processes[inst.con_id] = PriceProcess.for_instrument(
                inst, f"{seed}:{inst.con_id}"
            )
        for inst in instruments:
            if inst.is_option:
                self._processes[inst.con_id] = self._option_process(inst, seed)
        self._refresh_rates()
        for inst in instruments:
            for currency in (inst.currency, inst.symbol) if inst.is_fx else (inst.currency,):
                if currency not in self._rates:
                    raise ValueError(f"no exchange rate for {currency} ({inst.symbol})")
        self._accounts: dict[str, _Account] = {
            acct: _Account(cash={base_currency: float(amount)}, positions={})
            for acct, amount in cash.items()
        }
        for account in self._accounts.values():
            account.net_liq_at_day_start = self._net_liq(account)
        self._commission_per_share = commission_per_share
        self._min_commission = min_commission
        self._commission_per_future = commission_per_future
        self._partial = partial_fill_quantity
        self._now = now
        self._expired: set[int] = set()  # options whose expiry has been carried out
        self._next_perm_id = FIRST_PERM_ID
        self._exec_seq = 0
        self._orders: dict[int, SimOrder] = {}  # by permId, in placement order
        self._working: dict[int, SimOrder] = {}
        self._by_client_order: dict[tuple[int, int], SimOrder] = {}
        self._fills: list[Fill] = []
        self._reject_filter: RejectFilter | None = None
        self._margin_multiplier = 1.0
        self._deferred_oca: list[tuple[int, float]] = []  # (permId, quantity): OCA type 3
        self._calendars: dict[int, Calendar] = {}  # by conId; ALWAYS when not set
        self._at = now  # the latest `now` any call was given: what the hours are judged at
        self.check_margin = True
        self.reject_fx_odd_lots = False  # IB routes them to its odd-lot venue: they fill

    # ----------------------------------------------------------------------------- reads

    @property
    def accounts(self) -> tuple[str, ...]:
        """Account ids in the order they were given."""
        return tuple(self._accounts)

    @property
    def instruments(self) -> tuple[Instrument, ...]:
        return tuple(self._instruments.values())

    @property
    def base_currency(self) -> str:
        return self._base

    @property
    def now(self) -> float:
        """The time prices were last advanced to."""
        return self._now

    def find_instrument(self, spec: ContractSpec) -> Instrument | None:
        """The one instrument a client's contract fields name, or None if none or ambiguous.

        By conId when non-zero; otherwise by symbol and secType, narrowed by currency, and for
        futures and options by lastTradeDate (a YYYYMM prefix matches), localSymbol, strike and
        right ("C"/"CALL", "P"/"PUT"), when given.
        """
        if spec.con_id:
            return self._instruments.get(spec.con_id)
        symbol = spec.symbol.upper()
        sec_type = spec.sec_type.upper()
        matches = [
            inst
            for inst in self._instruments.values()
            if inst.symbol.upper() == symbol
            and (not sec_type or inst.sec_type == sec_type)
            and (not spec.currency or inst.currency == spec.currency.upper())
            and (not spec.last_trade_date or inst.last_trade_date.startswith(spec.last_trade_date))
            and (not spec.local_symbol or inst.local_symbol == spec.local_symbol)
            and (not spec.strike or abs(inst.strike - spec.strike) < 1e-9)
            and (not spec.right or inst.right == spec.right.upper()[:1])
        ]
        return matches[0] if len(matches) == 1 else None

    def calendar(self, con_id: int) -> Calendar:
        """An instrument's trading calendar (`ALWAYS` unless set)."""
        self._instrument(con_id)
        return self._calendars.get(con_id, ALWAYS)

    def market_session(self, con_id: int, now: float) -> MarketSession:
        """Regular, extended or closed, for an instrument at `now`."""
        return self.calendar(con_id).session_at(now)

    def quote(self, con_id: int) -> Quote:
        """Top of book and last trade of an instrument."""
        return self._process(con_id).quote()

    def option_value(self, con_id: int) -> OptionState | None:
        """An option's model price and greeks now, with what they come from; None for anything
        but an option."""
        process = self._process(con_id)
        if not isinstance(process, OptionProcess):
            return None
        return OptionState(
            value=process.value(),
            right=process.right,
            strike=self._instruments[con_id].strike,
            underlying=process.underlying_last,
            years=process.years_left,
            vol=process.volatility,
        )

    def orders(self) -> list[SimOrder]:
        """Every order placed and accepted (working and finished), in placement order."""
        return [replace(o) for o in self._orders.values()]

    def working_orders(self) -> list[SimOrder]:
        """Orders still working, in placement order."""
        return [replace(o) for o in self._working.values()]

    def order_of_client(self, client_id: int, order_id: int) -> SimOrder | None:
        """The order a client placed under `order_id` (working or finished), if any."""
        order = self._by_client_order.get((client_id, order_id))
        return replace(order) if order is not None else None

    def order_by_perm_id(self, perm_id: int) -> SimOrder | None:
        order = self._orders.get(perm_id)
        return replace(order) if order is not None else None

    def fills(self) -> list[Fill]:
        """Every fill so far, oldest first."""
        return list(self._fills)

    def positions(self, account: str) -> list[PositionView]:
        """The account's non-zero positions (a position that went to 0 is reported once, by
        PositionChanged with position 0)."""
        acct = self._account(account)
        return [
            self._position_view(account, pos)
            for pos in acct.positions.values()
            if pos.quantity != 0.0
        ]

    def position(self, account: str, con_id: int) -> PositionView:
        """One position of the account, flat (0) if it never traded the instrument."""
        acct = self._account(account)
        pos = acct.positions.get(con_id) or _Position(self._instrument(con_id))
        return self._position_view(account, pos)

    def net_liquidation(self, account: str) -> float:
        """NetLiquidation in the base currency, unformatted."""
        return self._net_liq(self._account(account))

    def account_values(self, account: str) -> list[tuple[str, str, str]]:
        """The account's values as IB's updateAccountValue sends them: (key, value, currency)."""
        acct = self._account(account)
        base = self._base
        cash = self._cash_in_base(acct)
        net_liq = cash + acct.stock_value + acct.futures_unrealized
        init = acct.init_margin * self._margin_multiplier
        maint = acct.maint_margin * self._margin_multiplier
        excess = net_liq - maint
        available = net_liq - init
        cushion = excess / net_liq if net_liq > 0 else 0.0
        values = [
            ("NetLiquidation", _money(net_liq), base),
            ("TotalCashValue", _money(cash), base),
            ("GrossPositionValue", _money(acct.gross), base),
            ("InitMarginReq", _money(init), base),
            ("MaintMarginReq", _money(maint), base),
            ("ExcessLiquidity", _money(excess), base),
            ("AvailableFunds", _money(available), base),
            ("Cushion", f"{cushion:.6f}", ""),
            ("BuyingPower", _money(BUYING_POWER_FACTOR * available), base),
            ("EquityWithLoanValue", _money(net_liq), base),
            ("RealizedPnL", _money(acct.realized - acct.realized_at_day_start), base),
            ("UnrealizedPnL", _money(acct.unrealized), base),
        ]
        # The per-currency rows, as TWS sends them: one per currency the account is shown in
        # (here: every currency the exchange has a rate for) and one "BASE" row, the total
        # converted to the base currency. `Currency` names each row; `ExchangeRate` is base
        # units per unit of the row's currency (1.00 for the base currency and for BASE).
        values.append(("Currency", "BASE", BASE_ROW))
        values.append(("CashBalance", _money(cash), BASE_ROW))
        values.append(("TotalCashBalance", _money(cash), BASE_ROW))
        values.append(("ExchangeRate", "1.00", BASE_ROW))
        for currency, rate in self._rates.items():
            amount = acct.cash.get(currency, 0.0)
            values.append(("Currency", currency, currency))
            values.append(("CashBalance", _money(amount), currency))
            values.append(("TotalCashBalance", _money(amount), currency))
            values.append(("ExchangeRate", "1.00" if currency == base else f"{rate:.8f}", currency))
        return values

    def pnl(self, account: str) -> tuple[float, float, float]:
        """(daily, unrealized, realized today) in the base currency, as reqPnL reports them."""
        acct = self._account(account)
        daily = self._net_liq(acct) - acct.net_liq_at_day_start
        return daily, acct.unrealized, acct.realized - acct.realized_at_day_start

    def pnl_single(self, account: str, con_id: int) -> tuple[float, float, float, float, float]:
        """(position, daily, unrealized, realized today, market value) of one position, in the
        instrument's currency, as reqPnLSingle reports them (zeros when never traded)."""
        acct = self._account(account)
        pos = acct.positions.get(con_id)
        if pos is None:
            self._instrument(con_id)
            return 0.0, 0.0, 0.0, 0.0, 0.0
        last = self._processes[con_id].last
        unrealized = self._unrealized(pos, last)
        total = pos.realized + unrealized
        realized_today = pos.realized - pos.realized_at_day_start
        value = pos.quantity * last * pos.instrument.multiplier
        return pos.quantity, total - pos.total_at_day_start, unrealized, realized_today, value

    # ----------------------------------------------------------------------------- setup & faults

    def set_position(self, account: str, con_id: int, quantity: float, avg_price: float) -> None:
        """Seed a starting position (no cash moves; the day's PnL baseline follows along).

        An FX position is its two cash balances: seeding long 100,000 EUR.USD at 1.10 sets
        EUR +100,000 and USD −110,000 (as if bought at `avg_price`)."""
        acct = self._account(account)
        inst = self._instrument(con_id)
        before = self._net_liq(acct)
        pos = acct.positions.setdefault(con_id, _Position(inst))
        if inst.is_fx:
            change = float(quantity) - pos.quantity
            acct.cash[inst.symbol] = acct.cash.get(inst.symbol, 0.0) + change
            acct.cash[inst.currency] = acct.cash.get(inst.currency, 0.0) - change * avg_price
        pos.quantity = float(quantity)
        pos.avg_price = float(avg_price) if quantity else 0.0
        self._revalue(acct, pos)
        pos.total_at_day_start = pos.realized + self._unrealized(pos, self._processes[con_id].last)
        acct.net_liq_at_day_start += self._net_liq(acct) - before

    def set_calendar(self, con_id: int, calendar: Calendar) -> None:
        """Give an instrument its trading hours."""
        self._instrument(con_id)
        self._calendars[con_id] = calendar

    def set_reject_filter(self, fn: RejectFilter | None) -> None:
        """Reject (201) every new or modified order for which `fn` returns a reason."""
        self._reject_filter = fn

    def set_margin_multiplier(self, factor: float) -> None:
        """Scale every margin requirement (a broker's margin hike)."""
        if not factor > 0:
            raise ValueError(f"margin multiplier must be > 0, got {factor}")
        self._margin_multiplier = float(factor)

    def set_volatility(self, con_id: int, daily_vol: float) -> None:
        """Change an instrument's daily volatility from the next price step on."""
        self._process(con_id).set_volatility(daily_vol)

    def jump_price(self, con_id: int, fraction: float, now: float) -> list[SimEvent]:
        """Move an instrument's price at once by `fraction`, then match resting orders."""
        self._process(con_id).jump(fraction)
        self._refresh_rates()
        self._revalue_all()
        return self._match_working(now)

    def start_new_day(self) -> None:
        """Begin a new trading day: daily PnL and today's realized PnL start again from zero."""
        for acct in self._accounts.values():
            acct.net_liq_at_day_start = self._net_liq(acct)
            acct.realized_at_day_start = acct.realized
            for pos in acct.positions.values():
                last = self._processes[pos.instrument.con_id].last
                pos.realized_at_day_start = pos.realized
                pos.total_at_day_start = pos.realized + self._unrealized(pos, last)

    # ----------------------------------------------------------------------------- state

    def snapshot(self) -> dict[str, Any]:
        """What outlives the gateway process at IB, as plain JSON-able data (`restore` reads
        it): every account's cash, positions and day-start figures, every order (working and
        finished, with its terms and status) and fill, and the permId and execId sequences.
        Prices go too, so positions are marked where they were. Instruments, calendars and
        fees are the scenario's, not state."""
        return {
            "now": self._now,
            "at": self._at,
            "next_perm_id": self._next_perm_id,
            "exec_seq": self._exec_seq,
            "margin_multiplier": self._margin_multiplier,
            "prices": {str(c): p.price for c, p in self._processes.items()},
            "accounts": {
                name: {
                    "cash": dict(acct.cash),
                    "realized": acct.realized,
                    "realized_at_day_start": acct.realized_at_day_start,
                    "commissions": acct.commissions,
                    "net_liq_at_day_start": acct.net_liq_at_day_start,
                    "positions": [
                        {
                            "con_id": con_id,
                            "quantity": pos.quantity,
                            "avg_price": pos.avg_price,
                            "realized": pos.realized,
                            "realized_at_day_start": pos.realized_at_day_start,
                            "total_at_day_start": pos.total_at_day_start,
                        }
                        for con_id, pos in acct.positions.items()
                    ],
                }
                for name, acct in self._accounts.items()
            },
            "orders": [_order_record(o) for o in self._orders.values()],
            "working": list(self._working),
            "client_orders": [
                [client_id, order_id, o.perm_id]
                for (client_id, order_id), o in self._by_client_order.items()
            ],
            "fills": [_fill_record(f) for f in self._fills],
        }

    def restore(self, state: Mapping[str, Any]) -> None:
        """Take back what `snapshot` gave (of an exchange with the same accounts and
        instruments). Raises ExchangeError naming what does not fit; on error the exchange is
        unusable (a gateway refuses to start)."""
        try:
            self._restore(state)
        except ExchangeError:
            raise
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ExchangeError(f"{type(exc).__name__}: {exc}") from exc

    def _restore(self, state: Mapping[str, Any]) -> None:
        accounts = state["accounts"]
        if set(accounts) != set(self._accounts):
            raise ExchangeError(
                f"accounts {sorted(accounts)} are not the scenario's {sorted(self._accounts)}"
            )
        for con_id, price in state["prices"].items():
            self._process(int(con_id)).restore_price(_finite(price))
        for name, saved in accounts.items():
            acct = _Account(
                cash={str(c): _finite(v) for c, v in saved["cash"].items()}, positions={}
            )
            for c in acct.cash:
                if c not in self._rates:
                    raise ExchangeError(f"account {name}: cash in {c}, which has no exchange rate")
            acct.realized = _finite(saved["realized"])
            acct.realized_at_day_start = _finite(saved["realized_at_day_start"])
            acct.commissions = _finite(saved["commissions"])
            acct.net_liq_at_day_start = _finite(saved["net_liq_at_day_start"])
            for rec in saved["positions"]:
                inst = self._instrument(int(rec["con_id"]))
                acct.positions[inst.con_id] = _Position(
                    inst,
                    quantity=_finite(rec["quantity"]),
                    avg_price=_finite(rec["avg_price"]),
                    realized=_finite(rec["realized"]),
                    realized_at_day_start=_finite(rec["realized_at_day_start"]),
                    total_at_day_start=_finite(rec["total_at_day_start"]),
                )
            self._accounts[name] = acct
        self._orders = {}
        for rec in state["orders"]:
            order = self._order_from_record(rec)
            self._orders[order.perm_id] = order
        self._working = {}
        for perm_id in state["working"]:
            order = self._orders[int(perm_id)]
            if not order.is_working:
                raise ExchangeError(f"order {perm_id} is listed working but is {order.status}")
            self._working[order.perm_id] = order
        self._by_client_order = {
            (int(c), int(o)): self._orders[int(p)] for c, o, p in state["client_orders"]
        }
        self._fills = [self._fill_from_record(rec) for rec in state["fills"]]
        self._next_perm_id = int(state["next_perm_id"])
        self._exec_seq = int(state["exec_seq"])
        if self._orders and self._next_perm_id <= max(self._orders):
            raise ExchangeError(f"next_perm_id {self._next_perm_id} is not above every permId")
        self._now = _finite(state["now"])
        self._at = _finite(state["at"])
        self.set_margin_multiplier(_finite(state["margin_multiplier"]))
        self._deferred_oca = []
        self._revalue_all()

    def _order_from_record(self, rec: Mapping[str, Any]) -> SimOrder:
        values = dict(rec)
        inst = self._instrument(int(values.pop("con_id")))
        perm_id = values.get("perm_id")
        if values["order_type"] not in ORDER_TYPES:
            raise ExchangeError(f"order {perm_id}: order type {values['order_type']!r}")
        if values["status"] not in _STATUSES:
            raise ExchangeError(f"order {perm_id}: status {values['status']!r}")
        return SimOrder(instrument=inst, **values)

    def _fill_from_record(self, rec: Mapping[str, Any]) -> Fill:
        values = dict(rec)
        inst = self._instrument(int(values.pop("con_id")))
        return Fill(instrument=inst, **values)

    # ----------------------------------------------------------------------------- time

    def advance(self, now: float) -> list[SimEvent]:
        """Step every price to `now` and fill resting orders that became marketable."""
        dt = now - self._now
        if not dt > 0:
            return []
        self._now = self._at = now
        for process in self._processes.values():
            process.step(dt)
        self._refresh_rates()
        self._revalue_all()
        events = self._expire_options(now)
        events.extend(self._match_working(now))
        return events

    # ----------------------------------------------------------------------------- orders

    def place_order(
        self, client_id: int, req: OrderRequest, now: float, *, pending: bool = False
    ) -> list[SimEvent]:
        """Place a new order, or modify a working one with the same (client id, order id).

        With `pending`, a new order stops at PendingSubmit (the gateway has it, IB has not
        confirmed it yet) until `accept`; a cancel meanwhile ends it ApiCancelled.
        """
        self._at = max(self._at, now)
        existing = self._by_client_order.get((client_id, req.order_id))
        if existing is not None:
            if existing.is_working:
                return self._settled(self._modify(existing, req, now), now)
            return [OrderRejected(replace(existing), DUPLICATE_ORDER_ID, "Duplicate order id")]
        inst = self.find_instrument(req.contract)
        if inst is None:
            order = self._new_order(0, client_id, req, _placeholder_instrument(req.contract))
            order.status = "Inactive"
            no_definition = "No security definition has been found for the request"
            return [OrderRejected(order, NO_SECURITY_DEFINITION, no_definition)]
        reason = self._validate(req, inst)
        if reason is None:
            reason = self._check_parent(client_id, req)
        if reason is None:
            reason = self._check_session(req, inst, now)
        if reason is None:
            reason = self._check_order_count(client_id, req, inst)
        if reason is None and self.check_margin:
            reason = self._check_margin(req, inst)
        if reason is None and self.reject_fx_odd_lots:
            reason = self._check_fx_odd_lot(req, inst)
        if reason is None and self._reject_filter is not None:
            reason = self._reject_filter(req, inst)
        perm_id = self._next_perm_id
        self._next_perm_id += 1
        order = self._new_order(perm_id, client_id, req, inst)
        self._orders[perm_id] = order
        if reason is not None:
            # kept in orders() as finished, but the id stays free so the client may retry it
            order.status = "Inactive"
            return [OrderRejected(replace(order), ORDER_REJECTED, reason)]
        self._by_client_order[(client_id, req.order_id)] = order
        self._working[perm_id] = order
        if pending:
            order.status = "PendingSubmit"
            return [OrderChanged(replace(order))]
        return self._settled(self._accept(order, now), now)

    def accept(self, client_id: int, order_id: int, now: float) -> list[SimEvent]:
        """IB confirms an order left at PendingSubmit; nothing when it was cancelled meanwhile."""
        order = self._by_client_order.get((client_id, order_id))
        if order is None or order.status != "PendingSubmit":
            return []
        return self._settled(self._accept(order, now), now)

    def cancel_order(
        self, client_id: int, order_id: int, now: float, *, pending: bool = False
    ) -> list[SimEvent]:
        """Cancel a working order of THAT client (cancelOrder): PendingCancel, then Cancelled
        (at once, or at `finish_cancel` when `pending`: fills may still arrive in between).
        An order IB never had (PendingSubmit, or held with transmit=False) ends ApiCancelled."""
        order = self._by_client_order.get((client_id, order_id))
        if order is None:
            raise OrderNotFoundError(f"OrderId {order_id} that needs to be cancelled is not found.")
        if order.status == "Filled":
            raise OrderFilledError(
                f"OrderId {order_id} that needs to be cancelled cannot be cancelled, state: Filled."
            )
        if not order.is_working or order.status == "PendingCancel":
            raise OrderNotCancellableError(
                f"Cannot cancel the order {order_id}: it is already {order.status}"
            )
        return self._settled(self._request_cancel(order, pending=pending), now)

    def finish_cancel(self, perm_id: int, now: float) -> list[SimEvent]:
        """Complete a pending cancel: Cancelled, unless the order filled meanwhile (nothing)."""
        order = self._working.get(perm_id)
        if order is None or order.status != "PendingCancel":
            return []
        return self._settled(self._cancel(order), now)

    def settle_pending(self, now: float) -> list[SimEvent]:
        """What IB finished while the gateway was away (a restart with its state): orders left
        PendingSubmit are accepted, cancels left PendingCancel complete."""
        events: list[SimEvent] = []
        for order in list(self._working.values()):
            if order.status == "PendingSubmit":
                events.extend(self._accept(order, now))
            elif order.status == "PendingCancel":
                events.extend(self._cancel(order))
        return self._settled(events, now)

    def pending_cancels(self) -> list[int]:
        """permIds of the orders waiting in PendingCancel."""
        return [o.perm_id for o in self._working.values() if o.status == "PendingCancel"]

    def place_as_new(self, client_id: int, req: OrderRequest, now: float) -> list[SimEvent]:
        """Place `req` as a NEW order even when its (client id, order id) names a working one.

        The `split_modifies` fault: a modification sent while IB's connectivity is lost is
        taken as a second order. The original keeps working (and keeps its id for
        cancelOrder); the new one gets its own permId and is reached by reqGlobalCancel.
        """
        existing = self._by_client_order.pop((client_id, req.order_id), None)
        try:
            events = self.place_order(client_id, req, now)
        finally:
            if existing is not None:
                self._by_client_order[(client_id, req.order_id)] = existing
        return events

    def liquidate(
        self,
        account: str,
        con_id: int,
        quantity: float,
        now: float,
        *,
        client_id: int = 0,
        order_ref: str = "IB liquidation",
    ) -> list[SimEvent]:
        """The broker itself closes `quantity` of a position at the touch (a margin liquidation).

        Not an API order: order id 0 (a TWS order), client id `client_id`, its own permId and
        orderRef. It reduces the position toward zero and never past it; a flat position is left
        alone (no events).
        """
        acct = self._account(account)
        inst = self._instrument(con_id)
        pos = acct.positions.get(con_id)
        held = pos.quantity if pos is not None else 0.0
        size = min(abs(float(quantity)), abs(held))
        if not size > _ZERO:
            return []
        req = OrderRequest(
            order_id=0,
            contract=ContractSpec(con_id=con_id),
            action="SELL" if held > 0 else "BUY",
            total_quantity=size,
            order_type="MKT",
            lmt_price=None,
            aux_price=None,
            account=account,
            order_ref=order_ref,
        )
        perm_id = self._next_perm_id
        self._next_perm_id += 1
        order = self._new_order(perm_id, client_id, req, inst)
        order.status = "Submitted"
        self._orders[perm_id] = order
        self._working[perm_id] = order
        process = self._processes[con_id]
        touch = process.bid if held > 0 else process.ask
        events: list[SimEvent] = [OrderChanged(replace(order))]
        events.extend(self._fill(order, size, touch, now))
        return self._settled(events, now)

    def global_cancel(self, now: float, *, pending: bool = False) -> list[SimEvent]:
        """Cancel every working order of every client (reqGlobalCancel), untransmitted ones
        included; `pending` as in `cancel_order`."""
        events: list[SimEvent] = []
        for order in list(self._working.values()):
            if order.perm_id in self._working and order.status != "PendingCancel":
                events.extend(self._request_cancel(order, pending=pending))
        return self._settled(events, now)

    def cancel_orders_of(self, client_id: int | None, now: float) -> list[SimEvent]:
        """Cancel every working order of one client (every client when None), as a person in
        TWS or IB itself would: no request of that client is involved."""
        events: list[SimEvent] = []
        for order in list(self._working.values()):
            if order.perm_id in self._working and (
                client_id is None or order.client_id == client_id
            ):
                events.extend(self._cancel(order))
        return self._settled(events, now)

    def opening_auction(self, now: float) -> list[SimEvent]:
        """The opening auction: OPG orders execute at the last price (a LMT only when its limit
        allows it) or are cancelled."""
        events: list[SimEvent] = []
        for order in list(self._working.values()):
            if order.tif == "OPG" and self._released(order):
                events.extend(self._auction(order, now))
        return self._settled(events, now)

    def closing_auction(self, now: float) -> list[SimEvent]:
        """The closing auction: MOC orders execute at the last price, LOC orders when their limit
        allows it; a LOC that does not is cancelled."""
        events: list[SimEvent] = []
        for order in list(self._working.values()):
            if order.order_type in AUCTION_TYPES and self._released(order):
                events.extend(self._auction(order, now))
        return self._settled(events, now)

    def expire_day_orders(self, now: float) -> list[SimEvent]:
        """The end of the trading day: every working DAY (and OPG) order is cancelled; GTC
        orders keep working."""
        events: list[SimEvent] = []
        for order in list(self._working.values()):
            if order.perm_id in self._working and order.tif != "GTC":
                events.extend(self._cancel(order))
        return self._settled(events, now)

    # ----------------------------------------------------------------------------- internals

    def _account(self, account: str) -> _Account:
        try:
            return self._accounts[account]
        except KeyError:
            raise UnknownAccountError(account) from None

    def _instrument(self, con_id: int) -> Instrument:
        try:
            return self._instruments[con_id]
        except KeyError:
            raise UnknownInstrumentError(con_id) from None

    def _process(self, con_id: int) -> PriceProcess:
        try:
            return self._processes[con_id]
        except KeyError:
            raise UnknownInstrumentError(con_id) from None

    def _resolve_account(self, account: str) -> str:
        return account or next(iter(self._accounts))

    def _validate(self, req: OrderRequest, inst: Instrument) -> str | None:
        account = self._resolve_account(req.account)
        if account not in self._accounts:
            return f"Account {account} is not managed by this login"
        if req.action.upper() not in ("BUY", "SELL"):
            return f"Invalid action {req.action!r}: BUY or SELL"
        if not (math.isfinite(req.total_quantity) and req.total_quantity > 0):
            return f"Order quantity must be positive, got {req.total_quantity}"
        if req.total_quantity > MAX_ORDER_QUANTITY:
            return f"Order quantity {req.total_quantity:g} exceeds {MAX_ORDER_QUANTITY:g}"
        order_type = req.order_type.upper()
        if order_type not in ORDER_TYPES:
            return f"Unsupported order type {req.order_type!r}: " + ", ".join(ORDER_TYPES)
        tif = (req.tif or "DAY").upper()
        if tif not in TIFS:
            return f"Unsupported time in force {req.tif!r}: " + ", ".join(TIFS)
        if order_type in LIMIT_TYPES and not _positive(req.lmt_price):
            return f"A {order_type} order needs a positive limit price"
        if order_type in ("STP", "STP LMT") and not _positive(req.aux_price):
            return f"A {order_type} order needs a positive stop price (auxPrice)"
        if order_type in TRAIL_TYPES:
            amount, percent = _positive(req.aux_price), _positive(req.trailing_percent)
            if amount == percent:
                return f"A {order_type} order needs a trailing amount or a trailing percent"
            if percent and not (req.trailing_percent or 0.0) < 100:
                return f"Trailing percent {req.trailing_percent} is not below 100"
        if order_type == "TRAIL LIMIT" and not (
            req.lmt_price_offset is not None
            and math.isfinite(req.lmt_price_offset)
            and req.lmt_price_offset >= 0
        ):
            return "A TRAIL LIMIT order needs a limit price offset (lmtPriceOffset)"
        if order_type in AUCTION_TYPES and tif != "DAY":
            return f"A {order_type} order is a DAY order"
        if tif in ("OPG", "IOC") and order_type not in ("MKT", "LMT"):
            return f"{tif} is for MKT and LMT orders"
        if req.oca_type not in (0, 1, 2, 3):
            return f"Invalid OCA type {req.oca_type}: 1, 2 or 3"
        if inst.con_id in self._expired:
            return REJECTED + "The contract has expired."
        return None

    def _check_session(self, req: OrderRequest, inst: Instrument, now: float) -> str | None:
        """A market order (or an IOC) while the market is closed is refused, as IB does
        ("Exchange is closed."); other orders are taken and wait for their session."""
        if self.market_session(inst.con_id, now) != "closed":
            return None
        if req.order_type.upper() in ("MKT", "MOC") or (req.tif or "").upper() == "IOC":
            return EXCHANGE_CLOSED
        return None

    def _check_order_count(self, client_id: int, req: OrderRequest, inst: Instrument) -> str | None:
        """IB allows 20 active orders per contract per side per account."""
        account = self._resolve_account(req.account)
        action = req.action.upper()
        working = sum(
            1
            for o in self._working.values()
            if o.account == account and o.instrument.con_id == inst.con_id and o.action == action
        )
        if working < MAX_ORDERS_PER_SIDE:
            return None
        return REJECTED + (
            f"The maximum of {MAX_ORDERS_PER_SIDE} active orders per contract per side per "
            f"account has been reached ({action} {inst.symbol})"
        )

    def _check_margin(self, req: OrderRequest, inst: Instrument) -> str | None:
        """An order that adds to a position must leave initial margin covered once it fills in
        full (at its limit or stop, else at the touch); reducing a position is always allowed."""
        account = self._resolve_account(req.account)
        acct = self._accounts[account]
        pos = acct.positions.get(inst.con_id)
        held = pos.quantity if pos is not None else 0.0
        sign = 1.0 if req.action.upper() == "BUY" else -1.0
        after = held + sign * req.total_quantity
        if abs(after) <= abs(held) + _ZERO:
            return None
        process = self._processes[inst.con_id]
        price = req.lmt_price if _positive(req.lmt_price) else req.aux_price
        touch = process.ask if sign > 0 else process.bid
        if not _positive(price) or (req.order_type.upper() in TRAIL_TYPES):
            price = touch
        assert price is not None
        trial = _Position(inst, quantity=after, avg_price=price)
        before = pos.contribution.init_margin if pos is not None else 0.0
        init = (acct.init_margin - before + self._contribution(trial).init_margin) * (
            self._margin_multiplier
        )
        equity = self._net_liq(acct)
        if init <= equity:
            return None
        return REJECTED + (
            "Your order is not accepted. In order to obtain the desired position your Equity "
            f"with Loan Value [{equity:.2f} {self._base}] must exceed the new total Initial "
            f"Margin of [{init:.2f} {self._base}]."
        )

    def _check_fx_odd_lot(self, req: OrderRequest, inst: Instrument) -> str | None:
        """Refuse an FX order below the IDEALPRO minimum of its quantity currency (only when
        `reject_fx_odd_lots`; IB itself routes such an order as an odd lot)."""
        if not inst.is_fx or req.total_quantity >= idealpro_minimum(inst.symbol):
            return None
        return REJECTED + (
            f"The order size {req.total_quantity:g} {inst.symbol} is below the IDEALPRO minimum "
            f"of {idealpro_minimum(inst.symbol):g} {inst.symbol}."
        )

    def _refresh_rates(self) -> None:
        """Set the rate of every currency an FX pair against the base currency prices."""
        for currency, (con_id, inverted) in self._rate_pairs.items():
            last = self._processes[con_id].last
            self._rates[currency] = 1.0 / last if inverted else last

    def _check_parent(self, client_id: int, req: OrderRequest) -> str | None:
        """A child's parent must be a working (or filled) order of the same client."""
        if not req.parent_id:
            return None
        parent = self._by_client_order.get((client_id, req.parent_id))
        if parent is None or not (parent.is_working or parent.status == "Filled"):
            return f"Parent order {req.parent_id} is not a working order of this client"
        if parent.parent_id:
            return f"Parent order {req.parent_id} is itself a child order"
        return None

    def _new_order(
        self, perm_id: int, client_id: int, req: OrderRequest, inst: Instrument
    ) -> SimOrder:
        action: Action = "SELL" if req.action.upper() == "SELL" else "BUY"
        kind = req.order_type.upper()
        order_type: OrderType = next((t for t in ORDER_TYPES if t == kind), "MKT")
        return SimOrder(
            perm_id=perm_id,
            order_id=req.order_id,
            client_id=client_id,
            account=self._resolve_account(req.account),
            instrument=inst,
            action=action,
            total_quantity=float(req.total_quantity),
            order_type=order_type,
            lmt_price=req.lmt_price if order_type in LIMIT_TYPES else None,
            tif=(req.tif or "DAY").upper(),
            order_ref=req.order_ref,
            outside_rth=req.outside_rth,
            aux_price=req.aux_price if order_type in STOP_TYPES else None,
            trailing_percent=req.trailing_percent if order_type in TRAIL_TYPES else None,
            trail_stop_price=_trail_start(req) if order_type in TRAIL_TYPES else None,
            lmt_price_offset=req.lmt_price_offset if order_type == "TRAIL LIMIT" else None,
            parent_id=req.parent_id,
            oca_group=req.oca_group,
            oca_type=req.oca_type,
            transmitted=req.transmit,
        )

    def _modify(self, order: SimOrder, req: OrderRequest, now: float) -> list[SimEvent]:
        inst = self.find_instrument(req.contract)
        reason: str | None
        if inst is None or inst.con_id != order.instrument.con_id:
            reason = "The contract of a working order cannot be changed"
        elif req.action.upper() != order.action:
            reason = "The side of a working order cannot be changed"
        elif req.account and req.account != order.account:
            reason = "The account of a working order cannot be changed"
        elif req.order_type.upper() != order.order_type:
            reason = "The order type of a working order cannot be changed"
        elif order.status == "PendingCancel":
            reason = "The order is being cancelled"
        else:
            reason = self._validate(req, inst)
            if reason is None and req.total_quantity <= order.filled:
                reason = f"Quantity {req.total_quantity} is not above the filled {order.filled}"
            if reason is None and self._reject_filter is not None:
                reason = self._reject_filter(req, inst)
        if reason is not None:
            # a refused modification leaves the order working as it was
            return [OrderRejected(replace(order), ORDER_REJECTED, reason)]
        order.total_quantity = float(req.total_quantity)
        kind = order.order_type
        if kind in LIMIT_TYPES or (kind == "TRAIL LIMIT" and not order.triggered):
            order.lmt_price = req.lmt_price if kind in LIMIT_TYPES else order.lmt_price
        if kind in STOP_TYPES:
            order.aux_price = req.aux_price
        if kind in TRAIL_TYPES:
            order.trailing_percent = req.trailing_percent
            if _positive(req.trail_stop_price):
                order.trail_stop_price = req.trail_stop_price
        if kind == "TRAIL LIMIT":
            order.lmt_price_offset = req.lmt_price_offset
        order.tif = (req.tif or "DAY").upper()
        order.order_ref = req.order_ref
        order.outside_rth = req.outside_rth
        if order.status == "PendingSubmit":
            return [OrderChanged(replace(order))]
        if not order.transmitted and req.transmit:
            return self._transmit(order, now)
        order.status = self._shown_status(order)
        events: list[SimEvent] = [OrderChanged(replace(order))]
        events.extend(self._match(order, now))
        return events

    # -- lifecycle

    def _accept(self, order: SimOrder, now: float) -> list[SimEvent]:
        """A new order reaches IB: PreSubmitted, then released with its bracket when transmitted
        (a transmit=False order waits, held, for the last order of its group)."""
        order.status = "PreSubmitted"
        if order.order_type in TRAIL_TYPES:
            self._trail(order)  # the first stop price, reported from the first openOrder on
        events: list[SimEvent] = [OrderChanged(replace(order))]
        events.extend(self._session_warnings(order, now))
        if order.transmitted:
            events.extend(self._transmit(order, now))
        return events

    def _session_warnings(self, order: SimOrder, now: float) -> list[SimEvent]:
        """What IB says of an order the session holds: 2109 when outsideRth does not apply to
        it, 399 naming when it will be placed at the exchange."""
        con_id = order.instrument.con_id
        if self.in_session(order, now):
            return []
        events: list[SimEvent] = []
        if order.outside_rth and self.market_session(con_id, now) == "extended":
            events.append(
                OrderWarning(
                    replace(order),
                    OUTSIDE_RTH_IGNORED,
                    "Order Event Warning:Attribute 'Outside Regular Trading Hours' is ignored "
                    "based on the order type and destination. PlaceOrder is now being processed.",
                )
            )
        calendar = self.calendar(con_id)
        opens = calendar.next_regular_open(now)
        when = (
            "the next regular session"
            if opens is None
            else datetime.fromtimestamp(opens, calendar.zone).strftime("%Y-%m-%d %H:%M:%S ")
            + calendar.timezone
        )
        inst = order.instrument
        events.append(
            OrderWarning(
                replace(order),
                ORDER_MESSAGE,
                f"Order Message:\n{order.action} {order.total_quantity:g} {inst.symbol} "
                f"{inst.primary_exchange}\nWarning: your order will not be placed at the "
                f"exchange until {when}",
            )
        )
        return events

    def _family(self, order: SimOrder) -> list[SimOrder]:
        """An order's bracket: the parent first, then its working children in placement order."""
        root = self._parent(order) if order.parent_id else order
        if root is None or root.order_id == 0:  # a TWS order (id 0) has no children
            return [order]
        children = [
            o
            for o in self._working.values()
            if o.parent_id == root.order_id and o.client_id == root.client_id and o is not root
        ]
        return [root, *children]

    def _transmit(self, order: SimOrder, now: float) -> list[SimEvent]:
        """Release an order and every untransmitted order of its bracket to the market."""
        events: list[SimEvent] = []
        for member in self._family(order):
            if not member.is_working or member.status == "PendingSubmit":
                continue
            member.transmitted = True
            events.extend(self._activate(member, now))
        return events

    def _parent(self, order: SimOrder) -> SimOrder | None:
        return self._by_client_order.get((order.client_id, order.parent_id))

    def _at_market(self, order: SimOrder) -> bool:
        """Released (`_released`) and in a session it may work in (`in_session`). A stop at the
        market still waits for its trigger."""
        return self._released(order) and self.in_session(order, self._at)

    def _released(self, order: SimOrder) -> bool:
        """Working and released: transmitted, not PendingSubmit, its parent (if any) done with
        a fill."""
        if order.perm_id not in self._working or order.status == "PendingSubmit":
            return False
        if not order.transmitted:
            return False
        if order.parent_id:
            parent = self._parent(order)
            return parent is not None and not parent.is_working and parent.filled > _ZERO
        return True

    def in_session(self, order: SimOrder, now: float) -> bool:
        """Whether an order may work at `now`: in the regular session, or in extended hours with
        outsideRth unless it is a market order of a stock (outsideRth does not apply to it)."""
        session = self.market_session(order.instrument.con_id, now)
        if session == "regular":
            return True
        if session == "closed":
            return False
        if order.instrument.sec_type == "STK" and order.order_type in ("MKT", "MOC"):
            return False
        return order.outside_rth

    def _shown_status(self, order: SimOrder) -> OrderStatusName:
        """PreSubmitted while held at IB (untransmitted, waiting for its parent, a stop not yet
        triggered), Submitted once at the exchange; PendingCancel stays PendingCancel."""
        if order.status in ("PendingCancel", "PendingSubmit"):
            return order.status
        held = not self._at_market(order) or (
            order.order_type in STOP_TYPES and not order.triggered
        )
        return "PreSubmitted" if held else "Submitted"

    def _activate(self, order: SimOrder, now: float) -> list[SimEvent]:
        events: list[SimEvent] = []
        status = self._shown_status(order)
        if status != order.status:
            order.status = status
            events.append(OrderChanged(replace(order)))
        events.extend(self._match(order, now))
        return events

    def _request_cancel(self, order: SimOrder, *, pending: bool) -> list[SimEvent]:
        if order.status == "PendingSubmit" or not order.transmitted:
            return self._cancel(order, "ApiCancelled")  # IB never had it
        order.status = "PendingCancel"
        events: list[SimEvent] = [OrderChanged(replace(order), open_order=False)]
        if not pending:
            events.extend(self._cancel(order))
        return events

    def _cancel(self, order: SimOrder, status: OrderStatusName = "Cancelled") -> list[SimEvent]:
        """End a working order; a parent takes its children along (or, when it had filled in
        part, leaves them working for the filled quantity)."""
        if order.perm_id not in self._working:
            return []
        order.status = status
        del self._working[order.perm_id]
        events: list[SimEvent] = [OrderChanged(replace(order))]
        if order.parent_id == 0 and order.order_id != 0:
            for child in self._family(order)[1:]:
                if order.filled > _ZERO:
                    child.total_quantity = min(child.total_quantity, order.filled)
                    events.extend(self._activate(child, self._now))
                else:
                    events.extend(self._cancel(child, status))
        return events

    def _settled(self, events: list[SimEvent], now: float) -> list[SimEvent]:
        """Apply the OCA reductions deferred to the end of a matching pass (type 3, no block)."""
        while self._deferred_oca:
            perm_id, quantity = self._deferred_oca.pop(0)
            member = self._working.get(perm_id)
            if member is not None:
                events.extend(self._reduce(member, quantity))
        return events

    def _reduce(self, member: SimOrder, quantity: float) -> list[SimEvent]:
        member.total_quantity = max(member.filled, member.total_quantity - quantity)
        if member.remaining <= _ZERO:
            return self._cancel(member)
        return [OrderChanged(replace(member))]

    def _oca_members(self, order: SimOrder) -> tuple[list[SimOrder], int]:
        """The other working orders one-cancels-all with `order`, and how: its explicit OCA
        group (same account and group name; type 0 counts as 1) or, for a bracket child without
        one, the other children of its parent (reduced with block, as IB ties them)."""
        if order.oca_group:
            members = [
                o
                for o in self._working.values()
                if o is not order and o.account == order.account and o.oca_group == order.oca_group
            ]
            return members, order.oca_type or 1
        if order.parent_id:
            return [o for o in self._family(order)[1:] if o is not order], 2
        return [], 0

    def _after_fill(self, order: SimOrder, quantity: float, now: float) -> list[SimEvent]:
        """What a fill sets off: a filled parent releases its children; OCA members are
        cancelled (type 1) or reduced by the fill (2 with block, 3 after the pass)."""
        events: list[SimEvent] = []
        members, oca_type = self._oca_members(order)
        for member in members:
            if member.perm_id not in self._working:
                continue
            if oca_type == 1:
                events.extend(self._cancel(member))
            elif oca_type == 2:
                events.extend(self._reduce(member, quantity))
            else:
                self._deferred_oca.append((member.perm_id, quantity))
        if order.status == "Filled" and order.parent_id == 0 and order.order_id != 0:
            for child in self._family(order)[1:]:
                events.extend(self._activate(child, now))
        return events

    # -- matching

    def _match_working(self, now: float) -> list[SimEvent]:
        """One matching pass over every working order; an order the session now releases (or
        holds again) is reported with its new status first."""
        events: list[SimEvent] = []
        for order in list(self._working.values()):
            if order.perm_id not in self._working:
                continue
            status = self._shown_status(order)
            if status != order.status:
                order.status = status
                events.append(OrderChanged(replace(order)))
            events.extend(self._match(order, now))
        return self._settled(events, now)

    def _trigger(self, order: SimOrder) -> bool:
        """Move a trailing stop with the last price, and say whether the stop is reached: a buy
        stop at last >= stop, a sell stop at last <= stop. A TRAIL LIMIT takes its limit then."""
        process = self._processes[order.instrument.con_id]
        last = process.last
        buying = order.action == "BUY"
        if order.order_type in TRAIL_TYPES:
            stop = self._trail(order)
        else:
            assert order.aux_price is not None
            stop = order.aux_price
        if not (last >= stop if buying else last <= stop):
            return False
        order.triggered = True
        if order.order_type == "TRAIL LIMIT":
            offset = order.lmt_price_offset or 0.0
            order.lmt_price = process.snap(stop + offset if buying else stop - offset)
        return True

    def _trail(self, order: SimOrder) -> float:
        """Move a trailing stop toward the last price (a sell's stop only up, a buy's only
        down), the trailing amount or percent away from it; return the stop."""
        process = self._processes[order.instrument.con_id]
        last = process.last
        buying = order.action == "BUY"
        distance = order.aux_price or last * (order.trailing_percent or 0.0) / 100
        candidate = process.snap(last + distance if buying else last - distance)
        current = order.trail_stop_price
        if current is None:
            order.trail_stop_price = candidate
        else:
            order.trail_stop_price = min(current, candidate) if buying else max(current, candidate)
        return order.trail_stop_price

    def _match(self, order: SimOrder, now: float) -> list[SimEvent]:
        """One matching pass over one working order: a stop's trigger, then at most one fill.
        Auction orders (MOC, LOC, OPG) wait for their auction; an IOC's rest is cancelled."""
        if not self._at_market(order):
            return []
        if order.order_type in AUCTION_TYPES or order.tif == "OPG":
            return []
        events: list[SimEvent] = []
        if order.order_type in STOP_TYPES and not order.triggered:
            if not self._trigger(order):
                return []
            order.status = self._shown_status(order)
            events.append(OrderChanged(replace(order)))
        process = self._processes[order.instrument.con_id]
        buying = order.action == "BUY"
        touch = process.ask if buying else process.bid
        limited = order.order_type in LIMIT_TYPES or order.order_type == "TRAIL LIMIT"
        limit = order.lmt_price if limited else None
        if limit is not None and not (limit >= touch if buying else limit <= touch):
            if order.tif == "IOC":
                events.extend(self._cancel(order))
            return events
        quantity = order.remaining
        if self._partial is not None:
            quantity = min(quantity, self._partial)
        events.extend(self._fill(order, quantity, touch, now))
        if order.tif == "IOC" and order.perm_id in self._working:
            events.extend(self._cancel(order))
        return events

    def _auction(self, order: SimOrder, now: float) -> list[SimEvent]:
        last = self._processes[order.instrument.con_id].last
        limit = order.lmt_price if order.order_type in LIMIT_TYPES else None
        buying = order.action == "BUY"
        if limit is not None and not (limit >= last if buying else limit <= last):
            return self._cancel(order)
        return self._fill(order, order.remaining, last, now)

    # -- fills

    def _fill(self, order: SimOrder, quantity: float, price: float, now: float) -> list[SimEvent]:
        inst = order.instrument
        acct = self._accounts[order.account]
        sign = 1.0 if order.action == "BUY" else -1.0
        commission = self._commission(inst, quantity, price)
        pos, realized = self._book_trade(acct, inst, sign * quantity, price, commission)

        cum = order.filled + quantity
        order.avg_fill_price = (order.avg_fill_price * order.filled + price * quantity) / cum
        order.filled = cum
        order.last_fill_price = price
        done = order.remaining <= _ZERO
        if done:
            order.status = "Filled"
            del self._working[order.perm_id]
        exec_id = f"{_EXEC_ID_BASE + self._exec_seq:08x}.{int(now) & 0xFFFFFFFF:08x}.01.01"
        self._exec_seq += 1
        fill = Fill(
            exec_id=exec_id,
            perm_id=order.perm_id,
            order_id=order.order_id,
            client_id=order.client_id,
            account=order.account,
            instrument=inst,
            side="BOT" if sign > 0 else "SLD",
            shares=quantity,
            price=price,
            time=now,
            cum_qty=cum,
            avg_price=order.avg_fill_price,
            order_ref=order.order_ref,
            commission=commission,
            realized_pnl=realized,
        )
        self._fills.append(fill)
        events: list[SimEvent] = [
            Executed(fill),
            # a partial fill changes only the status line; the final fill re-sends the order
            OrderChanged(replace(order), open_order=done),
            PositionChanged(self._position_view(order.account, pos)),
            AccountChanged(order.account, tuple(self.account_values(order.account))),
        ]
        events.extend(self._after_fill(order, quantity, now))
        return events

    def _book_trade(
        self,
        acct: _Account,
        inst: Instrument,
        signed_quantity: float,
        price: float,
        commission: float,
    ) -> tuple[_Position, float]:
        """Move an account's position and cash by a trade; return the position and the realized
        PnL (instrument currency)."""
        rate = self._rates[inst.currency]
        pos = acct.positions.setdefault(inst.con_id, _Position(inst))
        realized = _trade(pos, signed_quantity, price)
        cash_move = -commission
        if inst.sec_type == "FUT":
            cash_move += realized  # variation margin: only realized PnL settles in cash
        elif inst.is_fx:
            # buying EUR.USD: EUR comes in, USD goes out (the realized PnL is in these moves)
            acct.cash[inst.symbol] = acct.cash.get(inst.symbol, 0.0) + signed_quantity
            cash_move -= signed_quantity * price
        else:
            cash_move -= signed_quantity * price * inst.multiplier
        acct.cash[inst.currency] = acct.cash.get(inst.currency, 0.0) + cash_move
        acct.realized += realized * rate
        acct.commissions += commission * rate
        self._revalue(acct, pos)
        return pos, realized

    # -- options

    def _option_process(self, inst: Instrument, seed: int) -> OptionProcess:
        if inst.right not in ("C", "P"):
            raise ValueError(
                f"option {inst.local_symbol}: right must be C or P, not {inst.right!r}"
            )
        underlying = self._processes.get(inst.underlying_con_id)
        if underlying is None or self._instruments[inst.underlying_con_id].is_option:
            raise ValueError(
                f"option {inst.local_symbol}: no underlying with conId {inst.underlying_con_id}"
            )
        return OptionProcess(
            underlying,
            right="C" if inst.right == "C" else "P",
            strike=inst.strike,
            expiry=option_expiry(inst.last_trade_date),
            implied_vol=inst.implied_vol,
            spread=inst.spread,
            min_tick=inst.min_tick,
            seed=f"{seed}:{inst.con_id}",
            clock=lambda: self._now,
        )

    def _expire_options(self, now: float) -> list[SimEvent]:
        """Carry out the expiry of every option whose last trading day has closed by `now`, as
        IB's exercise by exception does: one at least `EXERCISE_THRESHOLD` in the money becomes
        a position in its underlying (a long call buys, a long put sells, a short call is
        assigned a sale, a short put a purchase: quantity × multiplier shares at the strike),
        the rest expire worthless. The option leaves the book at its intrinsic value, the
        underlying comes in at its last price (together: the strike), so NetLiquidation does
        not jump; no commission. Working orders of an expired option are cancelled."""
        events: list[SimEvent] = []
        for con_id, process in self._processes.items():
            if (
                con_id in self._expired
                or not isinstance(process, OptionProcess)
                or process.years_left > 0
            ):
                continue
            self._expired.add(con_id)
            inst = self._instruments[con_id]
            underlying = self._instruments[inst.underlying_con_id]
            spot = process.underlying_last
            value = intrinsic_value(process.right, spot, inst.strike)
            exercised = value >= EXERCISE_THRESHOLD
            for order in [o for o in self._working.values() if o.instrument.con_id == con_id]:
                events.extend(self._cancel(order))
            for name, acct in self._accounts.items():
                pos = acct.positions.get(con_id)
                if pos is None or pos.quantity == 0.0:
                    continue
                quantity = pos.quantity
                self._book_trade(acct, inst, -quantity, value if exercised else 0.0, 0.0)
                events.append(PositionChanged(self._position_view(name, pos)))
                if exercised:
                    direction = 1.0 if process.right == "C" else -1.0
                    shares = direction * quantity * inst.multiplier / underlying.multiplier
                    held, _ = self._book_trade(acct, underlying, shares, spot, 0.0)
                    events.append(PositionChanged(self._position_view(name, held)))
                events.append(AccountChanged(name, tuple(self.account_values(name))))
        return events

    def _commission(self, inst: Instrument, quantity: float, price: float) -> float:
        """In the instrument's currency (for FX the quote currency)."""
        if inst.is_fx:
            minimum = FX_MIN_COMMISSION / self._rates[inst.currency]
            return max(minimum, FX_COMMISSION_RATE * quantity * price)
        if inst.sec_type == "FUT":
            return self._commission_per_future * quantity
        if inst.is_option:
            return max(OPTION_MIN_COMMISSION, OPTION_COMMISSION * quantity)
        return max(self._min_commission, self._commission_per_share * quantity)

    def _unrealized(self, pos: _Position, last: float) -> float:
        return (last - pos.avg_price) * pos.quantity * pos.instrument.multiplier

    def _contribution(self, pos: _Position) -> _Contribution:
        if pos.quantity == 0.0:
            return _NOTHING
        inst = pos.instrument
        rate = self._rates[inst.currency]
        last = self._processes[inst.con_id].last
        notional = pos.quantity * last * inst.multiplier
        unrealized = self._unrealized(pos, last)
        contracts = abs(pos.quantity)
        if inst.is_option:
            # long: paid in full, no margin; short: its value plus a rate of the underlying's
            underlying = self._processes[inst.underlying_con_id].last
            short = contracts * inst.multiplier if pos.quantity < 0 else 0.0
            init = short * (last + inst.initial_margin_rate * underlying)
            maint = short * (last + inst.maint_margin_rate * underlying)
        else:
            per_contract = inst.sec_type == "FUT"
            if per_contract and inst.initial_margin_per_contract > 0:
                init = inst.initial_margin_per_contract * contracts
            else:
                init = inst.initial_margin_rate * abs(notional)
            if per_contract and inst.maint_margin_per_contract > 0:
                maint = inst.maint_margin_per_contract * contracts
            else:
                maint = inst.maint_margin_rate * abs(notional)
        is_future = inst.sec_type == "FUT"
        return _Contribution(
            # FX: the value is in the account's cash balances already
            stock_value=0.0 if is_future or inst.is_fx else notional * rate,
            futures_unrealized=unrealized * rate if is_future else 0.0,
            gross=abs(notional) * rate,
            init_margin=init * rate,
            maint_margin=maint * rate,
            unrealized=unrealized * rate,
        )

    def _revalue(self, acct: _Account, pos: _Position) -> None:
        """Swap one position's old contribution to the account's totals for its current one."""
        acct.add(pos.contribution, -1.0)
        pos.contribution = self._contribution(pos)
        acct.add(pos.contribution, 1.0)

    def _revalue_all(self) -> None:
        # rebuilt from scratch (not patched) so float drift from many O(1) updates cannot build up
        for acct in self._accounts.values():
            acct.reset_totals()
            for pos in acct.positions.values():
                pos.contribution = self._contribution(pos)
                acct.add(pos.contribution, 1.0)

    def _cash_in_base(self, acct: _Account) -> float:
        return sum(amount * self._rates[currency] for currency, amount in acct.cash.items())

    def _net_liq(self, acct: _Account) -> float:
        return self._cash_in_base(acct) + acct.stock_value + acct.futures_unrealized

    def _position_view(self, account: str, pos: _Position) -> PositionView:
        inst = pos.instrument
        last = self._processes[inst.con_id].last
        return PositionView(
            account=account,
            instrument=inst,
            position=pos.quantity,
            avg_cost=pos.avg_price * inst.multiplier,
            market_price=last,
            market_value=pos.quantity * last * inst.multiplier,
            unrealized_pnl=self._unrealized(pos, last),
            realized_pnl=pos.realized,
        )


_SEC_TYPES: dict[str, SecType] = {"FUT": "FUT", "CASH": "CASH"}


def option_expiry(last_trade_date: str) -> float:
    """When an option with this last trading day (YYYYMMDD) expires: the US close, 16:00
    New York time, in epoch seconds."""
    try:
        day = datetime.strptime(last_trade_date[:8], "%Y%m%d")
    except ValueError:
        raise ValueError(
            f"an option needs lastTradeDate YYYYMMDD, not {last_trade_date!r}"
        ) from None
    close = day.replace(hour=OPTION_EXPIRY_HOUR, tzinfo=OPTION_EXPIRY_ZONE)
    return close.timestamp()


def idealpro_minimum(currency: str) -> float:
    """The smallest IDEALPRO order in `currency` (the pair's base currency); smaller is an odd
    lot."""
    return IDEALPRO_MINIMUM.get(currency, IDEALPRO_MINIMUM["USD"])


def _trade(pos: _Position, signed_quantity: float, price: float) -> float:
    """Apply a fill to a position by the average-cost method; return the realized PnL."""
    old = pos.quantity
    new = old + signed_quantity
    if abs(new) < _ZERO:
        new = 0.0
    realized = 0.0
    if old == 0.0 or (old > 0) == (signed_quantity > 0):
        # opening or adding: the average moves toward the fill price
        pos.avg_price = (old * pos.avg_price + signed_quantity * price) / new
    else:
        closed = min(abs(signed_quantity), abs(old))
        realized = closed * (price - pos.avg_price) * pos.instrument.multiplier
        realized *= 1.0 if old > 0 else -1.0
        if new == 0.0:
            pos.avg_price = 0.0
        elif (new > 0) != (old > 0):
            pos.avg_price = price  # flipped: what is left was opened at this fill
    pos.quantity = new
    pos.realized += realized
    return realized


def _order_record(order: SimOrder) -> dict[str, Any]:
    rec = {f.name: getattr(order, f.name) for f in fields(SimOrder) if f.name != "instrument"}
    rec["con_id"] = order.instrument.con_id
    return rec


def _fill_record(fill: Fill) -> dict[str, Any]:
    rec = {f.name: getattr(fill, f.name) for f in fields(Fill) if f.name != "instrument"}
    rec["con_id"] = fill.instrument.con_id
    return rec


def _finite(value: object) -> float:
    """A saved number, which must be a finite int or float."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ExchangeError(f"{value!r} is not a finite number")
    return float(value)


def _positive(value: float | None) -> bool:
    return value is not None and math.isfinite(value) and value > 0


def _trail_start(req: OrderRequest) -> float | None:
    """A trailing stop's first stop price when the client gave one (trailStopPrice)."""
    return req.trail_stop_price if _positive(req.trail_stop_price) else None


def _placeholder_instrument(spec: ContractSpec) -> Instrument:
    """An Instrument echoing a contract the market does not list, so a rejection can name it."""
    return Instrument(
        con_id=spec.con_id,
        symbol=spec.symbol,
        sec_type=_SEC_TYPES.get(spec.sec_type.upper(), "STK"),
        exchange=spec.exchange,
        primary_exchange=spec.primary_exchange,
        currency=spec.currency,
        last_trade_date=spec.last_trade_date,
        local_symbol=spec.local_symbol,
        trading_class=spec.trading_class,
    )
