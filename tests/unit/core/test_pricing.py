"""Close order pricing and re-pricing, pure: freshness, the basis of a limit, escalation, which
stalled children the close episode cancels, and how it replaces them."""

from __future__ import annotations

import math
from decimal import Decimal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from guardd.core.close import (
    Cancel,
    CloseEpisode,
    CloseSettings,
    Fill,
    Held,
    Observation,
    OrderReport,
    Round,
)
from guardd.core.events import ConId
from guardd.core.planner import (
    AccountId,
    ClosePolicy,
    ConfirmedPosition,
    NoteKind,
    OrderType,
    OrderTypeRule,
    PositionKey,
    plan_flatten,
)
from guardd.core.pricing import (
    Basis,
    ClosePrice,
    ClosePrices,
    Market,
    PricePoint,
    PriceSource,
    RepricePolicy,
    Unpriced,
    Widen,
    close_basis,
    close_price,
    collar_at,
    due_for_reprice,
    marketable_limit,
    next_step,
)

D = Decimal
NOW = 10_000.0
KEY = PositionKey(AccountId("DU1"), ConId(1))
DECISION = 9
POLICY = RepricePolicy(
    max_price_age_s=5.0,
    reprice_after_s=10.0,
    escalation=(Widen(0.04), Widen(0.10), Market()),
)
TICK = D("0.01")


def fresh(price: float, age: float = 1.0, *, delayed: bool = False) -> PricePoint:
    return PricePoint(price, NOW - age, delayed)


def price(
    prices: ClosePrices,
    *,
    sell: bool = True,
    step: int = 0,
    market_allowed: bool = False,
    market_first: bool = False,
    base_collar: float = 0.01,
    policy: RepricePolicy = POLICY,
) -> ClosePrice | Unpriced:
    return close_price(
        prices,
        sell=sell,
        market_first=market_first,
        market_allowed=market_allowed,
        base_collar=base_collar,
        step=step,
        min_tick=TICK,
        now=NOW,
        policy=policy,
    )


# -- the basis of a limit ----------------------------------------------------------------------


def test_fresh_touch_then_sell_from_bid_and_buy_from_ask() -> None:
    prices = ClosePrices(bid=fresh(99.0), ask=fresh(101.0), last=fresh(100.0))
    sell = close_basis(prices, sell=True, now=NOW, policy=POLICY)
    buy = close_basis(prices, sell=False, now=NOW, policy=POLICY)
    assert sell == Basis(PriceSource.BID, 99.0, 1.0)
    assert buy == Basis(PriceSource.ASK, 101.0, 1.0)


def test_stale_touch_and_fresh_last_then_last() -> None:
    prices = ClosePrices(bid=fresh(99.0, age=30.0), last=fresh(100.0, age=2.0))
    basis = close_basis(prices, sell=True, now=NOW, policy=POLICY)
    assert basis is not None and basis.source is PriceSource.LAST


def test_price_just_at_max_age_then_fresh_and_older_then_not() -> None:
    at_limit = ClosePrices(last=fresh(100.0, age=5.0))
    beyond = ClosePrices(last=fresh(100.0, age=5.001))
    assert close_basis(at_limit, sell=True, now=NOW, policy=POLICY) is not None
    assert close_basis(beyond, sell=True, now=NOW, policy=POLICY) is None


def test_delayed_market_data_just_received_then_never_fresh() -> None:
    prices = ClosePrices(
        bid=fresh(99.0, age=0.0, delayed=True), last=fresh(100.0, 0.0, delayed=True)
    )
    assert close_basis(prices, sell=True, now=NOW, policy=POLICY) is None
    assert price(prices) == Unpriced(stale=True)


def test_price_with_unknown_time_then_never_fresh() -> None:
    prices = ClosePrices(last=PricePoint(100.0, math.nan))
    assert close_basis(prices, sell=True, now=NOW, policy=POLICY) is None


# -- close_price: limit, fallback, escalation ---------------------------------------------------


def test_all_prices_stale_and_market_allowed_then_market() -> None:
    prices = ClosePrices(bid=fresh(99.0, age=60.0), last=fresh(100.0, age=60.0))
    result = price(prices, market_allowed=True)
    assert isinstance(result, ClosePrice) and result.market and result.limit is None


def test_all_prices_stale_and_no_market_then_unpriced_stale() -> None:
    prices = ClosePrices(bid=fresh(99.0, age=60.0))
    assert price(prices) == Unpriced(stale=True)


def test_no_price_at_all_then_unpriced_not_stale() -> None:
    assert price(ClosePrices()) == Unpriced(stale=False)


def test_escalation_widens_then_market_where_allowed() -> None:
    prices = ClosePrices(bid=fresh(100.0), ask=fresh(100.0))
    limits = []
    for step in range(3):
        result = price(prices, step=step)
        assert isinstance(result, ClosePrice) and not result.market
        limits.append(result.limit)
    assert limits == [99.0, 95.0, 85.0]  # collar 0.01, +0.04, +0.10
    market = price(prices, step=3, market_allowed=True)
    assert isinstance(market, ClosePrice) and market.market
    # a class that allows no market order stays at the widest collar, re-priced
    no_market = price(prices, step=3)
    assert isinstance(no_market, ClosePrice) and no_market.limit == 85.0
    # beyond the last step the last step repeats
    assert price(prices, step=9, market_allowed=True) == market


def test_buy_escalation_then_limits_rise() -> None:
    prices = ClosePrices(ask=fresh(100.0))
    limits = [price(prices, sell=False, step=step) for step in range(3)]
    assert [r.limit for r in limits if isinstance(r, ClosePrice)] == [101.0, 105.0, 115.0]


def test_class_closing_at_market_then_market_without_any_price() -> None:
    result = price(ClosePrices(), market_first=True)
    assert isinstance(result, ClosePrice) and result.market


def test_collar_never_reaches_one() -> None:
    policy = RepricePolicy(escalation=(Widen(0.6), Widen(0.6)))
    assert collar_at(2, 0.5, policy) < 1.0
    assert marketable_limit(100.0, sell=True, collar=collar_at(2, 0.5, policy), min_tick=TICK) > 0


# -- properties ---------------------------------------------------------------------------------

ages = st.one_of(st.floats(0.0, 20.0), st.just(math.inf))
points = st.one_of(
    st.none(),
    st.builds(
        lambda p, age, delayed: PricePoint(p, NOW - age, delayed),
        st.floats(0.01, 1e4),
        ages,
        st.booleans(),
    ),
)
price_sets = st.builds(ClosePrices, bid=points, ask=points, last=points, mark=points)


@settings(max_examples=500, deadline=None)
@given(
    prices=price_sets,
    sell=st.booleans(),
    step=st.integers(0, 6),
    market_allowed=st.booleans(),
    base_collar=st.floats(0.0, 0.5),
)
def test_any_prices_then_a_limit_only_ever_from_a_fresh_price(
    prices: ClosePrices, sell: bool, step: int, market_allowed: bool, base_collar: float
) -> None:
    result = price(
        prices, sell=sell, step=step, market_allowed=market_allowed, base_collar=base_collar
    )
    fresh_points = [
        p
        for p in (prices.bid, prices.ask, prices.last, prices.mark)
        if p is not None and not p.delayed and NOW - p.received <= POLICY.max_price_age_s
    ]
    if isinstance(result, Unpriced):
        assert not market_allowed
        assert not [p for p in fresh_points if p in (prices.get(s) for s in _sources(sell))]
        return
    if result.market:
        assert market_allowed
        return
    basis = result.basis
    assert basis is not None and result.limit is not None and result.collar is not None
    point = prices.get(basis.source)
    assert point is not None and point in fresh_points and point.price == basis.price
    assert basis.source in _sources(sell)
    assert result.limit == marketable_limit(
        basis.price, sell=sell, collar=result.collar, min_tick=TICK
    )
    # marketable: through the basis, never away from it
    assert result.limit <= basis.price if sell else result.limit >= basis.price


def _sources(sell: bool) -> tuple[PriceSource, ...]:
    touch = PriceSource.BID if sell else PriceSource.ASK
    return (touch, PriceSource.LAST, PriceSource.MARK)


steps_strategy = st.lists(
    st.one_of(st.builds(Widen, st.floats(0.001, 0.5)), st.just(Market())), max_size=5
)


@settings(max_examples=300, deadline=None)
@given(
    escalation=steps_strategy,
    base_collar=st.floats(0.0, 0.5),
    market_allowed=st.booleans(),
    sell=st.booleans(),
)
def test_any_escalation_then_each_step_at_least_as_marketable_as_the_one_before(
    escalation: list[Widen | Market], base_collar: float, market_allowed: bool, sell: bool
) -> None:
    policy = RepricePolicy(escalation=tuple(escalation))
    prices = ClosePrices(bid=fresh(100.0), ask=fresh(100.0))
    results = [
        price(
            prices,
            sell=sell,
            step=step,
            market_allowed=market_allowed,
            base_collar=base_collar,
            policy=policy,
        )
        for step in range(len(escalation) + 3)
    ]
    seen_market = False
    previous: float | None = None
    for result in results:
        assert isinstance(result, ClosePrice)
        if result.market:
            seen_market = True
            continue
        assert not seen_market, "a limit after a market step"
        assert result.limit is not None
        if previous is not None:
            assert result.limit <= previous if sell else result.limit >= previous
        previous = result.limit
    assert results[-1] == results[-2]  # past the last step it repeats


# -- when a child has stalled, and the step of its replacement ---------------------------------


def test_limit_working_reprice_after_s_then_due_and_younger_then_not() -> None:
    assert due_for_reprice(NOW - 10.0, NOW, POLICY)
    assert not due_for_reprice(NOW - 9.9, NOW, POLICY)
    assert not due_for_reprice(math.nan, NOW, POLICY)
    assert not due_for_reprice(0.0, NOW, RepricePolicy(reprice_after_s=None))


def test_next_step_one_past_every_repriced_child_never_below_any_and_clamped() -> None:
    assert next_step([], POLICY) == 0
    assert next_step([(0, True)], POLICY) == 1
    assert next_step([(0, True), (2, False)], POLICY) == 2
    assert next_step([(1, True), (0, True)], POLICY) == 2
    assert next_step([(3, True)], POLICY) == 3  # past the last step: the last step repeats


# -- the close episode around a re-price -------------------------------------------------------

OURS = 0
SETTINGS = CloseSettings(client_id=OURS, settle_s=5.0, lost_grace_s=2.0, cancel_retry_s=2.0)
OTHER = PositionKey(AccountId("DU1"), ConId(2))


class Desk:
    """What the executor would hand the episode: one option position per key, a live feed (bid
    and ask heard `age` seconds ago), our orders' statuses and fills, set by hand."""

    def __init__(self, *positions: tuple[PositionKey, int], allow_market: bool = False) -> None:
        self.now = NOW
        self.positions = dict(positions)
        self.bid = {key: 50.0 for key in self.positions}
        self.heard = {key: NOW for key in self.positions}
        self.orders: dict[int, OrderReport] = {}
        self.fills: list[Fill] = []
        self.next_id = 100
        self.allow_market = allow_market

    def policy(self, *, max_child: int = 10_000, reprice: RepricePolicy = POLICY) -> ClosePolicy:
        rule = OrderTypeRule(OrderType.LMT, collar=0.01, allow_market=self.allow_market)
        return ClosePolicy(
            order_types={"OPT": rule},
            max_child_quantity=D(max_child),
            max_rejects=None,
            reprice=reprice,
        )

    def obs(self) -> Observation:
        held = {}
        for key, quantity in self.positions.items():
            bid, heard = self.bid[key], self.heard[key]
            prices = ClosePrices(bid=PricePoint(bid, heard), ask=PricePoint(bid + 0.1, heard))
            position = ConfirmedPosition(
                key=key,
                symbol=f"OPT{key.con_id}",
                sec_type="OPT",
                exchange="SMART",
                currency="USD",
                quantity=D(quantity),
                price=bid,
                fx_rate=1.0,
                prices=prices,
            )
            held[key] = Held(position, 0.0)
        return Observation(
            now=self.now,
            generation=1,
            synced_since=0.0,
            executions_complete=True,
            positions=held,
            orders=dict(self.orders),
            fills=list(self.fills),
        )

    def step(self, episode: CloseEpisode, policy: ClosePolicy, *, ack: bool = True) -> Round:
        """One round: the cancels are sent, the new children sent (and acknowledged)."""
        result = episode.step(self.obs(), policy, 4)
        for cancel in result.cancels:
            episode.cancel_sent(cancel, 1, self.now)
        for order in result.orders:
            episode.add_child(order, self.next_id, 1, self.now)
            if ack:
                self.status(self.next_id, "Submitted", 0)
            self.next_id += 1
        return result

    def status(self, order_id: int, status: str, filled: int) -> None:
        self.orders[order_id] = OrderReport(order_id, 1000 + order_id, status, D(filled))

    def fill(self, order_id: int, key: PositionKey, quantity: int) -> None:
        """Our sell child filled `quantity` more: execution in, figure caught up."""
        exec_id = f"x{len(self.fills)}"
        self.fills.append(Fill(exec_id, OURS, order_id, 0, key, D(-quantity), self.now, True))
        self.positions[key] -= quantity

    def tick(self, seconds: float) -> None:
        """Time passes; the feed stays live."""
        self.now += seconds
        for key in self.heard:
            self.heard[key] = self.now


def kinds(result: Round) -> list[str]:
    return [r.kind for r in result.records]


def record(result: Round, kind: str) -> dict[str, object]:
    (found,) = [dict(r.fields) for r in result.records if r.kind == kind]
    return found


def test_limit_child_working_past_reprice_after_then_cancelled_for_the_next_step() -> None:
    # Arrange: long 100, a sell limit from the fresh bid
    desk = Desk((KEY, 100))
    episode = CloseEpisode("flatten", 1, NOW, SETTINGS)
    policy = desk.policy()
    (first,) = desk.step(episode, policy).orders
    assert (first.order_type, first.limit_price, first.step) == (OrderType.LMT, 49.5, 0)

    # Act: it has worked just under, then just at reprice_after_s
    desk.tick(9.9)
    young = desk.step(episode, policy)
    desk.tick(0.1)
    stalled = desk.step(episode, policy)

    # Assert
    assert young.cancels == () and young.orders == ()
    assert stalled.cancels == (Cancel(100, first.order_ref, KEY, "reprice"),)
    assert stalled.orders == ()
    fact = record(stalled, "close_child_reprice_cancel")
    assert (fact["order_ref"], fact["limit_price"], fact["step"], fact["next_step"]) == (
        first.order_ref,
        49.5,
        0,
        1,
    )
    assert fact["again"] is False


@pytest.mark.parametrize("which", ["market", "unacknowledged", "no_reprice_after"])
def test_market_unacknowledged_or_reprice_off_then_never_repriced(which: str) -> None:
    desk = Desk((KEY, 100), allow_market=which == "market")
    if which == "market":
        desk.heard[KEY] = NOW - 60.0  # no fresh price: a market order, allowed for the class
    reprice = RepricePolicy(reprice_after_s=None) if which == "no_reprice_after" else POLICY
    policy = desk.policy(reprice=reprice)
    episode = CloseEpisode("flatten", 1, NOW, SETTINGS)
    (order,) = desk.step(episode, policy, ack=which != "unacknowledged").orders
    assert order.order_type is (OrderType.MKT if which == "market" else OrderType.LMT)

    desk.now += 60.0
    later = desk.step(episode, policy)

    assert later.cancels == () and later.orders == ()
    assert "close_child_reprice_cancel" not in kinds(later)


def test_reprice_cancel_not_confirmed_then_sent_again_after_cancel_retry_s() -> None:
    desk = Desk((KEY, 100))
    episode = CloseEpisode("flatten", 1, NOW, SETTINGS)
    policy = desk.policy()
    desk.step(episode, policy)
    desk.tick(10.0)
    assert len(desk.step(episode, policy).cancels) == 1

    desk.tick(1.0)
    soon = desk.step(episode, policy)
    desk.tick(1.0)
    retry = desk.step(episode, policy)

    assert soon.cancels == () and soon.orders == ()
    assert [c.why for c in retry.cancels] == ["reprice"] and retry.orders == ()
    fact = record(retry, "close_child_reprice_cancel")
    assert fact["again"] is True and fact["next_step"] == 1


def test_several_stalled_then_cancelled_oldest_first() -> None:
    desk = Desk((KEY, 100), (OTHER, 50))
    episode = CloseEpisode("flatten", 1, NOW, SETTINGS)
    policy = desk.policy()
    desk.step(episode, policy, ack=False)  # both sent, neither acknowledged yet
    desk.status(101, "Submitted", 0)  # OTHER's is acknowledged first...
    desk.tick(3.0)
    desk.status(100, "Submitted", 0)

    desk.tick(10.0)
    stalled = desk.step(episode, policy)

    sent = {o.order_id: o.key for o in (episode.child_by_order_id(i) for i in (100, 101)) if o}
    assert [sent[c.order_id] for c in stalled.cancels] == [KEY, OTHER]


def test_child_being_cancelled_for_reprice_then_no_new_child_even_when_more_is_needed() -> None:
    # Arrange: long 300 in slices of 100: the first slice stalls and is being cancelled
    desk = Desk((KEY, 300))
    episode = CloseEpisode("flatten", 1, NOW, SETTINGS)
    policy = desk.policy(max_child=100)
    (first,) = desk.step(episode, policy).orders
    desk.tick(10.0)
    desk.step(episode, policy)  # cancelled for a re-price (a second slice may have gone meanwhile)
    for n in range(100, desk.next_id):
        desk.status(n, "Submitted", 0)

    # Act
    desk.tick(0.5)
    waiting = desk.step(episode, policy)

    # Assert: no new slice while the re-price cancel is outstanding
    assert waiting.orders == ()
    assert NoteKind.REPRICING in {n.kind for n in waiting.notes}
    assert first.quantity == D(100)


def test_cancel_confirmed_with_a_partial_fill_then_replacement_for_the_rest_one_step_on() -> None:
    # Arrange: long 100; the limit stalls and is cancelled; 40 fill as the cancel goes out
    desk = Desk((KEY, 100))
    episode = CloseEpisode("flatten", 1, NOW, SETTINGS)
    policy = desk.policy()
    (first,) = desk.step(episode, policy).orders
    desk.tick(10.0)
    assert desk.step(episode, policy).cancels
    desk.fill(100, KEY, 40)
    desk.status(100, "Submitted", 40)
    desk.tick(0.2)
    assert desk.step(episode, policy).orders == ()  # partly filled, still working: wait

    # Act: the cancel is confirmed with the final fill count; the bid moved to 48
    desk.status(100, "Cancelled", 40)
    desk.bid[KEY] = 48.0
    desk.tick(0.2)
    replaced = desk.step(episode, policy)

    # Assert: the rest, one step up, from the fresh bid; journaled old and new side by side
    (order,) = replaced.orders
    assert (order.quantity, order.step, order.order_type) == (D(60), 1, OrderType.LMT)
    assert order.limit_price == 45.6  # 48 × (1 - 0.01 - 0.04)
    assert order.basis is not None and order.basis.source is PriceSource.BID
    fact = record(replaced, "close_child_repriced")
    assert fact["old_order_ref"] == first.order_ref and fact["old_limit_price"] == 49.5
    assert (fact["old_step"], fact["old_filled"], fact["step"]) == (0, "40", 1)
    assert (fact["order_ref"], fact["limit_price"]) == (order.order_ref, 45.6)


@pytest.mark.parametrize("allow_market", [True, False])
def test_replacements_climb_the_escalation_then_market_where_allowed(allow_market: bool) -> None:
    desk = Desk((KEY, 100), allow_market=allow_market)
    episode = CloseEpisode("flatten", 1, NOW, SETTINGS)
    policy = desk.policy()
    seen = [desk.step(episode, policy).orders[0]]
    while seen[-1].order_type is OrderType.LMT and len(seen) < 6:
        desk.tick(10.0)
        (cancel,) = desk.step(episode, policy).cancels
        desk.status(cancel.order_id, "Cancelled", 0)
        desk.tick(0.1)
        (order,) = desk.step(episode, policy).orders
        seen.append(order)
    climbed = [(0, OrderType.LMT, 49.5), (1, OrderType.LMT, 47.5), (2, OrderType.LMT, 42.5)]
    if allow_market:
        assert [(o.step, o.order_type, o.limit_price) for o in seen] == [
            *climbed,
            (3, OrderType.MKT, None),
        ]
    else:  # the market step re-prices at the widest collar, and repeats
        assert [(o.step, o.order_type, o.limit_price) for o in seen] == [
            *climbed,
            *[(3, OrderType.LMT, 42.5)] * 3,
        ]


def test_reprice_cancel_answered_already_filled_then_no_reject_and_no_replacement() -> None:
    # Arrange: the stalled limit is cancelled for a re-price, but it filled meanwhile
    desk = Desk((KEY, 100))
    episode = CloseEpisode("flatten", 1, NOW, SETTINGS)
    policy = desk.policy()
    desk.step(episode, policy)
    desk.tick(10.0)
    desk.step(episode, policy)

    # Act: the broker answers the cancel (10148: cannot be cancelled, filled) before the fill
    answer = episode.broker_error(100, 10148, "OrderId 100 cannot be cancelled", desk.now)
    for code in (10147, 161):
        assert episode.broker_error(100, code, "", desk.now) is not None
    desk.tick(0.1)
    meanwhile = desk.step(episode, policy)
    desk.fill(100, KEY, 100)
    desk.status(100, "Filled", 100)
    desk.tick(0.1)
    after = desk.step(episode, policy)

    # Assert: not a reject (that would free the 100 and send another: past zero); flat
    assert answer is not None and answer.kind == "close_child_cancel_refused"
    assert episode.rejects_seen == 0
    assert meanwhile.orders == ()
    assert after.orders == () and after.at_target
    assert "close_child_repriced" not in kinds(after)


def test_reject_code_of_a_child_never_cancelled_then_still_a_reject() -> None:
    desk = Desk((KEY, 100))
    episode = CloseEpisode("flatten", 1, NOW, SETTINGS)
    desk.step(episode, desk.policy())
    rejected = episode.broker_error(100, 201, "Order rejected", desk.now)
    assert rejected is not None and rejected.kind == "child_order_rejected"
    assert episode.rejects_seen == 1


def test_option_with_only_stale_prices_then_no_child_and_unusable_price_journaled_once() -> None:
    desk = Desk((KEY, 100))
    desk.heard[KEY] = NOW - 6.0
    episode = CloseEpisode("flatten", 1, NOW, SETTINGS)
    policy = desk.policy()

    first = desk.step(episode, policy)
    desk.now += 1.0
    second = desk.step(episode, policy)

    assert first.orders == () and second.orders == ()
    assert [n.kind for n in first.notes] == [NoteKind.STALE_PRICE]
    fact = record(first, "close_price_unusable")
    assert (fact["why"], fact["quantity"]) == ("stale_price", "100")
    assert "close_price_unusable" not in kinds(second)


# -- the planner's pricing ---------------------------------------------------------------------


def option(quantity: int, prices: ClosePrices) -> ConfirmedPosition:
    return ConfirmedPosition(
        key=KEY,
        symbol="OPT1",
        sec_type="OPT",
        exchange="SMART",
        currency="USD",
        quantity=D(quantity),
        price=100.0,
        fx_rate=1.0,
        prices=prices,
    )


def test_stale_prices_and_market_allowed_then_market_child() -> None:
    rule = OrderTypeRule(OrderType.LMT, collar=0.01, allow_market=True)
    policy = ClosePolicy(order_types={"OPT": rule}, reprice=POLICY)
    stale = option(100, ClosePrices(bid=fresh(50.0, age=6.0)))
    result = plan_flatten([stale], [], policy, decision_id=DECISION, budget=5, now=NOW)
    (order,) = result.orders
    assert (order.order_type, order.limit_price) == (OrderType.MKT, None)


def test_step_given_then_priced_at_that_step() -> None:
    policy = ClosePolicy(order_types={"OPT": OrderTypeRule(OrderType.LMT)}, reprice=POLICY)
    position = option(100, ClosePrices(bid=fresh(50.0)))
    result = plan_flatten(
        [position], [], policy, decision_id=DECISION, budget=5, now=NOW, steps={KEY: 2}
    )
    (order,) = result.orders
    assert (order.step, order.limit_price) == (2, 42.0)  # 50 × (1 - 0.02 - 0.04 - 0.10)


def test_stock_outside_hours_with_stale_prices_then_never_market() -> None:
    stock = ConfirmedPosition(
        key=KEY,
        symbol="AAA",
        sec_type="STK",
        exchange="SMART",
        currency="USD",
        quantity=D(100),
        price=100.0,
        fx_rate=1.0,
        regular_hours=False,
        prices=ClosePrices(last=fresh(100.0, age=60.0)),
    )
    result = plan_flatten([stock], [], ClosePolicy(), decision_id=DECISION, budget=5, now=NOW)
    assert result.orders == ()
    assert [n.kind for n in result.notes] == [NoteKind.STALE_PRICE]


def test_restored_limit_child_still_working_then_repriced_from_its_journaled_send_time() -> None:
    # Arrange: a restarted guard restores a step-1 sell limit journaled 8 s ago; the broker
    # reports it working
    desk = Desk((KEY, 100))
    episode = CloseEpisode("flatten", 1, NOW, SETTINGS)
    sent = {
        "kind": "child_order_sent",
        "decision_id": 1,
        "account": KEY.account,
        "con_id": KEY.con_id,
        "order_id": 7,
        "order_ref": "guardd:flatten:1:4",
        "action": "SELL",
        "quantity": "100",
        "order_type": "LMT",
        "limit_price": 47.5,
        "step": 1,
        "planned_against": "100",
        "ts": NOW - 8.0,
    }
    assert episode.restore([sent]) == 1
    desk.status(7, "Submitted", 0)
    policy = desk.policy()

    # Act
    young = desk.step(episode, policy)
    desk.tick(2.0)
    stalled = desk.step(episode, policy)

    # Assert: 10 s after it was first sent, not after the restart; one step on
    assert young.cancels == () and young.orders == ()
    assert [(c.order_id, c.why) for c in stalled.cancels] == [(7, "reprice")]
    fact = record(stalled, "close_child_reprice_cancel")
    assert (fact["limit_price"], fact["step"], fact["next_step"]) == (47.5, 1, 2)
