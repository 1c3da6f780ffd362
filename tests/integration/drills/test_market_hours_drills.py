"""Drills on market hours: the real guard against the simulated gateway over TCP, whose clock
starts at 03:00 New York time (extended hours) or on a Saturday (closed), the end state read by
an independent client.

- Flatten at 03:00: the guard reads the contract's hours (contractDetails) and the gateway's clock
  (currentTime), and closes with what works then: a marketable limit with outsideRth.
- Flatten on a closed market: the close waits for the open (status, metric, journal
  `close_waiting_for_open`) with nothing sent that IB would refuse or park at a stale price; the
  gateway's clock moves to Monday's open and the close completes.
"""

from __future__ import annotations

import contextlib
import datetime as dt
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from guardd.runtime.guard import Guard
from ibsim.gateway import SimGateway
from tests.conftest import SCENARIO, eventually
from tests.drill_helpers import gateway_says_flat, kill_command, running
from tests.guard_harness import (
    AAPL,
    ACCOUNT,
    ES,
    guard_config,
    guard_orders,
    journal,
    journal_kinds,
    sim_gateway,
    starting_positions,
    zero_crossings,
)

pytestmark = [pytest.mark.integration, pytest.mark.both_wires, pytest.mark.slow]

NEW_YORK = dt.timezone(dt.timedelta(hours=-5))  # EST: December
AT_03_00 = dt.datetime(2026, 12, 1, 3, 0, tzinfo=NEW_YORK)  # a Tuesday
SATURDAY = dt.datetime(2026, 12, 5, 12, 0, tzinfo=NEW_YORK)
MONDAY_OPEN = dt.datetime(2026, 12, 7, 9, 30, tzinfo=NEW_YORK)
FLATTEN = (
    '[kill]\nmode = "flatten"\n\n[flatten]\nverify_timeout_s = 20.0\nposition_settle_s = 2.0\n'
)
POSITIONS = [{"symbol": "AAPL", "quantity": 300}, {"symbol": "ES", "quantity": -2}]


@contextlib.asynccontextmanager
async def gateway_at(when: dt.datetime) -> AsyncIterator[SimGateway]:
    """The test scenario with US equity hours for stocks and CME hours for ES, its clock at
    `when`."""
    instruments = [
        {**i, "hours": "cme_equity_futures" if i.get("sec_type") == "FUT" else "us_equity"}
        for i in SCENARIO["instruments"]
    ]
    async with sim_gateway(
        instruments=instruments, positions=POSITIONS, gateway={"start_time": when.isoformat()}
    ) as sim:
        yield sim


def fast_heartbeat(guard: Guard) -> None:
    """currentTime every 0.2 s: the guard follows the gateway's clock when a test moves it."""
    guard.broker.heartbeat_interval_s = 0.2


def waiting_metric(guard: Guard) -> float | None:
    value: float | None = guard.registry.get_sample_value(
        "guardd_close_waiting_for_open", {"account": ACCOUNT}
    )
    return value


def guard_errors(sim: SimGateway) -> list[Any]:
    """Orders of the guard the gateway refused (Inactive)."""
    return [o for o in guard_orders(sim) if o.status == "Inactive"]


async def test_flatten_at_03_00_new_york_then_limit_outside_rth_and_flat(tmp_path: Path) -> None:
    # Arrange: Tuesday 03:00 New York time: stocks in extended hours, ES in its overnight session
    async with gateway_at(AT_03_00) as sim:
        start = starting_positions(sim)
        cfg = guard_config(sim.port, tmp_path, FLATTEN)
        async with running(cfg, prepare=fast_heartbeat) as guard:
            await eventually(
                lambda: len(guard.book.market_hours) == 2, "contract hours", timeout_s=5
            )
            assert guard.book.market_session(AAPL, guard.clock()) == "extended"

            # Act
            await guard.handle(kill_command("flatten"))
            await eventually(
                lambda: guard.executor.last_flat_confirmed is not None,
                "flat confirmed",
                timeout_s=15,
            )

        # Assert: flat, read by another client; the stock closed with limits and outsideRth
        positions, working = await gateway_says_flat(sim.port)
        assert positions == {} and working == 0
        assert zero_crossings(sim, start) == []
        stock_children = [o for o in guard_orders(sim) if o.instrument.con_id == AAPL]
        assert stock_children
        assert all(o.order_type == "LMT" and o.outside_rth for o in stock_children)
        assert guard_errors(sim) == []
        assert "close_waiting_for_open" not in journal_kinds(cfg)


async def test_flatten_on_a_closed_market_then_waits_for_the_open_and_completes(
    tmp_path: Path,
) -> None:
    # Arrange: Saturday noon in New York: every market of the scenario is closed
    async with gateway_at(SATURDAY) as sim:
        start = starting_positions(sim)
        cfg = guard_config(sim.port, tmp_path, FLATTEN)
        async with running(cfg, prepare=fast_heartbeat) as guard:
            await eventually(
                lambda: len(guard.book.market_hours) == 2, "contract hours", timeout_s=5
            )

            # Act: the kill
            outcome = await guard.handle(kill_command("flatten"))
            await eventually(
                lambda: "close_waiting_for_open" in journal_kinds(cfg), "waiting", timeout_s=10
            )
            await eventually(lambda: waiting_metric(guard) == 2, "metric", timeout_s=5)

            # Assert: latched, the close pending and said so; nothing sent to a closed market
            assert outcome.accepted
            close = guard.status()["close"]
            assert isinstance(close, dict)
            assert close["waiting_for_open"] == sorted([AAPL, ES])
            assert close["at_target"] is False
            waiting = [r for r in journal(cfg) if r.get("kind") == "close_waiting_for_open"]
            assert sorted(r["con_id"] for r in waiting) == sorted([AAPL, ES])
            assert guard_orders(sim) == []
            assert starting_positions(sim) == start

            # Act: the gateway's clock moves to Monday's open
            sim.set_clock(MONDAY_OPEN.timestamp())
            await eventually(
                lambda: guard.executor.last_flat_confirmed is not None,
                "flat confirmed",
                timeout_s=15,
            )

            # Assert: the close completed and no longer waits
            assert waiting_metric(guard) == 0
            close = guard.status()["close"]
            assert isinstance(close, dict) and close["waiting_for_open"] == []

        positions, working = await gateway_says_flat(sim.port)
        assert positions == {} and working == 0
        assert zero_crossings(sim, start) == []
        assert guard_errors(sim) == []
        kinds = journal_kinds(cfg)
        assert kinds.index("close_waiting_for_open") < kinds.index("close_market_open")
