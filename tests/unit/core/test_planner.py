"""Unit tests for the flatten and reduce planner: ordering, order types, splits, budget, notes."""

from __future__ import annotations

import math
from decimal import Decimal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from guardd.core.events import ConId
from guardd.core.planner import (
    AccountId,
    ChildOrder,
    ChildStatus,
    ClosePolicy,
    ConfirmedPosition,
    Note,
    NoteKind,
    OrderType,
    OrderTypeRule,
    Plan,
    PositionKey,
    Side,
    close_ledger,
    exposure,
    keep_fraction_for_gross,
    plan_flatten,
    plan_reduce,
    reduce_targets,
)
from guardd.core.pricing import ClosePrices, PricePoint

D = Decimal
DECISION = 7
NOW = 1_000.0


def key(con_id: int, account: str = "DU1") -> PositionKey:
    return PositionKey(AccountId(account), ConId(con_id))


def position(
    con_id: int,
    quantity: int | str,
    price: float | None = 100.0,
    *,
    sec_type: str = "FUT",
    multiplier: float = 1.0,
    fx_rate: float | None = 1.0,
    regular_hours: bool = True,
    min_tick: str = "0.01",
) -> ConfirmedPosition:
    return ConfirmedPosition(
        key=key(con_id),
        symbol=f"S{con_id}",
        sec_type=sec_type,
        exchange="SMART",
        currency="USD",
        quantity=D(quantity),
        price=price,
        fx_rate=fx_rate,
        multiplier=multiplier,
        min_tick=D(min_tick),
        regular_hours=regular_hours,
        # the price as a last trade received just now: fresh
        prices=ClosePrices(last=None if price is None else PricePoint(price, NOW)),
    )


def child(
    con_id: int,
    action: Side,
    quantity: int,
    *,
    filled: int = 0,
    status: ChildStatus = ChildStatus.WORKING,
    planned_against: int | None,
    n: int = 1,
) -> ChildOrder:
    return ChildOrder(
        key=key(con_id),
        order_ref=f"guardd:flatten:{DECISION}:{n}",
        action=action,
        quantity=D(quantity),
        filled=D(filled),
        status=status,
        planned_against=None if planned_against is None else D(planned_against),
    )


def flatten(
    positions: list[ConfirmedPosition],
    children: list[ChildOrder] | None = None,
    *,
    budget: int = 40,
    policy: ClosePolicy | None = None,
) -> Plan:
    return plan_flatten(
        positions,
        children or [],
        policy or ClosePolicy(),
        decision_id=DECISION,
        budget=budget,
        now=NOW,
    )


def kinds(plan: Plan) -> set[NoteKind]:
    return {note.kind for note in plan.notes}


# -- ordering and sides ------------------------------------------------------------------------


def test_positions_of_different_exposure_then_largest_exposure_first() -> None:
    small = position(1, 10, 100.0)  # 1,000
    large = position(2, -3, 50.0, multiplier=50.0)  # 7,500
    middle = position(3, 20, 100.0, fx_rate=2.0)  # 4,000 in base
    plan = flatten([small, large, middle])
    assert [o.key for o in plan.orders] == [key(2), key(3), key(1)]


def test_position_with_unknown_exposure_then_it_goes_first() -> None:
    known = position(1, 1000, 100.0)
    unknown_fx = position(2, 1, 100.0, fx_rate=None)
    unknown_price = position(3, 5, math.nan)
    plan = flatten([known, unknown_fx, unknown_price])
    # unknown exposures first, the larger quantity breaking the tie
    assert [o.key for o in plan.orders] == [key(3), key(2), key(1)]


def test_long_and_short_then_long_sells_and_short_buys() -> None:
    plan = flatten([position(1, 7), position(2, -4)])
    sides = {o.key: (o.action, o.quantity) for o in plan.orders}
    assert sides == {key(1): (Side.SELL, D(7)), key(2): (Side.BUY, D(4))}


def test_flat_position_then_at_target_and_no_order() -> None:
    plan = flatten([position(1, 0)])
    assert plan.orders == ()
    assert plan.at_target == (key(1),)


# -- order types -------------------------------------------------------------------------------


def test_stock_in_regular_hours_then_market_order() -> None:
    plan = flatten([position(1, 100, sec_type="STK")])
    (order,) = plan.orders
    assert (order.order_type, order.limit_price, order.outside_rth) == (OrderType.MKT, None, False)


def test_stock_outside_regular_hours_then_marketable_limit_with_outside_rth() -> None:
    long = position(1, 100, 50.005, sec_type="STK", regular_hours=False)
    short = position(2, -100, 50.005, sec_type="STK", regular_hours=False)
    orders = {o.key: o for o in flatten([long, short]).orders}
    sell, buy = orders[key(1)], orders[key(2)]
    assert (sell.order_type, sell.outside_rth) == (OrderType.LMT, True)
    assert sell.limit_price == 49.0  # 50.005 × 0.98 = 49.0049, down to the tick
    assert buy.limit_price == 51.01  # 50.005 × 1.02 = 51.0051, up to the tick


def test_stock_outside_hours_even_if_policy_says_market_then_limit() -> None:
    policy = ClosePolicy(order_types={"STK": OrderTypeRule(OrderType.MKT, limit_outside_rth=False)})
    plan = flatten([position(1, 10, sec_type="STK", regular_hours=False)], policy=policy)
    assert plan.orders[0].order_type is OrderType.LMT


def test_future_outside_hours_with_default_policy_then_market() -> None:
    plan = flatten([position(1, 3, sec_type="FUT", regular_hours=False)])
    assert plan.orders[0].order_type is OrderType.MKT


def test_option_then_limit_on_the_tick_grid() -> None:
    plan = flatten([position(1, 2, 1.23, sec_type="OPT", min_tick="0.05")])
    (order,) = plan.orders
    assert order.order_type is OrderType.LMT
    assert order.limit_price == pytest.approx(1.10)  # 1.23 × 0.90 = 1.107, down to 0.05


def test_sell_limit_below_one_tick_then_one_tick() -> None:
    plan = flatten([position(1, 2, 0.01, sec_type="OPT", min_tick="0.05")])
    assert plan.orders[0].limit_price == pytest.approx(0.05)


@pytest.mark.parametrize("price", [None, math.nan, math.inf, 0.0, -1.0])
def test_limit_needed_and_no_usable_price_then_skipped_and_reported(price: float | None) -> None:
    no_price = position(1, 5, price, sec_type="OPT")
    other = position(2, 5, 10.0, sec_type="OPT")
    plan = flatten([no_price, other], budget=1)
    assert [o.key for o in plan.orders] == [key(2)]  # the skipped one costs no budget
    assert Note(key(1), NoteKind.NO_PRICE, D(5)) in plan.notes


def test_unknown_sec_type_then_fallback_limit() -> None:
    plan = flatten([position(1, 5, 10.0, sec_type="WAR")])
    assert plan.orders[0].order_type is OrderType.LMT


# -- splitting, budget, refs -------------------------------------------------------------------


def test_position_larger_than_max_child_then_one_child_of_max_this_round() -> None:
    policy = ClosePolicy(max_child_quantity=D(300))
    plan = flatten([position(1, -1000)], policy=policy)
    assert [(o.action, o.quantity) for o in plan.orders] == [(Side.BUY, D(300))]


def test_split_close_over_rounds_then_reaches_zero_exactly() -> None:
    policy = ClosePolicy(max_child_quantity=D(300))
    children: list[ChildOrder] = []
    confirmed = 1000
    for n in range(1, 10):
        plan = flatten([position(1, confirmed)], children, policy=policy)
        if not plan.orders:
            break
        (order,) = plan.orders
        assert order.order_ref == f"guardd:flatten:{DECISION}:{n}"
        children.append(
            child(
                1,
                order.action,
                int(order.quantity),
                filled=int(order.quantity),
                status=ChildStatus.FILLED,
                planned_against=int(order.planned_against),
                n=n,
            )
        )
        confirmed -= int(order.quantity)
    assert [int(c.quantity) for c in children] == [300, 300, 300, 100]
    assert confirmed == 0
    assert flatten([position(1, 0)], children, policy=policy).at_target == (key(1),)


def test_budget_smaller_than_positions_then_largest_sent_rest_reported() -> None:
    positions = [position(i, 10 * i) for i in range(1, 6)]
    plan = flatten(positions, budget=2)
    assert [o.key for o in plan.orders] == [key(5), key(4)]
    deferred = {n.key for n in plan.notes if n.kind is NoteKind.BUDGET_EXHAUSTED}
    assert deferred == {key(1), key(2), key(3)}


def test_zero_budget_then_no_orders() -> None:
    plan = flatten([position(1, 10)], budget=0)
    assert plan.orders == ()
    assert kinds(plan) == {NoteKind.BUDGET_EXHAUSTED}


def test_existing_children_then_new_refs_continue_the_sequence() -> None:
    done = child(1, Side.SELL, 4, filled=0, status=ChildStatus.REJECTED, planned_against=10, n=7)
    plan = flatten([position(1, 10), position(2, 3)], [done])
    assert [o.order_ref for o in plan.orders] == [
        f"guardd:flatten:{DECISION}:8",
        f"guardd:flatten:{DECISION}:9",
    ]


# -- the bookkeeping -------------------------------------------------------------------------


def test_fill_reported_before_position_update_then_no_second_child() -> None:
    filled = child(1, Side.SELL, 100, filled=100, status=ChildStatus.FILLED, planned_against=100)
    plan = flatten([position(1, 100)], [filled])
    assert plan.orders == ()
    assert plan.at_target == ()  # not confirmed flat yet


def test_position_update_before_fill_report_then_no_second_child_and_not_flat() -> None:
    working = child(1, Side.SELL, 100, filled=0, planned_against=100)
    plan = flatten([position(1, 0)], [working])
    assert plan.orders == ()
    assert plan.notes == ()  # not over working: the child simply filled
    assert plan.at_target == ()


def test_stale_position_after_partial_fills_then_only_the_unclosed_rest() -> None:
    # child 1 sold 60 of 100 (reported); the position shows 40; child 2 (40) was rejected;
    # then a stale update says 100 again.
    first = child(1, Side.SELL, 60, filled=60, status=ChildStatus.FILLED, planned_against=100)
    second = child(1, Side.SELL, 40, status=ChildStatus.REJECTED, planned_against=40, n=2)
    plan = flatten([position(1, 100)], [first, second])
    assert [(o.action, o.quantity) for o in plan.orders] == [(Side.SELL, D(40))]


def test_partial_fill_then_cancel_then_replans_the_unfilled_rest() -> None:
    cancelled = child(1, Side.BUY, 50, filled=20, status=ChildStatus.CANCELLED, planned_against=-50)
    plan = flatten([position(1, -30)], [cancelled])
    assert [(o.action, o.quantity, o.planned_against) for o in plan.orders] == [
        (Side.BUY, D(30), D(-30))
    ]


def test_rejected_child_then_its_quantity_is_planned_again() -> None:
    rejected = child(1, Side.SELL, 10, status=ChildStatus.REJECTED, planned_against=10)
    plan = flatten([position(1, 10)], [rejected])
    assert [o.quantity for o in plan.orders] == [D(10)]


def test_rejected_too_often_then_no_new_child() -> None:
    rejects = [
        child(1, Side.SELL, 10, status=ChildStatus.REJECTED, planned_against=10, n=n)
        for n in range(1, 4)
    ]
    plan = flatten([position(1, 10)], rejects)
    assert plan.orders == ()
    assert Note(key(1), NoteKind.REJECTED_TOO_OFTEN, D(10)) in plan.notes


def test_unacknowledged_send_then_no_new_child_for_that_position() -> None:
    pending = child(1, Side.SELL, 10, status=ChildStatus.PENDING_ACK, planned_against=100)
    plan = flatten([position(1, 100), position(2, 5)], [pending])
    assert [o.key for o in plan.orders] == [key(2)]
    assert Note(key(1), NoteKind.AWAITING_ACK, D(90)) in plan.notes


def test_working_child_covers_part_then_only_the_rest() -> None:
    working = child(1, Side.SELL, 30, filled=10, planned_against=100)
    plan = flatten([position(1, 95)], [working])  # 5 of the 10 filled are confirmed so far
    assert [o.quantity for o in plan.orders] == [D(70)]


def test_position_grew_after_child_was_planned_then_plans_the_growth() -> None:
    working = child(1, Side.SELL, 100, planned_against=100)
    plan = flatten([position(1, 130)], [working])
    assert [o.quantity for o in plan.orders] == [D(30)]


def test_working_more_than_needed_then_over_working_reported() -> None:
    # another actor sold 80 after our child was planned: our 100 would take it short
    working = child(1, Side.SELL, 100, filled=0, planned_against=100)
    plan = flatten([position(1, 20)], [working])
    assert plan.orders == ()
    # from what the planner can know, the 80 may be our own fills: it reports nothing to cancel
    assert NoteKind.OVER_WORKING not in kinds(plan)
    bigger = child(1, Side.SELL, 150, filled=0, planned_against=100)
    over = flatten([position(1, 100)], [bigger])
    assert Note(key(1), NoteKind.OVER_WORKING, D(50)) in over.notes


def test_finished_children_past_target_then_reported() -> None:
    done = child(1, Side.SELL, 120, filled=120, status=ChildStatus.FILLED, planned_against=100)
    plan = flatten([position(1, -20)], [done])
    assert plan.orders == ()
    assert Note(key(1), NoteKind.PAST_TARGET, D(20)) in plan.notes


def test_children_both_buy_and_sell_then_refuses_to_plan() -> None:
    children = [
        child(1, Side.SELL, 5, planned_against=10),
        child(1, Side.BUY, 5, planned_against=10, n=2),
    ]
    plan = flatten([position(1, 10)], children)
    assert plan.orders == ()
    assert close_ledger(D(10), children) is None
    assert kinds(plan) == {NoteKind.MIXED_CHILDREN}


def test_child_without_baseline_then_plans_conservatively_and_reports() -> None:
    done = child(1, Side.SELL, 40, filled=40, status=ChildStatus.FILLED, planned_against=None)
    plan = flatten([position(1, 60)], [done])  # the 40 may or may not be in the 60
    assert [o.quantity for o in plan.orders] == [D(20)]
    assert Note(key(1), NoteKind.UNKNOWN_BASELINE, D(1)) in plan.notes


def test_children_for_position_not_passed_then_reported() -> None:
    working = child(9, Side.SELL, 5, planned_against=5)
    plan = flatten([], [working])
    assert plan.notes == (Note(key(9), NoteKind.NO_POSITION),)


def test_fractional_position_then_whole_units_and_remainder_reported() -> None:
    plan = flatten([position(1, "10.5")])
    assert [o.quantity for o in plan.orders] == [D(10)]
    rest = flatten([position(1, "0.5")])
    assert rest.orders == ()
    assert rest.notes == (Note(key(1), NoteKind.FRACTIONAL_REMAINDER, D("0.5")),)


def test_quantity_not_a_number_then_reported() -> None:
    plan = flatten([position(1, "NaN")])
    assert plan.notes == (Note(key(1), NoteKind.BAD_QUANTITY),)


def test_child_with_filled_above_quantity_then_refused() -> None:
    with pytest.raises(ValueError, match="filled"):
        child(1, Side.SELL, 5, filled=6, planned_against=5)


# -- reduce ------------------------------------------------------------------------------------


def reduce(
    positions: list[ConfirmedPosition],
    targets: dict[PositionKey, Decimal],
    children: list[ChildOrder] | None = None,
) -> Plan:
    return plan_reduce(
        positions, children or [], targets, ClosePolicy(), decision_id=DECISION, budget=40, now=NOW
    )


def test_reduce_targets_then_rounded_away_from_zero() -> None:
    targets = reduce_targets([position(1, 15), position(2, -15), position(3, 1)], keep=0.5)
    assert targets == {key(1): D(8), key(2): D(-8), key(3): D(1)}


def test_gross_above_target_then_keep_fraction_pro_rata() -> None:
    positions = [position(1, 10, 100.0), position(2, -30, 100.0)]  # gross 4,000
    assert keep_fraction_for_gross(positions, 1000.0) == pytest.approx(0.25)
    assert keep_fraction_for_gross(positions, 5000.0) == 1.0
    assert keep_fraction_for_gross([*positions, position(3, 1, None)], 1000.0) is None


def test_reduce_then_each_position_to_its_target() -> None:
    positions = [position(1, 10), position(2, -30)]
    plan = reduce(positions, reduce_targets(positions, keep=0.25))
    assert {(o.key, o.action, o.quantity) for o in plan.orders} == {
        (key(1), Side.SELL, D(7)),
        (key(2), Side.BUY, D(22)),
    }
    assert all(o.order_ref.startswith(f"guardd:reduce:{DECISION}:") for o in plan.orders)


def test_reduce_target_across_zero_then_clamped_to_flat() -> None:
    plan = reduce([position(1, 10)], {key(1): D(-5)})
    assert [o.quantity for o in plan.orders] == [D(10)]
    assert Note(key(1), NoteKind.TARGET_CLAMPED, D(-5)) in plan.notes


def test_reduce_target_beyond_position_then_nothing_and_within_target() -> None:
    plan = reduce([position(1, 10)], {key(1): D(12)})
    assert plan.orders == ()
    assert plan.at_target == (key(1),)


def test_reduce_without_target_then_reported() -> None:
    plan = reduce([position(1, 10)], {})
    assert plan.notes == (Note(key(1), NoteKind.NO_TARGET),)


# -- properties of one round -------------------------------------------------------------------

positions_strategy = st.lists(
    st.builds(
        position,
        con_id=st.integers(1, 10_000),
        quantity=st.integers(-5000, 5000),
        price=st.one_of(st.none(), st.just(math.nan), st.floats(0.01, 1e4)),
        sec_type=st.sampled_from(["STK", "FUT", "OPT", "CASH"]),
        multiplier=st.sampled_from([1.0, 50.0, 100.0]),
        fx_rate=st.one_of(st.none(), st.floats(0.5, 2.0)),
        regular_hours=st.booleans(),
    ),
    max_size=8,
    unique_by=lambda p: p.key,
)


@settings(max_examples=200, deadline=None)
@given(
    positions=positions_strategy,
    budget=st.integers(0, 10),
    max_child=st.integers(1, 3000),
)
def test_any_book_then_one_bounded_child_per_position_in_exposure_order(
    positions: list[ConfirmedPosition], budget: int, max_child: int
) -> None:
    policy = ClosePolicy(max_child_quantity=D(max_child))
    plan = flatten(positions, budget=budget, policy=policy)
    by_key = {p.key: p for p in positions}
    assert len(plan.orders) <= budget
    assert len({o.key for o in plan.orders}) == len(plan.orders)
    for order in plan.orders:
        quantity = by_key[order.key].quantity
        # the class's own cap (FX) where it has one, else the policy's
        cap = policy.rule_for(by_key[order.key].sec_type).max_child_quantity or D(max_child)
        assert 1 <= order.quantity <= min(abs(quantity), cap)
        assert order.action is (Side.SELL if quantity > 0 else Side.BUY)
        assert (order.order_type is OrderType.LMT) == (order.limit_price is not None)
    ranks = [exposure(by_key[o.key]) for o in plan.orders]
    unknown = [r is None for r in ranks]
    assert unknown == sorted(unknown, reverse=True)  # unknown exposures first
    known = [r for r in ranks if r is not None]
    assert known == sorted(known, reverse=True)


# ---------------------------------------------------------------- FX (CASH on IDEALPRO)


def test_fx_position_then_closed_whole_at_market_not_cut_into_odd_lots() -> None:
    # Arrange: long 100,000 EUR.USD and short 150,000 USD.JPY, with the default policy (10,000
    # per child for other classes: ten odd lots below the IDEALPRO minimum)
    eur = position(1, 100_000, 1.10, sec_type="CASH", min_tick="0.00005")
    jpy = position(2, -150_000, 150.0, sec_type="CASH", fx_rate=1 / 150, min_tick="0.005")

    # Act
    plan = flatten([eur, jpy])

    # Assert: one market order per pair for the whole quantity in the pair's base currency
    sent = {(o.key.con_id, o.action, o.quantity, o.order_type) for o in plan.orders}
    assert sent == {
        (1, Side.SELL, D(100_000), OrderType.MKT),
        (2, Side.BUY, D(150_000), OrderType.MKT),
    }


def test_class_cap_then_used_instead_of_the_policy_cap() -> None:
    # Arrange: CASH capped at 60,000 per child, the policy at 10,000
    policy = ClosePolicy(
        order_types={"CASH": OrderTypeRule(OrderType.MKT, max_child_quantity=D(60_000))}
    )
    eur = position(1, 100_000, 1.10, sec_type="CASH")

    # Act
    first = flatten([eur], policy=policy)
    sent = first.orders[0]
    second = flatten(
        [eur],
        [child(1, Side.SELL, int(sent.quantity), planned_against=100_000)],
        policy=policy,
    )

    # Assert: 60,000 then the 40,000 left, never more than the position
    assert sent.quantity == D(60_000)
    assert [o.quantity for o in second.orders] == [D(40_000)]


@settings(max_examples=60, deadline=None)
@given(
    quantity=st.integers(-20_000_000, 20_000_000).filter(lambda q: q != 0),
    cap=st.integers(1, 30_000_000),
)
def test_fx_any_size_and_cap_then_children_never_cross_zero(quantity: int, cap: int) -> None:
    # Arrange
    policy = ClosePolicy(
        order_types={"CASH": OrderTypeRule(OrderType.MKT, max_child_quantity=D(cap))}
    )
    pos = position(1, quantity, 1.10, sec_type="CASH")
    children: list[ChildOrder] = []

    # Act: plan rounds with every child filled and the position not yet updated (stale)
    for n in range(1, 40):
        plan = flatten([pos], children, policy=policy)
        if not plan.orders:
            break
        (order,) = plan.orders
        children.append(
            child(
                1,
                order.action,
                int(order.quantity),
                filled=int(order.quantity),
                status=ChildStatus.FILLED,
                planned_against=quantity,
                n=n,
            )
        )

    # Assert: what the children closed never exceeds the position
    closed = sum(c.filled for c in children)
    assert closed <= abs(quantity)
    assert all(c.quantity <= cap for c in children)
