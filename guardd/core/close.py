"""The close episode: keep the account at its close target while the guard says so, never past it.

A close episode starts with a kill in flatten mode (target 0 for every position) or a reduce
decision (a target per position), and lasts while the engine stays HALTED (or REDUCING with that
target): exposure that appears after "flat confirmed" (an order the sweep was too late for, a
foreign fill, an assignment) starts a new close round, planned, paced and verified exactly like
the first. The executor feeds an `Observation` (what the Book shows now) to `CloseEpisode.step`
and carries out the `Round` it gets back: child orders to send, children to cancel, facts to
journal. This module does no I/O, reads no clock and logs nothing.

What is accounted, and how
--------------------------
Per position the episode keeps a ledger:

- Our children, known by identity: our API client id and the order id the executor allocated
  (plus the permId once the broker reports it, journaled as `child_order_acknowledged` so that a
  restarted guard knows it too). orderRef is never used to recognise them. A child is never
  dropped within the episode.
- Every fill on the account, once, by execId. A fill of one of our children adds to that
  child's `filled` (the larger of its executions' sum and its orderStatus `filled`, so a fill
  reported by status before its execution is not forgotten). Any other fill on the contract
  (another client, TWS, an IB liquidation, one of our ids that is not a child) is foreign.
- An anchor: a broker-confirmed position together with exactly which fills it is known to
  contain (foreign execIds; per child, the fill counted then). From it,

      expected = anchor + our children's fills since + foreign fills not in the anchor

  is the position once the position stream has caught up with every fill we know of.

The broker's position stream lags executions, repeats itself and, across a reconnect, may deliver
an old update after a fresh snapshot. So the latest broker figure `S` and `expected` are two
witnesses; the episode closes only what both agree is there:

      closable = min(|expected|, |S|), when both are on the same side of zero, else 0

minus what our live children may still fill. The stream has provably caught up when `S ==
expected`: then the anchor moves to `S`, containing every fill known. When they disagree for
`settle_s` seconds with no child of ours live on the position and nothing new on it (no fill, no
new figure), the broker's figure is adopted as the anchor when it is nearer the target than the
fills say (something traded that we did not see); a figure farther from it may be old, so the
round asks for positions afresh (`Round.refresh_positions`) and adopts it once the answer to a
request sent after the disagreement began still says so (exposure the broker keeps reporting
must be closed in the end). A figure merely received later is no evidence: an update IB sent
before a fill can arrive after the fill's execution, and closing it would cross zero.

Why this never crosses zero
---------------------------
Our fills are known (executions, or orderStatus when the execution lags), so `expected` can be
too high only by foreign closing fills we did not see, and `S` only by being stale. Closing
`min` of the two, less every live child's unfilled rest, therefore never takes the position past
its target unless both happen at once (see the assumptions). A live child that would now close
too much (foreign fills shrank the position under it) is cancelled; one on the wrong side (the
position flipped) is cancelled, and no new child goes to that position while it lives. A
foreign order still working on the closing side (the sweep's cancel has not landed: PendingCancel,
or a bracket's stop the cancel races) counts like a live child of ours: its unfilled rest is
left out of `closable` until it ends, so its fill and ours together never pass the target.

Why it converges
----------------
Once every message is delivered `S` equals the true position; `expected` equals it too when
every fill was seen, and otherwise the anchor is re-taken from `S` after `settle_s`. Then
`closable` is the whole distance to target, and a round's children close it.

Unknown figures
---------------
A position whose latest quantity IB left unset (`Held.known` False; on the protobuf wire an
omitted field) is neither 0 nor a figure: the episode does not anchor on it, plans no child for
it and counts it off target, so "flat" is never confirmed on it (journaled once per spell,
`close_position_unknown`; `close_position_known` when a figure is back). The broker adapter asks
for positions again meanwhile.

Re-pricing: a close that does not fill is never left to stall
-------------------------------------------------------------
A limit child priced from a price that turned out stale (a lagging or frozen feed, a market that
moved) can rest far from the market for ever. A limit child still working `reprice_after_s` after
it was sent (`pricing.due_for_reprice`; market children never) is cancelled (`Cancel` why
`reprice`, journaled `close_child_reprice_cancel`), and while that cancel is outstanding the
position gets no new child (note `repricing`). The child stays live, its unfilled rest reserved,
until the broker finishes it with its final fill count (Cancelled, or Filled when the cancel lost
the race); only then does the position's distance shrink by what it filled and its replacement
go out, at a fresh price and one step further up the escalation (`pricing.next_step`: one past
every child of the position cancelled for a re-price), journaled `close_child_repriced` with the
old and the new price. A re-price cancel the broker has not confirmed is sent again like any
other cancel (`cancel_retry_s`, or at once on a new connection). An answer that the order cannot
be cancelled (10147, 10148, 161) is never a reject: the child's own status and fills decide, so a
cancel racing a fill never frees the quantity that filled (`broker_error`).

Assumptions (docs/architecture.md repeats them)
-----------------------------------------------
A1. The guard sees the executions of its own children (execDetails as they happen and the
    reqExecutions download after every (re)connect, which ends with execDetailsEnd) or at least
    their orderStatus `filled`. Without them the guard cannot know what it sold.
A2. The guard, as the Master API client, sees the other fills on the account as executions.
    When it does not (some fills are not reported to it), closing stays safe as long as the
    position stream is not stale at the same moment; the anchor is re-taken after `settle_s`.
A3. A position update that contains a fill arrives within `settle_s` of that fill's execution
    (or of the last change on that position). The anchor is never re-taken from a figure
    sooner than that; a broker whose position stream lags longer can make the guard close
    twice.
A4. A fill received (live) within `settle_s` before a position figure may be missing from it,
    and one received within `settle_s` after it may be in it already (the position stream ran
    ahead of the execution): the first anchor of a position counts both as uncertain.
A5. After a re-sync, the open-order download is complete: a child of an earlier connection that
    it does not show, that the executions download shows unfilled, and that has not appeared
    `lost_grace_s` after the re-sync, is no longer at the broker (a message sent on a
    connection the guard has closed arrives, if ever, before that).
A6. Order ids of our client are unique within the episode (the broker adapter never re-uses
    one, restored ones included), so (client id, order id) names one child.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from decimal import Decimal
from typing import Any, Literal

from guardd.core import planner, pricing
from guardd.core.events import ConId
from guardd.core.ibcodes import IbClass, OrderStatus, ib_class
from guardd.core.planner import (
    ChildOrder,
    ChildStatus,
    CloseKind,
    ClosePolicy,
    ConfirmedPosition,
    NewChildOrder,
    Note,
    NoteKind,
    OrderType,
    PositionKey,
    Side,
    sequence_of,
)

ZERO = Decimal(0)
LIVE = frozenset({ChildStatus.PENDING_ACK, ChildStatus.WORKING})
_TERMINAL: Mapping[str, ChildStatus] = {
    OrderStatus.FILLED: ChildStatus.FILLED,
    OrderStatus.CANCELLED: ChildStatus.CANCELLED,
    OrderStatus.API_CANCELLED: ChildStatus.CANCELLED,
    OrderStatus.INACTIVE: ChildStatus.REJECTED,
}
# How an error naming one of our live children acts on it, by its class (guardd.core.ibcodes).
# Answers to a cancelOrder of ours (not found; filled or cancelled already): after a cancel no
# reject, the child's status and fills decide.
_CANCEL_ANSWERS = frozenset({IbClass.CANCEL_NOT_FOUND, IbClass.CANCEL_REFUSED})
# Notices about a working order (202 cancelled, 399 order message, 404 held for shares to borrow,
# 2109 outsideRth ignored), a cancel refused without a cancel of ours, farm status and warnings:
# nothing changes.
_NOTICES = frozenset({IbClass.ORDER_NOTICE, IbClass.CANCEL_REFUSED, IbClass.INFORMATIONAL})
# Refusals of the order id (103: not above every id seen, the Master API client rule) or of the
# API (321: Read-Only API), not of the order: no reject, the quantity goes out again.
_ID_OR_API_REFUSED = frozenset({IbClass.ID_REFUSED, IbClass.READ_ONLY})
# Every other class refuses the child (a reject; unknown codes included, see ibcodes).


# ---------------------------------------------------------------------------- inputs


@dataclass(frozen=True, slots=True)
class Fill:
    """One execution on the guarded account; `quantity` is signed (BOT +, SLD -)."""

    exec_id: str
    client_id: int
    order_id: int
    perm_id: int
    key: PositionKey
    quantity: Decimal
    ts: float  # when the guard received it
    live: bool  # reported as it happened, not an answer to reqExecutions


@dataclass(frozen=True, slots=True)
class OrderReport:
    """One order of our API client as the Book knows it now (on the current connection)."""

    order_id: int
    perm_id: int
    status: str
    filled: Decimal


@dataclass(frozen=True, slots=True)
class Held:
    """A broker-confirmed position (quantity signed) and when that figure was received.

    `known` is False while IB leaves the position's quantity unset (the Book then holds the last
    known figure, or NaN): the episode neither anchors on it nor confirms the position at target.
    """

    position: ConfirmedPosition
    updated: float
    known: bool = True


@dataclass(frozen=True, slots=True)
class Observation:
    """What the Book shows at `now`, in the episode's terms.

    `synced_since` is when the current connection (`generation`) finished its position and
    open-order downloads (None while it has not); `executions_complete` is whether its
    executions download has ended too. `orders` are our client's orders of the current
    connection by order id; `fills` every execution of the guarded account known so far, or at
    least every one the episode does not know yet (`CloseEpisode.knows_fill`: it counts each
    execId once, so passing old ones again is harmless, and leaving them out changes nothing).
    `foreign_buying` / `foreign_selling` are, per position, the unfilled quantity of every
    working buy / sell order that is not ours: the sweep is cancelling them, but until a cancel
    lands (PendingCancel) they may still fill. `positions_listed_asked` is when the last positions
    download asked for afresh (`Round.refresh_positions`) and since completed was asked for
    (None: none has completed): a figure received since then is at least as new as IB's answer
    to it; one received earlier may be any old update still on its way when the guard asked.
    """

    now: float
    generation: int
    synced_since: float | None
    executions_complete: bool
    positions: Mapping[PositionKey, Held]
    orders: Mapping[int, OrderReport]
    fills: Iterable[Fill]
    foreign_buying: Mapping[PositionKey, Decimal] = field(default_factory=dict)
    foreign_selling: Mapping[PositionKey, Decimal] = field(default_factory=dict)
    positions_listed_asked: float | None = None


REFRESH_AGAIN_FACTOR = 3
"""While a broker figure farther from the target than the fills disagrees and no fresh figure has
come, positions are asked for again every this many settle times."""


@dataclass(frozen=True, slots=True)
class CloseSettings:
    """How the episode judges the broker's data (see the module's assumptions)."""

    client_id: int
    settle_s: float = 5.0
    lost_grace_s: float = 2.0
    cancel_retry_s: float = 2.0
    overdue_s: float = 30.0
    tolerance: Mapping[str, Decimal] = field(default_factory=dict)  # per secType, absolute

    def tolerance_for(self, sec_type: str) -> Decimal:
        """How far from its target a position of this secType may be and still count as there."""
        return self.tolerance.get(sec_type, ZERO)


# ---------------------------------------------------------------------------- outputs


@dataclass(frozen=True, slots=True)
class Cancel:
    """Cancel one of our children (by its order id); `why`: `over_working` (it could take the
    position past its target), `wrong_side` (the position flipped under it) or `reprice` (a
    limit that did not fill in time: it is replaced at a fresh price once finished)."""

    order_id: int
    order_ref: str
    key: PositionKey
    why: str


@dataclass(frozen=True, slots=True)
class Record:
    """A fact for the journal (and the log): a snake_case kind and its fields."""

    kind: str
    fields: Mapping[str, Any]
    level: Literal["info", "warning", "error"] = "info"


@dataclass(frozen=True, slots=True)
class Round:
    """What to do now: cancels first, then new children in order; facts to journal."""

    orders: tuple[NewChildOrder, ...]
    cancels: tuple[Cancel, ...]
    records: tuple[Record, ...]
    notes: tuple[Note, ...]
    off_target: int
    at_target: bool
    overdue: bool
    refresh_positions: bool = False  # ask the broker for positions afresh (reqPositions)


# ---------------------------------------------------------------------------- state


@dataclass(slots=True)
class Child:
    """One of our close orders, tracked for the whole episode."""

    order_id: int
    order_ref: str
    key: PositionKey
    action: Side
    quantity: Decimal
    generation: int  # the connection it was sent on; -1: restored from the journal
    sent_at: float
    planned_against: Decimal | None = None
    perm_id: int = 0
    status: ChildStatus = ChildStatus.PENDING_ACK
    status_filled: Decimal = ZERO
    exec_filled: Decimal = ZERO
    finished_at: float | None = None
    cancel_sent: tuple[int, float] | None = None  # (generation, when)
    # How it was priced (None: unknown, e.g. restored from an old journal record).
    order_type: OrderType | None = None
    limit_price: float | None = None
    step: int = 0  # its escalation step (guardd.core.pricing)
    reprice_at: float | None = None  # when the episode decided to cancel it for a re-price

    @property
    def live(self) -> bool:
        """Whether it may still fill."""
        return self.status in LIVE

    @property
    def filled(self) -> Decimal:
        """What it filled, from its executions or its status, whichever says more."""
        return min(max(self.status_filled, self.exec_filled), self.quantity)

    @property
    def remaining(self) -> Decimal:
        """What it may still fill."""
        return self.quantity - self.filled if self.live else ZERO

    @property
    def sign(self) -> int:
        """+1 for a buy, -1 for a sell: the sign of its fills on the position."""
        return 1 if self.action is Side.BUY else -1


@dataclass(frozen=True, slots=True)
class Anchor:
    """A broker figure and what it is known to contain."""

    quantity: Decimal
    fills: frozenset[str]  # foreign execIds
    child_fills: Mapping[str, Decimal]  # order_ref -> filled counted
    at: float
    uncertain: frozenset[str] = frozenset()  # foreign execIds that may or may not be in it
    # A first anchor (A4): a foreign fill heard live until then but only after the anchor was
    # taken may be in it already (the position stream ran ahead of the execution): uncertain too.
    late_until: float = -float("inf")


@dataclass(slots=True)
class _Ledger:
    anchor: Anchor | None = None
    last_figure: Decimal | None = None
    last_activity: float = 0.0
    disagree_since: float | None = None  # when a farther broker figure was first noticed
    replacing: Child | None = None  # cancelled for a re-price, its replacement not planned yet


class CloseEpisode:
    """One flatten or reduce, kept at its target until it is stopped."""

    def __init__(
        self,
        kind: CloseKind,
        decision_id: int,
        started: float,
        settings: CloseSettings,
        targets: Mapping[PositionKey, Decimal] | None = None,
    ) -> None:
        self.kind: CloseKind = kind
        self.decision_id = decision_id
        self.started = started
        self.settings = settings
        self.targets: dict[PositionKey, Decimal] | None = (
            dict(targets) if targets is not None else None
        )
        self.children: dict[str, Child] = {}
        self.sequence = 1
        self.round = 1
        self.round_started = started
        self.at_target = False
        self.overdue = False
        self.rejects_seen = 0
        self._by_order_id: dict[int, Child] = {}
        self._ledgers: dict[PositionKey, _Ledger] = {}
        self._foreign: dict[str, Fill] = {}  # execId -> fill not of a child
        # The same children and foreign fills by position: a round looks each position's up
        # (scanning all of them per position made a 1,000-position round take ~1 s).
        self._children_of: dict[PositionKey, list[Child]] = {}
        self._foreign_of: dict[PositionKey, list[Fill]] = {}
        self._keys: set[PositionKey] = set()  # the keys of the last round, and sorted
        self._sorted_keys: list[PositionKey] = []
        self._own: dict[str, tuple[Child, Decimal]] = {}  # execId -> (child, shares)
        self._unpriced: set[PositionKey] = set()  # reported without a usable price for a limit
        self._unknown: set[PositionKey] = set()  # quantity left unset by IB (journaled once)
        self._refresh_positions = False  # this round asks for positions afresh
        self.waiting_for_open: set[PositionKey] = set()  # to close, their market closed

    def knows_fill(self, exec_id: str) -> bool:
        """Whether an execution was given to the episode already (it counts each once)."""
        return exec_id in self._own or exec_id in self._foreign

    def child_by_order_id(self, order_id: int) -> Child | None:
        """One of our children by its order id (our client's), if it is one."""
        return self._by_order_id.get(order_id)

    # ---- changes from the executor --------------------------------------------------------

    def retarget(
        self, kind: CloseKind, targets: Mapping[PositionKey, Decimal] | None, now: float
    ) -> None:
        """A new decision for the same episode (a kill during a reduce, a new reduce target):
        children, fills and anchors carry over; a new round starts."""
        self.kind = kind
        self.targets = dict(targets) if targets is not None else None
        self._new_round(now)

    def add_child(self, order: NewChildOrder, order_id: int, generation: int, now: float) -> Child:
        """Record a child BEFORE it is sent (the executor journals it with its order id)."""
        child = Child(
            order_id=order_id,
            order_ref=order.order_ref,
            key=order.key,
            action=order.action,
            quantity=order.quantity,
            generation=generation,
            sent_at=now,
            planned_against=order.planned_against,
            order_type=order.order_type,
            limit_price=order.limit_price,
            step=order.step,
        )
        self._keep(child)
        self._ledger(order.key).last_activity = now
        return child

    def reject(self, order_id: int, now: float) -> Child | None:
        """The broker rejected one of our orders (error 201 etc. naming its id)."""
        child = self._by_order_id.get(order_id)
        if child is None or not child.live:
            return None
        child.status = ChildStatus.REJECTED
        child.finished_at = now
        self.rejects_seen += 1
        return child

    def broker_error(self, order_id: int, code: int, message: str, now: float) -> Record | None:
        """An error naming one of our live children's order ids; the fact to journal, or None
        when it concerns no live child of ours or changes nothing.

        - The broker's answer to a cancel of ours (classes ``CANCEL_NOT_FOUND`` and
          ``CANCEL_REFUSED``: not found, filled or cancelled already) changes nothing: the
          child's status and fills decide.
        - A notice about a working order (``ORDER_NOTICE``), a cancel refused that we did not
          send (``CANCEL_REFUSED``), an informational code (warnings 2100-2199) changes nothing.
        - A refusal of the id or of the API, not of the order (``ID_REFUSED`` 103, ``READ_ONLY``
          321):
          no order exists under the id; the child is freed without counting as a reject, and
          its quantity is planned again under a new id (`refuse`).
        - Any other error refuses the child: a reject, counted toward the policy's
          `max_rejects`, after which the position is escalated (note `rejected_too_often`).
        A refused child is never left counted as working."""
        child = self._by_order_id.get(order_id)
        if child is None or not child.live:
            return None
        kind = ib_class(code)
        if kind in _CANCEL_ANSWERS and (
            child.cancel_sent is not None or child.reprice_at is not None
        ):
            return Record(
                "close_child_cancel_refused",
                {
                    "decision_id": self.decision_id,
                    "order_ref": child.order_ref,
                    "code": code,
                    "message": message,
                    "reprice": child.reprice_at is not None,
                },
            )
        if kind in _NOTICES:
            return None
        fields = {
            "decision_id": self.decision_id,
            "order_id": child.order_id,
            "order_ref": child.order_ref,
            "code": code,
            "message": message,
        }
        if kind in _ID_OR_API_REFUSED:
            self.refuse(order_id, now)
            return Record("child_order_refused", fields, "warning")
        if self.reject(order_id, now) is None:
            return None
        return Record("child_order_rejected", fields, "warning")

    def refuse(self, order_id: int, now: float) -> Child | None:
        """The broker refused one of our orders for its id (103) or because the API is read-only
        (321): no order exists under it. The child ends cancelled, freeing its quantity for a
        new child under a new id; it does not count as a reject (the order was never judged)."""
        child = self._by_order_id.get(order_id)
        if child is None or not child.live:
            return None
        child.status = ChildStatus.CANCELLED
        child.finished_at = now
        return child

    def cancel_sent(self, cancel: Cancel, generation: int, now: float) -> None:
        """The executor sent (or tried to send) this cancel."""
        child = self._by_order_id.get(cancel.order_id)
        if child is not None:
            child.cancel_sent = (generation, now)

    def restore(self, records: Iterable[Mapping[str, Any]]) -> int:
        """Rebuild children and anchors from the journal of a previous process; how many
        children. Children keep their ids (identity) and count until the broker says more."""
        count = 0
        for rec in records:
            if rec.get("decision_id") != self.decision_id:
                continue
            kind = rec.get("kind")
            key = PositionKey(
                planner.AccountId(str(rec.get("account", ""))),
                ConId(int(rec.get("con_id", 0))),
            )
            if kind == "child_order_sent":
                ref = str(rec["order_ref"])
                if ref in self.children:
                    continue
                baseline = rec.get("planned_against")
                order_type = rec.get("order_type")
                limit = rec.get("limit_price")
                sent = rec.get("ts")
                self._keep(
                    Child(
                        order_id=int(rec["order_id"]),
                        order_ref=ref,
                        key=key,
                        action=Side(str(rec["action"])),
                        quantity=Decimal(str(rec["quantity"])),
                        generation=-1,
                        # The record's own time: a restored limit that still works is re-priced
                        # `reprice_after_s` after it was first sent, not after the restart.
                        sent_at=float(sent) if isinstance(sent, int | float) else 0.0,
                        planned_against=None if baseline is None else Decimal(str(baseline)),
                        order_type=OrderType(order_type) if order_type in ("MKT", "LMT") else None,
                        limit_price=float(limit) if isinstance(limit, int | float) else None,
                        step=int(rec.get("step") or 0),
                    )
                )
                count += 1
            elif kind == "child_order_acknowledged":
                known = self._by_order_id.get(int(rec.get("order_id", 0)))
                perm_id = int(rec.get("perm_id") or 0)
                if known is not None and perm_id > 0 and not known.perm_id:
                    known.perm_id = perm_id
            elif kind == "close_anchor":
                fills = rec.get("fills") or []
                child_fills = rec.get("child_fills") or {}
                uncertain = rec.get("uncertain") or []
                self._ledger(key).anchor = Anchor(
                    quantity=Decimal(str(rec["quantity"])),
                    fills=frozenset(str(f) for f in fills),
                    child_fills={str(k): Decimal(str(v)) for k, v in child_fills.items()},
                    at=0.0,
                    uncertain=frozenset(str(f) for f in uncertain),
                )
        return count

    # ---- the round ---------------------------------------------------------------------------

    def step(self, obs: Observation, policy: ClosePolicy, budget: int) -> Round:
        """Account what the Book shows, then decide this round's cancels and children."""
        records: list[Record] = []
        self._refresh_positions = False
        self._account_fills(obs, records)
        self._refresh_children(obs, records)
        # Every position the Book shows, has a child or a ledger, in key order: sorted again
        # only when that set changes (sorting 1,000 keys every round cost more than the round).
        keys = set(obs.positions)
        keys.update(self._children_of)
        keys.update(self._ledgers)
        if keys != self._keys:
            self._keys, self._sorted_keys = keys, sorted(keys)
        cancels: list[Cancel] = []
        inputs: list[ConfirmedPosition] = []
        child_inputs: list[ChildOrder] = []
        targets: dict[PositionKey, Decimal] = {}
        steps: dict[PositionKey, int] = {}
        notes: list[Note] = []
        off_target = 0
        for key in self._sorted_keys:
            held = obs.positions.get(key)
            figure = held.position.quantity if held is not None else ZERO
            target = self._target(key)
            if target is None:
                continue  # a reduce does not touch a position it did not size
            if (held is not None and not held.known) or not figure.is_finite():
                # IB left the quantity unset: unknown, neither 0 nor a figure to anchor on or
                # to plan from. The position stays off target (never confirmed) until a figure
                # arrives; its live children keep working as sized against the last one.
                off_target += 1
                self._unknown_now(key, held, records)
                continue
            if key in self._unknown:
                self._unknown.discard(key)
                records.append(
                    Record("close_position_known", {"con_id": key.con_id, "quantity": str(figure)})
                )
            ledger = self._ledger(key)
            updated = held.updated if held is not None else (obs.synced_since or obs.now)
            if ledger.last_figure != figure:
                ledger.last_figure = figure
                ledger.last_activity = max(ledger.last_activity, updated)
            mine = self._children_of.get(key, [])
            tolerance = self.settings.tolerance_for(held.position.sec_type if held else "")
            if held is not None and self._settled_flat(key, ledger, figure, target, tolerance):
                # Nothing new on a flat position: the rest of the round would change nothing
                # for it but this.
                if ledger.replacing is not None and ledger.replacing.status is ChildStatus.FILLED:
                    ledger.replacing = None
                continue
            expected = self._expected(key, ledger, figure, updated, obs, records)
            live = [c for c in mine if c.live]
            if expected is None:
                off_target += 1  # not anchored yet: the executions download is not in
                continue
            if (
                live
                or _off_target(figure, target, tolerance)
                or any(_off_target(e, target, tolerance) for e in expected)
            ):
                off_target += 1
            closable = _less_foreign(
                _closable((*expected, figure)),
                obs.foreign_buying.get(key, ZERO),
                obs.foreign_selling.get(key, ZERO),
            )
            safety = self._cancels_for(key, closable, target, live, obs)
            cancels.extend(safety)
            cancels.extend(self._reprice_cancels(key, live, safety, obs, policy, records))
            if ledger.replacing is not None and ledger.replacing.status is ChildStatus.FILLED:
                ledger.replacing = None  # it filled before the cancel landed: nothing to replace
            if any(c.reprice_at is not None for c in live):
                # The replacement goes once the broker has finished the child with its final
                # fill count; no other child joins it meanwhile.
                notes.append(Note(key, NoteKind.REPRICING, abs(closable)))
                continue
            if held is None or (closable == ZERO and not live):
                continue
            if any(c.sign == _sign(closable) for c in live):
                continue  # a live child on the wrong side: cancelled above, wait for it
            if not live and not _off_target(closable, target, tolerance):
                continue
            inputs.append(replace(held.position, quantity=closable))
            targets[key] = target
            steps[key] = pricing.next_step(
                ((c.step, c.reprice_at is not None) for c in mine), policy.reprice
            )
            closing = _closing_action(closable)
            for c in mine:
                if c.live and c.remaining > 0:
                    child_inputs.append(_as_input(c, c.status, c.remaining, closable))
                elif c.status is ChildStatus.REJECTED and c.action is closing:
                    child_inputs.append(_as_input(c, c.status, c.quantity, closable))
        if self.kind == "reduce":
            plan = planner.plan_reduce(
                inputs,
                child_inputs,
                targets,
                policy,
                decision_id=self.decision_id,
                budget=budget,
                now=obs.now,
                sequence_start=self.sequence,
                steps=steps,
            )
        else:
            plan = planner.plan_flatten(
                inputs,
                child_inputs,
                policy,
                decision_id=self.decision_id,
                budget=budget,
                now=obs.now,
                sequence_start=self.sequence,
                steps=steps,
            )
        for cancel in cancels:
            if cancel.why == "reprice":
                continue  # journaled as close_child_reprice_cancel
            records.append(
                Record(
                    "child_cancel_requested",
                    {"order_ref": cancel.order_ref, "con_id": cancel.key.con_id, "why": cancel.why},
                    "warning",
                )
            )
        records.extend(self._replacements(plan.orders))
        records.extend(self._unpriced_now(plan.notes, policy))
        records.extend(self._closed_markets_now(plan.notes))
        at_target = off_target == 0 and not plan.orders
        self._track_rounds(obs.now, at_target, off_target, records)
        return Round(
            orders=plan.orders,
            cancels=tuple(cancels),
            records=tuple(records),
            notes=(*notes, *plan.notes),
            off_target=off_target,
            at_target=at_target,
            overdue=self.overdue,
            refresh_positions=self._refresh_positions,
        )

    # ---- internals ---------------------------------------------------------------------------

    def _keep(self, child: Child) -> None:
        old = self.children.get(child.order_ref)
        self.children[child.order_ref] = child
        if old is not None:  # the same child again (a restore): the new record replaces it
            siblings = self._children_of[old.key]
            siblings.remove(old)
            if not siblings:  # the keys of `_children_of` are those of the children
                del self._children_of[old.key]
        self._children_of.setdefault(child.key, []).append(child)
        self._by_order_id[child.order_id] = child
        self.sequence = max(self.sequence, sequence_of(child.order_ref) + 1)

    def _settled_flat(
        self,
        key: PositionKey,
        ledger: _Ledger,
        figure: Decimal,
        target: Decimal,
        tolerance: Decimal,
    ) -> bool:
        """Whether a position the broker shows at 0 is at its anchor of 0 with nothing new: no
        live child, no fill that the anchor does not hold, no uncertain fill. Then `_expected`
        is (0,) and moves nothing, nothing is closable or cancelled and the position is at
        target: the round has nothing to do for it (at 1,000 positions most of them are in this
        state for most of a flatten, and the full path cost most of the round)."""
        anchor = ledger.anchor
        if (
            figure != 0
            or anchor is None
            or anchor.quantity != 0
            or anchor.uncertain
            or _off_target(figure, target, tolerance)
        ):
            return False
        mine = self._children_of.get(key, ())
        if any(c.live for c in mine):
            return False
        if any(f.exec_id not in anchor.fills for f in self._foreign_of.get(key, ())):
            return False
        return {c.order_ref: c.filled for c in mine if c.filled} == dict(anchor.child_fills)

    def _ledger(self, key: PositionKey) -> _Ledger:
        ledger = self._ledgers.get(key)
        if ledger is None:
            ledger = self._ledgers[key] = _Ledger()
        return ledger

    def _target(self, key: PositionKey) -> Decimal | None:
        if self.kind == "flatten" or self.targets is None:
            return ZERO
        return self.targets.get(key)

    def _new_round(self, now: float) -> None:
        self.round += 1
        self.round_started = now
        self.overdue = False

    def _account_fills(self, obs: Observation, records: list[Record]) -> None:
        for fill in obs.fills:
            if fill.exec_id in self._foreign or fill.exec_id in self._own:
                continue
            child = self._child_of(fill)
            if child is None:
                self._foreign[fill.exec_id] = fill
                self._foreign_of.setdefault(fill.key, []).append(fill)
            else:
                self._own[fill.exec_id] = (child, abs(fill.quantity))
                child.exec_filled += abs(fill.quantity)
                self._learn_perm(child, fill.perm_id, records)
            ledger = self._ledger(fill.key)
            ledger.last_activity = max(ledger.last_activity, fill.ts)

    def _child_of(self, fill: Fill) -> Child | None:
        """The child this fill belongs to, by identity: our client id and the child's order id
        (and permId once known). Never by orderRef."""
        if fill.client_id != self.settings.client_id:
            return None
        child = self._by_order_id.get(fill.order_id)
        if child is None or child.key != fill.key:
            return None
        if child.perm_id and fill.perm_id and child.perm_id != fill.perm_id:
            return None
        return child

    def _refresh_children(self, obs: Observation, records: list[Record]) -> None:
        synced = obs.synced_since is not None
        settled = (
            synced
            and obs.executions_complete
            and obs.synced_since is not None
            and obs.now - obs.synced_since >= self.settings.lost_grace_s
        )
        for child in self.children.values():
            was_live = child.live
            report = obs.orders.get(child.order_id)
            if report is not None and child.perm_id and report.perm_id not in (0, child.perm_id):
                report = None  # an order of ours with a re-used id: not this child
            if report is not None:
                self._learn_perm(child, report.perm_id, records)
                child.status_filled = max(child.status_filled, report.filled)
                child.status = child_status(report.status, child.status)
                if was_live and child.status is ChildStatus.REJECTED:
                    self.rejects_seen += 1
            elif child.live and child.generation != obs.generation and settled:
                # Sent on an earlier connection (or by an earlier process); the complete
                # open-order download of this one does not show it and its executions are in.
                child.status = ChildStatus.CANCELLED
                records.append(
                    Record(
                        "child_order_lost",
                        {"order_ref": child.order_ref, "filled": str(child.filled)},
                        "warning",
                    )
                )
            if child.filled >= child.quantity and child.status is not ChildStatus.REJECTED:
                child.status = ChildStatus.FILLED
            if child.live:
                child.finished_at = None
            elif child.finished_at is None:
                child.finished_at = obs.now
                ledger = self._ledger(child.key)
                ledger.last_activity = max(ledger.last_activity, obs.now)

    def _learn_perm(self, child: Child, perm_id: int, records: list[Record]) -> None:
        """The broker's permId of a child, the first time it is reported: journaled, so a
        restarted guard knows the child by it too (`restore`)."""
        if perm_id <= 0 or child.perm_id:
            return
        child.perm_id = perm_id
        records.append(
            Record(
                "child_order_acknowledged",
                {
                    "decision_id": self.decision_id,
                    "order_id": child.order_id,
                    "perm_id": perm_id,
                    "order_ref": child.order_ref,
                },
            )
        )

    def _expected(
        self,
        key: PositionKey,
        ledger: _Ledger,
        figure: Decimal,
        updated: float,
        obs: Observation,
        records: list[Record],
    ) -> tuple[Decimal, ...] | None:
        """What the position is once the stream has caught up with every fill we know: one
        value, or several while it is unknown whether some fills are in the anchor (A4).
        Moves the anchor when the broker's figure provably caught up (it equals one of them).
        None while there is no anchor and the executions download is not complete: a first
        anchor must know which fills came before it."""
        mine = self._children_of.get(key, [])
        foreign = self._foreign_of.get(key, [])
        if ledger.anchor is None:
            if not obs.executions_complete:
                return None
            # A4: a fill received shortly before the figure may be missing from it (and one
            # received shortly after it, below, may be in it already).
            horizon = updated - self.settings.settle_s
            recent = frozenset(f.exec_id for f in foreign if f.live and f.ts > horizon)
            contained = frozenset(f.exec_id for f in foreign) - recent
            late_until = updated + self.settings.settle_s
            ledger.anchor = Anchor(figure, contained, {}, obs.now, recent, late_until)
            records.append(self._anchor_record(key, ledger.anchor, "first"))
        anchor = ledger.anchor
        late = frozenset(
            f.exec_id
            for f in foreign
            if f.live
            and f.ts <= anchor.late_until
            and f.exec_id not in anchor.fills
            and f.exec_id not in anchor.uncertain
        )
        if late:
            anchor = ledger.anchor = replace(anchor, uncertain=anchor.uncertain | late)
            records.append(self._anchor_record(key, anchor, "late_fill"))
        base = anchor.quantity
        base += sum(
            (c.sign * (c.filled - anchor.child_fills.get(c.order_ref, ZERO)) for c in mine), ZERO
        )
        known = anchor.fills | anchor.uncertain
        news = [f for f in foreign if f.exec_id not in known]
        base += sum((f.quantity for f in news), ZERO)
        # Each uncertain fill is either in the anchor already or still to come: the position is
        # one of their subset sums. Every use of the candidates (what all of them allow closing,
        # whether any is off target: its complement is an interval) needs only the two extremes,
        # never the up to 2^n sums between them.
        doubt = [f.quantity for f in foreign if f.exec_id in anchor.uncertain]
        low = base + sum((q for q in doubt if q < 0), ZERO)
        high = base + sum((q for q in doubt if q > 0), ZERO)
        candidates = (low,) if low == high else (low, high)
        counted = {c.order_ref: c.filled for c in mine if c.filled}
        moved = (
            bool(news)
            or bool(anchor.uncertain)
            or counted != dict(anchor.child_fills)
            or anchor.quantity != figure
        )
        quiet = (
            obs.synced_since is not None
            and obs.now - ledger.last_activity >= self.settings.settle_s
        )
        if anchor.uncertain:
            # Which uncertain fills the anchor holds cannot be told from a figure equal to one
            # candidate (that figure may be old too): close only what every candidate allows,
            # until the position has been quiet for the settle time (A3: the figure is then
            # current) and becomes the anchor with every fill in it.
            if quiet:
                ledger.anchor = Anchor(
                    figure, frozenset(f.exec_id for f in foreign), counted, obs.now
                )
                records.append(self._anchor_record(key, ledger.anchor, "settled"))
                return (figure,)
            return (*candidates, figure)
        if figure in candidates and moved:
            ledger.anchor = Anchor(figure, frozenset(f.exec_id for f in foreign), counted, obs.now)
            records.append(self._anchor_record(key, ledger.anchor, "caught_up"))
            return (figure,)
        if figure in candidates or not quiet or any(c.live for c in mine):
            return candidates
        # The figure has disagreed with every fill we know for the settle time. Adopt it at once
        # when it closes less than the fills say (a fill we were not told of closed some of it).
        # A figure that would close more may be old: the episode asks the broker for positions
        # afresh (`Round.refresh_positions`, again while no answer comes) and trusts it over our
        # fills only once a download asked for after the disagreement began has ended and the
        # figure was received no earlier than that request (so it is IB's answer or newer). Never
        # closing exposure the broker keeps reporting would leave the account open
        # while HALTED (e.g. a foreign fill's execution heard late and counted twice).
        nearer = all(
            abs(figure) < abs(c) and (figure == 0 or _sign(c) == _sign(figure)) for c in candidates
        )
        since = ledger.disagree_since
        asked = obs.positions_listed_asked
        refreshed = since is not None and asked is not None and asked >= since and updated >= asked
        if not nearer and not refreshed:
            if since is None or obs.now - since >= REFRESH_AGAIN_FACTOR * self.settings.settle_s:
                self._refresh_positions = True  # asked again if an answer never came
            if since is None:
                ledger.disagree_since = obs.now
                records.append(
                    Record(
                        "position_disagrees",
                        {
                            "con_id": key.con_id,
                            "broker": str(figure),
                            "expected": [str(c) for c in candidates],
                        },
                        "error",
                    )
                )
            elif obs.now - since >= REFRESH_AGAIN_FACTOR * self.settings.settle_s:
                ledger.disagree_since = obs.now
            return candidates
        ledger.disagree_since = None
        records.append(
            Record(
                "position_disagrees",
                {
                    "con_id": key.con_id,
                    "broker": str(figure),
                    "expected": [str(c) for c in candidates],
                },
                "warning",
            )
        )
        ledger.anchor = Anchor(figure, frozenset(f.exec_id for f in foreign), counted, obs.now)
        records.append(self._anchor_record(key, ledger.anchor, "settled"))
        return (figure,)

    def _anchor_record(self, key: PositionKey, anchor: Anchor, why: str) -> Record:
        return Record(
            "close_anchor",
            {
                "decision_id": self.decision_id,
                "account": key.account,
                "con_id": key.con_id,
                "quantity": str(anchor.quantity),
                "fills": sorted(anchor.fills),
                "child_fills": {k: str(v) for k, v in sorted(anchor.child_fills.items())},
                "uncertain": sorted(anchor.uncertain),
                "why": why,
            },
        )

    def _cancels_for(
        self,
        key: PositionKey,
        closable: Decimal,
        target: Decimal,
        live: Sequence[Child],
        obs: Observation,
    ) -> list[Cancel]:
        """Children that could now take the position past its target: on the wrong side, or
        more than the distance left (newest first)."""
        out: list[Cancel] = []
        direction = _sign(closable)
        room = max(ZERO, abs(closable) - (abs(target) if _sign(target) == direction else ZERO))
        keep = ZERO
        for child in sorted(live, key=lambda c: c.sent_at):
            if child.remaining <= 0:
                continue  # filled in full, its final status on the way
            same_side = direction != 0 and child.sign == -direction
            if same_side and keep + child.remaining <= room:
                keep += child.remaining
                continue
            if child.status is ChildStatus.PENDING_ACK and child.generation == obs.generation:
                continue  # not acknowledged yet: cancel once the broker knows it
            if not self._may_send_cancel(child, obs):
                continue
            why = "over_working" if same_side else "wrong_side"
            out.append(Cancel(child.order_id, child.order_ref, key, why))
        return out

    def _may_send_cancel(self, child: Child, obs: Observation) -> bool:
        if obs.synced_since is None:
            return False
        sent = child.cancel_sent
        return (
            sent is None
            or sent[0] != obs.generation
            or obs.now - sent[1] >= self.settings.cancel_retry_s
        )

    def _reprice_cancels(
        self,
        key: PositionKey,
        live: Sequence[Child],
        safety: Sequence[Cancel],
        obs: Observation,
        policy: ClosePolicy,
        records: list[Record],
    ) -> list[Cancel]:
        """Limit children that have worked `reprice_after_s` without filling (oldest first):
        cancel them for a re-price; and a re-price cancel not confirmed yet: send it again."""
        if obs.synced_since is None:
            return []
        already = {c.order_id for c in safety}
        ledger = self._ledger(key)
        out: list[Cancel] = []
        for child in sorted(live, key=lambda c: (c.sent_at, c.order_id)):
            if child.order_id in already or child.remaining <= 0:
                continue
            again = child.reprice_at is not None
            if not again:
                if (
                    child.status is not ChildStatus.WORKING
                    or child.order_type is not OrderType.LMT
                    or not pricing.due_for_reprice(child.sent_at, obs.now, policy.reprice)
                ):
                    continue
                child.reprice_at = obs.now
                ledger.replacing = child
            elif child.status is ChildStatus.PENDING_ACK and child.generation == obs.generation:
                continue  # sent on this connection and not acknowledged yet
            if not self._may_send_cancel(child, obs):
                continue
            out.append(Cancel(child.order_id, child.order_ref, key, "reprice"))
            records.append(
                Record(
                    "close_child_reprice_cancel",
                    {
                        "order_ref": child.order_ref,
                        "order_id": child.order_id,
                        "con_id": key.con_id,
                        "limit_price": child.limit_price,
                        "step": child.step,
                        "next_step": policy.reprice.clamp(child.step + 1),
                        "filled": str(child.filled),
                        "working_s": round(obs.now - child.sent_at, 3),
                        "again": again,
                    },
                    "warning",
                )
            )
        return out

    def _replacements(self, orders: Sequence[NewChildOrder]) -> list[Record]:
        """The children planned to replace one cancelled for a re-price: old and new price."""
        out: list[Record] = []
        for order in orders:
            ledger = self._ledgers.get(order.key)
            old = ledger.replacing if ledger is not None else None
            if ledger is None or old is None or old.live:
                continue
            ledger.replacing = None
            out.append(
                Record(
                    "close_child_repriced",
                    {
                        "con_id": order.key.con_id,
                        "symbol": order.symbol,
                        "old_order_ref": old.order_ref,
                        "old_limit_price": old.limit_price,
                        "old_step": old.step,
                        "old_filled": str(old.filled),
                        "order_ref": order.order_ref,
                        "order_type": str(order.order_type),
                        "limit_price": order.limit_price,
                        "quantity": str(order.quantity),
                        "step": order.step,
                        "price_source": None if order.basis is None else str(order.basis.source),
                    },
                    "warning",
                )
            )
        return out

    def _unknown_now(self, key: PositionKey, held: Held | None, records: list[Record]) -> None:
        """Journal once per spell that a position's quantity is unknown."""
        if key in self._unknown:
            return
        self._unknown.add(key)
        last = held.position.quantity if held is not None else None
        records.append(
            Record(
                "close_position_unknown",
                {
                    "con_id": key.con_id,
                    "last_known": None if last is None or not last.is_finite() else str(last),
                },
                "warning",
            )
        )

    def _closed_markets_now(self, notes: Sequence[Note]) -> list[Record]:
        """A position to close whose market is closed waits for the open with its close pending:
        `close_waiting_for_open` once when it starts waiting, `close_market_open` when it no
        longer waits (its market opened, or there is nothing left to close)."""
        waiting = {n.key: n for n in notes if n.kind is NoteKind.MARKET_CLOSED}
        out = [
            Record(
                "close_waiting_for_open",
                {"con_id": key.con_id, "quantity": str(note.quantity)},
                "warning",
            )
            for key, note in sorted(waiting.items())
            if key not in self.waiting_for_open
        ]
        out.extend(
            Record("close_market_open", {"con_id": key.con_id})
            for key in sorted(self.waiting_for_open - set(waiting))
        )
        self.waiting_for_open = set(waiting)
        return out

    def _unpriced_now(self, notes: Sequence[Note], policy: ClosePolicy) -> list[Record]:
        """A position that needs a limit and has no fresh price (where the class allows no
        market order) waits for one: journaled once until it is priced again."""
        unpriced = {n.key: n for n in notes if n.kind in (NoteKind.STALE_PRICE, NoteKind.NO_PRICE)}
        out = [
            Record(
                "close_price_unusable",
                {
                    "con_id": key.con_id,
                    "why": str(note.kind),
                    "quantity": str(note.quantity),
                    "max_price_age_s": policy.reprice.max_price_age_s,
                },
                "error",
            )
            for key, note in sorted(unpriced.items())
            if key not in self._unpriced
        ]
        self._unpriced = set(unpriced)
        return out

    def _track_rounds(
        self, now: float, at_target: bool, off_target: int, records: list[Record]
    ) -> None:
        if at_target and not self.at_target:
            self.at_target = True
            kind = "flat_confirmed" if self.kind == "flatten" else "reduce_confirmed"
            records.append(
                Record(
                    kind,
                    {
                        "decision_id": self.decision_id,
                        "round": self.round,
                        "children": len(self.children),
                    },
                    "warning",
                )
            )
        elif not at_target and self.at_target:
            self.at_target = False
            self._new_round(now)
            records.append(
                Record(
                    "close_round_started",
                    {
                        "decision_id": self.decision_id,
                        "round": self.round,
                        "positions_off_target": off_target,
                    },
                    "warning",
                )
            )
        if (
            not at_target
            and not self.overdue
            and now - self.round_started > self.settings.overdue_s
        ):
            self.overdue = True
            records.append(
                Record(
                    "close_overdue",
                    {
                        "decision_id": self.decision_id,
                        "close": self.kind,
                        "round": self.round,
                        "positions_off_target": off_target,
                        "after_s": round(now - self.round_started, 3),
                    },
                    "error",
                )
            )


# ---------------------------------------------------------------------------- helpers


def _sign(x: Decimal | int) -> int:
    return (x > 0) - (x < 0)


def _closable(witnesses: Sequence[Decimal]) -> Decimal:
    """What every witness agrees is there: the smallest, when all are on one side of zero."""
    sides = {_sign(w) for w in witnesses}
    if len(sides) != 1 or 0 in sides:
        return ZERO
    return min(witnesses, key=abs)


def _less_foreign(closable: Decimal, buying: Decimal, selling: Decimal) -> Decimal:
    """What is left to close once working foreign orders on the closing side have filled: the
    foreign sells working against a long position (the buys against a short) count like live
    children of ours, never past zero. Foreign orders on the other side do not count (a fill of
    theirs is new exposure, closed in a later round)."""
    if closable > ZERO:
        return max(ZERO, closable - selling)
    if closable < ZERO:
        return min(ZERO, closable + buying)
    return closable


def _closing_action(quantity: Decimal) -> Side | None:
    if quantity > 0:
        return Side.SELL
    if quantity < 0:
        return Side.BUY
    return None


def _off_target(quantity: Decimal, target: Decimal, tolerance: Decimal) -> bool:
    """Whether a position is further from its target than the tolerance, on the closing side
    (a reduce never adds: a position already below its target is there)."""
    if target == 0 or _sign(quantity) != _sign(target):
        return abs(quantity) > tolerance
    return abs(quantity) > abs(target) + tolerance


def _as_input(
    child: Child, status: ChildStatus, quantity: Decimal, baseline: Decimal
) -> ChildOrder:
    return ChildOrder(
        key=child.key,
        order_ref=child.order_ref,
        action=child.action,
        quantity=quantity,
        filled=ZERO,
        status=status,
        planned_against=baseline,
    )


def child_status(status: str, previous: ChildStatus) -> ChildStatus:
    """A child's status from the broker's order status and what was known before."""
    terminal = _TERMINAL.get(status)
    if terminal is not None:
        return terminal
    if previous in (ChildStatus.REJECTED, ChildStatus.FILLED):
        return previous  # final, even if an earlier status arrives late
    # Working at the broker: even a child given up as lost after a re-sync counts again, so
    # its quantity is never planned twice.
    return ChildStatus.WORKING
