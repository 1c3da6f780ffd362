"""The flatten and reduce planner: which child orders to send now to close positions.

A pure function of what the executor knows (broker-confirmed positions and our own close children,
known by identity: our client id and the order ids we allocated; their orderRef `guardd:flatten:`
or `guardd:reduce:` is a label, never a key) and a policy; it returns a
`Plan` of new child orders and notes. It never sends, cancels, reads a clock or logs.

The invariant: guardd never over-flattens. For each position, whatever filled and whatever still
works in our close children can at most bring the position to its target (0 for flatten), never
past it, never across zero.

Why this is hard. The confirmed position and our children's fill counts arrive on separate streams
and in any order: a fill may be reported before or after the position update that contains it, a
position update may be late or duplicated, so the position we hold may even be an older snapshot
than one we saw before. Adding "confirmed position" and "what our children filled" double counts
when the position already contains the fills; subtracting only working quantity forgets fills the
position does not show yet. Either mistake sends a second close for the same shares.

The bookkeeping. Work in closing units u(x) = d·x, where d = +1 when closing a long (SELL) and -1
when closing a short (BUY), so closing always lowers u. Let P0 be the position before any of our
children filled. Every snapshot of the position is P0 minus the fills it already contains, so
u(snapshot) <= u(P0) for every snapshot, current or stale, in any order of arrival. Each child
records `planned_against`, the confirmed position when it was planned: a snapshot too. Hence

    origin = max(u(confirmed), u(planned_against) for every child)  <=  u(P0)

is a lower bound of the position before our closes, whichever messages are late. Our children
will, at most, take away

    committed = sum(quantity of live children) + sum(filled of finished children)

(a live child may still fill completely; a finished one filled exactly what it reports; fill
counts of live children are not needed at all). So after every live child fills, the position
is u(P0) - committed >= origin - committed =: projected. The planner only sends while projected
is above the target, and only as much as brings projected down to the target, so the position can
at most reach the target. This is the rule "count a child's fills as already in the
position only when the confirmed position has moved past its baseline by that much", applied to
all children at once: origin - u(confirmed) is exactly the fill the position provably contains.
When unsure it assumes the worst: a stale position raises nothing above u(P0), a fill not seen
yet is counted through the child's full quantity, an unknown baseline is left out of origin.

It converges: once every event is delivered, confirmed = P0 - fills and the first child's
baseline is P0, so projected = u(confirmed) and repeated planning closes exactly to the target.
Between events projected only rises (a cancel or reject frees its unfilled part, a position
update can only raise the max), so the planner never causes "over_working"; the note exists for
the executor to cancel when the world disagrees (another actor traded, a bad baseline).

What the executor must do for this to hold:
- Pass every one of our close children for the position since the episode (the kill or reduce
  decision) began, finished ones included, and never drop one within the episode: dropping a
  finished child lowers `committed` while a stale position update can still raise origin.
- Record `planned_against` from `NewChildOrder.planned_against` and keep it across restarts (the
  journal): a child known without it (e.g. sent on an earlier connection) is left out of origin,
  which is safe but leaves the planner short of the target until an operator looks (note
  `unknown_baseline`).
- Mark a send "lost" only when the broker provably never had it; until then it is pending and
  blocks new children for its position (no duplicates across reconnects).
- Report a finished child's final filled quantity.
The bound assumes our children are the only ones closing the position during the episode (the
kill has cancelled everything else and keeps sweeping). Another actor closing the same position
at the same time can make the guard close too much by up to that actor's quantity: with only a
position and fill counts, their close and our unconfirmed fill look the same.

Ordering: largest exposure first, |quantity × price × multiplier × fx| in the base currency. A
position whose exposure is unknown (no price, NaN, no exchange rate) sorts first: an unvalued
position is not a small one, and the guard must not leave it for last. Ties go to the larger
quantity, then the key, so a plan is deterministic. One new child per position per round, at most
`max_child_quantity` each, whole units; the budget caps new orders this round.

Prices (`guardd.core.pricing`): a limit is derived only from a price no older than
`max_price_age_s` at `now`; without one the close is a market order where the class allows it,
else the position gets no child (note `stale_price` / `no_price`) until a fresh price arrives.
`steps` names each position's escalation step (0: the class's own order); which children stalled,
when their replacement may go and at which step is the close episode's decision
(`guardd.core.close`), the planner only prices at the step it is given.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from decimal import ROUND_CEILING, ROUND_FLOOR, Decimal
from enum import StrEnum
from typing import Literal, NewType

from guardd.core import pricing
from guardd.core.events import ConId

AccountId = NewType("AccountId", str)

ZERO = Decimal(0)
ONE = Decimal(1)
ORDER_REF_PREFIX = "guardd:"
"""The label on our close orders, `guardd:<kind>:<decision_id>:<n>`: for people, never an ownership
key (`Book.is_own` is by client id and order id). Composed by `order_ref_prefix`, read back by
`sequence_of`; the one definition."""
FX_MAX_CHILD_QUANTITY = Decimal(10_000_000)  # an FX close child, in the pair's base currency


@dataclass(frozen=True, slots=True, order=True)
class PositionKey:
    """One position: an account and a contract (IB conId)."""

    account: AccountId
    con_id: ConId


class Side(StrEnum):
    """The side of an order: what IB's Order.action holds (the `action` field of a child order;
    not the engine's actions, nor a control command)."""

    BUY = "BUY"
    SELL = "SELL"


class OrderType(StrEnum):
    """The order types the planner sends."""

    MKT = "MKT"
    LMT = "LMT"


CloseKind = Literal["flatten", "reduce"]
"""What a close episode and its children are for (the second field of a child's orderRef):
flatten closes every position (a kill in mode "flatten"), reduce brings exposure down."""


class ChildStatus(StrEnum):
    """What the executor knows of one of our close children."""

    PENDING_ACK = "pending_ack"  # sent, not acknowledged yet (may or may not reach the broker)
    WORKING = "working"
    FILLED = "filled"
    CANCELLED = "cancelled"
    REJECTED = "rejected"


LIVE_STATUSES = frozenset({ChildStatus.PENDING_ACK, ChildStatus.WORKING})


@dataclass(frozen=True, slots=True)
class ConfirmedPosition:
    """A position as the broker last confirmed it, with what the planner needs to close it.

    `quantity` is signed (short < 0). `price` is the last or mark price in the contract's currency,
    None or NaN when unknown; `fx_rate` converts that currency to the account's base currency,
    None when unknown. `regular_hours` says whether the contract is in its regular session now,
    `market_open` whether it trades at all now (a closed market gets no child: it waits)
    (the executor knows the clock and the trading hours; the planner does not).

    `price` only ranks positions by exposure; a close limit is derived from `prices`, each with
    the time it was received, and only from a fresh one (`guardd.core.pricing`).
    """

    key: PositionKey
    symbol: str
    sec_type: str
    exchange: str
    currency: str
    quantity: Decimal
    price: float | None
    fx_rate: float | None
    multiplier: float = 1.0
    min_tick: Decimal = Decimal("0.01")
    regular_hours: bool = True
    market_open: bool = True
    prices: pricing.ClosePrices = field(default_factory=pricing.ClosePrices)


@dataclass(frozen=True, slots=True)
class ChildOrder:
    """One of our own close children, as the executor knows it.

    `planned_against` is the confirmed position quantity the child was planned against
    (`NewChildOrder.planned_against`), None when lost (e.g. a child sent on an earlier connection
    or by a previous process). For a finished child `filled` is final.
    """

    key: PositionKey
    order_ref: str
    action: Side
    quantity: Decimal
    filled: Decimal
    status: ChildStatus
    planned_against: Decimal | None

    def __post_init__(self) -> None:
        if not (self.quantity.is_finite() and self.filled.is_finite()):
            raise ValueError(f"child {self.order_ref}: quantities must be finite")
        if self.quantity <= 0 or not ZERO <= self.filled <= self.quantity:
            raise ValueError(f"child {self.order_ref}: need 0 <= filled <= quantity, quantity > 0")

    @property
    def live(self) -> bool:
        """Whether the child may still fill."""
        return self.status in LIVE_STATUSES


@dataclass(frozen=True, slots=True)
class OrderTypeRule:
    """How to close one asset class: market, or a marketable limit `collar` away from the price.

    Outside regular hours the close is a limit order with outsideRth when `limit_outside_rth`
    (always for stocks: IB rejects their market orders outside regular hours).

    `allow_market`: a market order may replace a limit when no price is fresh or when the
    re-pricing escalation reaches a market step. None: allowed when the class closes with a
    market order in some session (`order_type` MKT, or market outside regular hours).

    `max_child_quantity`: this class's own cap on one child, in its quantity units (for FX the
    pair's base currency), instead of the policy's; None: the policy's.
    """

    order_type: OrderType
    collar: float = 0.02
    limit_outside_rth: bool = True
    allow_market: bool | None = None
    max_child_quantity: Decimal | None = None

    def __post_init__(self) -> None:
        if not 0.0 <= self.collar < 1.0:
            raise ValueError(f"collar must be in [0, 1), got {self.collar}")
        cap = self.max_child_quantity
        if cap is not None and not (cap.is_finite() and cap >= ONE):
            raise ValueError("max_child_quantity must be at least 1")

    @property
    def market_allowed(self) -> bool:
        """Whether this class accepts a market order as fallback or escalation step."""
        if self.allow_market is not None:
            return self.allow_market
        return self.order_type is OrderType.MKT or not self.limit_outside_rth


def default_order_types() -> dict[str, OrderTypeRule]:
    """Safe defaults per IB secType: market in regular hours where liquid, limits elsewhere."""
    return {
        "STK": OrderTypeRule(OrderType.MKT, collar=0.02, limit_outside_rth=True),
        "FUT": OrderTypeRule(OrderType.MKT, collar=0.01, limit_outside_rth=False),
        # FX: one child up to 10 M of the pair's base currency, so a position above the IDEALPRO
        # minimum is not cut into odd lots (IB: USD 25,000 or its equivalent)
        "CASH": OrderTypeRule(
            OrderType.MKT,
            collar=0.005,
            limit_outside_rth=False,
            max_child_quantity=FX_MAX_CHILD_QUANTITY,
        ),
        "OPT": OrderTypeRule(OrderType.LMT, collar=0.10, limit_outside_rth=True),
        "FOP": OrderTypeRule(OrderType.LMT, collar=0.10, limit_outside_rth=True),
    }


@dataclass(frozen=True, slots=True)
class ClosePolicy:
    """How to close: order type per secType, child size, and when to stop re-sending after rejects.

    `max_rejects` None never gives up; otherwise a position with that many rejected children gets
    no new one (note `rejected_too_often`) until an operator acts. `reprice`: how fresh a price a
    limit needs and how a close that does not fill escalates (`guardd.core.pricing`).
    """

    order_types: Mapping[str, OrderTypeRule] = field(default_factory=default_order_types)
    fallback: OrderTypeRule = OrderTypeRule(OrderType.LMT, collar=0.02, allow_market=False)
    max_child_quantity: Decimal = Decimal(10_000)
    max_rejects: int | None = 3
    reprice: pricing.RepricePolicy = field(default_factory=pricing.RepricePolicy)

    def __post_init__(self) -> None:
        if not (self.max_child_quantity.is_finite() and self.max_child_quantity >= ONE):
            raise ValueError("max_child_quantity must be at least 1")

    def rule_for(self, sec_type: str) -> OrderTypeRule:
        """The order type rule for a secType, or the fallback."""
        return self.order_types.get(sec_type, self.fallback)


@dataclass(frozen=True, slots=True)
class NewChildOrder:
    """A close child to send now. The executor records `planned_against` with it.

    `step` is its escalation step; a limit's `basis` is the fresh price it was derived from.
    """

    key: PositionKey
    symbol: str
    action: Side
    quantity: Decimal
    order_type: OrderType
    limit_price: float | None
    outside_rth: bool
    order_ref: str
    planned_against: Decimal
    step: int = 0
    basis: pricing.Basis | None = None


class NoteKind(StrEnum):
    """Why a position got no child, or what the executor should do about it."""

    NO_PRICE = "no_price"  # a limit order is required and there is no usable price: skipped
    STALE_PRICE = "stale_price"  # a limit is required and every price is too old: skipped
    REPRICING = "repricing"  # (close episode) a child is being cancelled for a re-price: no new one
    OVER_WORKING = "over_working"  # live children exceed what is needed: cancel `quantity`
    PAST_TARGET = "past_target"  # nothing live, yet fills say the position ends past its target
    AWAITING_ACK = "awaiting_ack"  # an unacknowledged send exists: no new child for it
    BUDGET_EXHAUSTED = "budget_exhausted"  # needs a child; next round
    FRACTIONAL_REMAINDER = "fractional_remainder"  # less than one unit left: not closable here
    MIXED_CHILDREN = "mixed_children"  # our children both buy and sell it: refuse to plan
    UNKNOWN_BASELINE = "unknown_baseline"  # a child without planned_against: planned short
    BAD_QUANTITY = "bad_quantity"  # the confirmed quantity is not a finite number
    NO_TARGET = "no_target"  # reduce without a target for this position
    TARGET_CLAMPED = "target_clamped"  # the target was across zero: 0 used instead
    REJECTED_TOO_OFTEN = "rejected_too_often"
    NO_POSITION = "no_position"  # children for a position the executor did not pass
    MARKET_CLOSED = "market_closed"  # the contract's market is closed: no child until it opens


@dataclass(frozen=True, slots=True)
class Note:
    """A finding about one position; `quantity` where a quantity says more (e.g. to cancel)."""

    key: PositionKey
    kind: NoteKind
    quantity: Decimal = ZERO


@dataclass(frozen=True, slots=True)
class Plan:
    """New child orders in sending order, notes, and the positions confirmed at their target."""

    orders: tuple[NewChildOrder, ...]
    notes: tuple[Note, ...]
    at_target: tuple[PositionKey, ...]


@dataclass(frozen=True, slots=True)
class CloseLedger:
    """The close bookkeeping of one position, in closing units (see the module docstring).

    `direction` is +1 when closing a long (SELL), -1 when closing a short (BUY), 0 when there is
    nothing to close and no child. `projected` is the signed position that remains, at least, once
    every live child has filled.
    """

    direction: int
    origin: Decimal
    committed: Decimal
    projected: Decimal
    live_remaining: Decimal
    pending_ack: int
    rejected: int
    unknown_baselines: int


def close_ledger(quantity: Decimal, children: Sequence[ChildOrder]) -> CloseLedger | None:
    """The ledger of one position from its confirmed quantity and all our close children for it.

    None when the children both buy and sell (the planner refuses to reason about that).
    """
    actions = {child.action for child in children}
    if len(actions) > 1:
        return None
    if actions:
        direction = 1 if actions == {Side.SELL} else -1
    else:
        direction = (quantity > 0) - (quantity < 0)
    sign = Decimal(direction)
    origin = sign * quantity
    committed = ZERO
    live_remaining = ZERO
    pending_ack = rejected = unknown = 0
    for child in children:
        if child.planned_against is None:
            unknown += 1
        else:
            origin = max(origin, sign * child.planned_against)
        if child.live:
            committed += child.quantity
            live_remaining += child.quantity - child.filled
        else:
            committed += child.filled
        pending_ack += child.status is ChildStatus.PENDING_ACK
        rejected += child.status is ChildStatus.REJECTED
    return CloseLedger(
        direction=direction,
        origin=origin,
        committed=committed,
        projected=sign * (origin - committed),
        live_remaining=live_remaining,
        pending_ack=pending_ack,
        rejected=rejected,
        unknown_baselines=unknown,
    )


def exposure(position: ConfirmedPosition) -> float | None:
    """|quantity × price × multiplier × fx| in base currency; None when any factor is unknown."""
    factors = (position.price, position.multiplier, position.fx_rate)
    if any(f is None or not math.isfinite(f) for f in factors) or not position.quantity.is_finite():
        return None
    price, multiplier, fx_rate = (float(f) for f in factors if f is not None)
    if fx_rate <= 0:
        return None
    return abs(float(position.quantity) * price * multiplier * fx_rate)


def keep_fraction_for_gross(
    positions: Iterable[ConfirmedPosition], target_gross: float
) -> float | None:
    """The fraction of every position to keep so gross exposure falls to `target_gross`, pro rata.

    1.0 when gross is already at or below the target; None when any exposure is unknown (a reduce
    cannot be sized on a partial picture: that is a data finding for the caller).
    """
    exposures = [exposure(p) for p in positions]
    if any(e is None for e in exposures):
        return None
    gross = math.fsum(e for e in exposures if e is not None)
    if gross <= max(target_gross, 0.0):
        return 1.0
    return max(target_gross, 0.0) / gross


def reduce_targets(
    positions: Iterable[ConfirmedPosition], keep: float
) -> dict[PositionKey, Decimal]:
    """Target quantities keeping `keep` (0..1) of each position, rounded away from zero.

    Rounding away from zero closes less, never more. Compute the targets once per reduce decision
    and pass the same targets every round: re-deriving them from a shrinking position would reduce
    again and again.
    """
    fraction = Decimal(repr(min(max(keep, 0.0), 1.0)))
    targets: dict[PositionKey, Decimal] = {}
    for position in positions:
        if not position.quantity.is_finite():
            continue
        size = (abs(position.quantity) * fraction).to_integral_value(rounding=ROUND_CEILING)
        targets[position.key] = min(size, abs(position.quantity)).copy_sign(position.quantity)
    return targets


def plan_flatten(
    positions: Iterable[ConfirmedPosition],
    children: Iterable[ChildOrder],
    policy: ClosePolicy,
    *,
    decision_id: int,
    budget: int,
    now: float,
    sequence_start: int = 1,
    steps: Mapping[PositionKey, int] | None = None,
) -> Plan:
    """Plan this round's flatten children: every position toward 0, largest exposure first.

    `children` are all our close children of the episode (finished ones too); `budget` is the
    number of new orders that may be sent now; `now` judges the age of prices; `steps` the
    escalation step of each position's next child (absent: 0). Order refs are
    `guardd:flatten:<decision_id>:<n>` with n above every n already used by `children` and at
    least `sequence_start`.
    """
    positions = tuple(positions)
    targets = {p.key: ZERO for p in positions}
    return _plan(
        "flatten",
        positions,
        children,
        targets,
        policy,
        decision_id,
        budget,
        sequence_start,
        now,
        steps or {},
    )


def plan_reduce(
    positions: Iterable[ConfirmedPosition],
    children: Iterable[ChildOrder],
    targets: Mapping[PositionKey, Decimal],
    policy: ClosePolicy,
    *,
    decision_id: int,
    budget: int,
    now: float,
    sequence_start: int = 1,
    steps: Mapping[PositionKey, int] | None = None,
) -> Plan:
    """Plan this round's reduce children: each position toward its target quantity.

    Targets come from `reduce_targets` once per decision. A target across zero from the position
    is clamped to 0; a target at or beyond the position needs nothing (a reduce never adds).
    """
    return _plan(
        "reduce",
        tuple(positions),
        children,
        targets,
        policy,
        decision_id,
        budget,
        sequence_start,
        now,
        steps or {},
    )


@dataclass(frozen=True, slots=True)
class _Candidate:
    position: ConfirmedPosition
    exposure: float | None
    action: Side
    quantity: Decimal
    order_type: OrderType
    limit_price: float | None
    outside_rth: bool
    step: int
    basis: pricing.Basis | None

    def sort_key(self) -> tuple[bool, float, Decimal, PositionKey]:
        known = self.exposure is not None
        return (known, -(self.exposure or 0.0), -abs(self.position.quantity), self.position.key)


def _plan(
    kind: CloseKind,
    positions: tuple[ConfirmedPosition, ...],
    children: Iterable[ChildOrder],
    targets: Mapping[PositionKey, Decimal],
    policy: ClosePolicy,
    decision_id: int,
    budget: int,
    sequence_start: int,
    now: float,
    steps: Mapping[PositionKey, int],
) -> Plan:
    by_key: dict[PositionKey, list[ChildOrder]] = defaultdict(list)
    for child in children:
        by_key[child.key].append(child)
    notes: list[Note] = []
    at_target: list[PositionKey] = []
    candidates: list[_Candidate] = []
    seen: set[PositionKey] = set()
    for position in positions:
        seen.add(position.key)
        own = by_key.get(position.key, [])
        step = steps.get(position.key, 0)
        candidate = _assess(position, own, targets, policy, now, step, notes, at_target)
        if candidate is not None:
            candidates.append(candidate)
    notes.extend(Note(key, NoteKind.NO_POSITION) for key in sorted(by_key.keys() - seen))

    prefix = order_ref_prefix(kind, decision_id)
    used = (sequence_of(c.order_ref, prefix) for group in by_key.values() for c in group)
    sequence = max(sequence_start, 1 + max(used, default=0))
    orders: list[NewChildOrder] = []
    for candidate in sorted(candidates, key=_Candidate.sort_key):
        if len(orders) >= budget:
            notes.append(
                Note(candidate.position.key, NoteKind.BUDGET_EXHAUSTED, candidate.quantity)
            )
            continue
        orders.append(
            NewChildOrder(
                key=candidate.position.key,
                symbol=candidate.position.symbol,
                action=candidate.action,
                quantity=candidate.quantity,
                order_type=candidate.order_type,
                limit_price=candidate.limit_price,
                outside_rth=candidate.outside_rth,
                order_ref=f"{prefix}{sequence}",
                planned_against=candidate.position.quantity,
                step=candidate.step,
                basis=candidate.basis,
            )
        )
        sequence += 1
    return Plan(orders=tuple(orders), notes=tuple(notes), at_target=tuple(at_target))


def order_ref_prefix(kind: CloseKind, decision_id: int) -> str:
    """The orderRef of a close child of decision `decision_id` but its sequence number."""
    return f"{ORDER_REF_PREFIX}{kind}:{decision_id}:"


def sequence_of(order_ref: str, prefix: str = ORDER_REF_PREFIX) -> int:
    """The sequence number at the end of a close child's orderRef that starts with `prefix`
    (`order_ref_prefix`, or any of ours by default); 0 when it has none."""
    if not order_ref.startswith(prefix):
        return 0
    tail = order_ref[len(prefix) :].rsplit(":", 1)[-1]
    return int(tail) if tail.isdecimal() else 0


def _assess(
    position: ConfirmedPosition,
    children: Sequence[ChildOrder],
    targets: Mapping[PositionKey, Decimal],
    policy: ClosePolicy,
    now: float,
    step: int,
    notes: list[Note],
    at_target: list[PositionKey],
) -> _Candidate | None:
    """One position's candidate child, or None; appends its notes and whether it is at target."""
    key = position.key
    if not position.quantity.is_finite():
        notes.append(Note(key, NoteKind.BAD_QUANTITY))
        return None
    target = targets.get(key)
    if target is None or not target.is_finite():
        notes.append(Note(key, NoteKind.NO_TARGET))
        return None
    ledger = close_ledger(position.quantity, children)
    if ledger is None:
        notes.append(Note(key, NoteKind.MIXED_CHILDREN))
        return None
    if ledger.unknown_baselines:
        notes.append(Note(key, NoteKind.UNKNOWN_BASELINE, Decimal(ledger.unknown_baselines)))
    if ledger.direction == 0:  # flat, no children
        at_target.append(key)
        return None
    sign = Decimal(ledger.direction)
    target_u = sign * target
    if target_u < 0:
        notes.append(Note(key, NoteKind.TARGET_CLAMPED, target))
        target_u = ZERO
    need = sign * ledger.projected - target_u
    confirmed_u = sign * position.quantity
    live = ledger.live_remaining > 0 or ledger.pending_ack > 0
    if need <= 0:
        if need < 0 and live:
            notes.append(Note(key, NoteKind.OVER_WORKING, min(-need, ledger.live_remaining)))
        elif need < 0 and ledger.committed > 0:
            notes.append(Note(key, NoteKind.PAST_TARGET, -need))
        exact = need == 0 and confirmed_u == target_u
        within = ledger.committed == 0 and ZERO <= confirmed_u <= target_u
        if not live and (exact or within):
            at_target.append(key)
        return None
    if ledger.pending_ack:
        notes.append(Note(key, NoteKind.AWAITING_ACK, need))
        return None
    if policy.max_rejects is not None and ledger.rejected >= policy.max_rejects:
        notes.append(Note(key, NoteKind.REJECTED_TOO_OFTEN, need))
        return None
    if not position.market_open:
        notes.append(Note(key, NoteKind.MARKET_CLOSED, need))
        return None
    rule = policy.rule_for(position.sec_type)
    cap = rule.max_child_quantity or policy.max_child_quantity
    quantity = min(need, cap).to_integral_value(rounding=ROUND_FLOOR)
    if quantity < ONE:
        notes.append(Note(key, NoteKind.FRACTIONAL_REMAINDER, need))
        return None
    action = Side.SELL if ledger.direction > 0 else Side.BUY
    outside_rth = not position.regular_hours
    stock_outside_rth = outside_rth and position.sec_type == "STK"
    use_limit = rule.order_type is OrderType.LMT or (
        outside_rth and (rule.limit_outside_rth or stock_outside_rth)
    )
    priced = pricing.close_price(
        position.prices,
        sell=action is Side.SELL,
        market_first=not use_limit,
        # IB rejects a stock's market order outside regular hours, whatever the policy says.
        market_allowed=rule.market_allowed and not stock_outside_rth,
        base_collar=rule.collar,
        step=step,
        min_tick=position.min_tick,
        now=now,
        policy=policy.reprice,
    )
    if isinstance(priced, pricing.Unpriced):
        kind = NoteKind.STALE_PRICE if priced.stale else NoteKind.NO_PRICE
        notes.append(Note(key, kind, quantity))
        return None
    return _Candidate(
        position=position,
        exposure=exposure(position),
        action=action,
        quantity=quantity,
        order_type=OrderType.MKT if priced.market else OrderType.LMT,
        limit_price=priced.limit,
        outside_rth=outside_rth,
        step=priced.step,
        basis=priced.basis,
    )
