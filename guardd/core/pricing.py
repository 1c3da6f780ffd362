"""Close order pricing: which price a close limit may come from, and how a stalled close escalates.

Pure: every function takes `now` and the prices with the time guardd received them; nothing here
reads a clock.

Freshness. A close limit is derived only from a price whose age is at most `max_price_age_s`.
The age of a price is `now - received`, where `received` is when guardd last heard that the price
stands: a price tick, or a size tick at that price (IB sends a size change at an unchanged bid,
ask or last as a size tick alone). IB's delayed market data (tick types 66-68, or a subscription
switched to delayed or frozen data) is at least IB's delay old when it arrives: its age is
`now - received + delayed_price_age_s`, so it never counts as fresh under a sensible limit.
A price with an unknown time is never fresh.

The basis. A close trades against the touch, so the basis of a limit is the first fresh one of:
the bid for a sell (the ask for a buy), the last trade, the mark. The limit lies `collar` through
the basis (below it for a sell, above it for a buy), on the tick grid, rounded toward marketable,
and never under one tick.

Without a fresh price a close is a market order where the asset class allows one now
(`market_allowed`); otherwise there is no close order for the position until a fresh price
arrives (the planner notes it and the close episode journals `close_price_unusable`).

Escalation. The first close child of a position is step 0: the class's own order type and collar.
A limit child that has not filled `reprice_after_s` after it was sent (`due_for_reprice`) is
cancelled by the close episode (`guardd.core.close`) and, once the cancel is confirmed, replaced
at a fresh price with the next step of `escalation` (`next_step`):
`Widen(fraction)` adds to the collar of the steps before it, `Market()` sends a market order
where the class allows one, from that step on (where it does not, the step re-prices at the
widest collar so far, and later widenings still apply).
After the last step the last step repeats, each time at a fresh price: a close is re-priced for as
long as it does not fill, never left to stall.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from decimal import ROUND_CEILING, ROUND_FLOOR, Decimal
from enum import StrEnum

ONE = Decimal(1)
MAX_COLLAR = 0.99  # a sell limit a collar of 1 or more below the basis would be zero or negative
IB_DELAY_S = 900.0  # IB's delayed market data is 15 to 20 minutes behind


class PriceSource(StrEnum):
    """Which price a close limit was derived from."""

    BID = "bid"
    ASK = "ask"
    LAST = "last"
    MARK = "mark"


@dataclass(frozen=True, slots=True)
class PricePoint:
    """One price of a contract: its value, when guardd received it, and whether it was IB's
    delayed (or frozen) market data, which is already old when it arrives."""

    price: float
    received: float
    delayed: bool = False


@dataclass(frozen=True, slots=True)
class ClosePrices:
    """The prices a close limit may be derived from; None where never received."""

    bid: PricePoint | None = None
    ask: PricePoint | None = None
    last: PricePoint | None = None
    mark: PricePoint | None = None

    def get(self, source: PriceSource) -> PricePoint | None:
        """The price of one source."""
        match source:
            case PriceSource.BID:
                return self.bid
            case PriceSource.ASK:
                return self.ask
            case PriceSource.LAST:
                return self.last
            case PriceSource.MARK:
                return self.mark


@dataclass(frozen=True, slots=True)
class Widen:
    """An escalation step: a limit with the collar widened by `fraction` over the step before."""

    fraction: float

    def __post_init__(self) -> None:
        if not (math.isfinite(self.fraction) and 0.0 < self.fraction < 1.0):
            raise ValueError(f"widen must be in (0, 1), got {self.fraction}")


@dataclass(frozen=True, slots=True)
class Market:
    """An escalation step: a market order, where the asset class allows one now."""


Step = Widen | Market


@dataclass(frozen=True, slots=True)
class RepricePolicy:
    """How old a price a close limit may use, and how a close that does not fill escalates.

    `reprice_after_s` None never re-prices (a stalled close then only raises `close_overdue`).
    """

    max_price_age_s: float = 10.0
    reprice_after_s: float | None = 10.0
    escalation: tuple[Step, ...] = (Widen(0.05), Market())
    delayed_price_age_s: float = IB_DELAY_S

    def __post_init__(self) -> None:
        if not (math.isfinite(self.max_price_age_s) and self.max_price_age_s > 0):
            raise ValueError("max_price_age_s must be a positive number of seconds")
        after = self.reprice_after_s
        if after is not None and not (math.isfinite(after) and after > 0):
            raise ValueError("reprice_after_s must be a positive number of seconds")
        if not (math.isfinite(self.delayed_price_age_s) and self.delayed_price_age_s >= 0):
            raise ValueError("delayed_price_age_s must be >= 0")

    @property
    def last_step(self) -> int:
        """The highest escalation step; re-pricing beyond it repeats it."""
        return len(self.escalation)

    def clamp(self, step: int) -> int:
        """A step number within 0..last_step."""
        return min(max(step, 0), self.last_step)


def price_age(point: PricePoint, now: float, policy: RepricePolicy) -> float:
    """Seconds since the price was true, as far as guardd can tell (delayed data counts its
    delay); infinite when its time is unknown."""
    if not math.isfinite(point.received):
        return math.inf
    age = max(0.0, now - point.received)
    return age + policy.delayed_price_age_s if point.delayed else age


def is_fresh(point: PricePoint | None, now: float, policy: RepricePolicy) -> bool:
    """A usable price (finite, positive) no older than `max_price_age_s`."""
    if point is None or not math.isfinite(point.price) or point.price <= 0:
        return False
    return price_age(point, now, policy) <= policy.max_price_age_s


@dataclass(frozen=True, slots=True)
class Basis:
    """The fresh price a close limit is derived from."""

    source: PriceSource
    price: float
    age_s: float


def close_basis(
    prices: ClosePrices, *, sell: bool, now: float, policy: RepricePolicy
) -> Basis | None:
    """The first fresh one of: the touch (bid for a sell, ask for a buy), the last, the mark."""
    touch = PriceSource.BID if sell else PriceSource.ASK
    for source in (touch, PriceSource.LAST, PriceSource.MARK):
        point = prices.get(source)
        if point is not None and is_fresh(point, now, policy):
            return Basis(source, point.price, price_age(point, now, policy))
    return None


def marketable_limit(price: float, *, sell: bool, collar: float, min_tick: Decimal) -> float:
    """A limit `collar` through `price`, on the tick grid, rounded toward marketable; a sell
    limit is at least one tick."""
    tick = min_tick if min_tick.is_finite() and min_tick > 0 else Decimal("0.01")
    fraction = Decimal(repr(min(max(collar, 0.0), MAX_COLLAR)))
    base = Decimal(repr(price))
    if sell:
        steps = (base * (ONE - fraction) / tick).to_integral_value(rounding=ROUND_FLOOR)
        return float(max(steps, ONE) * tick)
    steps = (base * (ONE + fraction) / tick).to_integral_value(rounding=ROUND_CEILING)
    return float(steps * tick)


def collar_at(step: int, base_collar: float, policy: RepricePolicy) -> float:
    """The collar of a limit at escalation `step`: the class's collar plus every widening up to
    and including that step (market steps add nothing), at most `MAX_COLLAR`. Summed in
    decimal, so 0.01 + 0.04 + 0.10 is 0.15 and not a hair more."""
    widened = sum(
        (
            Decimal(repr(s.fraction))
            for s in policy.escalation[: policy.clamp(step)]
            if isinstance(s, Widen)
        ),
        Decimal(repr(base_collar)),
    )
    return min(float(widened), MAX_COLLAR)


def is_market_step(step: int, policy: RepricePolicy) -> bool:
    """Whether escalation `step` (0 is the class's own order) asks for a market order: once a
    market step is reached, every later step does too (a close never steps back to a limit
    where a market order is allowed; where it is not, later widenings still apply)."""
    return any(isinstance(s, Market) for s in policy.escalation[: policy.clamp(step)])


@dataclass(frozen=True, slots=True)
class ClosePrice:
    """How to price one close child: a market order (`limit` None) or a limit from `basis`."""

    market: bool
    limit: float | None
    basis: Basis | None
    collar: float | None
    step: int


@dataclass(frozen=True, slots=True)
class Unpriced:
    """No close order now: a limit is needed and no price is fresh (`stale` when there are
    prices, all too old; False when there is none at all)."""

    stale: bool


def close_price(
    prices: ClosePrices,
    *,
    sell: bool,
    market_first: bool,
    market_allowed: bool,
    base_collar: float,
    step: int,
    min_tick: Decimal,
    now: float,
    policy: RepricePolicy,
) -> ClosePrice | Unpriced:
    """Price a close child at escalation `step`.

    `market_first`: the class closes with a market order now (its step 0 is MKT); a market order
    needs no price. `market_allowed`: a market order is acceptable now as an escalation step or
    as the fallback when no price is fresh (the class allows it and the session accepts one).
    A limit is only ever derived from a fresh price.
    """
    step = policy.clamp(step)
    if market_first or (market_allowed and is_market_step(step, policy)):
        return ClosePrice(market=True, limit=None, basis=None, collar=None, step=step)
    collar = collar_at(step, base_collar, policy)
    basis = close_basis(prices, sell=sell, now=now, policy=policy)
    if basis is None:
        if market_allowed:
            return ClosePrice(market=True, limit=None, basis=None, collar=None, step=step)
        known = (prices.bid, prices.ask, prices.last, prices.mark)
        usable = (p for p in known if p is not None and math.isfinite(p.price) and p.price > 0)
        return Unpriced(stale=any(True for _ in usable))
    limit = marketable_limit(basis.price, sell=sell, collar=collar, min_tick=min_tick)
    return ClosePrice(market=False, limit=limit, basis=basis, collar=collar, step=step)


def due_for_reprice(sent_at: float, now: float, policy: RepricePolicy) -> bool:
    """Whether a close limit sent at `sent_at` and still working at `now` has stalled: it has
    worked `reprice_after_s` without filling in full (never, when re-pricing is off or the send
    time is unknown)."""
    after = policy.reprice_after_s
    return after is not None and math.isfinite(sent_at) and now - sent_at >= after


def next_step(steps: Iterable[tuple[int, bool]], policy: RepricePolicy) -> int:
    """The escalation step of a position's next child from its children's (step, cancelled for a
    re-price) pairs: one past every child cancelled for a re-price, never below any child's step."""
    best = 0
    for step, repriced in steps:
        best = max(best, step + 1 if repriced else step)
    return policy.clamp(best)
