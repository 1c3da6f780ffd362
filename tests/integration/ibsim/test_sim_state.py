"""`guardd sim --state FILE`: the account outlives the gateway process, as at IB.

The gateway runs as a real process; the official ibapi client trades against it over TCP; the
process is killed with -9 and started again on the same file.
"""

from __future__ import annotations

import json
import subprocess
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from ibapi.execution import ExecutionFilter

from ibsim.scenario import parse_scenario
from ibsim.state import StateFile
from ibsim.types import ContractSpec, OrderRequest
from tests.conftest import SCENARIO, free_port
from tests.guard_harness import AAPL, ACCOUNT
from tests.ibapi_harness import IbapiClient, connected, limit_order, market_order, stock
from tests.sim_process import SimProcess, saved_state, write_scenario

pytestmark = pytest.mark.integration

BOT = 5
WORKING = ("PendingSubmit", "PreSubmitted", "Submitted", "PendingCancel")


def _statuses(c: IbapiClient) -> dict[int, tuple[int, str]]:
    """orderId -> (permId, last status) from the orderStatus callbacks."""
    out: dict[int, tuple[int, str]] = {}
    for args in c.named("orderStatus"):
        out[args[0]] = (int(args[5]), args[1])
    return out


def _open_orders(c: IbapiClient) -> dict[int, Any]:
    """orderId -> the Order of the last openOrder callback."""
    return {args[0]: args[2] for args in c.named("openOrder")}


async def _cash(c: IbapiClient, req_id: int) -> str:
    c.reqAccountSummary(req_id, "All", "TotalCashValue")
    await c.wait_for("accountSummaryEnd", lambda a: a[0] == req_id)
    return next(a[3] for a in c.named("accountSummary") if a[0] == req_id)


async def _positions(c: IbapiClient) -> dict[int, Decimal]:
    c.reqPositions()
    await c.wait_for("positionEnd")
    return {int(a[1].conId): Decimal(str(a[2])) for a in c.named("position") if a[0] == ACCOUNT}


async def test_gateway_killed_9_and_restarted_with_state_then_positions_orders_and_ids_survive(
    tmp_path: Path,
) -> None:
    # Arrange: a bot with a working bracket (parent + OCA stop child), a working limit, a fill
    scenario = write_scenario(tmp_path / "scenario.toml")
    state = tmp_path / "account.json"
    sim = SimProcess(free_port(), scenario, state, tmp_path / "sim.log")
    await sim.start()
    try:
        bot = await connected(sim.port, BOT)
        first = bot.named("nextValidId")[0][0]
        rest, parent, child, fill = first, first + 1, first + 2, first + 3
        bot.placeOrder(rest, stock("AAPL"), limit_order("BUY", 10, 150.0))
        bracket = limit_order("BUY", 20, 151.0)
        bracket.transmit = False
        bot.placeOrder(parent, stock("AAPL"), bracket)
        stop = limit_order("SELL", 20, 0)
        stop.orderType, stop.lmtPrice, stop.auxPrice = "STP", 0.0, 140.0
        stop.parentId, stop.ocaGroup, stop.ocaType = parent, "exit-1", 1
        bot.placeOrder(child, stock("AAPL"), stop)
        bot.placeOrder(fill, stock("AAPL"), market_order("BUY", 100))
        await bot.wait_for("orderStatus", lambda a: a[0] == fill and a[1] == "Filled")
        await bot.wait_for("orderStatus", lambda a: a[0] == child)
        before = _statuses(bot)
        exec_id = next(a[2].execId for a in bot.named("execDetails") if a[2].orderId == fill)
        positions_before = await _positions(bot)
        cash_before = await _cash(bot, 1)
        await bot.stop()
        assert before[rest][1] == "Submitted" and before[fill][1] == "Filled"
        assert before[parent][1] == "Submitted"  # the child's transmit released the bracket
        assert before[child][1] == "PreSubmitted"  # waits for its parent's fill

        # Act: kill -9, start again on the same file
        sim.kill9()
        await sim.start()
        bot = await connected(sim.port, BOT)
        bot.reqOpenOrders()
        await bot.wait_for("openOrderEnd")
        after = _statuses(bot)
        orders = _open_orders(bot)
        positions_after = await _positions(bot)
        cash_after = await _cash(bot, 2)
        bot.reqExecutions(3, ExecutionFilter())
        await bot.wait_for("execDetailsEnd")
        exec_ids = [a[2].execId for a in bot.named("execDetails") if a[0] == 3]
        next_id = bot.named("nextValidId")[0][0]
        bot.placeOrder(fill, stock("AAPL"), market_order("BUY", 1))  # an id already used
        await bot.wait_for("error", lambda a: a[0] == fill and a[2] == 103)
        bot.placeOrder(next_id, stock("AAPL"), market_order("BUY", 1))
        await bot.wait_for("execDetails", lambda a: a[2].orderId == next_id)
        new = next(a[2] for a in bot.named("execDetails") if a[2].orderId == next_id)
        await bot.stop()

        # Assert
        assert positions_after == positions_before == {AAPL: Decimal(100)}
        assert cash_after == cash_before != "1000000.00"  # the fill moved the cash, once
        for order_id in (rest, parent, child):
            assert after[order_id] == before[order_id], order_id  # same permId, same status
        assert fill not in after  # a filled order is not working
        assert orders[child].parentId == parent and orders[child].ocaGroup == "exit-1"
        assert orders[child].auxPrice == 140.0 and orders[child].ocaType == 1
        saved = {o["order_id"]: o for o in saved_state(state)["exchange"]["orders"]}
        assert saved[child]["parent_id"] == parent and saved[child]["triggered"] is False
        assert orders[rest].lmtPrice == 150.0 and orders[rest].totalQuantity == 10
        assert exec_ids == [exec_id]  # the day's executions survive too
        assert next_id > fill  # nextValidId above every id used
        assert new.execId != exec_id and new.permId > max(p for p, _ in before.values())
    finally:
        sim.stop()


def test_state_file_corrupt_then_gateway_refuses_to_start_with_one_line(
    tmp_path: Path,
) -> None:
    # Arrange
    scenario = write_scenario(tmp_path / "scenario.toml")
    state = tmp_path / "account.json"
    state.write_text('{"format": "guardd-sim-state", "version": 1, "state": {"exch')
    sim = SimProcess(free_port(), scenario, state, tmp_path / "sim.log")

    # Act
    done = subprocess.run(sim.args(), capture_output=True, text=True, timeout=60)

    # Assert
    assert done.returncode == 65, done
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and str(state) in lines[0] and "not valid JSON" in lines[0], lines
    assert state.read_text().endswith('"exch')  # left as it was, for the operator to look at


def test_state_of_other_accounts_then_refused_naming_the_mismatch(tmp_path: Path) -> None:
    # Arrange: a state saved by a gateway of another account
    other = dict(SCENARIO, accounts=[{"id": "DU999999", "cash": 5}])
    exchange = parse_scenario(other).build_exchange(now=0.0)
    path = tmp_path / "account.json"
    StateFile(path).save({"exchange": exchange.snapshot()})
    scenario = write_scenario(tmp_path / "scenario.toml")

    # Act
    done = subprocess.run(
        SimProcess(free_port(), scenario, path, tmp_path / "log").args(),
        capture_output=True,
        text=True,
        timeout=60,
    )

    # Assert
    assert done.returncode == 65, done
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "DU999999" in lines[0] and "DU000001" in lines[0], lines


def test_snapshot_restored_then_the_same_snapshot(tmp_path: Path) -> None:
    # Arrange: fills, a working order, a rejected one, a pending cancel
    exchange = parse_scenario(SCENARIO).build_exchange(now=0.0)

    def req(order_id: int, **kw: Any) -> OrderRequest:
        base: dict[str, Any] = dict(
            order_id=order_id,
            contract=ContractSpec(con_id=AAPL),
            action="SELL",
            total_quantity=10,
            order_type="MKT",
            lmt_price=None,
            aux_price=None,
        )
        return OrderRequest(**{**base, **kw})

    exchange.place_order(5, req(1), 1.0)
    exchange.place_order(5, req(2, order_type="LMT", lmt_price=500.0), 2.0)
    exchange.place_order(5, req(3, order_type="LMT", lmt_price=-1.0), 3.0)
    exchange.place_order(6, req(1, order_type="LMT", lmt_price=600.0), 4.0)
    exchange.cancel_order(6, 1, 5.0, pending=True)
    saved = json.loads(json.dumps(exchange.snapshot()))

    # Act
    again = parse_scenario(SCENARIO).build_exchange(now=0.0)
    again.restore(saved)

    # Assert
    assert again.snapshot() == saved
    assert again.account_values(ACCOUNT) == exchange.account_values(ACCOUNT)
    assert again.positions(ACCOUNT) == exchange.positions(ACCOUNT)
    assert [o.perm_id for o in again.working_orders()] == [
        o.perm_id for o in exchange.working_orders()
    ]
