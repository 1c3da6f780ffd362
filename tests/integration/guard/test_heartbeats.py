"""Bot heartbeats (the dead-man): a real guard, a real mosquitto, the simulated gateway."""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiomqtt
import pytest

from guardd.config import BotHeartbeat, load_config
from guardd.demo import DEMO_CONFIG, demo_config
from guardd.runtime.guard import Guard
from ibsim.gateway import SimGateway
from tests.conftest import eventually
from tests.mqtt_broker import Broker

pytestmark = pytest.mark.integration


def heartbeat_guard(sim: SimGateway, broker: Broker, state_dir: Path) -> Guard:
    cfg = demo_config(load_config(DEMO_CONFIG), ib_port=sim.port, state_dir=state_dir)
    mqtt = cfg.control.mqtt.model_copy(
        update={"enabled": True, "host": broker.host, "port": broker.port}
    )
    beats = cfg.limits.heartbeats.model_copy(
        update={"bots": {"alpha": BotHeartbeat(timeout_s=1.5, action="kill")}}
    )
    return Guard.open(
        cfg.model_copy(
            update={
                "control": cfg.control.model_copy(update={"mqtt": mqtt}),
                "limits": cfg.limits.model_copy(update={"heartbeats": beats}),
            }
        ),
        fresh_start=True,
    )


async def test_bot_heartbeats_then_armed_and_silence_then_halted(
    sim: SimGateway, mqtt_broker: Broker, tmp_path: Path
) -> None:
    guard = heartbeat_guard(sim, mqtt_broker, tmp_path)
    stop = asyncio.Event()
    task = asyncio.create_task(guard.run(stop))
    try:
        await asyncio.wait_for(guard.ready_event.wait(), 10)
        await eventually(lambda: guard.mqtt is not None and guard.mqtt.connected, "MQTT up")
        async with aiomqtt.Client(mqtt_broker.host, mqtt_broker.port) as bot:
            for _ in range(12):  # 2.4 s of heartbeats: longer than the 1.5 s timeout
                await bot.publish("guardd/DU000001/heartbeat/alpha", b"ok")
                await bot.publish("guardd/DU000001/heartbeat/stranger", b"ok")
                await asyncio.sleep(0.2)
            assert str(guard.engine.state) == "ARMED"
            assert "stranger" not in guard.book.heartbeats
        # The bot falls silent: the dead-man fires.
        await eventually(
            lambda: str(guard.engine.state) == "HALTED", "halted on silence", timeout_s=6
        )
        assert guard.engine.latch is not None and "heartbeat" in guard.engine.latch.reason
        await eventually(lambda: sim.global_cancels >= 1, "global cancel at the gateway")
        assert sim.pacing_violations == 0
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)
