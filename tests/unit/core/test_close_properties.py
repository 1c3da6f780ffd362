"""Property tests for the close episode (guardd.core.close): never across zero, always flat.

A simulated broker holds the true position of one contract, our children and other actors'
trades. The guard sees it through three streams, each late in its own way: position figures
(delayed up to `POSITION_DELAY_S`, in any order, duplicated, and after a reconnect an old one may
follow a fresh snapshot), executions (own and foreign, slightly late), and our orders' statuses
(in order, late; lost on a reconnect and replaced by the open-order download). Children may not
reach the broker, be filled in parts, be cancelled by someone else; the connection may drop.

Properties, for every interleaving hypothesis finds:
- never across zero: a fill of one of our children never takes the position past zero, except
  by what other actors closed that the guard had not been told of when it sent that child (an
  unavoidable race: nobody can un-send an order in flight);
- always flat: once the other actors stop and every message is delivered, repeated rounds reach
  zero, confirmed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from decimal import Decimal

from hypothesis import HealthCheck, example, given, settings
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
    NewChildOrder,
    PositionKey,
    Side,
)

KEY = PositionKey(AccountId("DU1"), ConId(1))
OUR_CLIENT = 0
POSITION_DELAY_S = 2.0
EXEC_DELAY_S = 0.2
SETTINGS = CloseSettings(client_id=OUR_CLIENT, settle_s=5.0, lost_grace_s=2.0, overdue_s=1e9)


@dataclass
class BrokerOrder:
    order_id: int
    action: Side
    quantity: int
    filled: int = 0
    status: str = "Submitted"
    placed: bool = False
    foreign_closes_seen: int = 0  # what other actors had closed, as the guard knew at sending

    @property
    def working(self) -> bool:
        return self.placed and self.status == "Submitted"

    @property
    def sign(self) -> int:
        return 1 if self.action is Side.BUY else -1


@dataclass
class World:
    """The broker's truth and the guard's late view of it."""

    true: int
    now: float = 1000.0
    generation: int = 1
    synced_since: float = 1000.0
    orders: dict[int, BrokerOrder] = field(default_factory=dict)
    next_order_id: int = 100
    next_exec: int = 1
    # messages in flight: (deliver at, payload)
    position_msgs: list[tuple[float, int]] = field(default_factory=list)
    exec_msgs: list[tuple[float, Fill]] = field(default_factory=list)
    status_msgs: list[tuple[float, OrderReport]] = field(default_factory=list)
    # the guard's view
    figure: int = 0
    figure_at: float = 1000.0
    reports: dict[int, OrderReport] = field(default_factory=dict)
    fills: list[Fill] = field(default_factory=list)
    foreign_closes: int = 0  # how much other actors closed, in total
    foreign_closes_seen: int = 0  # ... of which the guard was told (executions delivered)
    foreign_pending: dict[str, int] = field(default_factory=dict)  # execId -> closing part
    crossings: list[tuple[int, int, int]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.figure = self.true

    # ---- the broker -------------------------------------------------------------------------

    def _trade(self, quantity: int, *, client: int, order_id: int, delay: float) -> None:
        exec_id = f"e{self.next_exec}"
        self.next_exec += 1
        fill = Fill(
            exec_id=exec_id,
            client_id=client,
            order_id=order_id,
            perm_id=0,
            key=KEY,
            quantity=Decimal(quantity),
            ts=self.now + delay,
            live=True,
        )
        self.true += quantity
        self.exec_msgs.append((self.now + delay, fill))

    def position_changed(self, delay: float, copies: int) -> None:
        for _ in range(copies):
            self.position_msgs.append((self.now + delay, self.true))

    def own_fill(self, order: BrokerOrder, quantity: int, delays: tuple[float, float]) -> None:
        before = self.true
        after = before + order.sign * quantity
        crossed = abs(after) if (before > 0 > after or before < 0 < after) else 0
        if before == 0:
            crossed = quantity
        allowed = self.foreign_closes - order.foreign_closes_seen
        if crossed > allowed:
            self.crossings.append((before, after, allowed))
        order.filled += quantity
        if order.filled == order.quantity:
            order.status = "Filled"
        self._trade(order.sign * quantity, client=OUR_CLIENT, order_id=order.order_id, delay=0)
        self.exec_msgs[-1] = (self.now + delays[0], self.exec_msgs[-1][1])
        self._status(order, delays[1])

    def foreign_fill(self, quantity: int, delay: float) -> None:
        closing = 0
        if self.true and (quantity > 0) != (self.true > 0):
            closing = min(abs(quantity), abs(self.true))
        self.foreign_closes += closing
        self._trade(quantity, client=7, order_id=5, delay=delay)
        self.foreign_pending[self.exec_msgs[-1][1].exec_id] = closing

    def _status(self, order: BrokerOrder, delay: float) -> None:
        report = OrderReport(order.order_id, 0, order.status, Decimal(order.filled))
        self.status_msgs.append((self.now + delay, report))

    def arrive(self) -> None:
        """Sends in flight reach the broker (on a connection that stayed up, they all do)."""
        for order in self.orders.values():
            if not order.placed and order.status == "Submitted":
                order.placed = True
                self._status(order, 0.05)

    def cancel(self, order: BrokerOrder, delay: float) -> None:
        if order.working:
            order.status = "Cancelled"
            self._status(order, delay)

    # ---- the guard's view ---------------------------------------------------------------------

    def deliver(self, everything: bool = False) -> None:
        due = math.inf if everything else self.now
        # Figures come in the order they were made (each may be late): the last one made is
        # the last one received, whatever a reconnect's snapshot said in between.
        while self.position_msgs and (everything or self.position_msgs[0][0] <= due):
            _, self.figure = self.position_msgs.pop(0)
            self.figure_at = self.now
        for at, fill in sorted(self.exec_msgs, key=lambda m: m[0]):
            if at <= due:
                self.fills.append(fill)
                self.foreign_closes_seen += self.foreign_pending.pop(fill.exec_id, 0)
        self.exec_msgs = [(at, f) for at, f in self.exec_msgs if at > due]
        keep_status: list[tuple[float, OrderReport]] = []
        for at, report in self.status_msgs:  # in order, per connection
            if at <= due and not keep_status:
                self.reports[report.order_id] = report
            else:
                keep_status.append((at, report))
        self.status_msgs = keep_status

    def reconnect(self, stale_snapshot: bool) -> None:
        """The connection drops and comes back: sends in flight never arrive, statuses of the
        old connection are lost, the downloads (open orders, executions, positions) replace
        them; position figures still in flight may arrive after the fresh snapshot."""
        self.generation += 1
        for order in self.orders.values():
            if not order.placed and order.status == "Submitted":
                order.status = "Never"
        self.status_msgs.clear()
        self.reports = {
            o.order_id: OrderReport(o.order_id, 0, o.status, Decimal(o.filled))
            for o in self.orders.values()
            if o.working
        }
        for _, fill in self.exec_msgs:
            self.fills.append(fill)
            self.foreign_closes_seen += self.foreign_pending.pop(fill.exec_id, 0)
        self.exec_msgs.clear()
        oldest = min(self.position_msgs, default=None)
        self.figure = oldest[1] if stale_snapshot and oldest is not None else self.true
        self.figure_at = self.now
        self.synced_since = self.now

    def observation(self) -> Observation:
        position = ConfirmedPosition(
            key=KEY,
            symbol="AAA",
            sec_type="FUT",
            exchange="CME",
            currency="USD",
            quantity=Decimal(self.figure),
            price=100.0,
            fx_rate=1.0,
        )
        return Observation(
            now=self.now,
            generation=self.generation,
            synced_since=self.synced_since,
            executions_complete=True,
            positions={KEY: Held(position, self.figure_at)},
            orders=dict(self.reports),
            fills=list(self.fills),
        )

    def carry_out(self, episode: CloseEpisode | _Twins, plan: Round, reach: bool) -> None:
        for cancel in plan.cancels:
            episode.cancel_sent(cancel, self.generation, self.now)
            order = self.orders.get(cancel.order_id)
            if order is not None:
                self.cancel(order, 0.1)
        for new in plan.orders:
            order_id = self.next_order_id
            self.next_order_id += 1
            episode.add_child(new, order_id, self.generation, self.now)
            order = BrokerOrder(
                order_id,
                new.action,
                int(new.quantity),
                placed=reach,
                foreign_closes_seen=self.foreign_closes_seen,
            )
            self.orders[order_id] = order
            if reach:
                self._status(order, 0.05)


OPS = st.one_of(
    st.tuples(st.just("tick"), st.floats(0.0, 1.5)),
    st.tuples(st.just("step"), st.booleans()),
    st.tuples(st.just("fill"), st.integers(0, 5), st.floats(0.01, 1.0), st.booleans()),
    st.tuples(st.just("foreign"), st.integers(-40, 40).filter(bool), st.booleans()),
    st.tuples(st.just("liquidate"), st.integers(1, 40)),
    st.tuples(
        st.just("arrive"),
    ),
    st.tuples(st.just("cancel_other"), st.integers(0, 5)),
    st.tuples(st.just("reconnect"), st.booleans()),
)


class _Unhurried(CloseEpisode):
    """The episode without its shortcut for settled flat positions: every position takes the
    full path every round."""

    def _settled_flat(self, *args: object) -> bool:
        return False


class _Twins:
    """The episode and an `_Unhurried` twin fed the same: every round of theirs must be the
    same (the shortcut for a settled flat position changes nothing but the round's cost)."""

    def __init__(self, start: float) -> None:
        self.quick = CloseEpisode("flatten", 1, start, SETTINGS)
        self.full = _Unhurried("flatten", 1, start, SETTINGS)

    @property
    def at_target(self) -> bool:
        return self.quick.at_target

    def step(self, obs: Observation, policy: ClosePolicy, budget: int) -> Round:
        quick = self.quick.step(obs, policy, budget)
        assert self.full.step(obs, policy, budget) == quick
        return quick

    def add_child(self, order: NewChildOrder, order_id: int, generation: int, now: float) -> None:
        self.quick.add_child(order, order_id, generation, now)
        self.full.add_child(order, order_id, generation, now)

    def cancel_sent(self, cancel: Cancel, generation: int, now: float) -> None:
        self.quick.cancel_sent(cancel, generation, now)
        self.full.cancel_sent(cancel, generation, now)


def _play(start: int, max_child: int, ops: list[tuple[object, ...]], foreign: bool) -> None:
    world = World(true=start)
    episode = _Twins(world.now)
    policy = ClosePolicy(max_child_quantity=Decimal(max_child), max_rejects=None)
    delays = iter([0.0, 0.3, 1.9, 0.7, 1.2, 0.05] * 1000)
    for op in ops:
        match op:
            case ("tick", float(dt)):
                world.now += dt
                world.deliver()
            case ("step", bool(reach)):
                plan = episode.step(world.observation(), policy, budget=2)
                world.carry_out(episode, plan, reach)
            case ("fill", int(i), float(frac), bool(slow)):
                working = [o for o in world.orders.values() if o.working]
                if working:
                    order = working[i % len(working)]
                    quantity = max(1, math.ceil((order.quantity - order.filled) * frac))
                    lag = (next(delays) if slow else 0.0, next(delays) if slow else 0.0)
                    world.own_fill(order, quantity, lag)
                    world.position_changed(next(delays), 1 + (i % 2))
            case ("foreign", int(quantity), bool(slow)) if foreign:
                world.foreign_fill(quantity, EXEC_DELAY_S if slow else 0.0)
                world.position_changed(next(delays), 1)
            case ("liquidate", int(quantity)) if foreign and world.true:
                quantity = min(quantity, abs(world.true))
                world.foreign_fill(-quantity if world.true > 0 else quantity, 0.0)
                world.position_changed(next(delays), 1)
            case ("arrive",):
                world.arrive()
            case ("cancel_other", int(i)):
                working = [o for o in world.orders.values() if o.working]
                if working:
                    world.cancel(working[i % len(working)], 0.1)
            case ("reconnect", bool(stale)):
                world.reconnect(stale)
            case _:
                pass
        assert not world.crossings, world.crossings

    # The other actors stop; the broker delivers everything and fills what works.
    for _ in range(200):  # one child per position per round
        world.arrive()
        world.now += 0.5
        world.deliver(everything=True)
        plan = episode.step(world.observation(), policy, budget=2)
        world.carry_out(episode, plan, reach=True)
        for order in world.orders.values():
            if order.working:
                world.own_fill(order, order.quantity - order.filled, (0.0, 0.0))
                world.position_changed(0.0, 1)
        world.now += SETTINGS.settle_s + 0.1
        world.deliver(everything=True)
        assert not world.crossings, world.crossings
        if episode.step(world.observation(), policy, budget=2).at_target and world.true == 0:
            break
    assert world.true == 0, f"not flat: {world.true}"
    assert episode.at_target
    assert not world.crossings


SLOW = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@SLOW
@given(
    start=st.integers(-60, 60).filter(bool),
    max_child=st.integers(1, 70),
    ops=st.lists(OPS, max_size=60),
)
def test_only_our_children_trade_then_never_across_zero_and_flat(
    start: int, max_child: int, ops: list[tuple[object, ...]]
) -> None:
    _play(start, max_child, ops, foreign=False)


@SLOW
@given(
    start=st.integers(-60, 60),
    max_child=st.integers(1, 70),
    ops=st.lists(OPS, max_size=60),
)
# A foreign fill whose execution arrives after the figure that already holds it: the fills then
# say flat while the broker keeps saying 1. The episode waited for ever (exposure left while
# HALTED); it now adopts the farther figure after a long quiet.
@example(start=2, max_child=1, ops=[("foreign", -1, True), ("tick", 0.0), ("step", False)])
def test_other_actors_trade_then_never_across_zero_by_our_doing_and_flat(
    start: int, max_child: int, ops: list[tuple[object, ...]]
) -> None:
    _play(start, max_child, ops, foreign=True)
