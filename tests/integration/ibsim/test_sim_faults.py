"""The simulated gateway's faults, scenario files and `guardd sim` program."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from ib_async import IB, MarketOrder, Stock

from ibsim.gateway import SimGateway
from ibsim.scenario import Scenario, ScenarioError, load_scenario, parse_scenario, run_faults
from tests.conftest import SCENARIO, eventually, free_port
from tests.ibapi_harness import IbapiClient, connected, limit_order, market_order, stock

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[3]


async def test_connectivity_lost_then_1100_and_1102_and_socket_kept(sim: SimGateway) -> None:
    client = await connected(sim.port, 3)
    try:
        sim.connectivity_lost()
        await client.wait_for("error", lambda a: a[2] == 1100)
        sim.connectivity_restored(data_lost=False)
        await client.wait_for("error", lambda a: a[2] == 1102)
        assert client.isConnected()
        assert 3 in sim.sessions
    finally:
        await client.stop()


async def test_reject_filter_then_error_201_and_no_fill(sim: SimGateway) -> None:
    client = await connected(sim.port, 3)
    try:
        sim.reject_orders(lambda req, inst: "market closed" if inst.symbol == "AAPL" else None)
        oid = client.named("nextValidId")[0][0]
        client.placeOrder(oid, stock("AAPL"), market_order("SELL", 100))
        rejected = await client.wait_for("error", lambda a: a[2] == 201)
        assert rejected[0][0] == oid and "market closed" in rejected[0][3]
        assert sim.exchange.fills() == []
        client.placeOrder(oid + 1, stock("MSFT"), market_order("BUY", 1))
        await client.wait_for("orderStatus", lambda a: a[0] == oid + 1 and a[1] == "Filled")
    finally:
        await client.stop()


async def test_duplicated_and_delayed_positions_then_each_update_sent_again_later(
    sim: SimGateway,
) -> None:
    client = await connected(sim.port, 3)
    try:
        client.reqPositions()
        await client.wait_for("positionEnd")
        before = len(client.named("position"))
        sim.duplicate_positions(1)
        sim.delay_positions(0.3)
        oid = client.named("nextValidId")[0][0]
        client.placeOrder(oid, stock("AAPL"), market_order("SELL", 100))
        await client.wait_for("orderStatus", lambda a: a[0] == oid and a[1] == "Filled")
        assert len(client.named("position")) == before  # not yet: delayed
        moved = await client.wait_for("position", lambda a: float(a[2]) == 900, count=2)
        assert len(moved) == 2
    finally:
        await client.stop()


async def test_price_jump_then_resting_limit_fills(sim: SimGateway) -> None:
    client = await connected(sim.port, 3)
    try:
        oid = client.named("nextValidId")[0][0]
        client.placeOrder(oid, stock("AAPL"), limit_order("BUY", 10, 180.0))
        await client.wait_for("orderStatus", lambda a: a[0] == oid and a[1] == "Submitted")
        sim.jump_price(265598, -0.10)
        await client.wait_for("orderStatus", lambda a: a[0] == oid and a[1] == "Filled")
        assert sim.exchange.quote(265598).last < 180.0
    finally:
        await client.stop()


async def test_margin_change_then_maintenance_requirement_scales(sim: SimGateway) -> None:
    def maint() -> float:
        values = {k: v for k, v, _ in sim.exchange.account_values("DU000001")}
        return float(values["MaintMarginReq"])

    before = maint()
    sim.change_margin(2.0)
    assert maint() == pytest.approx(2 * before, rel=1e-6)


async def test_scheduled_faults_then_played_in_order(sim: SimGateway, scenario: Scenario) -> None:
    client = await connected(sim.port, 3)
    try:
        faults = parse_scenario(
            {
                **SCENARIO,
                "faults": [
                    {"at_s": 0.0, "kind": "connectivity_lost", "seconds": 0.1, "data_lost": True},
                    {"at_s": 0.05, "kind": "price_jump", "symbol": "MSFT", "fraction": 0.5},
                ],
            }
        ).faults
        await run_faults(sim, scenario, faults)
        await client.wait_for("error", lambda a: a[2] == 1101)
        assert sim.exchange.quote(272093).last == pytest.approx(630.0, rel=0.01)
    finally:
        await client.stop()


@pytest.mark.parametrize(
    ("data", "named"),
    [
        ({"gateway": {"pacing_limit": 0}}, "gateway.pacing_limit"),
        ({"gateway": {"colour": "red"}}, "gateway.colour"),
        ({"positions": [{"symbol": "NOPE", "quantity": 1}]}, "positions[0].symbol"),
        ({"faults": [{"at_s": 1, "kind": "meteor"}]}, "faults.0"),
        ({"faults": [{"at_s": 1, "kind": "price_jump", "symbol": "AAPL"}]}, "faults.0.fraction"),
        ({"accounts": []}, "accounts"),
        (
            {"currencies": {"base": "EUR"}, "instruments": [{"symbol": "X", "con_id": 1}]},
            "instruments[0].currency",
        ),
        ({"currencies": {"base": "EUR", "rates": {"EUR": 1.0}}}, "currencies.rates"),
        ({"currencies": {"base": "euro"}}, "currencies.base"),
    ],
)
def test_bad_scenario_then_error_names_the_key(data: dict[str, object], named: str) -> None:
    with pytest.raises(ScenarioError, match=named.replace("[", r"\[").replace("]", r"\]")):
        parse_scenario(data)


def test_example_scenarios_then_load(tmp_path: Path) -> None:
    files = sorted((ROOT / "configs" / "scenarios").glob("*.toml"))
    assert files
    for path in files:
        assert load_scenario(path).instruments
    broken = tmp_path / "broken.toml"
    broken.write_text("[gateway\nseed = 1\n")
    with pytest.raises(ScenarioError, match="not valid TOML"):
        load_scenario(broken)


async def test_guardd_sim_program_then_ib_async_trades_against_it() -> None:
    port = free_port()
    scenario = ROOT / "configs" / "scenarios" / "calm.toml"
    proc = await asyncio.create_subprocess_exec(
        *[sys.executable, "-m", "ibsim", "--port", str(port), "--scenario", str(scenario)],
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    ib = IB()

    async def connects() -> bool:
        with contextlib.suppress(ConnectionRefusedError, OSError, TimeoutError):
            await ib.connectAsync("127.0.0.1", port, clientId=21, timeout=2)
        return ib.isConnected()

    try:
        await eventually(connects, "ib_async connected to the ibsim program", interval_s=0.1)
        [aapl] = await ib.qualifyContractsAsync(Stock("AAPL", "SMART", "USD"))
        trade = ib.placeOrder(aapl, MarketOrder("BUY", 10))
        await eventually(trade.isDone, "the order done", timeout_s=5)
        assert trade.orderStatus.status == "Filled"
        ib.disconnect()
    finally:
        proc.terminate()
        raw, _ = await asyncio.wait_for(proc.communicate(), 10)
    out = raw.decode()
    assert proc.returncode == 0
    assert "places order" in out and "fill:" in out


def test_guardd_sim_with_bad_scenario_then_exit_78(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[gateway]\npacing_limit = -3\n")
    result = subprocess.run(
        [sys.executable, "-m", "ibsim", "--port", "0", "--scenario", str(bad)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 78
    assert "gateway.pacing_limit" in result.stderr


async def test_what_if_order_then_refused_and_nothing_placed(sim: SimGateway) -> None:
    client = await connected(sim.port, 3)
    try:
        order = market_order("BUY", 10)
        order.whatIf = True
        oid = client.named("nextValidId")[0][0]
        client.placeOrder(oid, stock("AAPL"), order)
        refused = await client.wait_for("error", lambda a: a[2] == 201)
        assert "what-if" in refused[0][3]
        assert sim.exchange.orders() == []
    finally:
        await client.stop()


async def test_client_that_cannot_speak_178_then_closed_without_reply(sim: SimGateway) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", sim.port)
    try:
        payload = b"v100..176"
        writer.write(b"API\0" + len(payload).to_bytes(4, "big") + payload)
        await writer.drain()
        reply = await asyncio.wait_for(reader.read(), 5)
        assert reply == b""
    finally:
        writer.close()


async def test_version_range_with_too_many_digits_then_refused_as_bad_and_closed(
    sim: SimGateway, caplog: pytest.LogCaptureFixture
) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", sim.port)
    try:
        payload = b"v" + b"9" * 5000  # more digits than int() converts
        writer.write(b"API\0" + len(payload).to_bytes(4, "big") + payload)
        await writer.drain()
        reply = await asyncio.wait_for(reader.read(), 5)
        assert reply == b""
        assert "bad version range" in caplog.text
    finally:
        writer.close()


# ---- faults for the drills: freeze, split modifies, liquidation, daily reset --------------------


async def test_freeze_then_nothing_answered_until_thawed_and_socket_kept(sim: SimGateway) -> None:
    client = await connected(sim.port, 3)
    try:
        freeze = sim.start_freeze(1.0)
        client.reqCurrentTime()
        with pytest.raises(TimeoutError):
            await client.wait_for("currentTime", timeout=0.6)
        assert client.isConnected() and 3 in sim.sessions
        await freeze
        answered = await client.wait_for("currentTime", timeout=2.0)
        assert len(answered) == 1
        assert sim.freezes == 1 and not sim.frozen
    finally:
        await client.stop()


async def test_freeze_then_new_connection_waits_for_the_thaw(sim: SimGateway) -> None:
    freeze = sim.start_freeze(0.8)
    client = IbapiClient()
    started = asyncio.get_running_loop().time()
    try:
        await client.start(sim.port, 4)
        assert asyncio.get_running_loop().time() - started >= 0.6
    finally:
        await freeze
        await client.stop()


async def test_freeze_then_exchange_keeps_trading_and_fills_reported_after(
    sim: SimGateway,
) -> None:
    client = await connected(sim.port, 3)
    try:
        oid = client.named("nextValidId")[0][0]
        client.placeOrder(oid, stock("AAPL"), limit_order("SELL", 10, 200.0))
        await client.wait_for("orderStatus", lambda a: a[0] == oid and a[1] == "Submitted")
        freeze = sim.start_freeze(0.8)
        sim.jump_price(265598, 0.10)
        assert sim.exchange.working_orders() == []  # filled at the exchange during the freeze
        assert client.named("execDetails") == []
        await freeze
        await client.wait_for("orderStatus", lambda a: a[0] == oid and a[1] == "Filled")
    finally:
        await client.stop()


async def test_split_modifies_during_connectivity_loss_then_two_orders(sim: SimGateway) -> None:
    client = await connected(sim.port, 3)
    try:
        sim.split_modifies(True)
        oid = client.named("nextValidId")[0][0]
        client.placeOrder(oid, stock("AAPL"), limit_order("BUY", 10, 150.0))
        await client.wait_for("orderStatus", lambda a: a[0] == oid and a[1] == "Submitted")
        # Act: modify while connected (a real modify), then while connectivity is lost (split)
        client.placeOrder(oid, stock("AAPL"), limit_order("BUY", 10, 151.0))
        await eventually(lambda: [o.lmt_price for o in sim.exchange.working_orders()] == [151.0])
        assert len(sim.exchange.working_orders()) == 1
        sim.connectivity_lost()
        client.placeOrder(oid, stock("AAPL"), limit_order("BUY", 10, 152.0))
        await eventually(lambda: sim.split_orders == 1)
        sim.connectivity_restored()

        working = sim.exchange.working_orders()
        assert sorted(o.lmt_price or 0 for o in working) == [151.0, 152.0]
        assert {o.order_id for o in working} == {oid}
        assert len({o.perm_id for o in working}) == 2
        assert sim.split_orders == 1
        client.cancel(oid)  # cancelOrder reaches the original only
        await eventually(lambda: len(sim.exchange.working_orders()) == 1)
        assert [o.lmt_price for o in sim.exchange.working_orders()] == [152.0]
        client.global_cancel()
        await eventually(lambda: sim.exchange.working_orders() == [])
        assert sim.exchange.working_orders() == []
    finally:
        await client.stop()


async def test_liquidate_then_foreign_execution_and_position_reduced_never_past_zero(
    sim: SimGateway,
) -> None:
    master = await connected(sim.port, 0)
    try:
        sim.liquidate("DU000001", 265598, 300)
        execs = await master.wait_for("execDetails")
        contract, execution = execs[0][1], execs[0][2]
        assert contract.conId == 265598
        assert (execution.side, float(execution.shares)) == ("SLD", 300.0)
        assert execution.orderRef == "IB liquidation" and execution.orderId == 0
        positions = {p.instrument.con_id: p.position for p in sim.exchange.positions("DU000001")}
        assert positions[265598] == 700
        sim.liquidate("DU000001", 620731015, 5)  # short 2 ES: only 2 can be bought back
        assert all(p.instrument.con_id != 620731015 for p in sim.exchange.positions("DU000001"))
        assert sim.exchange.position("DU000001", 620731015).position == 0
        sim.liquidate("DU000001", 620731015, 1)  # flat: nothing happens
        assert len(sim.exchange.fills()) == 2
        assert sim.liquidations == 3
    finally:
        await master.stop()


async def test_daily_reset_then_1100_then_dropped_and_accepting_again(sim: SimGateway) -> None:
    client = await connected(sim.port, 3)
    try:
        await sim.daily_reset(0.3)
        await client.wait_for("error", lambda a: a[2] == 1100)
        await client.wait_for("connectionClosed")
        assert sim.connectivity_ok and sim.accepting
        again = await connected(sim.port, 3)
        await again.stop()
    finally:
        await client.stop()


async def test_scheduled_new_faults_then_parsed_and_played(
    sim: SimGateway, scenario: Scenario
) -> None:
    faults = parse_scenario(
        {
            **SCENARIO,
            "faults": [
                {"at_s": 0.0, "kind": "freeze", "seconds": 0.1},
                {"at_s": 0.0, "kind": "split_modifies", "seconds": 0.1},
                {"at_s": 0.0, "kind": "liquidate", "symbol": "AAPL", "quantity": 100},
                {"at_s": 0.05, "kind": "daily_reset", "seconds": 0.1},
            ],
        }
    ).faults
    await run_faults(sim, scenario, faults)
    assert sim.freezes == 1 and sim.liquidations == 1
    assert not sim.split_modifies_enabled and not sim.frozen and sim.connectivity_ok
    assert sim.exchange.position("DU000001", 265598).position == 900


def test_liquidate_fault_with_unknown_account_then_error_names_the_key() -> None:
    with pytest.raises(ScenarioError, match=r"faults\[0\]\.account"):
        parse_scenario(
            {
                "faults": [
                    {
                        "at_s": 1,
                        "kind": "liquidate",
                        "account": "X",
                        "symbol": "AAPL",
                        "quantity": 1,
                    }
                ]
            }
        )


async def test_orders_cancelled_while_dropped_then_owner_reconnects_to_none_and_others_kept(
    sim: SimGateway, scenario: Scenario
) -> None:
    # Arrange: clients 3 and 5 each have an AAPL buy resting far below the market
    owner, other = await connected(sim.port, 3), await connected(sim.port, 5)
    try:
        owner.placeOrder(owner.named("nextValidId")[0][0], stock("AAPL"), limit_order("BUY", 10, 1))
        other.placeOrder(other.named("nextValidId")[0][0], stock("AAPL"), limit_order("BUY", 10, 1))
        await eventually(lambda: len(sim.exchange.working_orders()) == 2)
        faults = parse_scenario(
            {
                **SCENARIO,
                "faults": [
                    {
                        "at_s": 0,
                        "kind": "cancel_orders_while_dropped",
                        "seconds": 0.3,
                        "client_id": 3,
                    }
                ],
            }
        ).faults

        # Act
        played = asyncio.create_task(run_faults(sim, scenario, faults))
        await owner.wait_for("connectionClosed")
        refused = True
        with socket.socket() as probe:  # nobody is let in while it lasts
            probe.settimeout(0.2)
            refused = probe.connect_ex(("127.0.0.1", sim.port)) != 0
        await played
        again = await connected(sim.port, 3)
        try:
            again.reqOpenOrders()
            await again.wait_for("openOrderEnd")
            reported = again.named("openOrder")
        finally:
            await again.stop()

        # Assert: the owner's order is gone and it was told nothing; the other client's works on
        assert refused
        assert [o.client_id for o in sim.exchange.working_orders()] == [5]
        assert reported == []
        assert [a for a in owner.named("orderStatus") if a[1] == "Cancelled"] == []
    finally:
        await owner.stop()
        await other.stop()


# ---- market data faults ---------------------------------------------------------------------

AAPL, MSFT = 265598, 272093
BID_SIZE, LAST, DELAYED_LAST = 0, 4, 68


def _ticks(client: IbapiClient, req_id: int, name: str = "tickPrice") -> list[tuple[object, ...]]:
    return [args for args in client.named(name) if args[0] == req_id]


async def test_quiet_market_then_size_ticks_keep_the_quote_alive(sim: SimGateway) -> None:
    # volatility 0: prices never move, sizes change every market step (as TWS streams them)
    client = await connected(sim.port, 3)
    try:
        client.reqMktData(1, stock("AAPL"), "", False, False, [])
        await client.wait_for("tickPrice", lambda a: a[0] == 1, count=3)
        first = len(_ticks(client, 1, "tickSize"))
        await client.wait_for(
            "tickSize", lambda a: a[0] == 1 and a[1] == BID_SIZE, count=first // 3 + 5
        )
        assert {a[2] for a in _ticks(client, 1)} <= {189.99, 190.0, 190.01}
    finally:
        await client.stop()


async def test_market_data_frozen_then_no_ticks_until_cleared(sim: SimGateway) -> None:
    client = await connected(sim.port, 3)
    try:
        sim.fault_market_data([AAPL], lag_s=None)
        client.reqMktData(1, stock("AAPL"), "", False, False, [])
        client.reqMktData(2, stock("MSFT"), "", False, False, [])
        # MSFT keeps ticking meanwhile: plenty of time for AAPL ticks, had there been any
        await client.wait_for("tickSize", lambda a: a[0] == 2, count=30)
        assert _ticks(client, 1) == [] and _ticks(client, 1, "tickSize") == []

        sim.clear_market_data_fault([AAPL])

        await client.wait_for("tickPrice", lambda a: a[0] == 1, count=3)
    finally:
        await client.stop()


async def test_market_data_lagging_as_delayed_ticks_then_old_prices_then_the_jump(
    sim: SimGateway,
) -> None:
    client = await connected(sim.port, 3)
    try:
        client.reqMktData(1, stock("AAPL"), "", False, False, [])
        await client.wait_for("tickPrice", lambda a: a[0] == 1, count=3)
        sim.fault_market_data([AAPL], lag_s=0.5, delayed_ticks=True)
        await client.wait_for("marketDataType", lambda a: a == (1, 3))
        sim.jump_price(AAPL, -0.10)
        # the market moved; the lagging feed still shows the old price, for lag_s
        lagging = sim.lagging_quote(AAPL)
        assert lagging is not None and lagging.last == 190.0
        assert sim.exchange.quote(AAPL).last == pytest.approx(171.0, rel=0.01)
        jumped = await client.wait_for(
            "tickPrice", lambda a: a[0] == 1 and a[1] == DELAYED_LAST and a[2] < 180
        )
        assert jumped[0][2] == pytest.approx(171.0, rel=0.01)
        assert not [a for a in _ticks(client, 1) if a[1] == LAST and a[2] < 180]  # never live
        sim.clear_market_data_fault([AAPL])

        await client.wait_for("marketDataType", lambda a: a == (1, 1))
        await client.wait_for("tickPrice", lambda a: a[0] == 1 and a[1] == LAST and a[2] < 180)
    finally:
        await client.stop()


async def test_scheduled_market_data_fault_then_played_and_lifted(
    sim: SimGateway, scenario: Scenario
) -> None:
    faults = parse_scenario(
        {
            **SCENARIO,
            "faults": [
                {"at_s": 0.0, "kind": "market_data", "symbols": ["AAPL"], "seconds": 0.1},
                {
                    "at_s": 0.0,
                    "kind": "market_data",
                    "symbols": ["MSFT"],
                    "mode": "lag",
                    "lag_s": 2.0,
                },
            ],
        }
    ).faults
    await run_faults(sim, scenario, faults)
    assert set(sim.market_data_faults) == {MSFT}
    assert sim.market_data_faults[MSFT].lag_s == 2.0
    assert sim.lagging_quote(AAPL) == sim.exchange.quote(AAPL)  # live again


@pytest.mark.parametrize(
    ("fault", "named"),
    [
        ({"mode": "lag"}, "lag_s: required"),
        ({"mode": "freeze", "lag_s": 1.0}, "only with mode"),
        ({"symbols": ["NOPE"]}, r"faults\[0\]\.symbols: unknown symbol"),
    ],
)
def test_bad_market_data_fault_then_error_names_the_key(
    fault: dict[str, object], named: str
) -> None:
    with pytest.raises(ScenarioError, match=named):
        parse_scenario({**SCENARIO, "faults": [{"at_s": 0, "kind": "market_data", **fault}]})
