"""The guard flattens while the gateway PROCESS is killed with -9 and started again on its
`--state FILE`: the account (positions, the guard's working child, its fills so far, the ids
the guard has seen) is where the gateway left it, and the guard ends flat, never crossed.

The end state is read three ways: an independent ibapi client sees no position and no working
order; the fills the gateway kept (the state file) never take a position through zero; and the
guard's own fills add up to exactly what there was to close.
"""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from tests.conftest import eventually, free_port
from tests.drill_helpers import gateway_says_flat, kill_command, running
from tests.guard_harness import AAPL, ACCOUNT, ES, GUARD_CLIENT_ID, guard_config, zero_crossings
from tests.sim_process import SimProcess, saved_exchange, saved_state, write_scenario

pytestmark = [pytest.mark.integration, pytest.mark.slow]

FLATTEN = """
[kill]
mode = "flatten"

[flatten]
verify_timeout_s = 60.0
position_settle_s = 3.0
lost_order_grace_s = 1.0
"""
POSITIONS = """
[[positions]]
symbol = "AAPL"
quantity = 1000
avg_price = 180.0

[[positions]]
symbol = "ES"
quantity = -2
avg_price = 6010.0
"""
WORKING = ("PendingSubmit", "PreSubmitted", "Submitted", "PendingCancel")


def _guard_orders(state: Path) -> list[dict[str, Any]]:
    return [
        o
        for o in saved_state(state)["exchange"]["orders"]
        if o["client_id"] == GUARD_CLIENT_ID and o["order_id"] != 0
    ]


def guard_child_mid_fill(state: Path) -> bool:
    """The gateway has saved a close child of the guard that is working and part filled."""
    return any(o["status"] in WORKING and o["filled"] > 0 for o in _guard_orders(state))


def flat_and_idle(state: Path) -> bool:
    exchange = saved_state(state)["exchange"]
    positions = exchange["accounts"][ACCOUNT]["positions"]
    return not exchange["working"] and all(p["quantity"] == 0 for p in positions)


async def test_gateway_process_killed_9_mid_flatten_restarted_with_state_then_flat_never_crossed(
    tmp_path: Path,
) -> None:
    # Arrange: a slow close (50 shares per 0.1 s step), so the AAPL child works for seconds
    scenario = write_scenario(
        tmp_path / "scenario.toml",
        gateway="partial_fill_quantity = 50",
        positions=POSITIONS,
        market_interval_s=0.1,
    )
    state = tmp_path / "account.json"
    sim = SimProcess(free_port(), scenario, state, tmp_path / "sim.log")
    start = {AAPL: 1000.0, ES: -2.0}
    await sim.start()
    try:
        cfg = guard_config(sim.port, tmp_path / "guard", FLATTEN)
        async with running(cfg) as guard:
            await guard.handle(kill_command("flatten"))
            await eventually(lambda: guard_child_mid_fill(state), "a child filling", timeout_s=15)

            # Act: the gateway process dies mid-fill and comes back on its state
            sim.kill9()
            killed_at = [o["filled"] for o in _guard_orders(state) if o["status"] in WORKING]
            await sim.start()
            await eventually(lambda: flat_and_idle(state), "flat at the gateway", timeout_s=60)
            await eventually(
                lambda: guard.executor.episode is not None and guard.executor.episode.at_target,
                "the guard confirms flat",
                timeout_s=30,
            )
            assert guard.book.generation >= 2, "the guard did not go through a reconnect"

        # Assert
        positions, working = await gateway_says_flat(sim.port)
        assert positions == {} and working == 0, (positions, working)
    finally:
        sim.stop()
    assert killed_at and 0 < killed_at[0] < 1000  # the premise: killed with a child mid-fill
    exchange = saved_exchange(scenario, state)
    assert zero_crossings(SimpleNamespace(exchange=exchange), start) == []  # type: ignore[arg-type]
    totals: dict[int, Decimal] = {}
    for fill in exchange.fills():
        assert fill.client_id == GUARD_CLIENT_ID  # nobody else traded
        sign = 1 if fill.side == "BOT" else -1
        con = fill.instrument.con_id
        totals[con] = totals.get(con, Decimal(0)) + sign * Decimal(str(fill.shares))
    assert totals == {AAPL: Decimal(-1000), ES: Decimal(2)}, "closed more or less than there was"
    assert sim.starts == 2
