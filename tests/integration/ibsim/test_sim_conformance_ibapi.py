"""The official `ibapi` client against the simulated gateway, over TCP, on every wire: the text
protocol at 178, and the binary-id / protobuf wire at 203 (TWS 10.37), 215 (10.40) and 226 (10.50),
the version a current TWS negotiates with ibapi 10.50.2."""

from __future__ import annotations

import asyncio
import socket
import struct
from collections.abc import AsyncIterator

import pytest

from ibsim.gateway import SimGateway
from ibsim.scenario import Scenario
from ibsim.server import build_gateway
from tests.conftest import eventually
from tests.ibapi_harness import IbapiClient, connected, limit_order, market_order, stock

pytestmark = pytest.mark.integration

ACCOUNT = "DU000001"
WIRES = [178, 203, 215, 226]


@pytest.fixture(params=WIRES, ids=lambda v: f"v{v}")
async def sim(scenario: Scenario, request: pytest.FixtureRequest) -> AsyncIterator[SimGateway]:
    """The gateway offering at most `request.param`: ibapi (range 100..226) negotiates that."""
    async with build_gateway(
        scenario, host="127.0.0.1", port=0, server_version=request.param
    ) as gateway:
        yield gateway


async def test_connect_then_negotiated_version_is_the_gateways_max(sim: SimGateway) -> None:
    client = await connected(sim.port, 7)
    try:
        assert client.serverVersion() == sim.config.server_version
        assert sim.sessions[7].client_version == sim.config.server_version
    finally:
        await client.stop()


def _handshake(port: int, version_range: str) -> bytes:
    """Send `API\\0` and a version range on a raw socket; the gateway's answer (b"" if closed)."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        text = version_range.encode()
        sock.sendall(b"API\0" + struct.pack(">I", len(text)) + text)
        data = b""
        while chunk := sock.recv(4096):
            data += chunk
            if len(data) >= 4 and len(data) >= 4 + struct.unpack(">I", data[:4])[0]:
                break
        return data[4:]


@pytest.mark.parametrize(
    ("version_range", "answer"),
    [
        ("v100..190", 190),  # an older ibapi: its max, below ours
        ("v100..250", 226),  # a newer client: our max
        ("v201..226", 226),
        ("v157..178", 178),  # ib_async's range
        ("v178", 178),
    ],
)
async def test_handshake_then_highest_common_version(version_range: str, answer: int) -> None:
    async with build_gateway(Scenario(), host="127.0.0.1", port=0) as gateway:
        reply = await asyncio.to_thread(_handshake, gateway.port, version_range)

    assert reply.split(b"\0")[0] == str(answer).encode()


@pytest.mark.parametrize("version_range", ["v100..177", "v227..230"])
async def test_handshake_without_a_common_version_then_refused(version_range: str) -> None:
    async with build_gateway(Scenario(), host="127.0.0.1", port=0) as gateway:
        reply = await asyncio.to_thread(_handshake, gateway.port, version_range)

    assert reply == b""


async def test_gateway_capped_below_the_clients_min_then_refused() -> None:
    async with build_gateway(Scenario(), host="127.0.0.1", port=0, server_version=190) as gateway:
        reply = await asyncio.to_thread(_handshake, gateway.port, "v201..226")
        answered = await asyncio.to_thread(_handshake, gateway.port, "v100..226")

    assert reply == b""
    assert answered.split(b"\0")[0] == b"190"


async def gone(sim: SimGateway, client_id: int) -> None:
    """Wait until the gateway has seen the client's socket close.

    ibapi's reader thread holds the socket in a blocking recv with a 1 s timeout, so its FIN can
    take that long to leave; reconnecting sooner is refused with 326, as at a real gateway.
    """
    await eventually(lambda: client_id not in sim.sessions, f"client {client_id} gone", timeout_s=5)


async def test_connect_then_accounts_next_id_and_farm_notices(sim: SimGateway) -> None:
    client = await connected(sim.port, 7)
    try:
        assert client.named("managedAccounts") == [(ACCOUNT,)]
        assert client.named("nextValidId")[0][0] >= 1
        await client.wait_for("error", lambda a: a[2] == 2158)
        assert {2104, 2106, 2158} <= set(client.error_codes())
    finally:
        await client.stop()


async def test_positions_account_summary_and_pnl_then_all_answered(sim: SimGateway) -> None:
    client = await connected(sim.port, 7)
    try:
        client.reqPositions()
        await client.wait_for("positionEnd")
        positions = {args[1].symbol: float(args[2]) for args in client.named("position")}
        assert positions == {"AAPL": 1000.0, "ES": -2.0}

        client.reqAccountSummary(9, "All", "NetLiquidation,MaintMarginReq,Cushion")
        await client.wait_for("accountSummaryEnd")
        tags = {args[2]: float(args[3]) for args in client.named("accountSummary")}
        assert set(tags) == {"NetLiquidation", "MaintMarginReq", "Cushion"}
        assert tags["NetLiquidation"] > 0 and 0 < tags["Cushion"] <= 1

        client.reqPnL(11, ACCOUNT, "")
        client.reqPnLSingle(12, ACCOUNT, "", 265598)
        await client.wait_for("pnl", count=2, timeout=3)
        single = await client.wait_for("pnlSingle")
        # pnlSingle(reqId, pos, dailyPnL, unrealizedPnL, realizedPnL, value)
        assert float(single[0][1]) == 1000.0
        assert single[0][5] == pytest.approx(1000 * 190.0, rel=0.01)
    finally:
        await client.stop()


async def test_limit_and_market_orders_then_fills_and_position_moves(sim: SimGateway) -> None:
    client = await connected(sim.port, 7)
    try:
        first = client.named("nextValidId")[0][0]
        client.reqPositions()
        await client.wait_for("positionEnd")
        client.placeOrder(first, stock("AAPL"), market_order("BUY", 100))
        await client.wait_for("orderStatus", lambda a: a[0] == first and a[1] == "Filled")
        fills = await client.wait_for("execDetails", lambda a: a[2].orderId == first)
        assert float(fills[0][2].shares) == 100
        await client.wait_for("commissionAndFeesReport")
        await client.wait_for("position", lambda a: a[1].symbol == "AAPL" and float(a[2]) == 1100)

        # A marketable limit fills; a limit far from the market rests.
        client.placeOrder(first + 1, stock("AAPL"), limit_order("SELL", 50, 100.0))
        await client.wait_for("orderStatus", lambda a: a[0] == first + 1 and a[1] == "Filled")
        client.placeOrder(first + 2, stock("MSFT"), limit_order("BUY", 10, 1.0))
        status = await client.wait_for(
            "orderStatus", lambda a: a[0] == first + 2 and a[1] == "Submitted"
        )
        assert float(status[0][3]) == 10  # remaining
        opened = await client.wait_for("openOrder", lambda a: a[0] == first + 2)
        assert opened[0][1].symbol == "MSFT" and opened[0][2].lmtPrice == 1.0
    finally:
        await client.stop()


async def test_cancel_own_order_then_cancelled(sim: SimGateway) -> None:
    client = await connected(sim.port, 7)
    try:
        oid = client.named("nextValidId")[0][0]
        client.placeOrder(oid, stock("MSFT"), limit_order("BUY", 10, 1.0))
        await client.wait_for("orderStatus", lambda a: a[0] == oid and a[1] == "Submitted")
        client.cancel(oid)
        await client.wait_for("orderStatus", lambda a: a[0] == oid and a[1] == "Cancelled")
        assert not sim.exchange.working_orders()
    finally:
        await client.stop()


async def test_cancel_of_another_clients_order_then_10147_and_order_still_works(
    sim: SimGateway,
) -> None:
    bot = await connected(sim.port, 7)
    other = await connected(sim.port, 8)
    try:
        oid = bot.named("nextValidId")[0][0]
        bot.placeOrder(oid, stock("MSFT"), limit_order("BUY", 10, 1.0))
        await bot.wait_for("orderStatus", lambda a: a[0] == oid and a[1] == "Submitted")
        other.cancel(oid)
        await other.wait_for("error", lambda a: a[2] == 10147)
        assert len(sim.exchange.working_orders()) == 1
    finally:
        await bot.stop()
        await other.stop()


async def test_global_cancel_by_another_client_then_every_order_cancelled(sim: SimGateway) -> None:
    bot = await connected(sim.port, 7)
    guard = await connected(sim.port, 0)
    try:
        oid = bot.named("nextValidId")[0][0]
        for n in range(3):
            bot.placeOrder(oid + n, stock("MSFT"), limit_order("BUY", 10, 1.0 + n))
        await bot.wait_for("orderStatus", lambda a: a[1] == "Submitted", count=3)
        guard.global_cancel()
        await bot.wait_for("orderStatus", lambda a: a[1] == "Cancelled", count=3)
        assert sim.global_cancels == 1
        assert not sim.exchange.working_orders()
    finally:
        await bot.stop()
        await guard.stop()


async def test_master_client_then_sees_other_clients_orders_and_fills(sim: SimGateway) -> None:
    master = await connected(sim.port, 0)
    bot = await connected(sim.port, 7)
    try:
        oid = bot.named("nextValidId")[0][0]
        bot.placeOrder(oid, stock("MSFT"), limit_order("BUY", 10, 1.0))
        seen = await master.wait_for("openOrder", lambda a: a[1].symbol == "MSFT")
        assert seen[0][2].clientId == 7 and seen[0][2].permId > 0
        bot.placeOrder(oid + 1, stock("AAPL"), market_order("SELL", 5))
        await master.wait_for("execDetails", lambda a: a[2].clientId == 7)
        # A client that is not the master does not see the bot's orders.
        bystander = await connected(sim.port, 9)
        bystander.reqOpenOrders()
        await bystander.wait_for("openOrderEnd")
        assert bystander.named("openOrder") == []
        await bystander.stop()
    finally:
        await master.stop()
        await bot.stop()


async def test_orders_survive_disconnect_then_reported_on_reconnect(sim: SimGateway) -> None:
    bot = await connected(sim.port, 7)
    oid = bot.named("nextValidId")[0][0]
    bot.placeOrder(oid, stock("MSFT"), limit_order("BUY", 10, 1.0))
    await bot.wait_for("orderStatus", lambda a: a[0] == oid and a[1] == "Submitted")
    await bot.stop()
    await gone(sim, 7)
    assert len(sim.exchange.working_orders()) == 1
    again = await connected(sim.port, 7)
    try:
        reported = await again.wait_for("openOrder", lambda a: a[0] == oid)
        assert reported[0][1].symbol == "MSFT"
    finally:
        await again.stop()


async def test_duplicate_client_id_then_326_and_closed(sim: SimGateway) -> None:
    first = await connected(sim.port, 7)
    second = IbapiClient()
    try:
        await asyncio.wait_for(asyncio.to_thread(second.connect, "127.0.0.1", sim.port, 7), 5)
        second_thread = asyncio.ensure_future(asyncio.to_thread(second.run))
        await second.wait_for("error", lambda a: a[2] == 326)
        await asyncio.wait_for(second_thread, 5)
        assert not second.isConnected()
        assert first.isConnected()
    finally:
        await first.stop()
        second.disconnect()


async def test_message_flood_then_error_100_and_disconnect(sim: SimGateway) -> None:
    client = await connected(sim.port, 7)
    try:
        assert sim.pacing_violations == 0
        for _ in range(60):
            client.reqCurrentTime()
        await client.wait_for("error", lambda a: a[2] == 100)
        await client.wait_for("connectionClosed")
        assert sim.pacing_violations == 1
        assert 7 not in sim.sessions
    finally:
        await client.stop()


async def test_gateway_restart_then_client_reconnects_and_orders_remain(sim: SimGateway) -> None:
    bot = await connected(sim.port, 7)
    oid = bot.named("nextValidId")[0][0]
    bot.placeOrder(oid, stock("MSFT"), limit_order("BUY", 10, 1.0))
    await bot.wait_for("orderStatus", lambda a: a[0] == oid and a[1] == "Submitted")
    await sim.restart(0.3, next_order_id=1)
    await bot.wait_for("connectionClosed")
    await bot.stop()
    again = await connected(sim.port, 7)
    try:
        assert again.named("nextValidId")[0][0] == 1  # ids rolled back: ask, never assume
        await again.wait_for("openOrder", lambda a: a[0] == oid)
        assert len(sim.exchange.working_orders()) == 1
    finally:
        await again.stop()
