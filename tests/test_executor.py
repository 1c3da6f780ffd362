"""The executor's helpers: child status from the broker, order refs, trading hours, prices."""

from datetime import datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from guardd.broker.ib import IbBroker
from guardd.core.book import Book
from guardd.core.close import child_status, sequence_of
from guardd.core.events import ConId, Connected, PositionUpdate, PositionValue
from guardd.core.planner import ChildStatus, ClosePolicy, DecisionId, NoteKind, plan_flatten
from guardd.executor import Executor, regular_hours
from guardd.journal import Journal

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
def test_broker_status_thenchild_status(
    broker_status: str, previous: ChildStatus, expected: ChildStatus
) -> None:
    assert child_status(broker_status, previous) == expected


def test_order_ref_then_sequence_number() -> None:
    assert sequence_of("guardd:flatten:19:7") == 7
    assert sequence_of("not-ours") == 0


def test_new_york_session_then_regular_hours_only_inside() -> None:
    def at(*args: int) -> float:
        return datetime(*args, tzinfo=NY).timestamp()

    assert regular_hours(at(2026, 11, 23, 10, 0))  # a Monday morning
    assert not regular_hours(at(2026, 11, 23, 9, 29))
    assert not regular_hours(at(2026, 11, 23, 16, 0))
    assert not regular_hours(at(2026, 11, 22, 12, 0))  # a Sunday


def test_value_and_quantity_out_of_step_then_no_price_and_no_limit(tmp_path: Path) -> None:
    # Arrange: 1000 AAPL sold down to 500; the pnlSingle value still reports the 1000 (its
    # stream lags the position's) and no market price has arrived
    book = Book("DU1", created_at=0.0)
    book.fold(Connected(server_version=176, managed_accounts=("DU1",), next_order_id=1, ts=0.0))
    for quantity, ts in ((1000.0, 1.0), (500.0, 2.0)):
        book.fold(
            PositionUpdate(
                account="DU1",
                con_id=ConId(1),
                symbol="AAPL",
                sec_type="STK",
                currency="USD",
                multiplier=1.0,
                exchange="SMART",
                quantity=quantity,
                avg_cost=180.0,
                ts=ts,
            )
        )
    book.fold(
        PositionValue(
            account="DU1",
            con_id=ConId(1),
            position=1000.0,
            daily=0.0,
            unrealized=0.0,
            realized=0.0,
            value=190_000.0,
            ts=3.0,
        )
    )
    executor = Executor(
        broker=IbBroker("127.0.0.1", 1, 0, "DU1"),
        book=book,
        journal=Journal(tmp_path / "journal.jsonl"),
        latch_path=tmp_path / "latch.json",
        close_policy=ClosePolicy(),
        client_id=0,
        account="DU1",
        clock=lambda: datetime(2026, 11, 23, 20, 0, tzinfo=NY).timestamp(),  # after hours
    )

    # Act
    (position,) = executor._confirmed_positions()
    plan = plan_flatten([position], [], ClosePolicy(), decision_id=DecisionId("1"), budget=1)

    # Assert: 190,000 / 500 = 380 would have been taken for the price (a sell limit twice the
    # market, never filling); without a market price there is no limit at all
    assert position.price is None
    assert plan.orders == ()
    assert [n.kind for n in plan.notes] == [NoteKind.NO_PRICE]
