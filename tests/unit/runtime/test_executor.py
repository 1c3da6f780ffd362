"""The executor against `FakeBroker` (the broker port, no gateway): the kill's cancel, connected,
disconnected or refused; close children journaled before they are sent; and its helpers: child
status from the broker, order refs, trading hours, prices."""

import asyncio
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from guardd.broker.fake import FakeBroker
from guardd.broker.pacer import Lane
from guardd.core.book import Book
from guardd.core.close import child_status
from guardd.core.engine import (
    Action,
    CancelAll,
    Decision,
    Flatten,
    Latch,
    LatchHalt,
    State,
)
from guardd.core.events import (
    ConId,
    Connected,
    ExecutionsEnd,
    OpenOrdersEnd,
    PositionsEnd,
    PositionUpdate,
    PositionValue,
    PriceTick,
)
from guardd.core.planner import ChildStatus, ClosePolicy, order_ref_prefix, sequence_of
from guardd.errors import BrokerError
from guardd.runtime.executor import Executor, regular_hours
from guardd.state.journal import Journal, read_journal
from guardd.state.latch import read_latch
from tests.conftest import eventually

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
    assert sequence_of("someone:flatten:19:7") == 0  # our label only
    assert sequence_of("guardd:flatten:19:7", order_ref_prefix("flatten", 19)) == 7
    assert sequence_of("guardd:flatten:19:7", order_ref_prefix("reduce", 19)) == 0
    assert sequence_of("guardd:flatten:19:7", order_ref_prefix("flatten", 1)) == 0
    assert sequence_of(order_ref_prefix("reduce", 4) + "12") == 12


def test_new_york_session_then_regular_hours_only_inside() -> None:
    def at(*args: int) -> float:
        return datetime(*args, tzinfo=NY).timestamp()

    assert regular_hours(at(2026, 11, 23, 10, 0))  # a Monday morning
    assert not regular_hours(at(2026, 11, 23, 9, 29))
    assert not regular_hours(at(2026, 11, 23, 16, 0))
    assert not regular_hours(at(2026, 11, 22, 12, 0))  # a Sunday


AFTER_HOURS = datetime(2026, 11, 23, 20, 0, tzinfo=NY).timestamp()


def out_of_step_book(*, market_price: float | None) -> Book:
    """A synced Book: 1000 AAPL sold down to 500, the pnlSingle value still for the 1000 (its
    stream lags the position's), and a market price only when given (heard just now: a close
    limit comes only from a fresh price)."""
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
    if market_price is not None:
        tick = PriceTick(con_id=ConId(1), field="last", price=market_price, ts=AFTER_HOURS - 1)
        book.fold(tick)
    for end in (PositionsEnd(ts=3.0), OpenOrdersEnd(ts=3.0), ExecutionsEnd(ts=3.0)):
        book.fold(end)
    return book


def executor_for(
    book: Book, broker: FakeBroker, tmp_path: Path, *, dry_run: bool = False, round_s: float = 0.01
) -> Executor:
    return Executor(
        broker=broker,
        book=book,
        journal=Journal(tmp_path / "journal.jsonl"),
        latch_path=tmp_path / "latch.json",
        close_policy=ClosePolicy(),
        client_id=0,
        account="DU1",
        dry_run=dry_run,
        round_s=round_s,
        clock=lambda: AFTER_HOURS,
    )


def kinds(tmp_path: Path) -> list[str]:
    return [str(r["kind"]) for r in read_journal(tmp_path / "journal.jsonl")]


def kill(*actions: Action) -> Decision:
    return Decision(1, State.HALTED, State.ARMED, actions, ("test",))


LATCH = Latch(
    reason="test", source="cli", principal="tester", mode="flatten", since=1.0, decision_id=1
)


async def planned_children(
    book: Book, tmp_path: Path, *, round_s: float = 0.01
) -> list[dict[str, Any]]:
    """Flatten after hours in dry run (STK closes with a marketable limit): the children the
    executor journals as what it would send (its first round, planned within 10 s)."""
    broker = FakeBroker()
    executor = executor_for(book, broker, tmp_path, dry_run=True, round_s=round_s)
    await executor.carry_out(kill(Flatten(reason="test")))
    # the dry-run close loop plans one round, then ends
    await eventually(lambda: "close_dry_run_planned" in kinds(tmp_path), "a round planned")
    await executor.stop_episode("test over")
    assert broker.requests == [], "a dry run asked the broker for something"
    records = list(read_journal(tmp_path / "journal.jsonl"))
    return [r for r in records if r["kind"] == "child_order_dry_run"]


async def test_kill_while_connected_then_global_cancel_on_the_kill_lane_then_latch(
    tmp_path: Path,
) -> None:
    broker = FakeBroker()
    executor = executor_for(out_of_step_book(market_price=None), broker, tmp_path)

    await executor.carry_out(kill(CancelAll(reason="test"), LatchHalt(LATCH)))

    assert [(r.name, r.lane) for r in broker.requests] == [("global_cancel", Lane.KILL)]
    assert kinds(tmp_path)[:2] == ["global_cancel_sent", "decision"]
    assert executor.latch_durable and (tmp_path / "latch.json").exists()


@pytest.mark.parametrize("fault", ["disconnected", "refused"])
async def test_cancel_not_sent_then_deferred_and_the_latch_still_written(
    fault: str, tmp_path: Path
) -> None:
    broker = FakeBroker(connected=fault != "disconnected")
    broker.refuse("global_cancel", BrokerError("socket closed"))
    executor = executor_for(out_of_step_book(market_price=None), broker, tmp_path)

    await executor.carry_out(kill(CancelAll(reason="test"), LatchHalt(LATCH)))

    assert broker.requests == []
    assert kinds(tmp_path)[:2] == ["global_cancel_deferred", "decision"]
    assert (tmp_path / "latch.json").exists(), "a cancel that failed skipped the latch"


class StuckCancel(FakeBroker):
    """A broker whose reqGlobalCancel waits for ever (the 1 s window full) or fails outright."""

    def __init__(self, error: BaseException | None) -> None:
        super().__init__()
        self.error = error
        self.waiting = asyncio.Event()

    async def global_cancel(self) -> None:
        self.waiting.set()
        if self.error is not None:
            raise self.error
        await asyncio.Event().wait()


@pytest.mark.parametrize("how", ["cancelled while waiting", "unexpected error"])
async def test_cancel_that_never_completes_then_decision_and_latch_written_all_the_same(
    how: str, tmp_path: Path
) -> None:
    broker = StuckCancel(None if how == "cancelled while waiting" else RuntimeError("bug"))
    executor = executor_for(out_of_step_book(market_price=None), broker, tmp_path)
    task = asyncio.create_task(executor.carry_out(kill(CancelAll(reason="test"), LatchHalt(LATCH))))
    await broker.waiting.wait()

    task.cancel()  # a shutdown while the cancel waits for its window (no effect once it raised)
    with pytest.raises((asyncio.CancelledError, RuntimeError)):
        await task

    # the exception goes on, but HALTED is durable: the decision journaled, the latch on disk
    assert "decision" in kinds(tmp_path)
    assert (
        executor.latch_durable and read_latch(tmp_path / "latch.json", allow_missing=False) == LATCH
    )


async def test_flatten_then_child_claimed_and_journaled_before_it_is_sent(tmp_path: Path) -> None:
    broker = FakeBroker(first_order_id=100)
    book = out_of_step_book(market_price=190.0)
    executor = executor_for(book, broker, tmp_path)

    journal_at_send: list[str] = []
    send = broker.place_order

    async def place_order(order_id: int, **terms: Any) -> None:
        journal_at_send.extend(kinds(tmp_path))
        await send(order_id, **terms)

    broker.place_order = place_order  # type: ignore[method-assign]

    await executor.carry_out(kill(Flatten(reason="test")))
    (sent,) = await broker.wait_for("place_order")
    await executor.stop_episode("test over")

    assert sent.order_id == 100 and sent.lane is Lane.FLATTEN
    assert (sent.args["action"], sent.args["quantity"], sent.args["order_type"]) == (
        "SELL",
        Decimal(500),
        "LMT",
    )
    assert journal_at_send[-1] == "child_order_sent"  # a restart knows it may exist


async def test_value_and_quantity_out_of_step_then_no_limit_price_from_them(
    tmp_path: Path,
) -> None:
    # Arrange: no market price; value / quantity = 190,000 / 500 = 380, twice the market
    book = out_of_step_book(market_price=None)

    # Act
    children = await planned_children(book, tmp_path)

    # Assert: no child priced off 380 (a sell limit near 376 that would never fill): no price,
    # no limit, no child (the planner notes NO_PRICE). The old fallback planned exactly that.
    assert children == [], "a child was priced from value / quantity"


async def test_market_price_known_then_limit_from_it_not_from_value(tmp_path: Path) -> None:
    # Arrange: the same out-of-step value, and a market price of 190
    book = out_of_step_book(market_price=190.0)

    # Act
    children = await planned_children(book, tmp_path)

    # Assert: one sell of the 500 at a marketable limit just under 190 (the policy's collar)
    assert [(c["action"], c["quantity"], c["order_type"]) for c in children] == [
        ("SELL", "500", "LMT")
    ]
    assert 180.0 < children[0]["limit_price"] < 190.0


async def test_flatten_started_then_first_round_planned_without_waiting_a_round_period(
    tmp_path: Path,
) -> None:
    # Arrange: a round period far longer than the test (the close loop used to wait one before
    # its first round: 134-189 ms from the kill to the first child at the default 0.1 s)
    book = out_of_step_book(market_price=190.0)

    # Act
    children = await planned_children(book, tmp_path, round_s=3600.0)

    # Assert: the first round was planned at once
    assert [(c["action"], c["quantity"]) for c in children] == [("SELL", "500")]
