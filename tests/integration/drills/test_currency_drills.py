"""Drills: an account whose base currency is not USD, against the simulated gateway over TCP.

The scenario is a EUR account (USD at 0.90 EUR) holding a USD stock long and a EUR stock short.
The guard must learn EUR from IB, value the USD position through the account's ExchangeRate, and
grade leverage on that figure: below the kill limit it stays armed (valuing USD 1:1 would read
4.0 and kill), and after a price jump that takes the true leverage over the limit it kills and
the account ends flat, as a separate ibapi client sees it.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import pytest

from guardd.core.engine import State
from tests.conftest import eventually
from tests.drill_helpers import client, gateway_says_flat
from tests.guard_harness import (
    ACCOUNT,
    guard_config,
    running_guard,
    sim_gateway,
    starting_positions,
    zero_crossings,
)

pytestmark = [pytest.mark.integration, pytest.mark.both_wires, pytest.mark.slow]

USD_STOCK, EUR_STOCK = 265598, 14094  # AAPL (USD), SAP (EUR)
USD_IN_EUR = 0.90
EUR_BASE: dict[str, Any] = {
    "currencies": {"base": "EUR", "rates": {"USD": USD_IN_EUR}},
    "accounts": [{"id": ACCOUNT, "cash": 100_000}],
    "instruments": [
        {"symbol": "AAPL", "con_id": USD_STOCK, "price": 100.0, "volatility": 0.0},
        {
            "symbol": "SAP",
            "con_id": EUR_STOCK,
            "currency": "EUR",
            "primary_exchange": "IBIS",
            "price": 200.0,
            "volatility": 0.0,
        },
    ],
    # AAPL 10,000 x 100 USD = 900,000 EUR long; SAP 3,000 x 200 EUR = 600,000 EUR short;
    # net liquidation 100,000 + 900,000 - 600,000 = 400,000 EUR; gross 1,500,000 EUR: 3.75 x.
    # (USD read 1:1: gross 1,600,000 EUR: 4.0 x, over the 3.9 kill.)
    "positions": [
        {"symbol": "AAPL", "quantity": 10_000, "avg_price": 100.0},
        {"symbol": "SAP", "quantity": -3_000, "avg_price": 200.0},
    ],
}
LEVERAGE_LIMITS = """
[limits.leverage]
warn = 3.0
kill = 3.9
max_data_age_s = 10.0

[kill]
mode = "flatten"

[flatten]
verify_timeout_s = 20.0
"""
CHECKER_CLIENT_ID = 41


def leverage_finding(status: Any) -> dict[str, Any] | None:
    found = status["findings"].get("leverage")
    return found if isinstance(found, dict) and found.get("value") is not None else None


async def test_eur_base_account_then_sim_reports_currency_rows_as_tws() -> None:
    # Arrange / Act: an independent ibapi client subscribes to the account's values
    async with sim_gateway(**EUR_BASE) as sim, client(sim.port, CHECKER_CLIENT_ID) as checker:
        checker.reqAccountUpdates(True, ACCOUNT)
        await checker.wait_for("accountDownloadEnd")
        rows = {(a[0], a[2]): a[1] for a in checker.named("updateAccountValue")}

    # Assert: base-only values carry EUR; one row per currency and a BASE row, with rates
    assert float(rows[("NetLiquidation", "EUR")]) == pytest.approx(400_000.0)
    assert rows[("Currency", "BASE")] == "BASE"
    assert rows[("Currency", "EUR")] == "EUR"
    assert rows[("Currency", "USD")] == "USD"
    assert float(rows[("ExchangeRate", "BASE")]) == 1.0
    assert float(rows[("ExchangeRate", "EUR")]) == 1.0
    assert float(rows[("ExchangeRate", "USD")]) == pytest.approx(USD_IN_EUR)
    assert float(rows[("CashBalance", "EUR")]) == pytest.approx(100_000.0)
    assert ("NetLiquidation", "USD") not in rows


async def test_eur_base_account_then_leverage_in_eur_and_kill_at_the_right_figure(
    tmp_path: Path,
) -> None:
    async with sim_gateway(**EUR_BASE) as sim:
        start = starting_positions(sim)
        cfg = guard_config(sim.port, tmp_path, LEVERAGE_LIMITS)
        async with running_guard(cfg) as guard:
            # Act 1: the guard values the book
            await eventually(
                lambda: leverage_finding(guard.status()) is not None, "leverage graded"
            )
            status = guard.status()

            # Assert 1: EUR learned from IB; USD converted at 0.90; 3.75 x is a warning only
            assert status["base_currency"] == "EUR"
            assert status["net_liquidation"] == pytest.approx(400_000.0)
            assert status["gross_position_value"] == pytest.approx(1_500_000.0)
            finding = leverage_finding(status)
            assert finding is not None
            assert finding["level"] == "warn"
            assert finding["value"] == pytest.approx(3.75)
            assert guard.engine.state == State.WARNING

            # Act 2: SAP +10 %: short 660,000 EUR; net liquidation 340,000; gross 1,560,000
            sim.jump_price(EUR_STOCK, 0.10)
            await eventually(lambda: guard.engine.state == State.HALTED, "HALTED")
            latch = guard.engine.latch
            assert latch is not None and latch.source == "rule:leverage"
            await eventually(
                lambda: guard.executor.last_flat_confirmed is not None,
                "flat confirmed",
                timeout_s=20,
            )

        # Assert 2: the kill came at gross 1,560,000 EUR over net liquidation 340,000 (4.59 x),
        # or over 400,000 while the account values still lagged the price tick (3.90 x); with
        # USD read 1:1 it would have read 4.15 x or 4.88 x
        match = re.search(r"leverage ([0-9.]+) >= kill limit 3\.9", latch.reason)
        assert match is not None, latch.reason
        seen = float(match.group(1))
        assert any(math.isclose(seen, 1_560_000 / nl, rel_tol=1e-4) for nl in (340_000, 400_000))
        positions, working = await gateway_says_flat(sim.port)
        assert positions == {}
        assert working == 0
        assert zero_crossings(sim, start) == []
