"""IB's contract hours (contractDetails `tradingHours`, `liquidHours`, `timeZoneId`) read into
`guardd.core.hours.MarketHours`.

IB writes one entry per day, ";"-separated, in the contract's zone: "YYYYMMDD:HHMM-YYYYMMDD:HHMM"
ranges (an entry may span midnight) or "YYYYMMDD:CLOSED"; older gateways write
"YYYYMMDD:HHMM-HHMM[,HHMM-HHMM]". Zones come as tz names ("US/Eastern", "America/Chicago") and
sometimes as IB's abbreviations ("EST", "CST"…), which here mean the exchange's civil time with its
daylight saving, not a fixed offset.
"""

from __future__ import annotations

import datetime as dt
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from guardd.core.hours import Interval, MarketHours

# IB's abbreviations for exchange zones, as the civil zones they stand for.
_IB_ZONES = {
    "EST": "America/New_York",
    "EST5EDT": "America/New_York",
    "CST": "America/Chicago",
    "CST6CDT": "America/Chicago",
    "MST": "America/Denver",
    "PST": "America/Los_Angeles",
    "GMT": "Europe/London",
    "MET": "Europe/Berlin",
    "CET": "Europe/Berlin",
    "JST": "Asia/Tokyo",
    "HKT": "Asia/Hong_Kong",
    "AET": "Australia/Sydney",
}


class HoursFormatError(ValueError):
    """Hours text IB would not write, or a zone this host does not know."""


def zone_of(time_zone_id: str) -> ZoneInfo:
    name = _IB_ZONES.get(time_zone_id.strip(), time_zone_id.strip())
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError) as exc:
        raise HoursFormatError(f"unknown time zone {time_zone_id!r}") from exc


def _at(day: str, hhmm: str, zone: ZoneInfo) -> float:
    try:
        date = dt.datetime.strptime(day, "%Y%m%d").date()
        if hhmm == "2400":
            return dt.datetime.combine(date + dt.timedelta(days=1), dt.time(0), zone).timestamp()
        return dt.datetime.combine(
            date, dt.datetime.strptime(hhmm, "%H%M").time(), zone
        ).timestamp()
    except ValueError as exc:
        raise HoursFormatError(f"bad date or time {day}:{hhmm}") from exc


def parse_hours(text: str, zone: ZoneInfo) -> tuple[tuple[Interval, ...], float, float]:
    """(sessions, covers_from, covers_until) of one hours string: the span runs from the first
    day listed to the start of the last one; raises HoursFormatError."""
    sessions: list[Interval] = []
    days: list[str] = []
    for entry in (e.strip() for e in text.split(";")):
        if not entry:
            continue
        day, sep, rest = entry.partition(":")
        if not sep or len(day) != 8:
            raise HoursFormatError(f"bad hours entry {entry!r}")
        days.append(day)
        if rest == "CLOSED":
            continue
        for span in rest.split(","):
            start_text, dash, end_text = span.partition("-")
            if not dash:
                raise HoursFormatError(f"bad hours entry {entry!r}")
            start = _at(day, start_text, zone)
            if ":" in end_text:  # "YYYYMMDD:HHMM"
                end_day, _, end_hhmm = end_text.partition(":")
                days.append(end_day)
                end = _at(end_day, end_hhmm, zone)
            else:
                end = _at(day, end_text, zone)
            if end <= start:
                raise HoursFormatError(f"a session that ends before it starts: {entry!r}")
            sessions.append((start, end))
    if not days:
        raise HoursFormatError("no days")
    # A day's sessions may begin the evening before (CME: 17:00 the day before), so the last
    # day listed is not known whole: the sessions of the day after it may start on it.
    first, last = min(days), max(days)
    return tuple(sorted(sessions)), _at(first, "0000", zone), _at(last, "0000", zone)


def market_hours(time_zone_id: str, trading_hours: str, liquid_hours: str) -> MarketHours:
    """A contract's MarketHours from contractDetails; raises HoursFormatError."""
    zone = zone_of(time_zone_id)
    trading, t_from, t_until = parse_hours(trading_hours, zone)
    regular, r_from, r_until = parse_hours(liquid_hours, zone)
    return MarketHours(
        regular=regular,
        trading=trading,
        covers_from=max(t_from, r_from),
        covers_until=min(t_until, r_until),
    )
