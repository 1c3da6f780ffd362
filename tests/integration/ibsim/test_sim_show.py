"""`guardd sim --show-every SECONDS` and SIGUSR1: the gateway side of a drill (positions and working
orders per client, FLAT when flat), so a trader rehearsing can check "flat" without a client.

The renderer is pure and tested on an Exchange; the printing is tested on a real `guardd sim`
process with the official ibapi client trading against it over TCP.
"""

from __future__ import annotations

import signal
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ibsim.exchange import Exchange
from ibsim.show import FLAT_LINE, render_gateway_side
from ibsim.types import ContractSpec, Instrument, OrderRequest
from tests.conftest import eventually, free_port
from tests.guard_harness import ACCOUNT
from tests.ibapi_harness import connected, limit_order, market_order, stock
from tests.sim_process import SimProcess, write_scenario

AAPL = Instrument(
    con_id=265598,
    symbol="AAPL",
    sec_type="STK",
    exchange="SMART",
    primary_exchange="NASDAQ",
    currency="USD",
    initial_price=100.0,
    volatility=0.0,
    spread=0.02,
)
ES = Instrument(
    con_id=495512563,
    symbol="ES",
    sec_type="FUT",
    exchange="CME",
    primary_exchange="CME",
    currency="USD",
    multiplier=50.0,
    last_trade_date="20250919",
    local_symbol="ESU5",
    initial_price=5000.0,
    volatility=0.0,
    spread=0.5,
    min_tick=0.25,
    initial_margin_per_contract=15_000.0,
    maint_margin_per_contract=12_000.0,
)


def _exchange() -> Exchange:
    return Exchange([AAPL, ES], {"DU1": 1_000_000.0, "DU2": 1_000_000.0}, now=1_750_000_000.0)


def _order(
    order_id: int,
    action: str,
    quantity: float,
    *,
    lmt_price: float | None = None,
    con_id: int = AAPL.con_id,
    account: str = "DU1",
) -> OrderRequest:
    return OrderRequest(
        order_id=order_id,
        contract=ContractSpec(con_id=con_id),
        action=action,
        total_quantity=quantity,
        order_type="MKT" if lmt_price is None else "LMT",
        lmt_price=lmt_price,
        aux_price=None,
        account=account,
    )


def _rows(text: str, section: str) -> list[tuple[str, ...]]:
    """The data rows of a section ("positions:" / "working orders:") of one rendered table."""
    lines = text.splitlines()
    if section not in lines:
        return []
    rows = []
    for line in lines[lines.index(section) + 2 :]:  # past the section and its column header
        if not line.startswith("  "):
            break
        rows.append(tuple(line.split()))
    return rows


# ---------------------------------------------------------------- the renderer


def test_exchange_with_positions_and_orders_then_each_shown_under_its_client_and_not_flat() -> None:
    # Arrange: DU1 long 100 AAPL, DU2 short 2 ES; client 9 and client 3 each with a resting limit
    exchange = _exchange()
    exchange.place_order(1, _order(1, "BUY", 100), now=exchange.now)
    exchange.place_order(1, _order(2, "SELL", 2, con_id=ES.con_id, account="DU2"), now=exchange.now)
    exchange.place_order(9, _order(5, "BUY", 10, lmt_price=90.0), now=exchange.now)
    exchange.place_order(3, _order(7, "SELL", 1.5, lmt_price=120.0), now=exchange.now)
    perm = {o.client_id: o.perm_id for o in exchange.working_orders()}

    # Act
    text = render_gateway_side(exchange)

    # Assert
    assert text.splitlines()[0] == "--- gateway side at 2025-06-15 15:06:40 UTC ---"
    assert _rows(text, "positions:") == [
        ("DU1", "AAPL", "STK", "100", "100.01"),
        ("DU2", "ESU5", "FUT", "-2", "249987.5"),
    ]
    assert _rows(text, "working orders:") == [  # by client id, whatever the placement order
        ("3", "7", str(perm[3]), "DU1", "AAPL", "SELL", "1.5", "0", "LMT", "Submitted"),
        ("9", "5", str(perm[9]), "DU1", "AAPL", "BUY", "10", "0", "LMT", "Submitted"),
    ]
    assert text.splitlines()[-1] == "NOT FLAT: 2 positions, 2 working orders"
    assert FLAT_LINE not in text


def test_orders_cancelled_and_positions_closed_then_flat_line() -> None:
    # Arrange: a position and a resting order, then the position closed and the order cancelled
    exchange = _exchange()
    exchange.place_order(1, _order(1, "BUY", 100), now=exchange.now)
    exchange.place_order(1, _order(2, "BUY", 10, lmt_price=90.0), now=exchange.now)
    assert render_gateway_side(exchange).splitlines()[-1] == (
        "NOT FLAT: 1 position, 1 working order"
    )
    exchange.place_order(1, _order(3, "SELL", 100), now=exchange.now)
    exchange.cancel_order(1, 2, now=exchange.now)

    # Act
    text = render_gateway_side(exchange)

    # Assert
    assert "positions: none" in text.splitlines()
    assert "working orders: none" in text.splitlines()
    assert text.splitlines()[-1] == FLAT_LINE


@dataclass(frozen=True)
class _Step:
    client_id: int
    action: str
    quantity: int
    resting: bool  # a limit far from the market, else a market order that fills
    cancel: bool  # cancel it after placing (a resting order only)


_steps = st.lists(
    st.builds(
        _Step,
        client_id=st.integers(0, 4),
        action=st.sampled_from(["BUY", "SELL"]),
        quantity=st.integers(1, 300),
        resting=st.booleans(),
        cancel=st.booleans(),
    ),
    max_size=12,
)


@settings(max_examples=60, deadline=None)
@given(steps=_steps)
def test_any_drill_then_flat_line_exactly_when_no_position_and_no_working_order(
    steps: list[_Step],
) -> None:
    # Arrange
    exchange = _exchange()
    for order_id, step in enumerate(steps, start=1):
        price = (50.0 if step.action == "BUY" else 150.0) if step.resting else None
        exchange.place_order(
            step.client_id,
            _order(order_id, step.action, step.quantity, lmt_price=price),
            now=exchange.now,
        )
        if step.resting and step.cancel:
            exchange.cancel_order(step.client_id, order_id, now=exchange.now)

    # Act
    text = render_gateway_side(exchange)

    # Assert: every working order is shown under its client, every open position is shown,
    # and the FLAT line is there exactly when both are empty
    working = exchange.working_orders()
    positions = exchange.positions("DU1")
    shown = _rows(text, "working orders:")
    assert sorted((int(r[0]), int(r[1]), int(r[2])) for r in shown) == sorted(
        (o.client_id, o.order_id, o.perm_id) for o in working
    )
    assert [int(r[0]) for r in shown] == sorted(int(r[0]) for r in shown)
    assert [float(r[3]) for r in _rows(text, "positions:")] == [p.position for p in positions]
    assert (text.splitlines()[-1] == FLAT_LINE) == (not working and not positions)


# ---------------------------------------------------------------- the real process


def _tables(log: str) -> list[str]:
    """Each table the process printed, whole, in order (log lines in between left out)."""
    tables, current = [], list[str]()
    for line in log.splitlines():
        if line.startswith("--- gateway side at "):
            current = [line]
        elif current:
            current.append(line)
            if line == FLAT_LINE or line.startswith("NOT FLAT: "):
                tables.append("\n".join(current) + "\n")
                current = []
    return tables


async def _table_after(
    sim: SimProcess, start: int, holds: Callable[[str], bool], timeout_s: float = 10.0
) -> str:
    """The first table printed past table number `start` for which `holds` is true."""

    def found() -> str | None:
        return next((t for t in _tables(sim.output())[start:] if holds(t)), None)

    try:
        return await eventually(found, "such a table", timeout_s=timeout_s, interval_s=0.05)
    except AssertionError as failed:
        raise AssertionError(f"{failed}: {sim.tail()}") from None


def _printed(sim: SimProcess) -> int:
    return len(_tables(sim.output()))


@pytest.mark.integration
async def test_sim_show_every_then_resting_order_under_its_client_and_flat_after_cancel(
    tmp_path: Path,
) -> None:
    # Arrange: `guardd sim --show-every 0.5` and a bot (client 7) with a resting limit
    scenario = write_scenario(tmp_path / "scenario.toml")
    sim = SimProcess(
        free_port(),
        scenario,
        tmp_path / "account.json",
        tmp_path / "sim.log",
        extra=["--show-every", "0.5"],
    )
    await sim.start()
    try:
        bot = await connected(sim.port, 7)
        order_id = bot.named("nextValidId")[0][0]
        bot.placeOrder(order_id, stock("AAPL"), limit_order("BUY", 10, 150.0))
        status = await bot.wait_for("orderStatus", lambda a: a[0] == order_id)
        # orderStatus(orderId, status, filled, remaining, avgFillPrice, permId, ...)
        perm_id = int(status[0][5])
        shown_order = ("7", str(order_id), str(perm_id), ACCOUNT, "AAPL", "BUY", "10", "0", "LMT")

        # Act / Assert: a later table shows the order under client 7, and not flat
        with_order = await _table_after(
            sim, 0, lambda t: any(r[:9] == shown_order for r in _rows(t, "working orders:"))
        )
        assert with_order.splitlines()[-1] == "NOT FLAT: 0 positions, 1 working order"

        # Act: the bot cancels it
        seen = _printed(sim)
        bot.cancel(order_id)
        await bot.wait_for("orderStatus", lambda a: a[0] == order_id and a[1] == "Cancelled")

        # Assert: the next tables say FLAT (no position was ever taken)
        flat = await _table_after(sim, seen, lambda t: t.splitlines()[-1] == FLAT_LINE)
        assert _rows(flat, "working orders:") == []
        assert "positions: none" in flat.splitlines()
        await bot.stop()
    finally:
        assert sim.stop() == 0, sim.tail()


@pytest.mark.integration
async def test_sim_without_show_every_sigusr1_then_one_table_each_time_and_still_serving(
    tmp_path: Path,
) -> None:
    # Arrange: `guardd sim` without --show-every; a bot (client 4) buys 100 AAPL
    scenario = write_scenario(tmp_path / "scenario.toml")
    sim = SimProcess(free_port(), scenario, tmp_path / "account.json", tmp_path / "sim.log")
    await sim.start()
    try:
        bot = await connected(sim.port, 4)
        first = bot.named("nextValidId")[0][0]
        bot.placeOrder(first, stock("AAPL"), market_order("BUY", 100))
        await bot.wait_for("orderStatus", lambda a: a[0] == first and a[1] == "Filled")
        assert _printed(sim) == 0  # nothing printed unasked

        # Act: SIGUSR1
        assert sim.proc is not None
        sim.proc.send_signal(signal.SIGUSR1)

        # Assert: one table with the position, and the gateway still serves the bot
        long = await _table_after(sim, 0, lambda t: True)
        assert [r[:4] for r in _rows(long, "positions:")] == [(ACCOUNT, "AAPL", "STK", "100")]
        assert long.splitlines()[-1] == "NOT FLAT: 1 position, 0 working orders"
        bot.placeOrder(first + 1, stock("AAPL"), market_order("SELL", 100))
        await bot.wait_for("orderStatus", lambda a: a[0] == first + 1 and a[1] == "Filled")

        # Act: SIGUSR1 again, now flat
        sim.proc.send_signal(signal.SIGUSR1)

        # Assert
        flat = await _table_after(sim, 1, lambda t: True)
        assert flat.splitlines()[-1] == FLAT_LINE
        assert _printed(sim) == 2
        await bot.stop()
    finally:
        assert sim.stop() == 0, sim.tail()
