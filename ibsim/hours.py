"""Market hours of the simulated gateway: a calendar per contract and a clock that can be moved.

A `Calendar` says, for any instant, whether a contract is in its regular session, in extended
hours (pre-market, after-hours, a futures overnight session) or closed. It is written in the
exchange's own time zone: sessions as "HH:MM-HH:MM" on the trading days (`days`, Monday = 0),
minus `holidays` (ISO dates). A session whose end is not after its start began the calendar day
before (CME's "17:00-16:00" runs from 17:00 the evening before). `ALWAYS` (the default of every
instrument) is one regular session round the clock, every day: the simulator before it had hours.

`SimClock` is the gateway's wall clock: real time plus an offset, so a scenario can start at
03:00 New York time and a test can jump to the open without waiting for it.

IB reports a contract's hours in contractDetails as `tradingHours` (every session, extended
included) and `liquidHours` (the regular session), "YYYYMMDD:HHMM-YYYYMMDD:HHMM" ranges or
"YYYYMMDD:CLOSED" joined by ";", in the zone `timeZoneId`; `ib_hours` writes them that way.
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal
from zoneinfo import ZoneInfo

MarketSession = Literal["regular", "extended", "closed"]
_DAY = dt.timedelta(days=1)


def parse_span(text: str) -> tuple[dt.time, dt.time]:
    """ "HH:MM-HH:MM" as (start, end); "24:00" as an end is midnight. Raises ValueError."""
    try:
        start_text, end_text = text.split("-")
        start = dt.time.fromisoformat(start_text.strip())
        end_text = end_text.strip()
        end = dt.time(0, 0) if end_text == "24:00" else dt.time.fromisoformat(end_text)
    except ValueError as exc:
        raise ValueError(f"{text!r} is not HH:MM-HH:MM") from exc
    if start == end and end_text != "24:00":
        raise ValueError(f"{text!r} is an empty session")
    return start, end


@dataclass(frozen=True, slots=True)
class Calendar:
    """One contract's trading calendar (see the module doc)."""

    timezone: str = "UTC"
    regular: tuple[str, ...] = ("00:00-24:00",)
    extended: tuple[str, ...] = ()
    days: tuple[int, ...] = (0, 1, 2, 3, 4, 5, 6)
    holidays: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        ZoneInfo(self.timezone)  # raises for an unknown zone
        for span in (*self.regular, *self.extended):
            parse_span(span)
        for day in self.holidays:
            dt.date.fromisoformat(day)
        if not set(self.days) <= set(range(7)):
            raise ValueError(f"days must be 0 (Monday) to 6, got {self.days}")

    @property
    def zone(self) -> ZoneInfo:
        return ZoneInfo(self.timezone)

    def _sessions(self, day: dt.date, spans: tuple[str, ...]) -> Iterator[tuple[float, float]]:
        """(start, end) epoch seconds of the sessions of trading day `day`."""
        if day.weekday() not in self.days or day.isoformat() in self.holidays:
            return
        zone = self.zone
        for span in spans:
            start_t, end_t = parse_span(span)
            end_day = day + _DAY if span.strip().endswith("24:00") else day
            start_day = day - _DAY if (end_t <= start_t and end_day == day) else day
            start = dt.datetime.combine(start_day, start_t, zone)
            end = dt.datetime.combine(end_day, end_t, zone)
            yield start.timestamp(), end.timestamp()

    def _around(
        self, now: float, spans: tuple[str, ...], days: int = 1
    ) -> list[tuple[float, float]]:
        today = dt.datetime.fromtimestamp(now, self.zone).date()
        out: list[tuple[float, float]] = []
        for n in range(-1, days + 1):
            out.extend(self._sessions(today + n * _DAY, spans))
        return sorted(out)

    def session_at(self, now: float) -> MarketSession:
        """Regular, extended or closed at `now` (epoch seconds)."""
        if any(s <= now < e for s, e in self._around(now, self.regular)):
            return "regular"
        if any(s <= now < e for s, e in self._around(now, self.extended)):
            return "extended"
        return "closed"

    def next_regular_open(self, now: float, *, within_days: int = 14) -> float | None:
        """When the next regular session starts after `now` (None: none within the days)."""
        starts = [s for s, _ in self._around(now, self.regular, within_days) if s > now]
        return min(starts) if starts else None

    def ib_hours(self, now: float, *, days: int = 7, extended: bool = True) -> str:
        """tradingHours (`extended`: every session) or liquidHours (regular only), as IB writes
        them: one entry per calendar day from today, ranges or CLOSED, in this zone."""
        zone = self.zone
        spans = (*self.regular, *self.extended) if extended else self.regular
        today = dt.datetime.fromtimestamp(now, zone).date()
        entries: list[str] = []
        for n in range(days):
            day = today + n * _DAY
            sessions = _merged(list(self._sessions(day, spans)))
            if not sessions:
                entries.append(f"{day:%Y%m%d}:CLOSED")
                continue
            for start, end in sessions:
                a = dt.datetime.fromtimestamp(start, zone)
                b = dt.datetime.fromtimestamp(end, zone)
                entries.append(f"{a:%Y%m%d:%H%M}-{b:%Y%m%d:%H%M}")
        return ";".join(entries)


def _merged(sessions: list[tuple[float, float]]) -> list[tuple[float, float]]:
    out: list[tuple[float, float]] = []
    for start, end in sorted(sessions):
        if out and start <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], end))
        else:
            out.append((start, end))
    return out


ALWAYS = Calendar()
# US stocks: the regular session 09:30-16:00 New York time; pre-market from 04:00, after-hours to
# 20:00, and IB's overnight session 20:00-03:50 (Sunday to Thursday evening), Monday to Friday.
US_EQUITY = Calendar(
    timezone="America/New_York",
    regular=("09:30-16:00",),
    extended=("20:00-03:50", "04:00-09:30", "16:00-20:00"),
    days=(0, 1, 2, 3, 4),
)
# CME equity index futures (Globex): 17:00-16:00 Chicago time, Sunday evening to Friday; the
# regular ("liquid") hours are the cash session, 08:30-15:00.
CME_EQUITY_FUTURES = Calendar(
    timezone="America/Chicago",
    regular=("08:30-15:00",),
    extended=("17:00-08:30", "15:00-16:00"),
    days=(0, 1, 2, 3, 4),
)
BUILT_IN: dict[str, Calendar] = {
    "always": ALWAYS,
    "us_equity": US_EQUITY,
    "cme_equity_futures": CME_EQUITY_FUTURES,
}


class SimClock:
    """The gateway's wall clock: real time plus an offset that `set` and `advance` move."""

    def __init__(self, start: float | None = None) -> None:
        self._offset = 0.0 if start is None else start - time.time()

    def __call__(self) -> float:
        return time.time() + self._offset

    def set(self, when: float) -> None:
        """From now on the clock reads `when` (and runs on from there)."""
        self._offset = when - time.time()

    def advance(self, seconds: float) -> None:
        self._offset += seconds

    @property
    def offset(self) -> float:
        """Seconds this clock reads ahead of real time (what a saved gateway state keeps)."""
        return self._offset

    def set_offset(self, offset: float) -> None:
        self._offset = offset
