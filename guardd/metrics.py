"""guardd's Prometheus metrics, and a small listener that serves them.

The app creates one `Metrics` on a `CollectorRegistry` it owns and calls its methods as it folds
broker events, evaluates rules, decides and acts. Every series carries an ``account`` label (one
guardd guards one account), so that one Prometheus and one dashboard serve many guards.

Exported (prefix ``guardd_``; counters end in ``_total``)::

    guardd_state{state}                               1 for the current state, 0 for the others
    guardd_rule_value{rule,subject}                   each rule's measured figure (NaN: no data)
    guardd_rule_limit{rule,level}                     warn / reduce / kill limits
    guardd_rule_kill_usage_ratio{rule,subject}        how close to the kill limit (1 = at it)
    guardd_breaches_total{rule,level}                 rule breaches (counted when first reached)
    guardd_kills_total{source}                        kills by source (rule, http, mqtt, cli, ...)
    guardd_orders_cancelled_total                     orders seen cancelled by the guard
    guardd_flatten_child_orders_total                 child orders sent to close positions
    guardd_impersonated_orders_total                  foreign orders labelled guardd: (once each)
    guardd_close_repriced_total                       close limits cancelled unfilled, re-priced
    guardd_gross_position_value{currency}             gross position value, in `currency`
    guardd_net_liquidation{currency}                  net liquidation, in `currency`
    guardd_leverage_ratio                             gross / net liquidation
    guardd_cushion_ratio                              excess liquidity / net liquidation
    guardd_stress_loss_ratio{scenario}                a stress scenario's projected loss /
                                                      net liquidation (NaN: missing data)
    guardd_order_rate{client_id,window}               the order-rate rule's figure: new orders
                                                      per second over the rule's own window
    guardd_ib_connected                               1 while connected to TWS / IB Gateway
    guardd_last_event_age_seconds                     age of the last broker event (at scrape)
    guardd_mqtt_connected                             1 while connected to the MQTT broker
    guardd_commands_refused_total{channel,error}      every refused command (junk included)
    guardd_mqtt_dropped_total{why}                    MQTT messages dropped unhandled (see below)
    guardd_trigger_to_cancel_seconds                  histogram: trigger to first cancel sent
    guardd_event_processing_seconds                   histogram: one broker event, fold to decision
    guardd_broker_events_coalesced_total              value updates (prices, PnL, values) replaced
                                                      by a later one of the same contract before
                                                      the guard folded them (`guardd.broker.buffer`)
    guardd_broker_reads_paused_total                  times reading from IB paused: the buffer
                                                      between socket and guard was full
    guardd_flatten_pending                            positions not yet flat while a flatten runs
    guardd_flatten_overdue                            1 when a flatten has not gone flat in time
    guardd_close_waiting_for_open                     positions whose close waits for their market
    guardd_notifications_sent_total{kind,target}      notifications delivered
    guardd_notifications_failed_total{kind,target}    notifications not delivered (every try)
    guardd_notifications_dropped_total{kind,reason}   dropped: rate_limited or queue_full
    guardd_watchdog_withheld_total{reason}            systemd watchdog pings withheld (loop_lag,
                                                      broker_stalled)
    guardd_journal_rotation_failing                   1 while the audit journal cannot rotate
    guardd_config_reloads_total{outcome}              reloads of the limits (SIGHUP): applied,
                                                      refused (a bad file, a key needing a restart)
    guardd_build_info{version}                        always 1
    process_*                                         the guard process: resident memory, CPU
                                                      seconds, start time, open and max fds

Conventions: no ``_created`` series (`metrics_handler` leaves them out); a figure without a unit
is a ``_ratio``; money carries its currency as the ``currency`` label (the guard's base
currency, in which it compares limits). ``guardd_order_rate`` is precomputed on purpose: it is
the very figure the order-rate rule compares with its limits, over the rule's own windows (``1s``,
``60s``); a Prometheus ``rate()`` over scrapes would smooth away the one-second burst the rule
halts on. Graph it as a gauge, do not ``rate()`` it. ``process_start_time_seconds`` changing is
a restart (the ``GuarddRestarting`` alert).

``guardd_mqtt_dropped_total`` counts messages the MQTT adapter dropped before the guard: ``why`` is
``queue_full`` (a verified command found the command queue full; it is also refused and
journaled) or ``not_a_command`` (a message on a topic that is neither a command nor a heartbeat).
Refused junk is counted in ``guardd_commands_refused_total``, never dropped uncounted.

``guardd_rule_kill_usage_ratio`` makes "near the kill limit" one comparison for every rule: for a
higher-is-worse rule it is value / kill limit; for a lower-is-worse rule (margin cushion) it is
kill limit / value (+Inf once the value is at or below zero). Alerts and the dashboard use it.
"""

from __future__ import annotations

import contextlib
import math
import time
from bisect import bisect_left
from collections.abc import Awaitable, Callable, Iterable, Mapping
from types import TracebackType
from typing import Final, Protocol, Self

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from guardd.core.rules import BREACH_LEVELS

__all__ = [
    "EVENT_PROCESSING_BUCKETS",
    "KILL_SOURCES",
    "STATES",
    "TRIGGER_TO_CANCEL_BUCKETS",
    "WATCHDOG_REASONS",
    "LevelLimits",
    "Metrics",
    "MetricsServer",
    "kill_usage",
    "metrics_app",
    "metrics_handler",
]

STATES: Final = ("ARMED", "WARNING", "REDUCING", "HALTED")
"""The engine's states, in the order the dashboard shows them."""

"""The levels a rule's limits are exported for."""

KILL_SOURCES: Final = ("rule", "http", "mqtt", "cli", "restored")
"""Where a kill comes from; ``restored`` is the latch found on start. Counted from zero."""

WATCHDOG_REASONS: Final = ("loop_lag", "broker_stalled")
"""Why `sdnotify.HealthWatchdog` withholds a ping. Counted from zero."""

TRIGGER_TO_CANCEL_BUCKETS: Final = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
)
"""0.1 ms to 1 s: from the decision that triggers a kill to the first cancel sent."""

EVENT_PROCESSING_BUCKETS: Final = (
    0.000001,
    0.0000025,
    0.000005,
    0.00001,
    0.000025,
    0.00005,
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
)
"""1 µs to 10 ms: folding one broker event into the Book and deciding."""


class LevelLimits(Protocol):
    """Anything with warn / reduce / kill limits: `core.rules.Thresholds`, `config.LevelLimit`."""

    @property
    def warn(self) -> float | None: ...
    @property
    def reduce(self) -> float | None: ...
    @property
    def kill(self) -> float | None: ...


LimitsLike = LevelLimits | Mapping[str, float | None]
"""A rule's limits: an object with warn / reduce / kill, or a mapping with any of those keys."""


def _limit(limits: LimitsLike, level: str) -> float | None:
    if isinstance(limits, Mapping):
        return limits.get(level)
    value: float | None = getattr(limits, level)
    return value


def kill_usage(value: float | None, kill: float | None, *, higher_is_worse: bool = True) -> float:
    """How close `value` is to the `kill` limit: 1.0 at the limit, above 1 past it; NaN if unknown.

    Higher is worse: value / kill. Lower is worse (margin cushion): kill / value, +Inf at or
    below zero. NaN when the value is missing or the rule has no usable kill limit.
    """
    if value is None or kill is None or math.isnan(value) or math.isnan(kill):
        return math.nan
    if higher_is_worse:
        return value / kill if kill > 0 else math.nan
    if kill <= 0:
        return math.nan
    return kill / value if value > 0 else math.inf


class _LastEventAge(Collector):
    """``guardd_last_event_age_seconds``, computed at scrape from the clock and the last event."""

    def __init__(self, account: str, clock: Callable[[], float], since: float) -> None:
        self._account = account
        self._clock = clock
        self.last_event: float = since

    def collect(self) -> Iterable[Metric]:
        family = GaugeMetricFamily(
            "guardd_last_event_age_seconds",
            "Seconds since the last broker event (since start when none arrived yet).",
            labels=["account"],
        )
        family.add_metric([self._account], max(0.0, self._clock() - self.last_event))
        yield family

    def describe(self) -> Iterable[Metric]:
        # Describing without collecting keeps the registry from calling the clock at register.
        yield GaugeMetricFamily("guardd_last_event_age_seconds", "", labels=["account"])


class _EventProcessing(Collector):
    """``guardd_event_processing_seconds``: a histogram counted in plain ints on the event loop
    (one per broker event, so no lock and no label lookup) and exported at scrape."""

    NAME: Final = "guardd_event_processing_seconds"
    DOC: Final = "Folding one broker event and deciding."

    def __init__(self, account: str, buckets: tuple[float, ...]) -> None:
        self._account = account
        self._bounds = buckets
        self._counts = [0] * (len(buckets) + 1)  # the last: above every bound (+Inf only)
        self._sum = 0.0

    def observe(self, seconds: float) -> None:
        self._counts[bisect_left(self._bounds, seconds)] += 1
        self._sum += seconds

    def collect(self) -> Iterable[Metric]:
        family = HistogramMetricFamily(self.NAME, self.DOC, labels=["account"])
        buckets: list[tuple[str, float]] = []
        total = 0
        for bound, count in zip((*self._bounds, math.inf), self._counts, strict=True):
            total += count
            le = floatToGoString(bound)  # type: ignore[no-untyped-call]  # as Histogram does
            buckets.append((le, float(total)))
        family.add_metric([self._account], buckets, self._sum)
        yield family

    def describe(self) -> Iterable[Metric]:
        yield HistogramMetricFamily(self.NAME, "", labels=["account"])


class _BrokerBuffer(Collector):
    """The broker adapter's buffer counters, read at scrape."""

    def __init__(self, account: str, coalesced: Callable[[], int], paused: Callable[[], int]):
        self._account = account
        self._coalesced = coalesced
        self._paused = paused

    def collect(self) -> Iterable[Metric]:
        for name, doc, read in (
            (
                "guardd_broker_events_coalesced",
                "Value updates replaced by a later one of the same contract before the fold.",
                self._coalesced,
            ),
            (
                "guardd_broker_reads_paused",
                "Times reading from IB paused because the event buffer was full.",
                self._paused,
            ),
        ):
            family = CounterMetricFamily(name, doc, labels=["account"])
            family.add_metric([self._account], float(read()))
            yield family

    def describe(self) -> Iterable[Metric]:
        yield CounterMetricFamily("guardd_broker_events_coalesced", "", labels=["account"])
        yield CounterMetricFamily("guardd_broker_reads_paused", "", labels=["account"])


class Metrics:
    """Every guardd metric, registered on `registry`, labelled with `account`.

    `clock` (epoch seconds, like the broker events' timestamps) is read only at scrape time to
    compute the age of the last broker event; before the first event the age counts from the
    moment this object was made, so a guard that never heard from IB looks stale, not fresh.
    """

    def __init__(
        self,
        registry: CollectorRegistry,
        *,
        account: str,
        version: str,
        clock: Callable[[], float] = time.time,
        process: bool = True,
    ) -> None:
        self.account = account
        a = ("account",)
        r = registry
        self._state = Gauge(
            "guardd_state", "1 for the guard's current state.", (*a, "state"), registry=r
        )
        self._rule_value = Gauge(
            "guardd_rule_value", "A rule's measured figure.", (*a, "rule", "subject"), registry=r
        )
        self._rule_limit = Gauge(
            "guardd_rule_limit", "A rule's limit at one level.", (*a, "rule", "level"), registry=r
        )
        self._kill_usage = Gauge(
            "guardd_rule_kill_usage_ratio",
            "How close a rule is to its kill limit: 1 at the limit (value/kill, or kill/value "
            "for lower-is-worse rules).",
            (*a, "rule", "subject"),
            registry=r,
        )
        self._breaches = Counter(
            "guardd_breaches_total", "Rule breaches by level.", (*a, "rule", "level"), registry=r
        )
        self._kills = Counter("guardd_kills_total", "Kills by source.", (*a, "source"), registry=r)
        self._cancelled = Counter(
            "guardd_orders_cancelled_total", "Orders cancelled by the guard.", a, registry=r
        )
        self._flatten_children = Counter(
            "guardd_flatten_child_orders_total",
            "Child orders sent to close positions.",
            a,
            registry=r,
        )
        self._impersonated = Counter(
            "guardd_impersonated_orders_total",
            "Orders labelled as the guard's own (orderRef guardd:) that the guard did not place.",
            a,
            registry=r,
        )
        self._impersonated.labels(account)  # exported at 0 from the start: alerts see the rise
        self._close_repriced = Counter(
            "guardd_close_repriced_total",
            "Close child orders cancelled unfilled and replaced at a fresh price.",
            a,
            registry=r,
        )
        self._money_currency: str | None = None  # the currency label money is shown with
        self._gross = Gauge(
            "guardd_gross_position_value",
            "Gross position value, in the base currency (label currency).",
            (*a, "currency"),
            registry=r,
        )
        self._net_liq = Gauge(
            "guardd_net_liquidation",
            "Net liquidation, in the base currency (label currency).",
            (*a, "currency"),
            registry=r,
        )
        self._leverage = Gauge(
            "guardd_leverage_ratio", "Gross position value / net liquidation.", a, registry=r
        )
        self._cushion = Gauge(
            "guardd_cushion_ratio", "Excess liquidity / net liquidation.", a, registry=r
        )
        self._stress = Gauge(
            "guardd_stress_loss_ratio",
            "A stress scenario's projected loss of the whole book / net liquidation (NaN: an "
            "input is missing).",
            (*a, "scenario"),
            registry=r,
        )
        self._stress_shown: set[str] = set()
        self._order_rate = Gauge(
            "guardd_order_rate",
            "The order-rate rule's figure: new orders per second over its window, per client id "
            "(precomputed: a rate() over scrapes would smooth away a one-second burst).",
            (*a, "client_id", "window"),
            registry=r,
        )
        self._ib_connected = Gauge(
            "guardd_ib_connected", "1 while connected to TWS / IB Gateway.", a, registry=r
        )
        self._ib_read_only = Gauge(
            "guardd_ib_read_only",
            "1 while TWS's Read-Only API refuses the guard's orders and cancels (error 321): "
            "a kill latches but cannot cancel or close until an operator switches it off.",
            a,
            registry=r,
        )
        self._mqtt_connected = Gauge(
            "guardd_mqtt_connected", "1 while connected to the MQTT broker.", a, registry=r
        )
        self._trigger_to_cancel = Histogram(
            "guardd_trigger_to_cancel_seconds",
            "From the decision that triggers a kill to the first cancel sent.",
            a,
            buckets=TRIGGER_TO_CANCEL_BUCKETS,
            registry=r,
        )
        self._event_processing = _EventProcessing(account, EVENT_PROCESSING_BUCKETS)
        r.register(self._event_processing)
        self._flatten_pending = Gauge(
            "guardd_flatten_pending", "Positions not yet flat while a flatten runs.", a, registry=r
        )
        self._close_waiting = Gauge(
            "guardd_close_waiting_for_open",
            "Positions to close whose market is closed: their close waits for the open.",
            a,
            registry=r,
        )
        self._flatten_overdue = Gauge(
            "guardd_flatten_overdue", "1 when a flatten has not gone flat in time.", a, registry=r
        )
        self._latch_durable = Gauge(
            "guardd_latch_durable",
            "1 when the latch file says what the engine's state is; 0 while a latch write has "
            "failed and is being retried (a restart would not come back as the guard is now).",
            a,
            registry=r,
        )
        self._rotation_failing = Gauge(
            "guardd_journal_rotation_failing",
            "1 while the audit journal cannot rotate ([journal] rotate): records go on into the "
            "file they were in and every append tries again.",
            a,
            registry=r,
        )
        self._rotation_failing.labels(account).set(0)
        self._config_reloads = Counter(
            "guardd_config_reloads_total",
            "Reloads of the limits (SIGHUP) by outcome: applied or refused.",
            (*a, "outcome"),
            registry=r,
        )
        self._journal_errors = Counter(
            "guardd_journal_write_errors_total",
            "Journal records the guard could not write (the action itself still went out).",
            a,
            registry=r,
        )
        self._notifications_sent = Counter(
            "guardd_notifications_sent_total",
            "Notifications delivered, by kind of notice and target.",
            (*a, "kind", "target"),
            registry=r,
        )
        self._notifications_failed = Counter(
            "guardd_notifications_failed_total",
            "Notifications not delivered after every try, by kind of notice and target.",
            (*a, "kind", "target"),
            registry=r,
        )
        self._notifications_dropped = Counter(
            "guardd_notifications_dropped_total",
            "Notifications dropped unsent: over the kind's rate limit (rate_limited) or pushed "
            "out of a full target queue (queue_full).",
            (*a, "kind", "reason"),
            registry=r,
        )
        self._watchdog_withheld = Counter(
            "guardd_watchdog_withheld_total",
            "systemd watchdog pings withheld because the guard was unhealthy, by reason "
            "(loop_lag, broker_stalled); two in a row and systemd restarts the guard.",
            (*a, "reason"),
            registry=r,
        )
        self._refused = Counter(
            "guardd_commands_refused_total",
            "Commands refused before reaching the guard (bad credential, signature, replay, "
            "malformed), by channel and error class.",
            (*a, "channel", "error"),
            registry=r,
        )
        self._mqtt_dropped = Counter(
            "guardd_mqtt_dropped_total",
            "MQTT messages dropped before the guard, by why (queue_full, not_a_command).",
            (*a, "why"),
            registry=r,
        )
        build_info = Gauge(
            "guardd_build_info", "guardd's version; always 1.", (*a, "version"), registry=r
        )
        self._levels: dict[str, str] = {}
        self._last_event = _LastEventAge(account, clock, since=clock())
        registry.register(self._last_event)
        self._registry = registry
        if process:
            # process_*: RSS, CPU, start time (a change is a restart), open and max fds.
            ProcessCollector(registry=registry)

        # Series that exist from the start, so that rate() and alerts see them from zero.
        build_info.labels(account, version).set(1)
        for state in STATES:
            self._state.labels(account, state).set(0)
        for source in KILL_SOURCES:
            self._kills.labels(account, source)
        self._cancelled.labels(account)
        self._flatten_children.labels(account)
        self._close_repriced.labels(account)
        self._ib_connected.labels(account).set(0)
        self._ib_read_only.labels(account).set(0)
        self._flatten_pending.labels(account).set(0)
        self._flatten_overdue.labels(account).set(0)
        self._close_waiting.labels(account).set(0)
        self._latch_durable.labels(account).set(1)
        self._journal_errors.labels(account)
        for reason in WATCHDOG_REASONS:
            self._watchdog_withheld.labels(account, reason)
        self._trigger_to_cancel.labels(account)
        # guardd_mqtt_connected appears on the first set_mqtt_connected(): a guard without MQTT
        # exports no such series, so the MqttDisconnected alert stays quiet for it.

    # ------------------------------------------------------------------------------ state, rules

    def set_state(self, state: str) -> None:
        """Mark `state` (ARMED, WARNING, REDUCING, HALTED, or a `State`) as the current one."""
        current = str(getattr(state, "value", state))
        if current not in STATES:
            raise ValueError(f"unknown state {current!r}; expected one of {', '.join(STATES)}")
        for name in STATES:
            self._state.labels(self.account, name).set(1 if name == current else 0)

    def observe_rule(
        self,
        rule: str,
        subject: str,
        value: float | None,
        limits: LimitsLike,
        *,
        higher_is_worse: bool = True,
    ) -> None:
        """Export a rule's value for `subject` ("" for the account) and its warn/reduce/kill limits.

        A missing value (a "data" finding) is exported as NaN; an unset limit is not exported.
        """
        figure = math.nan if value is None else float(value)
        self._rule_value.labels(self.account, rule, subject).set(figure)
        for level in BREACH_LEVELS:
            limit = _limit(limits, level)
            if limit is None:
                self._remove(self._rule_limit, rule, level)
            else:
                self._rule_limit.labels(self.account, rule, level).set(limit)
        usage = kill_usage(value, _limit(limits, "kill"), higher_is_worse=higher_is_worse)
        self._kill_usage.labels(self.account, rule, subject).set(usage)

    def forget_subject(self, rule: str, subject: str) -> None:
        """Drop a subject's series (a position closed, a client went away)."""
        self._remove(self._rule_value, rule, subject)
        self._remove(self._kill_usage, rule, subject)

    def count_breach(self, rule: str, level: str) -> None:
        """Count one breach of `rule` at `level` (warn, reduce, kill)."""
        self._breaches.labels(self.account, rule, level).inc()

    def observe_level(self, rule: str, level: str) -> bool:
        """Note `rule`'s current level; count a breach when it enters warn, reduce or kill.

        Rules are evaluated several times a second: a breach that holds is counted once, when
        its level is first reached (or changes, e.g. warn to kill), not on every evaluation.
        Any other level ("ok", "data") ends the breach. True when a breach was counted.
        """
        previous = self._levels.get(rule)
        self._levels[rule] = level
        if level in BREACH_LEVELS and level != previous:
            self.count_breach(rule, level)
            return True
        return False

    def count_kill(self, source: str) -> None:
        """Count one kill from `source` (rule, http, mqtt, cli, restored)."""
        self._kills.labels(self.account, source).inc()

    # ------------------------------------------------------------------------------ actions

    def count_cancelled(self, n: int = 1) -> None:
        """Count `n` orders cancelled by the guard."""
        if n < 0:
            raise ValueError("a count of cancelled orders cannot be negative")
        self._cancelled.labels(self.account).inc(n)

    def count_flatten_child(self) -> None:
        """Count one child order sent to close a position."""
        self._flatten_children.labels(self.account).inc()

    def count_impersonated(self, n: int = 1) -> None:
        """Count `n` foreign orders seen carrying the guard's own orderRef label."""
        self._impersonated.labels(self.account).inc(n)

    def count_close_repriced(self) -> None:
        """Count one close child replaced at a fresh price after it did not fill."""
        self._close_repriced.labels(self.account).inc()

    def set_flatten(self, pending: int, overdue: bool) -> None:
        """Positions not yet flat while a flatten runs, and whether it has overrun its deadline."""
        self._flatten_pending.labels(self.account).set(pending)
        self._flatten_overdue.labels(self.account).set(1 if overdue else 0)

    def set_close_waiting_for_open(self, positions: int) -> None:
        """Positions to close whose market is closed (their close waits for the open)."""
        self._close_waiting.labels(self.account).set(positions)

    def set_latch_durable(self, durable: bool) -> None:
        """Whether the latch file agrees with the engine's state (0: a write failed, retrying)."""
        self._latch_durable.labels(self.account).set(1 if durable else 0)

    def watch_broker_buffer(self, coalesced: Callable[[], int], paused: Callable[[], int]) -> None:
        """Export the broker adapter's buffer counters (read at every scrape)."""
        self._registry.register(_BrokerBuffer(self.account, coalesced, paused))

    def count_watchdog_withheld(self, reason: str) -> None:
        """Count one systemd watchdog ping withheld for `reason` (loop_lag, broker_stalled)."""
        self._watchdog_withheld.labels(self.account, reason).inc()

    def set_journal_rotation_failing(self, failing: bool) -> None:
        """1 while the journal's rotation fails (``Journal.rotation_error``)."""
        self._rotation_failing.labels(self.account).set(1 if failing else 0)

    def count_config_reload(self, outcome: str) -> None:
        """Count one reload of the limits: ``applied`` or ``refused``."""
        self._config_reloads.labels(self.account, outcome).inc()

    def clear_rules(self) -> None:
        """Drop every rule's series (the rule set was reloaded); the next publish fills them
        again for the rules that remain, so a removed rule leaves no stale limit behind."""
        for gauge in (self._rule_value, self._rule_limit, self._kill_usage):
            gauge.clear()

    def count_journal_error(self) -> None:
        """Count one journal record that could not be written."""
        self._journal_errors.labels(self.account).inc()

    # ------------------------------------------------------------------------------ notifications

    def init_notifications(self, targets: Iterable[tuple[str, Iterable[str]]]) -> None:
        """Export every target's sent and failed series (and the dropped ones) at 0, so that
        alerts see the first failure as a rise: `targets` is (name, kinds it gets)."""
        kinds: set[str] = set()
        for target, wanted in targets:
            for kind in wanted:
                kinds.add(kind)
                self._notifications_sent.labels(self.account, kind, target)
                self._notifications_failed.labels(self.account, kind, target)
        for kind in kinds:
            for reason in ("rate_limited", "queue_full"):
                self._notifications_dropped.labels(self.account, kind, reason)

    def count_notification_sent(self, kind: str, target: str) -> None:
        """Count one notification delivered to `target`."""
        self._notifications_sent.labels(self.account, kind, target).inc()

    def count_notification_failed(self, kind: str, target: str) -> None:
        """Count one notification that every try failed to deliver to `target`."""
        self._notifications_failed.labels(self.account, kind, target).inc()

    def count_notification_dropped(self, kind: str, reason: str) -> None:
        """Count one notification dropped unsent (`reason`: rate_limited, queue_full)."""
        self._notifications_dropped.labels(self.account, kind, reason).inc()

    # ------------------------------------------------------------------------------ account

    def set_exposure(
        self,
        gross: float | None,
        net_liq: float | None,
        leverage: float | None,
        cushion: float | None,
        *,
        currency: str | None,
    ) -> None:
        """Gross value and net liquidation (in the base `currency`), leverage, cushion; None
        is NaN. While the base currency is not known (None) there is no money figure to show;
        when it becomes known or changes, the series of the old label goes away."""
        shown = self._money_currency
        for money, amount in ((self._gross, gross), (self._net_liq, net_liq)):
            if shown is not None and shown != currency:
                money.remove(self.account, shown)
            if currency is not None:
                money.labels(self.account, currency).set(math.nan if amount is None else amount)
        self._money_currency = currency
        for ratio, value in ((self._leverage, leverage), (self._cushion, cushion)):
            ratio.labels(self.account).set(math.nan if value is None else value)

    def set_stress(self, ratios: Mapping[str, float | None]) -> None:
        """Each configured scenario's loss / net liquidation (None is NaN); a scenario no
        longer configured (a reload) loses its series."""
        for gone in self._stress_shown - ratios.keys():
            self._stress.remove(self.account, gone)
        for scenario, ratio in ratios.items():
            self._stress.labels(self.account, scenario).set(math.nan if ratio is None else ratio)
        self._stress_shown = set(ratios)

    def set_order_rate(self, client_id: int | str, window: str, rate: float) -> None:
        """New orders per second of `client_id` ("total" for all) over `window` ("1s", "60s")."""
        self._order_rate.labels(self.account, str(client_id), window).set(rate)

    # ------------------------------------------------------------------------------ connectivity

    def set_ib_connected(self, connected: bool) -> None:
        """Whether the guard is connected to TWS / IB Gateway."""
        self._ib_connected.labels(self.account).set(1 if connected else 0)

    def set_ib_read_only(self, read_only: bool) -> None:
        """Whether TWS's Read-Only API refuses orders and cancels (error 321)."""
        self._ib_read_only.labels(self.account).set(1 if read_only else 0)

    def mark_event(self, ts: float) -> None:
        """Record the time (epoch seconds, the clock's scale) of the latest broker event."""
        self._last_event.last_event = max(self._last_event.last_event, ts)

    def count_refused(self, channel: str, error: str) -> None:
        """Count one refused command (``error``: the error class, e.g. AuthError)."""
        self._refused.labels(self.account, channel, error).inc()

    def count_mqtt_dropped(self, why: str) -> None:
        """Count one MQTT message dropped before the guard."""
        self._mqtt_dropped.labels(self.account, why).inc()

    def set_mqtt_connected(self, connected: bool) -> None:
        """Whether the guard is connected to the MQTT broker."""
        self._mqtt_connected.labels(self.account).set(1 if connected else 0)

    # ------------------------------------------------------------------------------ latencies

    def observe_trigger_to_cancel(self, seconds: float) -> None:
        """Record the time from a kill's trigger to its first cancel sent."""
        self._trigger_to_cancel.labels(self.account).observe(seconds)

    def observe_event_processing(self, seconds: float) -> None:
        """Record the time taken to fold one broker event and decide."""
        self._event_processing.observe(seconds)

    # ------------------------------------------------------------------------------ helpers

    def _remove(self, gauge: Gauge, *labels: str) -> None:
        with contextlib.suppress(KeyError):
            gauge.remove(self.account, *labels)


# ---------------------------------------------------------------------------------------------
# Serving /metrics


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class _WithoutCreated:
    """`registry` as served: every family without its ``_created`` samples.

    prometheus_client adds a ``<name>_created`` series to every counter and histogram; it
    doubles the series count and Prometheus' own conventions leave it out. This view drops them
    at scrape for any registry it is given, with no process-wide switch.
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        self._registry = registry

    def collect(self) -> Iterable[Metric]:
        for family in self._registry.collect():
            created = f"{family.name}_created"
            family.samples = [s for s in family.samples if s.name != created]
            yield family


def metrics_handler(registry: CollectorRegistry) -> Handler:
    """An aiohttp handler that renders `registry` (text format, or OpenMetrics when asked for),
    without ``_created`` series.

    The control server mounts it with ``app.router.add_get("/metrics", metrics_handler(reg))``.
    """
    served = _WithoutCreated(registry)

    async def handle_metrics(request: web.Request) -> web.StreamResponse:
        encoder, content_type = choose_encoder(request.headers.get("Accept", ""))
        body = encoder(served)  # the encoders only call collect()
        return web.Response(body=body, headers={"Content-Type": content_type})

    return handle_metrics


def metrics_app(registry: CollectorRegistry) -> web.Application:
    """An aiohttp application serving only ``GET /metrics`` from `registry`."""
    app = web.Application()
    app.router.add_get("/metrics", metrics_handler(registry))
    return app


class MetricsServer:
    """The metrics listener of its own: ``async with MetricsServer(registry, host, port) as s``.

    Port 0 picks a free port; `port` holds the bound one once entered.
    """

    def __init__(self, registry: CollectorRegistry, host: str = "127.0.0.1", port: int = 9464):
        self._runner = web.AppRunner(metrics_app(registry), access_log=None, shutdown_timeout=0.5)
        self.host = host
        self.port = port

    async def __aenter__(self) -> Self:
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        try:
            await site.start()
        except BaseException:
            await self._runner.cleanup()
            raise
        addresses = self._runner.addresses
        if addresses:
            self.port = int(addresses[0][1])
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self._runner.cleanup()

    @property
    def url(self) -> str:
        """The /metrics URL being served."""
        return f"http://{self.host}:{self.port}/metrics"
