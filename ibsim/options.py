"""How the simulated gateway prices its options: IB's model as this gateway plays it.

Black-Scholes for a European option with no dividends and no interest rate (IB's model also
has rates, dividends and a volatility surface; the simulator keeps one flat volatility per
option). Written apart from the guard's own pricing (guardd/core/options.py) on purpose: the
gateway is "IB", the guard must agree with it from the outside, and two independent
implementations let the drills catch a formula slip in either.

Greeks in IB's units (tickOptionComputation): delta per 1 of the underlying, gamma delta per 1,
vega per volatility point (0.01), theta per calendar day.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import NormalDist
from typing import Literal

__all__ = ["OptionValue", "Right", "black_scholes", "implied_vol", "intrinsic_value"]

Right = Literal["C", "P"]
_STANDARD = NormalDist()
_YEAR_DAYS = 365.0


@dataclass(frozen=True, slots=True)
class OptionValue:
    """An option's model price (per share) and greeks, as the gateway quotes them."""

    price: float
    delta: float
    gamma: float
    vega: float
    theta: float


def intrinsic_value(right: Right, spot: float, strike: float) -> float:
    """What an option is worth at expiry, per share."""
    payoff = spot - strike if right == "C" else strike - spot
    return payoff if payoff > 0 else 0.0


def black_scholes(
    right: Right, spot: float, strike: float, years: float, vol: float
) -> OptionValue:
    """Price and greeks with no rate; at expiry (or with no volatility) the intrinsic value."""
    if spot <= 0 or strike <= 0 or years < 0 or vol < 0:
        raise ValueError(f"cannot price spot={spot} strike={strike} years={years} vol={vol}")
    spread = vol * math.sqrt(years)
    if spread == 0.0:
        value = intrinsic_value(right, spot, strike)
        sign = 1.0 if right == "C" else -1.0
        return OptionValue(value, sign if value > 0 else 0.0, 0.0, 0.0, 0.0)
    up = math.log(spot / strike) / spread + spread / 2.0
    down = up - spread
    density = _STANDARD.pdf(up)
    if right == "C":
        value = spot * _STANDARD.cdf(up) - strike * _STANDARD.cdf(down)
        delta = _STANDARD.cdf(up)
    else:
        value = strike * _STANDARD.cdf(-down) - spot * _STANDARD.cdf(-up)
        delta = _STANDARD.cdf(up) - 1.0
    return OptionValue(
        price=max(value, 0.0),
        delta=delta,
        gamma=density / (spot * spread),
        vega=spot * density * math.sqrt(years) / 100.0,
        theta=-spot * density * vol / (2.0 * math.sqrt(years)) / _YEAR_DAYS,
    )


def implied_vol(
    right: Right, price: float, spot: float, strike: float, years: float
) -> float | None:
    """The volatility that prices the option at `price`, None when no volatility in
    (0.01 %, 1000 %) does (at expiry, at or under intrinsic value, above the bound)."""
    if years <= 0 or not price > 0:
        return None
    lo, hi = 1e-4, 10.0

    def gap(vol: float) -> float:
        return black_scholes(right, spot, strike, years, vol).price - price

    if not gap(lo) < 0.0 < gap(hi):
        return None
    for _ in range(200):  # halves the bracket to below 1e-12 long before 200 steps
        mid = 0.5 * (lo + hi)
        if gap(mid) < 0.0:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-10:
            break
    return 0.5 * (lo + hi)
