"""Drills: FX positions (CASH on IDEALPRO) against the simulated gateway over TCP.

A USD account holds long 100,000 EUR.USD, short 150,000 USD.JPY (both quantities in the pair's
base currency: EUR, USD) and a stock. The guard values the FX positions in USD through the
account's ExchangeRate values (which the pairs' own prices set), and a kill closes each pair by
its conventions: one market order on IDEALPRO for the whole quantity in the pair's base currency
(not cut into odd lots below the IDEALPRO minimum), never across zero; an independent ibapi
client sees the account flat.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.conftest import eventually
from tests.drill_helpers import client, gateway_says_flat, kill_command
from tests.guard_harness import (
    ACCOUNT,
    guard_config,
    guard_orders,
    running_guard,
    sim_gateway,
    starting_positions,
    zero_crossings,
)

pytestmark = [pytest.mark.integration, pytest.mark.both_wires, pytest.mark.slow]

STOCK, EURUSD, USDJPY = 265598, 12087792, 15016059
FX_BOOK: dict[str, Any] = {
    "accounts": [{"id": ACCOUNT, "cash": 1_000_000}],
    "instruments": [
        {"symbol": "AAPL", "con_id": STOCK, "price": 100.0, "volatility": 0.0},
        {
            "symbol": "EUR",
            "sec_type": "CASH",
            "currency": "USD",
            "con_id": EURUSD,
            "price": 1.10,
            "volatility": 0.0,
        },
        {
            "symbol": "USD",
            "sec_type": "CASH",
            "currency": "JPY",
            "con_id": USDJPY,
            "price": 150.0,
            "volatility": 0.0,
        },
    ],
    # EUR.USD 100,000 EUR x 1.10 = 110,000 USD; USD.JPY -150,000 USD x 150 = -22,500,000 JPY
    # = -150,000 USD at JPY 1/150; AAPL 1,000 x 100 = 100,000 USD. Gross 360,000 USD.
    "positions": [
        {"symbol": "AAPL", "quantity": 1_000, "avg_price": 100.0},
        {"symbol": "EUR.USD", "quantity": 100_000, "avg_price": 1.10},
        {"symbol": "USD.JPY", "quantity": -150_000, "avg_price": 150.0},
    ],
}
FLATTEN = """
[kill]
mode = "flatten"

[flatten]
verify_timeout_s = 20.0
"""
CHECKER_CLIENT_ID = 42


async def test_fx_pairs_then_sim_reports_them_as_ib_does() -> None:
    # Arrange / Act: an independent ibapi client reads positions and account values
    async with sim_gateway(**FX_BOOK) as sim, client(sim.port, CHECKER_CLIENT_ID) as checker:
        checker.reqPositions()
        await checker.wait_for("positionEnd")
        checker.reqAccountUpdates(True, ACCOUNT)
        await checker.wait_for("accountDownloadEnd")
        positions = {int(a[1].conId): a for a in checker.named("position")}
        rows = {(a[0], a[2]): a[1] for a in checker.named("updateAccountValue")}

    # Assert: EUR.USD is symbol EUR, currency USD, on IDEALPRO, quantity in EUR
    eur = positions[EURUSD][1]
    assert (eur.symbol, eur.secType, eur.currency, eur.localSymbol) == (
        "EUR",
        "CASH",
        "USD",
        "EUR.USD",
    )
    assert eur.exchange == "IDEALPRO"
    assert float(positions[EURUSD][2]) == 100_000
    assert float(positions[USDJPY][2]) == -150_000
    # the pairs' prices are the account's rates; the FX cash balances are the positions
    assert float(rows[("ExchangeRate", "EUR")]) == pytest.approx(1.10)
    assert float(rows[("ExchangeRate", "JPY")]) == pytest.approx(1 / 150, rel=1e-6)
    assert float(rows[("CashBalance", "EUR")]) == pytest.approx(100_000)
    assert float(rows[("CashBalance", "JPY")]) == pytest.approx(22_500_000)


async def test_kill_with_fx_and_stock_then_flat_by_pair_conventions(tmp_path: Path) -> None:
    async with sim_gateway(**FX_BOOK) as sim:
        start = starting_positions(sim)
        cfg = guard_config(sim.port, tmp_path, FLATTEN)
        async with running_guard(cfg) as guard:
            # Arrange: the guard values the book in USD, FX through the ExchangeRate values
            await eventually(
                lambda: guard.status()["gross_position_value"] is not None, "book valued"
            )
            status = guard.status()
            assert status["base_currency"] == "USD"
            assert status["missing_exchange_rates"] == []
            assert status["gross_position_value"] == pytest.approx(360_000, rel=1e-3)

            # Act
            await guard.handle(kill_command("flatten"))
            await eventually(
                lambda: guard.executor.last_flat_confirmed is not None,
                "flat confirmed",
                timeout_s=20,
            )

        # Assert: each pair closed by one market order on IDEALPRO for its whole quantity in the
        # pair's base currency (SELL 100,000 EUR.USD, BUY 150,000 USD.JPY), never past zero
        closes = {o.instrument.con_id: o for o in guard_orders(sim)}
        eur, jpy = closes[EURUSD], closes[USDJPY]
        assert (eur.action, eur.total_quantity, eur.order_type) == ("SELL", 100_000, "MKT")
        assert (jpy.action, jpy.total_quantity, jpy.order_type) == ("BUY", 150_000, "MKT")
        assert eur.instrument.exchange == jpy.instrument.exchange == "IDEALPRO"
        assert len([o for o in guard_orders(sim) if o.instrument.sec_type == "CASH"]) == 2
        positions, working = await gateway_says_flat(sim.port)
        assert positions == {}
        assert working == 0
        assert zero_crossings(sim, start) == []
