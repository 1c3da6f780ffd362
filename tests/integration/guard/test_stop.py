"""The guard always stops when asked: a real `guardd run` process, signalled (SIGTERM or SIGINT)
in each phase of its life, exits 0 within 2 s, journals `guard_stopped` and leaves the latch file
as it was.

Phases: the gateway is not listening (connect back-off); it accepts the TCP connection but never
answers the API handshake; it freezes while the guard syncs; the guard is flattening positions
whose close orders the gateway rejects.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from ibsim.gateway import PLACE_ORDER, SimGateway
from ibsim.types import Instrument, OrderRequest
from tests.conftest import eventually, free_port
from tests.drill_helpers import (
    REQ_POSITIONS,
    STOP_WITHIN_S,
    GuardRun,
    guardd_run,
    http_kill,
    http_ready,
)
from tests.guard_harness import GUARD_CLIENT_ID

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SIGNALS = [signal.SIGTERM, signal.SIGINT]


async def waiting_for(url: str) -> object:
    async with aiohttp.ClientSession() as session, session.get(f"{url}/readyz") as response:
        return (await response.json())["waiting_for"]


def assert_stopped_cleanly(run: GuardRun, took: float, latch_before: bytes) -> None:
    assert run.proc.returncode == 0, run.log.read_text()
    assert took <= STOP_WITHIN_S, f"stopping took {took:.2f} s"
    assert run.journal_kinds()[-1] == "guard_stopped"
    assert run.latch() == latch_before, "the latch file was touched by the stop"
    assert "Traceback" not in run.log.read_text()


@contextlib.asynccontextmanager
async def silent_gateway() -> AsyncIterator[tuple[int, list[asyncio.StreamWriter]]]:
    """A TCP listener that accepts, reads what the client sends, and never says a word."""
    accepted: list[asyncio.StreamWriter] = []

    async def swallow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(writer)
        with contextlib.suppress(ConnectionError):
            while await reader.read(4096):
                pass

    server = await asyncio.start_server(swallow, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1], accepted
    finally:
        server.close()
        for writer in accepted:
            writer.close()
        await server.wait_closed()


# ---- the phases ---------------------------------------------------------------------------------


@pytest.mark.parametrize("sig", SIGNALS, ids=lambda s: s.name)
async def test_signal_during_connect_back_off_then_stops_within_2s(
    tmp_path: Path, sig: signal.Signals
) -> None:
    async with guardd_run(tmp_path, free_port()) as (run, url, _):  # nothing listens
        await eventually(lambda: run.logged("ib_connect_failed"), "a failed connect", timeout_s=10)
        assert await waiting_for(url) == "ib_connect"
        latch = run.latch()

        took = await run.stop_with(sig)

    assert_stopped_cleanly(run, took, latch)
    assert "ib_connected" not in run.journal_kinds()


@pytest.mark.parametrize("sig", SIGNALS, ids=lambda s: s.name)
async def test_signal_while_gateway_never_answers_the_handshake_then_stops_within_2s(
    tmp_path: Path, sig: signal.Signals
) -> None:
    async with silent_gateway() as (port, accepted), guardd_run(tmp_path, port) as (run, url, _):
        await eventually(lambda: accepted != [], "the guard's TCP connection", timeout_s=10)
        assert await waiting_for(url) == "ib_connect"
        latch = run.latch()

        took = await run.stop_with(sig)

    assert_stopped_cleanly(run, took, latch)


@pytest.mark.parametrize("sig", SIGNALS, ids=lambda s: s.name)
async def test_signal_while_gateway_frozen_during_sync_then_stops_within_2s(
    tmp_path: Path, sim: SimGateway, sig: signal.Signals
) -> None:
    freezes: list[asyncio.Task[None]] = []

    def freeze_on_sync(client_id: int, msg_id: int, fields: list[str]) -> None:
        if client_id == GUARD_CLIENT_ID and msg_id == REQ_POSITIONS and not freezes:
            freezes.append(sim.start_freeze(30))

    sim.on_message(freeze_on_sync)
    try:
        async with guardd_run(tmp_path, sim.port) as (run, url, _):
            await eventually(lambda: sim.frozen, "the gateway frozen mid-sync", timeout_s=10)
            assert await waiting_for(url) == "ib_sync"
            latch = run.latch()

            took = await run.stop_with(sig)
    finally:
        for task in freezes:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    assert_stopped_cleanly(run, took, latch)
    assert "ib_connected" in run.journal_kinds()


def reject_guard_orders(request: OrderRequest, instrument: Instrument) -> str | None:
    return "drill: the close is rejected" if request.client_id == GUARD_CLIENT_ID else None


@pytest.mark.parametrize("sig", SIGNALS, ids=lambda s: s.name)
async def test_signal_mid_flatten_then_stops_within_2s_and_stays_halted(
    tmp_path: Path, sim: SimGateway, sig: signal.Signals
) -> None:
    sim.reject_orders(reject_guard_orders)  # the flatten can never finish
    placed: list[float] = []
    sim.on_message(
        lambda client_id, msg_id, _: (
            placed.append(time.monotonic())
            if client_id == GUARD_CLIENT_ID and msg_id == PLACE_ORDER
            else None
        )
    )
    async with guardd_run(tmp_path, sim.port) as (run, url, token), aiohttp.ClientSession() as s:
        await http_ready(s, url)
        status, body = await http_kill(s, url, token, mode="flatten")
        assert status == 200, body
        await eventually(lambda: placed != [], "a close order sent", timeout_s=10)
        latch = run.latch()
        assert json.loads(latch)["halted"] is True

        took = await run.stop_with(sig)

    assert_stopped_cleanly(run, took, latch)
    kinds = run.journal_kinds()
    assert "close_stopped" in kinds
    assert kinds.index("close_started") < kinds.index("guard_stopped")
