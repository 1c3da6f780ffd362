"""guardd's benchmarks against the simulated IB Gateway: `.venv/bin/python -m bench.run [--quick]`.

Every actor is a process of its own, as in production: the simulated gateway (`bench.simproc`),
the guard (`guardd run`, the real daemon and config path), mosquitto, the ibapi baseline client
(`bench.rawclient`), the ib_async panic script (`bench.panic`), and this driver (HTTP and MQTT
kill client, the runaway bot). Times are taken on the host's monotonic clock, which every process
shares; "received by the sim" is the moment the gateway's event loop parsed the message.

Prints a table and writes `bench/results/latest.json`. `--quick` shortens every run (a few
minutes in all); the full run soaks memory for 10 minutes and floods the MQTT command topics with
junk for 60 s (`bench.flood`; 10 s in quick mode). Loopback only; every loop is bounded.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import platform
import random
import secrets
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import aiomqtt

from guardd.control.auth import signed_payload
from guardd.core.engine import Latch
from guardd.runtime.executor import regular_hours
from guardd.state.journal import Journal, read_journal
from guardd.state.latch import Armed, write_latch
from ibsim.bot import RunawayBot

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
PY = sys.executable
GUARDD = str(Path(sys.executable).parent / "guardd")
ACCOUNT = "DU000001"
BUDGET = 40  # guardd's messages per second towards IB (config default)
FLOOD_RATE = 10_000.0


# ---- small helpers ----------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def pct(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100)."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


def summary_ms(values: Sequence[float]) -> dict[str, float | int]:
    ms = [v * 1000 for v in values]
    return {
        "n": len(ms),
        "p50_ms": round(pct(ms, 50), 3),
        "p99_ms": round(pct(ms, 99), 3),
        "max_ms": round(max(ms), 3) if ms else math.nan,
        "mean_ms": round(statistics.fmean(ms), 3) if ms else math.nan,
    }


def rss_mb(pid: int) -> tuple[float, float]:
    """(VmRSS, VmHWM) of a process in MiB."""
    values = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            values[key] = int(rest.split()[0]) / 1024
    return values["VmRSS"], values["VmHWM"]


def machine() -> dict[str, Any]:
    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem = "unknown"
    with contextlib.suppress(OSError):
        mem = Path("/proc/meminfo").read_text().splitlines()[0].split(":")[1].strip()
    load = os.getloadavg()
    return {
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "memory": mem,
        "python": platform.python_version(),
        "kernel": platform.release(),
        "loadavg_at_start": [round(x, 2) for x in load],
        "note": "2 cores shared with other engineers' test runs while measured",
    }


# ---- the simulated gateway process ------------------------------------------------------------


class Sim:
    """`bench.simproc` as a child process: one JSON command, one JSON reply."""

    def __init__(self, positions: int, *, orders: int = 0, closers: str = "0") -> None:
        self.args = [
            "--positions",
            str(positions),
            "--instruments",
            str(max(positions, 20)),
            "--orders",
            str(orders),
            "--closers",
            closers,
        ]
        self.proc: asyncio.subprocess.Process | None = None
        self.port = 0

    async def __aenter__(self) -> Sim:
        self.proc = await asyncio.create_subprocess_exec(
            PY,
            "-m",
            "bench.simproc",
            *self.args,
            cwd=ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            limit=64 * 1024 * 1024,
        )
        first = await asyncio.wait_for(self._line(), 60)
        self.port = int(first["port"])
        return self

    async def __aexit__(self, *exc: object) -> None:
        proc = self.proc
        if proc is None or proc.returncode is not None:
            return
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.req("quit"), 5)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(proc.wait(), 5)
        if proc.returncode is None:
            proc.kill()
            await proc.wait()

    async def _line(self) -> dict[str, Any]:
        assert self.proc is not None and self.proc.stdout is not None
        raw = await self.proc.stdout.readline()
        if not raw:
            raise RuntimeError("the simulated gateway exited")
        reply: dict[str, Any] = json.loads(raw)
        return reply

    async def req(self, cmd: str, **args: Any) -> dict[str, Any]:
        assert self.proc is not None and self.proc.stdin is not None
        self.proc.stdin.write((json.dumps({"cmd": cmd, **args}) + "\n").encode())
        await self.proc.stdin.drain()
        return await asyncio.wait_for(self._line(), 120)

    async def wait_subscribed(self, client: int, count: int, timeout_s: float) -> None:
        """Until `client` holds `count` reqPnLSingle subscriptions (the guard's steady state)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            state = await self.req("state")
            if state["pnl_single_subs"].get(str(client), 0) >= count:
                return
            await asyncio.sleep(0.2)
        raise TimeoutError(f"client {client} did not subscribe {count} positions in time")


# ---- the guard process ------------------------------------------------------------------------


@dataclass
class GuardSetup:
    kill_mode: str = "cancel"
    order_rate_kill: float | None = None
    mqtt_port: int | None = None
    state_root: Path | None = None  # None: a temporary directory on the default disk
    http_timeouts_s: float | None = None  # control.http header and body timeouts (None: default)


@dataclass
class Guard:
    """`guardd run` as a child process with a generated config and tokens."""

    sim_port: int
    setup: GuardSetup
    workdir: Path
    http_port: int = field(default_factory=free_port)
    tokens: dict[str, str] = field(default_factory=dict)
    mqtt_key: str = field(default_factory=lambda: secrets.token_urlsafe(32))
    proc: subprocess.Popen[bytes] | None = None
    state_dir: Path = Path()

    def write_config(self) -> Path:
        self.workdir.mkdir(parents=True, exist_ok=True)
        root = self.setup.state_root or self.workdir
        self.state_dir = Path(tempfile.mkdtemp(prefix="guardd-state-", dir=root))
        lines = [
            f'account = "{ACCOUNT}"',
            f'state_dir = "{self.state_dir}"',
            "[ib]",
            'host = "127.0.0.1"',
            f"port = {self.sim_port}",
            "client_id = 0",
            "connect_timeout_s = 10.0",
            "reconnect_backoff_min_s = 0.5",
            "reconnect_backoff_max_s = 2.0",
            "[kill]",
            f'mode = "{self.setup.kill_mode}"',
            "[flatten]",
            "verify_timeout_s = 300.0",
            "[budget]",
            f"messages_per_second = {BUDGET}",
            "kill_reserve = 10",
            "[control.http]",
            'host = "127.0.0.1"',
            f"port = {self.http_port}",
        ]
        if self.setup.http_timeouts_s is not None:
            lines.append(f"header_timeout_s = {self.setup.http_timeouts_s}")
            lines.append(f"body_timeout_s = {self.setup.http_timeouts_s}")
        for role in ("read", "kill", "arm"):
            token = secrets.token_urlsafe(24)
            self.tokens[role] = token
            path = self.workdir / f"token-{role}"
            path.write_text(token)
            path.chmod(0o600)
            lines.append(f'token_files.{role} = "{path}"')
        if self.setup.mqtt_port is not None:
            key_path = self.workdir / "mqtt-key-bench"
            key_path.write_text(self.mqtt_key)
            key_path.chmod(0o600)
            lines += [
                "[control.mqtt]",
                "enabled = true",
                'host = "127.0.0.1"',
                f"port = {self.setup.mqtt_port}",
                f'operator_key_files = {{ bench = "{key_path}" }}',
            ]
        if self.setup.order_rate_kill is not None:
            lines += ["[limits.order_rate.per_client_1s]", f"kill = {self.setup.order_rate_kill}"]
        lines += ["[metrics]", 'listen = "control"', "[log]", 'format = "json"', 'level = "info"']
        path = self.workdir / "guardd.toml"
        path.write_text("\n".join(lines) + "\n")
        return path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def journal_path(self) -> Path:
        return self.state_dir / "journal.jsonl"

    async def start(self, http: aiohttp.ClientSession, timeout_s: float = 60) -> None:
        config = self.write_config()
        log = (self.workdir / "guardd.log").open("ab")
        self.proc = subprocess.Popen(  # noqa: ASYNC220 (a daemon for the whole step)
            [GUARDD, "run", "-c", str(config), "--fresh-start"],
            cwd=self.workdir,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"guardd exited with {self.proc.returncode}; see {log.name}")
            with contextlib.suppress(aiohttp.ClientError):
                async with http.get(f"{self.url}/readyz") as r:
                    if r.status == 200:
                        return
            await asyncio.sleep(0.1)
        raise TimeoutError("guardd did not become ready")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)

    def _auth(self, role: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.tokens[role]}"}

    async def kill(self, http: aiohttp.ClientSession, mode: str = "cancel") -> dict[str, Any]:
        body = {"reason": "bench kill", "mode": mode}
        async with http.post(f"{self.url}/v1/kill", json=body, headers=self._auth("kill")) as r:
            reply: dict[str, Any] = await r.json()
            return reply

    def signed_kill(self) -> str:
        """A signed MQTT kill (mode cancel) under the bench's operator key, as JSON."""
        payload = signed_payload(
            action="kill",
            target=ACCOUNT,
            reason="bench kill",
            key_id="bench",
            secret=self.mqtt_key.encode(),
            ts=int(time.time()),
            nonce=secrets.token_hex(16),
            mode="cancel",
        )
        return json.dumps(payload)

    async def arm(self, http: aiohttp.ClientSession) -> dict[str, Any]:
        body = {"reason": "bench re-arm", "force": True}
        async with http.post(f"{self.url}/v1/arm", json=body, headers=self._auth("arm")) as r:
            reply: dict[str, Any] = await r.json()
            return reply

    async def status(self, http: aiohttp.ClientSession) -> dict[str, Any]:
        async with http.get(f"{self.url}/v1/status", headers=self._auth("read")) as r:
            reply: dict[str, Any] = await r.json()
            return reply

    async def events_folded(self, http: aiohttp.ClientSession) -> float:
        """Every broker event the guard took in: folded (guardd_event_processing_seconds_count)
        or replaced by a later value of the same contract before the fold
        (guardd_broker_events_coalesced_total; the fold reads only the latest)."""
        async with http.get(f"{self.url}/metrics") as r:
            text = await r.text()
        folded = coalesced = math.nan
        for line in text.splitlines():
            if line.startswith("guardd_event_processing_seconds_count"):
                folded = float(line.rsplit(" ", 1)[1])
            elif line.startswith("guardd_broker_events_coalesced_total"):
                coalesced = float(line.rsplit(" ", 1)[1])
        return folded + (0.0 if math.isnan(coalesced) else coalesced)

    def journal_latencies(self) -> list[float]:
        """`latency_s` of each global_cancel_sent: the guard's own command -> socket time."""
        out = []
        for rec in read_journal(self.journal_path):
            if rec.get("kind") == "global_cancel_sent" and rec.get("latency_s") is not None:
                out.append(float(rec["latency_s"]))
        return out


@contextlib.asynccontextmanager
async def running_guard(
    sim: Sim, setup: GuardSetup, workdir: Path, http: aiohttp.ClientSession
) -> AsyncIterator[Guard]:
    guard = Guard(sim.port, setup, workdir)
    try:
        await guard.start(http)
        yield guard
    finally:
        guard.stop()


@contextlib.asynccontextmanager
async def mosquitto(workdir: Path) -> AsyncIterator[int]:
    binary = shutil.which("mosquitto") or shutil.which(
        "mosquitto", path="/usr/sbin:/usr/local/sbin"
    )
    if binary is None:
        raise RuntimeError("mosquitto is not installed (apt-get install -y mosquitto)")
    port = free_port()
    conf = workdir / "mosquitto.conf"
    lines = [f"listener {port} 127.0.0.1", "allow_anonymous true", "persistence false"]
    # as deploy/mosquitto/guardd.conf recommends (no ACL: the attacker has publish rights)
    lines += ["set_tcp_nodelay true", "max_queued_messages 100000"]
    if os.geteuid() == 0:
        lines.append("user root")
    conf.write_text("\n".join(lines) + "\n")
    proc = subprocess.Popen(  # noqa: ASYNC220 (a daemon for the whole step)
        [binary, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                    break
            except OSError:
                await asyncio.sleep(0.05)
        yield port
    finally:
        proc.terminate()
        proc.wait(timeout=5)


# ---- 1. manual kill -> reqGlobalCancel at the sim, under a flood --------------------------------


async def kill_series(
    sim: Sim,
    guard: Guard,
    http: aiohttp.ClientSession,
    count: int,
    send: Any,
) -> dict[str, Any]:
    latencies: list[float] = []
    replies: list[float] = []
    misses = 0
    deadline = time.monotonic() + max(120.0, count * 1.0)
    for _ in range(count):
        if time.monotonic() > deadline:
            break
        await sim.req("marks", clear=True)
        t0 = time.monotonic()
        await send()
        t_reply = time.monotonic()
        got = await sim.req("wait_cancel", after=0, timeout=5.0)
        mine = [t for t, client in got["cancels"] if client == 0]
        if mine:
            latencies.append(mine[0] - t0)
            replies.append(t_reply - t0)
        else:
            misses += 1
        armed = await guard.arm(http)
        if armed.get("state") != "ARMED":
            await asyncio.sleep(0.2)
            await guard.arm(http)
        await asyncio.sleep(0.05 + random.random() * 0.02)
    out = summary_ms(latencies)
    out["missed"] = misses
    out["reply_p50_ms"] = round(pct([r * 1000 for r in replies], 50), 3)
    return out


async def bench_kill(
    quick: bool, workdir: Path, http: aiohttp.ClientSession, kills: int
) -> dict[str, Any]:
    results: dict[str, Any] = {}
    async with mosquitto(workdir) as mqtt_port, Sim(20) as sim:
        setup = GuardSetup(mqtt_port=mqtt_port)
        async with running_guard(sim, setup, workdir / "kill-disk", http) as guard:
            await sim.wait_subscribed(0, 20, 30)
            await asyncio.sleep(1.0)
            await sim.req("flood", rate=FLOOD_RATE, seconds=900)
            folded0, t0 = await guard.events_folded(http), time.monotonic()
            results["http"] = await kill_series(sim, guard, http, kills, lambda: guard.kill(http))
            async with aiomqtt.Client("127.0.0.1", mqtt_port) as mqtt:

                async def mqtt_kill() -> None:
                    await mqtt.publish(f"guardd/{ACCOUNT}/cmd/kill", guard.signed_kill(), qos=1)

                results["mqtt"] = await kill_series(sim, guard, http, kills, mqtt_kill)
            folded1, t1 = await guard.events_folded(http), time.monotonic()
            flood = (await sim.req("flood_stop"))["stats"]
            results["flood"] = {
                "target_per_s": FLOOD_RATE,
                "sent_per_s": round(flood["sent_per_s"]),
                "skipped": flood["skipped"],
                "guard_folded_per_s": round((folded1 - folded0) / (t1 - t0)),
            }
            results["guard_internal_http_and_mqtt"] = summary_ms(guard.journal_latencies())
            results["pacing_violations"] = (await sim.req("state"))["pacing_violations"]
            # The same HTTP series without the flood: what 10,000 events/s cost the kill.
            results["http_no_flood"] = await kill_series(
                sim, guard, http, kills, lambda: guard.kill(http)
            )
        # The same HTTP series with the state directory on tmpfs: what the fsyncs cost.
        shm = Path("/dev/shm")
        if shm.is_dir():  # noqa: ASYNC240
            setup = GuardSetup(state_root=shm)
            async with running_guard(sim, setup, workdir / "kill-tmpfs", http) as guard:
                await asyncio.sleep(1.0)
                await sim.req("flood", rate=FLOOD_RATE, seconds=900)
                results["http_state_on_tmpfs"] = await kill_series(
                    sim, guard, http, kills, lambda: guard.kill(http)
                )
                await sim.req("flood_stop")
                shutil.rmtree(guard.state_dir, ignore_errors=True)
    results["fsync"] = fsync_costs(workdir / "fsync", 200)
    return results


def fsync_costs(directory: Path, count: int) -> dict[str, Any]:
    """What one journal record and one latch write cost on this disk (both fsync)."""
    directory.mkdir(parents=True, exist_ok=True)
    journal = Journal(directory / "journal.jsonl")
    appends = []
    latches = []
    try:
        for n in range(count):
            t = time.perf_counter()
            journal.append("bench", n=n)
            appends.append(time.perf_counter() - t)
            state = (
                Latch("bench", "bench", "bench", "cancel", time.time(), n)
                if n % 2 == 0
                else Armed("bench", "bench", "bench", time.time(), n)
            )
            t = time.perf_counter()
            write_latch(directory / "latch.json", state)
            latches.append(time.perf_counter() - t)
    finally:
        journal.close()
    return {"journal_append": summary_ms(appends), "latch_write": summary_ms(latches)}


# ---- 2. automatic trigger: the breaking order -> reqGlobalCancel --------------------------------


async def bench_trigger(workdir: Path, http: aiohttp.ClientSession, trials: int) -> dict[str, Any]:
    limit = 5
    latencies: list[float] = []
    breaking_index: list[int] = []
    misses = 0
    async with Sim(20) as sim:
        setup = GuardSetup(order_rate_kill=limit)
        async with running_guard(sim, setup, workdir / "trigger", http) as guard:
            await sim.wait_subscribed(0, 20, 30)
            bot = RunawayBot("127.0.0.1", sim.port, 7)
            await bot.connect()
            try:
                deadline = time.monotonic() + trials * 3.0 + 30
                for n in range(trials):
                    if time.monotonic() > deadline:
                        break
                    await sim.req("marks", clear=True)
                    await bot.run_away(symbol="S0000", price=5.0 - n * 0.001, rate=20, count=7)
                    got = await sim.req("wait_cancel", after=0, timeout=3.0)
                    mine = [t for t, client in got["cancels"] if client == 0]
                    marks = await sim.req("marks")
                    if not mine:
                        misses += 1
                    else:
                        before = [t for t, c, _ in marks["orders"] if c == 7 and t <= mine[0]]
                        latencies.append(mine[0] - before[-1])
                        breaking_index.append(len(before))
                    await asyncio.sleep(1.2)  # the 1 s window empties before the re-arm
                    await guard.arm(http)
                    await asyncio.sleep(0.1)
            finally:
                await bot.disconnect()
            internal = summary_ms(guard.journal_latencies())
    out = summary_ms(latencies)
    out.update(
        missed=misses,
        limit_orders_per_s=limit,
        breaking_order_index=sorted(set(breaking_index)),
        guard_internal=internal,
        bot_rate_per_s=20,
    )
    return out


# ---- 3. events/s folded by the guard vs the raw ibapi decode rate ------------------------------


STEP_RATES = (5_000, 10_000, 15_000, 20_000, 25_000, 30_000, 40_000, 60_000, 80_000, 100_000)


async def step_up(
    sim: Sim, consumed: Any, step_s: float, settle_s: float = 1.0
) -> tuple[int, list[dict[str, Any]]]:
    """Flood the PnL streams (one callback a message: tickPrice would be two, tickPrice and
    tickSize) at rising rates; the highest rate a consumer keeps up with (>= 98 % consumed within
    `settle_s` after the step, nothing skipped by the gateway), and every step's figures.
    Stops at the first rate it cannot keep up with: its backlog would spoil the next step."""
    steps: list[dict[str, Any]] = []
    sustained = 0
    for rate in STEP_RATES:
        before = await consumed()
        await sim.req("flood", rate=rate, seconds=step_s, ticks=False)
        await asyncio.sleep(step_s + settle_s)
        stats = (await sim.req("flood_stop"))["stats"]
        got = await consumed() - before
        share = got / stats["sent"] if stats["sent"] else 0.0
        kept_up = share >= 0.98 and stats["skipped"] == 0
        steps.append(
            {
                "offered_per_s": rate,
                "sent_per_s": round(stats["sent_per_s"]),
                "consumed_share": round(share, 3),
                "skipped": stats["skipped"],
            }
        )
        if not kept_up:
            break
        sustained = round(stats["sent_per_s"])
    return sustained, steps


async def bench_throughput(
    workdir: Path, http: aiohttp.ClientSession, step_s: float
) -> dict[str, Any]:
    positions = 20
    out: dict[str, Any] = {"step_s": step_s}
    async with Sim(positions) as sim:
        async with running_guard(sim, GuardSetup(), workdir / "throughput", http) as guard:
            await sim.wait_subscribed(0, positions, 30)
            await asyncio.sleep(1.0)
            assert guard.proc is not None
            rss_before = rss_mb(guard.proc.pid)[0]
            sustained, steps = await step_up(sim, lambda: guard.events_folded(http), step_s)
            out["guard"] = {
                "sustained_per_s": sustained,
                "steps": steps,
                "rss_before_mb": round(rss_before, 1),
                "rss_after_mb": round(rss_mb(guard.proc.pid)[0], 1),
            }
        con_ids = ",".join(str(100_000 + n) for n in range(positions))
        budget_s = len(STEP_RATES) * (step_s + 2) + 10
        raw = await asyncio.create_subprocess_exec(
            PY,
            "-m",
            "bench.rawclient",
            "--port",
            str(sim.port),
            "--con-ids",
            con_ids,
            "--seconds",
            str(budget_s),
            cwd=ROOT,
            stdout=subprocess.PIPE,
        )
        assert raw.stdout is not None
        line = await asyncio.wait_for(raw.stdout.readline(), 30)
        assert json.loads(line).get("subscribed")
        latest = [0.0]

        async def follow() -> None:
            assert raw.stdout is not None
            while line := await raw.stdout.readline():
                latest[0] = float(json.loads(line)["count"])

        follower = asyncio.create_task(follow())

        async def raw_count() -> float:
            await asyncio.sleep(0.3)  # the client prints its count every 0.25 s
            return latest[0]

        await asyncio.sleep(0.5)
        sustained, steps = await step_up(sim, raw_count, step_s)
        out["raw_ibapi"] = {"sustained_per_s": sustained, "steps": steps}
        raw.kill()
        await raw.wait()
        follower.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await follower
    guard_rate = out["guard"]["sustained_per_s"]
    raw_rate = out["raw_ibapi"]["sustained_per_s"]
    out["ratio"] = round(guard_rate / raw_rate, 3) if raw_rate else math.nan
    return out


# ---- 4. flatten N positions vs the pacing bound ------------------------------------------------


FLATTEN_GOAL = 1.03  # issue 15: kill -> flat at the gateway within 3 % of N / budget


async def flatten_once(
    workdir: Path, http: aiohttp.ClientSession, positions: int
) -> dict[str, Any]:
    """Kill in flatten mode with `positions` open; kill -> every position 0 at the sim, against
    the pacing bound N / budget (the least time N child orders can take at the budget)."""
    bound = positions / BUDGET
    load_before = round(os.getloadavg()[0], 2)
    # US stocks close with market orders in regular hours and with marketable limits (each
    # needing a fresh price) outside them: the figure depends on the time of day it is run.
    session = "regular" if regular_hours(time.time()) else "outside regular hours"
    async with Sim(positions) as sim:
        setup = GuardSetup(kill_mode="flatten")
        async with running_guard(sim, setup, workdir / f"flatten-{positions}", http) as guard:
            # Start-up subscribes every position through the budget less the kill reserve (and
            # slower on a loaded host): wait for all of them, so the flatten has the budget alone.
            await sim.wait_subscribed(0, positions, positions / (BUDGET - 10) * 4 + 60)
            await asyncio.sleep(1.0)
            await sim.req("marks", clear=True)
            sent_before = (await sim.req("state"))["received_by_client"].get("0", 0)
            t0 = time.monotonic()
            await guard.kill(http, mode="flatten")
            deadline = t0 + bound * 3 + 30
            report: dict[str, Any] = {}
            while time.monotonic() < deadline:
                report = await sim.req("flatten_report", client=0)
                if report["flat_at"] is not None:
                    break
                await asyncio.sleep(0.1)
            marks = await sim.req("marks")
            state = await sim.req("state")
            assert guard.proc is not None
            rss = rss_mb(guard.proc.pid)
            await asyncio.sleep(0.5)
            status = await guard.status(http)
    cancels = [t for t, c in marks["cancels"] if c == 0]
    flat_at = report.get("flat_at")
    to_flat = None if flat_at is None else flat_at - t0
    first = report.get("first_child")
    last = report.get("last_child")
    return {
        "positions": positions,
        "bound_s": round(bound, 3),
        "kill_to_first_cancel_ms": round((cancels[0] - t0) * 1000, 2) if cancels else None,
        "kill_to_first_child_ms": round((first - t0) * 1000, 2) if first else None,
        "kill_to_flat_s": None if to_flat is None else round(to_flat, 3),
        "vs_bound": None if to_flat is None else round(to_flat / bound, 3),
        "children_span_s": None if first is None or last is None else round(last - first, 3),
        "children": report.get("children"),
        # Everything the guard sent from the kill to the end (children, the global cancel, the
        # price requests of positions without a market-data line, ...): the pacing bound of
        # what it actually sent is messages / budget.
        "guard_messages": state["received_by_client"].get("0", 0) - sent_before,
        "positions_left": report.get("positions_left"),
        "error_100": state["pacing_violations"],
        "overshoot_positions": report.get("overshoot_positions"),
        "overshoot_shares": report.get("overshoot_shares"),
        "flipped_positions": report.get("flipped_positions"),
        "guard_says_flat": bool((status.get("close") or {}).get("done")),
        "guard_rss_mb": round(rss[0], 1),
        "loadavg_1m": [load_before, round(os.getloadavg()[0], 2)],
        "us_session": session,
    }


# ---- 5. memory: 1,000 positions and 5,000 open orders, and a soak ------------------------------


async def bench_memory(workdir: Path, http: aiohttp.ClientSession, soak_s: float) -> dict[str, Any]:
    positions, orders = 1_000, 5_000
    async with (
        Sim(positions, orders=orders) as sim,
        running_guard(sim, GuardSetup(), workdir / "memory", http) as guard,
    ):
        assert guard.proc is not None
        pid = guard.proc.pid
        t_sync = time.monotonic()
        await sim.wait_subscribed(0, positions, positions / BUDGET * 2 + 30)
        subscribed_s = time.monotonic() - t_sync
        await asyncio.sleep(2.0)
        status = await guard.status(http)
        rss_synced = rss_mb(pid)[0]
        await sim.req("flood", rate=FLOOD_RATE, seconds=soak_s + 5)
        samples: list[tuple[float, float]] = []
        start = time.monotonic()
        folded0 = await guard.events_folded(http)
        while time.monotonic() - start < soak_s:
            samples.append((time.monotonic() - start, rss_mb(pid)[0]))
            await asyncio.sleep(min(5.0, soak_s / 20))
        folded1 = await guard.events_folded(http)
        elapsed = time.monotonic() - start
        flood = (await sim.req("flood_stop"))["stats"]
        rss_end, hwm = rss_mb(pid)
    half = [s for s in samples if s[0] >= soak_s / 2]
    slope = math.nan
    if len(half) >= 2:
        xs, ys = [s[0] for s in half], [s[1] for s in half]
        mx, my = statistics.fmean(xs), statistics.fmean(ys)
        den = sum((x - mx) ** 2 for x in xs)
        if den:
            slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / den * 60
    return {
        "positions": status.get("positions"),
        "working_orders": status.get("working_orders"),
        "subscribe_all_s": round(subscribed_s, 1),
        "rss_synced_mb": round(rss_synced, 1),
        "soak_s": round(elapsed, 1),
        "soak_flood_sent_per_s": round(flood["sent_per_s"]),
        "soak_folded_per_s": round((folded1 - folded0) / elapsed),
        "rss_end_mb": round(rss_end, 1),
        "rss_peak_mb": round(hwm, 1),
        "growth_mb": round(rss_end - rss_synced, 1),
        "growth_2nd_half_mb_per_min": round(slope, 3),
        "rss_samples": [(round(t, 1), round(m, 1)) for t, m in samples],
    }


# ---- 5b. a flood at three times the guard's capacity: memory bounded, the kill still served ---


async def bench_overload(
    workdir: Path, http: aiohttp.ClientSession, seconds: float, rate: float, kills: int
) -> dict[str, Any]:
    """Flood the guard's own subscriptions at `rate` (three times what it folds) for `seconds`:
    RSS before, at its peak and at the end, and HTTP kills in the middle of it."""
    positions = 20
    async with (
        Sim(positions) as sim,
        running_guard(sim, GuardSetup(), workdir / "overload", http) as guard,
    ):
        assert guard.proc is not None
        pid = guard.proc.pid
        await sim.wait_subscribed(0, positions, 30)
        await asyncio.sleep(1.0)
        rss_before = rss_mb(pid)[0]
        await sim.req("flood", rate=rate, seconds=seconds + 30)
        start = time.monotonic()
        folded0 = await guard.events_folded(http)
        peak = rss_before
        kill: dict[str, Any] = {}
        while time.monotonic() - start < seconds:
            peak = max(peak, rss_mb(pid)[0])
            if not kill and time.monotonic() - start >= seconds / 2:
                kill = await kill_series(sim, guard, http, kills, lambda: guard.kill(http))
            await asyncio.sleep(1.0)
        folded1 = await guard.events_folded(http)
        elapsed = time.monotonic() - start
        flood = (await sim.req("flood_stop"))["stats"]
        rss_end, hwm = rss_mb(pid)
    return {
        "offered_per_s": round(rate),
        "seconds": round(elapsed, 1),
        "sent_per_s": round(flood["sent_per_s"]),
        "skipped_at_sim": flood["skipped"],
        "guard_took_per_s": round((folded1 - folded0) / elapsed),
        "rss_before_mb": round(rss_before, 1),
        "rss_peak_mb": round(max(peak, hwm), 1),
        "rss_end_mb": round(rss_end, 1),
        "growth_mb": round(max(peak, rss_end) - rss_before, 1),
        "http_kill_during": kill,
    }


# ---- 6. the ib_async panic script, started at the moment of the kill ---------------------------


async def bench_panic(positions: int) -> dict[str, Any]:
    async with Sim(positions, closers="9") as sim:
        await sim.req("marks", clear=True)
        t0 = time.monotonic()
        proc = await asyncio.create_subprocess_exec(
            PY,
            "-m",
            "bench.panic",
            "--port",
            str(sim.port),
            "--client-id",
            "9",
            "--timeout",
            str(positions / BUDGET * 4 + 30),
            cwd=ROOT,
            stdout=subprocess.PIPE,
        )
        raw, _ = await asyncio.wait_for(proc.communicate(), positions / BUDGET * 4 + 90)
        script = json.loads(raw.decode().strip().splitlines()[-1])
        marks = await sim.req("marks")
        report = await sim.req("flatten_report", client=9)
        state = await sim.req("state")
    cancels = [t for t, c in marks["cancels"] if c == 9]
    flat_at = report["flat_at"]
    return {
        "positions": positions,
        "kill_to_first_cancel_ms": round((cancels[0] - t0) * 1000, 1) if cancels else None,
        "kill_to_flat_s": None if flat_at is None else round(flat_at - t0, 3),
        "vs_bound": None if flat_at is None else round((flat_at - t0) / (positions / BUDGET), 3),
        "startup_to_import_ms": round((script["t_imported"] - t0) * 1000, 1),
        "import_to_connected_ms": round((script["t_connected"] - script["t_imported"]) * 1000, 1),
        "children": report["children"],
        "positions_left": report["positions_left"],
        "error_100": state["pacing_violations"],
        "overshoot_positions": report["overshoot_positions"],
    }


# ---- the run ----------------------------------------------------------------------------------


def table(results: dict[str, Any]) -> str:
    rows: list[tuple[str, str, str, str]] = []

    def add(name: str, figure: str, goal: str, met: bool | None) -> None:
        rows.append((name, figure, goal, "-" if met is None else ("met" if met else "MISSED")))

    k = results.get("kill", {})
    for key, label, goal in (("http", "HTTP", 5.0), ("mqtt", "MQTT", 10.0)):
        s = k.get(key)
        if s:
            fig = f"p50 {s['p50_ms']} / p99 {s['p99_ms']} / max {s['max_ms']} ms (n={s['n']})"
            add(f"1. kill {label} -> cancel @sim", fig, f"p99 < {goal:g} ms", s["p99_ms"] < goal)
    for key, label in (
        ("http_no_flood", "   HTTP, no flood"),
        ("http_state_on_tmpfs", "   HTTP, state dir on tmpfs"),
    ):
        s = k.get(key)
        if s:
            fig = f"p50 {s['p50_ms']} / p99 {s['p99_ms']} / max {s['max_ms']} ms"
            add(label, fig, "(comparison)", None)
    if results.get("killfloor"):
        from bench.killfloor import rows as killfloor_rows

        for row in killfloor_rows(results["killfloor"]):
            add(*row)
    f = k.get("flood")
    if f:
        fig = f"sim sent {f['sent_per_s']}/s, guard folded {f['guard_folded_per_s']}/s"
        add("   flood during kills", fig, ">= 10,000/s", f["guard_folded_per_s"] >= 9_500)
    t = results.get("trigger")
    if t:
        fig = f"p50 {t['p50_ms']} / p99 {t['p99_ms']} / max {t['max_ms']} ms (n={t['n']})"
        add("2. breaking order -> cancel", fig, "p99 < 2 ms", t["p99_ms"] < 2.0)
    th = results.get("throughput")
    if th:
        fig = (
            f"guard {th['guard']['sustained_per_s']}/s vs ibapi "
            f"{th['raw_ibapi']['sustained_per_s']}/s = {th['ratio'] * 100:.0f} %"
        )
        add("3. events/s taken vs raw ibapi", fig, ">= 90 %", th["ratio"] >= 0.9)
    goal = f"<= {FLATTEN_GOAL} x bound, 0, 0"
    for fl in results.get("flatten", []):
        name = f"4. flatten {fl['positions']}"
        if "error" in fl:
            add(name, f"FAILED: {fl['error']}", goal, False)
            continue
        if fl.get("kill_to_flat_s") is None:
            add(name, "NOT FLAT in time", goal, False)
            continue
        fig = (
            f"{fl['kill_to_flat_s']} s vs bound {fl['bound_s']} s = x{fl['vs_bound']}, "
            f"err100 {fl['error_100']}, overshoot {fl['overshoot_positions']}, "
            f"{fl['guard_messages']} msgs, "
            f"first child {fl['kill_to_first_child_ms']} ms, load {fl['loadavg_1m'][0]}"
            f"->{fl['loadavg_1m'][1]}, US stocks {fl['us_session']}"
        )
        add(name, fig, goal, flatten_goal_met(fl))
    m = results.get("memory")
    if m:
        fig = (
            f"{m['rss_synced_mb']} MB synced ({m['positions']} pos, {m['working_orders']} orders)"
            f"; +{m['growth_mb']} MB over {m['soak_s']} s"
        )
        add("5. memory RSS", fig, "report", None)
    ov = results.get("overload")
    if ov:
        k = ov["http_kill_during"]
        fig = (
            f"offered {ov['offered_per_s']}/s for {ov['seconds']} s (sim sent "
            f"{ov['sent_per_s']}/s, guard took {ov['guard_took_per_s']}/s): "
            f"+{ov['growth_mb']} MB; HTTP kill p50 {k.get('p50_ms')} / p99 {k.get('p99_ms')} ms "
            f"(n={k.get('n')}, missed {k.get('missed')})"
        )
        ok = ov["growth_mb"] < 50 and k.get("missed") == 0 and bool(k.get("n"))
        add("5b. flood at 3x capacity", fig, "< +50 MB, kill served", ok)
    mf = results.get("mqtt_flood")
    if mf:
        from bench.flood import goal_met

        lat = mf["kill_to_latched"]
        fig = (
            f"p50 {lat['p50_ms']} / p99 {lat['p99_ms']} / max {lat['max_ms']} ms (n={lat['n']}), "
            f"junk {mf['junk_sent_per_s']}/s for {mf['flood_s']:g} s, "
            f"RSS +{mf['rss_growth_mb']} MB, missed {mf['kills_missed']}"
        )
        add("7. MQTT kill -> latched, junk flood", fig, "p99 < 50 ms, +< 20 MB", goal_met(mf))
    he = results.get("http_exhaustion")
    if he:
        from bench.flood import http_goal_met

        ans, lat = he["kill_to_answer"], he["kill_to_latched"]
        fig = (
            f"answer p50 {ans['p50_ms']} / p99 {ans['p99_ms']} ms, latched p99 {lat['p99_ms']} ms "
            f"(n={he['kills']}, {he['idle_connections']} idle + {he['slow_body_connections']} "
            f"slow-body conns, LimitNOFILE {he['limit_nofile']})"
        )
        add("8. HTTP kill, connections held", fig, "200 + latched < 100 ms", http_goal_met(he))
    p = results.get("panic")
    g = (
        next((x for x in results.get("flatten", []) if x["positions"] == p["positions"]), None)
        if p
        else None
    )
    if p:
        fig = f"first cancel {p['kill_to_first_cancel_ms']} ms, flat {p['kill_to_flat_s']} s"
        add(f"6. ib_async panic ({p['positions']} pos)", fig, "baseline", None)
    if g and "error" not in g:
        fig = f"first cancel {g['kill_to_first_cancel_ms']} ms, flat {g['kill_to_flat_s']} s"
        add(f"   guardd ({g['positions']} pos)", fig, "baseline", None)
    if "startup" in results:
        from bench.startup import row

        add(*row(results["startup"]))
    widths = [max(len(r[i]) for r in rows) for i in range(4)] if rows else [0] * 4
    lines = [" | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(lines)


async def run(
    quick: bool, only: set[str], sizes: Sequence[int] = (50, 200, 1_000)
) -> dict[str, Any]:
    results: dict[str, Any] = {
        "mode": "quick" if quick else "full",
        "machine": machine(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    kills = 200
    trials = 30 if quick else 200
    seconds = 3.0 if quick else 8.0  # per flood step
    soak = 30.0 if quick else 600.0
    flood_s = 10.0 if quick else 60.0
    with tempfile.TemporaryDirectory(prefix="guardd-bench-") as tmp:
        workdir = Path(tmp)
        timeout = aiohttp.ClientTimeout(total=30)
        async with aiohttp.ClientSession(timeout=timeout) as http:
            steps = [
                ("kill", lambda: bench_kill(quick, workdir, http, kills)),
                ("killfloor", lambda: _killfloor(workdir, http, 100 if quick else kills, 200)),
                ("trigger", lambda: bench_trigger(workdir, http, trials)),
                ("throughput", lambda: bench_throughput(workdir, http, seconds)),
                ("flatten", lambda: _flatten_all(workdir, http, sizes)),
                ("memory", lambda: bench_memory(workdir, http, soak)),
                (
                    "overload",
                    lambda: bench_overload(
                        workdir, http, flood_s, 3 * _capacity(results), 20 if quick else 100
                    ),
                ),
                ("panic", lambda: bench_panic(200)),
                ("mqtt_flood", lambda: _mqtt_flood(workdir, http, flood_s)),
                ("http_exhaustion", lambda: _http_exhaustion(workdir, http, 20 if quick else 100)),
                ("startup", lambda: _startup(workdir, http, quick)),
            ]
            for name, step in steps:
                if only and name not in only:
                    continue
                started = time.monotonic()
                print(f"-- {name} ...", file=sys.stderr, flush=True)
                try:
                    results[name] = await step()
                except Exception as exc:  # report what failed and carry on with the rest
                    results[name + "_error"] = f"{type(exc).__name__}: {exc}"
                    print(f"   {name} failed: {exc!r}", file=sys.stderr, flush=True)
                results.setdefault("durations_s", {})[name] = round(time.monotonic() - started, 1)
    results["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    return results


def _capacity(results: dict[str, Any]) -> float:
    """The guard's sustained rate from this run's throughput step (30,000/s without one)."""
    sustained = results.get("throughput", {}).get("guard", {}).get("sustained_per_s")
    return float(sustained) if sustained else 30_000.0


async def _mqtt_flood(workdir: Path, http: aiohttp.ClientSession, seconds: float) -> dict[str, Any]:
    from bench.flood import bench_mqtt_flood  # bench.flood imports this module

    return await bench_mqtt_flood(workdir, http, seconds)


async def _killfloor(
    workdir: Path, http: aiohttp.ClientSession, kills: int, breaches: int
) -> dict[str, Any]:
    from bench.killfloor import bench_killfloor  # bench.killfloor imports this module

    return await bench_killfloor(workdir, http, kills, breaches)


async def _http_exhaustion(
    workdir: Path, http: aiohttp.ClientSession, kills: int
) -> dict[str, Any]:
    from bench.flood import bench_http_exhaustion  # bench.flood imports this module

    return await bench_http_exhaustion(workdir, http, kills)


async def _startup(workdir: Path, http: aiohttp.ClientSession, quick: bool) -> dict[str, Any]:
    from bench.startup import bench_startup  # bench.startup imports this module

    return await bench_startup(workdir, http, 1_000, background=not quick)


def flatten_goal_met(fl: dict[str, Any]) -> bool:
    """Issue 15's flatten goal: within 3 % of the pacing bound, no error 100, no overshoot,
    every position closed."""
    return bool(
        fl.get("vs_bound") is not None
        and fl["vs_bound"] <= FLATTEN_GOAL
        and fl["error_100"] == 0
        and fl["overshoot_positions"] == 0
        and fl["flipped_positions"] == 0
        and fl["positions_left"] == 0
    )


async def _flatten_all(
    workdir: Path, http: aiohttp.ClientSession, sizes: Sequence[int]
) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for n in sizes:  # one size failing (a timeout on a loaded host) does not lose the others
        try:
            out.append(await flatten_once(workdir, http, n))
        except Exception as exc:
            out.append({"positions": n, "error": f"{type(exc).__name__}: {exc}"})
            print(f"   flatten {n} failed: {exc!r}", file=sys.stderr, flush=True)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="shorter runs (a few minutes)")
    parser.add_argument(
        "--only",
        default="",
        help="comma-separated subset: kill,killfloor,trigger,throughput,flatten,memory,overload,"
        "panic,mqtt_flood,http_exhaustion,startup",
    )
    parser.add_argument(
        "--flatten-sizes",
        default="50,200,1000",
        help="positions per flatten run, comma-separated (each run once)",
    )
    parser.add_argument("--out", type=Path, default=RESULTS / "latest.json")
    args = parser.parse_args(argv)
    only = {s for s in args.only.split(",") if s}
    sizes = tuple(int(n) for n in args.flatten_sizes.split(",") if n)
    results = asyncio.run(run(args.quick, only, sizes))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    m = results["machine"]
    print(f"guardd bench ({results['mode']}): {m['nproc']} x {m['cpu']}, Python {m['python']}")
    print(table(results))
    for key in [k for k in results if k.endswith("_error")]:
        print(f"{key}: {results[key]}")
    print(f"JSON: {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
