"""Drills: a volatility shock trips the stress-loss limit against the simulated gateway over TCP.

The account holds AAPL stock and short AAPL puts. The guard's `[limits.stress]` scenario doubles
every option's implied volatility; at the puts' 30 % the book would lose ~13 % of
NetLiquidation, under the reduce level. Then the gateway's volatility fault (the one
`kind = "volatility"` drives) lifts the puts' implied volatility to 90 %: the same scenario now
loses over half of NetLiquidation, the guard goes REDUCING for stress_loss and brings gross
exposure down toward `target_leverage` x NetLiquidation, pro rata: it sells stock and buys puts
back (by limit orders), closes nothing past its targets and never takes a position through zero.
The puts' new price ticks in before the account's new NetLiquidation, so the reduce may be sized
on the NetLiquidation before the shock (a smaller cut); the drill accepts either.
"""

from __future__ import annotations

import datetime as dt
import math
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from guardd.core.engine import State
from guardd.core.events import ConId
from tests.conftest import eventually
from tests.drill_helpers import gateway_says_flat
from tests.guard_harness import (
    ACCOUNT,
    guard_config,
    guard_orders,
    journal,
    position,
    running_guard,
    sim_gateway,
    starting_positions,
    zero_crossings,
)

pytestmark = [pytest.mark.integration, pytest.mark.both_wires, pytest.mark.slow]

# a month out of today: the guard prices options at its own clock, the gateway at today's too
EXPIRY = (dt.datetime.now(dt.UTC) + dt.timedelta(days=30)).strftime("%Y%m%d")
STOCK, PUT_190 = 265598, 900002
TARGET_LEVERAGE = 0.5

SHORT_PUTS: dict[str, Any] = {
    "accounts": [{"id": ACCOUNT, "cash": 40_000}],
    "instruments": [
        {"symbol": "AAPL", "con_id": STOCK, "price": 200.0, "volatility": 0.0},
        {
            "symbol": "AAPL",
            "sec_type": "OPT",
            "con_id": PUT_190,
            "underlying": "AAPL",
            "strike": 190.0,
            "right": "P",
            "last_trade_date": EXPIRY,
            "implied_vol": 0.3,
        },
    ],
    "positions": [
        {"symbol": "AAPL", "quantity": 300, "avg_price": 195.0},
        {"symbol": f"AAPL {EXPIRY} 190P", "quantity": -20},  # short puts
    ],
}
STRESS = f"""
[kill]
mode = "flatten"

[limits.stress]
warn = 0.2
reduce = 0.3
target_leverage = {TARGET_LEVERAGE}

[[limits.stress.scenarios]]
name = "vol doubles"
vol_move = 1.0
"""


def _gross(sim: Any, held: dict[int, float] | None = None) -> float:
    """Gross exposure at the gateway's prices: of its positions now, or of `held` quantities;
    options x 100."""
    stock = position(sim, STOCK) if held is None else held[STOCK]
    puts = position(sim, PUT_190) if held is None else held[PUT_190]
    stock_value = abs(stock) * sim.exchange.quote(STOCK).last
    put_value = abs(puts) * 100 * sim.exchange.quote(PUT_190).last
    return float(stock_value + put_value)


async def test_vol_shock_trips_the_stress_limit_then_reduces_toward_target_leverage(
    tmp_path: Path,
) -> None:
    async with sim_gateway(**SHORT_PUTS) as sim:
        start = starting_positions(sim)
        cfg = guard_config(sim.port, tmp_path, STRESS)
        async with running_guard(cfg) as guard:
            # Arrange: the scenario's loss known and under the warn level
            book = guard.book

            def scenario_ratio() -> float | None:
                view = guard.status()["stress"]
                ratio: float | None = view["scenarios"]["vol doubles"]["ratio"]
                return ratio

            await eventually(
                lambda: (
                    book.option_greeks(ConId(PUT_190)) is not None and scenario_ratio() is not None
                ),
                "the stress loss of the book",
            )
            before = scenario_ratio()
            assert before is not None and 0.05 < before < 0.2
            assert guard.engine.state == State.ARMED
            calm_nl = sim.exchange.net_liquidation(ACCOUNT)

            # Act: the puts' implied volatility 30 % -> 90 % (the volatility fault's call)
            sim.set_volatility(PUT_190, 0.9)
            await eventually(
                lambda: guard.engine.state == State.REDUCING,
                "REDUCING on stress loss",
                timeout_s=10,
            )
            shock_nl = sim.exchange.net_liquidation(ACCOUNT)
            # the starting positions at the shock's prices (prices stand still: the stock's walk
            # is flat): the first reduce round goes out at once, so by the time this test sees
            # REDUCING some children may have filled already
            shock_gross = _gross(sim, start)
            await eventually(
                lambda: any(r.get("kind") == "reduce_confirmed" for r in journal(cfg)),
                "reduce confirmed",
                timeout_s=15,
            )
            episode = guard.executor.episode
            assert episode is not None and episode.kind == "reduce"
            assert episode.targets is not None
            targets = {key.con_id: qty for key, qty in episode.targets.items()}

        # Assert: REDUCING for the stress loss (the journal's decision), never a kill
        decisions = [r for r in journal(cfg) if r.get("kind") == "decision"]
        reducing = [r for r in decisions if r["state"] == "REDUCING"]
        assert reducing and reducing[0]["reasons"][0].startswith("stress_loss:")
        assert "Reduce" in reducing[0]["actions"]
        assert all(r["state"] != "HALTED" for r in decisions)
        # the targets keep target_leverage x NetLiquidation of the gross, pro rata, rounded away
        # from zero (closing less, never more). NetLiquidation comes with the account values,
        # after the option's new price: the guard may size on the one before the shock.
        keep_fresh = TARGET_LEVERAGE * shock_nl / shock_gross
        keep_calm = TARGET_LEVERAGE * calm_nl / shock_gross
        assert 0.2 < keep_fresh < keep_calm < 0.8
        for con_id, held in start.items():
            low, high = math.ceil(abs(held) * keep_fresh), math.ceil(abs(held) * keep_calm)
            assert low - 1 <= abs(targets[con_id]) <= high + 1
            assert math.copysign(1, targets[con_id]) == math.copysign(1, held)
        # closing children on the right sides: sell the long stock, buy the short puts back
        # (by limit: an option is never closed at market)
        sides = {(o.instrument.con_id, o.action) for o in guard_orders(sim)}
        assert sides == {(STOCK, "SELL"), (PUT_190, "BUY")}
        put_orders = {o.order_type for o in guard_orders(sim) if o.instrument.con_id == PUT_190}
        assert put_orders == {"LMT"}
        # an independent client sees each position at its target (nothing closed beyond it)
        # and no child left working
        at_gateway, working = await gateway_says_flat(sim.port)
        assert at_gateway == {c: Decimal(t) for c, t in targets.items()}
        assert working == 0
        # gross fell from the shock's toward target_leverage x NetLiquidation, never below it
        leverage = _gross(sim) / sim.exchange.net_liquidation(ACCOUNT)
        shock_leverage = shock_gross / shock_nl
        assert TARGET_LEVERAGE * 0.95 < leverage < shock_leverage * keep_calm * 1.1
        assert zero_crossings(sim, start) == []
