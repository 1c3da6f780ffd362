"""Drills: an option book against the simulated gateway over TCP.

The account holds long calls, short puts, a call spread (long the 200 call, short the 220) and
the underlying stock. The guard reads IB's option computations (tickOptionComputation) into its
Book, values every option at its market price x multiplier 100, and a kill closes each option by
a limit order at the fresh bid (sell to close) or ask (buy to close), never a market order and
never an exercise, the stock at market; an independent ibapi client sees the account flat, and
no position ever went through zero.
"""

from __future__ import annotations

import datetime as dt
import math
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from guardd.core.events import ConId
from ibsim.exchange import option_expiry
from tests.conftest import eventually
from tests.drill_helpers import gateway_says_flat, kill_command
from tests.guard_harness import (
    ACCOUNT,
    guard_config,
    guard_orders,
    running_guard,
    sim_gateway,
    starting_positions,
    zero_crossings,
)

pytestmark = [pytest.mark.integration, pytest.mark.both_wires, pytest.mark.slow]

# The gateway starts at 11:00 New York on today's date (the next Monday on a weekend): the US
# regular session, so the stock closes at market (at 16:00, the start this drill used to take,
# the session is over and the guard rightly closes a stock by an outsideRth limit). The options
# expire a month later: the guard prices options at its own clock, so a fixed date would make the
# guard and the gateway disagree on time to expiry (and the drill break once the date passed).
_NEW_YORK = ZoneInfo("America/New_York")
_TODAY = dt.datetime.now(_NEW_YORK).date()
_START_DAY = _TODAY + dt.timedelta(
    days=max(0, 7 - _TODAY.weekday()) if _TODAY.weekday() >= 5 else 0
)
START = dt.datetime.combine(_START_DAY, dt.time(11, 0), _NEW_YORK).timestamp()
EXPIRY = (_START_DAY + dt.timedelta(days=30)).strftime("%Y%m%d")
STOCK, CALL_190, PUT_180, CALL_200, CALL_220 = 265598, 900001, 900002, 900003, 900004
OPTIONS = {CALL_190: ("C", 190.0), PUT_180: ("P", 180.0), CALL_200: ("C", 200.0)}
OPTIONS[CALL_220] = ("C", 220.0)


def _option(con_id: int) -> dict[str, Any]:
    right, strike = OPTIONS[con_id]
    return {
        "symbol": "AAPL",
        "sec_type": "OPT",
        "con_id": con_id,
        "underlying": "AAPL",
        "strike": strike,
        "right": right,
        "last_trade_date": EXPIRY,
        "implied_vol": 0.3,
    }


OPTION_BOOK: dict[str, Any] = {
    "gateway": {"start_time": dt.datetime.fromtimestamp(START, dt.UTC).isoformat()},
    "accounts": [{"id": ACCOUNT, "cash": 1_000_000}],
    "instruments": [
        {"symbol": "AAPL", "con_id": STOCK, "price": 200.0, "volatility": 0.0},
        *(_option(c) for c in OPTIONS),
    ],
    "positions": [
        {"symbol": "AAPL", "quantity": 300, "avg_price": 195.0},
        {"symbol": f"AAPL {EXPIRY} 190C", "quantity": 10},  # long calls
        {"symbol": f"AAPL {EXPIRY} 180P", "quantity": -5},  # short puts
        {"symbol": f"AAPL {EXPIRY} 200C", "quantity": 4},  # a call spread: long the 200 ...
        {"symbol": f"AAPL {EXPIRY} 220C", "quantity": -4},  # ... short the 220
    ],
}
FLATTEN = """
[kill]
mode = "flatten"

[flatten]
verify_timeout_s = 20.0

[limits.stress]
warn = 0.9

[[limits.stress.scenarios]]
name = "down 10%"
underlying_move = -0.10

[[limits.stress.scenarios]]
name = "vol +50%"
vol_move = 0.5
"""


def _stress(guard: Any) -> Any:
    return guard.status()["stress"]["scenarios"]


async def test_kill_with_an_option_book_and_stock_then_flat_by_limits_never_market(
    tmp_path: Path,
) -> None:
    async with sim_gateway(**OPTION_BOOK) as sim:
        start = starting_positions(sim)
        cfg = guard_config(sim.port, tmp_path, FLATTEN)
        async with running_guard(cfg) as guard:
            # Arrange: every option valued (price x 100) and its computation from IB in the Book
            book = guard.book
            await eventually(
                lambda: (
                    all(book.option_greeks(ConId(c)) is not None for c in OPTIONS)
                    and guard.status()["gross_position_value"] is not None
                ),
                "options valued and their computations in",
            )
            for con_id in OPTIONS:
                held = book.position(ConId(con_id))
                assert held is not None and held.multiplier == 100.0
                assert held.value == pytest.approx(
                    held.quantity * 100 * sim.exchange.quote(con_id).last, rel=0.02
                )
            greeks = book.option_greeks(ConId(CALL_190))
            assert greeks is not None and 0.5 < greeks.delta < 1.0
            assert greeks.underlying_price == pytest.approx(200.0)
            # each option's terms from its contract, and the stress scenarios in status and
            # metrics: down 10 % loses on the stock, the calls and the short puts
            for con_id, (right, strike) in OPTIONS.items():
                held = book.position(ConId(con_id))
                assert held is not None
                assert (held.right, held.strike, held.expiry) == (
                    right,
                    strike,
                    option_expiry(EXPIRY),
                )
            await eventually(
                lambda: _stress(guard)["down 10%"]["loss"] is not None, "stress losses"
            )
            down = _stress(guard)["down 10%"]
            assert down["loss"] > 300 * 200 * 0.10  # more than the stock's 6,000
            assert guard.status()["stress"]["missing"] is None

            def ratio() -> float:
                value = guard.registry.get_sample_value(
                    "guardd_stress_loss_ratio", {"account": ACCOUNT, "scenario": "down 10%"}
                )
                return math.nan if value is None else float(value)

            await eventually(lambda: math.isfinite(ratio()), "stress metric")
            assert ratio() == pytest.approx(down["ratio"], rel=0.05)

            # Act
            await guard.handle(kill_command("flatten"))
            await eventually(
                lambda: guard.executor.last_flat_confirmed is not None,
                "flat confirmed",
                timeout_s=20,
            )

        # Assert: each option closed by limit orders on the right side (sell the longs, buy the
        # shorts), none at market; the stock at market; never past zero
        option_orders = [o for o in guard_orders(sim) if o.instrument.sec_type == "OPT"]
        assert {o.instrument.con_id for o in option_orders} == set(OPTIONS)
        assert {o.order_type for o in option_orders} == {"LMT"}
        sides = {o.instrument.con_id: o.action for o in option_orders}
        assert sides == {CALL_190: "SELL", PUT_180: "BUY", CALL_200: "SELL", CALL_220: "BUY"}
        stock = [o for o in guard_orders(sim) if o.instrument.con_id == STOCK]
        assert [(o.action, o.order_type) for o in stock] == [("SELL", "MKT")]
        positions, working = await gateway_says_flat(sim.port)
        assert positions == {}
        assert working == 0
        assert zero_crossings(sim, start) == []
