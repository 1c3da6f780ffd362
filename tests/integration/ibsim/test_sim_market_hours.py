"""Market hours, margin and order limits at the simulated gateway, through the official `ibapi`
client over TCP: orders outside regular hours without outsideRth wait PreSubmitted (399), a
stock's market order ignores outsideRth (2109), a market order on a closed market is refused
(201 "Exchange is closed."), the simulated clock jumps to the open and releases what waited;
the margin check (201 with IB's margin text), 20 working orders per side per contract, the
contract's hours in contractDetails, and the market-data errors 354 / 10167 / 10197 / 101 / 2110.
"""

from __future__ import annotations

import contextlib
import datetime as dt
from collections.abc import AsyncIterator
from typing import Any

import pytest
from ibapi.contract import Contract

from ibsim.gateway import SimGateway
from ibsim.hours import US_EQUITY, Calendar
from ibsim.scenario import ScenarioError, parse_scenario, run_faults
from tests.conftest import SCENARIO, eventually
from tests.guard_harness import sim_gateway
from tests.ibapi_harness import IbapiClient, connected, limit_order, market_order, stock

pytestmark = pytest.mark.integration

BOT = 7
NEW_YORK = dt.timezone(dt.timedelta(hours=-5))  # EST: December
# Tuesday 1 December 2026 in New York
AT_03_00 = dt.datetime(2026, 12, 1, 3, 0, tzinfo=NEW_YORK)
AT_07_00 = dt.datetime(2026, 12, 1, 7, 0, tzinfo=NEW_YORK)
AT_OPEN = dt.datetime(2026, 12, 1, 9, 30, tzinfo=NEW_YORK)
SATURDAY = dt.datetime(2026, 12, 5, 12, 0, tzinfo=NEW_YORK)


@contextlib.asynccontextmanager
async def gateway_at(when: dt.datetime, **changes: Any) -> AsyncIterator[SimGateway]:
    instruments = [
        {**i, "hours": "cme_equity_futures" if i.get("sec_type") == "FUT" else "us_equity"}
        for i in SCENARIO["instruments"]
    ]
    gateway = {"start_time": when.isoformat(), **changes.pop("gateway", {})}
    async with sim_gateway(instruments=instruments, gateway=gateway, **changes) as sim:
        yield sim


@contextlib.asynccontextmanager
async def bot_on(sim: SimGateway, client_id: int = BOT) -> AsyncIterator[IbapiClient]:
    bot = await connected(sim.port, client_id)
    try:
        yield bot
    finally:
        await bot.stop()


def next_id(client: IbapiClient) -> int:
    return int(client.named("nextValidId")[-1][0])


def errors_for(client: IbapiClient, req_id: int) -> list[tuple[int, str]]:
    return [(int(a[2]), str(a[3])) for a in client.named("error") if a[0] == req_id]


def status_of(sim: SimGateway, order_id: int, client_id: int = BOT) -> str:
    found = sim.exchange.order_of_client(client_id, order_id)
    assert found is not None
    return found.status


async def has_status(client: IbapiClient, order_id: int, status: str) -> None:
    await client.wait_for("orderStatus", lambda a: a[0] == order_id and a[1] == status)


# ------------------------------------------------------------------------------ the calendar


def test_us_equity_calendar_then_regular_extended_overnight_and_closed() -> None:
    def at(day: int, hour: int, minute: int = 0) -> float:
        return dt.datetime(2026, 12, day, hour, minute, tzinfo=NEW_YORK).timestamp()

    assert US_EQUITY.session_at(at(1, 9, 30)) == "regular"
    assert US_EQUITY.session_at(at(1, 15, 59)) == "regular"
    assert US_EQUITY.session_at(at(1, 16, 0)) == "extended"
    assert US_EQUITY.session_at(at(1, 3, 0)) == "extended"  # IB's overnight session
    assert US_EQUITY.session_at(at(1, 3, 55)) == "closed"
    assert US_EQUITY.session_at(at(5, 12)) == "closed"  # Saturday
    assert US_EQUITY.session_at(at(6, 19, 59)) == "closed"  # Sunday before the overnight
    assert US_EQUITY.session_at(at(6, 20, 0)) == "extended"
    assert US_EQUITY.next_regular_open(at(5, 12)) == at(7, 9, 30)
    holiday = Calendar(
        timezone="America/New_York", regular=("09:30-16:00",), holidays=("2026-12-25",)
    )
    assert holiday.session_at(at(25, 10)) == "closed"
    assert holiday.session_at(at(24, 10)) == "regular"


def test_ib_hours_then_ranges_and_closed_days_in_the_zone() -> None:
    hours = US_EQUITY.ib_hours(SATURDAY.timestamp(), days=3, extended=False)
    assert hours == "20261205:CLOSED;20261206:CLOSED;20261207:0930-20261207:1600"


def test_scenario_with_an_unknown_calendar_or_a_naive_start_then_error() -> None:
    bad_hours = {"instruments": [{"symbol": "X", "con_id": 1, "hours": "lunar"}]}
    with pytest.raises(ScenarioError, match=r"instruments\[0\].hours: unknown calendar 'lunar'"):
        parse_scenario(bad_hours)
    with pytest.raises(ScenarioError, match="start_time"):
        parse_scenario({"gateway": {"start_time": "2026-12-01T03:00:00"}})
    with pytest.raises(ScenarioError, match="Mars/Olympus"):
        parse_scenario({"calendars": {"x": {"timezone": "Mars/Olympus"}}})


# ------------------------------------------------------------------------------ sessions


async def test_limit_without_outside_rth_in_extended_hours_then_waits_399_and_fills_at_open() -> (
    None
):
    async with gateway_at(AT_07_00, positions=[]) as sim, bot_on(sim) as bot:
        oid = next_id(bot)
        bot.placeOrder(oid, stock("MSFT"), limit_order("BUY", 10, 430.0))  # marketable
        await has_status(bot, oid, "PreSubmitted")
        await bot.wait_for("error", lambda a: a[0] == oid and a[2] == 399)
        sim.step_market()
        assert status_of(sim, oid) == "PreSubmitted"
        (message,) = [m for code, m in errors_for(bot, oid) if code == 399]
        assert "2026-12-01 09:30:00 America/New_York" in message

        sim.set_clock(AT_OPEN.timestamp())

        await has_status(bot, oid, "Filled")
        assert [s for s in bot.named("orderStatus") if s[0] == oid][-1][1] == "Filled"


async def test_limit_with_outside_rth_at_03_00_then_fills_in_extended_hours() -> None:
    async with gateway_at(AT_03_00, positions=[]) as sim, bot_on(sim) as bot:
        oid = next_id(bot)
        order = limit_order("BUY", 10, 430.0)
        order.outsideRth = True
        bot.placeOrder(oid, stock("MSFT"), order)
        await has_status(bot, oid, "Filled")
        assert 399 not in [code for code, _ in errors_for(bot, oid)]


async def test_stock_market_order_with_outside_rth_in_extended_hours_then_2109_and_waits() -> None:
    async with gateway_at(AT_07_00, positions=[]) as sim, bot_on(sim) as bot:
        oid = next_id(bot)
        order = market_order("BUY", 10)
        order.outsideRth = True
        bot.placeOrder(oid, stock("MSFT"), order)
        await bot.wait_for("error", lambda a: a[0] == oid and a[2] == 399)
        assert 2109 in [code for code, _ in errors_for(bot, oid)]
        assert status_of(sim, oid) == "PreSubmitted"
        sim.set_clock(AT_OPEN.timestamp())
        await has_status(bot, oid, "Filled")


async def test_market_order_on_a_closed_market_then_refused_exchange_closed() -> None:
    async with gateway_at(SATURDAY, positions=[]) as sim, bot_on(sim) as bot:
        oid = next_id(bot)
        bot.placeOrder(oid, stock("MSFT"), market_order("BUY", 10))
        await bot.wait_for("error", lambda a: a[0] == oid and a[2] == 201)
        assert (201, "Order rejected - reason:Exchange is closed.") in errors_for(bot, oid)
        # a limit order is taken and waits for its session
        bot.placeOrder(oid + 1, stock("MSFT"), limit_order("BUY", 10, 430.0))
        await bot.wait_for("error", lambda a: a[0] == oid + 1 and a[2] == 399)
        assert status_of(sim, oid + 1) == "PreSubmitted"


async def test_scenario_clock_fault_then_the_open_releases_waiting_orders() -> None:
    async with gateway_at(SATURDAY, positions=[]) as sim, bot_on(sim) as bot:
        oid = next_id(bot)
        bot.placeOrder(oid, stock("MSFT"), limit_order("BUY", 10, 430.0))
        await has_status(bot, oid, "PreSubmitted")
        scenario = parse_scenario(
            {"faults": [{"kind": "clock", "at_s": 0, "advance_s": 2 * 86400}]}
        )
        await run_faults(sim, scenario)  # Saturday noon + 2 days: Monday noon, regular
        await has_status(bot, oid, "Filled")


async def test_contract_details_then_time_zone_trading_and_liquid_hours() -> None:
    async with gateway_at(SATURDAY, positions=[]) as sim, bot_on(sim) as bot:
        bot.reqContractDetails(41, stock("MSFT"))
        await bot.wait_for("contractDetailsEnd")
        (details,) = [a[1] for a in bot.named("contractDetails")]
        assert details.timeZoneId == "America/New_York"
        assert details.liquidHours.startswith("20261205:CLOSED;20261206:CLOSED;")
        assert "20261207:0930-20261207:1600" in details.liquidHours
        assert "20261206:2000-20261207:0350" in details.tradingHours


# ------------------------------------------------------------------------------ margin and limits


async def test_order_that_would_breach_initial_margin_then_refused_with_ib_margin_text() -> None:
    positions = [{"symbol": "AAPL", "quantity": 1000}]
    async with sim_gateway(positions=positions) as sim, bot_on(sim) as bot:
        oid = next_id(bot)
        bot.placeOrder(oid, stock("MSFT"), market_order("BUY", 20_000))  # 8.4 M at 25 %
        await bot.wait_for("error", lambda a: a[0] == oid and a[2] == 201)
        ((_, text),) = errors_for(bot, oid)
        assert "Your order is not accepted. In order to obtain the desired position" in text
        assert "must exceed the new total Initial Margin of [" in text
        assert sim.exchange.fills() == []
        # reducing a position is never refused for margin, even after a margin hike
        sim.change_margin(100.0)
        bot.placeOrder(oid + 1, stock("AAPL"), market_order("SELL", 1000))
        await has_status(bot, oid + 1, "Filled")


async def test_twenty_first_working_order_on_one_side_then_refused_other_side_accepted() -> None:
    async with sim_gateway(positions=[]) as sim, bot_on(sim) as bot:
        oid = next_id(bot)
        for n in range(21):
            bot.placeOrder(oid + n, stock("MSFT"), limit_order("BUY", 1, 300.0 + n))
        await bot.wait_for("error", lambda a: a[0] == oid + 20 and a[2] == 201)
        assert "20 active orders per contract per side" in errors_for(bot, oid + 20)[0][1]
        assert len(sim.exchange.working_orders()) == 20
        bot.placeOrder(oid + 21, stock("MSFT"), limit_order("SELL", 1, 500.0))
        await has_status(bot, oid + 21, "Submitted")


# ------------------------------------------------------------------------------ market data errors


def msft() -> Contract:
    return stock("MSFT")


@pytest.mark.parametrize("code", [354, 10197, 10167])
async def test_market_data_error_fault_then_request_answered_with_the_code(code: int) -> None:
    async with sim_gateway() as sim, bot_on(sim) as bot:
        faults = [{"kind": "market_data_error", "at_s": 0, "code": code, "symbols": ["MSFT"]}]
        await run_faults(sim, parse_scenario({**SCENARIO, "faults": faults}))
        bot.reqMktData(51, msft(), "", False, False, [])
        await bot.wait_for("error", lambda a: a[0] == 51 and a[2] == code)
        if code == 10167:  # still subscribed: IB shows delayed data
            await bot.wait_for("tickPrice", lambda a: a[0] == 51)
        else:
            sim.step_market()
            await eventually(lambda: bool(bot.named("error")))
            assert [a for a in bot.named("tickPrice") if a[0] == 51] == []


async def test_more_tickers_than_allowed_then_error_101() -> None:
    async with sim_gateway(gateway={"max_tickers": 1}) as sim, bot_on(sim) as bot:
        bot.reqMktData(61, msft(), "", False, False, [])
        bot.reqMktData(62, stock("AAPL"), "", False, False, [])
        await bot.wait_for("error", lambda a: a[0] == 62 and a[2] == 101)
        assert errors_for(bot, 61) == []
        assert errors_for(bot, 62) == [(101, "Max number of tickers has been reached.")]


async def test_line_cancelled_then_its_place_is_free_again() -> None:
    async with sim_gateway(gateway={"max_tickers": 1}) as sim, bot_on(sim) as bot:
        bot.reqMktData(61, msft(), "", False, False, [])
        bot.cancelMktData(61)
        bot.reqMktData(62, stock("AAPL"), "", False, False, [])
        await bot.wait_for("tickPrice", lambda a: a[0] == 62)
        assert errors_for(bot, 62) == []


async def test_farm_broken_fault_then_2110_to_every_client() -> None:
    async with sim_gateway() as sim, bot_on(sim) as bot:
        await run_faults(
            sim, parse_scenario({**SCENARIO, "faults": [{"kind": "farm_broken", "at_s": 0}]})
        )
        await bot.wait_for("error", lambda a: a[2] == 2110)


async def test_account_updates_then_portfolio_at_start_then_every_interval_only() -> None:
    # IB: the portfolio is sent when the subscription starts, then every three minutes (a
    # position change at once); here the interval is shortened to see a second round.
    async with sim_gateway(gateway={"portfolio_interval_s": 0.5}) as sim, bot_on(sim) as bot:
        bot.reqAccountUpdates(True, "")
        await bot.wait_for("accountDownloadEnd")
        first = len(bot.named("updatePortfolio"))
        assert first == len(sim.exchange.positions(sim.exchange.accounts[0])) > 0
        await bot.wait_for("updatePortfolio", count=2 * first)


async def test_default_portfolio_interval_then_no_second_round_with_the_pnl_stream() -> None:
    async with sim_gateway() as sim, bot_on(sim) as bot:
        bot.reqAccountUpdates(True, "")
        await bot.wait_for("accountDownloadEnd")
        first = len(bot.named("updatePortfolio"))
        bot.reqPnL(5, sim.exchange.accounts[0], "")
        await eventually(lambda: len(bot.named("pnl")) >= 3)  # three rounds of the PnL stream
        assert len(bot.named("updatePortfolio")) == first
