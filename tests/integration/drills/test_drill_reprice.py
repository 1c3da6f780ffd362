"""Drills: a flatten while market data lags or freezes. The real guard, the real ibapi client
over TCP, the simulated gateway; the end state is read by an independent API client.

- Lagging feed (prices arrive on time but show the market of seconds ago, so the guard cannot
  tell): the close limits miss the market after a price jump; each is cancelled and re-priced
  up the escalation (wider collars, then market where allowed) until it fills.
- Frozen feed (no ticks): the guard never derives a limit from the frozen price; it closes the
  future with a market order (allowed for FUT), waits for a fresh price for the stocks (no
  market order allowed for them here), and closes them once the feed is back.
Both end flat at the gateway, no position crossed zero, and the journal shows each step.
"""

from __future__ import annotations

import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest

from guardd.core.events import ConId
from guardd.core.pricing import PricePoint
from guardd.runtime.guard import Guard
from ibsim.gateway import SimGateway
from tests.conftest import eventually
from tests.drill_helpers import kill_command, running
from tests.guard_harness import (
    AAPL,
    ES,
    GUARD_CLIENT_ID,
    MSFT,
    guard_config,
    journal,
    sim_gateway,
    starting_positions,
    zero_crossings,
)
from tests.ibapi_harness import connected

pytestmark = [pytest.mark.integration, pytest.mark.both_wires, pytest.mark.slow]

POSITIONS = [
    {"symbol": "AAPL", "quantity": 1000, "avg_price": 180.0},  # long: closes with SELL
    {"symbol": "MSFT", "quantity": -500, "avg_price": 410.0},  # short: closes with BUY
    {"symbol": "ES", "quantity": -2, "avg_price": 6010.0},  # short future
]
JUMPS = {AAPL: -0.10, MSFT: +0.10, ES: +0.25}  # each against the close
LAG_S = 6.0

# Limits in every session (so the drill does not depend on the time of day); stocks never at
# market, futures at market when escalation or a missing price calls for it.
REPRICING = """
[kill]
mode = "flatten"

[flatten]
verify_timeout_s = 60.0
max_price_age_s = 1.0
reprice_after_s = 0.5
escalation = [{ widen = 0.05 }, { widen = 0.15 }, { market = true }]

[flatten.order_policy.STK]
regular_hours = "LMT"
outside_hours = "LMT"
collar = 0.01
allow_market = false

[flatten.order_policy.FUT]
regular_hours = "LMT"
outside_hours = "LMT"
collar = 0.01
allow_market = true
"""


async def independent_positions(port: int) -> dict[int, float]:
    """Positions as another API client sees them at the gateway (reqPositions)."""
    client = await connected(port, 31)
    try:
        client.reqPositions()
        await client.wait_for("positionEnd")
        latest: dict[int, float] = {}
        for _account, contract, quantity, _avg in client.named("position"):
            latest[int(contract.conId)] = float(quantity)
        return latest
    finally:
        await client.stop()


def assert_flat(positions: dict[int, float]) -> None:
    """Flat as reported: closed positions are either absent or reported at zero."""
    assert {con_id: q for con_id, q in positions.items() if q != 0} == {}


def guard_orders_by_contract(sim: SimGateway) -> dict[int, list[Any]]:
    by_con: dict[int, list[Any]] = defaultdict(list)
    for order in sim.exchange.orders():
        if order.client_id == GUARD_CLIENT_ID:
            by_con[order.instrument.con_id].append(order)
    return by_con


def fresh_prices(guard: Guard, con_ids: tuple[int, ...]) -> bool:
    now = time.time()
    for con_id in con_ids:
        prices = guard.book.quote(ConId(con_id)).close_prices()
        points = (prices.bid, prices.ask)
        if not all(isinstance(p, PricePoint) and now - p.received < 0.5 for p in points):
            return False
    return True


def stale_prices(guard: Guard, con_ids: tuple[int, ...], older_than: float) -> bool:
    now = time.time()
    for con_id in con_ids:
        prices = guard.book.quote(ConId(con_id)).close_prices()
        for point in (prices.bid, prices.ask, prices.last):
            if point is not None and now - point.received <= older_than:
                return False
    return True


async def test_feed_lags_during_flatten_then_closes_repriced_up_the_escalation_and_flat(
    tmp_path: Path,
) -> None:
    # Arrange: three positions, long and short; the guard synced with live prices
    async with sim_gateway(positions=POSITIONS) as sim:
        start = starting_positions(sim)
        assert await independent_positions(sim.port) == {AAPL: 1000.0, MSFT: -500.0, ES: -2.0}
        cfg = guard_config(sim.port, tmp_path, REPRICING)
        async with running(cfg) as guard:
            await eventually(lambda: fresh_prices(guard, (AAPL, MSFT, ES)), "live prices")
            # the feed falls LAG_S behind: it replays the gateway's own record of the quotes of
            # LAG_S ago, sizes changing, so every price looks current to the guard. Then the
            # market jumps against every close; the guard's feed shows it only LAG_S later,
            # long after the escalation has run (four steps, 0.5 s apart).
            await eventually(
                lambda: sim.quote_history_s(AAPL) >= LAG_S, "quote record", timeout_s=LAG_S + 5
            )
            sim.fault_market_data([AAPL, MSFT, ES], lag_s=LAG_S)
            for con_id, fraction in JUMPS.items():
                sim.jump_price(con_id, fraction)

            # Act
            await guard.handle(kill_command("flatten"))

            # Assert: flat at the gateway, each close re-priced until it filled
            await eventually(
                lambda: all(p.position == 0 for p in sim.exchange.positions("DU000001")),
                "flat at the gateway",
                timeout_s=30,
            )
            await eventually(
                lambda: guard.executor.last_flat_confirmed is not None,
                "flat confirmed",
                timeout_s=20,
            )
        assert_flat(await independent_positions(sim.port))
        assert zero_crossings(sim, start) == [], "a position crossed zero"
        assert sim.exchange.working_orders() == []

        records = journal(cfg)
        repriced = [r for r in records if r["kind"] == "close_child_repriced"]
        steps: dict[int, list[int]] = defaultdict(list)
        for rec in repriced:
            steps[int(rec["con_id"])].append(int(rec["step"]))
        # the stocks filled at the widest collar (0.01 + 0.05 + 0.15) from the stale price:
        # 190 × 0.79 = 150.1 under the 171 bid, 420 × 1.21 = 508.2 over the 462 ask
        assert steps[AAPL] == [1, 2] and steps[MSFT] == [1, 2]
        # the future needed the market step: 6000.25 × 1.21 = 7260.3 under the 7500 ask
        assert steps[ES] == [1, 2, 3]
        es_last = [r for r in repriced if int(r["con_id"]) == ES][-1]
        assert (es_last["order_type"], es_last["limit_price"]) == ("MKT", None)
        for rec in repriced:
            assert rec["old_limit_price"] is not None
        cancels = [r for r in records if r["kind"] == "close_child_reprice_cancel"]
        assert len(cancels) >= len(repriced)
        # one child of each contract at a time: each was finished before the next was sent
        for con_id, orders in guard_orders_by_contract(sim).items():
            assert all(not o.is_working for o in orders)
            assert sum(o.filled for o in orders) == abs(start[con_id])


async def test_feed_frozen_during_flatten_then_never_a_limit_from_the_frozen_price_and_flat(
    tmp_path: Path,
) -> None:
    # Arrange
    async with sim_gateway(positions=POSITIONS) as sim:
        start = starting_positions(sim)
        assert await independent_positions(sim.port) == {AAPL: 1000.0, MSFT: -500.0, ES: -2.0}
        cfg = guard_config(sim.port, tmp_path, REPRICING)
        async with running(cfg) as guard:
            await eventually(lambda: fresh_prices(guard, (AAPL, MSFT, ES)), "live prices")
            sim.fault_market_data([AAPL, MSFT, ES], lag_s=None)  # no more ticks at all
            for con_id, fraction in JUMPS.items():
                sim.jump_price(con_id, fraction)
            await eventually(
                lambda: stale_prices(guard, (AAPL, MSFT, ES), older_than=1.0),
                "the guard's prices older than max_price_age_s",
            )

            # Act
            await guard.handle(kill_command("flatten"))

            # Assert: the future closes at market at once; the stocks wait for a price
            await eventually(
                lambda: sim.exchange.position("DU000001", ES).position == 0, timeout_s=10
            )
            await eventually(
                lambda: any(r["kind"] == "close_price_unusable" for r in journal(cfg)),
                "stale price reported",
            )
            assert not [o for o in guard_orders_by_contract(sim)[AAPL]]
            assert not [o for o in guard_orders_by_contract(sim)[MSFT]]

            # Act: the feed comes back
            sim.clear_market_data_fault([AAPL, MSFT, ES])

            await eventually(
                lambda: all(p.position == 0 for p in sim.exchange.positions("DU000001")),
                "flat at the gateway",
                timeout_s=20,
            )
            await eventually(
                lambda: guard.executor.last_flat_confirmed is not None,
                "flat confirmed",
                timeout_s=20,
            )
        assert_flat(await independent_positions(sim.port))
        assert zero_crossings(sim, start) == [], "a position crossed zero"
        orders = guard_orders_by_contract(sim)
        # never a limit from the frozen prices (190, 420): only from the market after the jump
        assert all(o.order_type == "LMT" and o.lmt_price < 175.0 for o in orders[AAPL])
        assert all(o.order_type == "LMT" and o.lmt_price > 455.0 for o in orders[MSFT])
        assert [o.order_type for o in orders[ES]] == ["MKT"]
        unusable = {
            int(r["con_id"]): r["why"] for r in journal(cfg) if r["kind"] == "close_price_unusable"
        }
        assert unusable == {AAPL: "stale_price", MSFT: "stale_price"}
