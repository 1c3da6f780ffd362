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
- `Flatten` / `Reduce` start a close episode (`guardd.core.close.CloseEpisode`, pure): a
  `_close_loop` that, every round, hands the episode what the Book shows (positions, our
  children's orders and every execution) and carries out what it returns: cancels and child
  orders, paced on the flatten lane, and facts for the journal. The episode lasts while the
  engine stays HALTED in flatten mode (or REDUCING): exposure that appears after "flat
  confirmed" starts a new close round. Every decision about what to close is the episode's,
  re-pricing included (a close limit that does not fill is cancelled and replaced one
  escalation step up, `guardd.core.pricing`); the executor only does the I/O. While children
  keep being rejected (market closed...) or a round fails, rounds are spaced under the retry
  policy (`CLOSE_RETRY`, `guardd.retry`); any fill ends the back-off.
- `ClearLatch` (an accepted re-arm) rewrites the latch as armed and ends any close episode; a
  reduce episode ends when the engine leaves REDUCING.
- Dry run: every decision and every child order that would be sent is journaled; nothing is sent.

Every action and its outcome is a journal record. Child orders are journaled with the position
they were planned against BEFORE they are sent, so a restarted guard rebuilds the episode from the
journal and never duplicates a child (`restore_children`). A round's records (its facts and every
child's `child_order_sent`) are one batch with one fsync, written before the first of its children
is handed to the sender; the sends are then queued together (not awaited one by one), and the next
round is planned as soon as at most `plan_ahead` children (two rounds) still wait for the socket, so
the pacer never runs dry between rounds. Why a batch is as safe as a record per child: see
`_close_round`.

Children are ours by identity, never by their orderRef label: each child's order id is claimed in
the Book (`Book.claim_order_id`) when it is allocated, before the journal record and the send, and
children are matched to broker orders and fills by our client id and that id (or its permId).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import Any, assert_never
from zoneinfo import ZoneInfo

import structlog

from guardd.broker.pacer import Lane
from guardd.broker.port import BrokerPort
from guardd.core import planner
from guardd.core.book import Book, Position
from guardd.core.close import (
    CloseEpisode,
    CloseSettings,
    Fill,
    Held,
    Observation,
    OrderReport,
    Record,
)
from guardd.core.engine import (
    Action,
    Alert,
    CancelAll,
    ClearLatch,
    Decision,
    Flatten,
    Latch,
    LatchHalt,
    Reduce,
    State,
)
from guardd.core.events import BrokerMessage, ConId, OrderId
from guardd.core.hours import Session
from guardd.core.ibcodes import IbCode
from guardd.errors import GuarddError, JournalError, LatchError
from guardd.metrics import Metrics
from guardd.retry import Backoff, RetryPolicy
from guardd.state.journal import Journal
from guardd.state.latch import Armed, LatchFile, LatchWriter

log = structlog.get_logger(__name__)

_NEW_YORK = ZoneInfo("America/New_York")

CLOSE_RETRY = RetryPolicy(initial_s=0.5, max_s=10.0)
"""The close loop's back-off while children keep being rejected (market closed...) or a round
fails; any fill ends it."""


def regular_hours(now: float) -> bool:
    """US equity regular trading hours, 09:30-16:00 New York time, Monday to Friday.

    Holidays are not known here; outside these hours stocks close with marketable limit orders
    (outsideRth), which also work inside them, so a holiday costs nothing but order type.
    """
    t = datetime.fromtimestamp(now, _NEW_YORK)
    minutes = t.hour * 60 + t.minute
    return t.weekday() < 5 and 9 * 60 + 30 <= minutes < 16 * 60


def market_session(book: Book, con_id: int, sec_type: str, now: float) -> Session:
    """The contract's session now: from its contract hours (contractDetails, judged at the
    gateway's clock) when the Book has them; without them a stock is taken to keep US equity
    hours (`regular_hours`, never "closed": it is then closed with limits that also work in
    extended hours) and any other contract to be in its regular session."""
    session = book.market_session(con_id, now)
    if session != "unknown":
        return session
    if sec_type == "STK" and not regular_hours(now + book.server_offset_s):
        return "extended"
    return "regular"


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
        latch_on_disk: LatchFile | None = None,
        latch_writer: LatchWriter | None = None,
        latch_retry_s: float = 1.0,
        close_retry: RetryPolicy = CLOSE_RETRY,
        close_settings: CloseSettings | None = None,
        on_close_record: Callable[[Record], None] | None = None,
    ) -> None:
        self.broker = broker
        self.book = book
        self.journal = journal
        self.latch_path = latch_path
        self.close_policy = close_policy
        self.client_id = client_id
        self.account = account
        self.dry_run = dry_run
        self.metrics = metrics
        self.clock = clock
        self.round_s = round_s
        self.close_retry = close_retry
        # How the episode judges the broker's data (guardd.core.close: its assumptions).
        self.close_settings = close_settings or CloseSettings(
            client_id=client_id, overdue_s=flatten_timeout_s
        )
        self._synced_at: tuple[int, float] | None = None
        # New children per planning round: a quarter of a second's budget, at least one.
        self.round_budget = max(1, messages_per_second // 4)
        # The next round is planned once at most this many children still wait for the socket
        # (two rounds, half a second of sends): the pacer never runs dry while a round is
        # planned, even when planning 1,000 positions takes 100-300 ms on a busy host. Measured
        # at 1,000 positions: half a round ahead x1.32 of the pacing bound, one round x1.08,
        # two rounds x1.06 (one run each, load 1.2-3.3).
        self.plan_ahead = 2 * self.round_budget
        self.episode: CloseEpisode | None = None
        self._episode_task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        # This round's child sends still on their way to the socket (cancelled with the episode).
        self._sends: list[asyncio.Task[None]] = []
        # The latch as a restart would read it (None: not known yet), the state still to be
        # written when a write failed, and when to try again.
        self.latch_on_disk = latch_on_disk
        self.latch_error: str | None = None
        self.latch_retry_s = latch_retry_s
        self._latch_pending: LatchFile | None = None
        self._latch_retry_at = 0.0
        # Opened by the caller before any flood, its descriptors held in reserve (Guard.open);
        # None: opened on the first write.
        self._latch_writer = latch_writer
        self.last_flat_confirmed: float | None = None
        # An order id of ours was refused (103): ask the gateway (reqIds) before the next child.
        self.order_ids_in_doubt = False
        # Told every fact of a close episode after it is journaled (the app's notifications:
        # "flat confirmed"); it must not raise or block.
        self.on_close_record = on_close_record

    # ---- decisions -------------------------------------------------------------------------

    async def carry_out(self, decision: Decision, *, trigger_ts: float | None = None) -> None:
        """Carry out a decision's actions in order and journal it.

        A leading cancel goes out before the decision's journal record (an fsync); everything
        else of the decision after it. Nothing here raises on a latch or journal error. A leading
        cancel that raises, or is cancelled while it waits for the 1 s window (a shutdown, a
        control handler cancelled), still leaves the decision journaled and its latch written
        before the exception goes on: HALTED must outlive whatever became of the cancel (the
        re-sync sweep and the restart repeat it).
        """
        actions = decision.actions
        first = 1 if actions and isinstance(actions[0], CancelAll) else 0
        try:
            for action in actions[:first]:
                await self._act(action, decision, trigger_ts)
        except BaseException:
            self._journal_decision(decision)
            for action in actions[first:]:
                if isinstance(action, LatchHalt):
                    self._latch_halt(action.latch, decision)
            raise
        self._journal_decision(decision)
        for action in actions[first:]:
            await self._act(action, decision, trigger_ts)
        # A reduce episode lasts while the engine stays REDUCING: it ends with the first decision
        # in another state (a kill in flatten mode has turned it into a flatten by then).
        episode = self.episode
        if (
            episode is not None
            and episode.kind == "reduce"
            and decision.state is not State.REDUCING
        ):
            await self.stop_episode(f"state {decision.state}")

    @property
    def latch_durable(self) -> bool:
        """False while a latch write has failed and is being retried."""
        return self._latch_pending is None

    def retry_latch(self) -> None:
        """Retry a failed latch write, at most every `latch_retry_s` (called on the timer)."""
        if self._latch_pending is not None and self.clock() >= self._latch_retry_at:
            self.persist_latch(self._latch_pending, retry=True)

    def persist_latch(self, state: LatchFile, *, retry: bool = False) -> bool:
        """Write `state` to the latch file; on failure keep it pending for `retry_latch`.

        On the event loop, not in a thread: the cancel is already out, and a thread hop costs
        more than the write (about 1 ms with fsyncs).
        """
        self._latch_pending = state  # a newer state replaces one still waiting to be written
        halted = isinstance(state, Latch)
        try:
            self._writer().write(state)
        except LatchError as exc:
            first = self.latch_error is None
            self.latch_error = str(exc)
            self._latch_retry_at = self.clock() + self.latch_retry_s
            if self.metrics is not None:
                self.metrics.set_latch_durable(False)
            if first:  # once per outage, not once per retry
                log.error("latch_not_durable", error=str(exc), halted=halted)
                self._journal(
                    "latch_write_failed",
                    decision_id=state.decision_id or None,
                    halted=halted,
                    error=str(exc),
                )
            return False
        self._latch_pending = None
        self.latch_on_disk = state
        if self.metrics is not None:
            self.metrics.set_latch_durable(True)
        if self.latch_error is not None:
            log.warning("latch_durable_again", halted=halted)
            self._journal(
                "latch_durable_again",
                decision_id=state.decision_id or None,
                halted=halted,
                retry=retry,
            )
        self.latch_error = None
        return True

    def _writer(self) -> LatchWriter:
        """The latch writer for ``latch_path`` (reopened if the path changed or it failed to
        open); ``LatchError`` if the directory cannot be opened."""
        writer = self._latch_writer
        if writer is None or writer.path != self.latch_path:
            if writer is not None:
                writer.close()
                self._latch_writer = None
            writer = self._latch_writer = LatchWriter(self.latch_path)
        return writer

    def close(self) -> None:
        """Release the latch writer's descriptors (at the end of a run)."""
        if self._latch_writer is not None:
            self._latch_writer.close()
            self._latch_writer = None

    async def _act(self, action: Action, decision: Decision, trigger_ts: float | None) -> None:
        match action:
            case LatchHalt(latch=latch):
                self._latch_halt(latch, decision)
            case CancelAll(reason=reason):
                await self._cancel_all(decision, reason, trigger_ts)
            case Flatten():
                self._start_episode("flatten", decision, None)
            case Reduce(target_leverage=target):
                self._start_reduce(decision, target)
            case Alert(level=level, message=message, rule=rule):
                log.warning("alert", level=level, rule=rule, message=message)
                self._journal("alert", decision_id=decision.decision_id, level=level, rule=rule)
            case ClearLatch(principal=principal, reason=reason):
                armed = Armed(
                    reason="re-armed",
                    source="arm",
                    principal=principal,
                    since=self.clock(),
                    decision_id=decision.decision_id,
                    detail=reason,
                )
                # A clear that cannot be written leaves the file HALTED: a restart would come
                # back HALTED (the safe side); it is retried and reported like a halt.
                if self.persist_latch(armed):
                    self._journal("latch_cleared", decision_id=decision.decision_id)
                await self.stop_episode("re-armed")
            case _:
                assert_never(action)

    def _latch_halt(self, latch: Latch, decision: Decision) -> None:
        if self.persist_latch(latch):
            self._journal(
                "latch_written",
                decision_id=decision.decision_id,
                reason=latch.reason,
                source=latch.source,
                mode=latch.mode,
            )
            log.warning("kill_latched", reason=latch.reason, source=latch.source)

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
        positions = list(self._confirmed_positions())
        keep = None
        if any(True for _ in self.book.unknown_positions()):
            self._journal(
                "reduce_not_planned",
                decision_id=decision.decision_id,
                why="a position quantity is unknown (IB left it unset)",
            )
            log.warning("reduce_not_planned", target_leverage=target_leverage)
            return
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
        kind: planner.CloseKind,
        decision: Decision,
        targets: dict[planner.PositionKey, Decimal] | None,
    ) -> None:
        current = self.episode
        if current is not None:
            if current.kind == kind == "flatten":
                # Already flattening (or keeping flat): carry on with the same children. The
                # episode may have been rebuilt from the journal (`restore_children`), no task yet.
                self._wake.set()
                self._ensure_task()
                return
            # A kill during a reduce, or a new reduce target: the same episode goes on, so every
            # child, fill and anchor still counts (children are never dropped in an episode).
            current.retarget(kind, targets, self.clock())
            self._journal(
                "close_retargeted",
                decision_id=current.decision_id,
                by_decision_id=decision.decision_id,
                close=kind,
            )
            self._wake.set()
            self._ensure_task()
            return
        self.episode = CloseEpisode(
            kind, decision.decision_id, self.clock(), self.close_settings, targets
        )
        self._journal("close_started", decision_id=decision.decision_id, close=kind)
        log.warning("close_started", kind=kind, decision_id=decision.decision_id)
        self._wake.set()  # the first round at once, not one round period later
        self._ensure_task()

    def _ensure_task(self) -> None:
        if self._episode_task is None or self._episode_task.done():
            self._episode_task = asyncio.create_task(self._close_loop(), name="close_loop")

    def restore_children(self, decision_id: int, records: Iterable[Mapping[str, Any]]) -> int:
        """Rebuild a close episode's children (and anchors) from journal records after a
        restart, and claim their order ids in the Book, with the permId journaled when the
        broker first reported each (`child_order_acknowledged`): they are ours again, by id and
        by permId, and no other order is. How many children."""
        episode = self.episode
        if episode is None or episode.decision_id != decision_id:
            episode = CloseEpisode("flatten", decision_id, self.clock(), self.close_settings)
            self.episode = episode
        records = list(records)
        perms = {
            int(rec["order_id"]): int(rec["perm_id"])
            for rec in records
            if rec.get("kind") == "child_order_acknowledged"
            and rec.get("decision_id") == decision_id
            and rec.get("order_id") is not None
            and rec.get("perm_id") is not None
        }
        for rec in records:
            if rec.get("kind") == "child_order_sent" and rec.get("decision_id") == decision_id:
                order_id = int(rec["order_id"])
                self.book.claim_order_id(OrderId(order_id), perms.get(order_id))
        return episode.restore(records)

    def notice(self) -> None:
        """Something changed in the Book: let the close loop re-plan now."""
        if self.episode is not None:
            self._wake.set()

    def on_broker_message(self, error: BrokerMessage) -> None:
        """An error naming one of our children's order ids: a reject (201 etc.), a refused id
        (103) or API (321), or the broker's answer to one of our cancels, which the episode
        tells apart (`CloseEpisode.broker_error`). After a refused id the next child waits for
        reqIds."""
        episode = self.episode
        if episode is None:
            return
        record = episode.broker_error(error.req_id, error.code, error.message, self.clock())
        if record is None:
            return
        if record.kind == "child_order_refused" and error.code == IbCode.DUPLICATE_ORDER_ID:
            self.order_ids_in_doubt = True
        self._journal_record(record)
        self._wake.set()

    async def stop_episode(self, why: str) -> None:
        """End the close episode (re-armed, left REDUCING, shutting down)."""
        episode, self.episode = self.episode, None
        if episode is not None:
            self._journal("close_stopped", decision_id=episode.decision_id, why=why)
        task = self._episode_task
        if task is not None and not task.done() and task is not asyncio.current_task():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._episode_task = None
        # Children still queued for the socket are not sent (the pacer skips a cancelled one).
        sends, self._sends = self._sends, []
        for send in sends:
            send.cancel()
        await asyncio.gather(*sends, return_exceptions=True)
        self.broker.closing(())
        if self.metrics is not None:
            self.metrics.set_flatten(0, False)
            self.metrics.set_close_waiting_for_open(0)

    async def _close_loop(self) -> None:
        backoff = Backoff(self.close_retry)
        delay = 0.0  # between rounds while children keep being rejected
        rejects: int | None = None  # after the previous round
        filled: Decimal | None = None
        queued = False  # the previous round queued children
        while True:
            episode = self.episode
            if episode is None:
                return
            if delay > 0:
                # A rejected close (market closed...): retry slower, whatever wakes us meanwhile.
                await asyncio.sleep(delay)
            elif queued:
                # More may be left to close than one round's budget: plan the next round while
                # the last of this one's children are still queued, not after a wake-up.
                await self._until_queued(self.plan_ahead)
            else:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), timeout=self.round_s)
            self._wake.clear()
            queued = False
            if episode is not self.episode:
                continue
            if not self.book.synced or (not self.broker.connected and not self.dry_run):
                continue
            if self.book.read_only and not self.dry_run:
                continue  # every order would be refused (321): wait until it is lifted
            try:
                queued = await self._close_round(episode)
            except Exception as exc:  # the flatten must outlive any one bad round
                log.exception("close_round_failed", error=str(exc))
                self._journal("close_round_failed", decision_id=episode.decision_id, error=str(exc))
                delay = backoff.next()
                continue
            if self.dry_run:
                self._journal("close_dry_run_planned", decision_id=episode.decision_id)
                return
            # Back off while children keep being rejected (counted between rounds too); any
            # fill is progress and ends the back-off.
            now_filled = sum((c.filled for c in episode.children.values()), Decimal(0))
            if filled is not None and now_filled > filled:
                backoff.reset()
                delay = 0.0
            elif rejects is not None and episode.rejects_seen > rejects:
                delay = backoff.next()
            rejects, filled = episode.rejects_seen, now_filled

    async def _close_round(self, episode: CloseEpisode) -> bool:
        """Plan one round and carry it out; True when it queued children.

        The round's facts and its children's records go to the journal in one batch (one fsync)
        before any child is handed to the sender: a child that reached the gateway always has
        its durable `child_order_sent` record, so a restarted guard restores it and never sends
        its quantity twice. A crash after the fsync and before a send leaves a record of a
        child that never left; the restarted episode counts it as possibly working until a
        re-sync shows the broker does not have it (assumption A5), as it always did.
        """
        now = self.clock()
        observation = self._observe(now, episode)
        plan = episode.step(observation, self.close_policy, self.round_budget)
        # The prices of what is being closed go ahead of other traffic (the pacer's CLOSE_DATA).
        self.broker.closing(
            {k.con_id for k, held in observation.positions.items() if held.position.quantity}
            | {c.key.con_id for c in episode.children.values() if c.live}
        )
        in_doubt = bool(plan.orders) and self.order_ids_in_doubt and not self.dry_run
        children = [] if in_doubt else self._new_children(episode, plan.orders)
        self._journal_round(episode, plan.records, children)
        for record in plan.records:
            if record.kind == "flat_confirmed" or record.kind == "reduce_confirmed":
                self.last_flat_confirmed = now
        for note in plan.notes:
            if note.kind in (planner.NoteKind.OVER_WORKING, planner.NoteKind.PAST_TARGET):
                log.error("close_note", kind=str(note.kind), con_id=note.key.con_id)
        if plan.refresh_positions and not self.dry_run:
            with contextlib.suppress(GuarddError):
                await self.broker.refresh_positions()
        for cancel in plan.cancels:
            if self.dry_run:
                continue
            episode.cancel_sent(cancel, self.book.generation, now)
            with contextlib.suppress(GuarddError):
                await self.broker.cancel_order(cancel.order_id, Lane.FLATTEN)
        if in_doubt:
            # An id of ours was refused: ask the gateway for the next valid id first.
            self.order_ids_in_doubt = False
            with contextlib.suppress(GuarddError):
                await self.broker.refresh_order_ids(Lane.FLATTEN)
            children = self._new_children(episode, plan.orders)
            self._journal_round(episode, (), children)
        for child in children:
            if child.position is not None:  # None: dry run, journaled only
                self._sends.append(
                    asyncio.create_task(self._send_child(child), name="close_child_send")
                )
        if self.metrics is not None:
            self.metrics.set_flatten(plan.off_target, plan.overdue and plan.off_target > 0)
            self.metrics.set_close_waiting_for_open(len(episode.waiting_for_open))
        return bool(children) and not self.dry_run

    async def _until_queued(self, left: int) -> None:
        """Until at most `left` of the children queued so far still wait for the socket (they
        leave in the order they were queued)."""
        self._sends = [send for send in self._sends if not send.done()]
        if len(self._sends) > left:
            await asyncio.wait(self._sends[: len(self._sends) - left])
            self._sends = [send for send in self._sends if not send.done()]

    def _journal_round(
        self, episode: CloseEpisode, records: Sequence[Record], children: Sequence[_NewChild]
    ) -> None:
        """Journal a round's facts and its children's records as one batch (one fsync), then
        log and tell them."""
        facts = [self._record_fields(record, episode.decision_id) for record in records]
        batch = [(r.kind, fields) for r, fields in zip(records, facts, strict=True)]
        batch += [(c.record.kind, dict(c.record.fields)) for c in children]
        self._journal_many(batch)
        for record, fields in zip(records, facts, strict=True):
            self._told(record, fields)
        if self.metrics is not None and not self.dry_run:
            for _ in children:
                self.metrics.count_flatten_child()

    def _journal_record(self, record: Record, decision_id: int | None = None) -> None:
        """Journal and log a fact of the close episode."""
        fields = self._record_fields(record, decision_id)
        self._journal(record.kind, **fields)
        self._told(record, fields)

    @staticmethod
    def _record_fields(record: Record, decision_id: int | None) -> dict[str, Any]:
        fields = dict(record.fields)
        if decision_id is not None:
            fields.setdefault("decision_id", decision_id)
        return fields

    def _told(self, record: Record, fields: dict[str, Any]) -> None:
        """Log a journaled fact of the close episode and tell the listener."""
        getattr(log, record.level)(record.kind, **_loggable(fields))
        if record.kind == "close_child_repriced" and self.metrics is not None:
            self.metrics.count_close_repriced()
        if self.on_close_record is not None:
            try:
                self.on_close_record(Record(record.kind, fields, record.level))
            except Exception as exc:  # a listener never costs the close a round
                log.exception("close_record_listener_failed", record=record.kind, error=str(exc))

    def _observe(self, now: float, episode: CloseEpisode | None = None) -> Observation:
        """What the Book shows now, in the close episode's terms."""
        positions = {held.position.key: held for held in self._held_positions()}
        # Ours by identity, as the Book knows it (our client id and an order id we claimed, or
        # its learned permId); a fill or order of anyone else, whatever its orderRef or its id,
        # reaches the episode under another client id and is foreign there.
        book = self.book
        orders: dict[int, OrderReport] = {}
        generations: dict[int, int] = {}
        for order in book.orders.values():
            oid = book.own_order_id(order.perm_id, order.client_id, order.order_id)
            if oid is None:
                continue
            if generations.get(int(oid), -1) > order.generation:
                continue  # the newest report names the live order
            generations[int(oid)] = order.generation
            orders[int(oid)] = OrderReport(
                order_id=int(oid),
                perm_id=max(int(order.perm_id), 0),
                status=order.status,
                filled=_decimal(order.filled),
            )
        # Only executions the episode has not been given yet (it counts each execId once and
        # ignores one it knows: handing it every execution of the day each round was O(fills)).
        fills = []
        for e in book.executions.values():
            if e.account != self.account or not math.isfinite(e.shares):
                continue
            if episode is not None and episode.knows_fill(e.exec_id):
                continue
            oid = book.own_order_id(e.perm_id, e.client_id, e.order_id)
            fills.append(
                Fill(
                    exec_id=e.exec_id,
                    client_id=self.client_id if oid is not None else _NOT_OURS,
                    order_id=int(oid) if oid is not None else int(e.order_id),
                    perm_id=int(e.perm_id),
                    key=planner.PositionKey(planner.AccountId(e.account), ConId(e.con_id)),
                    quantity=_decimal(e.shares) * (1 if e.side == "BOT" else -1),
                    ts=e.ts,
                    live=e.live,
                )
            )
        buying: dict[planner.PositionKey, Decimal] = {}
        selling: dict[planner.PositionKey, Decimal] = {}
        for order in book.working_orders():
            if not order.has_terms or book.is_own(order) or order.account != self.account:
                continue
            finite = math.isfinite(order.remaining)
            rest = order.remaining if finite else order.quantity - order.filled
            if not (math.isfinite(rest) and rest > 0):
                continue
            key = planner.PositionKey(planner.AccountId(order.account), ConId(order.con_id))
            side = buying if order.action == "BUY" else selling
            side[key] = side.get(key, Decimal(0)) + _decimal(rest)
        synced_for = self._synced_for(now)
        return Observation(
            now=now,
            generation=self.book.generation,
            synced_since=None if not self.book.synced else now - synced_for,
            executions_complete=self.book.executions_synced,
            positions=positions,
            orders=orders,
            fills=fills,
            foreign_buying=buying,
            foreign_selling=selling,
            positions_listed_asked=self.book.positions_listed_asked,
        )

    def _held_positions(self) -> Iterable[Held]:
        """Every position of the guarded account, zero ones included, as the episode sees it."""
        now = self.clock()
        for p in self.book.positions.values():
            if p.account == self.account:
                yield Held(self._confirmed(p, now), p.updated, known=p.known)

    def _new_children(
        self, episode: CloseEpisode, orders: Sequence[planner.NewChildOrder]
    ) -> list[_NewChild]:
        """Allocate, claim and add each planned child to the episode, with the record that
        must be journaled before it is sent (in dry run only the record)."""
        out: list[_NewChild] = []
        for order in orders:
            if self.dry_run:
                episode.sequence = max(episode.sequence, planner.sequence_of(order.order_ref) + 1)
                fields: dict[str, Any] = {
                    "decision_id": episode.decision_id,
                    "order_ref": order.order_ref,
                    "symbol": order.symbol,
                    "action": str(order.action),
                    "quantity": str(order.quantity),
                    "order_type": str(order.order_type),
                    "limit_price": order.limit_price,
                }
                out.append(_NewChild(order, 0, None, Record("child_order_dry_run", fields)))
                continue
            position = self.book.position(order.key.con_id, order.key.account)
            assert position is not None  # the episode only closes positions the Book holds
            order_id = int(self.broker.next_order_id())
            # Ours from this instant (the Book knows our orders by id, not by label), before the
            # journal record and the send: the broker's first report of it is already own.
            self.book.claim_order_id(OrderId(order_id))
            episode.add_child(order, order_id, self.book.generation, self.clock())
            fields = {
                "decision_id": episode.decision_id,
                "order_id": order_id,
                "order_ref": order.order_ref,
                "account": order.key.account,
                "con_id": order.key.con_id,
                "symbol": order.symbol,
                "action": str(order.action),
                "quantity": str(order.quantity),
                "order_type": str(order.order_type),
                "limit_price": order.limit_price,
                "planned_against": str(order.planned_against),
                "round": episode.round,
                "step": order.step,
                "price_source": None if order.basis is None else str(order.basis.source),
                "price_age_s": None if order.basis is None else round(order.basis.age_s, 3),
            }
            out.append(_NewChild(order, order_id, position, Record("child_order_sent", fields)))
        return out

    async def _send_child(self, child: _NewChild) -> None:
        """Hand one journaled child to the sender; returns once it is on the socket."""
        order, position = child.order, child.position
        assert position is not None
        try:
            await self.broker.place_order(
                child.order_id,
                con_id=position.con_id,
                symbol=position.symbol,
                sec_type=position.sec_type,
                # IB's position() often leaves the exchange empty; FX trades on IDEALPRO only
                exchange=position.exchange
                or ("IDEALPRO" if position.sec_type == "CASH" else "SMART"),
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
            log.warning("child_order_send_failed", order_ref=order.order_ref, error=str(exc))
        except Exception as exc:  # a send task must not end unseen; the child stays pending
            log.exception("child_order_send_failed", order_ref=order.order_ref, error=str(exc))

    def _synced_for(self, now: float) -> float:
        """Seconds the Book has been synced on its current connection (0 while unsynced)."""
        if not self.book.synced:
            self._synced_at = None
            return 0.0
        if self._synced_at is None or self._synced_at[0] != self.book.generation:
            self._synced_at = (self.book.generation, now)
        return now - self._synced_at[1]

    def _confirmed_positions(self) -> Iterable[planner.ConfirmedPosition]:
        """Broker-confirmed non-zero positions of the guarded account.

        The price is the contract's latest market price, never a position value divided by a
        quantity: value (pnlSingle) and quantity (position) come on separate streams and may be
        out of step, and a limit derived from them could sit anywhere. A limit comes only from
        `prices` (bid, ask, last, mark, each with the time it was received) and only from a fresh
        one; without one the planner notes it (or closes with a market order where the class
        allows it)."""
        now = self.clock()
        for p in self.book.positions.values():
            if p.account != self.account or p.quantity == 0:
                continue
            if not p.known:
                continue  # no figure to size anything from (the close episode sees it unknown)
            yield self._confirmed(p, now)

    def _confirmed(self, p: Position, now: float) -> planner.ConfirmedPosition:
        """One position of the Book as the planner sees it (see `_confirmed_positions`).

        A position at 0 comes without its session, prices and exchange rate (not looked up:
        at 1,000 positions, most of them closed, that was a third of a close round): with a
        figure of 0 nothing is closable, so the close episode never plans a child for it and
        the planner never prices or ranks it (the defaults say nothing about its market)."""
        key = planner.PositionKey(planner.AccountId(p.account), ConId(p.con_id))
        if p.known and p.quantity == 0:
            terms = (p.symbol, p.sec_type, p.exchange, p.currency)
            return planner.ConfirmedPosition(key, *terms, _decimal(p.quantity), None, None)
        session = market_session(self.book, p.con_id, p.sec_type, now)
        quote = self.book.quote(p.con_id)
        price = quote.reference
        return planner.ConfirmedPosition(
            key=key,
            symbol=p.symbol,
            sec_type=p.sec_type,
            exchange=p.exchange,
            currency=p.currency,
            quantity=_decimal(p.quantity),
            price=price if math.isfinite(price) and price > 0 else None,
            fx_rate=self.book.exchange_rate(p.currency),
            multiplier=p.multiplier or 1.0,
            # The Book does not know contract tick sizes; futures close with MKT by default.
            min_tick=Decimal("0.01"),
            regular_hours=session == "regular",
            market_open=session != "closed",
            # A close limit comes only from these, each with the time it was received, and
            # only from a fresh one (guardd.core.pricing); `price` ranks by exposure.
            prices=quote.close_prices(),
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
            latch=None if latch is None else latch.summary(),
        )

    def _journal_many(self, records: Sequence[tuple[str, dict[str, Any]]]) -> None:
        """Journal records as one batch (one fsync); like `_journal`, a batch that cannot be
        written is logged and counted, and the caller carries on."""
        if not records:
            return
        for _, fields in records:
            fields.setdefault("account", self.account)
            if self.dry_run:
                fields["dry_run"] = True
        try:
            self.journal.append_many(records)
        except JournalError as exc:
            log.error("journal_write_failed", records=[k for k, _ in records], error=str(exc))
            if self.metrics is not None:
                for _ in records:
                    self.metrics.count_journal_error()

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


def _decimal(x: float) -> Decimal:
    """A broker float quantity as a Decimal (NaN stays NaN: the episode holds it unknown)."""
    return Decimal(str(x))


def _loggable(fields: Mapping[str, Any]) -> dict[str, Any]:
    """A journal record's fields for the log: long lists shortened to their length."""
    return {
        k: (len(v) if isinstance(v, list | dict) and len(v) > 8 else v) for k, v in fields.items()
    }


@dataclass(frozen=True, slots=True)
class _NewChild:
    """A child allocated for a round: its order, id, the Book's position (None in dry run)
    and the record journaled before it is sent."""

    order: planner.NewChildOrder
    order_id: int
    position: Position | None
    record: Record


_NOT_OURS = -1  # the client id a fill the Book does not know as ours is given for the episode
