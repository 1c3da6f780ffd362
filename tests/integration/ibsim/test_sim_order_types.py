"""IB's order types, times in force, brackets, OCA groups and order lifecycle at the simulated
gateway, through the official `ibapi` client over TCP: stops and trails held (PreSubmitted) until
the price model reaches them, brackets released with their last child, OCA groups cancelling or
reducing their members, PendingSubmit / PendingCancel / ApiCancelled, a cancel racing a fill, and
error 10148 for a cancel of a filled order."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

import pytest
from ibapi.order import Order

from ibsim.gateway import SimGateway
from tests.conftest import eventually
from tests.guard_harness import sim_gateway
from tests.ibapi_harness import IbapiClient, connected, limit_order, market_order, stock

pytestmark = pytest.mark.integration

MASTER = 0
BOT = 7
MSFT = 272093  # 420.00, bid 419.99, ask 420.01, volatility 0: prices move only by jumps


@contextlib.asynccontextmanager
async def bot_on(sim: SimGateway, client_id: int = BOT) -> AsyncIterator[IbapiClient]:
    bot = await connected(sim.port, client_id)
    try:
        yield bot
    finally:
        await bot.stop()


def next_id(client: IbapiClient) -> int:
    return int(client.named("nextValidId")[-1][0])


def order(action: str, quantity: float, order_type: str, **fields: Any) -> Order:
    o = Order()
    o.action = action
    o.orderType = order_type
    o.totalQuantity = quantity
    o.tif = "DAY"
    for name, value in fields.items():
        setattr(o, name, value)
    return o


def statuses(client: IbapiClient, order_id: int) -> list[str]:
    """The distinct statuses an order went through, in order."""
    seen: list[str] = []
    for args in client.named("orderStatus"):
        if args[0] == order_id and (not seen or seen[-1] != args[1]):
            seen.append(str(args[1]))
    return seen


def last_open_order(client: IbapiClient, order_id: int) -> Order:
    return [a[2] for a in client.named("openOrder") if a[0] == order_id][-1]


def status_of(sim: SimGateway, client_id: int, order_id: int) -> str:
    found = sim.exchange.order_of_client(client_id, order_id)
    assert found is not None
    return found.status


async def has_status(client: IbapiClient, order_id: int, status: str) -> None:
    await client.wait_for("orderStatus", lambda a: a[0] == order_id and a[1] == status)


def errors_for(client: IbapiClient, order_id: int) -> list[int]:
    return [int(a[2]) for a in client.named("error") if a[0] == order_id]


# ------------------------------------------------------------------------------ stops and trails


async def test_sell_stop_then_held_presubmitted_until_the_price_falls_to_it(
    sim: SimGateway,
) -> None:
    async with bot_on(sim) as bot:
        oid = next_id(bot)
        bot.placeOrder(oid, stock("MSFT"), order("SELL", 10, "STP", auxPrice=400.0))
        await has_status(bot, oid, "PreSubmitted")
        sent = last_open_order(bot, oid)
        assert (sent.orderType, sent.auxPrice) == ("STP", 400.0)
        assert sim.exchange.fills() == []

        sim.jump_price(MSFT, -0.06)  # 394.80: through the stop

        await has_status(bot, oid, "Filled")
        assert statuses(bot, oid) == ["PreSubmitted", "Submitted", "Filled"]
        assert sim.exchange.fills()[-1].price == sim.exchange.quote(MSFT).bid


async def test_buy_stop_limit_triggered_then_works_as_its_limit(sim: SimGateway) -> None:
    async with bot_on(sim) as bot:
        oid = next_id(bot)
        bot.placeOrder(
            oid, stock("MSFT"), order("BUY", 10, "STP LMT", auxPrice=430.0, lmtPrice=431.0)
        )
        await has_status(bot, oid, "PreSubmitted")

        sim.jump_price(MSFT, 0.05)  # 441.00: stop reached, ask above the limit

        await has_status(bot, oid, "Submitted")
        assert sim.exchange.fills() == []
        sim.jump_price(MSFT, -0.03)  # 427.77: under the limit
        await has_status(bot, oid, "Filled")
        assert sim.exchange.fills()[-1].price <= 431.0


async def test_trailing_stop_amount_then_follows_the_price_up_and_fills_on_the_way_down(
    sim: SimGateway,
) -> None:
    async with bot_on(sim) as bot:
        oid = next_id(bot)
        bot.placeOrder(oid, stock("MSFT"), order("SELL", 10, "TRAIL", auxPrice=10.0))
        await has_status(bot, oid, "PreSubmitted")
        assert last_open_order(bot, oid).trailStopPrice == 410.0

        sim.jump_price(MSFT, 0.05)  # 441.00: the stop follows to 431.00
        assert sim.exchange.order_of_client(BOT, oid).trail_stop_price == 431.0  # type: ignore[union-attr]
        assert status_of(sim, BOT, oid) == "PreSubmitted"
        sim.jump_price(MSFT, -0.02)  # 432.18: above the stop, held
        assert status_of(sim, BOT, oid) == "PreSubmitted"
        sim.jump_price(MSFT, -0.01)  # 427.86: through 431.00

        await has_status(bot, oid, "Filled")


async def test_trailing_stop_percent_then_stop_a_percentage_away(sim: SimGateway) -> None:
    async with bot_on(sim) as bot:
        oid = next_id(bot)
        bot.placeOrder(oid, stock("MSFT"), order("SELL", 10, "TRAIL", trailingPercent=2.0))
        await has_status(bot, oid, "PreSubmitted")

        sent = last_open_order(bot, oid)
        assert (sent.trailingPercent, sent.trailStopPrice) == (2.0, 411.6)
        sim.jump_price(MSFT, -0.025)  # 409.50
        await has_status(bot, oid, "Filled")


async def test_trailing_stop_limit_then_limit_offset_from_the_stop_when_triggered(
    sim: SimGateway,
) -> None:
    async with bot_on(sim) as bot:
        oid = next_id(bot)
        trail = order("BUY", 10, "TRAIL LIMIT", auxPrice=5.0, lmtPriceOffset=1.0)
        bot.placeOrder(oid, stock("MSFT"), trail)
        await has_status(bot, oid, "PreSubmitted")
        assert last_open_order(bot, oid).trailStopPrice == 425.0

        sim.jump_price(MSFT, 0.02)  # 428.40: through 425, ask above 426

        await has_status(bot, oid, "Submitted")
        working = sim.exchange.order_of_client(BOT, oid)
        assert working is not None and working.lmt_price == 426.0
        assert sim.exchange.fills() == []


@pytest.mark.parametrize(
    ("fields", "reason"),
    [
        ({"orderType": "STP"}, "stop price"),
        ({"orderType": "TRAIL"}, "trailing amount or a trailing percent"),
        ({"orderType": "TRAIL", "auxPrice": 1.0, "trailingPercent": 1.0}, "trailing amount"),
        ({"orderType": "TRAIL LIMIT", "auxPrice": 1.0}, "lmtPriceOffset"),
        ({"orderType": "STP", "auxPrice": 400.0, "tif": "IOC"}, "IOC is for MKT and LMT"),
        ({"orderType": "MOC", "tif": "GTC"}, "DAY order"),
        ({"orderType": "LMT", "lmtPrice": 1.0, "tif": "GTD"}, "time in force"),
        ({"orderType": "MKT", "ocaGroup": "g", "ocaType": 4}, "OCA type"),
    ],
)
async def test_order_without_what_its_type_needs_then_201(
    sim: SimGateway, fields: dict[str, Any], reason: str
) -> None:
    async with bot_on(sim) as bot:
        oid = next_id(bot)
        o = order("SELL", 10, "MKT")
        for name, value in fields.items():
            setattr(o, name, value)
        bot.placeOrder(oid, stock("MSFT"), o)
        await bot.wait_for("error", lambda a: a[0] == oid and a[2] == 201)
        message = [str(a[3]) for a in bot.named("error") if a[0] == oid][-1]
        assert reason in message
        assert sim.exchange.working_orders() == []


# ------------------------------------------------------------------------------ brackets and OCA


async def test_bracket_then_held_until_the_last_child_transmits_and_children_wait_for_the_parent(
    sim: SimGateway,
) -> None:
    master = await connected(sim.port, MASTER)
    try:
        async with bot_on(sim) as bot:
            parent = next_id(bot)
            target, stop = parent + 1, parent + 2
            bot.placeOrder(
                parent, stock("MSFT"), order("BUY", 10, "LMT", lmtPrice=419.0, transmit=False)
            )
            bot.placeOrder(
                target,
                stock("MSFT"),
                order("SELL", 10, "LMT", lmtPrice=440.0, parentId=parent, transmit=False),
            )
            await has_status(bot, target, "PreSubmitted")
            # untransmitted: held at TWS, seen by the master client, nothing at the market
            await has_status(master, target, "PreSubmitted")
            assert "Submitted" not in statuses(bot, parent)
            assert last_open_order(master, target).parentId == parent

            bot.placeOrder(
                stop,
                stock("MSFT"),
                order("SELL", 10, "STP", auxPrice=400.0, parentId=parent, transmit=True),
            )
            await has_status(bot, parent, "Submitted")
            assert status_of(sim, BOT, target) == "PreSubmitted"  # waits for the parent's fill
            assert status_of(sim, BOT, stop) == "PreSubmitted"

            sim.jump_price(MSFT, -0.005)  # 417.90: the parent buys
            await has_status(bot, target, "Submitted")
            assert status_of(sim, BOT, stop) == "PreSubmitted"  # a stop, not yet triggered

            sim.jump_price(MSFT, 0.06)  # the target sells; the stop goes with it
            await has_status(bot, stop, "Cancelled")
            assert statuses(bot, target)[-1] == "Filled"
            assert sim.exchange.position("DU000001", MSFT).position == 0
            assert sim.exchange.working_orders() == []
    finally:
        await master.stop()


async def test_parent_cancelled_then_its_children_go_with_it(sim: SimGateway) -> None:
    async with bot_on(sim) as bot:
        parent = next_id(bot)
        bot.placeOrder(
            parent, stock("MSFT"), order("BUY", 10, "LMT", lmtPrice=419.0, transmit=False)
        )
        bot.placeOrder(
            parent + 1,
            stock("MSFT"),
            order("SELL", 10, "STP", auxPrice=400.0, parentId=parent, transmit=True),
        )
        await has_status(bot, parent, "Submitted")

        bot.cancel(parent)

        await has_status(bot, parent + 1, "Cancelled")
        assert statuses(bot, parent)[-2:] == ["PendingCancel", "Cancelled"]
        assert sim.exchange.working_orders() == []


async def test_untransmitted_order_cancelled_then_api_cancelled(sim: SimGateway) -> None:
    async with bot_on(sim) as bot:
        oid = next_id(bot)
        bot.placeOrder(oid, stock("MSFT"), order("BUY", 10, "LMT", lmtPrice=419.0, transmit=False))
        await has_status(bot, oid, "PreSubmitted")

        bot.cancel(oid)

        await has_status(bot, oid, "ApiCancelled")
        assert 202 in errors_for(bot, oid)


async def test_parent_filled_in_part_then_cancelled_then_children_cover_the_filled_part() -> None:
    async with (
        sim_gateway(gateway={"partial_fill_quantity": 4}) as sim,
        bot_on(sim) as bot,
    ):
        parent = next_id(bot)
        bot.placeOrder(
            parent, stock("MSFT"), order("BUY", 10, "LMT", lmtPrice=419.0, transmit=False)
        )
        bot.placeOrder(
            parent + 1,
            stock("MSFT"),
            order("SELL", 10, "STP", auxPrice=400.0, parentId=parent, transmit=True),
        )
        await has_status(bot, parent, "Submitted")
        sim.jump_price(MSFT, -0.005)  # one pass: 4 of 10 bought
        await bot.wait_for("orderStatus", lambda a: a[0] == parent and a[2] == 4)

        bot.cancel(parent)

        await has_status(bot, parent, "Cancelled")
        stop = sim.exchange.order_of_client(BOT, parent + 1)
        assert stop is not None and stop.is_working and stop.total_quantity == 4


async def test_oca_type_1_then_a_fill_cancels_the_others(sim: SimGateway) -> None:
    async with bot_on(sim) as bot:
        a = next_id(bot)
        group = {"ocaGroup": "exit-1", "ocaType": 1}
        bot.placeOrder(a, stock("MSFT"), order("SELL", 10, "LMT", lmtPrice=425.0, **group))
        bot.placeOrder(a + 1, stock("MSFT"), order("SELL", 10, "STP", auxPrice=400.0, **group))
        await has_status(bot, a + 1, "PreSubmitted")
        sent = last_open_order(bot, a)
        assert (sent.ocaGroup, sent.ocaType) == ("exit-1", 1)

        sim.jump_price(MSFT, 0.02)

        await has_status(bot, a + 1, "Cancelled")
        assert statuses(bot, a)[-1] == "Filled"
        assert sim.exchange.position("DU000001", MSFT).position == -10


async def test_oca_type_2_then_a_partial_fill_reduces_the_others() -> None:
    async with (
        sim_gateway(gateway={"partial_fill_quantity": 4}) as sim,
        bot_on(sim) as bot,
    ):
        a = next_id(bot)
        group = {"ocaGroup": "exit-2", "ocaType": 2}
        bot.placeOrder(a, stock("MSFT"), order("SELL", 10, "LMT", lmtPrice=425.0, **group))
        bot.placeOrder(a + 1, stock("MSFT"), order("SELL", 10, "LMT", lmtPrice=500.0, **group))
        await has_status(bot, a + 1, "Submitted")

        sim.jump_price(MSFT, 0.015)  # 426.30: the first sells 4

        await bot.wait_for("openOrder", lambda x: x[0] == a + 1 and x[2].totalQuantity == 6)
        other = sim.exchange.order_of_client(BOT, a + 1)
        assert other is not None and other.total_quantity == 6 and other.is_working


@pytest.mark.parametrize(("oca_type", "sold"), [(1, 10), (3, 20)])
async def test_oca_members_marketable_at_once_then_block_or_overfill(
    sim: SimGateway, oca_type: int, sold: int
) -> None:
    async with bot_on(sim) as bot:
        a = next_id(bot)
        group = {"ocaGroup": f"g{oca_type}", "ocaType": oca_type}
        bot.placeOrder(a, stock("MSFT"), order("SELL", 10, "LMT", lmtPrice=425.0, **group))
        bot.placeOrder(a + 1, stock("MSFT"), order("SELL", 10, "LMT", lmtPrice=426.0, **group))
        await has_status(bot, a + 1, "Submitted")

        sim.jump_price(MSFT, 0.02)  # both marketable in one pass

        await eventually(lambda: not sim.exchange.working_orders())
        # with block (1) one fills and the other is cancelled; without block (3) both fill
        assert sim.exchange.position("DU000001", MSFT).position == -sold


# ------------------------------------------------------------------------------ times in force


async def test_ioc_not_marketable_then_cancelled_without_resting(sim: SimGateway) -> None:
    async with bot_on(sim) as bot:
        oid = next_id(bot)
        bot.placeOrder(oid, stock("MSFT"), order("BUY", 10, "LMT", lmtPrice=410.0, tif="IOC"))
        await has_status(bot, oid, "Cancelled")
        assert sim.exchange.working_orders() == []
        assert sim.exchange.fills() == []


async def test_ioc_partly_filled_then_the_rest_cancelled() -> None:
    async with (
        sim_gateway(gateway={"partial_fill_quantity": 4}) as sim,
        bot_on(sim) as bot,
    ):
        oid = next_id(bot)
        bot.placeOrder(oid, stock("MSFT"), order("BUY", 10, "MKT", tif="IOC"))
        await has_status(bot, oid, "Cancelled")
        done = sim.exchange.order_of_client(BOT, oid)
        assert done is not None and done.filled == 4


async def test_day_orders_expire_and_gtc_orders_keep_working(sim: SimGateway) -> None:
    async with bot_on(sim) as bot:
        day = next_id(bot)
        bot.placeOrder(day, stock("MSFT"), order("BUY", 10, "LMT", lmtPrice=400.0))
        bot.placeOrder(day + 1, stock("MSFT"), order("BUY", 10, "LMT", lmtPrice=400.0, tif="GTC"))
        await has_status(bot, day + 1, "Submitted")
        assert last_open_order(bot, day + 1).tif == "GTC"

        sim.expire_day_orders()

        await has_status(bot, day, "Cancelled")
        assert status_of(sim, BOT, day + 1) == "Submitted"


async def test_opg_and_moc_then_wait_for_their_auction(sim: SimGateway) -> None:
    async with bot_on(sim) as bot:
        opg = next_id(bot)
        bot.placeOrder(opg, stock("MSFT"), order("BUY", 10, "MKT", tif="OPG"))
        bot.placeOrder(opg + 1, stock("MSFT"), order("SELL", 10, "MOC"))
        bot.placeOrder(opg + 2, stock("MSFT"), order("SELL", 10, "LOC", lmtPrice=450.0))
        await has_status(bot, opg + 2, "Submitted")
        assert sim.exchange.fills() == []

        sim.opening_auction()
        await has_status(bot, opg, "Filled")
        assert status_of(sim, BOT, opg + 1) == "Submitted"

        sim.closing_auction()
        await has_status(bot, opg + 2, "Cancelled")  # the close is under the LOC's limit
        await has_status(bot, opg + 1, "Filled")
        assert sim.exchange.fills()[-1].price == sim.exchange.quote(MSFT).last


async def test_outside_rth_then_reported_back(sim: SimGateway) -> None:
    async with bot_on(sim) as bot:
        oid = next_id(bot)
        bot.placeOrder(oid, stock("MSFT"), order("BUY", 1, "LMT", lmtPrice=400.0, outsideRth=True))
        await has_status(bot, oid, "Submitted")
        assert last_open_order(bot, oid).outsideRth is True


# ------------------------------------------------------------------------------ lifecycle


async def test_order_before_ib_confirms_it_then_pending_submit_and_a_cancel_api_cancels() -> None:
    async with (
        sim_gateway(gateway={"fill_latency_s": 30.0}) as sim,
        bot_on(sim) as bot,
    ):
        oid = next_id(bot)
        bot.placeOrder(oid, stock("MSFT"), limit_order("BUY", 10, 400.0))
        await has_status(bot, oid, "PendingSubmit")

        bot.cancel(oid)

        await has_status(bot, oid, "ApiCancelled")
        assert sim.exchange.working_orders() == []


async def test_pending_submit_then_submitted_after_the_latency() -> None:
    async with (
        sim_gateway(gateway={"fill_latency_s": 0.2}) as sim,
        bot_on(sim) as bot,
    ):
        oid = next_id(bot)
        bot.placeOrder(oid, stock("MSFT"), limit_order("BUY", 10, 400.0))
        await has_status(bot, oid, "Submitted")
        assert statuses(bot, oid) == ["PendingSubmit", "PreSubmitted", "Submitted"]


async def test_cancel_racing_a_fill_then_partly_filled_and_cancelled() -> None:
    async with (
        sim_gateway(gateway={"cancel_latency_s": 30.0, "partial_fill_quantity": 4}) as sim,
        bot_on(sim) as bot,
    ):
        oid = next_id(bot)
        bot.placeOrder(oid, stock("MSFT"), limit_order("SELL", 10, 425.0))
        await has_status(bot, oid, "Submitted")
        bot.cancel(oid)
        await has_status(bot, oid, "PendingCancel")

        sim.jump_price(MSFT, 0.02)  # the market reaches it before the cancel does
        await bot.wait_for("orderStatus", lambda a: a[0] == oid and a[2] == 4)
        perm_ids = sim.exchange.pending_cancels()
        sim._finish_cancels(perm_ids)  # the cancel lands

        await has_status(bot, oid, "Cancelled")
        done = sim.exchange.order_of_client(BOT, oid)
        assert done is not None and (done.status, done.filled) == ("Cancelled", 4)


async def test_cancel_racing_a_full_fill_then_filled_and_no_cancel() -> None:
    async with (
        sim_gateway(gateway={"cancel_latency_s": 30.0}) as sim,
        bot_on(sim) as bot,
    ):
        oid = next_id(bot)
        bot.placeOrder(oid, stock("MSFT"), limit_order("SELL", 10, 425.0))
        await has_status(bot, oid, "Submitted")
        bot.cancel(oid)
        await has_status(bot, oid, "PendingCancel")

        sim.jump_price(MSFT, 0.02)
        await has_status(bot, oid, "Filled")
        sim._finish_cancels([o.perm_id for o in sim.exchange.orders()])

        assert statuses(bot, oid) == ["PreSubmitted", "Submitted", "PendingCancel", "Filled"]
        assert 202 not in errors_for(bot, oid)


async def test_cancel_of_a_filled_order_then_10148(sim: SimGateway) -> None:
    async with bot_on(sim) as bot:
        oid = next_id(bot)
        bot.placeOrder(oid, stock("MSFT"), market_order("BUY", 10))
        await has_status(bot, oid, "Filled")

        bot.cancel(oid)

        await bot.wait_for("error", lambda a: a[0] == oid and a[2] == 10148)
        assert errors_for(bot, oid) == [10148]


async def test_modify_a_working_stop_then_new_stop_price_applies(sim: SimGateway) -> None:
    async with bot_on(sim) as bot:
        oid = next_id(bot)
        bot.placeOrder(oid, stock("MSFT"), order("SELL", 10, "STP", auxPrice=400.0))
        await has_status(bot, oid, "PreSubmitted")

        bot.placeOrder(oid, stock("MSFT"), order("SELL", 10, "STP", auxPrice=415.0))
        await bot.wait_for("openOrder", lambda a: a[0] == oid and a[2].auxPrice == 415.0)
        sim.jump_price(MSFT, -0.02)  # 411.60: through 415, not through 400

        await has_status(bot, oid, "Filled")
        assert errors_for(bot, oid) == []
