"""Observability of the real guard: a real Prometheus scrapes a guard that guards the simulated
gateway, every dashboard query returns data, GuarddHalted fires after a kill; sd_notify READY,
WATCHDOG and STOPPING come from the real guard, in process and as a `guardd run` subprocess.

Needs `prometheus` (Debian package `prometheus`) and `mosquitto` on PATH; a missing tool fails
the test with the package to install. Everything listens on loopback.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import signal
import socket
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from guardd.config import Config, load_config
from guardd.control.commands import ControlCommand
from guardd.demo import DEMO_CONFIG, demo_config
from guardd.runtime.guard import Guard
from guardd.sdnotify import Notifier
from ibsim.bot import RunawayBot
from ibsim.gateway import SimGateway
from ibsim.scenario import Scenario
from ibsim.server import build_gateway
from tests.conftest import eventually, free_port
from tests.deploy_files import ALERTS, dashboard, firing_alert, panel_exprs, tool
from tests.mqtt_broker import Broker, start_broker

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ACCOUNT = "DU000001"
BOT_CLIENT_ID = 7
GUARDD = Path(sys.executable).with_name("guardd")


def guard_config(ib_port: int, state_dir: Path, *, mqtt: Broker | None = None) -> Config:
    """configs/demo.toml (order rate kill at 5/s, kill mode flatten) pointed at `ib_port`."""
    cfg = demo_config(load_config(DEMO_CONFIG), ib_port=ib_port, state_dir=state_dir)
    ib = cfg.ib.model_copy(update={"reconnect_backoff_min_s": 0.1, "reconnect_backoff_max_s": 0.2})
    update: dict[str, Any] = {"ib": ib}
    if mqtt is not None:
        broker = cfg.control.mqtt.model_copy(
            update={"enabled": True, "host": mqtt.host, "port": mqtt.port}
        )
        update["control"] = cfg.control.model_copy(update={"mqtt": broker})
    return cfg.model_copy(update=update)


@contextlib.asynccontextmanager
async def running(guard: Guard) -> AsyncIterator[asyncio.Task[None]]:
    """`guard.run` as a task, stopped and awaited on the way out."""
    stop = asyncio.Event()
    task = asyncio.create_task(guard.run(stop), name="guard")
    try:
        yield task
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)


@contextlib.asynccontextmanager
async def prometheus(directory: Path, target: str) -> AsyncIterator[str]:
    """A real Prometheus scraping `target` every second with the shipped alert rules."""
    binary = tool("prometheus", "prometheus")
    web_port = free_port()
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(ALERTS)],
        "scrape_configs": [{"job_name": "guardd", "static_configs": [{"targets": [target]}]}],
    }
    (directory / "prometheus.yml").write_text(json.dumps(config))  # JSON is YAML
    process = await asyncio.create_subprocess_exec(
        binary,
        f"--config.file={directory / 'prometheus.yml'}",
        f"--storage.tsdb.path={directory / 'tsdb'}",
        f"--web.listen-address=127.0.0.1:{web_port}",
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        yield f"http://127.0.0.1:{web_port}"
    finally:
        process.terminate()
        await process.wait()


async def query(session: aiohttp.ClientSession, url: str, expr: str) -> list[dict[str, Any]]:
    """The instant-vector result of `expr`, [] while Prometheus is not up yet."""
    try:
        async with session.get(f"{url}/api/v1/query", params={"query": expr}) as response:
            body = await response.json()
    except aiohttp.ClientError:
        return []
    assert body["status"] == "success", (expr, body)
    result: list[dict[str, Any]] = body["data"]["result"]
    return result


def finite(result: list[dict[str, Any]]) -> bool:
    """True when at least one series has a finite value (NaN is a sample, not data)."""
    return any(math.isfinite(float(series["value"][1])) for series in result)


def dashboard_queries() -> dict[str, str]:
    """Every panel expression as plain PromQL, with Grafana's variables substituted."""
    variables = {"$__rate_interval": "1m", "$__range": "1h", "$account": ACCOUNT}
    queries = {}
    for i, (title, expr) in enumerate(panel_exprs(dashboard())):
        for name, value in variables.items():
            expr = expr.replace(name, value)
        queries[f"{i} {title}"] = expr
    return queries


async def evaluated(session: aiohttp.ClientSession, url: str, alert: str, rounds: int) -> None:
    """Wait until Prometheus has evaluated the rule group of `alert` `rounds` more times."""
    seen: set[str] = set()

    async def last_evaluation() -> bool:
        async with session.get(f"{url}/api/v1/rules") as response:
            groups = (await response.json())["data"]["groups"]
        (group,) = [g for g in groups if any(r["name"] == alert for r in g["rules"])]
        seen.add(group["lastEvaluation"])
        return len(seen) > rounds  # the one seen first, then `rounds` new ones

    await eventually(last_evaluation, f"{rounds} evaluations of {alert}'s group", interval_s=0.1)


async def firing(session: aiohttp.ClientSession, url: str, name: str) -> bool:
    async with session.get(f"{url}/api/v1/alerts") as response:
        body = await response.json()
    alerts = body["data"]["alerts"]
    return any(a["labels"]["alertname"] == name and a["state"] == "firing" for a in alerts)


@pytest.fixture
def mqtt_broker(tmp_path: Path) -> Iterator[Broker]:
    broker, stop = start_broker(tmp_path / "mosquitto")
    try:
        yield broker
    finally:
        stop()


# ------------------------------------------------------------------------ Prometheus + Grafana


async def test_guard_killed_under_real_prometheus_then_every_panel_has_data_and_halted_fires(
    sim: SimGateway, mqtt_broker: Broker, tmp_path: Path
) -> None:
    (tmp_path / "state").mkdir()
    cfg = guard_config(sim.port, tmp_path / "state", mqtt=mqtt_broker)
    guard = Guard.open(cfg, fresh_start=True)
    target = f"127.0.0.1:{cfg.control.http.port}"
    queries = dashboard_queries()
    bot = RunawayBot("127.0.0.1", sim.port, BOT_CLIENT_ID)

    async with (
        running(guard),
        prometheus(tmp_path, target) as url,
        aiohttp.ClientSession() as session,
    ):
        await asyncio.wait_for(guard.ready_event.wait(), 10)
        # Armed and scraped: the shipped rules have evaluated a healthy guard.
        armed = await eventually(
            lambda: query(session, url, 'guardd_state{state="ARMED"} == 1'),
            "ARMED scraped",
            timeout_s=20,
            interval_s=0.25,
        )
        await evaluated(session, url, "GuarddHalted", rounds=2)  # over an ARMED guard
        halted_while_armed = await firing(session, url, "GuarddHalted")

        # Act: an operator kill (cancel + flatten), then a runaway bot the HALTED guard sweeps.
        outcome = await guard.handle(
            ControlCommand(action="kill", principal="test", channel="cli", reason="drill")
        )
        await bot.connect()
        try:
            await bot.run_away(symbol="AAPL", price=180.0, rate=15, count=15)
        finally:
            await bot.disconnect()
        alert = await eventually(
            lambda: firing_alert(session, url, "GuarddHalted"),
            "GuarddHalted firing after the kill",
            timeout_s=20,
            interval_s=0.25,
        )

        missing: list[str] = []

        async def every_panel_has_data() -> bool:
            missing[:] = [
                f"{name}: {expr}"
                for name, expr in queries.items()
                if not finite(await query(session, url, expr))
            ]
            return not missing

        try:
            await eventually(
                every_panel_has_data, "every panel has data", timeout_s=20, interval_s=0.25
            )
        except AssertionError as failed:
            raise AssertionError("\n".join([str(failed), *missing])) from None
        usage = await query(session, url, 'guardd_rule_kill_usage_ratio{rule="order_rate"}')
        kills = await query(session, url, 'guardd_kills_total{source="cli"}')
        breaches = await query(session, url, 'guardd_breaches_total{rule="order_rate"}')

    assert armed and not halted_while_armed
    assert outcome.accepted and outcome.state == "HALTED"
    assert alert["labels"]["account"] == ACCOUNT
    assert max(float(s["value"][1]) for s in usage) >= 1.0  # the bot broke the kill limit
    assert [float(s["value"][1]) for s in kills] == [1.0]
    assert [float(s["value"][1]) for s in breaches] == [1.0]  # counted once, not per tick


# ------------------------------------------------------------------------ sd_notify, in process


@contextlib.contextmanager
def notify_socket() -> Iterator[tuple[str, socket.socket]]:
    """A bound unix datagram socket as systemd's $NOTIFY_SOCKET (short path: sun_path is 108)."""
    with tempfile.TemporaryDirectory(prefix="gd-") as directory:
        path = os.path.join(directory, "notify")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.bind(path)
        sock.setblocking(False)
        try:
            yield path, sock
        finally:
            sock.close()


async def receive(sock: socket.socket, timeout: float) -> str | None:
    """One sd_notify datagram, or None after `timeout`."""
    loop = asyncio.get_running_loop()
    try:
        data = await asyncio.wait_for(loop.sock_recv(sock, 4096), timeout)
    except TimeoutError:
        return None
    return data.decode()


async def test_guard_under_systemd_watchdog_then_ready_only_after_sync_and_pings_follow(
    scenario: Scenario, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "400000")  # a ping every 0.2 s
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    ib_port = free_port()
    (tmp_path / "state").mkdir()
    cfg = guard_config(ib_port, tmp_path / "state")

    with notify_socket() as (address, sock):
        notifier = Notifier(address)
        guard = Guard.open(cfg, fresh_start=True, notifier=notifier)
        async with running(guard):
            # No gateway yet: the guard retries, says so, pings (a retrying connect loop is
            # alive), and must not say READY.
            before_gateway: list[str] = []
            waited_from = time.monotonic()
            while time.monotonic() - waited_from < 1.0:
                message = await receive(sock, 0.2)
                if message is not None:
                    before_gateway.append(message)
            async with build_gateway(scenario, host="127.0.0.1", port=ib_port) as gateway:
                messages: list[str] = []
                ready_seen: tuple[bool, bool, bool] | None = None
                pings_after_ready = 0
                deadline = time.monotonic() + 10
                while time.monotonic() < deadline and pings_after_ready < 3:
                    message = await receive(sock, 1.0)
                    if message is None:
                        continue
                    messages.append(message)
                    if ready_seen is None and "READY=1" in message.splitlines():
                        ready_seen = (
                            guard.book.synced,
                            guard.ready_event.is_set(),
                            cfg.ib.client_id in gateway.sessions,
                        )
                    elif ready_seen is not None and message == "WATCHDOG=1":
                        pings_after_ready += 1
        notifier.close()

    assert not any("READY=1" in m.splitlines() for m in before_gateway)
    assert f"STATUS=ARMED; waiting for IB at 127.0.0.1:{ib_port}" in before_gateway
    assert "WATCHDOG=1" in before_gateway
    assert ready_seen == (True, True, True)
    ready_at = next(i for i, m in enumerate(messages) if "READY=1" in m.splitlines())
    assert "STATUS=ARMED; guarding" in messages[ready_at].splitlines()
    assert sum(m == "WATCHDOG=1" for m in messages[ready_at + 1 :]) >= 3


# ------------------------------------------------------------------------ `guardd run` subprocess


def config_file(path: Path, *, ib_port: int, state_dir: Path, leverage_kill: float = 3.0) -> Path:
    """configs/demo.toml with the gateway port, state directory and a free HTTP port set."""
    text = DEMO_CONFIG.read_text()
    replacements = {
        "port = 7497": f"port = {ib_port}",
        'state_dir = "./state/demo"': f'state_dir = "{state_dir}"',
        "port = 8787": f"port = {free_port()}",
        "kill = 3.0": f"kill = {leverage_kill}",
        'format = "console"': 'format = "json"',
    }
    for old, new in replacements.items():
        assert text.count(old) == 1, old
        text = text.replace(old, new)
    path.write_text(text)
    return path


async def start_guardd(config: Path, notify: str | None) -> asyncio.subprocess.Process:
    if not GUARDD.exists():
        pytest.fail(f"{GUARDD} not found: install the project (scripts/bootstrap)")
    env = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC")}
    if notify is not None:
        env["NOTIFY_SOCKET"] = notify
    return await asyncio.create_subprocess_exec(
        str(GUARDD),
        "run",
        "-c",
        str(config),
        "--fresh-start",
        env=env,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )


async def test_guardd_run_sigterm_then_exit_0_and_stopping_sent(
    sim: SimGateway, tmp_path: Path
) -> None:
    config = config_file(tmp_path / "guardd.toml", ib_port=sim.port, state_dir=tmp_path / "s")

    with notify_socket() as (address, sock):
        process = await start_guardd(config, address)
        try:
            messages: list[str] = []
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and not any("READY=1" in m for m in messages):
                message = await receive(sock, 0.5)
                if message is not None:
                    messages.append(message)
            synced_client = 0 in sim.sessions
            process.send_signal(signal.SIGTERM)
            _, stderr = await asyncio.wait_for(process.communicate(), 20)
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()
        while (message := await receive(sock, 0.2)) is not None:
            messages.append(message)

    assert any("READY=1" in m.splitlines() for m in messages), stderr.decode()[-2000:]
    assert synced_client
    assert process.returncode == 0, stderr.decode()[-2000:]
    assert messages[-1].splitlines()[0] == "STOPPING=1"


async def test_guardd_run_with_bad_config_then_exit_78_naming_the_key_and_gateway_untouched(
    sim: SimGateway, tmp_path: Path
) -> None:
    # leverage kill below its reduce level (2.0): the levels are out of order
    config = config_file(
        tmp_path / "guardd.toml", ib_port=sim.port, state_dir=tmp_path / "s", leverage_kill=1.0
    )

    with notify_socket() as (address, sock):
        process = await start_guardd(config, address)
        _, stderr = await asyncio.wait_for(process.communicate(), 30)
        sent = await receive(sock, 0.5)

    assert process.returncode == 78
    assert "limits.leverage.kill" in stderr.decode()
    assert sent is None
    assert sim.sessions == {}
    assert not sim.received_by_client
    assert not (tmp_path / "s").exists()


# ------------------------------------------------------------------------ breach counting


def test_breach_held_over_many_evaluations_then_counted_once_per_level() -> None:
    from prometheus_client import CollectorRegistry

    from guardd.metrics import Metrics

    registry = CollectorRegistry()
    metrics = Metrics(registry, account=ACCOUNT, version="test")

    counted = [
        metrics.observe_level("leverage", level)
        for level in ("ok", "warn", "warn", "warn", "kill", "kill", "ok", "data", "warn")
    ]

    def breaches(level: str) -> float | None:
        labels = {"account": ACCOUNT, "rule": "leverage", "level": level}
        return registry.get_sample_value("guardd_breaches_total", labels)

    assert counted == [False, True, False, False, True, False, False, False, True]
    assert (breaches("warn"), breaches("kill")) == (2.0, 1.0)


# ------------------------------------------------------------------------ first start (docs)


async def test_first_start_without_latch_then_halted_until_an_operator_arms(
    sim: SimGateway, tmp_path: Path
) -> None:
    # docs/deployment.md: a service started without --fresh-start comes up HALTED (no latch
    # file yet); the operator checks it and re-arms.
    (tmp_path / "state").mkdir()
    cfg = guard_config(sim.port, tmp_path / "state")
    guard = Guard.open(cfg)  # no fresh_start, as the systemd unit runs it

    async with running(guard):
        await asyncio.wait_for(guard.ready_event.wait(), 10)
        halted = guard.status()["state"]
        reason = guard.engine.latch.reason if guard.engine.latch is not None else None
        outcome = await guard.handle(
            ControlCommand(action="arm", principal="test", channel="cli", reason="first start")
        )
        latch = json.loads(cfg.latch_path.read_text())

    assert (halted, reason) == ("HALTED", "latch_missing")
    assert outcome.accepted and outcome.state == "ARMED"
    assert latch["halted"] is False
