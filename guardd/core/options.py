"""Option prices and greeks by Black-Scholes (European exercise, no dividends): pure, no clock.

The guard's one pricing for an option: the stress-loss rule revalues an option book with it.
(The simulated gateway prices with its own implementation, ibsim/options.py, as IB does with
its own model.)

Units, as IB reports them in tickOptionComputation:
    spot, strike, price  in the option's currency per share (an option on 100 shares costs
                         price × multiplier)
    years                time to expiry in years of 365 days (0 at or after expiry)
    vol                  annualised volatility as a fraction (0.25 = 25 %)
    rate                 continuously compounded risk-free rate as a fraction
    delta                per 1 of the underlying (a call 0..1, a put -1..0)
    gamma                delta per 1 of the underlying
    vega                 price change per 1 volatility point (0.01 of `vol`)
    theta                price change per calendar day (negative for a long option)

Formulas (N the standard normal CDF, n its density, T = years, σ = vol, r = rate):
    d1 = (ln(S/K) + (r + σ²/2)·T) / (σ·√T),   d2 = d1 − σ·√T
    call = S·N(d1) − K·e^(−rT)·N(d2)          put = K·e^(−rT)·N(−d2) − S·N(−d1)
    delta_call = N(d1), delta_put = N(d1) − 1, gamma = n(d1) / (S·σ·√T), vega = S·n(d1)·√T / 100
    theta_call = (−S·n(d1)·σ / (2√T) − r·K·e^(−rT)·N(d2)) / 365
    theta_put  = (−S·n(d1)·σ / (2√T) + r·K·e^(−rT)·N(−d2)) / 365
At expiry (T = 0) or with no volatility the price is the discounted intrinsic value
max(0, S − K·e^(−rT)) for a call, and delta is 1 / 0 (call) or −1 / 0 (put) by the money,
gamma, vega and theta 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime, tzinfo
from typing import Literal

Right = Literal["C", "P"]
DAYS_PER_YEAR = 365.0
SECONDS_PER_YEAR = DAYS_PER_YEAR * 86400.0
EXPIRY_HOUR = 16  # an option expires at the close of its last trading day, 16:00 New York
_IV_LOW, _IV_HIGH = 1e-4, 10.0  # implied vols searched: 0.01 % .. 1000 %
_IV_TOLERANCE = 1e-10


@dataclass(frozen=True, slots=True)
class OptionValue:
    """An option's model price and greeks (units in the module docstring)."""

    price: float
    delta: float
    gamma: float
    vega: float
    theta: float


def _cdf(x: float) -> float:
    return 0.5 * math.erfc(-x / math.sqrt(2.0))


def _pdf(x: float) -> float:
    return math.exp(-0.5 * x * x) / math.sqrt(2.0 * math.pi)


def intrinsic_value(right: Right, spot: float, strike: float) -> float:
    """What exercising is worth per share: max(0, S − K) for a call, max(0, K − S) for a put."""
    return max(0.0, spot - strike) if right == "C" else max(0.0, strike - spot)


def black_scholes(
    right: Right, spot: float, strike: float, years: float, vol: float, rate: float = 0.0
) -> OptionValue:
    """The option's price and greeks; raises ValueError on a non-positive spot or strike or a
    negative (or non-finite) time or volatility."""
    if not (math.isfinite(spot) and spot > 0 and math.isfinite(strike) and strike > 0):
        raise ValueError(f"spot and strike must be finite and > 0, got {spot}, {strike}")
    if not (math.isfinite(years) and years >= 0 and math.isfinite(vol) and vol >= 0):
        raise ValueError(f"years and vol must be finite and >= 0, got {years}, {vol}")
    if not math.isfinite(rate):
        raise ValueError(f"rate must be finite, got {rate}")
    discount = math.exp(-rate * years)
    forward_strike = strike * discount
    root = vol * math.sqrt(years)
    if root == 0.0:
        call_itm = spot > forward_strike
        if right == "C":
            return OptionValue(max(0.0, spot - forward_strike), float(call_itm), 0.0, 0.0, 0.0)
        put_itm = spot < forward_strike
        return OptionValue(max(0.0, forward_strike - spot), -float(put_itm), 0.0, 0.0, 0.0)
    d1 = (math.log(spot / strike) + (rate + vol * vol / 2.0) * years) / root
    d2 = d1 - root
    density = _pdf(d1)
    gamma = density / (spot * root)
    vega = spot * density * math.sqrt(years) / 100.0
    decay = -spot * density * vol / (2.0 * math.sqrt(years))
    if right == "C":
        price = spot * _cdf(d1) - forward_strike * _cdf(d2)
        theta = (decay - rate * forward_strike * _cdf(d2)) / DAYS_PER_YEAR
        delta = _cdf(d1)
    else:
        price = forward_strike * _cdf(-d2) - spot * _cdf(-d1)
        theta = (decay + rate * forward_strike * _cdf(-d2)) / DAYS_PER_YEAR
        delta = _cdf(d1) - 1.0
    # rounding can leave a deep out-of-the-money price a hair below zero
    return OptionValue(max(0.0, price), delta, gamma, vega, theta)


def implied_vol(
    right: Right, price: float, spot: float, strike: float, years: float, rate: float = 0.0
) -> float | None:
    """The volatility at which `black_scholes` gives `price`, or None where none does (a price
    at or under the discounted intrinsic value, at or over the no-arbitrage bound, at expiry).

    Bisection: the price rises strictly with volatility, so the search cannot miss a root in
    [0.01 %, 1000 %]."""
    if not (years > 0 and math.isfinite(price) and price > 0):
        return None
    low, high = _IV_LOW, _IV_HIGH
    if not (
        black_scholes(right, spot, strike, years, low, rate).price
        < price
        < black_scholes(right, spot, strike, years, high, rate).price
    ):
        return None
    while high - low > _IV_TOLERANCE:
        mid = (low + high) / 2.0
        if black_scholes(right, spot, strike, years, mid, rate).price < price:
            low = mid
        else:
            high = mid
    return (low + high) / 2.0


def expiry_time(last_trade_date: str, zone: tzinfo) -> float:
    """When an option with this last trading day (IB's lastTradeDateOrContractMonth, YYYYMMDD
    first) expires: `EXPIRY_HOUR` o'clock in `zone` (the exchange's, New York for US options),
    in epoch seconds; NaN when the text is not a date (unknown, never "now")."""
    try:
        day = datetime.strptime(last_trade_date[:8], "%Y%m%d")
    except ValueError:
        return math.nan
    return day.replace(hour=EXPIRY_HOUR, tzinfo=zone).timestamp()


def years_to_expiry(expiry: float, now: float) -> float:
    """Years of 365 days from `now` to `expiry` (epoch seconds), 0 once expired."""
    return max(0.0, expiry - now) / SECONDS_PER_YEAR
