"""The simulated market's price model: one seeded, deterministic random walk per instrument.

Each instrument's price follows a driftless geometric random walk. `volatility` is the standard
deviation of ONE TRADING DAY's log return, and a trading day is a 6.5-hour session
(`SESSION_SECONDS` = 23,400 s). A step of `dt` seconds therefore draws a log return

    r = sigma * z - sigma**2 / 2,   sigma = volatility * sqrt(dt / SESSION_SECONDS),   z ~ N(0, 1)

(the `- sigma**2 / 2` term keeps the expected price constant). The simulator runs its session
around the clock, so a day's worth of movement happens in 6.5 hours of wall time: a rehearsal sees
realistic daily volatility in a realistic session length. One step is capped at one session so a
long pause (or a clock that starts far away) cannot blow the price up or down.

The unrounded price is kept internally; `last` is it rounded to `min_tick` and never below one
tick. `bid` and `ask` are `last ∓ spread / 2`, each rounded OUTWARD to whole ticks (so a spread
narrower than two ticks still leaves bid < last < ask, and bid never drops below one tick). Sizes
are redrawn on each step in lots of `size_unit` (100 shares for stocks, 1 for futures).

Everything comes from one `random.Random(seed)`: the same seed and the same calls give the same
prices, bit for bit.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal

from ibsim.options import OptionValue, Right, black_scholes
from ibsim.types import Instrument

SESSION_SECONDS = 6.5 * 3600  # one regular US equity session: the period `volatility` spans
_EPS = 1e-9  # tolerance for float noise when snapping a price to the tick grid


@dataclass(frozen=True, slots=True)
class Quote:
    """The top of the book and the last trade of one instrument."""

    bid: float
    ask: float
    last: float
    bid_size: float
    ask_size: float
    last_size: float


def _tick_decimals(min_tick: float) -> int:
    exponent = Decimal(repr(min_tick)).normalize().as_tuple().exponent
    assert isinstance(exponent, int)
    return max(0, -exponent)


# Quoted sizes: futures in contracts, stocks in round lots, FX in the pair's base currency.
_SIZE_UNITS = {"FUT": 1.0, "STK": 100.0, "CASH": 1_000_000.0, "OPT": 1.0}
SECONDS_PER_YEAR = 365.0 * 86_400


class PriceProcess:
    """A seeded geometric random walk on a tick grid, with a bid/ask around the last price."""

    __slots__ = (
        "_ask_size",
        "_bid_size",
        "_decimals",
        "_last_size",
        "_price",
        "_rng",
        "_size_unit",
        "min_tick",
        "spread",
        "volatility",
    )

    def __init__(
        self,
        initial_price: float,
        *,
        volatility: float,
        spread: float,
        min_tick: float,
        seed: int | str,
        size_unit: float = 100.0,
    ) -> None:
        if not initial_price > 0:
            raise ValueError(f"initial_price must be > 0, got {initial_price}")
        if not min_tick > 0:
            raise ValueError(f"min_tick must be > 0, got {min_tick}")
        if not spread >= 0:
            raise ValueError(f"spread must be >= 0, got {spread}")
        if not volatility >= 0:
            raise ValueError(f"volatility must be >= 0, got {volatility}")
        self._rng = random.Random(seed)
        self._price = float(initial_price)
        self.volatility = float(volatility)
        self.spread = float(spread)
        self.min_tick = float(min_tick)
        self._decimals = _tick_decimals(self.min_tick)
        self._size_unit = float(size_unit)
        self._bid_size = 0.0
        self._ask_size = 0.0
        self._last_size = 0.0
        self._draw_sizes()

    @classmethod
    def for_instrument(cls, instrument: Instrument, seed: int | str) -> PriceProcess:
        """The price process an instrument's own parameters describe."""
        return cls(
            instrument.initial_price,
            volatility=instrument.volatility,
            spread=instrument.spread,
            min_tick=instrument.min_tick,
            seed=seed,
            size_unit=_SIZE_UNITS.get(instrument.sec_type, 100.0),
        )

    def _snap(self, ticks: float) -> float:
        return round(ticks * self.min_tick, self._decimals)

    def snap(self, price: float) -> float:
        """`price` rounded to the nearest tick, at least one tick."""
        return self._snap(max(1, round(price / self.min_tick)))

    def _draw_sizes(self) -> None:
        self._bid_size = self._rng.randint(1, 10) * self._size_unit
        self._ask_size = self._rng.randint(1, 10) * self._size_unit
        self._last_size = self._rng.randint(1, 5) * self._size_unit

    @property
    def last(self) -> float:
        """The last trade price: the walk's price rounded to the tick, at least one tick."""
        ticks = max(1, round(self._price / self.min_tick))
        return self._snap(ticks)

    @property
    def bid(self) -> float:
        """Best bid: last - spread/2 rounded down to the tick grid, at least one tick."""
        half = self.spread / 2
        ticks = math.floor((self.last - half) / self.min_tick + _EPS)
        if self.spread > 0:
            # a positive spread always leaves the bid at least a tick under the last price
            ticks = min(ticks, round(self.last / self.min_tick) - 1)
        return self._snap(max(1, ticks))

    @property
    def ask(self) -> float:
        """Best ask: last + spread/2 rounded up to the tick grid, always above the bid."""
        half = self.spread / 2
        ticks = math.ceil((self.last + half) / self.min_tick - _EPS)
        bid_ticks = round(self.bid / self.min_tick)
        if self.spread > 0:
            ticks = max(ticks, bid_ticks + 1)
        return self._snap(max(ticks, bid_ticks))

    @property
    def bid_size(self) -> float:
        return self._bid_size

    @property
    def ask_size(self) -> float:
        return self._ask_size

    @property
    def last_size(self) -> float:
        return self._last_size

    def quote(self) -> Quote:
        """The current top of book and last trade."""
        return Quote(
            bid=self.bid,
            ask=self.ask,
            last=self.last,
            bid_size=self._bid_size,
            ask_size=self._ask_size,
            last_size=self._last_size,
        )

    def step(self, dt_seconds: float) -> None:
        """Move the price `dt_seconds` forward (capped at one session); dt <= 0 does nothing."""
        if not dt_seconds > 0:
            return
        dt = min(dt_seconds, SESSION_SECONDS)
        sigma = self.volatility * math.sqrt(dt / SESSION_SECONDS)
        z = self._rng.gauss(0.0, 1.0)
        self._price *= math.exp(sigma * z - sigma * sigma / 2)
        # keep the walk off zero: a price that would round to nothing sits at one tick
        self._price = max(self._price, self.min_tick)
        self._draw_sizes()

    def set_volatility(self, daily_vol: float) -> None:
        """Change the daily log-return standard deviation from the next step on."""
        if not daily_vol >= 0:
            raise ValueError(f"daily volatility must be >= 0, got {daily_vol}")
        self.volatility = float(daily_vol)

    @property
    def price(self) -> float:
        """The walk's price before rounding to the tick (what a saved state keeps)."""
        return self._price

    def restore_price(self, price: float) -> None:
        """Continue the walk from `price` (a restart of the simulated gateway with its state)."""
        if not (math.isfinite(price) and price > 0):
            raise ValueError(f"a price must be finite and > 0, got {price}")
        self._price = max(float(price), self.min_tick)

    def jump(self, fraction: float) -> None:
        """Move the price at once by `fraction` (-0.1 is a 10 % drop); it stays >= one tick."""
        if not fraction > -1:
            raise ValueError(f"a jump must leave a positive price, got fraction {fraction}")
        self._price = max(self._price * (1 + fraction), self.min_tick)


class OptionProcess(PriceProcess):
    """An option's quote, derived from its underlying's walk: no walk of its own.

    The model price is Black-Scholes (`ibsim.options`, no rate, no dividends) of the
    underlying's last price at the option's implied volatility (annualised) and the time left to
    `expiry` (epoch seconds) at `clock()`; `last` is it on the tick grid, at least one tick, and
    bid/ask lie around it as for any instrument. Sizes are redrawn on each step, in contracts.
    """

    __slots__ = ("_clock", "_expiry", "_right", "_strike", "_underlying")

    def __init__(
        self,
        underlying: PriceProcess,
        *,
        right: Right,
        strike: float,
        expiry: float,
        implied_vol: float,
        spread: float,
        min_tick: float,
        seed: int | str,
        clock: Callable[[], float],
    ) -> None:
        if not strike > 0:
            raise ValueError(f"strike must be > 0, got {strike}")
        super().__init__(
            underlying.last,
            volatility=implied_vol,
            spread=spread,
            min_tick=min_tick,
            seed=seed,
            size_unit=1.0,
        )
        self._underlying = underlying
        self._right: Right = right
        self._strike = float(strike)
        self._expiry = float(expiry)
        self._clock = clock

    @property
    def right(self) -> Right:
        return self._right

    @property
    def years_left(self) -> float:
        """Time to expiry in years of 365 days at the clock (0 once expired)."""
        return max(0.0, self._expiry - self._clock()) / SECONDS_PER_YEAR

    @property
    def underlying_last(self) -> float:
        return self._underlying.last

    def value(self) -> OptionValue:
        """The model price and greeks now (per share; the multiplier is the contract's)."""
        return black_scholes(
            self._right, self._underlying.last, self._strike, self.years_left, self.volatility
        )

    @property
    def last(self) -> float:
        return self._snap(max(1, round(self.value().price / self.min_tick)))

    @property
    def price(self) -> float:
        return self.value().price

    def step(self, dt_seconds: float) -> None:
        """The underlying moves the price; a step only redraws the quoted sizes."""
        if dt_seconds > 0:
            self._draw_sizes()

    def restore_price(self, price: float) -> None:
        """Nothing to restore: the price follows the underlying's and the clock."""

    def jump(self, fraction: float) -> None:
        raise ValueError("an option's price follows its underlying: jump the underlying")
