"""More positions than market-data lines: every position valued from IB's account-updates stream,
lines for the largest exposures, error 101 answered without a crash, a close still gets its line,
and a large foreign order under the price collar gets one for its contract.

Everything real: the guard against the simulated gateway over loopback, the gateway playing IB's
line limit (`max_tickers`: one more subscription is refused with 101).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from guardd.config import Config
from guardd.core.events import ConId
from ibsim.bot import RunawayBot
from ibsim.gateway import SimGateway
from tests.conftest import eventually
from tests.guard_harness import ACCOUNT, GUARD_CLIENT_ID, guard_config, running_guard, sim_gateway

pytestmark = pytest.mark.integration

BOT_CLIENT_ID = 7
SIM_LINES = 5  # what the gateway grants a client
POSITIONS = 20
FIRST_CON_ID = 500_000


def instruments() -> list[dict[str, object]]:
    # prices 10, 20, ... 200: position n (100 shares) is worth 1,000 x (n + 1)
    return [
        {
            "symbol": f"P{n:02d}",
            "con_id": FIRST_CON_ID + n,
            "price": 10.0 * (n + 1),
            "volatility": 0.0,
        }
        for n in range(POSITIONS)
    ]


POSITIONS_HELD = [{"symbol": f"P{n:02d}", "quantity": 100} for n in range(POSITIONS)]


def lines_guard_config(port: int, tmp_path: Path, limits_toml: str, lines: int) -> Config:
    """The guard's config with `limits_toml` and `[ib] market_data_lines = lines`."""
    cfg = guard_config(port, tmp_path / "state", limits_toml)
    return cfg.model_copy(update={"ib": cfg.ib.model_copy(update={"market_data_lines": lines})})


def lines_at_gateway(sim: SimGateway) -> set[int]:
    session = sim.sessions.get(GUARD_CLIENT_ID)
    return set() if session is None else set(session.subs.market_data.values())


async def test_more_positions_than_lines_then_all_valued_and_lines_for_the_largest(
    tmp_path: Path,
) -> None:
    # Arrange: 20 positions, a gateway granting 5 lines, a guard configured for 8 (it learns 5)
    largest = {FIRST_CON_ID + n for n in range(POSITIONS - SIM_LINES, POSITIONS)}
    smallest = FIRST_CON_ID
    async with sim_gateway(
        instruments=instruments(), positions=POSITIONS_HELD, gateway={"max_tickers": SIM_LINES}
    ) as sim:
        cfg = lines_guard_config(sim.port, tmp_path, "[limits.leverage]\nkill = 50.0\n", 8)
        async with running_guard(cfg) as guard:
            book = guard.book

            # Assert: every position valued by the account-updates stream, the leverage rule
            # evaluable, no crash on 101
            def all_valued() -> bool:
                held = list(book.guarded_positions())
                return len(held) == POSITIONS and all(
                    p.value is not None and p.portfolio_ts is not None for p in held
                )

            await eventually(all_valued, what="every position valued")
            await eventually(
                lambda: guard.status().get("rule_levels", {}).get("leverage") == "ok",
                what="leverage evaluated",
            )
            assert guard.status()["positions_unvalued"] == 0

            # the lines settle on the five largest positions, refused ones released
            await eventually(
                lambda: lines_at_gateway(sim) == largest,
                what="lines for the five largest positions",
            )
            await eventually(lambda: guard.broker.lines == largest, what="the guard's lines")
            assert guard.broker.lines_refused >= 1
            assert guard.status()["market_data_lines"] == SIM_LINES

            # Act: a close starts on the smallest position
            guard.broker.closing([smallest])

            # Assert: it gets a line (the smallest of the others gives way), within the limit
            await eventually(
                lambda: smallest in lines_at_gateway(sim),
                what="a line for the contract being closed",
            )
            held = lines_at_gateway(sim)
            assert len(held) == SIM_LINES
            assert held - {smallest} == largest - {min(largest)}
            await eventually(
                lambda: book.quote(ConId(smallest)).bid > 0, what="a price for the close"
            )
            assert book.position(ConId(smallest), ACCOUNT) is not None


async def test_large_foreign_order_under_a_price_collar_then_its_contract_gets_a_line(
    tmp_path: Path,
) -> None:
    # Arrange: 20 positions and 5 lines; the per-order collar on; an instrument nobody holds
    big = FIRST_CON_ID + 100
    extra = {"symbol": "BIG", "con_id": big, "price": 100.0, "volatility": 0.0}
    largest = [FIRST_CON_ID + n for n in range(POSITIONS - 1, POSITIONS - SIM_LINES - 1, -1)]
    collar = '[limits.per_order]\nprice_collar = 0.5\naction = "warn"\n'
    async with sim_gateway(
        instruments=[*instruments(), extra],
        positions=POSITIONS_HELD,
        gateway={"max_tickers": SIM_LINES},
    ) as sim:
        cfg = lines_guard_config(sim.port, tmp_path, collar, SIM_LINES)
        async with running_guard(cfg) as guard:
            await eventually(
                lambda: lines_at_gateway(sim) == set(largest), what="lines for the largest"
            )
            bot = RunawayBot("127.0.0.1", sim.port, BOT_CLIENT_ID)
            await bot.connect()
            try:
                # Act: a bot works a buy of 1,000,000 USD of BIG (the largest position: 20,000)
                bot.place_limit("BIG", "BUY", 10_000, 100.0)

                # Assert: BIG's price is watched, the smallest of the five lines gave way
                await eventually(
                    lambda: lines_at_gateway(sim) == {big, *largest[:-1]},
                    what="a line for the large order's contract",
                    timeout_s=20,
                )
                await eventually(lambda: guard.book.quote(ConId(big)).last > 0, what="its price")
            finally:
                await bot.disconnect()
