"""`ib_async` (an independent client implementation) against the simulated gateway, over TCP."""

from __future__ import annotations

import pytest
from ib_async import IB, Future, LimitOrder, MarketOrder, Stock

from ibsim.gateway import SimGateway
from ibsim.scenario import Scenario
from ibsim.server import build_gateway
from tests.conftest import eventually

pytestmark = pytest.mark.integration

ACCOUNT = "DU000001"


async def connected(sim: SimGateway, client_id: int) -> IB:
    ib = IB()
    await ib.connectAsync("127.0.0.1", sim.port, clientId=client_id, timeout=5)
    return ib


async def test_connect_to_a_226_gateway_then_served_the_178_text_wire(scenario: Scenario) -> None:
    async with build_gateway(scenario, host="127.0.0.1", port=0, server_version=226) as sim:
        ib = await connected(sim, 5)
        try:
            assert ib.client.serverVersion() == 178
            assert sim.sessions[5].client_version == 178
            assert {p.contract.symbol for p in ib.positions()} == {"AAPL", "ES"}
        finally:
            ib.disconnect()


async def test_connect_then_positions_account_and_pnl(sim: SimGateway) -> None:
    ib = await connected(sim, 5)
    try:
        assert ib.managedAccounts() == [ACCOUNT]
        positions = {p.contract.symbol: p.position for p in ib.positions()}
        assert positions == {"AAPL": 1000, "ES": -2}
        summary = {v.tag: v.value for v in await ib.accountSummaryAsync(ACCOUNT)}
        assert float(summary["NetLiquidation"]) > 0
        values = {v.tag for v in ib.accountValues(ACCOUNT)}
        assert {"NetLiquidation", "MaintMarginReq", "ExcessLiquidity"} <= values
        pnl = ib.reqPnL(ACCOUNT)
        await eventually(lambda: pnl.dailyPnL == pnl.dailyPnL and pnl.dailyPnL is not None)
        assert pnl.account == ACCOUNT
    finally:
        ib.disconnect()


async def test_qualify_stock_and_future_then_con_ids(sim: SimGateway) -> None:
    ib = await connected(sim, 5)
    try:
        aapl, es = await ib.qualifyContractsAsync(
            Stock("AAPL", "SMART", "USD"), Future("ES", "20261218", "CME")
        )
        assert aapl.conId == 265598
        assert es.conId == 620731015
        ticker = ib.reqMktData(aapl)
        await eventually(lambda: ticker.bid == ticker.bid and ticker.bid > 0)
        assert ticker.ask > ticker.bid
    finally:
        ib.disconnect()


async def test_limit_and_market_orders_then_fills(sim: SimGateway) -> None:
    ib = await connected(sim, 5)
    try:
        [aapl] = await ib.qualifyContractsAsync(Stock("AAPL", "SMART", "USD"))
        trade = ib.placeOrder(aapl, MarketOrder("BUY", 100))
        await eventually(trade.isDone)
        assert trade.orderStatus.status == "Filled"
        assert sum(f.execution.shares for f in trade.fills) == 100
        await eventually(
            lambda: {p.contract.symbol: p.position for p in ib.positions()}["AAPL"] == 1100
        )

        resting = ib.placeOrder(aapl, LimitOrder("BUY", 10, 1.0))
        await eventually(lambda: resting.orderStatus.status == "Submitted")
        ib.cancelOrder(resting.order)
        await eventually(resting.isDone)
        assert resting.orderStatus.status == "Cancelled"
    finally:
        ib.disconnect()


async def test_global_cancel_from_another_client_then_bot_orders_cancelled(sim: SimGateway) -> None:
    bot = await connected(sim, 5)
    guard = await connected(sim, 6)
    try:
        [msft] = await bot.qualifyContractsAsync(Stock("MSFT", "SMART", "USD"))
        trades = [bot.placeOrder(msft, LimitOrder("BUY", 10, 1.0 + n)) for n in range(3)]
        await eventually(lambda: all(t.orderStatus.status == "Submitted" for t in trades))
        guard.reqGlobalCancel()
        await eventually(lambda: all(t.orderStatus.status == "Cancelled" for t in trades))
        assert not sim.exchange.working_orders()
    finally:
        bot.disconnect()
        guard.disconnect()


async def test_master_client_then_sees_bot_orders(sim: SimGateway) -> None:
    master = await connected(sim, 0)
    bot = await connected(sim, 5)
    try:
        [msft] = await bot.qualifyContractsAsync(Stock("MSFT", "SMART", "USD"))
        bot.placeOrder(msft, LimitOrder("BUY", 10, 1.0))
        await eventually(lambda: any(t.order.clientId == 5 for t in master.openTrades()))
    finally:
        master.disconnect()
        bot.disconnect()


async def test_pacing_violation_then_error_100_and_disconnect(sim: SimGateway) -> None:
    ib = await connected(sim, 5)
    errors: list[int] = []
    ib.errorEvent += lambda req_id, code, msg, contract: errors.append(code)
    ib.client.MaxRequests = 0  # ib_async throttles itself to 45/s; a runaway bot would not
    try:
        for _ in range(60):
            ib.client.reqCurrentTime()
        await eventually(lambda: not ib.isConnected())
        assert 100 in errors
        assert sim.pacing_violations == 1
    finally:
        ib.disconnect()


async def test_gateway_restart_then_reconnect_sees_orders(sim: SimGateway) -> None:
    ib = await connected(sim, 5)
    [msft] = await ib.qualifyContractsAsync(Stock("MSFT", "SMART", "USD"))
    ib.placeOrder(msft, LimitOrder("BUY", 10, 1.0))
    await eventually(lambda: len(sim.exchange.working_orders()) == 1)
    await sim.restart(0.3)
    await eventually(lambda: not ib.isConnected())
    ib.disconnect()
    again = await connected(sim, 5)
    try:
        assert len(again.openTrades()) == 1
    finally:
        again.disconnect()
