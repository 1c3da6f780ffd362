"""Drills: the guard knows its own orders by identity, never by their orderRef label.

A bot labels its orders `guardd:flatten:...` like the guard's close children. The guard checks and
sweeps them like any other order, journals each once (`own_ref_impersonated`), counts them
(`guardd_impersonated_orders_total`) and flags them (the `impersonation` finding). A guard killed
with -9 in the middle of a flatten and restarted still knows its own children (re-claimed from the
journal), and only those.
"""

from __future__ import annotations

import os
import signal
from decimal import Decimal
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from guardd.core.engine import State
from guardd.state.journal import Journal, read_journal
from ibsim.bot import RunawayBot
from ibsim.gateway import SimGateway
from tests.conftest import eventually
from tests.drill_helpers import (
    GuardProcesses,
    http_kill,
    http_ready,
    kill_command,
    running,
    wait_gone,
    write_run_config,
)
from tests.guard_harness import (
    AAPL,
    ACCOUNT,
    GUARD_CLIENT_ID,
    flat,
    guard_config,
    journal,
    sim_gateway,
    starting_positions,
    zero_crossings,
)

pytestmark = pytest.mark.integration

BOT_CLIENT_ID = 7
LABEL = "guardd:flatten:1:1"  # what the guard's first flatten child of decision 1 is called
FAR_BELOW = 1.0  # a BUY limit far under AAPL's 190: it rests, never fills


async def bot_on(sim: SimGateway) -> RunawayBot:
    bot = RunawayBot("127.0.0.1", sim.port, BOT_CLIENT_ID)
    await bot.connect()
    return bot


def impersonated_metric(guard: Any) -> float | None:
    value: float | None = guard.registry.get_sample_value(
        "guardd_impersonated_orders_total", {"account": ACCOUNT}
    )
    return value


def impersonations(records: list[dict[str, Any]]) -> list[tuple[int, int, int, str]]:
    return [
        (int(r["client_id"]), int(r["order_id"]), int(r["perm_id"]), str(r["order_ref"]))
        for r in records
        if r.get("kind") == "own_ref_impersonated"
    ]


def bot_order(sim: SimGateway, order_id: int) -> Any:
    """The gateway's record of the bot's order as it is now (`orders()` returns copies)."""
    return next(
        o for o in sim.exchange.orders() if o.client_id == BOT_CLIENT_ID and o.order_id == order_id
    )


async def test_bot_labels_order_as_guard_child_while_halted_then_swept_reported_once(
    sim: SimGateway, tmp_path: Path
) -> None:
    # Arrange: HALTED (kill mode cancel), the kill's cancel sent
    cfg = guard_config(sim.port, tmp_path)
    async with running(cfg) as guard:
        await guard.handle(kill_command("cancel"))
        assert guard.engine.state == State.HALTED
        bot = await bot_on(sim)
        try:
            # Act: the bot's order carries the guard's label
            order_id = bot.place_limit("AAPL", "BUY", 100, FAR_BELOW, order_ref=LABEL)
            await eventually(
                lambda: any(o.order_id == order_id for o in sim.exchange.orders()),
                "the bot's order at the gateway",
            )
            await eventually(
                lambda: not bot_order(sim, order_id).is_working,
                "the labelled order swept",
                timeout_s=10,
            )
            impostor = bot_order(sim, order_id)
            await eventually(
                lambda: "impersonation" in guard.status()["findings"], "the impersonation finding"
            )
            status = guard.status()
            metric = impersonated_metric(guard)
        finally:
            await bot.disconnect()

    # Assert: swept like any other order, reported once (it had several order events)
    assert impostor.status == "Cancelled"
    assert sim.exchange.working_orders() == []
    assert impersonations(journal(cfg)) == [(BOT_CLIENT_ID, order_id, impostor.perm_id, LABEL)]
    assert metric == 1.0
    finding = status["findings"]["impersonation"]  # type: ignore[index]
    assert finding["level"] == "warn"
    assert "impersonating the guard" in finding["message"]


async def test_bot_labels_order_above_per_order_limit_then_kill(
    sim: SimGateway, tmp_path: Path
) -> None:
    # Arrange: ARMED, at most 500 shares per order
    cfg = guard_config(sim.port, tmp_path, "[limits.per_order]\nmax_quantity = 500\n")
    async with running(cfg) as guard:
        assert guard.engine.state == State.ARMED
        bot = await bot_on(sim)
        try:
            # Act
            order_id = bot.place_limit("AAPL", "BUY", 1000, FAR_BELOW, order_ref=LABEL)
            await eventually(
                lambda: guard.engine.state == State.HALTED, "the per-order kill", timeout_s=10
            )
            await eventually(lambda: sim.exchange.working_orders() == [], "cancelled", timeout_s=10)
            latch = guard.engine.latch
        finally:
            await bot.disconnect()

    # Assert
    assert latch is not None and latch.source == "rule:order_checks"
    assert bot_order(sim, order_id).status == "Cancelled"
    assert [r[1] for r in impersonations(journal(cfg))] == [order_id]


async def test_journal_unwritable_when_bot_labels_order_above_limit_then_kill_anyway(
    sim: SimGateway, tmp_path: Path
) -> None:
    # Arrange: ARMED, at most 500 shares per order; the journal can no longer be written (as on a
    # full disk: every append raises JournalError)
    cfg = guard_config(sim.port, tmp_path, "[limits.per_order]\nmax_quantity = 500\n")
    async with running(cfg) as guard:
        guard.journal.close()
        bot = await bot_on(sim)
        try:
            # Act: the impostor's record cannot be written, the kill must happen all the same
            order_id = bot.place_limit("AAPL", "BUY", 1000, FAR_BELOW, order_ref=LABEL)
            await eventually(
                lambda: guard.engine.state == State.HALTED, "the per-order kill", timeout_s=10
            )
            await eventually(lambda: sim.exchange.working_orders() == [], "cancelled", timeout_s=10)
            errors = guard.registry.get_sample_value(
                "guardd_journal_write_errors_total", {"account": ACCOUNT}
            )
            metric = impersonated_metric(guard)
        finally:
            await bot.disconnect()

    # Assert: swept, still counted, and every unwritten record counted as a journal error
    assert bot_order(sim, order_id).status == "Cancelled"
    assert metric == 1.0
    assert errors is not None and errors >= 2  # own_ref_impersonated, then the kill's records


@pytest.mark.slow
@pytest.mark.timeout(90)
async def test_guard_killed_mid_flatten_then_restart_knows_its_children_and_only_them(
    tmp_path: Path,
) -> None:
    # Arrange: a slow close (AAPL fills 50 per 0.1 s), so a child is working when the guard dies
    async with sim_gateway(gateway={"partial_fill_quantity": 50, "market_interval_s": 0.1}) as sim:
        start = starting_positions(sim)
        procs = GuardProcesses()
        config, url, token = write_run_config(tmp_path, sim.port, '[kill]\nmode = "flatten"\n')
        log = tmp_path / "guardd.log"
        jpath = tmp_path / "journal.jsonl"

        def records() -> list[dict[str, Any]]:
            return list(read_journal(jpath)) if jpath.exists() else []

        def since_restart() -> list[dict[str, Any]]:
            recs = records()
            starts = [i for i, r in enumerate(recs) if r.get("kind") == "guard_started"]
            return recs[starts[1] :] if len(starts) >= 2 else []

        def child_mid_fill() -> bool:
            return any(
                o.client_id == GUARD_CLIENT_ID and o.is_working and o.filled > 0
                for o in sim.exchange.orders()
            )

        try:
            async with aiohttp.ClientSession() as http:
                first = procs.start(config, log, fresh_start=True)
                try:
                    await http_ready(http, url)
                    status, body = await http_kill(http, url, token)
                    assert status == 200, body
                    await eventually(child_mid_fill, "a child working, partly filled", timeout_s=10)
                finally:
                    os.kill(first, signal.SIGKILL)
                await wait_gone(first)
                await eventually(lambda: GUARD_CLIENT_ID not in sim.sessions, "gone", timeout_s=5)
            sent = [r for r in records() if r.get("kind") == "child_order_sent"]
            alive_children = [
                o for o in sim.exchange.orders() if o.client_id == GUARD_CLIENT_ID and o.is_working
            ]
            assert sent and alive_children, "the guard died with no child working"

            # Act: restart; once it has re-synced and swept, a bot labels an order exactly
            # like one of the dead guard's children
            second = procs.start(config, log, fresh_start=False)
            try:
                await eventually(
                    lambda: any(r.get("kind") == "global_cancel_sent" for r in since_restart()),
                    "the restarted guard's sweep",
                    timeout_s=15,
                )
                bot = await bot_on(sim)
                try:
                    label = str(sent[0]["order_ref"])
                    order_id = bot.place_limit("AAPL", "BUY", 100, FAR_BELOW, order_ref=label)
                    await eventually(
                        lambda: (
                            flat(sim)
                            and sim.exchange.working_orders() == []
                            and any(r.get("kind") == "flat_confirmed" for r in since_restart())
                            and impersonations(since_restart()) != []
                        ),
                        "flat, swept, confirmed and the impostor reported",
                        timeout_s=30,
                    )
                finally:
                    await bot.disconnect()
            finally:
                os.kill(second, signal.SIGTERM)
            await wait_gone(second)
        finally:
            procs.close()

        # Assert: the restarted guard knew the dead guard's children as its own (none of them
        # reported as an impostor, their fills counted: closed exactly the start, never past
        # zero) and the bot's order was not one of them
        after = since_restart()
        assert after[0]["halted"] is True
        # each child's permId was journaled when the broker first reported it (by the dead
        # guard, or by the restarted one for what it had not seen): what a restart claims by
        acknowledged = {
            int(r["order_id"]): int(r["perm_id"])
            for r in records()
            if r.get("kind") == "child_order_acknowledged"
        }
        at_gateway = {
            o.order_id: o.perm_id for o in sim.exchange.orders() if o.client_id == GUARD_CLIENT_ID
        }
        assert acknowledged and all(at_gateway[i] == p for i, p in acknowledged.items())
        impostor = bot_order(sim, order_id)
        assert impersonations(after) == [(BOT_CLIENT_ID, order_id, impostor.perm_id, label)]
        assert impostor.status == "Cancelled"
        guard_filled: dict[int, Decimal] = {}
        for f in sim.exchange.fills():
            if f.client_id == GUARD_CLIENT_ID:
                sign = 1 if f.side == "BOT" else -1
                con = f.instrument.con_id
                guard_filled[con] = guard_filled.get(con, Decimal(0)) + sign * Decimal(
                    str(f.shares)
                )
        assert guard_filled == {con: -Decimal(str(q)) for con, q in start.items()}
        assert zero_crossings(sim, start) == []
        assert sim.exchange.working_orders() == []
        assert AAPL in start


async def test_ids_a_previous_life_sent_then_never_handed_out_again_nor_claimed(
    sim: SimGateway, tmp_path: Path
) -> None:
    # Arrange: a previous process journaled children 1 and 2 of an old (finished) flatten; the
    # gateway's next valid id is 1 again
    cfg = guard_config(sim.port, tmp_path)
    old = Journal(cfg.journal_path)
    for n in (1, 2):
        old.append("child_order_sent", decision_id=3, order_id=n, order_ref=f"guardd:flatten:3:{n}")
    old.close()

    # Act
    async with running(cfg) as guard:
        next_id = int(guard.broker.next_order_id())
        claimed = guard.book.claimed_order_ids

    # Assert: the ids stay reserved, but they are not the guard's orders now (not restored)
    assert next_id == 3
    assert claimed == frozenset()
