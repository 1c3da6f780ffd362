"""Start-up: the control plane is served from the first second, before IB; a kill received before
the first connect is latched and carried out on it; /healthz, /readyz and sd STATUS say what the
guard waits for; the systemd watchdog follows the broker adapter's liveness.

Everything real: the guard's HTTP server over loopback, the ibapi client against the simulated
gateway (started only after the kill), a unix datagram socket standing in for systemd.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from guardd.broker.connection import IbConnection
from guardd.config import Config, MetricsConfig
from guardd.core.engine import Latch
from guardd.runtime.guard import Guard
from guardd.sdnotify import Notifier
from guardd.state.latch import read_latch
from ibsim.gateway import PLACE_ORDER, SimGateway
from ibsim.scenario import parse_scenario
from ibsim.server import build_gateway
from tests.conftest import eventually, free_port
from tests.drill_helpers import REQ_GLOBAL_CANCEL, GuardWire, http_answers, kill_command
from tests.fake_systemd import FakeSystemd
from tests.guard_harness import flat, guard_config, journal_kinds, scenario_data, zero_crossings

pytestmark = pytest.mark.integration


def http_config(ib_port: int, state_dir: Path, extra_toml: str = "") -> Config:
    """A guard with HTTP control (and /metrics on it) for a gateway on `ib_port`."""
    cfg = guard_config(ib_port, state_dir, extra_toml, http=True)
    return cfg.model_copy(update={"metrics": MetricsConfig(enabled=True, listen="control")})


def tokens(cfg: Config) -> dict[str, str]:
    files = cfg.control.http.token_files
    paths = {"read": files.read, "kill": files.kill, "arm": files.arm}
    return {role: path.read_text().strip() for role, path in paths.items() if path}


@contextlib.asynccontextmanager
async def guard_task(guard: Guard) -> AsyncIterator[asyncio.Task[None]]:
    """`guard.run` as a task (not waiting for IB); stopped and awaited on the way out."""
    stop = asyncio.Event()
    task = asyncio.create_task(guard.run(stop), name="guard")
    try:
        yield task
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)


async def get(session: aiohttp.ClientSession, url: str) -> tuple[int, Any]:
    async with session.get(url) as response:
        if response.content_type == "application/json":
            return response.status, await response.json()
        return response.status, await response.text()


# ---- the kill is served before the first connect ------------------------------------------------


async def test_kill_before_first_connect_then_latched_and_carried_out_on_first_sync(
    tmp_path: Path,
) -> None:
    ib_port = free_port()  # nothing listens there yet: the gateway is down
    cfg = http_config(ib_port, tmp_path / "state", '[kill]\nmode = "flatten"\n')
    token = tokens(cfg)
    guard = Guard.open(cfg, fresh_start=True)
    async with guard_task(guard), aiohttp.ClientSession() as session:
        await eventually(lambda: guard.http is not None, "HTTP started")
        assert guard.http is not None
        url = guard.http.url
        await eventually(lambda: http_answers(session, f"{url}/healthz"), "HTTP up")

        # Served before IB: health says what it waits for, readiness refuses, metrics answer.
        assert await get(session, f"{url}/healthz") == (
            200,
            {"alive": True, "waiting_for": "ib_connect"},
        )
        assert await get(session, f"{url}/readyz") == (
            503,
            {"ready": False, "waiting_for": "ib_connect"},
        )
        status, metrics = await get(session, f"{url}/metrics")
        assert status == 200 and "guardd_ib_connected" in metrics

        # A kill before the guard ever connected: accepted, latched on disk.
        headers = {"Authorization": f"Bearer {token['kill']}"}
        body = {"reason": "kill before connect"}
        async with session.post(f"{url}/v1/kill", json=body, headers=headers) as response:
            assert response.status == 200, await response.text()
            assert (await response.json())["state"] == "HALTED"
        latch = read_latch(cfg.latch_path, allow_missing=False)
        assert isinstance(latch, Latch) and latch.mode == "flatten"
        read = {"Authorization": f"Bearer {token['read']}"}
        async with session.get(f"{url}/v1/status", headers=read) as response:
            status = await response.json()
        assert (status["state"], status["waiting_for"]) == ("HALTED", "ib_connect")
        assert "global_cancel_deferred" in journal_kinds(cfg)

        # The gateway comes up with positions and a bot's working order.
        scenario = parse_scenario(scenario_data())
        async with build_gateway(scenario, host="127.0.0.1", port=ib_port) as sim:
            wire = GuardWire(sim)
            start = {p.instrument.con_id: p.position for p in sim.exchange.positions(cfg.account)}
            await eventually(lambda: flat(sim), "flat after the first connect", timeout_s=20)
            await eventually(lambda: guard.ready(), "synced")
            assert await get(session, f"{url}/readyz") == (
                200,
                {"ready": True, "waiting_for": None},
            )
            await eventually(lambda: sim.exchange.working_orders() == [], "no order")

            # The global cancel went out first, then the close orders from the synced book.
            sent = [s.msg_id for s in wire.sent if s.msg_id in (REQ_GLOBAL_CANCEL, PLACE_ORDER)]
            assert sent[0] == REQ_GLOBAL_CANCEL
            assert PLACE_ORDER in sent
            assert zero_crossings(sim, start) == []
        assert guard.engine.state == "HALTED"
    kinds = journal_kinds(cfg)
    assert kinds.index("global_cancel_deferred") < kinds.index("ib_connected")
    assert kinds.index("ib_connected") < kinds.index("global_cancel_sent")
    assert kinds[-1] == "guard_stopped"
    assert isinstance(read_latch(cfg.latch_path, allow_missing=False), Latch)  # a stop keeps it


# ---- sd_notify: STATUS follows the state, the watchdog follows liveness -------------------------


def statuses(fake: FakeSystemd) -> list[str]:
    return [
        line.removeprefix("STATUS=")
        for message in fake.messages()
        for line in message.splitlines()
        if line.startswith("STATUS=")
    ]


@pytest.fixture
def watchdog_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "200000")  # a ping decision every 0.1 s
    monkeypatch.delenv("WATCHDOG_PID", raising=False)


async def test_sd_status_then_waiting_for_ib_then_armed_then_halted(
    tmp_path: Path, systemd: FakeSystemd
) -> None:
    ib_port = free_port()
    cfg = guard_config(ib_port, tmp_path / "state")
    with Notifier(systemd.address) as notifier:
        guard = Guard.open(cfg, fresh_start=True, notifier=notifier)
        async with guard_task(guard):
            await eventually(
                lambda: any("waiting for IB at" in s for s in statuses(systemd)),
                "STATUS waiting for IB",
            )
            assert "READY=1" not in "\n".join(systemd.messages())

            scenario = parse_scenario(scenario_data())
            async with build_gateway(scenario, host="127.0.0.1", port=ib_port):
                await eventually(lambda: guard.ready_event.is_set(), "ready")
                await eventually(
                    lambda: any(m.startswith("READY=1") for m in systemd.messages()), "READY=1"
                )
                await eventually(lambda: statuses(systemd)[-1] == "ARMED; guarding", "STATUS ARMED")
                await guard.handle(kill_command(mode="cancel", reason="status drill"))
                await eventually(
                    lambda: statuses(systemd)[-1].startswith("HALTED (http: status drill)"),
                    "STATUS HALTED",
                )
    assert systemd.messages()[-1] == "STOPPING=1"


@pytest.mark.usefixtures("watchdog_env")
async def test_gateway_down_and_reconnecting_then_watchdog_keeps_pinging(
    tmp_path: Path, systemd: FakeSystemd
) -> None:
    ib_port = free_port()  # never up: the connect loop keeps retrying
    cfg = guard_config(ib_port, tmp_path / "state")
    with Notifier(systemd.address) as notifier:
        guard = Guard.open(cfg, fresh_start=True, notifier=notifier)
        guard.broker.progress_slack_s = 1.0
        async with guard_task(guard):
            await eventually(lambda: systemd.pings() != [], "the first ping")
            # Several back-off rounds (0.2 s .. 1.0 s, plus the attempt) with nothing up: the
            # adapter keeps its promises all along, and the pings keep coming.
            watched_from = time.monotonic()
            stalled: list[float] = []
            while time.monotonic() - watched_from < 3.0:
                if not guard._alive():
                    stalled.append(time.monotonic() - watched_from)
                await asyncio.sleep(0.02)
            assert stalled == [], "a retrying connect loop is alive"
            assert systemd.pings(after=watched_from + 2.5) != [], "still pinging"
            assert guard.waiting_for() == "ib_connect"


@dataclass
class Wedge:
    """Once armed, every connect attempt of the broker adapter hangs until released, as an
    attempt that deadlocks would (no timeout of its own ends it)."""

    armed: bool = False
    release: asyncio.Event = field(default_factory=asyncio.Event)


@pytest.fixture
def wedge() -> Iterator[Wedge]:
    state = Wedge()
    original = IbConnection._connect_once

    async def stuck(self: IbConnection) -> None:
        if state.armed:
            await state.release.wait()
        await original(self)

    IbConnection._connect_once = stuck  # type: ignore[method-assign]
    try:
        yield state
    finally:
        state.release.set()
        IbConnection._connect_once = original  # type: ignore[method-assign]


@pytest.mark.usefixtures("watchdog_env")
async def test_wedged_broker_adapter_then_watchdog_pings_stop_and_resume_once_unwedged(
    tmp_path: Path, systemd: FakeSystemd, wedge: Wedge, sim: SimGateway
) -> None:
    cfg = guard_config(sim.port, tmp_path / "state")
    with Notifier(systemd.address) as notifier:
        guard = Guard.open(cfg, fresh_start=True, notifier=notifier)
        guard.broker.heartbeat_interval_s, guard.broker.heartbeat_timeout_s = 0.3, 0.3
        guard.broker.progress_slack_s = 0.5
        async with guard_task(guard):
            await eventually(lambda: guard.ready_event.is_set(), "ready")
            # The gateway drops the guard's connection; the reconnect attempt hangs: the
            # adapter's promise of a next sign of life runs out and nothing reconnects.
            wedge.armed = True
            sim.sessions[guard.broker.client_id].close()
            await eventually(lambda: not guard.broker.connected, "dropped", timeout_s=5)
            await eventually(lambda: not guard._alive(), "adapter stalled", timeout_s=5)
            stalled_at = time.monotonic()
            await eventually(lambda: time.monotonic() - stalled_at > 1.0, "ten ping decisions")
            # Every decision after the stall (the first at most one interval, 0.1 s, later)
            # withheld its ping.
            assert systemd.pings(after=stalled_at + 0.3) == [], "no ping while wedged"
            assert not guard._alive()

            wedge.release.set()  # the attempt goes on: the broker reconnects
            await eventually(lambda: guard.broker.reconnects >= 1, "reconnected", timeout_s=10)
            resumed = time.monotonic()
            await eventually(
                lambda: systemd.pings(after=resumed) != [], "pings resume", timeout_s=5
            )
