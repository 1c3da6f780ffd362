"""The monitor: which findings an order event and a timer tick judge, and what they keep."""

from __future__ import annotations

import math
from dataclasses import replace

from hypothesis import given
from hypothesis import strategies as st

from guardd.config import parse_config
from guardd.core.events import ConId
from guardd.core.monitor import Monitor, PriceWatch, RuleSet, Scale, exposure_figures
from guardd.core.rules import (
    Finding,
    Heartbeats,
    Impersonation,
    MarginCushion,
    OrderChecks,
    OrderRate,
    Rule,
    Thresholds,
)
from guardd.core.stress import Scenario, StressLoss
from guardd.runtime.rulebook import build_rules
from tests.book_events import GUARD_CLIENT, T, av, book_with, order, pos, tick

CHECKS = OrderChecks(max_quantity=100)
WARN_CHECKS = OrderChecks(max_quantity=100, level="warn")
RATE = OrderRate(per_client_1s=Thresholds(warn=10, kill=30))
CUSHION = MarginCushion(Thresholds(warn=0.25, kill=0.08))


def monitor(
    *periodic: Rule, checks: OrderChecks | None = None, rate: OrderRate | None = None
) -> Monitor:
    impersonation = Impersonation()
    return Monitor(RuleSet((*periodic, impersonation), checks, rate, impersonation))


def test_order_breaking_a_per_order_limit_then_breach_and_the_engine_steps() -> None:
    # Arrange
    mon = monitor(checks=CHECKS)
    big = order(1, qty=500)
    book = book_with(tick(1, 100.0), big)

    # Act
    step = mon.on_order(book, big, T, impersonated=False, halted=False)

    # Assert
    assert step
    found = mon.findings["order_checks"]
    assert (found.level, found.subject) == ("kill", "perm:1")


def test_passing_order_after_a_breach_then_the_breach_is_not_hidden() -> None:
    # Arrange: a warn-level breach (it does not halt), then an order within the limit
    mon = monitor(checks=WARN_CHECKS)
    big, small = order(1, qty=500), order(2, qty=10)
    book = book_with(tick(1, 100.0), big)
    mon.on_order(book, big, T, impersonated=False, halted=False)
    book.fold(small)

    # Act
    step = mon.on_order(book, small, T, impersonated=False, halted=False)

    # Assert: nothing judged again, the breach stands
    assert not step
    assert mon.findings["order_checks"].subject == "perm:1"


def test_warn_per_order_breach_then_cleared_on_the_next_tick_unless_halted() -> None:
    # Arrange
    big = order(1, qty=500)
    book = book_with(tick(1, 100.0), big)
    running, halted = monitor(checks=WARN_CHECKS), monitor(checks=WARN_CHECKS)
    for mon in (running, halted):
        mon.on_order(book, big, T, impersonated=False, halted=False)

    # Act
    running.on_timer(book, T + 0.25, halted=False)
    halted.on_timer(book, T + 0.25, halted=True)

    # Assert: a HALTED guard keeps the finding that killed it (a re-arm is refused meanwhile)
    assert "order_checks" not in running.findings
    assert halted.findings["order_checks"].breach


def test_own_close_order_then_not_checked_and_the_engine_steps_only_while_halted() -> None:
    # Arrange: the guard's own child (claimed id) far over the per-order limit
    mon = monitor(checks=CHECKS)
    child = order(2, client=GUARD_CLIENT, qty=500)
    book = book_with(tick(1, 100.0), child, claimed=(2,))

    # Act
    running = mon.on_order(book, child, T, impersonated=False, halted=False)
    halted = mon.on_order(book, child, T, impersonated=False, halted=True)

    # Assert
    assert (running, halted) == (False, True)
    assert "order_checks" not in mon.findings


def test_any_order_event_with_an_order_rate_then_rate_judged_and_the_engine_steps() -> None:
    mon = monitor(rate=RATE)
    first = order(1)
    book = book_with(first)

    assert mon.on_order(book, first, T, impersonated=False, halted=False)
    assert mon.findings["order_rate"].level == "ok"


def test_impersonating_order_then_its_rule_judged_at_once() -> None:
    # Arrange
    mon = monitor()
    impostor = order(1, client=7, ref="guardd:flatten:1:1")
    book = book_with(impostor)

    # Act
    step = mon.on_order(book, impostor, T, impersonated=True, halted=False)

    # Assert
    assert step
    assert mon.findings["impersonation"].level == "warn"


def test_timer_then_every_periodic_rule_and_the_rate_judged() -> None:
    mon = monitor(CUSHION, rate=RATE)
    book = book_with(av("NetLiquidation", "100000"), av("ExcessLiquidity", "5000"))

    mon.on_timer(book, T, halted=False)

    assert {name: f.level for name, f in mon.findings.items()} == {
        "margin_cushion": "kill",
        "impersonation": "ok",
        "order_rate": "ok",
    }
    assert mon.evaluation(book).findings == tuple(mon.findings.values())


def test_reload_without_a_rule_then_its_last_finding_dropped() -> None:
    # Arrange: a per-order breach and a cushion finding
    mon = monitor(CUSHION, checks=CHECKS)
    big = order(1, qty=500)
    book = book_with(tick(1, 100.0), big, av("NetLiquidation", "100000"))
    mon.on_order(book, big, T, impersonated=False, halted=True)
    mon.on_timer(book, T, halted=True)

    # Act: the reloaded limits have no per-order checks
    impersonation = Impersonation()
    mon.set_rules(RuleSet((CUSHION, impersonation), None, None, impersonation))

    # Assert
    assert set(mon.findings) == {"margin_cushion", "impersonation"}


def test_scales_then_cushion_lower_is_worse_rate_per_client_and_counts_unscaled() -> None:
    mon = monitor(CUSHION, Heartbeats({"bot": 5.0}), rate=RATE)

    assert mon.scale("margin_cushion") == Scale(CUSHION.limits, higher_is_worse=False)
    assert mon.scale("order_rate") == Scale(RATE.per_client_1s)
    assert mon.scale("heartbeat") is None
    assert mon.scale("impersonation") is None


def test_every_rule_with_levels_in_the_config_then_scaled_by_them() -> None:
    # Arrange: every rule that has levels configured
    levels = "warn = 0.1\nreduce = 0.2\nkill = 0.3\n"
    cfg = parse_config(
        'account = "DU1"\nstate_dir = "state"\n[ib]\nclient_id = 7\n'
        + "".join(
            f"[limits.{name}]\n{levels}"
            for name in (
                "leverage",
                "maint_margin_ratio",
                "margin_spike",
                "daily_loss",
                "drawdown",
                "volatility",
            )
        )
        + "target_leverage = 0.05\n"  # the last one, volatility, asks for it
        + "[limits.margin_cushion]\nwarn = 0.3\nreduce = 0.2\nkill = 0.1\n"
        + '[limits.stress]\nwarn = 0.1\n[[limits.stress.scenarios]]\nname = "down"\n'
        + "underlying_move = -0.1\n"
    )
    rules = build_rules(cfg)

    # Act
    mon = Monitor(rules)

    # Assert: each scale is the rule's own levels
    graded = [rule for rule in rules.periodic if hasattr(rule, "limits")]
    assert len(graded) == 8
    for rule in graded:
        scale = mon.scale(rule.name)
        assert scale is not None and scale.limits == rule.limits, rule.name


def test_readings_then_only_finite_figures_on_their_scale() -> None:
    # Arrange: a measured cushion, and a rule that could not measure (no NetLiquidation)
    mon = monitor(CUSHION, MarginCushion(Thresholds(warn=0.3), name="cushion_unmeasured"))
    book = book_with(av("NetLiquidation", "100000"), av("ExcessLiquidity", "50000"))
    mon.on_timer(book, T, halted=False)

    # Act
    readings = {r.finding.rule: r for r in mon.readings()}

    # Assert: impersonation counts 0 (no levels); both cushions measured
    assert readings["margin_cushion"].scale == Scale(CUSHION.limits, higher_is_worse=False)
    assert readings["impersonation"].scale == Scale(Thresholds())
    assert all(r.finding.value is not None for r in readings.values())


def test_held_position_then_not_watched_here_its_line_is_chosen_by_exposure() -> None:
    mon = monitor(checks=OrderChecks(collar=0.05))
    held, flat, stranger = pos(5, 100), pos(6, 0), replace(pos(7, 100), account="DU2")
    book = book_with(held, flat, stranger)

    assert mon.price_watch(book, held) is None
    assert mon.price_watch(book, flat) is None
    assert mon.price_watch(book, stranger) is None


def test_foreign_order_then_watched_only_under_a_price_collar() -> None:
    bot = order(1)
    book = book_with(bot)

    assert monitor(checks=CHECKS).price_watch(book, bot) is None
    collared = monitor(checks=OrderChecks(collar=0.05))
    assert collared.price_watch(book, bot) == PriceWatch(ConId(1))


def test_own_order_under_a_collar_then_not_watched() -> None:
    child = order(2, client=GUARD_CLIENT)
    book = book_with(child, claimed=(2,))

    assert monitor(checks=OrderChecks(collar=0.05)).price_watch(book, child) is None


def test_exposure_figures_then_leverage_is_gross_over_net_liquidation() -> None:
    book = book_with(av("NetLiquidation", "100000"), av("Cushion", "0.4"), pos(1, 1000))
    book.fold(tick(1, 150.0))

    figures = exposure_figures(book)

    assert (figures.gross, figures.net_liquidation) == (150_000.0, 100_000.0)
    assert figures.leverage == 1.5
    assert figures.cushion == 0.4


def test_exposure_figures_without_positive_net_liquidation_then_no_leverage() -> None:
    book = book_with(av("NetLiquidation", "-5"), pos(1, 1000), tick(1, 150.0))

    assert exposure_figures(book).leverage is None


def test_stress_figures_then_each_scenario_loss_over_net_liquidation() -> None:
    # Arrange: 1000 shares at 100, NetLiquidation 200000, a 10 % fall
    rule = StressLoss(Thresholds(warn=0.5), scenarios=(Scenario("down", underlying_move=-0.1),))
    book = book_with(av("NetLiquidation", "200000"), pos(1, 1000), tick(1, 100.0))

    # Act
    figures = monitor(rule).stress(book, T)

    # Assert
    assert figures is not None and figures.missing is None
    [down] = figures.scenarios
    assert down.name == "down"
    assert down.loss is not None and down.ratio is not None
    assert math.isclose(down.loss, 10_000.0) and math.isclose(down.ratio, 0.05)
    assert monitor().stress(book, T) is None


@given(st.lists(st.integers(min_value=1, max_value=300), min_size=1, max_size=12))
def test_orders_of_any_size_then_the_check_says_breach_iff_one_broke_the_limit(
    quantities: list[int],
) -> None:
    # Arrange
    mon = monitor(checks=WARN_CHECKS)
    book = book_with(tick(1, 100.0))

    # Act: each order arrives on the fast path
    for perm, qty in enumerate(quantities, start=1):
        event = order(perm, qty=qty)
        book.fold(event)
        mon.on_order(book, event, T, impersonated=False, halted=False)

    # Assert: the latest breaking order is what the finding names; a tick clears a warn
    found: Finding = mon.findings["order_checks"]
    breaking = [perm for perm, qty in enumerate(quantities, start=1) if qty > 100]
    assert found.breach == bool(breaking)
    if breaking:
        assert found.subject == f"perm:{breaking[-1]}"
    mon.on_timer(book, T, halted=False)
    assert ("order_checks" in mon.findings) == (not breaking)


def test_line_wants_then_held_positions_by_exposure_and_unvalued_as_nan() -> None:
    book = book_with(pos(1, 1000), pos(2, -50))
    book.fold(tick(1, 150.0))

    wants = {w.con_id: w.exposure for w in monitor().line_wants(book)}

    assert wants[ConId(1)] == 150_000.0
    assert math.isnan(wants[ConId(2)])


def test_line_wants_under_a_collar_then_foreign_orders_by_notional_and_own_left_out() -> None:
    # Arrange: a bot's limit order, the guard's own child, no position
    bot = order(1, qty=10, lmt=120.0)
    child = replace(order(2, client=GUARD_CLIENT, qty=99), con_id=ConId(3))
    book = book_with(bot, child, claimed=(2,))

    # Act
    collared = monitor(checks=OrderChecks(collar=0.05)).line_wants(book)
    plain = monitor(checks=CHECKS).line_wants(book)

    # Assert
    assert [(w.con_id, w.exposure) for w in collared] == [(ConId(1), 1200.0)]
    assert plain == []
