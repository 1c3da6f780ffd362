"""The kill against its floor: guardd vs the null guard (`bench.nullguard`), in the same run.

One simulated gateway, one mosquitto, the real guard (client 0) and the null guard (client 5)
connected side by side; the gateway floods the guard's subscriptions at 10,000 events/s. Each
trial is run for both, in random order, so that both see the same machine:

- HTTP kill -> reqGlobalCancel at the gateway (the real guard re-armed after each kill);
- MQTT signed kill -> reqGlobalCancel at the gateway (the null guard listens on its own topic
  prefix, same broker, same payload);
- the same HTTP and MQTT kills once the flood has stopped (for comparison: the goals are under it);
- a breaching order at the gateway (one order over `limits.per_order.max_quantity`, from a bot,
  client 7) -> the real guard's reqGlobalCancel, with and without the flood, compared with the
  null guard's HTTP figure of the same flood setting.

Each figure has p50/p99/max/n and the machine's load average (`os.getloadavg`) taken when its
series ended; ratios are real p99 / null p99. Goals (issue 15): HTTP and MQTT <= 1.5, breach
<= 2 (against the null guard's HTTP p99 under the flood).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import secrets
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import aiomqtt

from bench.nullguard import TOPIC_PREFIX
from bench.run import (
    ACCOUNT,
    FLOOD_RATE,
    PY,
    ROOT,
    Guard,
    GuardSetup,
    Sim,
    free_port,
    mosquitto,
    summary_ms,
)
from ibsim.bot import RunawayBot

NULL_CLIENT = 5
BOT_CLIENT = 7
MAX_QUANTITY = 1_000  # the guard's per-order limit; the breaching order is over it
GOALS = {"http": 1.5, "mqtt": 1.5, "breach": 2.0}


def load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


class BreachGuard(Guard):
    """The bench's guard with a per-order quantity limit (a breach kills)."""

    def write_config(self) -> Path:
        path = super().write_config()
        with path.open("a") as f:
            f.write(f'[limits.per_order]\nmax_quantity = {MAX_QUANTITY}\naction = "kill"\n')
        return path


def write_secrets(workdir: Path, token: str, mqtt_key: str) -> None:
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "null-token").write_text(token)
    (workdir / "null-mqtt-key").write_text(mqtt_key)


@contextlib.asynccontextmanager
async def null_guard(sim_port: int, mqtt_port: int, mqtt_key: str, workdir: Path) -> Any:
    token = secrets.token_urlsafe(24)
    write_secrets(workdir, token, mqtt_key)
    port = free_port()
    proc = await asyncio.create_subprocess_exec(
        PY,
        "-m",
        "bench.nullguard",
        "--ib-port",
        str(sim_port),
        "--client-id",
        str(NULL_CLIENT),
        "--http-port",
        str(port),
        "--token-file",
        str(workdir / "null-token"),
        "--mqtt-port",
        str(mqtt_port),
        "--mqtt-key-file",
        str(workdir / "null-mqtt-key"),
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        line = await asyncio.wait_for(proc.stdout.readline(), 30)
        if not json.loads(line or b"{}").get("ready"):
            raise RuntimeError("the null guard did not start")
        yield f"http://127.0.0.1:{port}", token
    finally:
        if proc.stdin is not None:
            proc.stdin.close()
        try:
            await asyncio.wait_for(proc.wait(), 5)
        except TimeoutError:
            proc.kill()
            await proc.wait()


async def measure(sim: Sim, client: int, send: Callable[[], Awaitable[Any]]) -> float | None:
    """Seconds from just before `send` to `client`'s reqGlobalCancel at the gateway."""
    await sim.req("marks", clear=True)
    t0 = time.monotonic()
    try:
        await send()
    except aiohttp.ClientError as exc:  # counted as missed, never as a figure
        print(f"   kill request failed: {exc!r}", file=sys.stderr, flush=True)
        return None
    got = await sim.req("wait_cancel", after=0, timeout=5.0)
    mine = [t for t, c in got["cancels"] if c == client]
    if not mine:  # the other's cancel came first (it should not): wait for ours
        got = await sim.req("wait_cancel", after=len(got["cancels"]), timeout=5.0)
        mine = [t for t, c in got["cancels"] if c == client]
    return mine[0] - t0 if mine else None


def figure(latencies: list[float | None]) -> dict[str, Any]:
    out: dict[str, Any] = dict(summary_ms([x for x in latencies if x is not None]))
    out["missed"] = sum(1 for x in latencies if x is None)
    out["loadavg"] = load()
    return out


def compared(real: dict[str, Any], null: dict[str, Any]) -> dict[str, Any]:
    return {"guard": real, "null": null, "ratio_p99": ratio(real, null)}


def ratio(real: dict[str, Any], null: dict[str, Any]) -> float:
    return round(real["p99_ms"] / null["p99_ms"], 2) if null.get("p99_ms") else float("nan")


async def paired_series(
    sim: Sim,
    trials: int,
    real: Callable[[], Awaitable[Any]],
    null: Callable[[], Awaitable[Any]],
    rearm: Callable[[], Awaitable[Any]],
) -> tuple[dict[str, Any], dict[str, Any]]:
    """`trials` kills of each, in random order per trial."""
    real_l: list[float | None] = []
    null_l: list[float | None] = []
    for _ in range(trials):
        order = [(0, real, real_l), (NULL_CLIENT, null, null_l)]
        random.shuffle(order)
        for client, send, out in order:
            out.append(await measure(sim, client, send))
            if client == 0:
                await rearm()
            await asyncio.sleep(0.03 + random.random() * 0.02)
    return figure(real_l), figure(null_l)


async def breach_series(
    sim: Sim, bot: RunawayBot, trials: int, rearm: Callable[[], Awaitable[Any]]
) -> dict[str, Any]:
    """A bot's order over the per-order limit at the gateway -> the guard's reqGlobalCancel."""
    latencies: list[float | None] = []
    for n in range(trials):
        await sim.req("marks", clear=True)
        bot.place_limit("S0001", "BUY", MAX_QUANTITY * 5, round(5.0 - (n % 100) * 0.01, 2))
        got = await sim.req("wait_cancel", after=0, timeout=5.0)
        mine = [t for t, c in got["cancels"] if c == 0]
        marks = await sim.req("marks")
        placed = [t for t, c, _ in marks["orders"] if c == BOT_CLIENT]
        latencies.append(mine[0] - placed[-1] if mine and placed else None)
        await asyncio.sleep(0.05)  # the cancel reaches the guard and the breach clears
        await rearm()
        await asyncio.sleep(0.03 + random.random() * 0.02)
    return figure(latencies)


async def bench_killfloor(
    workdir: Path, http: aiohttp.ClientSession, kills: int, breaches: int
) -> dict[str, Any]:
    results: dict[str, Any] = {"loadavg_at_start": load()}
    async with mosquitto(workdir) as mqtt_port, Sim(20) as sim:
        setup = GuardSetup(mqtt_port=mqtt_port)
        guard = BreachGuard(sim.port, setup, workdir / "killfloor")
        async with (
            running_guard_of(guard, http),
            null_guard(sim.port, mqtt_port, guard.mqtt_key, workdir / "null") as (nurl, ntoken),
            aiomqtt.Client("127.0.0.1", mqtt_port) as mqtt,
        ):
            await sim.wait_subscribed(0, 20, 30)
            bot = RunawayBot("127.0.0.1", sim.port, BOT_CLIENT)
            await bot.connect()
            null_auth = {"Authorization": f"Bearer {ntoken}"}
            body = {"reason": "bench kill", "mode": "cancel"}

            async def null_http() -> None:
                async with http.post(f"{nurl}/v1/kill", json=body, headers=null_auth) as r:
                    await r.read()

            async def real_http() -> None:
                await guard.kill(http)

            async def rearm() -> None:
                for _ in range(5):  # a keep-alive connection the guard closed: ask again
                    with contextlib.suppress(aiohttp.ClientError):
                        if (await guard.arm(http)).get("state") == "ARMED":
                            return
                    await asyncio.sleep(0.2)

            def mqtt_kill(prefix: str) -> Callable[[], Awaitable[None]]:
                async def send() -> None:
                    await mqtt.publish(f"{prefix}/{ACCOUNT}/cmd/kill", guard.signed_kill(), qos=1)

                return send

            try:
                await asyncio.sleep(1.0)
                await sim.req("flood", rate=FLOOD_RATE, seconds=3600)
                real, null = await paired_series(sim, kills, real_http, null_http, rearm)
                results["http"] = compared(real, null)
                real, null = await paired_series(
                    sim, kills, mqtt_kill("guardd"), mqtt_kill(TOPIC_PREFIX), rearm
                )
                results["mqtt"] = compared(real, null)
                flooded = await breach_series(sim, bot, breaches, rearm)
                flood = (await sim.req("flood_stop"))["stats"]
                results["flood"] = {
                    "target_per_s": FLOOD_RATE,
                    "sent_per_s": round(flood["sent_per_s"]),
                    "skipped": flood["skipped"],
                }
                quiet = await breach_series(sim, bot, breaches, rearm)
                # The same kills without the flood: what is left when the guard's loop is idle.
                real, null = await paired_series(sim, kills, real_http, null_http, rearm)
                results["http_no_flood"] = compared(real, null)
                null_quiet = null
                real, null = await paired_series(
                    sim, kills, mqtt_kill("guardd"), mqtt_kill(TOPIC_PREFIX), rearm
                )
                results["mqtt_no_flood"] = compared(real, null)
                http_null = results["http"]["null"]
                results["breach"] = {
                    "flood": flooded,
                    "no_flood": quiet,
                    "null_http_no_flood": null_quiet,
                    "ratio_p99_flood": ratio(flooded, http_null),
                    "ratio_p99_no_flood": ratio(quiet, http_null),
                }
                results["pacing_violations"] = (await sim.req("state"))["pacing_violations"]
            finally:
                await bot.disconnect()
    results["loadavg_at_end"] = load()
    return results


@contextlib.asynccontextmanager
async def running_guard_of(guard: Guard, http: aiohttp.ClientSession) -> Any:
    try:
        await guard.start(http)
        yield guard
    finally:
        guard.stop()


def rows(results: dict[str, Any]) -> list[tuple[str, str, str, bool | None]]:
    """(name, figure, goal, met) rows for bench.run's table."""

    def fig(s: dict[str, Any]) -> str:
        return (
            f"p50 {s['p50_ms']} / p99 {s['p99_ms']} / max {s['max_ms']} ms (n={s['n']}, "
            f"load {s['loadavg'][0]})"
        )

    out: list[tuple[str, str, str, bool | None]] = []
    for key, label in (
        ("http", "HTTP"),
        ("mqtt", "MQTT"),
        ("http_no_flood", "HTTP, no flood,"),
        ("mqtt_no_flood", "MQTT, no flood,"),
    ):
        s = results.get(key)
        if s:
            goal = GOALS[key.split("_")[0]]
            out.append((f"1. {label} kill -> cancel, guard", fig(s["guard"]), "", None))
            out.append((f"   {label} kill -> cancel, null", fig(s["null"]), "", None))
            r = s["ratio_p99"]
            met = r <= goal if key in GOALS else None  # the goals are under the flood
            out.append((f"   {label} ratio p99", f"x{r}", f"<= {goal}", met))
    b = results.get("breach")
    if b:
        goal = GOALS["breach"]
        for key, label in (("flood", "flood"), ("no_flood", "no flood")):
            r = b[f"ratio_p99_{key}"]
            out.append(
                (
                    f"2. breach -> cancel, {label}",
                    f"{fig(b[key])}, x{r} of null HTTP p99",
                    f"<= {goal}",
                    r <= goal,
                )
            )
    return out
