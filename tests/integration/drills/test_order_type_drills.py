"""Drills with IB's order world: a kill while a bot holds brackets (transmitted, held and
untransmitted children), OCA groups and stops, a kill while a stop triggers, and a kill whose
cancels race the bot's fills.

The real guard runs against the simulated gateway over TCP; the bot is the official ibapi client.
The end state is read by an independent ibapi client (reqPositions, reqAllOpenOrders), and after
the kill the price is moved through every stop and target the bot had, to prove none was left.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from ibapi.order import Order

from guardd.core.events import OrderId
from ibsim.gateway import SimGateway
from tests.conftest import eventually
from tests.drill_helpers import client, gateway_says_flat, kill_command, running
from tests.guard_harness import (
    GUARD_CLIENT_ID,
    MSFT,
    guard_config,
    sim_gateway,
    starting_positions,
    zero_crossings,
)
from tests.ibapi_harness import IbapiClient, market_order, stock

pytestmark = [pytest.mark.integration, pytest.mark.both_wires, pytest.mark.slow]

BOT = 7
FLATTEN = (
    '[kill]\nmode = "flatten"\n\n[flatten]\nverify_timeout_s = 20.0\nposition_settle_s = 2.0\n'
)
NO_POSITIONS: list[dict[str, Any]] = []


def order(action: str, quantity: float, order_type: str, **fields: Any) -> Order:
    o = Order()
    o.action = action
    o.orderType = order_type
    o.totalQuantity = quantity
    o.tif = "GTC"
    for name, value in fields.items():
        setattr(o, name, value)
    return o


def first_id(bot: IbapiClient) -> int:
    return int(bot.named("nextValidId")[0][0])


def bracket(bot: IbapiClient, parent: int, entry: Order, *, transmit: bool = True) -> None:
    """A parent with a take-profit and a stop-loss child; the last child transmits the three
    unless `transmit` is False (then all three stay held, untransmitted)."""
    entry.transmit = False
    bot.placeOrder(parent, stock("MSFT"), entry)
    bot.placeOrder(
        parent + 1,
        stock("MSFT"),
        order("SELL", 100, "LMT", lmtPrice=450.0, parentId=parent, transmit=False),
    )
    bot.placeOrder(
        parent + 2,
        stock("MSFT"),
        order("SELL", 100, "STP", auxPrice=400.0, parentId=parent, transmit=transmit),
    )


def fills_of(sim: SimGateway, client_id: int, since: int = 0) -> list[float]:
    return [f.shares for f in sim.exchange.fills()[since:] if f.client_id == client_id]


async def test_kill_with_working_brackets_and_oca_groups_then_no_stop_or_target_left(
    tmp_path: Path,
) -> None:
    async with sim_gateway(positions=NO_POSITIONS) as sim:
        cfg = guard_config(sim.port, tmp_path, FLATTEN)
        async with running(cfg) as guard, client(sim.port, BOT) as bot:
            # Arrange: a filled bracket (its target and stop working), a bracket waiting for its
            # entry (children held), an untransmitted bracket, an OCA pair and a trailing stop
            oid = first_id(bot)
            bracket(bot, oid, order("BUY", 100, "MKT"))
            bracket(bot, oid + 3, order("BUY", 100, "LMT", lmtPrice=410.0))
            bracket(bot, oid + 6, order("BUY", 100, "LMT", lmtPrice=405.0), transmit=False)
            oca = {"ocaGroup": "breakout", "ocaType": 1}
            bot.placeOrder(oid + 9, stock("MSFT"), order("BUY", 50, "STP", auxPrice=430.0, **oca))
            bot.placeOrder(oid + 10, stock("MSFT"), order("SELL", 50, "STP", auxPrice=410.0, **oca))
            bot.placeOrder(oid + 11, stock("MSFT"), order("SELL", 100, "TRAIL", auxPrice=5.0))
            await eventually(
                lambda: guard.book.working_order_count == 11,
                "the guard sees 11 orders",
                timeout_s=10,
            )
            book = guard.book
            seen = {o.order_id: o for o in book.orders.values() if o.client_id == BOT}
            assert seen[OrderId(oid + 2)].parent_id == oid
            assert seen[OrderId(oid + 2)].aux_price == 400.0
            assert seen[OrderId(oid + 7)].status == "PreSubmitted"  # untransmitted child
            assert seen[OrderId(oid + 9)].oca_group == "breakout"
            assert seen[OrderId(oid + 11)].order_type == "TRAIL"
            assert starting_positions(sim) == {MSFT: 100.0}

            # Act
            await guard.handle(kill_command("flatten"))
            await eventually(
                lambda: guard.executor.last_flat_confirmed is not None,
                "flat confirmed",
                timeout_s=15,
            )

            # Assert: flat, nothing working; every stop and target the bot had stays silent
            positions, working = await gateway_says_flat(sim.port)
            assert (positions, working) == ({}, 0)
            fills = len(sim.exchange.fills())
            for move in (-0.08, 0.16, -0.08):
                sim.jump_price(MSFT, move)
            sim.step_market()
            assert sim.exchange.fills()[fills:] == []
            assert starting_positions(sim) == {}
            assert fills_of(sim, GUARD_CLIENT_ID) == [100.0]


async def test_kill_while_a_stop_triggers_then_flat_and_never_crossed(tmp_path: Path) -> None:
    async with sim_gateway(positions=NO_POSITIONS) as sim:
        cfg = guard_config(sim.port, tmp_path, FLATTEN)
        async with running(cfg) as guard, client(sim.port, BOT) as bot:
            # Arrange: the bot is long 200 and has a buy stop (a breakout entry) just above
            oid = first_id(bot)
            bot.placeOrder(oid, stock("MSFT"), market_order("BUY", 200))
            bot.placeOrder(oid + 1, stock("MSFT"), order("BUY", 300, "STP", auxPrice=421.0))
            await eventually(
                lambda: guard.book.working_order_count == 1, "the guard sees the stop", timeout_s=10
            )
            start = starting_positions(sim)

            # Act: the stop triggers and fills while the kill is being handled
            asyncio.get_running_loop().call_soon(sim.jump_price, MSFT, 0.01)
            await guard.handle(kill_command("flatten"))
            await eventually(
                lambda: (
                    guard.executor.last_flat_confirmed is not None and not starting_positions(sim)
                ),
                "flat confirmed",
                timeout_s=15,
            )

        # Assert
        assert fills_of(sim, BOT)[-1] == 300.0, "the stop filled during the kill"
        positions, working = await gateway_says_flat(sim.port)
        assert (positions, working) == ({}, 0)
        assert zero_crossings(sim, start, since=1) == [], "the guard crossed zero"
        assert sum(fills_of(sim, GUARD_CLIENT_ID)) == 500.0


async def test_kill_whose_cancels_race_the_bots_fills_then_flat_without_overfill(
    tmp_path: Path,
) -> None:
    # cancels land 1 s after they are asked for; the market fills 100 per pass meanwhile
    gateway = {"cancel_latency_s": 1.0, "partial_fill_quantity": 100}
    async with sim_gateway(gateway=gateway, positions=NO_POSITIONS) as sim:
        cfg = guard_config(sim.port, tmp_path, FLATTEN)
        async with running(cfg) as guard, client(sim.port, BOT) as bot:
            # Arrange: long 600 (bought in six passes), and a resting sell of 400 above
            oid = first_id(bot)
            bot.placeOrder(oid, stock("MSFT"), market_order("BUY", 600))
            await eventually(lambda: starting_positions(sim) == {MSFT: 600.0}, "long", timeout_s=10)
            bot.placeOrder(oid + 1, stock("MSFT"), order("SELL", 400, "LMT", lmtPrice=425.0))
            await eventually(
                lambda: guard.book.working_order_count == 1, "the guard sees the sell", timeout_s=10
            )
            start = starting_positions(sim)
            since = len(sim.exchange.fills())

            # Act: the kill's cancel is pending when the market reaches the bot's sell
            kill = asyncio.create_task(guard.handle(kill_command("flatten")))
            await eventually(lambda: sim.exchange.pending_cancels() != [], "pending", timeout_s=10)
            sim.jump_price(MSFT, 0.02)
            await kill
            await eventually(
                lambda: (
                    guard.executor.last_flat_confirmed is not None and not starting_positions(sim)
                ),
                "flat confirmed",
                timeout_s=20,
            )

        # Assert: the bot's sell filled (in part) under the pending cancel; the guard sold the
        # rest and not a share more
        bot_sold = sum(fills_of(sim, BOT, since))
        assert bot_sold > 0
        positions, working = await gateway_says_flat(sim.port)
        assert (positions, working) == ({}, 0)
        assert zero_crossings(sim, start, since=since) == [], "the guard crossed zero"
        assert sum(fills_of(sim, GUARD_CLIENT_ID, since)) == 600.0 - bot_sold
