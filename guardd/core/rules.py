"""Risk rules: each reads the Book at `now` and returns one `Finding`.

A rule is a small frozen dataclass holding its limits, with `evaluate(book, now) -> Finding`.
Every evaluation returns a Finding, "ok" included, so its value can be exported as a metric. A
rule that watches many subjects (positions, orders, clients, bots) returns its worst one.

Guards shared by all rules:
- a rule that reads positions, orders or account values answers "data" (never a breach) until the
  Book is synced, i.e. both End barriers arrived since the last (re)connect;
- a missing, NaN, non-positive (where a divisor) or stale input answers "data", never a breach:
  the guard must not become the incident;
- debouncing (N consecutive breaching evaluations) is the engine's job (`engine.Debouncer`).

Levels, worst last: ok < data < warn < reduce < kill. "data" means "cannot judge": it alerts.
Ratios are fractions (0.05 = 5 %); money is in the account's base currency; times in seconds.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from itertools import pairwise
from typing import Literal, Protocol, get_args

from guardd.core.book import Book, Order, Position, Sample, value_fresh

Level = Literal["ok", "data", "warn", "reduce", "kill"]
SEVERITY: Mapping[Level, int] = {"ok": 0, "data": 1, "warn": 2, "reduce": 3, "kill": 4}
BreachLevel = Literal["warn", "reduce", "kill"]
"""The levels of a breach, least to most severe: a limit's levels in the config (warn, reduce,
kill), the findings that breach, the metrics' limit labels."""
BREACH_LEVELS: tuple[BreachLevel, ...] = get_args(BreachLevel)


@dataclass(frozen=True, slots=True)
class Finding:
    """What one rule concluded at one moment.

    `value` is the measured figure (None when it could not be measured), `limit` the threshold
    it crossed or would cross next, `subject` what it is about ("" for the account, a symbol,
    "client:7", "perm:123", a bot name), `target_leverage` set by rules that ask for a reduction.
    """

    rule: str
    level: Level
    value: float | None
    limit: float | None
    message: str
    subject: str = ""
    target_leverage: float | None = None

    @property
    def breach(self) -> bool:
        """True for warn, reduce and kill."""
        return self.level in BREACH_LEVELS


@dataclass(frozen=True, slots=True)
class Thresholds:
    """warn / reduce / kill limits of one figure; None disables that level."""

    warn: float | None = None
    reduce: float | None = None
    kill: float | None = None


class Rule(Protocol):
    """Anything that judges the Book at `now`."""

    @property
    def name(self) -> str:
        """The rule's name, used in findings, metrics, debounce config."""
        ...

    def evaluate(self, book: Book, now: float) -> Finding:
        """Judge the Book at `now` (float epoch seconds)."""
        ...


def worst(findings: Sequence[Finding]) -> Finding | None:
    """The most severe finding (the first of equals), or None for no findings."""
    best: Finding | None = None
    for f in findings:
        if best is None or SEVERITY[f.level] > SEVERITY[best.level]:
            best = f
    return best


def _worst_or_highest(findings: Sequence[Finding]) -> Finding | None:
    """The worst finding; when every one is "ok", the one with the highest value (the figure the
    metric reports, e.g. the busiest client). None for no findings."""
    found = worst(findings)
    if found is not None and found.level == "ok":
        return max(findings, key=lambda f: f.value or 0.0)
    return found


def grade(
    rule: str,
    value: float,
    limits: Thresholds,
    *,
    what: str,
    higher_is_worse: bool = True,
    subject: str = "",
) -> Finding:
    """Grade a finite `value` against `limits` (kill checked first, then reduce, then warn).

    A value that is not finite (a NaN that slipped through an input) is a "data" finding: it can
    neither breach nor pass for "within limits"."""
    if not math.isfinite(value):
        return data(rule, f"{what} is not a number ({value})", subject)
    ladder: tuple[tuple[Level, float | None], ...] = (
        ("kill", limits.kill),
        ("reduce", limits.reduce),
        ("warn", limits.warn),
    )
    for level, limit in ladder:
        if limit is None:
            continue
        crossed = value >= limit if higher_is_worse else value <= limit
        if crossed:
            op = ">=" if higher_is_worse else "<="
            return Finding(
                rule,
                level,
                value,
                limit,
                f"{what} {value:.6g} {op} {level} limit {limit:.6g}",
                subject,
            )
    nearest = next((x for x in (limits.warn, limits.reduce, limits.kill) if x is not None), None)
    return Finding(rule, "ok", value, nearest, f"{what} {value:.6g} within limits", subject)


def data(rule: str, message: str, subject: str = "") -> Finding:
    """A "cannot judge" finding: missing, NaN or stale input."""
    return Finding(rule, "data", None, None, message, subject)


def _unsynced(book: Book, rule: str) -> Finding | None:
    if not book.synced:
        return data(rule, "book not synced since (re)connect")
    return None


def _fresh_number(
    sample: Sample | None, now: float, max_age_s: float, rule: str, what: str, positive: bool
) -> float | Finding:
    """The sample's value, or a data finding if missing, NaN, stale or (if asked) not positive."""
    if sample is None:
        return data(rule, f"{what} missing")
    if not math.isfinite(sample.value):
        return data(rule, f"{what} is not a number")
    if now - sample.ts > max_age_s:
        return data(rule, f"{what} is {now - sample.ts:.0f}s old (max {max_age_s:.0f}s)")
    if positive and sample.value <= 0:
        return data(rule, f"{what} is not positive: {sample.value}")
    return sample.value


def _per_net_liquidation(
    book: Book, now: float, max_age_s: float, rule: str, key: str
) -> float | Finding:
    """Account value `key` / NetLiquidation, or a data finding: Book unsynced, either value
    missing, NaN or older than `max_age_s`, NetLiquidation not positive."""
    if (f := _unsynced(book, rule)) is not None:
        return f
    nl = _fresh_number(book.net_liquidation, now, max_age_s, rule, "NetLiquidation", True)
    if isinstance(nl, Finding):
        return nl
    value = _fresh_number(book.value(key), now, max_age_s, rule, key, False)
    if isinstance(value, Finding):
        return value
    return value / nl


# ------------------------------------------------------------------------- exposure and margin


@dataclass(frozen=True, slots=True)
class Leverage:
    """Leverage = gross position value (base currency, live per-position values converted with
    ExchangeRate) / NetLiquidation. Unitless, e.g. warn 2.0, reduce 3.0, kill 4.0.

    Data: a position without a value, a currency without a rate, a position value older than
    `max_value_age_s` unless IB's account-updates stream valued it within its own refresh
    interval (`book.value_fresh`, `PORTFOLIO_MAX_AGE_S`), NetLiquidation missing/NaN/≤0/older
    than `max_account_age_s`.
    """

    limits: Thresholds
    max_value_age_s: float = 30.0
    max_account_age_s: float = 600.0
    name: str = "leverage"
    # How an option counts: "notional", its market value (price x multiplier x quantity), or
    # "delta", delta x underlying price x multiplier x quantity from IB's latest option
    # computation (no delta, no underlying price or one older than `max_value_age_s`: data).
    options: Literal["notional", "delta"] = "notional"

    def evaluate(self, book: Book, now: float) -> Finding:
        """Grade gross exposure / net liquidation."""
        if (f := _unsynced(book, self.name)) is not None:
            return f
        nl = _fresh_number(
            book.net_liquidation, now, self.max_account_age_s, self.name, "NetLiquidation", True
        )
        if isinstance(nl, Finding):
            return nl
        exposure = book.exposure()
        if exposure.missing_rates:
            return data(self.name, f"no ExchangeRate for {', '.join(exposure.missing_rates)}")
        if exposure.gross is None:
            return data(self.name, f"{exposure.unvalued} position(s) without a value")
        gross = exposure.gross
        for p in book.guarded_positions():
            if not value_fresh(p, now, self.max_value_age_s):
                return data(self.name, f"value of {p.symbol} is stale", p.symbol)
            if self.options == "delta" and p.sec_type == "OPT":
                delta_value = self._delta_exposure(book, p, now)
                if isinstance(delta_value, Finding):
                    return delta_value
                # the gross counted its market value; it counts its delta exposure instead
                # (a rate is known: exposure() has no missing rate here)
                rate = book.exchange_rate(p.currency) or 0.0
                gross += (delta_value - abs(p.value or 0.0)) * rate
        return grade(self.name, gross / nl, self.limits, what="leverage")

    def _delta_exposure(self, book: Book, p: Position, now: float) -> float | Finding:
        """|delta x underlying price x multiplier x quantity| of an option position, in its
        currency; a data finding when IB's computation of it is missing, incomplete or stale."""
        greeks = book.option_greeks(p.con_id)
        if greeks is None:
            return data(self.name, f"no delta for {p.symbol}", p.symbol)
        if not (math.isfinite(greeks.delta) and math.isfinite(greeks.underlying_price)):
            return data(self.name, f"no delta for {p.symbol}", p.symbol)
        if greeks.underlying_price <= 0:
            return data(self.name, f"no underlying price for {p.symbol}", p.symbol)
        if now - greeks.ts > self.max_value_age_s:
            return data(self.name, f"delta of {p.symbol} is stale", p.symbol)
        return abs(greeks.delta * greeks.underlying_price * p.multiplier * p.quantity)


@dataclass(frozen=True, slots=True)
class MarginCushion:
    """Cushion = ExcessLiquidity / NetLiquidation (fraction, LOWER is worse), e.g. warn 0.25,
    reduce 0.15, kill 0.08. Data: either value missing/NaN/stale, NetLiquidation ≤ 0."""

    limits: Thresholds
    max_age_s: float = 600.0
    name: str = "margin_cushion"

    def evaluate(self, book: Book, now: float) -> Finding:
        """Grade excess liquidity / net liquidation."""
        ratio = _per_net_liquidation(book, now, self.max_age_s, self.name, "ExcessLiquidity")
        if isinstance(ratio, Finding):
            return ratio
        return grade(self.name, ratio, self.limits, what="cushion", higher_is_worse=False)


@dataclass(frozen=True, slots=True)
class MaintMargin:
    """Maintenance margin ratio = MaintMarginReq / NetLiquidation (fraction, higher is worse),
    e.g. warn 0.6, reduce 0.75, kill 0.9. Data: either value missing/NaN/stale, NetLiq ≤ 0."""

    limits: Thresholds
    max_age_s: float = 600.0
    name: str = "maint_margin"

    def evaluate(self, book: Book, now: float) -> Finding:
        """Grade maintenance requirement / net liquidation."""
        ratio = _per_net_liquidation(book, now, self.max_age_s, self.name, "MaintMarginReq")
        if isinstance(ratio, Finding):
            return ratio
        return grade(self.name, ratio, self.limits, what="maint margin ratio")


@dataclass(frozen=True, slots=True)
class MarginSpike:
    """Margin spike = MaintMarginReq_now / MaintMarginReq_previous − 1 (fraction), judged only
    when the guarded positions did not change between the two readings (a broker-side margin
    hike, not our own trading), e.g. warn 0.25, kill 1.0.

    A change older than `max_age_s` is history, not a spike: "ok". A NaN reading: data.
    """

    limits: Thresholds
    max_age_s: float = 600.0
    name: str = "margin_spike"

    def evaluate(self, book: Book, now: float) -> Finding:
        """Grade the last jump in maintenance requirement at unchanged positions."""
        if (f := _unsynced(book, self.name)) is not None:
            return f
        mc = book.margin_change
        if mc is None or not math.isfinite(mc.previous) or mc.previous <= 0:
            return Finding(self.name, "ok", 0.0, self.limits.warn, "no margin baseline yet")
        if not math.isfinite(mc.current):
            return data(self.name, "MaintMarginReq is not a number")
        if now - mc.ts > self.max_age_s:
            return Finding(self.name, "ok", 0.0, self.limits.warn, "no recent margin change")
        if mc.previous_positions_version != mc.current_positions_version:
            return Finding(self.name, "ok", 0.0, self.limits.warn, "positions changed")
        return grade(
            self.name, mc.current / mc.previous - 1.0, self.limits, what="maint margin jump"
        )


# ------------------------------------------------------------------------- loss


@dataclass(frozen=True, slots=True)
class DailyLoss:
    """Daily loss = −daily PnL (reqPnL) / start-of-day NetLiquidation (fraction, higher is
    worse), e.g. warn 0.02, kill 0.05. Data: PnL missing/NaN/older than `max_age_s`, no
    start-of-day value."""

    limits: Thresholds
    max_age_s: float = 30.0
    name: str = "daily_loss"

    def evaluate(self, book: Book, now: float) -> Finding:
        """Grade today's loss against start-of-day equity."""
        if (f := _unsynced(book, self.name)) is not None:
            return f
        daily = _fresh_number(book.pnl_daily, now, self.max_age_s, self.name, "daily PnL", False)
        if isinstance(daily, Finding):
            return daily
        sod = book.start_of_day
        if sod is None or not math.isfinite(sod) or sod <= 0:
            return data(self.name, "start-of-day net liquidation unknown")
        return grade(self.name, -daily / sod, self.limits, what="daily loss")


@dataclass(frozen=True, slots=True)
class Drawdown:
    """Drawdown = (peak equity − equity) / peak equity (fraction), equity = start-of-day
    NetLiquidation + daily PnL, peak = intraday high of that equity, e.g. warn 0.03, kill 0.06.
    Data: PnL missing/NaN/stale, no start-of-day value."""

    limits: Thresholds
    max_age_s: float = 30.0
    name: str = "drawdown"

    def evaluate(self, book: Book, now: float) -> Finding:
        """Grade the fall from today's equity peak."""
        if (f := _unsynced(book, self.name)) is not None:
            return f
        daily = _fresh_number(book.pnl_daily, now, self.max_age_s, self.name, "daily PnL", False)
        if isinstance(daily, Finding):
            return daily
        equity, peak = book.equity, book.peak_equity
        if equity is None or peak is None or peak <= 0:
            return data(self.name, "equity or its peak unknown")
        return grade(self.name, (peak - equity) / peak, self.limits, what="drawdown")


# ------------------------------------------------------------------------- volatility

SECONDS_PER_TRADING_YEAR = 252 * 6.5 * 3600


def realised_vol(
    samples: Sequence[tuple[float, float]], annualisation_s: float = SECONDS_PER_TRADING_YEAR
) -> float:
    """Annualised realised volatility of (ts, price) samples: sqrt(Σ r² / elapsed × year), with r
    the log returns between consecutive samples, elapsed in seconds. NaN for < 2 samples."""
    if len(samples) < 2:
        return math.nan
    elapsed = samples[-1][0] - samples[0][0]
    if elapsed <= 0:
        return math.nan
    total = 0.0
    for (_, a), (_, b) in pairwise(samples):
        if a <= 0 or b <= 0:
            return math.nan
        total += math.log(b / a) ** 2
    return math.sqrt(total / elapsed * annualisation_s)


@dataclass(frozen=True, slots=True)
class Volatility:
    """Realised volatility (annualised fraction, see `realised_vol`) of each position's price and
    of portfolio equity over the last `window_s`, e.g. warn 0.6, reduce 0.9. A reduce breach
    asks the engine to bring leverage down to `target_leverage`.

    Data: a position (or the portfolio, when `include_portfolio`) with fewer than `min_samples`
    samples in the window, or whose last sample is older than `max_age_s` (only if nothing
    breaches: a breach on fresh data elsewhere still counts).
    """

    limits: Thresholds
    target_leverage: float
    window_s: float = 300.0
    min_samples: int = 10
    max_age_s: float = 30.0
    include_portfolio: bool = True
    annualisation_s: float = SECONDS_PER_TRADING_YEAR
    name: str = "volatility"

    def _judge(self, samples: Sequence[tuple[float, float]], now: float, subject: str) -> Finding:
        recent = [s for s in samples if s[0] > now - self.window_s]
        if len(recent) < self.min_samples:
            return data(self.name, f"{len(recent)} price samples in window", subject)
        if now - recent[-1][0] > self.max_age_s:
            return data(self.name, "prices are stale", subject)
        vol = realised_vol(recent, self.annualisation_s)
        if not math.isfinite(vol):
            return data(self.name, "volatility not computable", subject)
        f = grade(self.name, vol, self.limits, what=f"volatility of {subject}", subject=subject)
        if f.level == "reduce":
            return Finding(
                f.rule, f.level, f.value, f.limit, f.message, f.subject, self.target_leverage
            )
        return f

    def evaluate(self, book: Book, now: float) -> Finding:
        """Grade the most volatile position (or the portfolio)."""
        if (f := _unsynced(book, self.name)) is not None:
            return f
        findings = [
            self._judge(book.price_history(p.con_id), now, p.symbol)
            for p in sorted(book.guarded_positions(), key=lambda p: p.con_id)
        ]
        if self.include_portfolio:
            findings.append(self._judge(book.equity_history, now, "portfolio"))
        found = _worst_or_highest(findings)
        if found is None:
            return Finding(self.name, "ok", 0.0, self.limits.warn, "no positions")
        return found


# ------------------------------------------------------------------------- orders


@dataclass(frozen=True, slots=True)
class OrderRate:
    """New orders per client and in total over the last 1 s and 60 s (count, higher is worse),
    e.g. per client 1 s: warn 10, kill 30. guardd's own close orders (known by identity, see
    `Book.is_own`) are not counted by the Book; any other order is, whatever its client id or
    orderRef. Data: the open-order download after a (re)connect is incomplete.
    The Book must keep windows of 1.0 and 60.0 s (its default)."""

    per_client_1s: Thresholds = Thresholds()
    per_client_60s: Thresholds = Thresholds()
    total_1s: Thresholds = Thresholds()
    total_60s: Thresholds = Thresholds()
    name: str = "order_rate"

    def evaluate(self, book: Book, now: float) -> Finding:
        """Grade the busiest client and the total."""
        if not (book.connected and book.orders_synced):
            return data(self.name, "open orders not synced since (re)connect")
        findings: list[Finding] = []
        for client in sorted(book.order_clients):
            for span, limits in ((1.0, self.per_client_1s), (60.0, self.per_client_60s)):
                n = book.new_orders(client, span, now)
                findings.append(
                    grade(
                        self.name,
                        n,
                        limits,
                        what=f"new orders in {span:.0f}s",
                        subject=f"client:{client}",
                    )
                )
        for span, limits in ((1.0, self.total_1s), (60.0, self.total_60s)):
            n = book.new_orders(None, span, now)
            findings.append(
                grade(self.name, n, limits, what=f"new orders in {span:.0f}s", subject="total")
            )
        found = _worst_or_highest(findings)
        assert found is not None  # the two totals are always there
        return found


TRIGGERED_LIMIT_TYPES = frozenset({"STP LMT", "TRAIL LIMIT", "LIT"})
"""Order types whose limit works only once a trigger price is reached: the limit sits near the
trigger, far from the market by design, so the collar does not apply to it (it applies to every
other order with a limit price)."""


def _positive(x: float) -> float | None:
    return x if math.isfinite(x) and x > 0 else None


def order_price(order: Order, reference: float) -> float:
    """The price an order is valued at: where it would trade once it works.

    LMT, LOC, STP LMT and a TRAIL LIMIT with its limit known: the limit price. STP: the stop
    price (auxPrice). TRAIL (and a TRAIL LIMIT whose limit is not known yet): the trailing stop
    price when reported, else `reference`. MKT, MOC and anything else: `reference` (NaN when
    there is none). A missing price falls back to `reference`.
    """
    kind = order.order_type
    lmt = _positive(order.lmt_price)
    if kind in ("LMT", "LOC", "STP LMT", "TRAIL LIMIT") and lmt is not None:
        return lmt
    if kind == "STP":
        return _positive(order.aux_price) or reference
    if kind in ("TRAIL", "TRAIL LIMIT"):
        return _positive(order.trail_stop_price) or reference
    return reference


@dataclass(frozen=True, slots=True)
class OrderChecks:
    """Checks on every working order (any client): quantity ≤ `max_quantity`, notional
    (quantity × multiplier × `order_price`: the limit, the stop or the trailing stop price, else
    the reference price; converted to base currency) ≤ `max_notional`, a limit price within
    `collar` (fraction) of the reference price (not the limit of a stop-limit, trailing-limit or
    limit-if-touched order, which waits for its trigger), order type and sec type not forbidden.
    Untransmitted bracket children and OCA members are working orders like any other. A
    violation has the configured `level` (kill = global cancel, or warn = alert only). guardd's
    own close orders (by identity, `Book.is_own`; never by orderRef) are skipped. Data: notional
    needs a price or rate that is missing/stale.
    """

    max_quantity: float | None = None
    max_notional: float | None = None
    collar: float | None = None
    forbidden_order_types: frozenset[str] = frozenset()
    forbidden_sec_types: frozenset[str] = frozenset()
    level: Level = "kill"
    max_price_age_s: float = 30.0
    name: str = "order_checks"

    def check(self, order: Order, book: Book, now: float) -> Finding:
        """Check one order."""
        subject = f"perm:{order.perm_id}"

        def breach(value: float | None, limit: float | None, message: str) -> Finding:
            return Finding(self.name, self.level, value, limit, message, subject)

        if order.order_type in self.forbidden_order_types:
            return breach(None, None, f"order type {order.order_type} is forbidden")
        if order.sec_type in self.forbidden_sec_types:
            return breach(None, None, f"sec type {order.sec_type} is forbidden")
        if not math.isfinite(order.quantity):
            return data(self.name, "order quantity unknown", subject)
        if self.max_quantity is not None and order.quantity > self.max_quantity:
            return breach(order.quantity, self.max_quantity, "order quantity above limit")
        quote = book.quote(order.con_id)
        ref = quote.reference if now - quote.ts <= self.max_price_age_s else math.nan
        lmt = _positive(order.lmt_price)
        collared = order.order_type not in TRIGGERED_LIMIT_TYPES
        if self.collar is not None and collared and lmt is not None and math.isfinite(ref):
            off = abs(lmt / ref - 1.0)
            if off > self.collar:
                return breach(off, self.collar, f"limit {lmt} is {off:.2%} from price {ref}")
        if self.max_notional is not None:
            price = order_price(order, ref)
            if not math.isfinite(price):
                return data(self.name, "no price to value the order", subject)
            rate = book.exchange_rate(order.currency)
            if rate is None:
                return data(self.name, f"no ExchangeRate for {order.currency}", subject)
            notional = order.quantity * order.multiplier * price * rate
            if notional > self.max_notional:
                return breach(notional, self.max_notional, "order notional above limit")
        return Finding(self.name, "ok", order.quantity, self.max_quantity, "order ok", subject)

    def evaluate(self, book: Book, now: float) -> Finding:
        """Check every working order with known terms; the worst wins (lowest permId first)."""
        findings = [
            self.check(o, book, now)
            for o in sorted(book.working_orders(), key=lambda o: o.perm_id)
            if o.has_terms and not book.is_own(o)
        ]
        found = worst(findings)
        if found is None or found.level == "ok":
            n = float(len(findings))
            return Finding(self.name, "ok", n, None, f"{len(findings)} working order(s) ok")
        return found


@dataclass(frozen=True, slots=True)
class Impersonation:
    """Someone is impersonating the guard: orders labelled as guardd's own (orderRef
    `guardd:...`) that the guard did not place (`Book.is_own` is by identity, never by label).
    Value: how many such orders were seen since start (count). `level` (warn) while one is still
    working or for `hold_s` seconds after the last was first seen; ok otherwise. The orders
    themselves are checked and swept like any other order; this rule only makes them visible.
    """

    hold_s: float = 900.0
    level: Level = "warn"
    name: str = "impersonation"

    def evaluate(self, book: Book, now: float) -> Finding:
        """Warn while an impersonating order works or was seen within `hold_s`."""
        seen = book.impersonations_seen
        last = book.last_impersonation
        if last is None:
            return Finding(self.name, "ok", 0.0, None, "no order impersonates the guard")
        working = book.impersonating_working_count
        if working == 0 and now - last.ts > self.hold_s:
            return Finding(self.name, "ok", float(seen), None, "no recent impersonating order")
        message = (
            f"someone is impersonating the guard: {seen} order(s) labelled guardd: not placed "
            f"by the guard; last: client {last.client_id} order {last.order_id} perm "
            f"{last.perm_id} ref {last.order_ref!r}"
        )
        return Finding(
            self.name, self.level, float(seen), None, message, f"client:{last.client_id}"
        )


# ------------------------------------------------------------------------- positions


@dataclass(frozen=True, slots=True)
class PositionLimits:
    """Per-symbol |quantity| ≤ `max_quantity[symbol]` (else `default_max_quantity`), per-symbol
    |value| in base currency ≤ `max_notional[symbol]` (else `default_max_notional`), number of
    non-zero positions ≤ `max_positions`, sec type in `allowed_sec_types` (when given). A
    violation has the configured `level`. Data: a position whose quantity IB left unset; a
    notional limit applies but the position has no value or its currency no rate."""

    max_quantity: Mapping[str, float] = field(default_factory=dict)
    default_max_quantity: float | None = None
    max_notional: Mapping[str, float] = field(default_factory=dict)
    default_max_notional: float | None = None
    max_positions: int | None = None
    allowed_sec_types: frozenset[str] | None = None
    level: Level = "warn"
    name: str = "positions"

    def evaluate(self, book: Book, now: float) -> Finding:
        """Check each position and the position count."""
        if (f := _unsynced(book, self.name)) is not None:
            return f
        findings: list[Finding] = []

        def breach(value: float | None, limit: float | None, msg: str, subject: str) -> None:
            findings.append(Finding(self.name, self.level, value, limit, msg, subject))

        count = book.position_count
        if self.max_positions is not None and count > self.max_positions:
            breach(count, self.max_positions, "too many positions", "")
        for p in sorted(book.guarded_positions(), key=lambda p: p.con_id):
            if self.allowed_sec_types is not None and p.sec_type not in self.allowed_sec_types:
                breach(None, None, f"sec type {p.sec_type} not allowed", p.symbol)
                continue
            if not p.known:
                findings.append(data(self.name, "position quantity unknown", p.symbol))
                continue
            max_qty = self.max_quantity.get(p.symbol, self.default_max_quantity)
            if max_qty is not None and abs(p.quantity) > max_qty:
                breach(abs(p.quantity), max_qty, "position quantity above limit", p.symbol)
                continue
            max_value = self.max_notional.get(p.symbol, self.default_max_notional)
            if max_value is None:
                continue
            rate = book.exchange_rate(p.currency)
            if p.value is None or rate is None:
                findings.append(data(self.name, "position value unknown", p.symbol))
                continue
            value = abs(p.value) * rate
            if value > max_value:
                breach(value, max_value, "position notional above limit", p.symbol)
        found = worst(findings)
        if found is None:
            return Finding(self.name, "ok", count, self.max_positions, f"{count} position(s) ok")
        return found


# ------------------------------------------------------------------------- liveness


@dataclass(frozen=True, slots=True)
class Heartbeats:
    """Silence = now − last heartbeat of each bot in `timeouts_s` (seconds; a bot never heard
    from counts from the Book's creation, or from when a reload of the limits added it).
    Silence > its timeout → the configured `level`."""

    timeouts_s: Mapping[str, float]
    level: Level = "warn"
    name: str = "heartbeat"

    def evaluate(self, book: Book, now: float) -> Finding:
        """Grade the most silent bot."""
        findings: list[Finding] = []
        for bot in sorted(self.timeouts_s):
            timeout = self.timeouts_s[bot]
            silence = now - book.silent_since(bot)
            if silence > timeout:
                msg = f"no heartbeat for {silence:.1f}s"
                findings.append(Finding(self.name, self.level, silence, timeout, msg, bot))
            else:
                findings.append(Finding(self.name, "ok", silence, timeout, "alive", bot))
        found = _worst_or_highest(findings)
        if found is None:
            return Finding(self.name, "ok", 0.0, None, "no bots configured")
        return found


@dataclass(frozen=True, slots=True)
class Connectivity:
    """Seconds since the API socket closed, or since TWS lost IB's servers (1100); more than
    `max_disconnected_s` → the configured `level`."""

    max_disconnected_s: float
    level: Level = "warn"
    name: str = "connectivity"

    def evaluate(self, book: Book, now: float) -> Finding:
        """Grade how long the broker link has been down."""
        if book.disconnected_since is not None:
            down, what = now - book.disconnected_since, "API disconnected"
        elif book.server_lost_since is not None:
            down, what = now - book.server_lost_since, "TWS lost IB servers (1100)"
        else:
            return Finding(self.name, "ok", 0.0, self.max_disconnected_s, "connected")
        if down > self.max_disconnected_s:
            return Finding(
                self.name, self.level, down, self.max_disconnected_s, f"{what} for {down:.0f}s"
            )
        return Finding(self.name, "ok", down, self.max_disconnected_s, f"{what} for {down:.0f}s")


@dataclass(frozen=True, slots=True)
class Staleness:
    """Seconds since the last broker event (or since the Book's creation); more than
    `max_age_s` → the configured `level`."""

    max_age_s: float
    level: Level = "warn"
    name: str = "staleness"

    def evaluate(self, book: Book, now: float) -> Finding:
        """Grade the age of the newest broker event."""
        last = book.last_event_ts if book.last_event_ts is not None else book.created_at
        age = now - last
        if age > self.max_age_s:
            msg = f"no broker event for {age:.0f}s"
            return Finding(self.name, self.level, age, self.max_age_s, msg)
        return Finding(self.name, "ok", age, self.max_age_s, "data fresh")
