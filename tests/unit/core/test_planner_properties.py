"""Property tests for the flatten planner: never over-flatten under any interleaving of events.

A simulated broker holds the true position and our children; the executor's view (confirmed
position, children's statuses and fills) is fed by two separate streams, delivered late,
duplicated and out of order. After every step the worst case (every live order at the broker
fills) must stay on the near side of the target; once everything is delivered, repeated planning
must reach the target exactly.
"""

from __future__ import annotations

import dataclasses
from collections import deque
from dataclasses import dataclass
from decimal import Decimal

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from guardd.core.events import ConId
from guardd.core.planner import (
    AccountId,
    ChildOrder,
    ChildStatus,
    ClosePolicy,
    ConfirmedPosition,
    NoteKind,
    Plan,
    PositionKey,
    Side,
    close_ledger,
    plan_flatten,
    plan_reduce,
    reduce_targets,
)

KEY = PositionKey(AccountId("DU1"), ConId(1))
DECISION = 1
BROKER_LIVE = "working"


@dataclass
class BrokerOrder:
    """An order as the simulated broker holds it."""

    action: Side
    quantity: int
    filled: int = 0
    status: str = BROKER_LIVE  # working | filled | cancelled | rejected

    @property
    def remaining(self) -> int:
        return self.quantity - self.filled if self.status == BROKER_LIVE else 0


BROKER_TO_CHILD = {
    "working": ChildStatus.WORKING,
    "filled": ChildStatus.FILLED,
    "cancelled": ChildStatus.CANCELLED,
    "rejected": ChildStatus.REJECTED,
}


class FlattenMachine(RuleBasedStateMachine):
    """One position closed by the planner against an adversarial but honest message stream."""

    def __init__(self) -> None:
        super().__init__()
        self.true_position = 0
        self.start_position = 0
        self.target = 0
        self.confirmed = Decimal(0)
        self.position_queue: list[int] = []
        self.broker: dict[str, BrokerOrder] = {}
        self.order_events: dict[str, deque[tuple[str, int]]] = {}
        self.children: dict[str, ChildOrder] = {}
        self.reduce = False
        self.targets: dict[PositionKey, Decimal] = {}
        self.policy = ClosePolicy()

    @initialize(
        start=st.integers(-60, 60).filter(lambda q: q != 0),
        max_child=st.integers(1, 25),
        keep=st.one_of(st.none(), st.sampled_from([0.0, 0.3, 0.5, 0.9, 1.0])),
    )
    def start(self, start: int, max_child: int, keep: float | None) -> None:
        self.true_position = self.start_position = start
        self.confirmed = Decimal(start)
        self.policy = ClosePolicy(max_child_quantity=Decimal(max_child), max_rejects=None)
        self.reduce = keep is not None
        if keep is None:
            self.targets = {KEY: Decimal(0)}
        else:
            self.targets = reduce_targets([self._position()], keep)
        self.target = int(self.targets[KEY])

    # -- helpers -------------------------------------------------------------------------------

    def _position(self) -> ConfirmedPosition:
        return ConfirmedPosition(
            key=KEY,
            symbol="AAA",
            sec_type="FUT",
            exchange="CME",
            currency="USD",
            quantity=self.confirmed,
            price=100.0,
            fx_rate=1.0,
        )

    def _plan(self, budget: int) -> Plan:
        children = list(self.children.values())
        if self.reduce:
            return plan_reduce(
                [self._position()],
                children,
                self.targets,
                self.policy,
                decision_id=DECISION,
                budget=budget,
                now=0.0,
            )
        return plan_flatten(
            [self._position()], children, self.policy, decision_id=DECISION, budget=budget, now=0.0
        )

    def _u(self, quantity: int | Decimal) -> Decimal:
        return Decimal(quantity) if self.start_position > 0 else -Decimal(quantity)

    def _live_at_broker(self) -> list[str]:
        return sorted(ref for ref, order in self.broker.items() if order.status == BROKER_LIVE)

    def _send(self, plan: Plan, reaches: list[bool]) -> None:
        assert len(plan.orders) <= 1  # one position: at most one child a round
        for order, reach in zip(plan.orders, reaches, strict=False):
            expected = Side.SELL if self.start_position > 0 else Side.BUY
            assert order.action is expected
            assert order.order_ref not in self.children
            assert 1 <= order.quantity <= self.policy.max_child_quantity
            self.children[order.order_ref] = ChildOrder(
                key=order.key,
                order_ref=order.order_ref,
                action=order.action,
                quantity=order.quantity,
                filled=Decimal(0),
                status=ChildStatus.PENDING_ACK,
                planned_against=order.planned_against,
            )
            if reach:
                self.broker[order.order_ref] = BrokerOrder(order.action, int(order.quantity))
                self.order_events[order.order_ref] = deque([(BROKER_LIVE, 0)])

    def _apply_order_event(self, ref: str, status: str, filled: int) -> None:
        self.children[ref] = dataclasses.replace(
            self.children[ref], status=BROKER_TO_CHILD[status], filled=Decimal(filled)
        )

    def _fill(self, ref: str, quantity: int) -> None:
        order = self.broker[ref]
        order.filled += quantity
        if order.filled == order.quantity:
            order.status = "filled"
        step = quantity if order.action is Side.BUY else -quantity
        self.true_position += step
        self.order_events[ref].append((order.status, order.filled))
        self.position_queue.append(self.true_position)

    # -- rules ---------------------------------------------------------------------------------

    @rule(budget=st.integers(0, 3), data=st.data())
    def plan_round(self, budget: int, data: st.DataObject) -> None:
        plan = self._plan(budget)
        kinds = {note.kind for note in plan.notes}
        assert NoteKind.OVER_WORKING not in kinds
        assert NoteKind.PAST_TARGET not in kinds
        assert len(plan.orders) <= budget
        reaches = [data.draw(st.booleans(), label="reaches") for _ in plan.orders]
        self._send(plan, reaches)

    @precondition(lambda self: bool(self._live_at_broker()))
    @rule(data=st.data())
    def broker_fills(self, data: st.DataObject) -> None:
        ref = data.draw(st.sampled_from(self._live_at_broker()), label="order")
        quantity = data.draw(st.integers(1, self.broker[ref].remaining), label="fill")
        self._fill(ref, quantity)

    @precondition(lambda self: bool(self._live_at_broker()))
    @rule(data=st.data(), reject=st.booleans())
    def broker_rejects_or_cancels(self, data: st.DataObject, reject: bool) -> None:
        ref = data.draw(st.sampled_from(self._live_at_broker()), label="order")
        order = self.broker[ref]
        order.status = "rejected" if reject and order.filled == 0 else "cancelled"
        self.order_events[ref].append((order.status, order.filled))

    @precondition(lambda self: any(self.order_events.values()))
    @rule(data=st.data())
    def order_event_arrives(self, data: st.DataObject) -> None:
        refs = sorted(ref for ref, queue in self.order_events.items() if queue)
        ref = data.draw(st.sampled_from(refs), label="order")
        status, filled = self.order_events[ref].popleft()  # one order's messages stay in order
        self._apply_order_event(ref, status, filled)

    @precondition(lambda self: bool(self.position_queue))
    @rule(data=st.data(), duplicate=st.booleans())
    def position_update_arrives(self, data: st.DataObject, duplicate: bool) -> None:
        index = data.draw(st.integers(0, len(self.position_queue) - 1), label="which update")
        snapshot = self.position_queue[index] if duplicate else self.position_queue.pop(index)
        self.confirmed = Decimal(snapshot)

    @rule(fresh_positions=st.booleans())
    def reconnect(self, fresh_positions: bool) -> None:
        """Old connection's messages are lost; open and completed orders are downloaded again."""
        for queue in self.order_events.values():
            queue.clear()
        for ref, child in self.children.items():
            order = self.broker.get(ref)
            if order is not None:
                self._apply_order_event(ref, order.status, order.filled)
            elif child.status is ChildStatus.PENDING_ACK:  # never reached the broker: lost
                self.children[ref] = dataclasses.replace(child, status=ChildStatus.CANCELLED)
        if fresh_positions:
            self.position_queue.append(self.true_position)

    @rule()
    def quiesce_then_reach_target(self) -> None:
        self._quiesce_and_converge()

    # -- invariants ----------------------------------------------------------------------------

    @invariant()
    def never_over_flattens(self) -> None:
        worst = self._u(self.true_position) - sum(
            Decimal(self.broker[ref].remaining) for ref in self._live_at_broker()
        )
        assert worst >= self._u(self.target) >= 0, "the live children could cross the target"

    @invariant()
    def projection_is_a_lower_bound(self) -> None:
        ledger = close_ledger(self.confirmed, list(self.children.values()))
        assert ledger is not None
        if ledger.direction == 0:
            return
        worst = self._u(self.true_position) - sum(
            Decimal(self.broker[ref].remaining) for ref in self._live_at_broker()
        )
        assert self._u(ledger.projected) <= worst

    def _quiesce_and_converge(self) -> None:
        plan = self._plan(budget=0)
        for _ in range(200):
            self.reconnect(fresh_positions=False)
            for ref in self._live_at_broker():
                self._fill(ref, self.broker[ref].remaining)
            self.never_over_flattens()
            for ref, queue in self.order_events.items():
                while queue:
                    self._apply_order_event(ref, *queue.popleft())
            self.position_queue.clear()
            self.confirmed = Decimal(self.true_position)
            plan = self._plan(budget=5)
            if not plan.orders:
                break
            self._send(plan, [True] * len(plan.orders))
        assert self.true_position == self.target
        assert self.confirmed == self.target
        assert KEY in plan.at_target
        assert not plan.notes

    def teardown(self) -> None:
        self._quiesce_and_converge()


FlattenMachine.TestCase.settings = settings(
    max_examples=200,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
test_any_interleaving_then_never_over_flattens_and_converges = FlattenMachine.TestCase
