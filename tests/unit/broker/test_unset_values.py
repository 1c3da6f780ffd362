"""Values IB leaves unset (ibapi's UNSET markers): recognised explicitly, folded as unknown.

The adapter's converters compare with ibapi's own constants; the Book keeps an unknown position
at its last known figure, marked unknown, never 0; the close episode never anchors on it or
confirms it flat; the adapter asks for positions again (bounded) over TCP."""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable
from dataclasses import replace
from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st
from ibapi.const import UNSET_DECIMAL, UNSET_DOUBLE, UNSET_INTEGER, UNSET_LONG

from guardd.broker.convert import client_id, number, order_id, perm_id
from guardd.broker.ib import IbBroker
from guardd.core.book import Book
from guardd.core.close import CloseEpisode, Held
from guardd.core.events import (
    UNKNOWN_CLIENT_ID,
    ClientId,
    ConId,
    Connected,
    OpenOrdersEnd,
    OrderId,
    OrderStatus,
    PermId,
    PositionsEnd,
    PositionsListed,
    PositionUpdate,
    PositionValue,
)
from guardd.retry import RetryPolicy
from ibsim.gateway import REQ_POSITIONS, FieldOmission, SimGateway
from ibsim.scenario import OmitFields, ScenarioError, parse_scenario
from ibsim.server import build_gateway
from tests.close_view import KEY, POLICY, SETTINGS, BookView, held, kinds, send_all
from tests.conftest import SCENARIO, eventually

ACC = "DU111"
AAPL = 265598

# ---- the adapter's converters -------------------------------------------------------------------


def test_unset_markers_then_unknown_never_a_number() -> None:
    assert math.isnan(number(UNSET_DECIMAL))
    assert math.isnan(number(UNSET_DOUBLE))
    assert math.isnan(number(UNSET_INTEGER))
    assert math.isnan(number(UNSET_LONG))
    assert math.isnan(number(""))
    assert order_id(UNSET_INTEGER) == 0
    assert perm_id(UNSET_LONG) == 0 and perm_id(UNSET_INTEGER) == 0
    assert client_id(UNSET_INTEGER) == UNKNOWN_CLIENT_ID


def test_values_next_to_the_markers_then_kept_as_numbers() -> None:
    # Recognised by equality with ibapi's markers, never by magnitude.
    assert number(Decimal(2**127 - 2)) == float(2**127 - 2)
    assert number(Decimal(0)) == 0.0
    assert number(1e308) == 1e308
    assert number(UNSET_INTEGER - 1) == UNSET_INTEGER - 1
    assert order_id(UNSET_INTEGER - 1) == UNSET_INTEGER - 1
    assert client_id(0) == 0 and client_id(UNSET_INTEGER - 1) == UNSET_INTEGER - 1


@given(st.integers(min_value=-(2**62), max_value=2**62))
def test_any_real_quantity_then_unchanged(quantity: int) -> None:
    assert number(Decimal(quantity)) == float(quantity)


# ---- the Book -----------------------------------------------------------------------------------


def pos(con_id: int, qty: float, ts: float = 1.0) -> PositionUpdate:
    return PositionUpdate(
        account=ACC,
        con_id=ConId(con_id),
        symbol=f"S{con_id}",
        sec_type="STK",
        currency="USD",
        multiplier=1.0,
        exchange="SMART",
        quantity=qty,
        avg_cost=10.0,
        ts=ts,
    )


def synced_book(*events: PositionUpdate) -> Book:
    book = Book(ACC, created_at=0.0)
    book.fold(Connected(server_version=226, managed_accounts=(ACC,), next_order_id=1, ts=0.0))
    for event in events:
        book.fold(event)
    book.fold(PositionsEnd(ts=1.0))
    book.fold(OpenOrdersEnd(ts=1.0))
    return book


def test_unset_quantity_after_a_figure_then_last_figure_kept_marked_unknown() -> None:
    # Arrange
    book = synced_book(pos(1, 100.0))

    # Act
    book.fold(pos(1, math.nan, ts=2.0))

    # Assert
    p = book.position(ConId(1))
    assert p is not None and not p.known and p.quantity == 100.0 and p.unknown_since == 2.0
    assert p.value is None and book.exposure().gross is None  # the exposure is not trusted
    assert book.position_count == 1 and [q.con_id for q in book.unknown_positions()] == [1]


def test_unset_quantity_of_a_new_position_then_held_unknown_not_flat() -> None:
    book = synced_book(pos(1, math.nan))

    p = book.position(ConId(1))
    assert p is not None and not p.known and math.isnan(p.quantity)
    assert [q.con_id for q in book.guarded_positions()] == [1]


def test_unknown_then_a_figure_then_known_again() -> None:
    book = synced_book(pos(1, 100.0))
    book.fold(pos(1, math.nan, ts=2.0))

    book.fold(pos(1, 0.0, ts=3.0))

    p = book.position(ConId(1))
    assert p is not None and p.known and p.quantity == 0.0
    assert book.position_count == 0 and list(book.unknown_positions()) == []


def test_unknown_position_reported_at_a_resync_then_not_swept() -> None:
    # Arrange: unknown, then a reconnect whose download reports it unknown again
    book = synced_book(pos(1, 100.0))
    book.fold(Connected(server_version=226, managed_accounts=(ACC,), next_order_id=1, ts=5.0))
    book.fold(pos(1, math.nan, ts=6.0))

    # Act
    book.fold(PositionsEnd(ts=6.0))

    # Assert
    p = book.position(ConId(1))
    assert p is not None and not p.known and p.quantity == 100.0


def test_download_asked_again_no_longer_lists_an_unknown_position_then_gone() -> None:
    book = synced_book(pos(1, 100.0), pos(2, 5.0))
    book.fold(pos(1, math.nan, ts=2.0))
    book.fold(pos(2, math.nan, ts=2.0))

    book.fold(PositionsListed(account=ACC, con_ids=frozenset({ConId(2)}), ts=3.0, asked=2.5))

    assert book.position(ConId(1)) is None
    still = book.position(ConId(2))
    assert still is not None and not still.known  # listed: still unknown, never dropped


def test_value_of_an_unknown_position_then_not_trusted() -> None:
    book = synced_book(pos(1, 100.0))
    book.fold(pos(1, math.nan, ts=2.0))

    book.fold(
        PositionValue(
            account=ACC,
            con_id=ConId(1),
            position=math.nan,
            daily=1.0,
            unrealized=1.0,
            realized=0.0,
            value=5000.0,
            ts=3.0,
        )
    )

    p = book.position(ConId(1))
    assert p is not None and p.value is None


def test_order_status_with_unset_counts_then_last_known_kept() -> None:
    book = synced_book()

    def status(filled: float, remaining: float, ts: float) -> OrderStatus:
        return OrderStatus(
            perm_id=PermId(9),
            order_id=OrderId(5),
            client_id=ClientId(3),
            status="Submitted",
            filled=filled,
            remaining=remaining,
            avg_fill_price=math.nan,
            ts=ts,
        )

    book.fold(status(40.0, 60.0, 1.0))
    book.fold(status(math.nan, math.nan, 2.0))

    order = book.order(PermId(9))
    assert order is not None and order.filled == 40.0 and order.remaining == 60.0


def test_unset_client_id_then_never_our_order() -> None:
    book = Book(ACC, created_at=0.0, own_client_id=ClientId(0))
    book.claim_order_id(OrderId(5))

    assert book.own_order_id(PermId(0), UNKNOWN_CLIENT_ID, OrderId(5)) is None
    assert book.own_order_id(PermId(0), ClientId(0), OrderId(0)) is None  # unset order id


# ---- the close episode --------------------------------------------------------------------------


def test_unknown_figure_then_never_confirmed_flat_and_nothing_planned() -> None:
    # Arrange: long 10, our child sold 10 (status in), the figure arrives unset
    view = BookView(10)
    episode = CloseEpisode("flatten", 1, 0.0, SETTINGS)
    (first,) = send_all(episode, episode.step(view.obs(), POLICY, 4), view, 100)
    view.status(first, "Filled", 10)
    view.now += 1

    # Act: the figure is unknown (the Book holds the last known 10, or NaN)
    for last in (Decimal(10), Decimal("NaN"), Decimal(0)):
        unknown = Held(replace(held(0, 0.0).position, quantity=last), 0.0, known=False)
        plan = episode.step(replace(view.obs(), positions={KEY: unknown}), POLICY, 4)

        # Assert
        assert not plan.at_target and plan.off_target == 1 and plan.orders == ()
        assert "flat_confirmed" not in kinds(plan) and not episode.at_target

    # Act: the figure arrives: 0
    view.figure(0)
    done = episode.step(view.obs(), POLICY, 4)

    # Assert
    assert "close_position_known" in kinds(done) and "flat_confirmed" in kinds(done)


# ---- the scenario fault -------------------------------------------------------------------------


def test_omit_fields_fault_then_parsed_and_validated() -> None:
    data = dict(SCENARIO)
    data["faults"] = [
        {
            "kind": "omit_fields",
            "at_s": 1.0,
            "symbols": ["AAPL"],
            "position": ["position"],
            "order_status": ["filled", "client_id"],
            "seconds": 2.0,
        }
    ]
    (fault,) = parse_scenario(data).faults
    assert isinstance(fault, OmitFields)
    assert fault.omitted() == {
        "position": frozenset({"position"}),
        "order_status": frozenset({"filled", "client_id"}),
    }

    data["faults"] = [{"kind": "omit_fields", "at_s": 0.0}]
    with pytest.raises(ScenarioError, match="name a field to omit"):
        parse_scenario(data)
    data["faults"] = [{"kind": "omit_fields", "at_s": 0.0, "position": ["avg_cost"]}]
    with pytest.raises(ScenarioError, match="position"):
        parse_scenario(data)


# ---- the adapter over TCP at 226 ----------------------------------------------------------------


@pytest.mark.integration
async def test_quantity_unset_then_positions_asked_again_bounded_until_known() -> None:
    # Arrange: the protobuf wire; AAPL's quantity left out of position updates
    gateway = {**SCENARIO["gateway"], "server_version": 226}  # type: ignore[dict-item]
    scenario = parse_scenario({**SCENARIO, "gateway": gateway})
    async with build_gateway(scenario, host="127.0.0.1", port=0) as sim:
        omission = FieldOmission({"position": frozenset({"position"})}, frozenset({AAPL}))
        sim.omit_fields(omission)
        asked = _count_requests(sim)
        broker = IbBroker("127.0.0.1", sim.port, 0, "DU000001", heartbeat_interval_s=None)
        broker.positions_retry, broker.positions_retries = RetryPolicy(0.05, 0.1), 3
        seen: list[PositionUpdate] = []

        async def collect_loop() -> None:
            async for event in broker.events():
                if isinstance(event, PositionUpdate) and event.con_id == AAPL:
                    seen.append(event)

        async with broker:
            task = asyncio.create_task(collect_loop(), name="collect_loop")
            # Act / Assert: asked again at most 3 times, each answer still unknown
            await eventually(lambda: asked() == 4, "3 more reqPositions", timeout_s=10)
            session = broker._session
            assert session is not None and session.positions_retry_task is not None
            await eventually(session.positions_retry_task.done, "retries exhausted", timeout_s=5)
            assert asked() == 4 and all(math.isnan(e.quantity) for e in seen)

            # Act: the fault ends; a new unknown spell would get its own bound, but the next
            # reconnect or update brings the figure: here a trade of AAPL does
            sim.restore_fields(omission)
            sim.liquidate("DU000001", AAPL, 100)
            await eventually(
                lambda: bool(seen) and seen[-1].quantity == 900.0, "AAPL's figure", timeout_s=10
            )
            assert not session.unknown_positions and session.positions_retries == 0
        await task


def _count_requests(sim: SimGateway) -> Callable[[], int]:
    count = [0]

    def on_message(client_id: int, msg_id: int, fields: list[str]) -> None:
        if client_id == 0 and msg_id == REQ_POSITIONS:
            count[0] += 1

    sim.on_message(on_message)
    return lambda: count[0]
