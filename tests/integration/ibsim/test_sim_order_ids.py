"""IB's order-id rule and the Read-only API switch at the simulated gateway, through the official
`ibapi` client over TCP: each client id has its own id sequence, a new id not above what a client
has seen is refused with 103 (for the Master API client: above every id reported to it), and
under Read-only API orders and cancels are refused with 321."""

from __future__ import annotations

import asyncio

import pytest

from ibsim.gateway import SimGateway
from ibsim.scenario import Scenario, parse_scenario, run_faults
from tests.conftest import SCENARIO, eventually
from tests.ibapi_harness import IbapiClient, connected, limit_order, market_order, stock

pytestmark = pytest.mark.integration

MASTER = 0  # the test scenario's Master API client id


def next_id(client: IbapiClient) -> int:
    return int(client.named("nextValidId")[-1][0])


async def ask_ids(client: IbapiClient) -> int:
    seen = len(client.named("nextValidId"))
    client.reqIds(-1)
    await client.wait_for("nextValidId", count=seen + 1)
    return next_id(client)


def errors_for(client: IbapiClient, order_id: int) -> list[tuple[int, str]]:
    return [(int(a[2]), str(a[3])) for a in client.named("error") if a[0] == order_id]


async def test_new_id_not_above_the_clients_ids_then_103_and_no_order(sim: SimGateway) -> None:
    # Arrange: client 7 has a working order under id first + 5
    bot = await connected(sim.port, 7)
    try:
        first = next_id(bot)
        high = first + 5
        bot.placeOrder(high, stock("MSFT"), limit_order("BUY", 10, 1.0))
        await bot.wait_for("orderStatus", lambda a: a[0] == high and a[1] == "Submitted")

        # Act: a new order under an id below it (never used)
        bot.placeOrder(first, stock("MSFT"), limit_order("BUY", 10, 1.0))
        await bot.wait_for("error", lambda a: a[0] == first and a[2] == 103)

        # Assert
        assert errors_for(bot, first) == [(103, "Duplicate order id")]
        assert [o.order_id for o in sim.exchange.working_orders()] == [high]
        assert await ask_ids(bot) == high + 1
    finally:
        await bot.stop()


async def test_modify_of_own_working_order_then_still_a_modification(sim: SimGateway) -> None:
    bot = await connected(sim.port, 7)
    try:
        oid = next_id(bot)
        bot.placeOrder(oid, stock("MSFT"), limit_order("BUY", 10, 1.0))
        await bot.wait_for("orderStatus", lambda a: a[0] == oid and a[1] == "Submitted")
        bot.placeOrder(oid + 1, stock("MSFT"), limit_order("BUY", 10, 1.0))
        await bot.wait_for("orderStatus", lambda a: a[0] == oid + 1)

        # Act: re-send the older (lower) id with a new price
        bot.placeOrder(oid, stock("MSFT"), limit_order("BUY", 10, 1.5))
        await bot.wait_for("openOrder", lambda a: a[0] == oid and a[2].lmtPrice == 1.5)

        # Assert
        assert errors_for(bot, oid) == []
        prices = sorted(o.lmt_price or 0.0 for o in sim.exchange.working_orders())
        assert prices == [1.0, 1.5]
    finally:
        await bot.stop()


async def test_each_client_has_its_own_id_sequence(sim: SimGateway) -> None:
    # Arrange: client 7 uses id 40
    bot = await connected(sim.port, 7)
    try:
        bot.placeOrder(40, stock("MSFT"), limit_order("BUY", 10, 1.0))
        await bot.wait_for("orderStatus", lambda a: a[0] == 40)
        # Act: another (non-master) client connects
        other = await connected(sim.port, 8)
        try:
            # Assert: its sequence is its own; its id 1 is a new order, not a duplicate
            assert next_id(other) == 1
            other.placeOrder(1, stock("MSFT"), limit_order("BUY", 5, 1.0))
            await other.wait_for("orderStatus", lambda a: a[0] == 1 and a[1] == "Submitted")
            assert 103 not in other.error_codes()
            assert await ask_ids(bot) == 41
        finally:
            await other.stop()
    finally:
        await bot.stop()


async def test_master_below_an_id_reported_to_it_then_103_and_reqids_gives_above(
    sim: SimGateway,
) -> None:
    # Arrange: the master is told of a bot's order under id 500
    master = await connected(sim.port, MASTER)
    bot = await connected(sim.port, 7)
    try:
        stale = next_id(master)
        bot.placeOrder(500, stock("MSFT"), limit_order("BUY", 10, 1.0))
        await master.wait_for("orderStatus", lambda a: a[0] == 500 and a[1] == "Submitted")

        # Act: the master goes by its first nextValidId
        master.placeOrder(stale, stock("MSFT"), limit_order("BUY", 1, 1.0))
        await master.wait_for("error", lambda a: a[0] == stale and a[2] == 103)

        # Assert: refused; reqIds answers above every id it was told of, and that id works
        assert [o.order_id for o in sim.exchange.working_orders()] == [500]
        fresh = await ask_ids(master)
        assert fresh == 501
        master.placeOrder(fresh, stock("MSFT"), limit_order("BUY", 1, 1.0))
        await master.wait_for("orderStatus", lambda a: a[0] == fresh and a[1] == "Submitted")
    finally:
        await bot.stop()
        await master.stop()


async def test_master_connects_after_a_bot_then_nextvalidid_stale_and_reported_ids_count(
    sim: SimGateway,
) -> None:
    # Arrange: a bot's working order under id 300, before the master connects
    bot = await connected(sim.port, 7)
    try:
        bot.placeOrder(300, stock("MSFT"), limit_order("BUY", 10, 1.0))
        await bot.wait_for("orderStatus", lambda a: a[0] == 300)
        # Act
        master = await connected(sim.port, MASTER)
        try:
            await master.wait_for("openOrder", lambda a: a[0] == 300)
            # Assert: nextValidId came before the report; the report raised the floor
            assert next_id(master) == 1
            assert await ask_ids(master) == 301
        finally:
            await master.stop()
    finally:
        await bot.stop()


async def test_read_only_api_then_orders_and_cancels_refused_with_321(sim: SimGateway) -> None:
    # Arrange: a working order, then TWS's Read-Only API switch on
    bot = await connected(sim.port, 7)
    try:
        oid = next_id(bot)
        bot.placeOrder(oid, stock("MSFT"), limit_order("BUY", 10, 1.0))
        await bot.wait_for("orderStatus", lambda a: a[0] == oid and a[1] == "Submitted")
        sim.set_read_only(True)

        # Act
        bot.placeOrder(oid + 1, stock("AAPL"), market_order("SELL", 10))
        bot.cancel(oid)
        bot.global_cancel()
        await bot.wait_for("error", lambda a: a[2] == 321, count=3)

        # Assert: all three refused, nothing traded or cancelled
        refused = [(a[0], str(a[3])) for a in bot.named("error") if a[2] == 321]
        assert [r[0] for r in refused] == [oid + 1, oid, -1]
        assert all("Read-Only mode" in text for _, text in refused)
        assert [o.order_id for o in sim.exchange.working_orders()] == [oid]
        assert sim.exchange.fills() == [] and sim.global_cancels == 0

        # Act: the switch off again
        sim.set_read_only(False)
        bot.cancel(oid)
        await bot.wait_for("orderStatus", lambda a: a[0] == oid and a[1] == "Cancelled")
        assert sim.exchange.working_orders() == []
    finally:
        await bot.stop()


async def test_read_only_fault_in_a_scenario_then_on_for_its_seconds(
    sim: SimGateway, scenario: Scenario
) -> None:
    # Arrange
    faults = parse_scenario(
        {**SCENARIO, "faults": [{"at_s": 0, "kind": "read_only", "seconds": 0.2}]}
    ).faults
    seen: list[bool] = []

    # Act
    playing = asyncio.ensure_future(run_faults(sim, scenario, faults))
    await eventually(lambda: sim.read_only)
    seen.append(sim.read_only)
    await playing

    # Assert: on while it lasted, off after
    assert seen == [True] and sim.read_only is False
