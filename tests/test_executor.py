"""The executor's pure helpers: child order status from the broker, order refs, trading hours."""

from datetime import datetime
from zoneinfo import ZoneInfo

import pytest

from guardd.core.planner import ChildStatus
from guardd.executor import _child_status, _sequence_of, regular_hours

NY = ZoneInfo("America/New_York")


@pytest.mark.parametrize(
    ("broker_status", "previous", "expected"),
    [
        ("Filled", ChildStatus.WORKING, ChildStatus.FILLED),
        ("Cancelled", ChildStatus.WORKING, ChildStatus.CANCELLED),
        ("ApiCancelled", ChildStatus.PENDING_ACK, ChildStatus.CANCELLED),
        ("Inactive", ChildStatus.WORKING, ChildStatus.REJECTED),
        ("Submitted", ChildStatus.PENDING_ACK, ChildStatus.WORKING),
        # A reject (error 201) is final even if a stale PreSubmitted arrives after it.
        ("PreSubmitted", ChildStatus.REJECTED, ChildStatus.REJECTED),
        # A child given up as lost after a re-sync that the broker reports working again
        # counts again: its quantity must not be planned twice.
        ("Submitted", ChildStatus.CANCELLED, ChildStatus.WORKING),
    ],
)
def test_broker_status_then_child_status(
    broker_status: str, previous: ChildStatus, expected: ChildStatus
) -> None:
    assert _child_status(broker_status, previous) == expected


def test_order_ref_then_sequence_number() -> None:
    assert _sequence_of("guardd:flatten:19:7") == 7
    assert _sequence_of("not-ours") == 0


def test_new_york_session_then_regular_hours_only_inside() -> None:
    def at(*args: int) -> float:
        return datetime(*args, tzinfo=NY).timestamp()

    assert regular_hours(at(2026, 11, 23, 10, 0))  # a Monday morning
    assert not regular_hours(at(2026, 11, 23, 9, 29))
    assert not regular_hours(at(2026, 11, 23, 16, 0))
    assert not regular_hours(at(2026, 11, 22, 12, 0))  # a Sunday
