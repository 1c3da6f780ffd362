"""Fields the broker leaves unset: a close never confirms flat on an unknown quantity.

On the protobuf wire (server version 201+) a field a message leaves out reaches ibapi as its
unset marker: an absent position quantity is UNSET_DECIMAL, an absent client id 2147483647. The
simulated gateway's `omit_fields` fault leaves such fields out; these drills run the real guard
against it over TCP at server version 226 and check that the guard treats an unset quantity as
unknown (never as a number, never as flat): it asks for positions again, confirms flat only on
real figures, and ends flat with no position ever crossing zero.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from guardd.retry import RetryPolicy
from ibsim.gateway import FieldOmission, SimGateway
from tests.conftest import eventually
from tests.drill_helpers import (
    FLATTEN,
    SLOW_FILLS,
    assert_flat_never_crossed,
    child_mid_fill,
    flat_and_idle,
    guard_confirms_flat,
    kill_command,
    running,
)
from tests.guard_harness import (
    AAPL,
    ES,
    flat,
    guard_config,
    journal,
    position,
    sim_gateway,
    starting_positions,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]

PROTOBUF = 226  # the wire a current TWS speaks with ibapi 10.50
QUANTITY_OMITTED = FieldOmission({"position": frozenset({"position"})}, frozenset({AAPL}))


def fast_position_retries(guard: Any) -> None:
    guard.broker.positions_retry = RetryPolicy(0.2, 0.5)


@contextlib.asynccontextmanager
async def flat_witness(guard: Any, sim: SimGateway) -> AsyncIterator[list[str]]:
    """Watches, every few ms, that the guard says "at target" only while the gateway is flat
    (no other client trades in these drills, so flat at the gateway stays flat). Yields the
    violations seen."""
    seen: list[str] = []

    async def watch_loop() -> None:
        while True:
            episode = guard.executor.episode
            if episode is not None and episode.at_target and not flat(sim):
                seen.append(f"at target while AAPL {position(sim, AAPL)}, ES {position(sim, ES)}")
            await asyncio.sleep(0.005)

    task = asyncio.create_task(watch_loop(), name="flat_witness_loop")
    try:
        yield seen
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def flat_confirmed_only_on_known_figures(records: list[dict[str, Any]]) -> bool:
    """Every `flat_confirmed` comes while no position is journaled unknown by the episode."""
    unknown: set[int] = set()
    for rec in records:
        match rec.get("kind"):
            case "close_position_unknown":
                unknown.add(int(rec["con_id"]))
            case "close_position_known":
                unknown.discard(int(rec["con_id"]))
            case "flat_confirmed" if unknown:
                return False
    return True


async def test_quantity_omitted_from_the_start_then_flat_only_once_the_figure_arrives(
    tmp_path: Path,
) -> None:
    # Arrange: AAPL 1000 and ES -2; every AAPL position update carries no quantity
    async with sim_gateway(gateway={"server_version": PROTOBUF}) as sim:
        start = starting_positions(sim)
        sim.omit_fields(QUANTITY_OMITTED)
        cfg = guard_config(sim.port, tmp_path, FLATTEN)
        async with (
            running(cfg, prepare=fast_position_retries) as guard,
            flat_witness(guard, sim) as violations,
        ):
            assert not guard.book.position(AAPL).known

            # Act: kill in flatten mode; ES closes, AAPL's quantity stays unknown
            await guard.handle(kill_command("flatten"))
            await eventually(lambda: position(sim, ES) == 0, "ES closed", timeout_s=15)
            asked = guard.broker.positions_rerequests
            await eventually(
                lambda: guard.broker.positions_rerequests >= asked + 2,
                "positions asked for again",
                timeout_s=10,
            )

            # Assert (fault on): nothing confirmed, AAPL untouched
            assert not guard.executor.episode.at_target
            assert position(sim, AAPL) == 1000
            kinds = [r["kind"] for r in journal(cfg)]
            assert "flat_confirmed" not in kinds
            assert "close_position_unknown" in kinds

            # Act: the gateway sends AAPL's quantity again
            sim.restore_fields(QUANTITY_OMITTED)
            await eventually(lambda: flat_and_idle(sim), "flat at the gateway", timeout_s=30)
            await guard_confirms_flat(guard)

        # Assert
        assert violations == []
        await assert_flat_never_crossed(sim, start)
        assert flat_confirmed_only_on_known_figures(journal(cfg))
        assert sim.omitted_messages["position"] > 0


async def test_quantities_and_ids_omitted_during_a_flatten_then_never_flat_on_them(
    tmp_path: Path,
) -> None:
    # Arrange: a slow close (each child fills 50 per market step)
    async with sim_gateway(gateway={**SLOW_FILLS, "server_version": PROTOBUF}) as sim:
        start = starting_positions(sim)
        cfg = guard_config(sim.port, tmp_path, FLATTEN)
        omission = FieldOmission(
            {
                "position": frozenset({"position"}),
                "pnl_single": frozenset({"position", "value"}),
                "order_status": frozenset({"filled", "remaining", "client_id"}),
            },
            frozenset({AAPL}),
        )
        async with (
            running(cfg, prepare=fast_position_retries) as guard,
            flat_witness(guard, sim) as violations,
        ):
            await guard.handle(kill_command("flatten"))
            await eventually(lambda: child_mid_fill(sim), "a child filling", timeout_s=10)

            # Act: AAPL's quantities, values, fill counts and client ids go missing mid-fill
            sim.omit_fields(omission)
            await eventually(lambda: flat_and_idle(sim), "flat at the gateway", timeout_s=30)
            await eventually(
                lambda: sim.omitted_messages["position"] > 0,
                "an update without quantity",
                timeout_s=10,
            )
            sim.restore_fields(omission)
            await guard_confirms_flat(guard)

        # Assert
        assert violations == []
        await assert_flat_never_crossed(sim, start)
        records = journal(cfg)
        assert flat_confirmed_only_on_known_figures(records)
        assert "close_position_unknown" in [r["kind"] for r in records]
