"""The guard end to end: a real `Guard` against the simulated IB Gateway over loopback TCP.

Every assertion is on the gateway's own state (its orders, fills, positions, global cancels and
pacing counter) or on the guard's latch file and audit journal; nothing is mocked.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections import Counter
from collections.abc import AsyncIterator
from decimal import Decimal
from pathlib import Path

import pytest

from guardd.control.commands import ControlCommand
from guardd.core.engine import State
from guardd.runtime.guard import Guard
from ibsim.bot import RunawayBot
from ibsim.gateway import SimGateway
from ibsim.types import OrderRequest
from tests.conftest import eventually
from tests.guard_harness import (
    AAPL,
    ACCOUNT,
    ES,
    GUARD_CLIENT_ID,
    flat,
    guard_config,
    guard_fill_totals,
    guard_orders,
    journal,
    journal_kinds,
    position,
    running_guard,
    sim_gateway,
    starting_positions,
    zero_crossings,
)

pytestmark = [pytest.mark.integration, pytest.mark.both_wires]

BOT_CLIENT_ID = 7

RUNAWAY_LIMITS = """
[limits.order_rate.per_client_1s]
kill = 5

[kill]
mode = "cancel"
"""

LEVERAGE_KILL = """
[limits.leverage]
kill = 0.5
max_data_age_s = 10.0

[kill]
mode = "flatten"

[flatten]
verify_timeout_s = 20.0
"""


class SentRefs:
    """Every orderRef the guard's client sends in a placeOrder, as the gateway receives it."""

    def __init__(self, sim: SimGateway) -> None:
        self.refs: list[str] = []
        sim.on_order(self._on_order)

    def _on_order(self, client_id: int, req: OrderRequest) -> None:
        if client_id == GUARD_CLIENT_ID:
            self.refs.append(req.order_ref)

    def duplicates(self) -> list[str]:
        return [ref for ref, n in Counter(self.refs).items() if n > 1]


@contextlib.asynccontextmanager
async def bot_on(sim: SimGateway) -> AsyncIterator[RunawayBot]:
    bot = RunawayBot("127.0.0.1", sim.port, BOT_CLIENT_ID)
    await bot.connect()
    try:
        yield bot
    finally:
        await bot.disconnect()


def bot_orders(sim: SimGateway) -> list[object]:
    return [o for o in sim.exchange.orders() if o.client_id == BOT_CLIENT_ID]


def read_latch_file(path: Path) -> dict[str, object]:
    data: dict[str, object] = json.loads(path.read_text())
    return data


# ---- 1. runaway bot ---------------------------------------------------------------------------


async def test_runaway_bot_then_halted_and_every_bot_order_cancelled(
    sim: SimGateway, tmp_path: Path
) -> None:
    # Arrange
    cfg = guard_config(sim.port, tmp_path, RUNAWAY_LIMITS)
    start = starting_positions(sim)
    async with running_guard(cfg) as guard, bot_on(sim) as bot:
        # Act: 30 resting orders at 12/s, far over the 5/s kill limit
        run = asyncio.create_task(bot.run_away(symbol="AAPL", price=150.0, rate=12, count=30))
        await eventually(lambda: guard.engine.state == State.HALTED, "HALTED")
        at_kill = len(bot_orders(sim))
        await run
        await eventually(lambda: not sim.exchange.working_orders(), "no working order")
        await asyncio.sleep(0.3)  # nothing new should come back to life

        # Assert
        assert guard.engine.state == State.HALTED
    orders = bot_orders(sim)
    assert len(orders) == 30 > at_kill, "the bot kept placing orders after the kill"
    assert {o.status for o in orders} == {"Cancelled"}  # type: ignore[attr-defined]
    assert sim.exchange.working_orders() == []
    assert sim.global_cancels >= 2, "orders placed after the kill were swept"
    assert starting_positions(sim) == start, "cancel mode never touches positions"
    assert guard_orders(sim) == []
    latch = read_latch_file(cfg.latch_path)
    assert latch["halted"] is True
    assert str(latch["source"]) == "rule:order_rate"
    kinds = journal_kinds(cfg)
    # The cancel first (it waits for no disk), then the decision's record, then the latch.
    first_cancel = kinds.index("global_cancel_sent")
    assert first_cancel < kinds.index("decision") < kinds.index("latch_written")
    assert sim.pacing_violations == 0


# ---- 2. leverage breach: flatten exactly to zero under delayed and duplicated positions --------


async def test_leverage_breach_with_delayed_duplicated_positions_then_flat_exactly(
    tmp_path: Path,
) -> None:
    # Arrange: AAPL 1000 fills in slices of 100; leverage (~0.66) is over the 0.5 kill
    async with sim_gateway(gateway={"partial_fill_quantity": 100}) as sim:
        sim.delay_positions(0.3)
        sim.duplicate_positions(1)
        start = starting_positions(sim)
        refs = SentRefs(sim)
        cfg = guard_config(sim.port, tmp_path, LEVERAGE_KILL)

        # Act
        async with running_guard(cfg) as guard:
            await eventually(lambda: guard.engine.state == State.HALTED, "HALTED")
            await eventually(
                lambda: guard.executor.last_flat_confirmed is not None,
                "flat confirmed",
                timeout_s=20,
            )
            await asyncio.sleep(1.0)  # late, delayed duplicates must not start a second round

        # Assert
        assert flat(sim)
        assert sim.exchange.working_orders() == []
        totals = guard_fill_totals(sim)
        assert totals == {con: -Decimal(str(q)) for con, q in start.items()}
        assert zero_crossings(sim, start) == []
        assert refs.duplicates() == []
        aapl_fills = [f for f in sim.exchange.fills() if f.instrument.con_id == AAPL]
        assert len(aapl_fills) >= 10, "children filled in slices"
        assert "flat_confirmed" in journal_kinds(cfg)
        assert sim.pacing_violations == 0


# ---- 3. daily loss ----------------------------------------------------------------------------


async def test_price_jump_breaks_daily_loss_then_halted_and_flat(
    sim: SimGateway, tmp_path: Path
) -> None:
    # Arrange: AAPL 1000 x 190 on ~1.19 M; a 40 % drop loses ~76 k (> 5 %)
    cfg = guard_config(
        sim.port,
        tmp_path,
        """
[limits.daily_loss]
kill = 0.05

[kill]
mode = "flatten"
""",
    )
    start = starting_positions(sim)
    async with running_guard(cfg) as guard:
        await asyncio.sleep(0.5)  # a few evaluations of the starting book: none may halt
        assert guard.engine.state == State.ARMED

        # Act
        sim.jump_price(AAPL, -0.40)
        await eventually(lambda: guard.engine.state == State.HALTED, "HALTED")
        await eventually(lambda: flat(sim), "flat at the gateway", timeout_s=15)

        # Assert
        latch = guard.engine.latch
        assert latch is not None and latch.source == "rule:daily_loss"
    assert read_latch_file(cfg.latch_path)["halted"] is True
    assert zero_crossings(sim, start) == []
    assert sim.exchange.working_orders() == []
    assert sim.pacing_violations == 0


# ---- 4. volatility: reduce, not flatten -------------------------------------------------------


async def test_volatility_breach_then_reducing_toward_target_leverage(
    sim: SimGateway, tmp_path: Path
) -> None:
    # Arrange: leverage ~0.66; a reduce breach brings it to 0.3
    cfg = guard_config(
        sim.port,
        tmp_path,
        """
[limits.volatility]
reduce = 0.5
target_leverage = 0.3
window_s = 5.0
max_data_age_s = 5.0

[kill]
mode = "flatten"
""",
    )
    start = starting_positions(sim)
    async with running_guard(cfg) as guard:
        await asyncio.sleep(0.5)  # a few evaluations of the starting book: none may halt
        assert guard.engine.state == State.ARMED

        # Act: AAPL starts moving 8 % a day (far over 50 % a year)
        sim.set_volatility(AAPL, 0.08)
        await eventually(lambda: guard.engine.state == State.REDUCING, "REDUCING", timeout_s=15)
        await eventually(
            lambda: "reduce_confirmed" in journal_kinds(cfg), "reduce confirmed", timeout_s=15
        )

        # Assert
        assert guard.engine.state != State.HALTED
    aapl, es = position(sim, AAPL), position(sim, ES)
    assert 0 < aapl < start[AAPL]
    assert start[ES] <= es < 0
    gross = abs(aapl) * sim.exchange.quote(AAPL).last + abs(es) * 50 * sim.exchange.quote(ES).last
    leverage = gross / sim.exchange.net_liquidation(ACCOUNT)
    assert 0.2 < leverage <= 0.36
    assert zero_crossings(sim, start) == []
    assert sim.global_cancels == 0
    assert sim.pacing_violations == 0


# ---- 5. disconnect during a flatten -----------------------------------------------------------


async def test_disconnect_during_flatten_then_resumes_flat_without_duplicate_children(
    tmp_path: Path,
) -> None:
    # Arrange: AAPL 1000 fills 25 at a time, one slice per 0.1 s market step (~4 s)
    async with sim_gateway(
        gateway={"partial_fill_quantity": 25, "market_interval_s": 0.1, "fill_latency_s": 0.2}
    ) as sim:
        start = starting_positions(sim)
        refs = SentRefs(sim)
        cfg = guard_config(sim.port, tmp_path, LEVERAGE_KILL)
        async with running_guard(cfg) as guard:
            await eventually(lambda: len(guard_orders(sim)) >= 1, "a child at the gateway")
            await eventually(lambda: guard_fill_totals(sim).get(AAPL, 0) < 0, "a fill")

            # Act
            await sim.drop_all_clients(1.0)
            await eventually(lambda: flat(sim), "flat at the gateway", timeout_s=20)
            await eventually(
                lambda: guard.executor.last_flat_confirmed is not None,
                "flat confirmed",
                timeout_s=20,
            )
            await asyncio.sleep(0.5)  # after flat confirmed nothing more may happen

            # Assert
            assert guard.engine.state == State.HALTED
        kinds = journal_kinds(cfg)
        reconnected = len(kinds) - 1 - kinds[::-1].index("ib_connected")
        assert kinds.index("ib_disconnected") < reconnected
        assert "child_order_sent" in kinds[reconnected:], "the flatten resumed after reconnect"
        assert sim.global_cancels >= 2, "cancelled again on re-sync"
        assert refs.duplicates() == []
        order_refs = [o.order_ref for o in guard_orders(sim)]
        assert len(order_refs) == len(set(order_refs))
        assert zero_crossings(sim, start) == []
        assert guard_fill_totals(sim) == {con: -Decimal(str(q)) for con, q in start.items()}
        assert sim.exchange.working_orders() == []
        assert sim.pacing_violations == 0


# ---- 6. restart while halted ------------------------------------------------------------------


async def test_killed_by_a_person_then_restarted_then_status_shows_who_killed(
    sim: SimGateway, tmp_path: Path
) -> None:
    # Arrange: alice kills
    cfg = guard_config(sim.port, tmp_path)
    async with running_guard(cfg) as guard:
        outcome = await guard.handle(
            ControlCommand(action="kill", principal="alice", channel="cli", reason="drill")
        )
        assert outcome.accepted

    # Act: the same state dir, no --fresh-start
    async with running_guard(cfg, fresh_start=False, wait_ready=False) as again:
        shown = again.status()

    # Assert: the latch file kept who killed, and the status says so
    latch = shown["latch"]
    assert isinstance(latch, dict)
    assert (latch["principal"], latch["source"], latch["reason"]) == ("alice", "cli", "drill")
    assert read_latch_file(cfg.latch_path)["principal"] == "alice"


async def test_guard_restarted_mid_flatten_then_halted_again_and_finishes_flat(
    tmp_path: Path,
) -> None:
    # Arrange: a flatten slow enough to stop the guard in the middle of it
    async with sim_gateway(gateway={"partial_fill_quantity": 50, "market_interval_s": 0.1}) as sim:
        start = starting_positions(sim)
        refs = SentRefs(sim)
        cfg = guard_config(sim.port, tmp_path, LEVERAGE_KILL)
        async with running_guard(cfg) as guard:
            await eventually(lambda: guard_fill_totals(sim).get(AAPL, 0) < 0, "a fill")
            assert guard.engine.state == State.HALTED
        assert not flat(sim), "stopped before the flatten finished"

        # Act: the same state dir, no --fresh-start
        async with running_guard(cfg, fresh_start=False, wait_ready=False) as again:
            halted_at_start = again.engine.state
            await eventually(lambda: flat(sim), "flat at the gateway", timeout_s=20)
            await eventually(
                lambda: again.executor.last_flat_confirmed is not None,
                "flat confirmed",
                timeout_s=20,
            )

        # Assert
        assert halted_at_start == State.HALTED
        assert refs.duplicates() == []
        assert zero_crossings(sim, start) == []
        assert guard_fill_totals(sim) == {con: -Decimal(str(q)) for con, q in start.items()}
        assert sim.exchange.working_orders() == []
        assert sim.pacing_violations == 0


# ---- 7. the latch file is missing -------------------------------------------------------------


async def test_missing_latch_without_fresh_start_then_halted_and_orders_cancelled(
    sim: SimGateway, tmp_path: Path
) -> None:
    # Arrange: a bot order rests before the guard starts; no latch file exists
    cfg = guard_config(sim.port, tmp_path, RUNAWAY_LIMITS)
    start = starting_positions(sim)
    async with bot_on(sim) as bot:
        bot.place_limit("AAPL", "BUY", 100, 150.0)
        await eventually(lambda: len(sim.exchange.working_orders()) == 1, "a bot order")

        # Act
        async with running_guard(cfg, fresh_start=False) as guard:
            await eventually(lambda: not sim.exchange.working_orders(), "the order cancelled")

            # Assert
            assert guard.engine.state == State.HALTED
            latch = guard.engine.latch
            assert latch is not None and latch.reason == "latch_missing"
    assert sim.global_cancels >= 1
    assert starting_positions(sim) == start, "a missing latch never closes positions"
    assert guard_orders(sim) == []
    assert sim.pacing_violations == 0


async def test_missing_latch_with_fresh_start_then_armed_and_orders_left(
    sim: SimGateway, tmp_path: Path
) -> None:
    # Arrange
    cfg = guard_config(sim.port, tmp_path, RUNAWAY_LIMITS)
    async with bot_on(sim) as bot:
        bot.place_limit("AAPL", "BUY", 100, 150.0)
        await eventually(lambda: len(sim.exchange.working_orders()) == 1, "a bot order")

        # Act
        async with running_guard(cfg, fresh_start=True) as guard:
            await asyncio.sleep(0.5)  # a fresh start must not cancel the bot's order: no event

            # Assert
            assert guard.engine.state == State.ARMED
    assert len(sim.exchange.working_orders()) == 1
    assert sim.global_cancels == 0
    assert read_latch_file(cfg.latch_path)["halted"] is False
    assert sim.pacing_violations == 0


# ---- 8. dry run -------------------------------------------------------------------------------


async def test_dry_run_breach_then_journaled_and_nothing_sent(
    sim: SimGateway, tmp_path: Path
) -> None:
    # Arrange: a leverage kill in flatten mode, in dry run, with a bot order resting
    cfg = guard_config(sim.port, tmp_path, LEVERAGE_KILL, dry_run=True)
    start = starting_positions(sim)
    refs = SentRefs(sim)
    async with bot_on(sim) as bot:
        bot.place_limit("AAPL", "BUY", 100, 150.0)
        await eventually(lambda: len(sim.exchange.working_orders()) == 1, "a bot order")

        # Act
        async with running_guard(cfg) as guard:
            await eventually(
                lambda: (
                    {"AAPL", "ES"}
                    <= {r["symbol"] for r in journal(cfg) if r["kind"] == "child_order_dry_run"}
                ),
                "both children planned",
            )
            await asyncio.sleep(0.5)  # a dry run sends nothing, however long it plans

            # Assert
            assert guard.engine.state == State.HALTED
    records = journal(cfg)
    kinds = [r["kind"] for r in records]
    assert "global_cancel_dry_run" in kinds
    assert "global_cancel_sent" not in kinds
    children = {r["symbol"]: r for r in records if r["kind"] == "child_order_dry_run"}
    assert set(children) == {"AAPL", "ES"}
    assert (children["AAPL"]["action"], children["AAPL"]["quantity"]) == ("SELL", "1000")
    assert (children["ES"]["action"], children["ES"]["quantity"]) == ("BUY", "2")
    assert sim.global_cancels == 0
    assert refs.refs == []
    assert guard_orders(sim) == []
    assert len(sim.exchange.working_orders()) == 1
    assert starting_positions(sim) == start
    assert sim.pacing_violations == 0


async def test_child_cancelled_while_guard_down_then_restart_closes_the_rest(
    tmp_path: Path,
) -> None:
    # Arrange: stopped mid-flatten; while the guard is down the gateway cancels its half-filled
    # child, so on restart the broker reports only its fills, never the order
    async with sim_gateway(gateway={"partial_fill_quantity": 50, "market_interval_s": 0.1}) as sim:
        start = starting_positions(sim)
        refs = SentRefs(sim)
        cfg = guard_config(sim.port, tmp_path, LEVERAGE_KILL)
        async with running_guard(cfg) as guard:
            await eventually(lambda: guard_fill_totals(sim).get(AAPL, 0) < 0, "a fill")
            assert guard.engine.state == State.HALTED
        sim.route(sim.exchange.global_cancel(sim.clock()))
        assert not flat(sim) and not sim.exchange.working_orders()

        # Act
        async with running_guard(cfg, fresh_start=False) as again:
            await eventually(lambda: flat(sim), "flat at the gateway", timeout_s=20)
            await eventually(
                lambda: again.executor.last_flat_confirmed is not None,
                "flat confirmed",
                timeout_s=20,
            )

        # Assert
        assert refs.duplicates() == []
        assert zero_crossings(sim, start) == []
        assert guard_fill_totals(sim) == {con: -Decimal(str(q)) for con, q in start.items()}
        assert sim.pacing_violations == 0


# ---- a kill while disconnected ----------------------------------------------------------------


async def test_kill_while_disconnected_then_latched_and_carried_out_on_reconnect(
    sim: SimGateway, tmp_path: Path
) -> None:
    # Arrange: a resting bot order, and the gateway about to drop every client for 1.5 s
    cfg = guard_config(sim.port, tmp_path, '[kill]\nmode = "flatten"\n')
    start = starting_positions(sim)
    async with bot_on(sim) as bot, running_guard(cfg) as guard:
        bot.place_limit("AAPL", "BUY", 100, 150.0)
        await eventually(lambda: len(sim.exchange.working_orders()) == 1, "a bot order")
        drop = asyncio.create_task(sim.drop_all_clients(1.5))
        await eventually(lambda: not guard.book.connected, "the guard disconnected")

        # Act
        outcome = await guard.handle(
            ControlCommand(action="kill", principal="ops", channel="cli", reason="drill")
        )
        latched = read_latch_file(cfg.latch_path)
        cancels_while_down = sim.global_cancels
        await drop
        await eventually(lambda: flat(sim), "flat at the gateway", timeout_s=15)
        await eventually(lambda: not sim.exchange.working_orders(), "no working order")

        # Assert
        assert outcome.accepted and outcome.state == "HALTED"
    assert latched["halted"] is True
    assert cancels_while_down == 0
    assert sim.global_cancels >= 1
    assert "global_cancel_deferred" in journal_kinds(cfg)
    assert zero_crossings(sim, start) == []
    assert sim.pacing_violations == 0


# ---- the Book's sampling follows the volatility window ----------------------------------------


async def test_volatility_window_then_book_keeps_the_whole_window_in_enough_samples(
    tmp_path: Path,
) -> None:
    # Arrange / Act: a one-hour window (the default) and a five-second one
    vol = "[limits.volatility]\nreduce = 0.9\ntarget_leverage = 1.0\n"
    long = Guard.open(guard_config(1, tmp_path / "long", vol))
    short = Guard.open(guard_config(1, tmp_path / "short", vol + "window_s = 5.0\n"))
    long.journal.close()
    short.journal.close()

    # Assert: the rule needs 10 samples inside its window, and the window whole
    assert long.book.price_history_s >= 3600.0
    assert long.book.price_sample_s * 10 <= 3600.0
    assert short.book.price_sample_s * 10 <= 5.0
    assert short.book.price_history_s >= 5.0


# ---- a runaway bot during a flatten -----------------------------------------------------------


async def test_runaway_bot_during_slow_flatten_then_swept_and_flat_without_over_flatten(
    tmp_path: Path,
) -> None:
    # Arrange: children fill 100 at a time, so they rest while the sweep keeps cancelling
    async with sim_gateway(gateway={"partial_fill_quantity": 100, "market_interval_s": 0.1}) as sim:
        start = starting_positions(sim)
        refs = SentRefs(sim)
        limits = RUNAWAY_LIMITS.replace('mode = "cancel"', 'mode = "flatten"')
        cfg = guard_config(sim.port, tmp_path, limits)
        async with running_guard(cfg) as guard, bot_on(sim) as bot:
            # Act
            await bot.run_away(symbol="MSFT", price=300.0, rate=12, count=30)
            await eventually(lambda: flat(sim), "flat at the gateway", timeout_s=20)
            await eventually(lambda: not sim.exchange.working_orders(), "no working order")

            # Assert
            assert guard.engine.state == State.HALTED
        assert {o.status for o in bot_orders(sim)} == {"Cancelled"}  # type: ignore[attr-defined]
        assert refs.duplicates() == []
        assert zero_crossings(sim, start) == []
        assert guard_fill_totals(sim) == {con: -Decimal(str(q)) for con, q in start.items()}
        assert sim.pacing_violations == 0
