"""Property tests for re-pricing in the close episode: a close whose limit misses the market is
cancelled and replaced, under any interleaving of market moves, stale or fresh price feeds, fills
racing cancels, late order, execution and position messages.

A simulated broker matches our children against a true market (a sell limit fills at or below
the bid, a buy limit at or above the ask, a market order always); the episode
(`guardd.core.close.CloseEpisode.step`) sees only the guard's own view: prices with the time they
were received, our orders' statuses, our executions and position figures, each delivered late
(a positions download the episode asks for is answered on the same socket, so every update IB
sent before it arrives before the answer).
The test carries out each round as the executor does (cancels, then new children). After every
step:
- the worst case (every live order at the broker fills) never crosses zero;
- a limit is only ever derived from a price fresh at the time it is planned;
- while a child is being cancelled for a re-price, the position gets no new child, and with one
  child per position (no slicing) at most one child of the position is live at the broker;
- successive children of a position never step back down the escalation.
Once the feed is fresh and messages are delivered, re-pricing reaches flat, confirmed.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from decimal import Decimal

from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from guardd.core.close import CloseEpisode, CloseSettings, Fill, Held, Observation, OrderReport
from guardd.core.events import ConId
from guardd.core.planner import (
    AccountId,
    ClosePolicy,
    ConfirmedPosition,
    OrderType,
    OrderTypeRule,
    PositionKey,
    Side,
)
from guardd.core.pricing import (
    ClosePrices,
    Market,
    PricePoint,
    RepricePolicy,
    Widen,
    collar_at,
    marketable_limit,
)

KEY = PositionKey(AccountId("DU1"), ConId(1))
OURS = 0
LIVE = "Submitted"
HALF_SPREAD = 0.05
TICK = Decimal("0.01")
REPRICE = RepricePolicy(
    max_price_age_s=5.0, reprice_after_s=10.0, escalation=(Widen(0.05), Widen(0.2), Market())
)
SETTINGS = CloseSettings(client_id=OURS, settle_s=5.0, lost_grace_s=2.0, cancel_retry_s=2.0)


@dataclass
class BrokerOrder:
    action: Side
    quantity: int
    limit: float | None  # None: market
    filled: int = 0
    status: str = LIVE
    cancel_asked: bool = False

    @property
    def remaining(self) -> int:
        return self.quantity - self.filled if self.status == LIVE else 0


class RepriceMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.now = 1_000.0
        self.market = 100.0
        self.feed = ClosePrices()
        self.true_position = 0
        self.start = 0
        self.figure = 0
        self.figure_at = self.now
        self.position_queue: list[int] = []
        self.refresh_asked: float | None = None  # a positions download asked for, unanswered
        self.listed_asked: float | None = None  # when the last answered download was asked
        self.broker: dict[int, BrokerOrder] = {}
        self.events: dict[int, deque[tuple[str, int]]] = {}  # order statuses, in order
        self.exec_queue: list[Fill] = []  # our executions, in any order
        self.reports: dict[int, OrderReport] = {}
        self.fills: list[Fill] = []
        self.episode = CloseEpisode("flatten", 1, self.now, SETTINGS)
        self.next_order_id = 100
        self.next_exec = 1
        self.policy = ClosePolicy()
        self.single_child = True
        self.allow_market = False
        self.highest_step = 0

    @initialize(
        start=st.integers(-50, 50).filter(lambda q: q != 0),
        max_child=st.integers(1, 60),
        allow_market=st.booleans(),
    )
    def begin(self, start: int, max_child: int, allow_market: bool) -> None:
        self.true_position = self.start = self.figure = start
        self.single_child = max_child >= abs(start)
        self.allow_market = allow_market
        rule = OrderTypeRule(OrderType.LMT, collar=0.01, allow_market=allow_market)
        self.policy = ClosePolicy(
            order_types={"OPT": rule},
            max_child_quantity=Decimal(max_child),
            max_rejects=None,
            reprice=REPRICE,
        )
        self._tick()

    # -- helpers -------------------------------------------------------------------------------

    def _bid(self) -> float:
        return round(self.market - HALF_SPREAD, 2)

    def _ask(self) -> float:
        return round(self.market + HALF_SPREAD, 2)

    def _tick(self) -> None:
        """The guard hears the market as it is now."""
        self.feed = ClosePrices(
            bid=PricePoint(self._bid(), self.now),
            ask=PricePoint(self._ask(), self.now),
            last=PricePoint(self.market, self.now),
        )

    def _observation(self) -> Observation:
        position = ConfirmedPosition(
            key=KEY,
            symbol="OPT1",
            sec_type="OPT",
            exchange="SMART",
            currency="USD",
            quantity=Decimal(self.figure),
            price=100.0,
            fx_rate=1.0,
            prices=self.feed,
        )
        return Observation(
            now=self.now,
            generation=1,
            synced_since=0.0,
            executions_complete=True,
            positions={KEY: Held(position, self.figure_at)},
            orders=dict(self.reports),
            fills=list(self.fills),
            positions_listed_asked=self.listed_asked,
        )

    def _u(self, quantity: int | Decimal) -> Decimal:
        return Decimal(quantity) if self.start > 0 else -Decimal(quantity)

    def _live_at_broker(self) -> list[int]:
        return sorted(oid for oid, order in self.broker.items() if order.status == LIVE)

    def _fill(self, order_id: int, quantity: int) -> None:
        order = self.broker[order_id]
        order.filled += quantity
        if order.filled == order.quantity:
            order.status = "Filled"
        signed = quantity if order.action is Side.BUY else -quantity
        self.true_position += signed
        self.events[order_id].append((order.status, order.filled))
        exec_id = f"e{self.next_exec}"
        self.next_exec += 1
        self.exec_queue.append(
            Fill(exec_id, OURS, order_id, 0, KEY, Decimal(signed), self.now, True)
        )
        self.position_queue.append(self.true_position)

    def _marketable(self, order: BrokerOrder) -> bool:
        if order.limit is None:
            return True
        if order.action is Side.SELL:
            return order.limit <= self._bid()
        return order.limit >= self._ask()

    def _round(self, budget: int) -> None:
        """One close round, carried out as the executor does: cancels, then new children."""
        result = self.episode.step(self._observation(), self.policy, budget)
        cancelling = any(
            c.live and c.reprice_at is not None for c in self.episode.children.values()
        )
        if cancelling:
            assert result.orders == (), "a new child while one is being cancelled for a re-price"
        for fact in result.records:
            if fact.kind in ("close_child_reprice_cancel", "close_child_repriced"):
                event(fact.kind)  # shown by --hypothesis-show-statistics
        if result.refresh_positions and self.refresh_asked is None:
            self.refresh_asked = self.now
        for cancel in result.cancels:
            self.episode.cancel_sent(cancel, 1, self.now)
            self.broker[cancel.order_id].cancel_asked = True
        for order in result.orders:
            assert order.step >= self.highest_step, "a child stepped back down the escalation"
            self.highest_step = order.step
            if order.order_type is OrderType.LMT:
                basis = order.basis
                assert basis is not None and order.limit_price is not None
                point = self.feed.get(basis.source)
                assert point is not None and point.price == basis.price
                assert self.now - point.received <= REPRICE.max_price_age_s, "stale basis"
                collar = collar_at(order.step, 0.01, REPRICE)
                sell = order.action is Side.SELL
                assert order.limit_price == marketable_limit(
                    basis.price, sell=sell, collar=collar, min_tick=TICK
                )
            else:
                assert self.allow_market
            limit = order.limit_price if order.order_type is OrderType.LMT else None
            order_id = self.next_order_id
            self.next_order_id += 1
            self.episode.add_child(order, order_id, 1, self.now)
            self.broker[order_id] = BrokerOrder(order.action, int(order.quantity), limit)
            self.events[order_id] = deque([(LIVE, 0)])

    def _deliver_all(self) -> None:
        for order_id, queue in self.events.items():
            while queue:
                self._apply(order_id, *queue.popleft())
        self.fills.extend(self.exec_queue)
        self.exec_queue.clear()
        self.position_queue.clear()
        self.figure, self.figure_at = self.true_position, self.now
        if self.refresh_asked is not None:
            self.listed_asked, self.refresh_asked = self.refresh_asked, None

    def _apply(self, order_id: int, status: str, filled: int) -> None:
        self.reports[order_id] = OrderReport(order_id, 1000 + order_id, status, Decimal(filled))

    # -- rules ---------------------------------------------------------------------------------

    @rule(budget=st.integers(0, 2))
    def close_round(self, budget: int) -> None:
        self._round(budget)

    @rule(seconds=st.sampled_from([0.5, 2.0, 4.0, 6.0, 10.0, 12.0]))
    def time_passes(self, seconds: float) -> None:
        self.now += seconds

    @rule(fraction=st.sampled_from([-0.3, -0.1, -0.02, 0.02, 0.1, 0.3]))
    def market_moves(self, fraction: float) -> None:
        """The market moves; the guard's feed does not hear of it (frozen or lagging)."""
        self.market = max(1.0, round(self.market * (1 + fraction), 2))

    @rule()
    def feed_ticks(self) -> None:
        self._tick()

    @precondition(lambda self: bool(self._live_at_broker()))
    @rule(data=st.data())
    def broker_matches(self, data: st.DataObject) -> None:
        marketable = [r for r in self._live_at_broker() if self._marketable(self.broker[r])]
        if not marketable:
            return
        ref = data.draw(st.sampled_from(marketable), label="order")
        self._fill(ref, data.draw(st.integers(1, self.broker[ref].remaining), label="fill"))

    @precondition(lambda self: any(self.broker[r].cancel_asked for r in self._live_at_broker()))
    @rule(data=st.data())
    def broker_cancels(self, data: st.DataObject) -> None:
        asked = [r for r in self._live_at_broker() if self.broker[r].cancel_asked]
        ref = data.draw(st.sampled_from(asked), label="order")
        self.broker[ref].status = "Cancelled"
        self.events[ref].append(("Cancelled", self.broker[ref].filled))

    @precondition(lambda self: any(self.events.values()))
    @rule(data=st.data())
    def order_message_arrives(self, data: st.DataObject) -> None:
        refs = sorted(ref for ref, queue in self.events.items() if queue)
        ref = data.draw(st.sampled_from(refs), label="order")
        self._apply(ref, *self.events[ref].popleft())

    @precondition(lambda self: bool(self.position_queue))
    @rule(data=st.data(), duplicate=st.booleans())
    def position_message_arrives(self, data: st.DataObject, duplicate: bool) -> None:
        index = data.draw(st.integers(0, len(self.position_queue) - 1), label="which update")
        snapshot = self.position_queue[index] if duplicate else self.position_queue.pop(index)
        self.figure, self.figure_at = snapshot, self.now

    @precondition(lambda self: self.refresh_asked is not None)
    @rule()
    def positions_download_arrives(self) -> None:
        """IB answers the positions download asked for: every update it sent before comes first,
        then the position as it is now."""
        self.position_queue.clear()
        self.figure, self.figure_at = self.true_position, self.now
        self.listed_asked, self.refresh_asked = self.refresh_asked, None

    @precondition(lambda self: bool(self.exec_queue))
    @rule(data=st.data())
    def execution_arrives(self, data: st.DataObject) -> None:
        index = data.draw(st.integers(0, len(self.exec_queue) - 1), label="which execution")
        self.fills.append(self.exec_queue.pop(index))

    # -- invariants ----------------------------------------------------------------------------

    @invariant()
    def never_crosses_zero(self) -> None:
        worst = self._u(self.true_position) - sum(
            Decimal(self.broker[ref].remaining) for ref in self._live_at_broker()
        )
        assert worst >= 0, "the live children could cross zero"

    @invariant()
    def one_live_child_without_slicing(self) -> None:
        if self.single_child:
            assert len(self._live_at_broker()) <= 1, "two live children of one position"

    def teardown(self) -> None:
        """Fresh prices, messages delivered, time for re-pricing: the position ends flat."""
        for _ in range(60):
            self._deliver_all()
            self._tick()
            self._round(budget=5)
            for ref in self._live_at_broker():
                order = self.broker[ref]
                if order.cancel_asked:
                    order.status = "Cancelled"
                    self.events[ref].append(("Cancelled", order.filled))
                elif self._marketable(order):
                    self._fill(ref, order.remaining)
            self.never_crosses_zero()
            self.one_live_child_without_slicing()
            if self.true_position == 0 and not self._live_at_broker():
                break
            self.now += REPRICE.reprice_after_s or 0.0
        assert self.true_position == 0, "not flat after re-pricing at fresh prices"
        self._deliver_all()
        self.now += 0.1
        assert self.episode.step(self._observation(), self.policy, 5).at_target, "not confirmed"


RepriceMachine.TestCase.settings = settings(
    max_examples=200,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestRepricing = RepriceMachine.TestCase
