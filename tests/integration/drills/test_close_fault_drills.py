"""Never past flat, whatever the broker's data looks like: close drills under broker faults.

Each drill runs the real guard (in process, or as `guardd run` processes killed with -9) against
the simulated gateway over TCP, flattens under one fault, and checks the end state three ways: an
independent ibapi client sees no position and no working order; the gateway's fill record shows
no position ever crossed zero (`zero_crossings`); and the guard's own fills add up to exactly what
there was to close, after what others traded.

Faults: position updates delayed by seconds while another client trades the same contract, and
while IB liquidates; kill -9 mid-flatten and a restart with positions delayed; a gateway restart
with positions delayed; a silent socket freeze while a child is in flight; the guard's working
child cancelled by someone else while the guard is cut off.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
from decimal import Decimal
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from guardd.state.journal import journal_segments, read_journal
from ibsim.gateway import PLACE_ORDER
from ibsim.types import OrderRequest
from tests.conftest import eventually
from tests.drill_helpers import (
    FLATTEN,
    SLOW_FILLS,
    GuardProcesses,
    assert_flat_never_crossed,
    child_mid_fill,
    client,
    flat_and_idle,
    guard_confirms_flat,
    http_kill,
    http_ready,
    kill_command,
    others_totals,
    running,
    wait_gone,
    write_run_config,
)
from tests.guard_harness import (
    AAPL,
    ACCOUNT,
    GUARD_CLIENT_ID,
    guard_config,
    journal,
    journal_kinds,
    position,
    sim_gateway,
    starting_positions,
)
from tests.ibapi_harness import market_order, stock

pytestmark = [pytest.mark.integration, pytest.mark.both_wires, pytest.mark.slow]

BOT = 7
DELAY_S = 1.5  # how late the gateway sends position updates in the delayed drills


# ---- positions delayed by seconds while others trade the same contract --------------------------


async def test_positions_delayed_while_a_bot_trades_the_same_contract_then_flat_never_crossed(
    tmp_path: Path,
) -> None:
    # Arrange: AAPL 1000 (and ES -2); position updates 1.5 s late; the guard's child is filling
    async with sim_gateway(gateway=SLOW_FILLS) as sim:
        start = starting_positions(sim)
        cfg = guard_config(sim.port, tmp_path, FLATTEN)
        sim.delay_positions(DELAY_S)
        async with running(cfg) as guard, client(sim.port, BOT) as bot:
            await guard.handle(kill_command("flatten"))
            await eventually(lambda: child_mid_fill(sim), "a child filling", timeout_s=10)

            # Act: another client sells 300 and buys 200 AAPL at market meanwhile
            first = int(bot.named("nextValidId")[0][0])
            bot.placeOrder(first, stock("AAPL"), market_order("SELL", 300))
            bot.placeOrder(first + 1, stock("AAPL"), market_order("BUY", 200))
            await eventually(lambda: flat_and_idle(sim), "flat at the gateway", timeout_s=30)
            await guard_confirms_flat(guard)

        # Assert
        await assert_flat_never_crossed(sim, start)
        # the bot's orders filled in part before the guard's sweep cancelled the rest
        bot_sold = sum(
            f.shares for f in sim.exchange.fills() if f.client_id == BOT and f.side == "SLD"
        )
        assert bot_sold > 0, "the drill did not exercise a foreign fill on the contract"


async def test_positions_delayed_while_ib_liquidates_then_flat_never_crossed(
    tmp_path: Path,
) -> None:
    # Arrange
    async with sim_gateway(gateway=SLOW_FILLS) as sim:
        start = starting_positions(sim)
        cfg = guard_config(sim.port, tmp_path, FLATTEN)
        sim.delay_positions(DELAY_S)
        async with running(cfg) as guard:
            await guard.handle(kill_command("flatten"))
            await eventually(lambda: child_mid_fill(sim), "a child filling", timeout_s=10)

            # Act: IB liquidates 400 AAPL while the guard's child works and the stream lags
            sim.liquidate(ACCOUNT, AAPL, 400)
            await eventually(lambda: flat_and_idle(sim), "flat at the gateway", timeout_s=30)
            await guard_confirms_flat(guard)

        # Assert
        await assert_flat_never_crossed(sim, start)
        assert others_totals(sim) == {AAPL: Decimal(-400)}
        assert "child_cancel_requested" in journal_kinds(cfg), "the child was left to over-fill"


# ---- kill -9 mid-flatten, restarted with positions delayed --------------------------------------


async def test_guard_killed_mid_flatten_restarted_with_positions_delayed_then_flat_never_crossed(
    tmp_path: Path,
) -> None:
    # Arrange: a `guardd run` process flattening slowly, position updates 1.5 s late
    async with sim_gateway(gateway=SLOW_FILLS) as sim:
        start = starting_positions(sim)
        sim.delay_positions(DELAY_S)
        procs = GuardProcesses()
        config, url, token = write_run_config(tmp_path, sim.port, FLATTEN)
        log, jpath = tmp_path / "guardd.log", tmp_path / "journal.jsonl"

        def since_restart() -> list[dict[str, Any]]:
            recs = list(read_journal(jpath)) if jpath.exists() else []
            starts = [i for i, r in enumerate(recs) if r.get("kind") == "guard_started"]
            return recs[starts[1] :] if len(starts) >= 2 else []

        try:
            async with aiohttp.ClientSession() as http:
                first = procs.start(config, log, fresh_start=True)
                try:
                    await http_ready(http, url)
                    status, body = await http_kill(http, url, token)
                    assert status == 200, body
                    await eventually(lambda: child_mid_fill(sim), "a child filling", timeout_s=10)
                finally:
                    os.kill(first, signal.SIGKILL)
                await wait_gone(first)
                await eventually(lambda: GUARD_CLIENT_ID not in sim.sessions, "gone", timeout_s=5)
            assert child_mid_fill(sim), "the guard died with no child working"

            # Act: restart while the dead guard's child keeps filling and its position updates
            # are still on their way (they arrive after the restarted guard's snapshot)
            second = procs.start(config, log, fresh_start=False)
            try:
                await eventually(
                    lambda: (
                        flat_and_idle(sim)
                        and any(r.get("kind") == "flat_confirmed" for r in since_restart())
                    ),
                    "flat at the gateway, confirmed by the restarted guard",
                    timeout_s=30,
                )
            finally:
                os.kill(second, signal.SIGTERM)
            await wait_gone(second)
        finally:
            procs.close()

        # Assert
        await assert_flat_never_crossed(sim, start)
        assert since_restart()[0]["halted"] is True


# ---- the journal rotates in the middle of a flatten; kill -9; the restart finds what it needs ---

ROTATING = (
    FLATTEN
    + """
[journal]
rotate = "size"
max_bytes = 1024
"""
)


async def test_journal_rotated_mid_flatten_killed_and_latch_lost_then_witness_and_children_restored(
    tmp_path: Path,
) -> None:
    # Arrange: a `guardd run` process whose journal starts a new segment every 1 KiB
    async with sim_gateway(gateway=SLOW_FILLS) as sim:
        start = starting_positions(sim)
        procs = GuardProcesses()
        config, url, token = write_run_config(tmp_path, sim.port, ROTATING)
        log, jpath, latch = (
            tmp_path / "guardd.log",
            tmp_path / "journal.jsonl",
            tmp_path / "latch.json",
        )
        try:
            async with aiohttp.ClientSession() as http:
                first = procs.start(config, log, fresh_start=True)
                try:
                    await http_ready(http, url)
                    armed_latch = latch.read_bytes()  # the latch before the kill
                    status, body = await http_kill(http, url, token)
                    assert status == 200, body
                    await eventually(lambda: child_mid_fill(sim), "a child filling", timeout_s=10)
                finally:
                    os.kill(first, signal.SIGKILL)
                await wait_gone(first)
                await eventually(lambda: GUARD_CLIENT_ID not in sim.sessions, "gone", timeout_s=5)
            assert child_mid_fill(sim), "the guard died with no child working"
            # The drill's premise: the kill and its first children are in rotated segments only.
            # (No live file at all when the kill fell between a rotation's rename and the new
            # file: the records are all in segments then; the restart creates it.)
            raw = jpath.read_bytes() if jpath.exists() else b""
            live = [json.loads(line) for line in raw.splitlines()]
            everything = list(read_journal(jpath))
            kill = next(r for r in everything if r.get("kind") == "decision" and r.get("latch"))
            sent = [r for r in everything if r.get("kind") == "child_order_sent"]
            assert kill not in live and sent and sent[0] not in live
            # ... and the latch file never learnt of the kill (its write lost): the journal,
            # in an older segment, is the only witness left.
            latch.write_bytes(armed_latch)

            # Act: restart while the dead guard's child keeps filling
            second = procs.start(config, log, fresh_start=False)
            try:
                await eventually(
                    lambda: (
                        flat_and_idle(sim)
                        and any(r.get("kind") == "flat_confirmed" for r in since_start(jpath, 2))
                    ),
                    "flat at the gateway, confirmed by the restarted guard",
                    timeout_s=30,
                )
            finally:
                os.kill(second, signal.SIGTERM)
            await wait_gone(second)
        finally:
            procs.close()

        # Assert: HALTED from the journal's witness, the children ours again, never past flat
        restarted = since_start(jpath, 2)[0]
        assert restarted["halted"] is True and restarted["latch_from"] == "journal"
        assert restarted["latch_reason"] == kill["latch"]["reason"]
        assert '"close_children_restored"' in log.read_text()
        await assert_flat_never_crossed(sim, start)
        assert len(journal_segments(jpath)) > 3


def since_start(jpath: Path, nth: int) -> list[dict[str, Any]]:
    """The journal's records from the `nth` guard_started on (all segments), or []."""
    recs = list(read_journal(jpath)) if journal_segments(jpath) else []
    starts = [i for i, r in enumerate(recs) if r.get("kind") == "guard_started"]
    return recs[starts[nth - 1] :] if len(starts) >= nth else []


# ---- a gateway restart with positions delayed during a flatten ----------------------------------


async def test_gateway_restarts_with_positions_delayed_during_flatten_then_flat_never_crossed(
    tmp_path: Path,
) -> None:
    # Arrange
    async with sim_gateway(gateway=SLOW_FILLS) as sim:
        start = starting_positions(sim)
        cfg = guard_config(sim.port, tmp_path, FLATTEN)
        sim.delay_positions(DELAY_S)
        async with running(cfg) as guard:
            await guard.handle(kill_command("flatten"))
            await eventually(lambda: child_mid_fill(sim), "a child filling", timeout_s=10)

            # Act: the gateway restarts (order ids rolled back); updates from before it are late
            await sim.restart(0.5, next_order_id=1)
            await eventually(lambda: flat_and_idle(sim), "flat at the gateway", timeout_s=30)
            await guard_confirms_flat(guard)

        # Assert
        await assert_flat_never_crossed(sim, start)
        assert guard.book.generation >= 2, "the guard did not go through a reconnect"


# ---- a silent socket freeze while a child is in flight ------------------------------------------


async def test_socket_freezes_while_a_child_is_in_flight_then_flat_never_crossed(
    tmp_path: Path,
) -> None:
    # Arrange: orders are matched 50 ms after they arrive, so the first child the guard sends
    # reaches the exchange during the freeze: its acknowledgement and fills are held back
    async with sim_gateway(gateway={**SLOW_FILLS, "fill_latency_s": 0.05}) as sim:
        start = starting_positions(sim)
        cfg = guard_config(sim.port, tmp_path, FLATTEN)
        freezes: list[asyncio.Task[None]] = []

        def freeze_on_first_child(client_id: int, msg_id: int, fields: list[str]) -> None:
            if client_id == GUARD_CLIENT_ID and msg_id == PLACE_ORDER and not freezes:
                freezes.append(sim.start_freeze(3.0))

        sim.on_message(freeze_on_first_child)
        async with running(cfg, heartbeat=(0.5, 1.0)) as guard:
            # Act
            await guard.handle(kill_command("flatten"))
            await eventually(lambda: bool(freezes), "a child sent", timeout_s=10)
            await freezes[0]
            await eventually(lambda: flat_and_idle(sim), "flat at the gateway", timeout_s=30)
            await guard_confirms_flat(guard)

        # Assert
        await assert_flat_never_crossed(sim, start)
        kinds = journal_kinds(cfg)
        assert "ib_disconnected" in kinds, "the freeze was not noticed"
        assert sim.freezes == 1


# ---- orders cancelled by someone else while the guard is disconnected ---------------------------


async def test_child_cancelled_by_someone_else_while_guard_cut_off_then_rest_closed_never_crossed(
    tmp_path: Path,
) -> None:
    # Arrange
    async with sim_gateway(gateway=SLOW_FILLS) as sim:
        start = starting_positions(sim)
        cfg = guard_config(sim.port, tmp_path, FLATTEN)
        async with running(cfg) as guard:
            await guard.handle(kill_command("flatten"))
            await eventually(lambda: child_mid_fill(sim), "a child filling", timeout_s=10)

            # Act: the guard is cut off for 1 s; meanwhile its working child is cancelled
            cancelled = await sim.cancel_orders_while_dropped(1.0, client_id=GUARD_CLIENT_ID)
            left = position(sim, AAPL)
            await eventually(lambda: flat_and_idle(sim), "flat at the gateway", timeout_s=30)
            await guard_confirms_flat(guard)

        # Assert: the lost child was given up only after the re-sync showed it gone, and what
        # it had not filled was closed by a new one
        assert cancelled >= 1 and 0 < left < start[AAPL]
        await assert_flat_never_crossed(sim, start)
        assert "child_order_lost" in journal_kinds(cfg)


# ---- one journal fsync a round: every child durable before the gateway has it ------------------

MANY = 24


async def test_flatten_many_positions_then_every_child_journaled_before_gateway_and_fsync_per_round(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Arrange: 24 stock positions, long and short (three rounds of children at the default
    # budget); the journal's fsyncs counted; the gateway reads the journal as each order arrives
    instruments = [
        {"symbol": f"S{n:02d}", "con_id": 500_000 + n, "price": 50.0 + n, "volatility": 0.0}
        for n in range(MANY)
    ]
    held = [
        {"symbol": f"S{n:02d}", "quantity": 100 if n % 2 else -100, "avg_price": 50.0}
        for n in range(MANY)
    ]
    async with sim_gateway(instruments=instruments, positions=held) as sim:
        start = starting_positions(sim)
        cfg = guard_config(sim.port, tmp_path, FLATTEN)
        not_journaled: list[int] = []

        def on_order(client_id: int, order: OrderRequest) -> None:
            if client_id != GUARD_CLIENT_ID:
                return
            journaled = {
                r.get("order_id")
                for r in read_journal(cfg.journal_path)
                if r.get("kind") == "child_order_sent"
            }
            if order.order_id not in journaled:
                not_journaled.append(order.order_id)

        sim.on_order(on_order)
        journal_fsyncs: list[int] = []
        real_fsync = os.fsync

        def fsync(fd: int) -> None:
            if os.readlink(f"/proc/self/fd/{fd}") == str(cfg.journal_path):
                journal_fsyncs.append(fd)
            real_fsync(fd)

        monkeypatch.setattr(os, "fsync", fsync)
        async with running(cfg) as guard:
            fsyncs_before, records_before = len(journal_fsyncs), len(journal(cfg))

            # Act
            await guard.handle(kill_command("flatten"))
            await guard_confirms_flat(guard)
            fsyncs = len(journal_fsyncs) - fsyncs_before
            records = len(journal(cfg)) - records_before

        # Assert: flat, never crossed, closed exactly; each child's record was in the journal
        # when the gateway got the order (so a restart after any send knows the child); and a
        # round's records (children, acknowledgements, anchors) shared one fsync, not one each
        await assert_flat_never_crossed(sim, start)
        children = [r for r in journal(cfg) if r.get("kind") == "child_order_sent"]
        assert len(children) == MANY
        assert not_journaled == [], "an order reached the gateway before its journal record"
        assert fsyncs * 2 < records, f"{fsyncs} journal fsyncs for {records} records"
