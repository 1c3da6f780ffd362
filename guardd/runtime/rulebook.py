"""From the validated configuration to the pure core's rules, engine policy and close policy.

The core knows nothing of the config models (it stays free of pydantic); this module is the one
place where a config key becomes a rule's threshold, so `docs/rules.md` can point here.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal

from guardd.config import Config, LevelLimit
from guardd.core import rules, stress
from guardd.core.close import CloseSettings
from guardd.core.engine import Policy
from guardd.core.monitor import RuleSet
from guardd.core.planner import ClosePolicy, OrderType, OrderTypeRule
from guardd.core.pricing import Market, RepricePolicy, Widen

_SECONDS_PER_DAY_SESSION = 6.5 * 3600  # a "daily" volatility horizon: one trading session
_SAMPLES_PER_WINDOW = 40  # price samples the Book keeps per volatility window (rule needs 10)
_MIN_HISTORY_S = 900.0


def thresholds(limit: LevelLimit) -> rules.Thresholds:
    """A config limit's warn / reduce / kill as the core's Thresholds."""
    return rules.Thresholds(warn=limit.warn, reduce=limit.reduce, kill=limit.kill)


def build_rules(cfg: Config) -> RuleSet:
    """Every rule the configuration enables (a rule with no level set is left out)."""
    lim = cfg.limits
    periodic: list[rules.Rule] = []
    if lim.leverage.enabled:
        periodic.append(
            rules.Leverage(
                thresholds(lim.leverage),
                max_value_age_s=lim.leverage.max_data_age_s,
                options=lim.leverage.options,
            )
        )
    if lim.margin_cushion.enabled:
        periodic.append(rules.MarginCushion(thresholds(lim.margin_cushion)))
    if lim.maint_margin_ratio.enabled:
        periodic.append(rules.MaintMargin(thresholds(lim.maint_margin_ratio)))
    if lim.margin_spike.enabled:
        periodic.append(rules.MarginSpike(thresholds(lim.margin_spike)))
    if lim.daily_loss.enabled:
        periodic.append(
            rules.DailyLoss(thresholds(lim.daily_loss), max_age_s=lim.daily_loss.max_data_age_s)
        )
    if lim.drawdown.enabled:
        periodic.append(
            rules.Drawdown(thresholds(lim.drawdown), max_age_s=lim.drawdown.max_data_age_s)
        )
    vol = lim.volatility
    if vol.enabled:
        periodic.append(
            rules.Volatility(
                thresholds(vol),
                target_leverage=vol.target_leverage or 1.0,
                window_s=vol.window_s,
                max_age_s=vol.max_data_age_s,
                annualisation_s=(
                    rules.SECONDS_PER_TRADING_YEAR
                    if vol.horizon == "annualised"
                    else _SECONDS_PER_DAY_SESSION
                ),
            )
        )
    if lim.stress.enabled:
        periodic.append(build_stress(cfg))
    pos = lim.positions
    if pos.max_quantity or pos.max_notional or pos.max_count is not None or pos.allowed_sec_types:
        periodic.append(
            rules.PositionLimits(
                max_quantity=dict(pos.max_quantity),
                max_notional=dict(pos.max_notional),
                max_positions=pos.max_count,
                allowed_sec_types=(
                    frozenset(pos.allowed_sec_types) if pos.allowed_sec_types else None
                ),
                level=pos.action,
            )
        )
    beats = lim.heartbeats.bots
    for level in ("warn", "reduce", "kill"):
        timeouts = {name: bot.timeout_s for name, bot in beats.items() if bot.action == level}
        if timeouts:
            # One rule per level, each under a name of its own: findings are kept by rule name,
            # and a shared name let one level's "ok" overwrite another level's breach.
            name = "heartbeat" if level == "warn" else f"heartbeat_{level}"
            periodic.append(rules.Heartbeats(timeouts, level=level, name=name))
    conn = lim.connectivity
    if conn.disconnected_warn_after_s is not None:
        periodic.append(rules.Connectivity(conn.disconnected_warn_after_s, level="warn"))
    if conn.disconnected_kill_after_s is not None:
        periodic.append(
            rules.Connectivity(
                conn.disconnected_kill_after_s, level="kill", name="connectivity_kill"
            )
        )
    periodic.append(rules.Staleness(conn.max_event_age_s, level="warn"))
    impersonation = rules.Impersonation()  # always on: the guard's own label is not a key
    periodic.append(impersonation)

    rate = lim.order_rate
    order_rate = None
    if any(
        r.enabled for r in (rate.per_client_1s, rate.per_client_60s, rate.total_1s, rate.total_60s)
    ):
        order_rate = rules.OrderRate(
            per_client_1s=thresholds(rate.per_client_1s),
            per_client_60s=thresholds(rate.per_client_60s),
            total_1s=thresholds(rate.total_1s),
            total_60s=thresholds(rate.total_60s),
        )
    po = lim.per_order
    order_checks = None
    if (
        po.max_quantity is not None
        or po.max_notional is not None
        or po.price_collar is not None
        or po.forbidden_order_types
        or po.forbidden_sec_types
    ):
        order_checks = rules.OrderChecks(
            max_quantity=po.max_quantity,
            max_notional=po.max_notional,
            collar=po.price_collar,
            forbidden_order_types=frozenset(po.forbidden_order_types),
            forbidden_sec_types=frozenset(po.forbidden_sec_types),
            level=po.action,
        )
    return RuleSet(tuple(periodic), order_checks, order_rate, impersonation)


def build_stress(cfg: Config) -> stress.StressLoss:
    """The stress-loss rule of `[limits.stress]` (built whether or not a level is set, so status
    can show each scenario's loss)."""
    lim = cfg.limits.stress
    return stress.StressLoss(
        thresholds(lim),
        scenarios=tuple(
            stress.Scenario(
                s.name,
                underlying_move=s.underlying_move,
                vol_move=s.vol_move,
                fx_moves=dict(s.fx_moves),
            )
            for s in lim.scenarios
        ),
        target_leverage=lim.target_leverage,
        max_value_age_s=lim.max_data_age_s,
    )


@dataclass(frozen=True, slots=True)
class Sampling:
    """How the Book samples prices and equity for the volatility rule."""

    sample_s: float
    history_s: float


def build_sampling(cfg: Config) -> Sampling:
    """The Book's price sampling, fitted to the volatility window: it keeps at least the whole
    window (a shorter history would silently judge a shorter window), and samples often enough
    that the window holds ~40 samples, at most one per second (a window of a few seconds would
    otherwise never reach the rule's 10 samples and stay a data finding forever)."""
    vol = cfg.limits.volatility
    if not vol.enabled:
        return Sampling(sample_s=1.0, history_s=_MIN_HISTORY_S)
    sample_s = min(1.0, vol.window_s / _SAMPLES_PER_WINDOW)
    return Sampling(sample_s=sample_s, history_s=max(_MIN_HISTORY_S, vol.window_s))


def build_policy(cfg: Config) -> Policy:
    """The engine's policy: kill mode, debounce per rule, sweep interval, default target."""
    lim = cfg.limits
    debounce = {
        "leverage": lim.leverage.debounce,
        "margin_cushion": lim.margin_cushion.debounce,
        "maint_margin": lim.maint_margin_ratio.debounce,
        "margin_spike": lim.margin_spike.debounce,
        "daily_loss": lim.daily_loss.debounce,
        "drawdown": lim.drawdown.debounce,
        "volatility": lim.volatility.debounce,
        "stress_loss": lim.stress.debounce,
        "positions": lim.positions.debounce,
    }
    return Policy(
        kill_mode=cfg.kill.mode,
        debounce={rule: n for rule, n in debounce.items() if n > 1},
        resweep_s=cfg.kill.cancel_verify_timeout_s,
        default_target_leverage=lim.volatility.target_leverage or 1.0,
    )


def build_close_settings(cfg: Config) -> CloseSettings:
    """How the close episode judges the broker's data: settle time, grace, tolerances."""
    return CloseSettings(
        client_id=cfg.ib.client_id,
        settle_s=cfg.flatten.position_settle_s,
        lost_grace_s=cfg.flatten.lost_order_grace_s,
        overdue_s=cfg.flatten.verify_timeout_s,
        tolerance={str(k): Decimal(str(v)) for k, v in cfg.flatten.tolerance.items()},
    )


def build_close_policy(cfg: Config) -> ClosePolicy:
    """How flatten and reduce orders are made, per asset class."""
    order_types: dict[str, OrderTypeRule] = {
        str(sec_type): OrderTypeRule(
            OrderType(policy.regular_hours),
            collar=policy.collar,
            limit_outside_rth=policy.outside_hours == "LMT",
            allow_market=policy.market_allowed,
            max_child_quantity=None
            if policy.max_child_qty is None
            else Decimal(str(policy.max_child_qty)),
        )
        for sec_type, policy in cfg.flatten.order_policy.items()
    }
    flatten = cfg.flatten
    reprice = RepricePolicy(
        max_price_age_s=flatten.max_price_age_s,
        reprice_after_s=flatten.reprice_after_s,
        escalation=tuple(
            Market() if step.market else Widen(step.widen or 0.0) for step in flatten.escalation
        ),
    )
    max_child = cfg.flatten.max_child_qty
    return ClosePolicy(
        order_types=order_types,
        max_child_quantity=Decimal(str(max_child)) if max_child is not None else Decimal(10_000),
        # Never give up on a position: a rejected close (market closed) is retried, with a
        # back-off in the executor, and escalated when not flat in time.
        max_rejects=None,
        reprice=reprice,
    )
