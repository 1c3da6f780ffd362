"""A real `Guard` with HTTP and MQTT control against the simulated gateway, and guardctl.

- `running_guard(sim, broker, tmp_path, ...)`: the demo config's guard with signed-MQTT and HTTP
  control, ready and MQTT-connected on entry; a `Running` to drive it (publish, post, journal).
- `signed(action, key_id)`: a signed MQTT command from one of `KEYS`.
- `bot` (a fixture for every test), `bot_orders`, `positions`: a runaway bot and what it left.
- `guardctl(*argv)`, `doc_example(name)`, `run_shell`, `require_tools`: the CLI and the shell
  examples of docs/control.md as an operator runs them.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import shutil
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import aiomqtt
import pytest

from guardd.config import ControlConfig, load_config
from guardd.control.auth import signed_payload
from guardd.control.guardctl import main
from guardd.demo import DEMO_CONFIG, demo_config
from guardd.runtime.guard import Guard
from guardd.state.journal import read_journal
from ibsim.bot import RunawayBot
from ibsim.gateway import SimGateway
from tests.conftest import eventually
from tests.mqtt_broker import Broker

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "control.md"
ACCOUNT = "DU000001"
BOT_CLIENT_ID = 7
# alice's key is not granted roles: kill only. bob's may kill and re-arm.
KEYS = {"alice": "alice-secret-key-0123456789", "bob": "bob-secret-key-0123456789ab"}
KEY_ROLES = {"bob": ["kill", "arm"]}


@dataclass
class Running:
    """A running guard with HTTP and MQTT control, and what a test needs to drive it."""

    guard: Guard
    sim: SimGateway
    broker: Broker
    url: str
    tokens: dict[str, str]  # role -> bearer token
    token_files: dict[str, Path]

    @property
    def state(self) -> str:
        return str(self.guard.engine.state)

    def journal(self, kind: str) -> list[dict[str, Any]]:
        return [r for r in read_journal(self.guard.cfg.journal_path) if r["kind"] == kind]

    async def publish(self, action: str, payload: dict[str, object] | bytes) -> None:
        body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        async with aiomqtt.Client(self.broker.host, self.broker.port) as client:
            await client.publish(f"guardd/{ACCOUNT}/cmd/{action}", body, qos=1)

    async def retained_state(self) -> dict[str, Any]:
        """What a subscriber joining now is told first: the retained state."""
        async with aiomqtt.Client(self.broker.host, self.broker.port) as client:
            await client.subscribe(f"guardd/{ACCOUNT}/state", qos=1)
            async with asyncio.timeout(5):
                async for message in client.messages:
                    assert message.retain and isinstance(message.payload, bytes)
                    state: dict[str, Any] = json.loads(message.payload)
                    return state
        raise AssertionError("no retained state")

    async def arm_over_mqtt(self, key_id: str, **extra: Any) -> dict[str, Any]:
        """Publish a signed arm and return the guard's journal record of it."""
        before = len(self.journal("command"))
        await self.publish("arm", signed("arm", key_id, reason="agreed", **extra))
        await eventually(lambda: len(self.journal("command")) > before, "arm journaled")
        return self.journal("command")[-1]

    async def post(self, action: str, body: dict[str, object], role: str | None) -> Any:
        headers = {} if role is None else {"Authorization": f"Bearer {self.tokens[role]}"}
        async with (
            aiohttp.ClientSession() as session,
            session.post(f"{self.url}/v1/{action}", json=body, headers=headers) as response,
        ):
            return response.status, await response.json()


def signed(action: str, key_id: str, *, ts: int | None = None, **extra: Any) -> dict[str, object]:
    return signed_payload(
        action="kill" if action == "kill" else "arm",
        target=ACCOUNT,
        reason=extra.pop("reason", "runaway bot"),
        key_id=key_id,
        secret=extra.pop("secret", KEYS.get(key_id, "x" * 20)).encode(),
        ts=int(time.time()) if ts is None else ts,
        nonce=secrets.token_hex(16),
        **extra,
    )


@contextlib.asynccontextmanager
async def running_guard(
    sim: SimGateway,
    broker: Broker,
    tmp_path: Path,
    *,
    two_person: bool = False,
    kill_mode: str | None = None,
    key_roles: dict[str, list[str]] | None = None,
    people: dict[str, dict[str, list[str]]] | None = None,
    http: dict[str, object] | None = None,
) -> AsyncIterator[Running]:
    """A guard with HTTP and MQTT control. With ``two_person`` and no ``people``: the HTTP arm
    token is carol's and the key bob's (the config requires every arm credential's person)."""
    state_dir = tmp_path / "state"
    state_dir.mkdir()
    cfg = demo_config(load_config(DEMO_CONFIG), ib_port=sim.port, state_dir=state_dir)
    key_files = {}
    for key_id, key in KEYS.items():
        path = tmp_path / f"{key_id}.key"
        path.write_text(key + "\n")
        path.chmod(0o600)
        key_files[key_id] = path
    credentials: dict[str, object] = {}
    if broker.username is not None and broker.password is not None:
        password_file = tmp_path / "mqtt-password"
        password_file.write_text(broker.password + "\n")
        password_file.chmod(0o600)
        credentials = {"username": broker.username, "password_file": password_file}
    mqtt = cfg.control.mqtt.model_copy(
        update={
            "enabled": True,
            "host": broker.host,
            "port": broker.port,
            "operator_key_files": key_files,
            "operator_key_roles": {k: tuple(v) for k, v in (key_roles or KEY_ROLES).items()},
            **credentials,
        }
    )
    if people is None and two_person:
        people = {"carol": {"http_tokens": ["arm"]}, "bob": {"mqtt_keys": ["bob"]}}
    control = cfg.control.model_copy(
        update={
            "mqtt": mqtt,
            "http": cfg.control.http.model_copy(update=http or {}),
            "two_person_rearm": two_person,
            "rearm_window_s": 60.0,
        }
    )
    # validated as the config file would be: people name known credentials, two can re-arm
    control = ControlConfig.model_validate({**control.model_dump(), "people": people or {}})
    cfg = cfg.model_copy(update={"control": control})
    if kill_mode is not None:
        cfg = cfg.model_copy(update={"kill": cfg.kill.model_copy(update={"mode": kill_mode})})
    token_files = cfg.control.http.token_files
    files = {"read": token_files.read, "kill": token_files.kill, "arm": token_files.arm}
    tokens = {role: path.read_text().strip() for role, path in files.items() if path}
    guard = Guard.open(cfg, fresh_start=True)
    stop = asyncio.Event()
    task = asyncio.create_task(guard.run(stop), name="guard")
    try:
        await asyncio.wait_for(guard.ready_event.wait(), 10)
        await eventually(lambda: guard.mqtt is not None and guard.mqtt.connected, "MQTT up")
        assert guard.http is not None
        paths = {role: path for role, path in files.items() if path}
        yield Running(guard, sim, broker, guard.http.url, tokens, paths)
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)


@pytest.fixture
async def bot(sim: SimGateway) -> AsyncIterator[RunawayBot]:
    robot = RunawayBot("127.0.0.1", sim.port, BOT_CLIENT_ID)
    await robot.connect()
    try:
        yield robot
    finally:
        await robot.disconnect()


def bot_orders(sim: SimGateway) -> list[int]:
    return [o.order_id for o in sim.exchange.working_orders() if o.client_id == BOT_CLIENT_ID]


def positions(sim: SimGateway) -> dict[str, float]:
    return {p.instrument.symbol: p.position for p in sim.exchange.positions(ACCOUNT)}


async def guardctl(*argv: str) -> int:
    """Run guardctl in a thread (it runs its own event loop) while the servers run in ours."""
    return await asyncio.to_thread(main, list(argv))


def doc_example(name: str) -> str:
    """The first ```sh block after ``<!-- example: name`` in docs/control.md."""
    text = DOC.read_text()
    after = text[text.index(f"<!-- example: {name}") :]
    return after.split("```sh\n", 1)[1].split("```", 1)[0]


def require_tools(*tools: str) -> None:
    missing = [tool for tool in tools if shutil.which(tool) is None]
    if missing:
        pytest.fail(
            f"{', '.join(missing)} not installed; the documented example needs them "
            "(apt-get install -y openssl mosquitto-clients curl)",
            pytrace=False,
        )


async def run_shell(script: str, env: dict[str, str]) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        "bash", "-euo", "pipefail", "-c", script,
        env={**os.environ, **env},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    out, _ = await asyncio.wait_for(proc.communicate(), 20)
    return proc.returncode or 0, out.decode()
