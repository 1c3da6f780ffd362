"""Market hours in the guard: IB's hours strings read into sessions (guardd.broker.hours), the
session of an instant (guardd.core.hours), the planner's closed-market note and the close episode's
`close_waiting_for_open` record, and the executor's fallback without contract hours."""

from __future__ import annotations

import datetime as dt
from decimal import Decimal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from guardd.broker.hours import HoursFormatError, market_hours, parse_hours, zone_of
from guardd.core import planner
from guardd.core.book import Book
from guardd.core.events import ConId, ContractHours, ServerTime
from guardd.core.hours import MarketHours
from guardd.runtime.executor import market_session
from ibsim.hours import CME_EQUITY_FUTURES, US_EQUITY, Calendar

NEW_YORK = dt.timezone(dt.timedelta(hours=-5))


def at(day: int, hour: int, minute: int = 0) -> float:
    return dt.datetime(2026, 12, day, hour, minute, tzinfo=NEW_YORK).timestamp()


def test_new_format_with_closed_days_then_sessions_and_span() -> None:
    text = "20261205:CLOSED;20261206:CLOSED;20261207:0930-20261207:1600"
    sessions, start, end = parse_hours(text, zone_of("US/Eastern"))
    assert sessions == ((at(7, 9, 30), at(7, 16)),)
    assert start == at(5, 0) and end == at(7, 0)


def test_old_format_with_two_ranges_a_day_then_both_sessions() -> None:
    sessions, _, _ = parse_hours("20261201:0400-0930,0930-2000", zone_of("EST"))
    assert sessions == ((at(1, 4), at(1, 9, 30)), (at(1, 9, 30), at(1, 20)))


@pytest.mark.parametrize(
    "text", ["", "2026120:0930-1600", "20261201:0930", "20261201:1600-0930", "20261301:0930-1600"]
)
def test_hours_ib_would_not_write_then_format_error(text: str) -> None:
    with pytest.raises(HoursFormatError):
        parse_hours(text, zone_of("America/New_York"))


def test_unknown_zone_then_format_error() -> None:
    with pytest.raises(HoursFormatError, match="Mars"):
        market_hours("Mars/Olympus", "20261201:CLOSED", "20261201:CLOSED")


def test_session_outside_the_span_then_unknown() -> None:
    hours = MarketHours(((at(1, 9, 30), at(1, 16)),), ((at(1, 4), at(1, 20)),), at(1, 0), at(2, 0))
    assert hours.session_at(at(1, 10)) == "regular"
    assert hours.session_at(at(1, 5)) == "extended"
    assert hours.session_at(at(1, 21)) == "closed"
    assert hours.session_at(at(2, 10)) == "unknown"


@settings(max_examples=200, deadline=None)
@given(
    calendar=st.sampled_from([US_EQUITY, CME_EQUITY_FUTURES]),
    offset_s=st.floats(min_value=0, max_value=6 * 86400),
)
def test_gateway_hours_read_back_by_the_guard_then_same_session(
    calendar: Calendar, offset_s: float
) -> None:
    # What the simulated gateway reports in contractDetails, read as the guard reads it, gives
    # the session the gateway itself plays, at any instant the report covers.
    base = at(1, 0)
    hours = market_hours(
        calendar.timezone,
        calendar.ib_hours(base, extended=True),
        calendar.ib_hours(base, extended=False),
    )
    now = base + offset_s
    read = hours.session_at(now)
    if offset_s < 5 * 86400:
        assert read == calendar.session_at(now)
    else:  # the last days listed are not known whole: unknown, or right
        assert read in ("unknown", calendar.session_at(now))


def test_book_then_session_judged_at_the_gateways_clock() -> None:
    book = Book("DU1", created_at=0.0)
    hours = MarketHours(((at(1, 9, 30), at(1, 16)),), ((at(1, 4), at(1, 20)),), at(1, 0), at(2, 0))
    book.fold(ContractHours(con_id=ConId(5), hours=hours, ts=0.0))
    # our clock says 03:00, the gateway's says 10:00
    book.fold(ServerTime(server_time=at(1, 10), ts=at(1, 3)))
    assert book.market_session(5, at(1, 3)) == "regular"
    assert market_session(book, 5, "STK", at(1, 3)) == "regular"
    # without contract hours: a stock keeps US equity hours (never "closed"), others regular
    assert market_session(book, 6, "STK", at(5, 12) - 7 * 3600) == "extended"
    assert market_session(book, 6, "FUT", at(5, 5)) == "regular"


def position(*, market_open: bool) -> planner.ConfirmedPosition:
    return planner.ConfirmedPosition(
        key=planner.PositionKey(planner.AccountId("DU1"), ConId(5)),
        symbol="AAPL",
        sec_type="STK",
        exchange="SMART",
        currency="USD",
        quantity=Decimal(100),
        price=190.0,
        fx_rate=1.0,
        regular_hours=False,
        market_open=market_open,
    )


def test_closed_market_then_no_child_and_a_market_closed_note() -> None:
    plan = planner.plan_flatten(
        [position(market_open=False)],
        [],
        planner.ClosePolicy(),
        decision_id=1,
        budget=10,
        now=0.0,
    )
    assert plan.orders == ()
    assert [n.kind for n in plan.notes] == [planner.NoteKind.MARKET_CLOSED]
