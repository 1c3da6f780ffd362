"""Replay across a restart, against the real daemon: `guardd run` processes, a real mosquitto, the
simulated IB Gateway and real HTTP.

An attacker who captured a signed kill and a signed arm (sniffed from the broker, or read from a
log) replays them after the guard restarted: plainly, and as retained messages waiting on the
broker for the guard's next subscription; within the replay window and after it. Every replay
is refused and journaled as ``command_refused``, and nothing changes at the guard or the gateway.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import aiomqtt
import pytest

from guardd.control.auth import signed_payload
from guardd.state.journal import read_journal
from ibsim.gateway import SimGateway
from tests.conftest import eventually
from tests.drill_helpers import GuardProcesses, http_kill, http_ready, wait_gone, write_run_config
from tests.guard_harness import ACCOUNT, GUARD_CLIENT_ID
from tests.mqtt_broker import Broker, start_broker

pytestmark = [pytest.mark.integration, pytest.mark.slow]

WINDOW_S = 30
KEYS = {"alice": "alice-secret-key-0123456789", "bob": "bob-secret-key-0123456789ab"}


def signed(action: str, key_id: str, ts: int) -> dict[str, object]:
    return signed_payload(
        action="kill" if action == "kill" else "arm",
        target=ACCOUNT,
        reason="captured",
        key_id=key_id,
        secret=KEYS[key_id].encode(),
        ts=ts,
        nonce=secrets.token_hex(16),
        mode="cancel" if action == "kill" else None,
    )


async def publish(broker: Broker, payload: dict[str, object], *, retain: bool = False) -> None:
    topic = f"guardd/{ACCOUNT}/cmd/{payload['action']}"
    async with aiomqtt.Client(broker.host, broker.port) as client:
        await client.publish(topic, json.dumps(payload).encode(), qos=1, retain=retain)


class Daemon:
    """The `guardd run` processes of one state directory, and what the test reads from them."""

    def __init__(self, state_dir: Path, config: Path, url: str, kill_token: str) -> None:
        self.state_dir = state_dir
        self.config = config
        self.url = url
        self.kill_token = kill_token
        self.read_token = (state_dir / "token-read").read_text()

    def journal(self) -> list[dict[str, Any]]:
        return list(read_journal(self.state_dir / "journal.jsonl"))

    def refusals_accounted(self) -> int:
        """Refusals since the last start: those journaled in full plus those only counted (a
        refusal of a kind already journaled in the interval is in `command_refusals_aggregated`)."""
        full = len(self.since_last_start("command_refused"))
        counted = sum(
            sum(int(n) for n in r["counts"].values())
            for r in self.since_last_start("command_refusals_aggregated")
        )
        return full + counted

    def since_last_start(self, kind: str) -> list[dict[str, Any]]:
        records = self.journal()
        starts = [i for i, r in enumerate(records) if r["kind"] == "guard_started"]
        return [r for r in records[starts[-1] :] if r["kind"] == kind]

    async def state(self, http: aiohttp.ClientSession) -> str:
        headers = {"Authorization": f"Bearer {self.read_token}"}
        async with http.get(f"{self.url}/v1/status", headers=headers) as response:
            assert response.status == 200
            return str((await response.json())["state"])

    async def wait_state(self, http: aiohttp.ClientSession, state: str) -> None:
        async def there() -> bool:
            return await self.state(http) == state

        await eventually(there, f"state {state}")


@contextlib.asynccontextmanager
async def daemon_with_mqtt(sim: SimGateway, tmp_path: Path) -> AsyncIterator[tuple[Daemon, Broker]]:
    broker, stop_broker = start_broker(tmp_path / "mosquitto")
    key_lines = []
    for key_id, key in KEYS.items():
        path = tmp_path / f"{key_id}.key"
        path.write_text(key + "\n")
        path.chmod(0o600)
        key_lines.append(f'{key_id} = "{path}"')
    extra = f"""
[kill]
mode = "cancel"

[control]
refusal_interval_s = 0.2

[control.mqtt]
enabled = true
host = "{broker.host}"
port = {broker.port}
window_s = {WINDOW_S}.0

[control.mqtt.operator_key_files]
{chr(10).join(key_lines)}

[control.mqtt.operator_key_roles]
bob = ["kill", "arm"]
"""
    state_dir = tmp_path / "state"
    config, url, kill_token = write_run_config(state_dir, sim.port, extra)
    try:
        yield Daemon(state_dir, config, url, kill_token), broker
    finally:
        stop_broker()


async def test_captured_kill_and_arm_replayed_after_restart_then_all_refused_and_nothing_changes(
    sim: SimGateway, tmp_path: Path
) -> None:
    # Arrange: commands an operator really sent (and an attacker captured), two of them signed
    # near the end of their window so that they are stale by the time of the replay
    t0 = int(time.time())
    old_ts = t0 - (WINDOW_S - 8)
    old_kill, old_arm = signed("kill", "alice", old_ts), signed("arm", "bob", old_ts)
    kill, arm = signed("kill", "alice", t0), signed("arm", "bob", t0)
    procs = GuardProcesses()
    second: int | None = None
    async with daemon_with_mqtt(sim, tmp_path) as (guard, broker), aiohttp.ClientSession() as http:
        log = guard.state_dir / "guardd.log"
        try:
            first = procs.start(guard.config, log, fresh_start=True)
            try:
                await http_ready(http, guard.url)
                for command, state in (
                    (old_kill, "HALTED"), (old_arm, "ARMED"), (kill, "HALTED"), (arm, "ARMED")
                ):  # fmt: skip
                    await publish(broker, command)
                    await guard.wait_state(http, state)
                accepted = [r["request_id"] for r in guard.since_last_start("command")]
                assert accepted == [c["nonce"] for c in (old_kill, old_arm, kill, arm)]
            finally:
                os.kill(first, signal.SIGKILL)  # it dies: no clean shutdown, nothing flushed late
            await wait_gone(first)
            await eventually(
                lambda: GUARD_CLIENT_ID not in sim.sessions, "session gone", timeout_s=5
            )
            # the attacker leaves both on the broker, retained, for the guard's next start
            await publish(broker, kill, retain=True)
            await publish(broker, arm, retain=True)
            cancels = sim.global_cancels

            # Act 1: the restart; then replays within the window, while ARMED
            second = procs.start(guard.config, log, fresh_start=False)
            await http_ready(http, guard.url)
            await eventually(
                lambda: guard.refusals_accounted() >= 2,
                "the retained kill and arm refused at subscription",
                timeout_s=10,
            )
            await publish(broker, kill)
            await publish(broker, kill, retain=True)  # a live subscriber gets it as a plain one
            await eventually(lambda: guard.refusals_accounted() >= 4, timeout_s=10)
            # ... and after the window: the old pair is stale now
            await eventually(lambda: time.time() > old_ts + WINDOW_S + 1, timeout_s=WINDOW_S)
            await publish(broker, old_kill)
            await eventually(lambda: guard.refusals_accounted() >= 5, timeout_s=10)
            armed_after_kill_replays = await guard.state(http)
            cancels_after_kill_replays = sim.global_cancels

            # Act 2: HALTED by a fresh HTTP kill; then the arm replays
            status, _ = await http_kill(http, guard.url, guard.kill_token, mode="cancel")
            assert status == 200
            await publish(broker, arm)
            await publish(broker, arm, retain=True)
            await publish(broker, old_arm)
            await eventually(lambda: guard.refusals_accounted() >= 8, timeout_s=10)
            halted_after_arm_replays = await guard.state(http)
            commands = guard.since_last_start("command")
            refusals = guard.since_last_start("command_refused")
            aggregated = guard.since_last_start("command_refusals_aggregated")
            accounted = guard.refusals_accounted()
        finally:
            if second is not None:
                os.kill(second, signal.SIGTERM)
                await wait_gone(second)
            procs.close()

    # Assert: nothing a replay asked for happened; every replay is on the record, and why
    assert armed_after_kill_replays == "ARMED"
    assert cancels_after_kill_replays == cancels  # not one global cancel at the gateway
    assert halted_after_arm_replays == "HALTED"
    assert [(c["channel"], c["action"]) for c in commands] == [("http", "kill")]
    # Every one of the 8 replays is accounted for: journaled in full (the first of its kind in
    # an interval) or counted in the interval's aggregated record, all as replays.
    assert accounted == 8
    assert {r["error"] for r in refusals} == {"ReplayError"}
    assert all(set(r["counts"]) <= {"mqtt:ReplayError"} for r in aggregated), aggregated
    captured = {kill["nonce"], arm["nonce"], old_kill["nonce"], old_arm["nonce"]}
    assert {r["request_id"] for r in refusals} <= captured
    because = [(r["action"], r["request_id"], r["refused_because"]) for r in refusals]
    # the first thing the restarted guard refused is a retained command, before any replay
    assert "retained" in because[0][2] and because[0][1] in {kill["nonce"], arm["nonce"]}
    reasons = [why for _, _, why in because]
    assert all(
        "retained" in why or "already used" in why or f"s old (window {WINDOW_S} s)" in why
        for why in reasons
    ), reasons
    # the stale kill came alone, after the window: in full, refused for its age
    assert any(n == old_kill["nonce"] and "s old" in why for _, n, why in because), because
