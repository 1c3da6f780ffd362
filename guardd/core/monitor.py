"""The monitor: which rules judge the Book when, and the latest finding of each.

The guard folds every broker event into the Book and asks the monitor what to judge:

- on an order event (the fast path, `Monitor.on_order`): the order-rate rule, the per-order
  checks of that one order (a foreign working order; guardd's own close orders are never
  checked), and the impersonation rule when an order labelled as the guard's appeared. A runaway
  bot is stopped on the order that breaks the limit, not on the next timer tick. The engine steps
  when a finding was judged again, and on every order event while HALTED (a sweep may be due).
- on the timer (`Monitor.on_timer`): every periodic rule and the order rate. A per-order breach
  is judged only when its order appears, so one that did not halt (a warn-level check) is dropped
  here: it holds until the next tick, then clears unless another order breaks the checks again.

It keeps the latest finding of each rule by rule name (what the engine, the console, the status
and the metrics read), bundles them into the engine's `Evaluation`, and says each rule's levels
and which way is worse (`Scale`) for the console and the metrics. Pure: the caller passes the Book
and `now`; the monitor reads no clock and does no I/O.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from types import MappingProxyType

from guardd.core import events as ev
from guardd.core.book import Book, Order
from guardd.core.engine import Evaluation
from guardd.core.lines import LineWant
from guardd.core.rules import (
    DailyLoss,
    Drawdown,
    Finding,
    Impersonation,
    Leverage,
    MaintMargin,
    MarginCushion,
    MarginSpike,
    OrderChecks,
    OrderRate,
    Rule,
    Thresholds,
    Volatility,
)
from guardd.core.stress import StressLoss


@dataclass(frozen=True, slots=True)
class RuleSet:
    """The rules evaluated on a timer, and the per-order checks run on every new order."""

    periodic: tuple[Rule, ...]
    order_checks: OrderChecks | None
    order_rate: OrderRate | None
    # also in `periodic`; judged at once when an impersonating order appears
    impersonation: Impersonation


@dataclass(frozen=True, slots=True)
class Scale:
    """A rule's warn / reduce / kill levels and which way its figure is worse."""

    limits: Thresholds
    higher_is_worse: bool = True


@dataclass(frozen=True, slots=True)
class Reading:
    """A finding with a finite figure, on its rule's scale (an unscaled rule: no levels)."""

    finding: Finding
    scale: Scale


@dataclass(frozen=True, slots=True)
class PriceWatch:
    """Watch this contract's live prices (on its own exchange)."""

    con_id: ev.ConId


@dataclass(frozen=True, slots=True)
class ScenarioLoss:
    """One stress scenario now: its loss (base currency) and loss / NetLiquidation, None when
    an input is missing."""

    name: str
    loss: float | None
    ratio: float | None


@dataclass(frozen=True, slots=True)
class StressFigures:
    """Every configured stress scenario's loss, and the input that is missing (None: none)."""

    scenarios: tuple[ScenarioLoss, ...]
    missing: str | None


@dataclass(frozen=True, slots=True)
class ExposureFigures:
    """The account's exposure as the metrics show it, whatever the rules: gross position value
    and net liquidation (base currency), leverage = gross / net liquidation, the Cushion IB
    reports. None where it is not known (gross: see `Book.exposure`; leverage: also while net
    liquidation is not positive)."""

    gross: float | None
    net_liquidation: float | None
    leverage: float | None
    cushion: float | None


_NO_SCALE = Scale(Thresholds())


class Monitor:
    """The latest finding of each rule of a `RuleSet`, judged on order events and on a timer."""

    def __init__(self, rules: RuleSet) -> None:
        self._rules = rules
        self._scales = _scales(rules)
        self._findings: dict[str, Finding] = {}
        self._watched: set[ev.ConId] = set()

    @property
    def rules(self) -> RuleSet:
        """The rules judged now."""
        return self._rules

    @property
    def findings(self) -> Mapping[str, Finding]:
        """The latest finding of each rule, by rule name (read-only)."""
        return MappingProxyType(self._findings)

    def set_rules(self, rules: RuleSet) -> None:
        """Judge by `rules` from now on (a reload of the limits). A removed rule's last finding
        is dropped: it must not hold a breach (or a state) any longer."""
        self._rules = rules
        self._scales = _scales(rules)
        names = {rule.name for rule in rules.periodic}
        if rules.order_rate is not None:
            names.add(rules.order_rate.name)
        if rules.order_checks is not None:
            names.add(rules.order_checks.name)
        self._findings = {name: f for name, f in self._findings.items() if name in names}

    def on_order(
        self,
        book: Book,
        event: ev.OpenOrder | ev.OrderStatus,
        now: float,
        *,
        impersonated: bool,
        halted: bool,
    ) -> bool:
        """The fast path, after `event` was folded into `book`: judge what a new order may break
        now (`impersonated`: an order labelled as the guard's appeared). True when the engine
        must step: a finding was judged again, or the guard is HALTED (a sweep may be due)."""
        changed = False
        if impersonated:
            rule = self._rules.impersonation
            self._findings[rule.name] = rule.evaluate(book, now)
            changed = True
        if self._rules.order_rate is not None:
            self._findings[self._rules.order_rate.name] = self._rules.order_rate.evaluate(book, now)
            changed = True
        checks = self._rules.order_checks
        if checks is not None and isinstance(event, ev.OpenOrder):
            order = book.order(event.perm_id)
            if order is not None and order.working and not book.is_own(order):
                finding = checks.check(order, book, now)
                # A breach stands until the timer clears it: a later order that passes does not
                # hide it. The first check of all is kept whatever it says (the console shows it).
                if finding.breach or self._findings.get(checks.name) is None:
                    self._findings[checks.name] = finding
                    changed = True
        return changed or halted

    def on_timer(self, book: Book, now: float, *, halted: bool) -> None:
        """Judge every periodic rule and the order rate at `now`; drop a per-order breach that
        did not halt (module docstring). While HALTED the breach is kept: it is the kill's
        finding, and a re-arm is refused while a kill-level finding holds."""
        for rule in self._rules.periodic:
            finding = rule.evaluate(book, now)
            self._findings[finding.rule] = finding
        if self._rules.order_rate is not None:
            self._findings[self._rules.order_rate.name] = self._rules.order_rate.evaluate(book, now)
        checks = self._rules.order_checks
        stale = self._findings.get(checks.name) if checks is not None else None
        if checks is not None and stale is not None and stale.breach and not halted:
            del self._findings[checks.name]

    def evaluation(self, book: Book) -> Evaluation:
        """The findings with the Book facts the engine needs, for one engine step."""
        return Evaluation.of(book, tuple(self._findings.values()))

    def scale(self, rule: str) -> Scale | None:
        """`rule`'s levels and direction, None for a rule without levels (e.g. heartbeats)."""
        return self._scales.get(rule)

    def readings(self) -> Iterator[Reading]:
        """Each finding with a finite figure, on its rule's scale: what the metrics export."""
        for finding in self._findings.values():
            if finding.value is not None and math.isfinite(finding.value):
                yield Reading(finding, self._scales.get(finding.rule, _NO_SCALE))

    def price_watch(self, book: Book, event: ev.BrokerEvent) -> PriceWatch | None:
        """The contract whose live prices `event` (folded into `book`) asks to watch, once per
        contract: the contract of a foreign order when the per-order price collar is configured
        (it needs a last price). Held positions are not watched here: their market-data lines
        are chosen by exposure within IB's line limit (`guardd.core.lines`, the guard's
        `_rank_lines`)."""
        if not isinstance(event, ev.OpenOrder) or not self._collared:
            return None
        con_id = event.con_id
        order = book.order(event.perm_id)
        if (order is not None and book.is_own(order)) or not con_id or con_id in self._watched:
            return None
        self._watched.add(con_id)
        return PriceWatch(con_id)

    def line_wants(self, book: Book) -> list[LineWant]:
        """The contracts that want a market-data line (`guardd.core.lines`): every held position
        by its exposure (|value| in the base currency; NaN, ranked first, while it has no value)
        and, when the per-order price collar is configured, the contract of each foreign working
        order by its notional (`choose_lines` ranks a contract both held and ordered by the
        more urgent of the two)."""
        wants = []
        for p in book.guarded_positions():
            if p.value is None or not p.known:
                exposure = math.nan
            else:
                exposure = abs(p.value) * (book.exchange_rate(p.currency) or 1.0)
            wants.append(LineWant(p.con_id, exposure))
        if self._collared:
            for order in book.working_orders():
                if order.con_id and not book.is_own(order):
                    wants.append(LineWant(order.con_id, _order_exposure(book, order)))
        return wants

    @property
    def _collared(self) -> bool:
        """Whether the per-order price collar is on: it needs a price of each foreign order."""
        checks = self._rules.order_checks
        return checks is not None and checks.collar is not None

    def stress(self, book: Book, now: float) -> StressFigures | None:
        """Each configured stress scenario's loss now, None when none is configured."""
        rule = next((r for r in self._rules.periodic if isinstance(r, StressLoss)), None)
        if rule is None:
            return None
        report = rule.losses(book, now)
        nl = book.net_liquidation
        net_liq = nl.value if nl is not None and math.isfinite(nl.value) and nl.value > 0 else None
        scenarios = []
        for scenario in rule.scenarios:
            loss = report.losses.get(scenario.name)
            ratio = None if loss is None or net_liq is None else loss / net_liq
            scenarios.append(ScenarioLoss(scenario.name, loss, ratio))
        missing = None if report.missing is None else report.missing.message
        return StressFigures(tuple(scenarios), missing)


def exposure_figures(book: Book) -> ExposureFigures:
    """The account's gross, net liquidation, leverage and cushion now (`ExposureFigures`)."""
    gross = book.exposure().gross
    nl = book.net_liquidation
    cushion = book.value("Cushion")
    net_liq = nl.value if nl is not None else None
    leverage = None
    if gross is not None and net_liq is not None and net_liq > 0:
        leverage = gross / net_liq
    return ExposureFigures(
        gross=gross,
        net_liquidation=net_liq,
        leverage=leverage,
        cushion=cushion.value if cushion is not None else None,
    )


def _order_exposure(book: Book, order: Order) -> float:
    """|quantity x multiplier x price| of an order in the base currency (its limit, else the
    contract's reference price; 0 when neither is known)."""
    price = order.lmt_price
    if not (math.isfinite(price) and price > 0):
        price = book.quote(order.con_id).reference
    notional = abs(order.quantity * order.multiplier * price)
    if not math.isfinite(notional):
        return 0.0
    return notional * (book.exchange_rate(order.currency) or 1.0)


def _scales(rules: RuleSet) -> dict[str, Scale]:
    """Each rule's scale by rule name. The order rate shows its per-client 1 s levels (the
    limit a runaway bot meets first); a margin cushion is worse the lower it is."""
    scales: dict[str, Scale] = {}
    for rule in rules.periodic:
        match rule:
            case MarginCushion():
                scales[rule.name] = Scale(rule.limits, higher_is_worse=False)
            case (
                Leverage()
                | MaintMargin()
                | MarginSpike()
                | DailyLoss()
                | Drawdown()
                | Volatility()
                | StressLoss()
            ):
                scales[rule.name] = Scale(rule.limits)
            case _:
                pass  # judged against no levels of its own (a count, a timeout, a list)
    if rules.order_rate is not None:
        scales[rules.order_rate.name] = Scale(rules.order_rate.per_client_1s)
    return scales
