"""The simulated gateway's exchange model: market, accounts, margin, PnL and order matching.

Pure and deterministic: no clock reads, no I/O. Every mutating call takes `now` (epoch seconds)
and returns the events (`guardd.sim.types.SimEvent`) the gateway turns into TWS messages. Events
carry SNAPSHOTS of orders, so later changes never leak into events already returned. Prices move
only in `advance` (and `jump_price`); `place_order` trades against the quote as it stands.

Matching
    MKT buys fill at the ask, sells at the bid. A LMT order is marketable when a buy's limit is
    at or above the ask (a sell's at or below the bid) and fills at the touch, which is the better
    of limit and touch. Non-marketable LMT orders rest and are re-checked on every `advance`.
    With `partial_fill_quantity` set, one matching pass fills at most that much of an order; the
    rest keeps working (a MKT remainder fills on the next passes). Book depth is not modelled.

Accounts, cash and PnL (average-cost method, commissions kept apart)
    Cash is kept per currency; values in another currency are converted to the base currency with
    fixed `exchange_rates` (units of base per unit of currency; reported as `ExchangeRate`).
    A stock fill moves cash by -signed quantity × price × multiplier; a futures fill moves no
    notional (futures are marked to market): only realized PnL reaches cash. Commissions
    (stocks: max(min_commission, per_share × shares); futures: per_future × contracts, in the
    instrument's currency) reduce cash and are NOT part of realized PnL or average cost, so
        NetLiquidation = starting cash + realized + unrealized − commissions
    holds exactly. Realized PnL arises when a position is reduced or closed:
    closed quantity × (fill price − average price) × multiplier × sign(position). Positions are
    marked at the last price.

Account values (base currency)
    NetLiquidation      = cash + Σ stock market value + Σ futures unrealized PnL
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
from dataclasses import dataclass, replace

from guardd.sim.market import PriceProcess, Quote
from guardd.sim.types import (
    AccountChanged,
    Action,
    ContractSpec,
    Executed,
    Fill,
    Instrument,
    OrderChanged,
    OrderRejected,
    OrderRequest,
    OrderType,
    PositionChanged,
    PositionView,
    SimEvent,
    SimOrder,
)

FIRST_PERM_ID = 1_000_000_001
NO_SECURITY_DEFINITION = 200
ORDER_REJECTED = 201
DUPLICATE_ORDER_ID = 103
MAX_ORDER_QUANTITY = 1e9  # larger is a typo or an attack, never a trade: refused with 201
BUYING_POWER_FACTOR = 4.0  # Reg-T intraday: four times the excess of equity over initial margin
_EXEC_ID_BASE = 0xE1A7  # execIds look like IB's: "0000e1a7.65f1e2b3.01.01"
_ZERO = 1e-9  # quantities below this are float noise, not a position

RejectFilter = Callable[[OrderRequest, Instrument], str | None]


class ExchangeError(Exception):
    """Base of the exchange model's errors."""


class OrderNotFoundError(ExchangeError):
    """No order with that id of that client exists (the gateway answers error 10147)."""


class OrderNotCancellableError(ExchangeError):
    """The order exists but has already finished (the gateway answers error 161)."""


class UnknownAccountError(ExchangeError, KeyError):
    """An account id the exchange does not manage."""


class UnknownInstrumentError(ExchangeError, KeyError):
    """A conId the exchange does not list."""


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
        for inst in instruments:
            if inst.con_id in self._instruments:
                raise ValueError(f"duplicate conId {inst.con_id}")
            if inst.currency not in self._rates:
                raise ValueError(f"no exchange rate for {inst.currency} ({inst.symbol})")
            self._instruments[inst.con_id] = inst
            # one stream per instrument: adding an instrument does not change the others' prices
            self._processes[inst.con_id] = PriceProcess.for_instrument(
                inst, f"{seed}:{inst.con_id}"
            )
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
        self._next_perm_id = FIRST_PERM_ID
        self._exec_seq = 0
        self._orders: dict[int, SimOrder] = {}  # by permId, in placement order
        self._working: dict[int, SimOrder] = {}
        self._by_client_order: dict[tuple[int, int], SimOrder] = {}
        self._fills: list[Fill] = []
        self._reject_filter: RejectFilter | None = None
        self._margin_multiplier = 1.0

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

    @property
    def margin_multiplier(self) -> float:
        return self._margin_multiplier

    def find_instrument(self, spec: ContractSpec) -> Instrument | None:
        """The one instrument a client's contract fields name, or None if none or ambiguous.

        By conId when non-zero; otherwise by symbol and secType, narrowed by currency, and for
        futures by lastTradeDate (a YYYYMM prefix matches) and localSymbol, when given.
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
        ]
        return matches[0] if len(matches) == 1 else None

    def quote(self, con_id: int) -> Quote:
        """Top of book and last trade of an instrument."""
        return self._process(con_id).quote()

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
        for currency, amount in acct.cash.items():
            values.append(("CashBalance", _money(amount), currency))
        for currency, rate in self._rates.items():
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
        """Seed a starting position (no cash moves; the day's PnL baseline follows along)."""
        acct = self._account(account)
        inst = self._instrument(con_id)
        before = self._net_liq(acct)
        pos = acct.positions.setdefault(con_id, _Position(inst))
        pos.quantity = float(quantity)
        pos.avg_price = float(avg_price) if quantity else 0.0
        self._revalue(acct, pos)
        pos.total_at_day_start = pos.realized + self._unrealized(pos, self._processes[con_id].last)
        acct.net_liq_at_day_start += self._net_liq(acct) - before

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

    # ----------------------------------------------------------------------------- time

    def advance(self, now: float) -> list[SimEvent]:
        """Step every price to `now` and fill resting orders that became marketable."""
        dt = now - self._now
        if not dt > 0:
            return []
        self._now = now
        for process in self._processes.values():
            process.step(dt)
        self._revalue_all()
        return self._match_working(now)

    # ----------------------------------------------------------------------------- orders

    def place_order(self, client_id: int, req: OrderRequest, now: float) -> list[SimEvent]:
        """Place a new order, or modify a working one with the same (client id, order id)."""
        existing = self._by_client_order.get((client_id, req.order_id))
        if existing is not None:
            if existing.is_working:
                return self._modify(existing, req, now)
            return [OrderRejected(replace(existing), DUPLICATE_ORDER_ID, "Duplicate order id")]
        inst = self.find_instrument(req.contract)
        if inst is None:
            order = self._new_order(0, client_id, req, _placeholder_instrument(req.contract))
            order.status = "Inactive"
            no_definition = "No security definition has been found for the request"
            return [OrderRejected(order, NO_SECURITY_DEFINITION, no_definition)]
        reason = self._validate(req, inst)
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
        events: list[SimEvent] = [OrderChanged(replace(order))]
        order.status = "Submitted"
        events.append(OrderChanged(replace(order)))
        events.extend(self._match(order, now))
        return events

    def cancel_order(self, client_id: int, order_id: int, now: float) -> list[SimEvent]:
        """Cancel a working order of THAT client (cancelOrder)."""
        order = self._by_client_order.get((client_id, order_id))
        if order is None:
            raise OrderNotFoundError(f"OrderId {order_id} that needs to be cancelled is not found.")
        if not order.is_working:
            raise OrderNotCancellableError(
                f"Cannot cancel the order {order_id}: it is already {order.status}"
            )
        return self._cancel(order)

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
        return events

    def global_cancel(self, now: float) -> list[SimEvent]:
        """Cancel every working order of every client (reqGlobalCancel)."""
        events: list[SimEvent] = []
        for order in list(self._working.values()):
            events.extend(self._cancel(order))
        return events

    def cancel_orders_of(self, client_id: int | None, now: float) -> list[SimEvent]:
        """Cancel every working order of one client (every client when None), as a person in
        TWS or IB itself would: no request of that client is involved."""
        events: list[SimEvent] = []
        for order in list(self._working.values()):
            if client_id is None or order.client_id == client_id:
                events.extend(self._cancel(order))
        return events

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
        if order_type not in ("MKT", "LMT"):
            return f"Unsupported order type {req.order_type!r}: MKT or LMT"
        if order_type == "LMT":
            price = req.lmt_price
            if price is None or not math.isfinite(price) or price <= 0:
                return "A limit order needs a positive limit price"
        return None

    def _new_order(
        self, perm_id: int, client_id: int, req: OrderRequest, inst: Instrument
    ) -> SimOrder:
        action: Action = "SELL" if req.action.upper() == "SELL" else "BUY"
        order_type: OrderType = "LMT" if req.order_type.upper() == "LMT" else "MKT"
        return SimOrder(
            perm_id=perm_id,
            order_id=req.order_id,
            client_id=client_id,
            account=self._resolve_account(req.account),
            instrument=inst,
            action=action,
            total_quantity=float(req.total_quantity),
            order_type=order_type,
            lmt_price=req.lmt_price if order_type == "LMT" else None,
            tif=req.tif,
            order_ref=req.order_ref,
            outside_rth=req.outside_rth,
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
        if order.order_type == "LMT":
            order.lmt_price = req.lmt_price
        order.tif = req.tif
        order.order_ref = req.order_ref
        order.outside_rth = req.outside_rth
        events: list[SimEvent] = [OrderChanged(replace(order))]
        events.extend(self._match(order, now))
        return events

    def _cancel(self, order: SimOrder) -> list[SimEvent]:
        order.status = "Cancelled"
        del self._working[order.perm_id]
        return [OrderChanged(replace(order))]

    def _match_working(self, now: float) -> list[SimEvent]:
        events: list[SimEvent] = []
        for order in list(self._working.values()):
            events.extend(self._match(order, now))
        return events

    def _match(self, order: SimOrder, now: float) -> list[SimEvent]:
        """One matching pass over one working order: at most one fill."""
        process = self._processes[order.instrument.con_id]
        buying = order.action == "BUY"
        touch = process.ask if buying else process.bid
        if order.order_type == "LMT":
            assert order.lmt_price is not None
            marketable = order.lmt_price >= touch if buying else order.lmt_price <= touch
            if not marketable:
                return []
        quantity = order.remaining
        if self._partial is not None:
            quantity = min(quantity, self._partial)
        return self._fill(order, quantity, touch, now)

    def _fill(self, order: SimOrder, quantity: float, price: float, now: float) -> list[SimEvent]:
        inst = order.instrument
        acct = self._accounts[order.account]
        rate = self._rates[inst.currency]
        sign = 1.0 if order.action == "BUY" else -1.0
        commission = self._commission(inst, quantity)
        pos = acct.positions.setdefault(inst.con_id, _Position(inst))
        realized = _trade(pos, sign * quantity, price)
        cash_move = -commission
        if inst.sec_type == "FUT":
            cash_move += realized  # variation margin: only realized PnL settles in cash
        else:
            cash_move -= sign * quantity * price * inst.multiplier
        acct.cash[inst.currency] = acct.cash.get(inst.currency, 0.0) + cash_move
        acct.realized += realized * rate
        acct.commissions += commission * rate
        self._revalue(acct, pos)

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
        return [
            Executed(fill),
            # a partial fill changes only the status line; the final fill re-sends the order
            OrderChanged(replace(order), open_order=done),
            PositionChanged(self._position_view(order.account, pos)),
            AccountChanged(order.account, tuple(self.account_values(order.account))),
        ]

    def _commission(self, inst: Instrument, quantity: float) -> float:
        if inst.sec_type == "FUT":
            return self._commission_per_future * quantity
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
        if inst.sec_type == "FUT" and inst.initial_margin_per_contract > 0:
            init = inst.initial_margin_per_contract * contracts
        else:
            init = inst.initial_margin_rate * abs(notional)
        if inst.sec_type == "FUT" and inst.maint_margin_per_contract > 0:
            maint = inst.maint_margin_per_contract * contracts
        else:
            maint = inst.maint_margin_rate * abs(notional)
        is_future = inst.sec_type == "FUT"
        return _Contribution(
            stock_value=0.0 if is_future else notional * rate,
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


def _placeholder_instrument(spec: ContractSpec) -> Instrument:
    """An Instrument echoing a contract the market does not list, so a rejection can name it."""
    return Instrument(
        con_id=spec.con_id,
        symbol=spec.symbol,
        sec_type="FUT" if spec.sec_type.upper() == "FUT" else "STK",
        exchange=spec.exchange,
        primary_exchange=spec.primary_exchange,
        currency=spec.currency,
        last_trade_date=spec.last_trade_date,
        local_symbol=spec.local_symbol,
        trading_class=spec.trading_class,
    )
