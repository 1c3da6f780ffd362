"""A contract's market hours as the guard knows them, and which session an instant falls in.

IB reports a contract's hours in contractDetails: `tradingHours` (every session, extended hours
included) and `liquidHours` (the regular session), for some days from today, in the contract's
time zone. The broker adapter turns them into epoch-second intervals (`MarketHours`); here they are
only compared with an instant, so the core needs no time zone and no clock.

An instant outside the days the hours cover is "unknown": the caller falls back to its own rule.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

Session = Literal["regular", "extended", "closed", "unknown"]
Interval = tuple[float, float]  # [start, end) in epoch seconds


@dataclass(frozen=True, slots=True)
class MarketHours:
    """One contract's sessions: `regular` (liquidHours), `trading` (tradingHours: every session)
    and the span [`covers_from`, `covers_until`) the lists describe."""

    regular: tuple[Interval, ...]
    trading: tuple[Interval, ...]
    covers_from: float
    covers_until: float

    def session_at(self, now: float) -> Session:
        """Regular, extended (trading but not regular), closed, or unknown outside the span."""
        if not self.covers_from <= now < self.covers_until:
            return "unknown"
        if _inside(self.regular, now):
            return "regular"
        if _inside(self.trading, now):
            return "extended"
        return "closed"


def _inside(intervals: Sequence[Interval], now: float) -> bool:
    return any(start <= now < end for start, end in intervals)
