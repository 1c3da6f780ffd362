"""Risk rules: breach, no breach, stale, NaN and missing-data cases."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
from hypothesis import given
from hypothesis import strategies as st

from guardd.config import parse_config
from guardd.core.book import PORTFOLIO_MAX_AGE_S, Book
from guardd.core.events import (
    BrokerEvent,
    ConId,
    ConnectivityLost,
    Disconnected,
    Heartbeat,
    OpenOrder,
    PermId,
    PnLUpdate,
    PortfolioValue,
)
from guardd.core.rules import (
    Connectivity,
    DailyLoss,
    Drawdown,
    Heartbeats,
    Impersonation,
    Leverage,
    MaintMargin,
    MarginCushion,
    MarginSpike,
    OrderChecks,
    OrderRate,
    PositionLimits,
    Staleness,
    Thresholds,
    Volatility,
    grade,
    order_price,
    realised_vol,
)
from guardd.runtime.rulebook import build_rules
from tests.book_events import ACC, GUARD_CLIENT, T, av, book_with, order, pos, tick

LEV = Leverage(Thresholds(warn=2.0, reduce=3.0, kill=4.0))


def test_grade_then_worst_crossed_level_wins() -> None:
    limits = Thresholds(warn=1, reduce=2, kill=3)
    assert grade("r", 0.5, limits, what="x").level == "ok"
    assert grade("r", 2.5, limits, what="x").level == "reduce"
    assert grade("r", 9, limits, what="x").limit == 3
    assert grade("r", 0.1, Thresholds(warn=0.2), what="x", higher_is_worse=False).level == "warn"


def test_leverage_below_limits_then_ok() -> None:
    book = book_with(av("NetLiquidation", "100000"), pos(1, 1000), tick(1, 100.0))
    f = LEV.evaluate(book, T)
    assert f.level == "ok"
    assert f.value == 1.0


def test_leverage_above_kill_then_kill() -> None:
    book = book_with(av("NetLiquidation", "100000"), pos(1, 5000), tick(1, 100.0))
    f = LEV.evaluate(book, T)
    assert (f.level, f.value, f.limit) == ("kill", 5.0, 4.0)


def test_leverage_counts_shorts_and_converts_currency_then_gross_in_base() -> None:
    book = book_with(
        av("NetLiquidation", "100000"),
        av("ExchangeRate", "2.0", currency="EUR"),
        pos(1, -1000, currency="EUR"),
        tick(1, 100.0),
    )
    assert LEV.evaluate(book, T).value == 2.0


def test_leverage_missing_rate_then_data_not_breach() -> None:
    book = book_with(av("NetLiquidation", "100"), pos(1, -1000, currency="EUR"), tick(1, 100.0))
    f = LEV.evaluate(book, T)
    assert f.level == "data"
    assert "EUR" in f.message


def test_leverage_nan_net_liq_then_data() -> None:
    book = book_with(av("NetLiquidation", "nan"), pos(1, 5000), tick(1, 100.0))
    assert LEV.evaluate(book, T).level == "data"


def test_leverage_stale_position_value_then_data() -> None:
    book = book_with(av("NetLiquidation", "100"), pos(1, 5000), tick(1, 100.0, ts=T - 100))
    assert LEV.evaluate(book, T).level == "data"


def test_leverage_portfolio_value_within_ibs_refresh_then_graded_after_it_data() -> None:
    book = book_with(av("NetLiquidation", "1000000"), pos(1, 5000))
    book.fold(
        PortfolioValue(
            account=ACC,
            con_id=ConId(1),
            position=5000,
            market_price=100.0,
            market_value=500_000.0,
            ts=T,
        )
    )
    assert LEV.evaluate(book, T + 120).value == 0.5  # older than 30 s, IB refreshes every 180 s
    assert LEV.evaluate(book, T + PORTFOLIO_MAX_AGE_S + 1).level == "data"


def test_leverage_unsynced_book_then_data() -> None:
    book = book_with(av("NetLiquidation", "100"), pos(1, 5000), tick(1, 100.0), synced=False)
    assert LEV.evaluate(book, T).level == "data"


def test_cushion_low_then_breach_and_high_then_ok() -> None:
    rule = MarginCushion(Thresholds(warn=0.25, kill=0.05))
    low = book_with(av("NetLiquidation", "100000"), av("ExcessLiquidity", "4000"))
    high = book_with(av("NetLiquidation", "100000"), av("ExcessLiquidity", "50000"))
    assert rule.evaluate(low, T).level == "kill"
    assert rule.evaluate(high, T).level == "ok"


def test_cushion_stale_then_data() -> None:
    rule = MarginCushion(Thresholds(kill=0.05), max_age_s=60)
    book = book_with(av("NetLiquidation", "100000"), av("ExcessLiquidity", "1", ts=T - 61))
    assert rule.evaluate(book, T).level == "data"


def test_maint_margin_high_then_reduce() -> None:
    rule = MaintMargin(Thresholds(warn=0.5, reduce=0.7, kill=0.9))
    book = book_with(av("NetLiquidation", "100000"), av("MaintMarginReq", "80000"))
    assert rule.evaluate(book, T).level == "reduce"


def test_margin_spike_at_unchanged_positions_then_kill() -> None:
    rule = MarginSpike(Thresholds(warn=0.2, kill=1.0))
    book = book_with(
        pos(1, 10), av("MaintMarginReq", "1000", ts=T - 5), av("MaintMarginReq", "2500")
    )
    f = rule.evaluate(book, T)
    assert f.level == "kill"
    assert f.value == 1.5


def test_margin_jump_after_own_trade_then_ok() -> None:
    rule = MarginSpike(Thresholds(warn=0.2, kill=1.0))
    book = book_with(
        pos(1, 10), av("MaintMarginReq", "1000", ts=T - 5), pos(1, 30), av("MaintMarginReq", "3000")
    )
    assert rule.evaluate(book, T).level == "ok"


def test_margin_spike_nan_then_data() -> None:
    rule = MarginSpike(Thresholds(kill=1.0))
    book = book_with(av("MaintMarginReq", "1000", ts=T - 5), av("MaintMarginReq", "x"))
    assert rule.evaluate(book, T).level == "data"


def _loss_book(*dailies: float, ts: float = T) -> Book:
    events: list[BrokerEvent] = [av("NetLiquidation", "100000", ts=ts - 10)]
    events += [
        PnLUpdate(account=ACC, daily=d, unrealized=0.0, realized=0.0, ts=ts) for d in dailies
    ]
    return book_with(*events)


def test_daily_loss_over_limit_then_kill() -> None:
    rule = DailyLoss(Thresholds(warn=0.02, kill=0.05))
    f = rule.evaluate(_loss_book(0.0, -6000.0), T)
    assert f.level == "kill"
    assert f.value is not None and math.isclose(f.value, 0.06)


def test_daily_gain_then_ok() -> None:
    assert DailyLoss(Thresholds(kill=0.05)).evaluate(_loss_book(0.0, 9000.0), T).level == "ok"


def test_daily_loss_stale_or_nan_pnl_then_data() -> None:
    rule = DailyLoss(Thresholds(kill=0.05), max_age_s=30)
    assert rule.evaluate(_loss_book(0.0, -9000.0, ts=T - 31), T).level == "data"
    assert rule.evaluate(_loss_book(0.0, math.nan), T).level == "data"


def test_drawdown_from_peak_then_warn() -> None:
    rule = Drawdown(Thresholds(warn=0.03, kill=0.10))
    f = rule.evaluate(_loss_book(0.0, 10000.0, 5000.0), T)
    assert f.level == "warn"
    assert f.value is not None and math.isclose(f.value, 5000 / 110000)


def test_drawdown_without_start_of_day_then_data() -> None:
    rule = Drawdown(Thresholds(kill=0.1))
    book = book_with(PnLUpdate(account=ACC, daily=-5.0, unrealized=0, realized=0, ts=T))
    assert rule.evaluate(book, T).level == "data"


def test_realised_vol_of_constant_price_then_zero() -> None:
    assert realised_vol([(float(t), 50.0) for t in range(10)]) == 0.0
    assert math.isnan(realised_vol([(0.0, 50.0)]))


def _vol_book(jump: float) -> Book:
    events: list[BrokerEvent] = [pos(1, 100)]
    for i in range(30):
        price = 100.0 * (1 + jump) if i % 2 else 100.0
        events.append(tick(1, price, ts=T - 30 + i))
    return book_with(*events)


VOL = Volatility(Thresholds(warn=0.5, reduce=1.0), target_leverage=1.5, include_portfolio=False)


def test_volatility_wild_prices_then_reduce_with_target() -> None:
    f = VOL.evaluate(_vol_book(0.01), T)
    assert f.level == "reduce"
    assert f.target_leverage == 1.5


def test_volatility_calm_prices_then_ok() -> None:
    assert VOL.evaluate(_vol_book(0.00001), T).level == "ok"


def test_volatility_too_few_samples_then_data() -> None:
    book = book_with(pos(1, 100), tick(1, 100.0), tick(1, 150.0, ts=T + 2))
    assert VOL.evaluate(book, T + 2).level == "data"


def test_volatility_stale_prices_then_data() -> None:
    assert VOL.evaluate(_vol_book(0.01), T + 100).level == "data"


def _orders(n: int, client: int, start: float = T, gap: float = 0.01) -> list[BrokerEvent]:
    return [order(1000 + i, client=client, ts=start + i * gap) for i in range(n)]


RATE = OrderRate(per_client_1s=Thresholds(warn=5, kill=20), total_60s=Thresholds(kill=100))


def test_order_rate_runaway_client_then_kill_naming_client() -> None:
    f = RATE.evaluate(book_with(*_orders(25, client=7)), T + 0.5)
    assert f.level == "kill"
    assert f.subject == "client:7"


def test_order_rate_window_passed_then_ok() -> None:
    assert RATE.evaluate(book_with(*_orders(25, client=7)), T + 2).level == "ok"


def test_order_rate_guards_own_orders_then_not_counted() -> None:
    rule = OrderRate(per_client_1s=Thresholds(kill=20), total_1s=Thresholds(kill=20))
    own = _orders(25, client=GUARD_CLIENT)
    claimed = tuple(range(1000, 1025))
    assert rule.evaluate(book_with(*own, claimed=claimed), T + 0.5).level == "ok"


def test_order_rate_guards_client_id_with_ids_it_never_allocated_then_counted() -> None:
    rule = OrderRate(per_client_1s=Thresholds(kill=20), total_1s=Thresholds(kill=20))
    f = rule.evaluate(book_with(*_orders(25, client=GUARD_CLIENT)), T + 0.5)
    assert (f.level, f.subject) == ("kill", f"client:{GUARD_CLIENT}")


def test_order_rate_unsynced_then_data() -> None:
    assert RATE.evaluate(book_with(synced=False), T).level == "data"


CHECKS = OrderChecks(
    max_quantity=100,
    max_notional=50_000,
    collar=0.05,
    forbidden_order_types=frozenset({"MOC"}),
)


def test_order_within_limits_then_ok() -> None:
    assert CHECKS.evaluate(book_with(tick(1, 100.0), order(1)), T).level == "ok"


def test_order_too_large_then_kill_naming_perm_id() -> None:
    f = CHECKS.evaluate(book_with(tick(1, 100.0), order(42, qty=101)), T)
    assert (f.level, f.subject) == ("kill", "perm:42")


def test_order_outside_collar_then_breach() -> None:
    f = CHECKS.evaluate(book_with(tick(1, 100.0), order(1, lmt=110.0)), T)
    assert f.level == "kill"
    assert "from price" in f.message


def test_order_notional_too_big_then_breach() -> None:
    f = CHECKS.evaluate(book_with(tick(1, 1000.0), order(1, qty=60, lmt=1000.0)), T)
    assert f.value == 60_000


def test_forbidden_order_type_then_breach() -> None:
    assert CHECKS.evaluate(book_with(order(1, order_type="MOC")), T).level == "kill"


def test_market_order_without_price_then_data() -> None:
    f = CHECKS.evaluate(book_with(order(1, order_type="MKT", lmt=math.nan)), T)
    assert f.level == "data"


def test_guardd_own_order_then_exempt() -> None:
    child = order(1, client=GUARD_CLIENT, qty=10_000, ref="guardd:flatten:1:1")
    book = book_with(tick(1, 100.0), child, claimed=(1,))
    assert CHECKS.evaluate(book, T).level == "ok"


def test_bot_order_labelled_guardd_then_checked_like_any_other() -> None:
    book = book_with(tick(1, 100.0), order(1, client=7, qty=10_000, ref="guardd:flatten:1:1"))
    f = CHECKS.evaluate(book, T)
    assert (f.level, f.subject) == ("kill", "perm:1")


def test_no_impersonating_order_then_ok() -> None:
    book = book_with(order(1, client=7, ref="bot:1"), order(2, client=GUARD_CLIENT), claimed=(2,))
    assert Impersonation().evaluate(book, T).level == "ok"


def test_impersonating_order_then_warn_while_working_and_hold_after() -> None:
    # Arrange: a bot's order labelled as a guard child, later cancelled
    rule = Impersonation(hold_s=60.0)
    impostor = order(1, client=7, ref="guardd:flatten:1:1")
    book = book_with(impostor)

    # Act / Assert
    f = rule.evaluate(book, T + 600)
    assert (f.level, f.value, f.subject) == ("warn", 1.0, "client:7")
    assert "impersonating the guard" in f.message
    book.fold(replace(impostor, status="Cancelled", ts=T + 1))
    assert rule.evaluate(book, T + 30).level == "warn"  # within hold_s of the first sighting
    assert rule.evaluate(book, T + 61).level == "ok"


def test_position_over_symbol_quantity_then_breach() -> None:
    rule = PositionLimits(max_quantity={"AAPL": 100}, level="reduce")
    f = rule.evaluate(book_with(pos(1, -150, symbol="AAPL")), T)
    assert (f.level, f.subject, f.value) == ("reduce", "AAPL", 150)


def test_too_many_positions_then_breach_and_allowed_count_ok() -> None:
    rule = PositionLimits(max_positions=2)
    assert rule.evaluate(book_with(pos(1, 1), pos(2, 1), pos(3, 1)), T).level == "warn"
    assert rule.evaluate(book_with(pos(1, 1), pos(2, 1), pos(3, 0)), T).level == "ok"


def test_disallowed_sec_type_then_breach() -> None:
    rule = PositionLimits(allowed_sec_types=frozenset({"FUT"}))
    assert rule.evaluate(book_with(pos(1, 1)), T).level == "warn"


def test_position_notional_without_value_then_data() -> None:
    rule = PositionLimits(default_max_notional=1000)
    assert rule.evaluate(book_with(pos(1, 10)), T).level == "data"


def test_silent_bot_then_breach_and_live_bot_ok() -> None:
    rule = Heartbeats({"alpha": 5.0, "beta": 5.0}, level="kill")
    book = book_with(Heartbeat(bot="alpha", ts=T), Heartbeat(bot="beta", ts=T - 3))
    assert rule.evaluate(book, T + 1).level == "ok"
    f = rule.evaluate(book, T + 4)
    assert (f.level, f.subject) == ("kill", "beta")


def test_bot_watched_after_start_then_silence_counts_from_when_watched() -> None:
    rule = Heartbeats({"gamma": 5.0}, level="kill")
    book = book_with()  # created long before the bot was added by a reload
    assert rule.evaluate(book, book.created_at + 60).level == "kill"

    book.watch_heartbeats(["gamma"], since=book.created_at + 58)

    assert rule.evaluate(book, book.created_at + 60).level == "ok"
    assert rule.evaluate(book, book.created_at + 64).level == "kill"


def test_disconnected_too_long_then_breach() -> None:
    rule = Connectivity(max_disconnected_s=30)
    book = book_with(Disconnected(reason="eof", ts=T))
    assert rule.evaluate(book, T + 10).level == "ok"
    assert rule.evaluate(book, T + 31).level == "warn"


def test_server_connectivity_lost_then_counted() -> None:
    rule = Connectivity(max_disconnected_s=30)
    book = book_with(ConnectivityLost(ts=T))
    assert rule.evaluate(book, T + 31).value == 31


def test_no_broker_events_then_stale_and_heartbeat_does_not_refresh() -> None:
    rule = Staleness(max_age_s=60)
    book = book_with(Heartbeat(bot="a", ts=T + 100))
    assert rule.evaluate(book, T + 100).level == "warn"
    assert rule.evaluate(book_with(tick(1, 10.0, ts=T + 90)), T + 100).level == "ok"


@given(
    nl=st.one_of(st.just(math.nan), st.just(math.inf), st.floats(-1e6, 0)),
    qty=st.floats(1, 1e6),
)
def test_leverage_with_bad_net_liq_then_never_a_breach(nl: float, qty: float) -> None:
    book = book_with(av("NetLiquidation", str(nl)), pos(1, qty), tick(1, 100.0))
    assert LEV.evaluate(book, T).level == "data"


def test_non_finite_value_then_data_not_ok_nor_breach() -> None:
    from guardd.core.rules import Thresholds, grade

    for value in (float("nan"), float("inf"), float("-inf")):
        finding = grade("leverage", value, Thresholds(warn=1.0, kill=3.0), what="leverage")
        assert finding.level == "data"
        assert finding.value is None


levels = st.floats(min_value=0.001, max_value=1)


@given(st.lists(levels, min_size=3, max_size=3), levels, levels)
def test_any_ordered_levels_then_severity_grows_with_risk(
    raw: list[float], low: float, high: float
) -> None:
    warn, reduce, kill = sorted(raw)
    low, high = sorted((low, high))
    worse = Thresholds(warn=warn, reduce=reduce, kill=kill)
    cushion = Thresholds(warn=kill, reduce=reduce, kill=warn)  # lower is worse
    rank = ("ok", "warn", "reduce", "kill").index

    def graded(value: float, limits: Thresholds, *, higher_is_worse: bool) -> int:
        return rank(grade("r", value, limits, what="x", higher_is_worse=higher_is_worse).level)

    assert graded(low, worse, higher_is_worse=True) <= graded(high, worse, higher_is_worse=True)
    assert graded(high, cushion, higher_is_worse=False) <= graded(
        low, cushion, higher_is_worse=False
    )


def stop_order(
    perm: int,
    order_type: str,
    *,
    aux: float = math.nan,
    lmt: float = math.nan,
    qty: float = 10,
    **terms: float,
) -> OpenOrder:
    return replace(order(perm, order_type=order_type, lmt=lmt, qty=qty), aux_price=aux, **terms)


def test_protective_stop_limit_far_below_the_market_then_not_a_collar_breach() -> None:
    # a sell stop-limit 10 % under the market: its limit waits for the stop, by design
    book = book_with(tick(1, 100.0), stop_order(1, "STP LMT", aux=90.0, lmt=89.5))
    assert CHECKS.evaluate(book, T).level == "ok"


def test_buy_stop_valued_at_its_stop_price_then_notional_breach() -> None:
    # 60 × the 1000 stop: 60,000 over 50,000, although at the market (800) it is 48,000
    book = book_with(tick(1, 800.0), stop_order(1, "STP", aux=1000.0, qty=60))
    f = CHECKS.evaluate(book, T)
    assert (f.level, f.value) == ("kill", 60_000)


@pytest.mark.parametrize(
    ("event", "price"),
    [
        (stop_order(1, "STP LMT", aux=110.0, lmt=111.0), 111.0),
        (stop_order(1, "TRAIL", aux=5.0, trail_stop_price=95.0), 95.0),
        (stop_order(1, "TRAIL LIMIT", aux=5.0, trail_stop_price=95.0), 95.0),
        (stop_order(1, "TRAIL", trailing_percent=2.0), 100.0),  # no stop reported: the market
        (stop_order(1, "MOC"), 100.0),
        (order(1, order_type="LOC", lmt=101.0), 101.0),
        (stop_order(1, "STP"), 100.0),  # no stop price known: the market
    ],
)
def test_order_price_by_order_type(event: OpenOrder, price: float) -> None:
    book = book_with(event)
    assert order_price(book.orders[PermId(1)], 100.0) == price


def test_untransmitted_bracket_child_then_checked_like_a_working_order() -> None:
    child = replace(order(2, qty=500), status="PreSubmitted", parent_id=1)
    f = CHECKS.evaluate(book_with(tick(1, 100.0), child), T)
    assert (f.level, f.subject) == ("kill", "perm:2")


def test_heartbeat_bots_at_two_levels_then_each_level_keeps_its_own_finding() -> None:
    # Arrange: a warn-level bot silent, a kill-level bot alive (findings are kept by rule name)
    cfg = parse_config(
        'account = "DU1"\nstate_dir = "state"\n[ib]\nclient_id = 7\n'
        "[control.mqtt]\nenabled = true\n"
        '[limits.heartbeats.bots.quiet]\ntimeout_s = 5.0\naction = "warn"\n'
        '[limits.heartbeats.bots.vital]\ntimeout_s = 5.0\naction = "kill"\n'
    )
    book = book_with(Heartbeat(bot="quiet", ts=T - 60), Heartbeat(bot="vital", ts=T))
    book.watch_heartbeats(["quiet", "vital"], since=T - 60)

    # Act
    findings = {}
    for rule in build_rules(cfg).periodic:
        finding = rule.evaluate(book, T)
        findings[finding.rule] = finding

    # Assert: the kill-level rule's "ok" no longer hides the warn-level bot's silence
    assert findings["heartbeat"].level == "warn"
    assert findings["heartbeat_kill"].level == "ok"
