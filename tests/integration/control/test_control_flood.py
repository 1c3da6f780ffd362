"""A junk flood on the MQTT command topics against the REAL guard (sim over TCP, real mosquitto):
a valid kill still latches, every refusal is accounted for in the journal without one fsync per
junk message, and the deployment's mosquitto ACL keeps other users' publishes from the guard.

Timing goals (a kill latched in < 50 ms p99 under 5,000 junk messages a second) are measured in
`bench.flood` (docs/performance.md), not asserted here.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiomqtt
import pytest

from bench.junk import JunkFlood
from guardd.state.journal import read_journal
from ibsim.gateway import SimGateway
from tests.conftest import eventually
from tests.control_harness import ACCOUNT, Running, running_guard, signed
from tests.mqtt_broker import MQTT_USER, Broker, start_broker, start_deployed_broker

pytestmark = pytest.mark.slow

KILL = f"guardd/{ACCOUNT}/cmd/kill"
ARM = f"guardd/{ACCOUNT}/cmd/arm"
ALL_KILL = "guardd/all/cmd/kill"
JUNK = 20_000


def refusals_in_journal(run: Running) -> tuple[int, int]:
    """(command_refused records, refusals counted in command_refusals_aggregated records)."""
    full = counted = 0
    for record in read_journal(run.guard.cfg.journal_path):
        if record["kind"] == "command_refused":
            full += 1
        elif record["kind"] == "command_refusals_aggregated":
            counted += sum(record["counts"].values())
            assert record["total"] == sum(record["counts"].values())
    return full, counted


async def publish_as(broker: Broker, user: str, password: str, topic: str, body: bytes) -> None:
    async with aiomqtt.Client(broker.host, broker.port, username=user, password=password) as c:
        await c.publish(topic, body, qos=1)


@pytest.fixture
async def unbounded_broker(tmp_path: Path) -> AsyncIterator[Broker]:
    """Anonymous mosquitto that queues without limit: every junk message reaches the guard, so
    the test can count them all."""
    lines = ["allow_anonymous true", "max_queued_messages 0", "max_inflight_messages 0"]
    broker, stop = start_broker(tmp_path / "mosquitto", conf_lines=lines)
    try:
        yield broker
    finally:
        stop()


async def test_junk_flood_then_valid_kill_latched_and_every_refusal_accounted_for(
    sim: SimGateway, unbounded_broker: Broker, tmp_path: Path
) -> None:
    async with running_guard(sim, unbounded_broker, tmp_path) as run:
        flood = JunkFlood(unbounded_broker.host, unbounded_broker.port, [KILL, ARM, ALL_KILL], 0)
        await flood.connect()
        try:
            await flood.send(JUNK // 2)
            await run.publish("kill", signed("kill", "alice", mode="cancel"))
            await flood.send(JUNK - JUNK // 2)

            await eventually(lambda: bool(run.journal("command")), "the valid kill carried out")
            latch = json.loads(run.guard.cfg.latch_path.read_text())
            await eventually(
                lambda: run.guard.refusals.total == JUNK, "every junk counted", timeout_s=60
            )
            during_flood = refusals_in_journal(run)
        finally:
            await flood.close()
        [command] = run.journal("command")
        mqtt = run.guard.mqtt
        assert mqtt is not None and mqtt.connected
    full, counted = refusals_in_journal(run)  # the guard has stopped: the last interval flushed

    assert latch["halted"] is True and latch["principal"] == "alice"
    assert command["accepted"] is True and command["principal"] == "alice"
    # Not one fsync per junk message: the first of each kind (channel + error class) in full...
    assert during_flood[0] <= 3 * 3  # 3 error classes, at most 3 intervals of 10 s
    # ... and every refusal accounted for: records in full + counts = junk sent.
    assert full + counted == JUNK
    assert sum(run.guard.refusals.totals.values()) == JUNK


async def test_refused_commands_then_counted_by_error_class_in_metrics(
    sim: SimGateway, mqtt_broker: Broker, tmp_path: Path
) -> None:
    async with running_guard(sim, mqtt_broker, tmp_path) as run:
        for raw in (b"not json", json.dumps(signed("kill", "mallory")).encode()):
            await run.publish("kill", raw)
        await eventually(lambda: run.guard.refusals.total == 2, "both refused")
        metrics = run.guard.registry

        def refused(error: str) -> float | None:
            labels = {"account": ACCOUNT, "channel": "mqtt", "error": error}
            return metrics.get_sample_value("guardd_commands_refused_total", labels)

        assert refused("CommandError") == 1
        assert refused("AuthError") == 1
        assert run.state == "ARMED"


# ------------------------------------------------------------------------ the broker's ACL

USERS = {MQTT_USER: "guard-password-0123", "operator": "operator-pw-0123", "bot-a": "bot-pw-01234"}


@pytest.fixture
async def acl_broker(tmp_path: Path) -> AsyncIterator[Broker]:
    """mosquitto with deploy/mosquitto/guardd.conf and deploy/mosquitto/acl as shipped."""
    broker, stop = start_deployed_broker(tmp_path / "mosquitto-acl", USERS)
    try:
        yield broker
    finally:
        stop()


async def test_deployed_acl_then_only_the_operator_user_reaches_the_guard(
    sim: SimGateway, acl_broker: Broker, tmp_path: Path
) -> None:
    async with running_guard(sim, acl_broker, tmp_path) as run:
        kill: dict[str, Any] = signed("kill", "alice", mode="cancel")
        body = json.dumps(kill).encode()
        # A bot's user (and the guard's own) publishing a validly signed kill: dropped by the
        # broker, never delivered to the guard.
        await publish_as(acl_broker, "bot-a", USERS["bot-a"], KILL, body)
        await publish_as(acl_broker, "bot-a", USERS["bot-a"], ALL_KILL, body)
        await publish_as(acl_broker, MQTT_USER, USERS[MQTT_USER], KILL, body)
        # The operator's junk arrives after them (one broker, in order): a barrier.
        await publish_as(acl_broker, "operator", USERS["operator"], KILL, b"junk")
        await eventually(lambda: run.guard.refusals.total == 1, "the operator's junk refused")

        assert run.state == "ARMED"
        assert run.journal("command") == []
        [refused] = run.journal("command_refused")
        assert refused["error"] == "CommandError"

        # The same signed kill from the operator's user: delivered and carried out.
        await publish_as(acl_broker, "operator", USERS["operator"], KILL, body)
        await eventually(lambda: run.state == "HALTED", "the operator's kill halted the guard")
        assert run.guard.refusals.total == 1


async def test_deployed_acl_then_anonymous_client_refused_by_the_broker(
    acl_broker: Broker,
) -> None:
    with pytest.raises(aiomqtt.MqttError):
        async with aiomqtt.Client(acl_broker.host, acl_broker.port) as client:
            await client.publish(KILL, b"x", qos=1)


async def test_flood_over_running_guard_then_guard_keeps_answering_http(
    sim: SimGateway, unbounded_broker: Broker, tmp_path: Path
) -> None:
    async with running_guard(sim, unbounded_broker, tmp_path) as run:
        flood = JunkFlood(unbounded_broker.host, unbounded_broker.port, [KILL], 2_000)
        await flood.connect()
        flood.start(seconds=3)
        try:
            await eventually(lambda: run.guard.refusals.total > 100, "the flood arrives")
            status, body = await run.post("kill", {"reason": "under flood"}, "kill")
            assert status == 200 and body["state"] == "HALTED"
            await flood.wait()
        finally:
            await flood.close()
        await eventually(
            lambda: run.guard.refusals.total == flood.sent, "all counted", timeout_s=60
        )
