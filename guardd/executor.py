"""The executor: carries out the engine's decisions against the broker, in order, and verifies.

- `CancelAll` sends reqGlobalCancel on the kill lane (every order of the login, every client's).
  It comes first in a kill and waits for no disk: it is idempotent and harmless. While
  disconnected it is deferred: the latch holds, and the engine repeats it on re-sync.
- The decision is journaled right after that cancel (with the latch it sets: the journal is the
  latch's second witness on start), then `LatchHalt` writes the latch file (atomic, fsynced)
  before any closing order. A latch write that fails never stops the kill: the executor carries on
  (sweep, flatten), says the latch is not durable (`latch_durable`, metric, journal) and retries
  the write (`retry_latch`) until it lands. A journal record that cannot be written is logged
  and counted; it never skips an action either.
- `Flatten` / `Reduce` start a close episode: a `_close_loop` that plans child orders with the pure
  planner (`guardd.core.planner`), sends them paced on the flatten lane, re-plans on fills, rejects
  and reconnects, verifies flat from broker-confirmed positions, and escalates (log + journal) when
  not flat in time. It never reports flat unconfirmed.
- `ClearLatch` (an accepted re-arm) rewrites the latch as armed and ends any close episode.
- Dry run: every decision and every child order that would be sent is journaled; nothing is sent.

Every action and its outcome is a journal record. Child orders are journaled with the position
they were planned against BEFORE they are sent, so a restarted guard rebuilds the episode from the
journal and never duplicates a child (`restore_children`).

Children are ours by identity, never by their orderRef label: each child's order id is claimed in
the Book (`Book.claim_order_id`) when it is allocated, before the journal record and the send, and
children are matched to broker orders and fills by our client id and that id (or its permId).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import Any, Literal, Protocol, assert_never
from zoneinfo import ZoneInfo

import structlog

from guardd.broker.pacer import Lane
from guardd.core import planner
from guardd.core.book import Book, Order
from guardd.core.engine import (
    Action,
    Alert,
    CancelAll,
    ClearLatch,
    Decision,
    Flatten,
    LatchHalt,
    Reduce,
)
from guardd.core.events import BrokerError, OrderId
from guardd.core.events import ConId as EventConId
from guardd.errors import GuarddError, JournalError, LatchError
from guardd.journal import Journal, read_journal
from guardd.latch import LatchState, write_latch
from guardd.metrics import Metrics

log = structlog.get_logger(__name__)

_NEW_YORK = ZoneInfo("America/New_York")
_REJECT_CODES = frozenset({201, 203, 10147, 110, 200})
CloseKind = Literal["flatten", "reduce"]


class BrokerPort(Protocol):
    """What the executor needs of the broker adapter (`guardd.broker.ib.IbBroker`)."""

    @property
    def connected(self) -> bool: ...

    def next_order_id(self) -> OrderId: ...

    async def global_cancel(self) -> None: ...

    async def cancel_order(self, order_id: int, lane: Lane) -> None: ...

    async def place_order(
        self,
        order_id: int,
        *,
        con_id: int = 0,
        symbol: str = "",
        sec_type: str = "STK",
        exchange: str = "SMART",
        currency: str = "USD",
        action: str,
        quantity: Decimal | float,
        order_type: str,
        lmt_price: float | None = None,
        order_ref: str = "",
        outside_rth: bool = False,
        account: str | None = None,
        lane: Lane,
    ) -> None: ...


def regular_hours(now: float) -> bool:
    """US equity regular trading hours, 09:30-16:00 New York time, Monday to Friday.

    Holidays are not known here; outside these hours stocks close with marketable limit orders
    (outsideRth), which also work inside them, so a holiday costs nothing but order type.
    """
    t = datetime.fromtimestamp(now, _NEW_YORK)
    minutes = t.hour * 60 + t.minute
    return t.weekday() < 5 and 9 * 60 + 30 <= minutes < 16 * 60


@dataclass(slots=True)
class _Child:
    """One of our close orders, as the executor tracks it through the episode."""

    order_id: int
    ref: str
    key: planner.PositionKey
    action: planner.Action
    quantity: Decimal
    planned_against: Decimal | None
    generation: int  # the Book's connection generation when it was sent
    status: planner.ChildStatus = planner.ChildStatus.PENDING_ACK
    filled: Decimal = Decimal(0)
    finished_at: float | None = None  # when it was first seen finished (filled/cancelled/...)
    retired: bool = False  # its effect is in a fresh confirmed position: no longer planned with

    @property
    def live(self) -> bool:
        return self.status in (planner.ChildStatus.PENDING_ACK, planner.ChildStatus.WORKING)

    def as_input(self, generation: int) -> planner.ChildOrder:
        """The planner's view. A child sent on an earlier connection (or by a previous process)
        keeps its quantity and fills but not its baseline: positions downloaded since are newer
        than it, and an old baseline would overstate a position someone else has since reduced.
        Leaving a baseline out can only make the planner send less, never more."""
        return planner.ChildOrder(
            key=self.key,
            order_ref=self.ref,
            action=self.action,
            quantity=self.quantity,
            filled=min(self.filled, self.quantity),
            status=self.status,
            planned_against=self.planned_against if self.generation == generation else None,
        )


@dataclass(slots=True)
class CloseEpisode:
    """A flatten or reduce in progress, from its decision until confirmed at target."""

    kind: CloseKind
    decision_id: int
    started: float
    targets: dict[planner.PositionKey, Decimal] | None = None
    children: dict[str, _Child] = field(default_factory=dict)
    sequence: int = 1
    escalated: bool = False
    done: bool = False
    rejects_seen: int = 0
    # Positions where fills that are not ours moved the position while our children worked
    # (IB auto-liquidation, another client): our children there are cancelled, and the position
    # is re-planned from the broker's own figure once they have all finished.
    rebase_keys: set[planner.PositionKey] = field(default_factory=set)

    @property
    def decision_ref(self) -> planner.DecisionId:
        return planner.DecisionId(str(self.decision_id))


class Executor:
    """Carries out decisions; owns the close episode task."""

    def __init__(
        self,
        *,
        broker: BrokerPort,
        book: Book,
        journal: Journal,
        latch_path: Path,
        close_policy: planner.ClosePolicy,
        client_id: int,
        account: str,
        dry_run: bool = False,
        flatten_timeout_s: float = 30.0,
        messages_per_second: int = 40,
        metrics: Metrics | None = None,
        clock: Callable[[], float] = time.time,
        round_s: float = 0.1,
        lost_grace_s: float = 2.0,
        latch_on_disk: LatchState | None = None,
        latch_retry_s: float = 1.0,
    ) -> None:
        self.broker = broker
        self.book = book
        self.journal = journal
        self.latch_path = latch_path
        self.close_policy = close_policy
        self.client_id = client_id
        self.account = account
        self.dry_run = dry_run
        self.flatten_timeout_s = flatten_timeout_s
        self.metrics = metrics
        self.clock = clock
        self.round_s = round_s
        # How long after a re-sync a child the broker does not report counts as gone. The fills
        # of the previous connection (reqExecutions) arrive AFTER the position and open-order
        # barriers: judging a child before they are in would forget its fills and over-flatten.
        self.lost_grace_s = lost_grace_s
        self._synced_at: tuple[int, float] | None = None
        # New children per planning round: a quarter of a second's budget, at least one.
        self.round_budget = max(1, messages_per_second // 4)
        self.episode: CloseEpisode | None = None
        self._episode_task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        # The latch as a restart would read it (None: not known yet), the state still to be
        # written when a write failed, and when to try again.
        self.latch_on_disk = latch_on_disk
        self.latch_error: str | None = None
        self.latch_retry_s = latch_retry_s
        self._latch_pending: LatchState | None = None
        self._latch_retry_at = 0.0
        self.global_cancels_sent = 0
        self.last_flat_confirmed: float | None = None
        self._known_execs: set[str] = set()

    # ---- decisions -------------------------------------------------------------------------

    async def carry_out(self, decision: Decision, *, trigger_ts: float | None = None) -> None:
        """Carry out a decision's actions in order and journal it.

        A leading cancel goes out before the decision's journal record (an fsync); everything
        else of the decision after it. Nothing here raises on a latch or journal error.
        """
        actions = decision.actions
        first = 1 if actions and isinstance(actions[0], CancelAll) else 0
        for action in actions[:first]:
            await self._act(action, decision, trigger_ts)
        self._journal_decision(decision)
        for action in actions[first:]:
            await self._act(action, decision, trigger_ts)

    @property
    def latch_durable(self) -> bool:
        """False while a latch write has failed and is being retried."""
        return self._latch_pending is None

    def retry_latch(self) -> None:
        """Retry a failed latch write, at most every `latch_retry_s` (called on the timer)."""
        if self._latch_pending is not None and self.clock() >= self._latch_retry_at:
            self.persist_latch(self._latch_pending, retry=True)

    def persist_latch(self, state: LatchState, *, retry: bool = False) -> bool:
        """Write `state` to the latch file; on failure keep it pending for `retry_latch`.

        On the event loop, not in a thread: the cancel is already out, and a thread hop costs
        more than the write (about 1 ms with fsyncs).
        """
        self._latch_pending = state  # a newer state replaces one still waiting to be written
        try:
            write_latch(self.latch_path, state)
        except LatchError as exc:
            first = self.latch_error is None
            self.latch_error = str(exc)
            self._latch_retry_at = self.clock() + self.latch_retry_s
            if self.metrics is not None:
                self.metrics.set_latch_durable(False)
            if first:  # once per outage, not once per retry
                log.error("latch_not_durable", error=str(exc), halted=state.halted)
                self._journal(
                    "latch_write_failed",
                    decision_id=_int_or_none(state.decision_id),
                    halted=state.halted,
                    error=str(exc),
                )
            return False
        self._latch_pending = None
        self.latch_on_disk = state
        if self.metrics is not None:
            self.metrics.set_latch_durable(True)
        if self.latch_error is not None:
            log.warning("latch_durable_again", halted=state.halted)
            self._journal(
                "latch_durable_again",
                decision_id=_int_or_none(state.decision_id),
                halted=state.halted,
                retry=retry,
            )
        self.latch_error = None
        return True

    async def _act(self, action: Action, decision: Decision, trigger_ts: float | None) -> None:
        match action:
            case LatchHalt(latch=latch):
                state = LatchState(
                    halted=True,
                    reason=latch.reason,
                    source=latch.source,
                    since=latch.since,
                    decision_id=str(latch.decision_id),
                    mode=latch.mode,
                    detail=f"principal={latch.principal}",
                )
                if self.persist_latch(state):
                    self._journal(
                        "latch_written",
                        decision_id=decision.decision_id,
                        reason=latch.reason,
                        source=latch.source,
                        mode=latch.mode,
                    )
                    log.warning("kill_latched", reason=latch.reason, source=latch.source)
            case CancelAll(reason=reason):
                await self._cancel_all(decision, reason, trigger_ts)
            case Flatten():
                self._start_episode("flatten", decision, None)
            case Reduce(target_leverage=target):
                self._start_reduce(decision, target)
            case Alert(level=level, message=message, rule=rule):
                log.warning("alert", level=level, rule=rule, message=message)
                self._journal("alert", decision_id=decision.decision_id, level=level, rule=rule)
            case ClearLatch():
                armed = LatchState(
                    halted=False,
                    reason="re-armed",
                    source="arm",
                    since=self.clock(),
                    decision_id=str(decision.decision_id),
                )
                # A clear that cannot be written leaves the file HALTED: a restart would come
                # back HALTED (the safe side); it is retried and reported like a halt.
                if self.persist_latch(armed):
                    self._journal("latch_cleared", decision_id=decision.decision_id)
                await self.stop_episode("re-armed")
            case _:
                assert_never(action)

    async def _cancel_all(self, decision: Decision, reason: str, trigger_ts: float | None) -> None:
        if self.dry_run:
            self._journal("global_cancel_dry_run", decision_id=decision.decision_id, reason=reason)
            return
        if not self.broker.connected:
            self._journal("global_cancel_deferred", decision_id=decision.decision_id, reason=reason)
            log.warning("global_cancel_deferred", reason=reason)
            return
        try:
            await self.broker.global_cancel()
        except GuarddError as exc:
            self._journal(
                "global_cancel_deferred",
                decision_id=decision.decision_id,
                reason=reason,
                error=str(exc),
            )
            log.warning("global_cancel_deferred", reason=reason, error=str(exc))
            return
        sent = self.clock()
        self.global_cancels_sent += 1
        working = self.book.foreign_working_count
        if self.metrics is not None:
            self.metrics.count_cancelled(working)
            if trigger_ts is not None:
                self.metrics.observe_trigger_to_cancel(max(0.0, sent - trigger_ts))
        self._journal(
            "global_cancel_sent",
            decision_id=decision.decision_id,
            reason=reason,
            working_orders=working,
            latency_s=None if trigger_ts is None else round(sent - trigger_ts, 6),
        )

    # ---- close episodes --------------------------------------------------------------------

    def _start_reduce(self, decision: Decision, target_leverage: float) -> None:
        nl = self.book.net_liquidation
        positions = list(self._confirmed_positions(set()))
        keep = None
        if nl is not None and math.isfinite(nl.value) and nl.value > 0:
            keep = planner.keep_fraction_for_gross(positions, target_leverage * nl.value)
        if keep is None:
            self._journal(
                "reduce_not_planned",
                decision_id=decision.decision_id,
                why="net liquidation or a position value is unknown",
            )
            log.warning("reduce_not_planned", target_leverage=target_leverage)
            return
        # Targets are frozen once per decision: re-computing them each round would keep reducing.
        targets = planner.reduce_targets(positions, keep)
        self._start_episode("reduce", decision, targets)

    def _start_episode(
        self,
        kind: CloseKind,
        decision: Decision,
        targets: dict[planner.PositionKey, Decimal] | None,
    ) -> None:
        current = self.episode
        if current is not None and not current.done:
            if current.kind == kind == "flatten":
                # Already flattening: carry on with the same children. The episode may have been
                # rebuilt from the journal after a restart (`restore_children`) with no task yet.
                self._wake.set()
                self._ensure_task()
                return
            if current.kind == "reduce" and kind == "flatten":
                # A kill during a reduce: flatten takes over, keeping the reduce children so
                # their quantity still counts against the position.
                current.kind = "flatten"
                current.targets = None
                current.escalated = False
                self._journal("reduce_escalated_to_flatten", decision_id=decision.decision_id)
                self._wake.set()
                self._ensure_task()
                return
        self.episode = CloseEpisode(
            kind=kind, decision_id=decision.decision_id, started=self.clock(), targets=targets
        )
        self._journal("close_started", decision_id=decision.decision_id, close=kind)
        log.warning("close_started", kind=kind, decision_id=decision.decision_id)
        self._ensure_task()

    def _ensure_task(self) -> None:
        if self._episode_task is None or self._episode_task.done():
            self._episode_task = asyncio.create_task(self._close_loop(), name="close_loop")

    def restore_children(self, decision_id: int, records: Iterable[Mapping[str, Any]]) -> int:
        """Rebuild a close episode's children from journal records after a restart, and claim
        their order ids in the Book: they are ours again (and no other order is)."""
        episode = self.episode
        if episode is None or episode.decision_id != decision_id:
            episode = CloseEpisode(kind="flatten", decision_id=decision_id, started=self.clock())
            self.episode = episode
        count = 0
        for rec in records:
            if rec.get("kind") != "child_order_sent" or rec.get("decision_id") != decision_id:
                continue
            ref = str(rec["order_ref"])
            key = planner.PositionKey(
                planner.AccountId(str(rec["account"])), planner.ConId(int(rec["con_id"]))
            )
            baseline = rec.get("planned_against")
            self.book.claim_order_id(OrderId(int(rec["order_id"])))
            episode.children[ref] = _Child(
                order_id=int(rec["order_id"]),
                ref=ref,
                key=key,
                action=planner.Action(str(rec["action"])),
                quantity=Decimal(str(rec["quantity"])),
                planned_against=None if baseline is None else Decimal(str(baseline)),
                generation=-1,  # from a previous life: lost unless the broker reports it
            )
            episode.sequence = max(episode.sequence, _sequence_of(ref) + 1)
            count += 1
        return count

    def notice(self) -> None:
        """Something changed in the Book: let the close loop re-plan now."""
        if self.episode is not None and not self.episode.done:
            self._wake.set()

    def on_broker_error(self, error: BrokerError) -> None:
        """A reject of one of our children (201 etc. with its order id)."""
        episode = self.episode
        if episode is None or error.code not in _REJECT_CODES:
            return
        for child in episode.children.values():
            if child.order_id == error.req_id and child.status in (
                planner.ChildStatus.PENDING_ACK,
                planner.ChildStatus.WORKING,
            ):
                child.status = planner.ChildStatus.REJECTED
                episode.rejects_seen += 1
                self._journal(
                    "child_order_rejected",
                    decision_id=episode.decision_id,
                    order_ref=child.ref,
                    code=error.code,
                    message=error.message,
                )
                log.warning("child_order_rejected", order_ref=child.ref, code=error.code)
                self._wake.set()

    async def stop_episode(self, why: str) -> None:
        """End the close episode (re-armed, shutting down)."""
        if self.episode is not None and not self.episode.done:
            self.episode.done = True
            self._journal("close_stopped", decision_id=self.episode.decision_id, why=why)
        task = self._episode_task
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._episode_task = None

    async def _close_loop(self) -> None:
        backoff = 0.0
        rejects: int | None = None  # after the previous round
        filled: Decimal | None = None
        while True:
            episode = self.episode
            if episode is None or episode.done:
                return
            if backoff > 0:
                # A rejected close (market closed...): retry slower, whatever wakes us meanwhile.
                await asyncio.sleep(backoff)
            else:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), timeout=self.round_s)
            self._wake.clear()
            if not self.book.synced or (not self.broker.connected and not self.dry_run):
                continue
            try:
                await self._close_round(episode)
            except Exception as exc:  # the flatten must outlive any one bad round
                log.exception("close_round_failed", error=str(exc))
                self._journal("close_round_failed", decision_id=episode.decision_id, error=str(exc))
                backoff = min(10.0, max(0.5, backoff * 2))
                continue
            # Back off while children keep being rejected (counted between rounds too); any
            # fill is progress and ends the back-off.
            now_filled = sum((c.filled for c in episode.children.values()), Decimal(0))
            if filled is not None and now_filled > filled:
                backoff = 0.0
            elif rejects is not None and episode.rejects_seen > rejects:
                backoff = min(10.0, max(0.5, backoff * 2))
            rejects, filled = episode.rejects_seen, now_filled

    async def _close_round(self, episode: CloseEpisode) -> None:
        now = self.clock()
        self._refresh_children(episode, now)
        await self._watch_foreign_fills(episode, now)
        self._retire_settled(episode, now)
        keys = {c.key for c in episode.children.values()}
        all_positions = list(self._confirmed_positions(keys))
        # A position waiting to be re-planned from the broker's figure gets no new child.
        positions = [p for p in all_positions if p.key not in episode.rebase_keys]
        children = [
            c.as_input(self.book.generation)
            for c in episode.children.values()
            if not c.retired and c.key not in episode.rebase_keys
        ]
        if episode.kind == "reduce" and episode.targets is not None:
            plan = planner.plan_reduce(
                positions,
                children,
                episode.targets,
                self.close_policy,
                decision_id=episode.decision_ref,
                budget=self.round_budget,
                sequence_start=episode.sequence,
            )
        else:
            plan = planner.plan_flatten(
                positions,
                children,
                self.close_policy,
                decision_id=episode.decision_ref,
                budget=self.round_budget,
                sequence_start=episode.sequence,
            )
        for note in plan.notes:
            if note.kind in (planner.NoteKind.OVER_WORKING, planner.NoteKind.PAST_TARGET):
                log.error("close_note", kind=str(note.kind), con_id=note.key.con_id)
        for order in plan.orders:
            await self._send_child(episode, order)
        if self.dry_run:
            episode.done = True
            self._journal("close_dry_run_planned", decision_id=episode.decision_id)
            return
        live = any(
            c.status in (planner.ChildStatus.PENDING_ACK, planner.ChildStatus.WORKING)
            for c in episode.children.values()
        )
        pending = self._positions_off_target(episode, all_positions)
        if self.metrics is not None:
            overdue = now - episode.started > self.flatten_timeout_s
            self.metrics.set_flatten(pending, overdue and pending > 0)
        if pending == 0 and not live and not plan.orders and not episode.rebase_keys:
            episode.done = True
            self.last_flat_confirmed = now
            kind = "flat_confirmed" if episode.kind == "flatten" else "reduce_confirmed"
            self._journal(kind, decision_id=episode.decision_id, children=len(episode.children))
            log.warning(kind, decision_id=episode.decision_id, children=len(episode.children))
            return
        if not episode.escalated and now - episode.started > self.flatten_timeout_s:
            episode.escalated = True
            self._journal(
                "close_overdue",
                decision_id=episode.decision_id,
                close=episode.kind,
                positions_off_target=pending,
                after_s=round(now - episode.started, 3),
            )
            log.error("close_overdue", kind=episode.kind, positions_off_target=pending)

    def _positions_off_target(
        self, episode: CloseEpisode, positions: Iterable[planner.ConfirmedPosition]
    ) -> int:
        off = 0
        for p in positions:
            target = Decimal(0)
            if episode.targets is not None:
                target = episode.targets.get(p.key, p.quantity)
            if p.quantity != target:
                off += 1
        return off

    async def _send_child(self, episode: CloseEpisode, order: planner.NewChildOrder) -> None:
        position = self.book.position(EventConId(order.key.con_id), order.key.account)
        assert position is not None  # the planner only closes positions it was given
        episode.sequence = max(episode.sequence, _sequence_of(order.order_ref) + 1)
        if self.dry_run:
            self._journal(
                "child_order_dry_run",
                decision_id=episode.decision_id,
                order_ref=order.order_ref,
                symbol=order.symbol,
                action=str(order.action),
                quantity=str(order.quantity),
                order_type=str(order.order_type),
            )
            return
        order_id = int(self.broker.next_order_id())
        # Ours from this instant (the Book knows our orders by id, not by label), before the
        # journal record and the send: the broker's first report of it is already own.
        self.book.claim_order_id(OrderId(order_id))
        child = _Child(
            order_id=order_id,
            ref=order.order_ref,
            key=order.key,
            action=order.action,
            quantity=order.quantity,
            planned_against=order.planned_against,
            generation=self.book.generation,
        )
        episode.children[child.ref] = child
        # Journaled before it is sent: a restart must know this child may exist.
        self._journal(
            "child_order_sent",
            decision_id=episode.decision_id,
            order_id=order_id,
            order_ref=order.order_ref,
            account=order.key.account,
            con_id=order.key.con_id,
            symbol=order.symbol,
            action=str(order.action),
            quantity=str(order.quantity),
            order_type=str(order.order_type),
            limit_price=order.limit_price,
            planned_against=str(order.planned_against),
        )
        if self.metrics is not None:
            self.metrics.count_flatten_child()
        try:
            await self.broker.place_order(
                order_id,
                con_id=position.con_id,
                symbol=position.symbol,
                sec_type=position.sec_type,
                exchange=position.exchange or "SMART",
                currency=position.currency,
                action=str(order.action),
                quantity=order.quantity,
                order_type=str(order.order_type),
                lmt_price=order.limit_price,
                order_ref=order.order_ref,
                outside_rth=order.outside_rth,
                account=order.key.account,
                lane=Lane.FLATTEN,
            )
        except GuarddError as exc:
            # It may or may not have reached the socket: it stays pending until a re-sync
            # shows whether the broker has it (never a duplicate in between).
            log.warning("child_order_send_failed", order_ref=child.ref, error=str(exc))

    def _synced_for(self, now: float) -> float:
        """Seconds the Book has been synced on its current connection (0 while unsynced)."""
        if not self.book.synced:
            self._synced_at = None
            return 0.0
        if self._synced_at is None or self._synced_at[0] != self.book.generation:
            self._synced_at = (self.book.generation, now)
        return now - self._synced_at[1]

    def _refresh_children(self, episode: CloseEpisode, now: float) -> None:
        """Bring each child's status and fill up to date from the Book (orders and executions)."""
        # By identity (our client id and an order id we claimed, or its learned permId), never
        # by orderRef: a stranger's order labelled like our child is not our child. Claimed ids
        # are never handed out twice (`reserve_order_ids`), so one id names one child.
        book = self.book
        by_id: dict[int, Order] = {}
        for order in book.orders.values():
            oid = book.own_order_id(order.perm_id, order.client_id, order.order_id)
            if oid is not None and (order.perm_id > 0 or int(oid) not in by_id):
                by_id[int(oid)] = order
        fills: dict[int, Decimal] = {}
        for execution in book.executions.values():
            oid = book.own_order_id(execution.perm_id, execution.client_id, execution.order_id)
            if oid is not None:
                fills[int(oid)] = fills.get(int(oid), Decimal(0)) + Decimal(str(execution.shares))
        settled = self._synced_for(now) >= self.lost_grace_s
        for child in episode.children.values():
            found = by_id.get(child.order_id)
            filled = fills.get(child.order_id, Decimal(0))
            was_live = child.live
            if found is not None:
                filled = max(filled, Decimal(str(found.filled)))
                child.status = _child_status(found.status, child.status)
                if was_live and child.status == planner.ChildStatus.REJECTED:
                    episode.rejects_seen += 1
            elif (
                child.status == planner.ChildStatus.PENDING_ACK
                and settled
                and self.book.generation != child.generation
                and max(child.filled, filled) < child.quantity
            ):
                # Re-synced since it was sent (and its fills have had time to arrive) and the
                # broker does not report it working: it never reached the broker, or it was
                # cancelled meanwhile. Either way it is finished with the fills it has.
                child.status = planner.ChildStatus.CANCELLED
                self._journal(
                    "child_order_lost",
                    decision_id=episode.decision_id,
                    order_ref=child.ref,
                    filled=str(max(child.filled, filled)),
                )
            child.filled = max(child.filled, filled)
            if child.filled >= child.quantity and child.status != planner.ChildStatus.REJECTED:
                child.status = planner.ChildStatus.FILLED
            if child.live:
                child.finished_at = None
            elif child.finished_at is None:
                child.finished_at = now

    async def _watch_foreign_fills(self, episode: CloseEpisode, now: float) -> None:
        """Fills on our positions that are not ours: cancel our children there and re-plan.

        The planner's bound assumes our children are the only ones closing a position; IB's own
        auto-liquidation or another client trading it breaks that. Only fills reported live
        (not answers to reqExecutions, which are history) since the episode began are news.
        """
        keys = {c.key for c in episode.children.values() if not c.retired}
        for exec_id, execution in self.book.executions.items():
            if exec_id in self._known_execs:
                continue
            self._known_execs.add(exec_id)
            if (
                not execution.live
                or execution.ts < episode.started
                or self.book.is_own_execution(execution)
            ):
                continue
            key = planner.PositionKey(
                planner.AccountId(execution.account), planner.ConId(execution.con_id)
            )
            if key not in keys or key in episode.rebase_keys:
                continue
            episode.rebase_keys.add(key)
            self._journal(
                "foreign_fill_on_close",
                decision_id=episode.decision_id,
                con_id=execution.con_id,
                symbol=execution.symbol,
                side=execution.side,
                shares=execution.shares,
                order_ref=execution.order_ref,
            )
            log.warning("foreign_fill_on_close", symbol=execution.symbol, shares=execution.shares)
            for child in episode.children.values():
                if child.key == key and child.live and not self.dry_run:
                    with contextlib.suppress(GuarddError):
                        await self.broker.cancel_order(child.order_id, Lane.FLATTEN)

    def _retire_settled(self, episode: CloseEpisode, now: float) -> None:
        """Stop planning with finished children whose effect a fresh position already shows.

        - after a re-sync has settled, children sent on an earlier connection (or by a previous
          process) that finished `lost_grace_s` ago: the positions since contain their fills,
          and their old baselines may be stale (another client traded meanwhile);
        - on a position awaiting a re-plan after foreign fills, every child once none is live
          and the last finished `lost_grace_s` ago (time for the position update to arrive).
        """
        settled = self._synced_for(now) >= self.lost_grace_s
        if not settled:
            return
        for key in list(episode.rebase_keys):
            mine = [c for c in episode.children.values() if c.key == key and not c.retired]
            if any(c.live for c in mine):
                continue
            last = max((c.finished_at or now for c in mine), default=now - self.lost_grace_s)
            if now - last < self.lost_grace_s:
                continue
            for child in mine:
                child.retired = True
            episode.rebase_keys.discard(key)
            self._journal("close_replanned", decision_id=episode.decision_id, con_id=key.con_id)
        for child in episode.children.values():
            if (
                not child.retired
                and not child.live
                and child.generation != self.book.generation
                and child.finished_at is not None
                and now - child.finished_at >= self.lost_grace_s
            ):
                child.retired = True

    def _confirmed_positions(
        self, keys: set[planner.PositionKey]
    ) -> Iterable[planner.ConfirmedPosition]:
        """Broker-confirmed positions of the guarded account (non-zero, or with our children)."""
        rth = regular_hours(self.clock())
        for p in self.book.positions.values():
            if p.account != self.account:
                continue
            key = planner.PositionKey(planner.AccountId(p.account), planner.ConId(p.con_id))
            if p.quantity == 0 and key not in keys:
                continue
            price = self.book.quote(p.con_id).reference
            if not math.isfinite(price) and p.value is not None and p.quantity:
                price = abs(p.value / (p.quantity * (p.multiplier or 1.0)))
            yield planner.ConfirmedPosition(
                key=key,
                symbol=p.symbol,
                sec_type=p.sec_type,
                exchange=p.exchange,
                currency=p.currency,
                quantity=Decimal(str(p.quantity)),
                price=price if math.isfinite(price) and price > 0 else None,
                fx_rate=self.book.exchange_rate(p.currency),
                multiplier=p.multiplier or 1.0,
                # The Book does not know contract tick sizes; futures close with MKT by default.
                min_tick=Decimal("0.01"),
                regular_hours=rth or p.sec_type != "STK",
            )

    def _journal_decision(self, decision: Decision) -> None:
        latch = next((a.latch for a in decision.actions if isinstance(a, LatchHalt)), None)
        self._journal(
            "decision",
            decision_id=decision.decision_id,
            state=str(decision.state),
            previous_state=str(decision.previous_state),
            actions=[type(a).__name__ for a in decision.actions],
            reasons=list(decision.reasons),
            refused=decision.refused,
            # What the latch file is about to say: the journal's witness of the kill on start.
            latch=None
            if latch is None
            else {
                "reason": latch.reason,
                "source": latch.source,
                "principal": latch.principal,
                "mode": latch.mode,
                "since": latch.since,
            },
        )

    def _journal(self, kind: str, **fields: Any) -> None:
        """Journal a record; a record that cannot be written is logged and counted, and the
        caller carries on (no journal error may skip a cancel or a close)."""
        fields.setdefault("account", self.account)
        if self.dry_run:
            fields["dry_run"] = True
        try:
            self.journal.append(kind, **fields)
        except JournalError as exc:
            log.error("journal_write_failed", record=kind, error=str(exc))
            if self.metrics is not None:
                self.metrics.count_journal_error()


def _child_status(status: str, previous: planner.ChildStatus) -> planner.ChildStatus:
    if status == "Filled":
        return planner.ChildStatus.FILLED
    if status in ("Cancelled", "ApiCancelled"):
        return planner.ChildStatus.CANCELLED
    if status == "Inactive":
        return planner.ChildStatus.REJECTED
    if previous == planner.ChildStatus.REJECTED:
        return previous  # a broker reject is final, even if an earlier status arrives late
    # Working at the broker: even a child given up as lost after a re-sync counts again, so
    # its quantity is never planned twice.
    return planner.ChildStatus.WORKING


def _int_or_none(value: str | None) -> int | None:
    return int(value) if value is not None and value.isdecimal() else None


def _sequence_of(order_ref: str) -> int:
    try:
        return int(order_ref.rsplit(":", 1)[1])
    except (IndexError, ValueError):
        return 0


def journal_order_ids(path: Path) -> set[int]:
    """Every order id the journal says guardd sent (or was about to send), any decision."""
    if not path.exists():
        return set()
    return {
        int(rec["order_id"])
        for rec in read_journal(path)
        if rec.get("kind") == "child_order_sent" and rec.get("order_id") is not None
    }


def journal_children(path: Path, decision_id: int) -> list[dict[str, Any]]:
    """The `child_order_sent` records of one decision, for `Executor.restore_children`."""
    if not path.exists():
        return []
    return [
        rec
        for rec in read_journal(path)
        if rec.get("kind") == "child_order_sent" and rec.get("decision_id") == decision_id
    ]
