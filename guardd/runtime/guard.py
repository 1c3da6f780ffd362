"""The guard: broker events -> Book -> monitor -> engine -> executor -> broker, and commands in.

`Guard` wires the pure core to its adapters and owns the long-running tasks in one TaskGroup. What
to judge when is the core's `Monitor` (`guardd.core.monitor`); the guard moves events and time in
and decisions out:

- `_event_loop` folds every broker event into the Book; an order event goes through the monitor's
  fast path (`Monitor.on_order`: order-rate and per-order checks), then the engine, so a runaway
  bot is stopped on the order that breaks the limit, not on the next timer tick.
- `_evaluate_loop` has the monitor judge every rule on a short timer (`Monitor.on_timer`:
  time-based rules too, staleness, connectivity, heartbeats, decaying rate windows), steps the
  engine and publishes metrics.
- the control plane (HTTP, MQTT), metrics listener and systemd watchdog when configured.

Start-up order matters: `Guard.open` reads and restores the latch BEFORE anything connects to IB
(the constructor only wires what it read), so a guard that was HALTED comes back HALTED and
carries the kill out as soon as the Book has re-synced. The journal, scanned once, is the latch's
second witness: a kill decision it records later than the latch file's state means HALTED (and
the file is rewritten). Then `run` reads the credentials and the control plane (HTTP, MQTT,
/metrics) listens, still before IB: a kill is served from the first second, latched while IB is
not there and carried out on the first sync; `waiting_for` says what the guard waits for. Every
engine step and its execution happen under one lock; a kill's cancel goes out first, then its
latch is written, then closing orders and the command's answer, which says whether the latch is
durable.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import Callable, Mapping
from datetime import datetime
from typing import TYPE_CHECKING, Any, TypedDict
from zoneinfo import ZoneInfo

import structlog
from prometheus_client import CollectorRegistry

from guardd import __version__
from guardd.broker.ib import IbBroker
from guardd.config import Config, changed_keys, reload_refusals
from guardd.control.auth import TwoPersonRule
from guardd.control.commands import CommandOutcome, ControlCommand
from guardd.control.console import Console
from guardd.control.http import ControlHttpServer
from guardd.control.nonces import NonceStore
from guardd.control.refusals import RefusalLedger, RefusalSummary, refusal_kind
from guardd.core import events as ev
from guardd.core.book import Book
from guardd.core.close import Record
from guardd.core.engine import Arm, Decision, Engine, Kill, Latch, State
from guardd.core.monitor import Monitor, Scale, exposure_figures
from guardd.core.notices import (
    ConditionKind,
    Lasting,
    Notice,
    condition_notice,
    notice_of_close,
    notices_of,
)
from guardd.credentials import load_credentials
from guardd.errors import ConfigError, GuarddError, JournalError, LatchError, StartupError
from guardd.logs import bind_decision
from guardd.metrics import Metrics, MetricsServer, metrics_handler
from guardd.notifications import Notifications
from guardd.runtime.executor import Executor
from guardd.runtime.rulebook import (
    build_close_policy,
    build_close_settings,
    build_policy,
    build_rules,
    build_sampling,
)
from guardd.runtime.startup import Restored, restore
from guardd.sdnotify import HealthWatchdog, Notifier, watchdog_interval
from guardd.state.journal import Journal, Rotation
from guardd.state.latch import LatchWriter

if TYPE_CHECKING:  # imported when MQTT is enabled (aiomqtt, paho: nothing else needs them)
    from guardd.control.mqtt import MqttControl

log = structlog.get_logger(__name__)

EVALUATE_EVERY_S = 0.25
LINES_EVERY_S = 5.0
"""How often the market-data lines are re-ranked by exposure when positions did not change."""
PIPELINE_STALL_S = 10.0
"""The evaluate loop not going round for this long means a wedged guard (watchdog)."""
_NEW_YORK = ZoneInfo("America/New_York")
_ORDER_EVENTS = (ev.OpenOrder, ev.OrderStatus)
_BOOK_CHANGES = (
    ev.PositionUpdate,
    ev.OpenOrder,
    ev.OrderStatus,
    ev.Execution,
    ev.ExecutionsEnd,
    ev.PositionsEnd,
    ev.PositionsListed,
)


class Guard:
    """One guardd instance guarding one IB account (and, through reqGlobalCancel, its login)."""

    @classmethod
    def open(
        cls,
        cfg: Config,
        *,
        clock: Callable[[], float] = time.time,
        registry: CollectorRegistry | None = None,
        fresh_start: bool = False,
        notifier: Notifier | None = None,
    ) -> Guard:
        """The start-up step: open the guard's state and make the guard, before anything connects.

        Creates the state directory, opens the journal, restores the latch from the file or,
        when the journal records a later kill, from the journal (the second witness: a latch
        write may have failed; the file is then repaired), scanning the journal once
        (`guardd.runtime.startup`), journals ``guard_started`` and opens the latch writer. A
        missing latch file starts HALTED unless `fresh_start`. Raises JournalError when the
        journal cannot be opened, read or written.
        """
        cfg.state_dir.mkdir(parents=True, exist_ok=True)
        journal = Journal(
            cfg.journal_path,
            clock=clock,
            rotation=Rotation(cfg.journal.rotate, cfg.journal.max_bytes),
        )
        try:
            restored = restore(cfg, fresh_start=fresh_start, now=clock())
            journal.append(
                "guard_started",
                account=cfg.account,
                version=__version__,
                halted=restored.halted is not None,
                latch_reason=restored.latch.reason,
                latch_from="journal" if restored.from_journal else "file",
                dry_run=cfg.dry_run,
            )
        except BaseException:
            journal.close()
            raise
        latch = restored.halted
        if latch is not None:
            log.warning(
                "latch_restored", reason=latch.reason, mode=latch.mode, principal=latch.principal
            )
        # Opened now, before any flood: the latch write's descriptors are held in reserve.
        writer = None
        with contextlib.suppress(LatchError):  # opened again on the first write
            writer = LatchWriter(cfg.latch_path)
        guard = cls(
            cfg,
            restored,
            journal,
            latch_writer=writer,
            clock=clock,
            registry=registry,
            notifier=notifier,
        )
        if restored.from_journal:
            log.error("latch_restored_from_journal", decision_id=restored.latch.decision_id)
            guard.executor.persist_latch(restored.latch)  # the file said less than the journal
        if restored.children:
            log.warning("close_children_restored", count=len(restored.children))
        return guard

    def __init__(
        self,
        cfg: Config,
        restored: Restored,
        journal: Journal,
        *,
        latch_writer: LatchWriter | None = None,
        clock: Callable[[], float] = time.time,
        registry: CollectorRegistry | None = None,
        notifier: Notifier | None = None,
    ) -> None:
        """Wire the guard from the state it starts from (`restored`), its open `journal` and
        latch writer (None: opened on the first write); `Guard.open` reads and opens them."""
        self.cfg = cfg
        self.clock = clock
        self.registry = registry if registry is not None else CollectorRegistry()
        self.metrics = Metrics(self.registry, account=cfg.account, version=__version__)
        self.notifier = notifier or Notifier(None)
        self.journal = journal
        now = clock()
        # The latch as the engine left it, who killed included (the file keeps the principal).
        latch = restored.halted
        if latch is not None:
            self.metrics.count_kill("restored")
        self.monitor = Monitor(build_rules(cfg))
        first_decision_id = restored.last_decision_id + 1
        self.engine = Engine(build_policy(cfg), latch=latch, first_decision_id=first_decision_id)
        sampling = build_sampling(cfg)
        self.book = Book(
            cfg.account,
            created_at=now,
            price_history_s=sampling.history_s,
            price_sample_s=sampling.sample_s,
            own_client_id=ev.ClientId(cfg.ib.client_id),
        )
        self.broker = IbBroker(
            cfg.ib.host,
            cfg.ib.port,
            cfg.ib.client_id,
            cfg.account,
            connect_timeout_s=cfg.ib.connect_timeout_s,
            messages_per_second=cfg.budget.messages_per_second,
            kill_reserve=cfg.budget.kill_reserve,
            clock=clock,
            reconnect_initial_s=cfg.ib.reconnect_backoff_min_s,
            reconnect_max_s=cfg.ib.reconnect_backoff_max_s,
            market_data_lines=cfg.ib.market_data_lines,
        )
        self.metrics.watch_broker_buffer(
            lambda: self.broker.events_coalesced, lambda: self.broker.events_held
        )
        self.executor = Executor(
            broker=self.broker,
            book=self.book,
            journal=self.journal,
            latch_path=cfg.latch_path,
            close_policy=build_close_policy(cfg),
            client_id=cfg.ib.client_id,
            account=cfg.account,
            dry_run=cfg.dry_run,
            flatten_timeout_s=cfg.flatten.verify_timeout_s,
            messages_per_second=cfg.budget.messages_per_second,
            metrics=self.metrics,
            clock=clock,
            latch_on_disk=restored.on_disk,
            latch_writer=latch_writer,
            close_settings=build_close_settings(cfg),
            on_close_record=self._on_close_record,
        )
        # Every order id a previous process sent (or was about to send) is never handed out again:
        # a reused id would modify that order, or make a stranger's order look like our child.
        self.broker.reserve_order_ids(restored.order_ids)
        if latch is not None and restored.children:
            # The restored children are ours again (claimed in the Book), and only they.
            self.executor.restore_children(latch.decision_id, restored.children)
        self._trading_day: str | None = None
        # The two-person re-arm rule (control.two_person_rearm): one for HTTP and MQTT, so their
        # arms count together; `_rearm_first_force` is whether the pending first arm forced.
        self._two_person = (
            TwoPersonRule(window_s=cfg.control.rearm_window_s)
            if cfg.control.two_person_rearm
            else None
        )
        self._rearm_first_force = False
        self._rotation_error: str | None = None  # the journal rotation failure already told
        # Refused commands: the first of each kind per interval journaled in full, the rest
        # counted and journaled as one summary per interval (a junk flood costs no fsync each).
        self.refusals = RefusalLedger(cfg.control.refusal_interval_s)
        # The positions the market-data lines were last ranked by (Book.positions_version) and
        # when (monotonic): re-ranked when positions change and every LINES_EVERY_S.
        self._lines_ranked: tuple[int, float] = (-1, time.monotonic())
        self._lock = asyncio.Lock()
        self.http: ControlHttpServer | None = None
        self.mqtt: MqttControl | None = None
        self.ready_event = asyncio.Event()
        self._sd_status: str | None = None
        self._evaluated_at = time.monotonic()
        # When the engine entered its present state (epoch seconds): the console's "since".
        self._state_since = latch.since if latch is not None else now
        self.metrics.set_state(self.engine.state)
        # Notifications ([notify]): made with the credentials (`_start_control`); the conditions
        # they report once they have lasted (a disconnect) or at once.
        self.notifications: Notifications | None = None
        self._conditions: dict[ConditionKind, Lasting] = {
            "disconnected": Lasting(cfg.notify.disconnect_after_s),
            "read_only": Lasting(0.0),
            "latch_not_durable": Lasting(0.0),
        }

    # ---- reloading the limits (SIGHUP) -----------------------------------------------------

    def reload(self, load: Callable[[], Config], source: str) -> bool:
        """Guard by the limits of a config read again (`load`, from `source`); True if applied.

        The file is checked first. A file that does not load, or that changes anything outside
        ``[limits]`` (``reload_refusals``: the IB session, the control plane, the state
        directory... need a restart), is refused as a whole: the guard keeps its limits, logs
        and journals ``config_reload_refused`` naming the keys and why. Otherwise the rule set,
        the engine's policy (debounce counts) and the Book's price sampling are swapped at once
        and ``config_reloaded`` journals the keys that changed. State and latch are kept: a
        reload never re-arms a HALTED guard, and a breach of the new limits acts on the next
        evaluation. Under systemd (``ExecReload=``) it says RELOADING=1 then READY=1.
        """
        ready = self.ready_event.is_set()
        if ready:
            usec = time.monotonic_ns() // 1000
            self.notifier.notify("RELOADING=1", f"MONOTONIC_USEC={usec}")
        try:
            return self._reload(load, source)
        finally:
            if ready:
                self._sd_status = self.sd_status()
                self.notifier.notify("READY=1", f"STATUS={self._sd_status}")

    def _reload(self, load: Callable[[], Config], source: str) -> bool:
        try:
            new = load()
        except ConfigError as exc:
            keys = [exc.key_path] if exc.key_path else []
            keys += [line.split(":", 1)[0] for line in exc.more]
            self._refuse_reload(source, keys, " / ".join(str(exc).splitlines()))
            return False
        refusals = reload_refusals(self.cfg, new)
        if refusals:
            why = "; ".join(f"{key}: {reason}" for key, reason in refusals)
            self._refuse_reload(source, [key for key, _ in refusals], why)
            return False
        changed = changed_keys(self.cfg, new)
        self._apply_limits(new)
        self.metrics.count_config_reload("applied")
        log.warning("config_reloaded", file=source, changed=list(changed))
        self._journal("config_reloaded", file=source, changed=list(changed))
        return True

    def _refuse_reload(self, source: str, keys: list[str], error: str) -> None:
        self.metrics.count_config_reload("refused")
        log.error("config_reload_refused", file=source, keys=keys, error=error)
        self._journal("config_reload_refused", file=source, keys=keys, error=error)

    def _apply_limits(self, cfg: Config) -> None:
        """Swap in `cfg`'s limits (everything else in it equals the running config)."""
        added_bots = cfg.limits.heartbeats.bots.keys() - self.cfg.limits.heartbeats.bots.keys()
        self.cfg = cfg
        self.monitor.set_rules(build_rules(cfg))  # a removed rule's finding goes with it
        self.engine.set_policy(build_policy(cfg))
        sampling = build_sampling(cfg)
        self.book.price_history_s = sampling.history_s
        self.book.price_sample_s = sampling.sample_s
        # A bot watched from now on is not silent since the guard started.
        self.book.watch_heartbeats(added_bots, self.clock())
        self.metrics.clear_rules()

    # ---- running ---------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event | None = None) -> None:
        """Guard until `stop` is set (or forever).

        Start-up order: the latch (restored by `Guard.open`), the credentials, the control plane
        (HTTP, MQTT, /metrics), and only then IB. A failure before IB raises StartupError
        (ConfigError for a credential); once running, `stop` ends every phase (connect back-off,
        handshake, sync, flatten) within about a second, journaling ``guard_stopped`` and
        leaving the latch as it is.
        """
        stop = stop or asyncio.Event()
        self._publish_sd_status()
        try:
            await self._serve(stop)
        except ExceptionGroup as group:
            error = _first_guardd_error(group)
            if error is group:
                raise
            raise error from group
        finally:
            self.notifier.stopping()
            await self.executor.stop_episode("shutting down")
            self.flush_refusals(force=True)
            self._journal("guard_stopped", account=self.cfg.account)
            self.journal.close()
            self.executor.close()

    async def _serve(self, stop: asyncio.Event) -> None:
        self._evaluated_at = time.monotonic()
        try:
            async with contextlib.AsyncExitStack() as stack:
                await self._start_control(stack)
                stack.push_async_callback(self.broker.stop)
                async with asyncio.TaskGroup() as tasks:
                    tasks.create_task(self._connect(), name="connect")
                    tasks.create_task(self._event_loop(), name="event_loop")
                    tasks.create_task(self._evaluate_loop(), name="evaluate_loop")
                    if self.notifications is not None:
                        tasks.create_task(self.notifications.run(), name="notify_loop")
                    interval = watchdog_interval()
                    if self.notifier.enabled and interval is not None:
                        watchdog = HealthWatchdog(
                            self.notifier,
                            interval,
                            self._alive,
                            on_withheld=self.metrics.count_watchdog_withheld,
                        )
                        tasks.create_task(watchdog.run(), name="watchdog_loop")
                    await stop.wait()
                    raise _StopError
        except* _StopError:
            pass

    async def _connect(self) -> None:
        """The first IB connection, retried with back-off while the control plane already
        serves; a kill decided meanwhile is latched and carried out once the Book has synced.
        A login that does not manage the account ends the guard (exit 78)."""
        await self.broker.connect()

    async def _start_control(self, stack: contextlib.AsyncExitStack) -> None:
        """Read every credential, then listen: HTTP (and /metrics), MQTT. Before IB."""
        credentials = load_credentials(self.cfg)  # ConfigError names the key: exit 78
        if credentials.notify_targets:
            self.notifications = Notifications(
                credentials.notify_targets,
                self.cfg.notify,
                account=self.cfg.account,
                metrics=self.metrics,
                status=self._notice_status,
                clock=self.clock,
            )
        http_cfg = self.cfg.control.http
        routes = []
        if self.cfg.metrics.enabled and self.cfg.metrics.listen == "control":
            from aiohttp import web

            routes.append(web.get("/metrics", metrics_handler(self.registry)))
        elif self.cfg.metrics.enabled:
            server = MetricsServer(self.registry, self.cfg.metrics.host, self.cfg.metrics.port)
            where = f"metrics: cannot listen on {self.cfg.metrics.host}:{self.cfg.metrics.port}"
            await _listen(stack, server, where)
        if http_cfg.enabled:
            assert credentials.http_tokens is not None
            self.http = ControlHttpServer(
                self,
                tokens=credentials.http_tokens,
                host=http_cfg.host,
                port=http_cfg.port,
                ssl=credentials.http_tls,
                max_body_bytes=http_cfg.max_body_bytes,
                header_timeout_s=http_cfg.header_timeout_s,
                body_timeout_s=http_cfg.body_timeout_s,
                max_connections=http_cfg.max_connections,
                routes=routes,
            )
            if http_cfg.console:
                console = Console(
                    self,
                    tokens=credentials.http_tokens,
                    secure_cookie=credentials.http_tls is not None,
                )
                console.attach(self.http.app)
            where = f"control.http: cannot listen on {http_cfg.host}:{http_cfg.port}"
            await _listen(stack, self.http, where)
        mqtt_cfg = self.cfg.control.mqtt
        if mqtt_cfg.enabled:
            assert credentials.mqtt_keys is not None
            # Used nonces from before a restart: read (and pruned) before the first message.
            nonces = NonceStore.open(
                self.cfg.nonces_path, window_s=mqtt_cfg.window_s, now=self.clock()
            )
            stack.callback(nonces.close)
            from guardd.control.mqtt import MqttControl

            self.mqtt = MqttControl(
                self,
                account=self.cfg.account,
                keys=credentials.mqtt_keys,
                host=mqtt_cfg.host,
                port=mqtt_cfg.port,
                username=mqtt_cfg.username,
                password=credentials.mqtt_password,
                tls=credentials.mqtt_tls,
                window_s=mqtt_cfg.window_s,
                topic_prefix=mqtt_cfg.topic_prefix,
                clock=self.clock,
                on_heartbeat=self.heartbeat if self.cfg.limits.heartbeats.bots else None,
                nonces=nonces,
                on_dropped=self.metrics.count_mqtt_dropped,
                refusal_interval_s=self.cfg.control.refusal_interval_s,
            )
            await stack.enter_async_context(self.mqtt)  # connects in the background

    def _alive(self) -> bool:
        """The guard's liveness for the systemd watchdog, not IB's (the event loop's own lag is
        measured by the watchdog): the broker adapter keeps its promise of a next sign of life
        (a reconnect loop that keeps retrying does; a wedged one does not, see
        `IbBroker.alive`), and the evaluate loop went round within `PIPELINE_STALL_S` (it waits
        for the lock every decision holds, so a decision that never ends stops it too)."""
        pipeline_alive = time.monotonic() - self._evaluated_at <= PIPELINE_STALL_S
        return self.broker.alive() and pipeline_alive

    def _publish_sd_status(self) -> None:
        """Tell systemd (``systemctl status``) the state and what the guard waits for, when it
        changed."""
        text = self.sd_status()
        if text != self._sd_status:
            self._sd_status = text
            self.notifier.status(text)

    def sd_status(self) -> str:
        """One line: the engine state, and what the guard is waiting for or doing."""
        state = str(self.engine.state)
        latch = self.engine.latch
        if latch is not None:
            state += f" ({latch.source}: {latch.reason})"
        if not self.executor.latch_durable:
            state += " LATCH NOT DURABLE"
        if self.book.read_only:
            state += " IB READ-ONLY API: CANNOT CANCEL OR CLOSE"
        match self.waiting_for():
            case "ib_connect":
                doing = f"waiting for IB at {self.cfg.ib.host}:{self.cfg.ib.port}"
            case "ib_sync":
                doing = "waiting for IB sync (positions, open orders)"
            case _:
                episode = self.executor.episode
                if episode is None:
                    doing = "guarding"
                elif episode.at_target:
                    doing = f"{episode.kind}: at target, kept so"
                else:
                    doing = f"{episode.kind} in progress"
        return f"{state}; {doing}"

    async def _event_loop(self) -> None:
        async for event in self.broker.events():
            started = time.perf_counter()
            self.book.fold(event)
            self.metrics.mark_event(event.ts)
            match event:
                case ev.Connected():
                    self.metrics.set_ib_connected(True)
                    self._journal("ib_connected", next_order_id=event.next_order_id)
                case ev.Disconnected(reason=reason):
                    self.metrics.set_ib_connected(False)
                    self._journal("ib_disconnected", reason=reason)
                case ev.BrokerMessage():
                    self.executor.on_broker_message(event)
                case ev.ApiReadOnly(read_only=read_only):
                    self.metrics.set_ib_read_only(read_only)
                    self._journal(
                        "ib_read_only" if read_only else "ib_read_only_lifted",
                        halted=self.engine.state == State.HALTED,
                    )
                    self._sd_status = self.sd_status()
                    self.notifier.notify(f"STATUS={self._sd_status}")
                    if not read_only:
                        # Orders and cancels work again: a kill that could not act now can.
                        self.executor.notice()
                        await self._evaluate(self.clock(), trigger_ts=event.ts)
                case _:
                    pass
            watch = self.monitor.price_watch(self.book, event)
            if watch is not None:
                self.broker.watch_prices([watch.con_id])
            if isinstance(event, _ORDER_EVENTS):
                await self._on_order_event(event)
            if isinstance(event, _BOOK_CHANGES):
                self.executor.notice()
            if isinstance(event, ev.AccountDownloadEnd):
                self._rank_lines(force=True)  # every position valued: choose the lines
            if isinstance(event, (ev.PositionsEnd, ev.OpenOrdersEnd)) and self.book.synced:
                await self._evaluate(self.clock(), trigger_ts=event.ts)
                if not self.ready_event.is_set():
                    self.ready_event.set()
                    self._sd_status = self.sd_status()
                    self.notifier.notify("READY=1", f"STATUS={self._sd_status}")
                    log.info("guard_ready", state=self.engine.state)
            self.metrics.observe_event_processing(time.perf_counter() - started)

    def _rank_lines(self, *, force: bool = False) -> None:
        """Tell the broker which contracts want a market-data line (`Monitor.line_wants`: held
        positions and, under the price collar, foreign orders; see guardd.core.lines): when the
        positions changed, else every LINES_EVERY_S (exposures move, refusals expire). While
        the account download (every position's value) is under way, at most every
        LINES_EVERY_S: lines chosen before it would be chosen blind and swapped right after."""
        version, at = self._lines_ranked
        now = time.monotonic()
        unchanged = version == self.book.positions_version
        if (
            not force
            and now - at < LINES_EVERY_S
            and (unchanged or not self.book.account_download_done)
        ):
            return
        self._lines_ranked = (self.book.positions_version, now)
        self.broker.rank_lines(self.monitor.line_wants(self.book))

    async def _on_order_event(self, event: ev.OpenOrder | ev.OrderStatus) -> None:
        """The fast path: a new order may break the order-rate or a per-order limit now."""
        now = self.clock()
        impersonated = self._report_impersonations()
        halted = self.engine.state == State.HALTED
        if self.monitor.on_order(self.book, event, now, impersonated=impersonated, halted=halted):
            await self._evaluate(now, trigger_ts=event.ts)

    def _report_impersonations(self) -> bool:
        """Journal and count each foreign order labelled as ours, once per order; True when
        there was one (the monitor judges the impersonation rule at once)."""
        found = self.book.take_impersonations()
        if not found:
            return False
        for order in found:
            self._journal(
                "own_ref_impersonated",
                account=order.account,
                client_id=order.client_id,
                order_id=order.order_id,
                perm_id=order.perm_id,
                order_ref=order.order_ref,
                symbol=order.symbol,
            )
            log.warning(
                "own_ref_impersonated",
                client_id=order.client_id,
                order_id=order.order_id,
                perm_id=order.perm_id,
                order_ref=order.order_ref,
            )
        self.metrics.count_impersonated(len(found))
        return True

    def _roll_day(self, now: float) -> None:
        """At midnight New York a new trading day starts: daily loss and drawdown re-anchor
        (start-of-day net liquidation and the intraday peak are taken afresh)."""
        day = datetime.fromtimestamp(now, _NEW_YORK).date().isoformat()
        if self._trading_day is not None and day != self._trading_day:
            self.book.start_new_day()
            self._journal("trading_day_started", day=day)
            log.info("trading_day_started", day=day)
        self._trading_day = day

    async def _evaluate_loop(self) -> None:
        while True:
            await asyncio.sleep(EVALUATE_EVERY_S)
            now = self.clock()
            self._roll_day(now)
            self.monitor.on_timer(self.book, now, halted=self.engine.state == State.HALTED)
            await self._evaluate(now, trigger_ts=now)
            self._rank_lines()
            self.executor.retry_latch()
            self._watch_journal_rotation()
            self._watch_conditions(now)
            self.flush_refusals()
            self._publish_metrics()
            self._publish_sd_status()
            self._evaluated_at = time.monotonic()

    async def _evaluate(self, now: float, *, trigger_ts: float | None) -> None:
        async with self._lock:
            evaluation = self.monitor.evaluation(self.book)
            decision = self.engine.step(evaluation, now)
            await self._carry_out(decision, trigger_ts)

    async def _carry_out(self, decision: Decision, trigger_ts: float | None) -> None:
        changed = decision.state != decision.previous_state
        if not (changed or decision.actions or decision.refused):
            return
        # Every log line of the decision carries its id and the account: the executor's, these,
        # and the close loop's (a task started here keeps the binding for its life).
        with bind_decision(decision.decision_id, self.cfg.account):
            await self._carry_out_bound(decision, trigger_ts, changed=changed)

    async def _carry_out_bound(
        self, decision: Decision, trigger_ts: float | None, *, changed: bool
    ) -> None:
        # The actions first (on a kill: the cancel, the decision's record, the latch, closing
        # orders); logs and metrics after.
        await self.executor.carry_out(decision, trigger_ts=trigger_ts)
        if changed:
            self._state_since = self.clock()
            log.warning(
                "state_changed",
                state=str(decision.state),
                previous=str(decision.previous_state),
                reasons=list(decision.reasons),
            )
            self.metrics.set_state(decision.state)
            latch = self.engine.latch
            by_rule = latch is not None and latch.source.startswith("rule")
            if decision.state == State.HALTED and by_rule:
                self.metrics.count_kill("rule")  # commands are counted in `handle`
        for finding in self.monitor.findings.values():
            self.metrics.observe_level(finding.rule, finding.level)
        if self.mqtt is not None and changed:
            self.mqtt.publish_state(self.status())
        # Told after the actions (queued; sent by the notify loop, never awaited here).
        for notice in notices_of(decision, self.clock()):
            self._notify(notice)

    # ---- notifications -------------------------------------------------------------------

    def _notify(self, notice: Notice) -> None:
        if self.notifications is not None:
            self.notifications.publish(notice)

    def _on_close_record(self, record: Record) -> None:
        """A close episode's fact (the executor's listener): "flat confirmed" is notified."""
        notice = notice_of_close(record, self.clock())
        if notice is not None:
            self._notify(notice)

    def _watch_conditions(self, now: float) -> None:
        """Notify a disconnect from IB that has lasted ``notify.disconnect_after_s``, TWS's
        Read-Only API, and a latch that is not durable; and each again when it ends."""
        if self.notifications is None:
            return
        holding: dict[ConditionKind, bool] = {
            "disconnected": not self.book.connected,
            "read_only": self.book.read_only,
            "latch_not_durable": not self.executor.latch_durable,
        }
        for kind, active in holding.items():
            watch = self._conditions[kind]
            since = watch.since
            change = watch.observe(active, now)
            if change is None:
                continue
            details: dict[str, object] = {"since": since if since is not None else now}
            if kind == "latch_not_durable" and active:
                details["error"] = self.executor.latch_error
            if kind == "disconnected":
                details["ib_at"] = f"{self.cfg.ib.host}:{self.cfg.ib.port}"
            self._notify(condition_notice(kind, change, now, details))

    def _watch_journal_rotation(self) -> None:
        """Say once that the journal could not rotate (records go on into the file they were
        in, and every append tries again), and once that it rotates again; exported as
        ``guardd_journal_rotation_failing`` and in the status."""
        error = self.journal.rotation_error
        if error == self._rotation_error:
            return
        if error is not None and self._rotation_error is None:
            log.error("journal_rotation_failed", error=error)
            self._journal("journal_rotation_failed", error=error)
        elif error is None:
            log.warning("journal_rotation_recovered", error=self._rotation_error)
            self._journal("journal_rotation_recovered", error=self._rotation_error)
        self._rotation_error = error
        self.metrics.set_journal_rotation_failing(error is not None)

    def _notice_status(self) -> dict[str, object]:
        """The guard's state as a notification carries it."""
        latch = self.engine.latch
        return {
            "state": str(self.engine.state),
            "latch_reason": None if latch is None else latch.reason,
            "latch_durable": self.executor.latch_durable,
            "ib_connected": self.book.connected,
            "ib_read_only": self.book.read_only,
            "positions": sum(1 for _ in self.book.guarded_positions()),
            "working_orders": self.book.working_order_count,
        }

    def _publish_metrics(self) -> None:
        for finding in self.monitor.findings.values():
            self.metrics.observe_level(finding.rule, finding.level)  # counts a breach once
        for reading in self.monitor.readings():
            finding, scale = reading.finding, reading.scale
            self.metrics.observe_rule(
                finding.rule,
                finding.subject,
                finding.value,
                scale.limits,
                higher_is_worse=scale.higher_is_worse,
            )
        figures = exposure_figures(self.book)
        self.metrics.set_exposure(
            figures.gross,
            figures.net_liquidation,
            figures.leverage,
            figures.cushion,
            currency=self.book.base_currency,
        )
        stress = self.stress_losses()
        if stress is not None:
            self.metrics.set_stress({name: s["ratio"] for name, s in stress["scenarios"].items()})
        else:
            self.metrics.set_stress({})
        now = self.clock()
        for client in self.book.order_clients:
            for span, window in ((1.0, "1s"), (60.0, "60s")):
                rate = self.book.new_orders(client, span, now) / span
                self.metrics.set_order_rate(client, window, rate)
        if self.book.order_clients:
            for span, window in ((1.0, "1s"), (60.0, "60s")):
                rate = self.book.new_orders(None, span, now) / span
                self.metrics.set_order_rate("total", window, rate)
        if self.mqtt is not None:
            self.metrics.set_mqtt_connected(self.mqtt.connected)

    # ---- the control plane's seam (guardd.control.commands.CommandHandler) --------------------

    async def handle(self, command: ControlCommand) -> CommandOutcome:
        """A kill or re-arm from a person (HTTP, MQTT or the CLI), already authenticated.

        With ``control.two_person_rearm`` the first arm while HALTED is journaled and answered
        pending (nothing changes); an arm from a different PERSON (``control.people``; a
        credential without one counts as its own) within ``control.rearm_window_s`` then goes to
        the engine, which still refuses it while a kill breach holds unless forced, and forced
        only when BOTH arms asked for force. A kill drops a pending re-arm.
        """
        now = self.clock()
        item: Kill | Arm
        if command.action == "kill":
            item = Kill(
                source=command.channel,
                principal=command.principal,
                reason=command.reason,
                mode=command.mode,
            )
        else:
            item = Arm(principal=command.principal, reason=command.reason, force=command.force)
        async with self._lock:
            rule = self._two_person
            if rule is not None and isinstance(item, Kill):
                rule.clear()
            elif rule is not None and self.engine.state == State.HALTED:
                verdict = rule.offer(_person(command), now=now)
                if not verdict.confirmed:
                    self._rearm_first_force = command.force
                    self._journal(
                        "command",
                        **_command_fields(command),
                        accepted=False,
                        pending=True,
                        decision_id=None,
                        message=verdict.message,
                    )
                    return CommandOutcome(
                        accepted=False,
                        state=str(self.engine.state),
                        message=verdict.message,
                        pending=True,
                    )
                forced = command.force and self._rearm_first_force
                reason = f"{command.reason} (two-person: {verdict.first} and {_person(command)})"
                item = Arm(principal=command.principal, reason=reason, force=forced)
            decision = self.engine.step(item, now)
            if command.action == "kill" and not decision.refused:
                self.metrics.count_kill(command.channel)
            # Carried out before the command's own record: a kill's cancel waits for no fsync.
            await self._carry_out(decision, trigger_ts=now)
            durable = self.executor.latch_durable
            self._journal(
                "command",
                **_command_fields(command),
                accepted=not decision.refused,
                pending=False,
                decision_id=decision.decision_id,
                latch_durable=durable,
            )
        message = "; ".join(decision.reasons) or str(decision.state)
        if not durable:
            message = f"{message}; LATCH NOT DURABLE: {self.executor.latch_error}"
        return CommandOutcome(
            accepted=not decision.refused,
            state=str(decision.state),
            message=message,
            decision_id=str(decision.decision_id),
            latch_durable=durable,
        )

    def status(self) -> Mapping[str, object]:
        """What `GET /v1/status` and the retained MQTT state say."""
        latch = self.engine.latch
        episode = self.executor.episode
        nl = self.book.net_liquidation
        exposure = self.book.exposure()
        on_disk = self.executor.latch_on_disk
        return {
            "account": self.cfg.account,
            "state": str(self.engine.state),
            "online": True,
            "dry_run": self.cfg.dry_run,
            "ib_connected": self.book.connected,
            # Whether a cancel or close sent now could work: connected, and TWS's Read-Only API
            # off (`ib_read_only` true: error 321 refuses every order and cancel; a kill still
            # latches, and is carried out once an operator switches it off).
            "can_act": self.book.can_act,
            "ib_read_only": self.book.read_only,
            "ib_read_only_since": self.book.read_only_since,
            "synced": self.book.synced,
            "waiting_for": self.waiting_for(),
            "latch": None
            if latch is None
            else {**latch.summary(), "decision_id": latch.decision_id},
            # What a restart would read from the latch file. It differs from `state` only while
            # a latch write fails (`latch_durable` false, `latch_error` says why; retried).
            "latch_durable": self.executor.latch_durable,
            "latch_error": self.executor.latch_error,
            # Why the audit journal could not rotate ([journal] rotate), None while it can:
            # records go on into the file they were in; every append tries again.
            "journal_rotation_error": self.journal.rotation_error,
            "latch_file": None
            if on_disk is None
            else {
                "halted": isinstance(on_disk, Latch),
                "reason": on_disk.reason,
                "principal": on_disk.principal,
                "mode": on_disk.mode if isinstance(on_disk, Latch) else None,
                "decision_id": on_disk.decision_id or None,
            },
            "positions": sum(1 for _ in self.book.guarded_positions()),
            "working_orders": self.book.working_order_count,
            "net_liquidation": None if nl is None else nl.value,
            # Money is in the account's base currency as IB names it (None until it has);
            # gross is None while a position has no value or its currency no ExchangeRate.
            "base_currency": self.book.base_currency,
            "gross_position_value": exposure.gross,
            "missing_exchange_rates": list(exposure.missing_rates),
            # held positions without a value yet (start-up: until IB's account-updates
            # stream has valued them), and the market-data lines held (`[ib] market_data_lines`)
            "positions_unvalued": exposure.unvalued,
            "market_data_lines": len(self.broker.lines),
            "close": None
            if episode is None
            else {
                "kind": episode.kind,
                "decision_id": episode.decision_id,
                "children": len(episode.children),
                "round": episode.round,
                "done": episode.at_target,  # at target now; kept so while the state lasts
                "at_target": episode.at_target,
                "overdue": episode.overdue,
                # Contracts whose market is closed: their close waits for the open.
                "waiting_for_open": sorted(k.con_id for k in episode.waiting_for_open),
            },
            "findings": {
                name: {"level": f.level, "value": f.value, "message": f.message}
                for name, f in self.monitor.findings.items()
                if f.level != "ok"
            },
            # every rule evaluated so far and its level ("data": it cannot judge now)
            "rule_levels": {name: f.level for name, f in sorted(self.monitor.findings.items())},
            # each stress scenario's projected loss (base currency) and loss / NetLiquidation,
            # None where an input is missing (`missing` names it); None without [limits.stress]
            "stress": self.stress_losses(),
        }

    def stress_losses(self) -> StressView | None:
        """Each configured stress scenario's loss now, or None when none is configured."""
        figures = self.monitor.stress(self.book, self.clock())
        if figures is None:
            return None
        return {
            "scenarios": {s.name: {"loss": s.loss, "ratio": s.ratio} for s in figures.scenarios},
            "missing": figures.missing,
        }

    def console_view(self) -> Mapping[str, object]:
        """What the web console shows (``guardd.control.console``), JSON-able: the status, why
        and since when, every rule's value against its levels, positions, working orders by
        client, connectivity, the two-person re-arm in progress, and the last journal records."""
        latch = self.engine.latch
        state = self.engine.state
        if latch is not None:
            why = [f"{latch.source}: {latch.reason}"]
        else:
            why = [f.message for f in self.monitor.findings.values() if f.breach]
        rules = [
            {
                "rule": f.rule,
                "subject": f.subject,
                "level": f.level,
                "value": _finite_or_none(f.value),
                "limits": _limits_json(self.monitor.scale(f.rule)),
                "message": f.message,
            }
            for f in sorted(self.monitor.findings.values(), key=lambda f: f.rule)
        ]
        positions = [
            {
                "account": p.account,
                "symbol": p.symbol,
                "sec_type": p.sec_type,
                "quantity": p.quantity if p.known else None,  # None: IB left it unset
                "avg_cost": _finite_or_none(p.avg_cost),
                "value": _finite_or_none(p.value),
            }
            for p in sorted(self.book.guarded_positions(), key=lambda p: (p.symbol, p.con_id))
        ]
        clients: dict[int, list[dict[str, object]]] = {}
        for order in sorted(self.book.working_orders(), key=lambda o: (o.client_id, o.order_id)):
            clients.setdefault(int(order.client_id), []).append(
                {
                    "order_id": int(order.order_id),
                    "perm_id": int(order.perm_id),
                    "symbol": order.symbol,
                    "action": order.action,
                    "quantity": _finite_or_none(order.quantity),
                    "order_type": order.order_type,
                    "lmt_price": _finite_or_none(order.lmt_price),
                    "status": order.status,
                    "filled": order.filled,
                    "own": self.book.is_own(order),
                }
            )
        rule = self._two_person
        pending_since = rule.pending_since if rule is not None else None
        return {
            **self.status(),
            "state": str(state),
            "since": self._state_since,
            "why": why,
            "rules": rules,
            "position_list": positions,
            "orders_by_client": [
                {"client_id": client, "orders": orders} for client, orders in clients.items()
            ],
            "connectivity": {
                "ib": "synced"
                if self.book.synced
                else "connected"
                if self.book.connected
                else "disconnected",
                "ib_at": f"{self.cfg.ib.host}:{self.cfg.ib.port}",
                "mqtt": None if self.mqtt is None else self.mqtt.connected,
            },
            "rearm": {
                "two_person": rule is not None,
                "window_s": self.cfg.control.rearm_window_s if rule is not None else None,
                "pending_by": rule.pending if rule is not None else None,
                "pending_since": pending_since,
                "lapses_at": None
                if pending_since is None or rule is None
                else pending_since + rule.window_s,
            },
            "journal": [_journal_line(r) for r in reversed(self.journal.recent()[-20:])],
        }

    def ready(self) -> bool:
        """Latch restored (always, by `Guard.open`) and the broker synced."""
        return self.waiting_for() is None

    def waiting_for(self) -> str | None:
        """What keeps the guard from guarding, None once synced: "ib_connect" (no session with
        IB: never connected, or reconnecting) or "ib_sync" (connected; the position and
        open-order downloads are not complete). Commands are served meanwhile."""
        if not self.book.connected:
            return "ib_connect"
        if not self.book.synced:
            return "ib_sync"
        return None

    def audit(self, record: Mapping[str, object]) -> None:
        """Account for a refused command (bad token, signature, replay, malformed): counted
        always; journaled in full when it is the first of its kind in the interval, otherwise in
        the interval's ``command_refusals_aggregated`` record (``flush_refusals``)."""
        channel, error = str(record.get("channel")), str(record.get("error"))
        self.metrics.count_refused(channel, error)
        kind = refusal_kind(channel, error, record.get("status"))
        if not self.refusals.note(kind, self.clock()):
            return
        fields: dict[str, Any] = {k: v for k, v in record.items() if k != "kind"}
        try:
            self.journal.append("command_refused", **fields)
        except JournalError as exc:  # counted into the next summary: still accounted for
            self.refusals.unkept(kind, self.clock())
            self.metrics.count_journal_error()
            log.error("journal_write_failed", record="command_refused", error=str(exc))

    def flush_refusals(self, *, force: bool = False) -> RefusalSummary | None:
        """Journal the refusals counted but not journaled in full, once their interval is over
        (or now, with ``force``); what was journaled, if anything."""
        summary = self.refusals.flush(self.clock(), force=force)
        if summary is None:
            return None
        log.warning("command_refusals_aggregated", total=summary.total, counts=summary.counts)
        try:
            self.journal.append(
                "command_refusals_aggregated",
                since=summary.since,
                until=summary.until,
                counts=summary.counts,
                total=summary.total,
            )
        except JournalError as exc:
            self.metrics.count_journal_error()
            log.error("journal_write_failed", record="command_refusals_aggregated", error=str(exc))
            # Carried into the next summary whole, dated from its first refusal (one step, not
            # one per refusal: a flood's millions must not hold the event loop).
            self.refusals.carry(summary)
            return None
        return summary

    def _journal(self, kind: str, **fields: Any) -> None:
        """Journal a record; one that cannot be written (a full disk, a closed journal) is logged
        and counted, and the guard carries on: no journal error may end the event or evaluate
        loop, or skip the evaluation (and the kill) that follows the record."""
        try:
            self.journal.append(kind, **fields)
        except JournalError as exc:
            log.error("journal_write_failed", record=kind, error=str(exc))
            self.metrics.count_journal_error()

    def heartbeat(self, bot: str) -> None:
        """A bot said it is alive (MQTT `<prefix>/<account>/heartbeat/<bot>`); unknown bots are
        ignored, so a stray publisher cannot grow the Book."""
        if bot in self.cfg.limits.heartbeats.bots:
            self.book.fold(ev.Heartbeat(bot=bot, ts=self.clock()))


class _StopError(Exception):
    """Raised inside the TaskGroup to end it when `stop` is set."""


class ScenarioLoss(TypedDict):
    """One stress scenario in the status: loss in the base currency, loss / NetLiquidation."""

    loss: float | None
    ratio: float | None


class StressView(TypedDict):
    """The stress scenarios in the status, and what input is missing (None: none)."""

    scenarios: dict[str, ScenarioLoss]
    missing: str | None


def _person(command: ControlCommand) -> str:
    """Who the two-person rule counts: the command's person, else its credential's name (only
    when no person is configured for it: with the rule on, the config names every arm's)."""
    return command.person if command.person is not None else command.principal


async def _listen(
    stack: contextlib.AsyncExitStack,
    server: contextlib.AbstractAsyncContextManager[object],
    where: str,
) -> None:
    """Enter a listening server; a port in use (or any OS refusal) is a StartupError."""
    try:
        await stack.enter_async_context(server)
    except OSError as exc:
        raise StartupError(f"{where}: {exc.strerror or exc}") from exc


def _first_guardd_error(group: ExceptionGroup[Exception]) -> Exception:
    """The guard's own error from a TaskGroup's group (e.g. AccountNotManagedError from the
    connect task), so the caller sees one error with its exit code; else the group itself."""
    matched = group.subgroup(GuarddError)
    if matched is None:
        return group
    first: BaseException = matched
    while isinstance(first, BaseExceptionGroup):
        first = first.exceptions[0]
    return first if isinstance(first, Exception) else group


def _command_fields(command: ControlCommand) -> dict[str, object]:
    """A command as the journal records it (who, channel, what, why)."""
    return {
        "action": command.action,
        "principal": command.principal,
        "person": command.person,
        "channel": command.channel,
        "reason": command.reason,
        "mode": command.mode,
        "force": command.force,
        "request_id": command.request_id,
    }


def _finite_or_none(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None


def _limits_json(scale: Scale | None) -> dict[str, float | None]:
    if scale is None:
        return {"warn": None, "reduce": None, "kill": None}
    limits = scale.limits
    return {"warn": limits.warn, "reduce": limits.reduce, "kill": limits.kill}


_JOURNAL_SHOWN = ("state", "action", "principal", "person", "reason", "mode", "message", "rule")


def _journal_line(record: Mapping[str, Any]) -> dict[str, object]:
    """A journal record as the console lists it: time, kind and a few short fields."""
    details = {
        key: str(record[key])[:200]
        for key in _JOURNAL_SHOWN
        if record.get(key) not in (None, "", [])
    }
    return {"ts": record.get("ts"), "kind": record.get("kind"), "details": details}
