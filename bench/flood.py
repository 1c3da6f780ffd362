"""Benchmarks of the control plane under attack: a valid signed MQTT kill under a junk flood on
the command topics (`bench_mqtt_flood`), and an HTTP kill while 1,100 idle connections and 200
slow-body clients are held (`bench_http_exhaustion`).

MQTT junk flood.
`guardd run` (the real daemon) against the simulated gateway and mosquitto (its default queue
limits, anonymous: the attacker has publish rights, the ACL of deploy/mosquitto is not in place).
`bench.junk.JunkFlood` offers `rate` junk messages a second at QoS 1 on the guard's kill, arm and
fleet-kill topics for `seconds`; meanwhile, about once a second, the driver publishes a validly
signed kill, waits for the gateway to see the global cancel, and re-arms over HTTP.

Figures:
- kill -> latched: from just before the publish (wall clock) to the guard's journal record of the
  command, which is written after the latch file is durable (same host clock);
- kill -> cancel at the sim (monotonic, as the other kill benchmarks);
- the guard's RSS before, at its highest during the flood, and after; its CPU share;
- junk offered and counted by the guard (guardd_commands_refused_total), and how the journal
  accounts for them (command_refused records in full + command_refusals_aggregated counts).

HTTP exhaustion. The guard runs with the systemd unit's open-file limit (LimitNOFILE, 4096). The
driver opens 1,100 idle connections and 200 connections that send a kill's headers and the start
of its body and nothing more (timeouts raised to 120 s, so that they are held, not timed out),
then sends `kills` HTTP kills, one at a time, each followed by a status read and a re-arm.
Figures: kill -> 200 answer, kill -> latched (as above), status answer time, connections evicted.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import resource
import secrets
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import aiomqtt

from bench.junk import JunkFlood, junk_payloads
from bench.run import (
    ACCOUNT,
    Guard,
    GuardSetup,
    Sim,
    mosquitto,
    rss_mb,
    running_guard,
    summary_ms,
)
from guardd.control.auth import signed_payload
from guardd.state.journal import read_journal

__all__ = [
    "FLOOD_JUNK_RATE",
    "bench_http_exhaustion",
    "bench_mqtt_flood",
    "goal_met",
    "http_goal_met",
]

FLOOD_JUNK_RATE = 6_000.0
TOPICS = (f"guardd/{ACCOUNT}/cmd/kill", f"guardd/{ACCOUNT}/cmd/arm", "guardd/all/cmd/kill")


def _cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def _refused(guard: Guard, http: aiohttp.ClientSession) -> tuple[float, float]:
    """(guardd_commands_refused_total, guardd_mqtt_dropped_total), summed over labels."""
    async with http.get(f"{guard.url}/metrics") as r:
        text = await r.text()
    refused = dropped = 0.0
    for line in text.splitlines():
        if line.startswith("guardd_commands_refused_total{"):
            refused += float(line.rsplit(" ", 1)[1])
        elif line.startswith("guardd_mqtt_dropped_total{"):
            dropped += float(line.rsplit(" ", 1)[1])
    return refused, dropped


async def _one_kill(
    sim: Sim, guard: Guard, http: aiohttp.ClientSession, mqtt: aiomqtt.Client
) -> tuple[str, float, float | None]:
    """Publish one signed kill, wait for its cancel at the sim, re-arm: (nonce, wall time of the
    publish, kill -> cancel seconds or None if missed)."""
    await sim.req("marks", clear=True)
    nonce = secrets.token_hex(16)
    payload = signed_payload(
        action="kill",
        target=ACCOUNT,
        reason="bench kill under junk",
        key_id="bench",
        secret=guard.mqtt_key.encode(),
        ts=int(time.time()),
        nonce=nonce,
        mode="cancel",
    )
    body = json.dumps(payload)
    wall, t0 = time.time(), time.monotonic()
    await mqtt.publish(f"guardd/{ACCOUNT}/cmd/kill", body, qos=1)
    got = await sim.req("wait_cancel", after=0, timeout=5.0)
    mine = [t for t, client in got["cancels"] if client == 0]
    cancel = mine[0] - t0 if mine else None
    for _ in range(50):  # the command must be carried out before the re-arm can find it HALTED
        if (await guard.status(http)).get("state") == "HALTED":
            break
        await asyncio.sleep(0.02)
    armed = await guard.arm(http)
    if armed.get("state") != "ARMED":
        await asyncio.sleep(0.2)
        await guard.arm(http)
    return nonce, wall, cancel


async def bench_mqtt_flood(
    workdir: Path, http: aiohttp.ClientSession, seconds: float, rate: float = FLOOD_JUNK_RATE
) -> dict[str, Any]:
    """The benchmark (see the module docstring); `seconds` of flood."""
    async with mosquitto(workdir) as mqtt_port, Sim(20) as sim:
        setup = GuardSetup(mqtt_port=mqtt_port)
        async with running_guard(sim, setup, workdir / "mqtt-flood", http) as guard:
            assert guard.proc is not None
            pid = guard.proc.pid
            await sim.wait_subscribed(0, 20, 30)
            await asyncio.sleep(1.0)
            async with aiomqtt.Client("127.0.0.1", mqtt_port) as mqtt:
                quiet = [await _one_kill(sim, guard, http, mqtt) for _ in range(10)]
                rss_before = rss_mb(pid)[0]
                refused0, _ = await _refused(guard, http)
                flood = JunkFlood(
                    "127.0.0.1",
                    mqtt_port,
                    TOPICS,
                    rate,
                    qos=1,
                    payloads=junk_payloads(3000, known_key_ids=("bench",)),
                )
                await flood.connect()
                cpu0, t0 = _cpu_s(pid), time.monotonic()
                flood.start(seconds)
                rss_peak = rss_before
                trials = []
                await asyncio.sleep(min(2.0, seconds / 4))  # the flood is in full swing
                while time.monotonic() - t0 < seconds - 1.0:
                    trials.append(await _one_kill(sim, guard, http, mqtt))
                    rss_peak = max(rss_peak, rss_mb(pid)[0])
                    await asyncio.sleep(0.5)
                await flood.wait()
                cpu1, t1 = _cpu_s(pid), time.monotonic()
                deadline = time.monotonic() + 30
                while time.monotonic() < deadline:  # what was delivered is counted by now
                    refused1, dropped = await _refused(guard, http)
                    if refused1 - refused0 >= flood.sent:
                        break
                    await asyncio.sleep(0.5)
                await flood.close()
                rss_after = rss_mb(pid)[0]
                after = [await _one_kill(sim, guard, http, mqtt) for _ in range(10)]
        # The guard has stopped: its last refusal interval is journaled.
        latched = _latched(guard, trials)
        latched_quiet = _latched(guard, quiet)
        latched_after = _latched(guard, after)
        full, aggregated, records = _accounting(guard)
    cancels = [c for _, _, c in trials if c is not None]
    return {
        "flood_s": seconds,
        "junk_target_per_s": rate,
        "junk_sent": flood.sent,
        "junk_sent_per_s": round(flood.sent_per_s),
        "junk_counted_by_guard": int(refused1 - refused0),
        "junk_dropped_by_guard": int(dropped),
        "kills": len(trials),
        "kills_missed": sum(1 for _, _, c in trials if c is None),
        "kills_not_latched": len(trials) - len(latched),
        "kill_to_latched": summary_ms(latched),
        "kill_to_cancel_at_sim": summary_ms(cancels),
        "kill_to_latched_before_flood": summary_ms(latched_quiet),
        "kill_to_latched_after_flood": summary_ms(latched_after),
        "rss_before_mb": round(rss_before, 1),
        "rss_peak_mb": round(rss_peak, 1),
        "rss_after_mb": round(rss_after, 1),
        "rss_growth_mb": round(max(rss_peak, rss_after) - rss_before, 1),
        "guard_cpu_share": round((cpu1 - cpu0) / (t1 - t0), 2),
        "journal_command_refused_records": full,
        "journal_aggregated_counts": aggregated,
        "journal_refusal_records_total": records,
        "loadavg": [round(x, 2) for x in os.getloadavg()],
    }


def _latched(guard: Guard, trials: list[tuple[str, float, float | None]]) -> list[float]:
    """Seconds from each publish to the journal's record of the command (after the latch)."""
    sent = {nonce: wall for nonce, wall, _ in trials}
    out = []
    for record in read_journal(guard.journal_path):
        nonce = record.get("request_id")
        if record.get("kind") == "command" and nonce in sent and record.get("accepted"):
            out.append(float(record["ts"]) - sent[nonce])
    return out


def _accounting(guard: Guard) -> tuple[int, int, int]:
    """(command_refused records, refusals counted in aggregated records, records written)."""
    full = aggregated = records = 0
    for record in read_journal(guard.journal_path):
        if record.get("kind") == "command_refused":
            full += 1
            records += 1
        elif record.get("kind") == "command_refusals_aggregated":
            aggregated += int(record.get("total", 0))
            records += 1
    return full, aggregated, records


UNIT_NOFILE = 4096  # LimitNOFILE in deploy/systemd/guardd.service
IDLE, SLOW_BODY = 1_100, 200


@contextlib.contextmanager
def _soft_nofile(limit: int) -> Iterator[None]:
    """The driver's soft open-file limit set to ``limit`` (what a child it starts inherits)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(limit, hard), hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


async def bench_http_exhaustion(
    workdir: Path, http: aiohttp.ClientSession, kills: int
) -> dict[str, Any]:
    """HTTP kills while idle and slow-body connections are held (see the module docstring)."""
    async with Sim(20) as sim:
        setup = GuardSetup(http_timeouts_s=120.0)
        guard = Guard(sim.port, setup, workdir / "http-exhaustion")
        with _soft_nofile(UNIT_NOFILE):
            await guard.start(http)
        try:
            await sim.wait_subscribed(0, 20, 30)
            head = (
                "POST /v1/kill HTTP/1.1\r\nHost: guard\r\nContent-Type: application/json\r\n"
                f"Authorization: Bearer {guard.tokens['kill']}\r\nContent-Length: 1000\r\n\r\n"
                '{"reason": "'
            ).encode()
            held = []
            for n in range(IDLE + SLOW_BODY):
                reader, writer = await asyncio.open_connection("127.0.0.1", guard.http_port)
                if n >= IDLE:
                    writer.write(head)
                held.append((reader, writer))
            await asyncio.sleep(1.0)
            replies, statuses, trials = [], [], []
            answered = 0
            try:
                for _ in range(kills):
                    wall, t0 = time.time(), time.monotonic()
                    reply = await guard.kill(http)
                    replies.append(time.monotonic() - t0)
                    answered += reply.get("state") == "HALTED"
                    t1 = time.monotonic()
                    await guard.status(http)
                    statuses.append(time.monotonic() - t1)
                    trials.append((str(reply.get("request_id")), wall, None))
                    await guard.arm(http)
                    await asyncio.sleep(0.05)
            finally:
                for _, writer in held:
                    writer.close()
            assert guard.proc is not None
            open_files = len(os.listdir(f"/proc/{guard.proc.pid}/fd"))
        finally:
            guard.stop()
        latched = _latched(guard, trials)
    return {
        "limit_nofile": UNIT_NOFILE,
        "idle_connections": IDLE,
        "slow_body_connections": SLOW_BODY,
        "kills": kills,
        "kills_answered_halted": answered,
        "kill_to_answer": summary_ms(replies),
        "kill_to_latched": summary_ms(latched),
        "status_answer": summary_ms(statuses),
        "guard_open_files_after": open_files,
        "loadavg": [round(x, 2) for x in os.getloadavg()],
    }


def http_goal_met(result: dict[str, Any]) -> bool:
    """Every kill answered HALTED and latched, p99 of both < 100 ms."""
    answer, latched = result["kill_to_answer"], result["kill_to_latched"]
    return (
        result["kills_answered_halted"] == result["kills"]
        and latched["n"] == result["kills"]
        and answer["p99_ms"] < 100.0
        and latched["p99_ms"] < 100.0
    )


def goal_met(result: dict[str, Any]) -> bool:
    """p99 kill -> latched < 50 ms, no kill missed, RSS growth < 20 MB, flood >= 5,000/s."""
    p99 = result["kill_to_latched"]["p99_ms"]
    return (
        not math.isnan(p99)
        and p99 < 50.0
        and result["kills_missed"] == 0
        and result["kills_not_latched"] == 0
        and result["rss_growth_mb"] < 20.0
        and result["junk_sent_per_s"] >= 5_000
    )
