"""The simulated gateway's faults, scenario files and `guardd sim` program."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from ib_async import IB, MarketOrder, Stock

from guardd.sim.gateway import SimGateway
from guardd.sim.scenario import Scenario, ScenarioError, load_scenario, parse_scenario, run_faults
from tests.conftest import SCENARIO
from tests.ibapi_harness import IbapiClient, limit_order, market_order, stock

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parent.parent


async def connected(sim: SimGateway, client_id: int) -> IbapiClient:
    client = IbapiClient()
    await client.start(sim.port, client_id)
    return client


async def test_connectivity_lost_then_1100_and_1102_and_socket_kept(sim: SimGateway) -> None:
    client = await connected(sim, 3)
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
    client = await connected(sim, 3)
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
    client = await connected(sim, 3)
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
    client = await connected(sim, 3)
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
    client = await connected(sim, 3)
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
        ({"faults": [{"at_s": 1, "kind": "price_jump", "symbol": "AAPL"}]}, "fraction"),
        ({"accounts": []}, "accounts"),
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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


async def test_guardd_sim_program_then_ib_async_trades_against_it() -> None:
    port = _free_port()
    scenario = ROOT / "configs" / "scenarios" / "calm.toml"
    proc = await asyncio.create_subprocess_exec(
        *[sys.executable, "-m", "guardd.sim", "--port", str(port), "--scenario", str(scenario)],
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    ib = IB()
    try:
        for _ in range(100):
            try:
                await ib.connectAsync("127.0.0.1", port, clientId=21, timeout=2)
                break
            except (ConnectionRefusedError, OSError, TimeoutError):
                await asyncio.sleep(0.1)
        assert ib.isConnected()
        [aapl] = await ib.qualifyContractsAsync(Stock("AAPL", "SMART", "USD"))
        trade = ib.placeOrder(aapl, MarketOrder("BUY", 10))
        for _ in range(100):
            if trade.isDone():
                break
            await asyncio.sleep(0.05)
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
        [sys.executable, "-m", "guardd.sim", "--port", "0", "--scenario", str(bad)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 78
    assert "gateway.pacing_limit" in result.stderr


async def test_what_if_order_then_refused_and_nothing_placed(sim: SimGateway) -> None:
    client = await connected(sim, 3)
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
