"""The control plane against the REAL guard: signed MQTT kills and HTTP kills halt a `Guard`
connected over TCP to the simulated IB Gateway, refused commands change nothing at the gateway,
per-operator key roles, and the two-person re-arm rule across HTTP and MQTT."""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from guardd.config import parse_config
from guardd.errors import ConfigError
from guardd.state.journal import read_journal
from ibsim.bot import RunawayBot
from ibsim.gateway import SimGateway
from ibsim.scenario import parse_scenario
from ibsim.server import build_gateway
from tests.conftest import SCENARIO, eventually, free_port
from tests.control_harness import (
    ACCOUNT,
    KEYS,
    Running,
    bot_orders,
    doc_example,
    guardctl,
    positions,
    require_tools,
    run_shell,
    running_guard,
    signed,
)
from tests.drill_helpers import http_ready, write_run_config
from tests.mqtt_broker import Broker


@pytest.fixture
async def running(sim: SimGateway, mqtt_broker: Broker, tmp_path: Path) -> AsyncIterator[Running]:
    async with running_guard(sim, mqtt_broker, tmp_path) as run:
        yield run


# ------------------------------------------------------------------------ signed MQTT kills


async def test_signed_mqtt_kill_with_bot_orders_working_then_halted_and_cancelled_at_gateway(
    running: Running, bot: RunawayBot
) -> None:
    for n in range(3):
        bot.place_limit("AAPL", "BUY", 100, 150.0 - n)
    await eventually(lambda: len(bot_orders(running.sim)) == 3, "the bot's orders rest")
    await eventually(lambda: running.guard.book.working_order_count == 3, "the guard sees them")

    await running.publish("kill", signed("kill", "alice", mode="cancel"))

    await eventually(lambda: running.state == "HALTED", "HALTED")
    await eventually(lambda: not running.sim.exchange.working_orders(), "orders cancelled")
    assert running.sim.global_cancels >= 1
    assert positions(running.sim) == {"AAPL": 1000, "ES": -2}  # cancel mode: no flatten
    latch = running.guard.engine.latch
    assert latch is not None and (latch.source, latch.principal) == ("mqtt", "alice")
    [command] = running.journal("command")
    assert (command["principal"], command["accepted"]) == ("alice", True)


async def test_signed_mqtt_kill_flatten_then_positions_flat_at_gateway(running: Running) -> None:
    assert positions(running.sim) == {"AAPL": 1000, "ES": -2}

    await running.publish("kill", signed("kill", "bob", mode="flatten"))

    await eventually(lambda: running.state == "HALTED", "HALTED")
    await eventually(lambda: not running.sim.exchange.positions(ACCOUNT), "flat", timeout_s=20)
    assert running.sim.global_cancels >= 1
    assert not running.sim.exchange.working_orders()


async def test_documented_openssl_mosquitto_pub_kill_then_guard_halted(running: Running) -> None:
    require_tools("openssl", "mosquitto_pub", "bash")
    env = {
        "KEY_ID": "alice",
        "KEY": KEYS["alice"],
        "ACCOUNT": ACCOUNT,
        "MQTT_HOST": running.broker.host,
        "MQTT_PORT": str(running.broker.port),
    }

    code, out = await run_shell(doc_example("mqtt-kill"), env)

    assert code == 0, out
    await eventually(lambda: running.state == "HALTED", "HALTED")
    await eventually(lambda: running.sim.global_cancels >= 1, "global cancel at the gateway")
    # no mode in the example: the configured kill.mode (flatten in configs/demo.toml) applies
    await eventually(lambda: not running.sim.exchange.positions(ACCOUNT), "flat", timeout_s=20)
    assert running.journal("command_refused") == []


def unsigned() -> dict[str, object]:
    return {k: v for k, v in signed("kill", "alice").items() if k != "sig"}


@pytest.mark.parametrize(
    ("make", "error"),
    [
        pytest.param(unsigned, "CommandError", id="unsigned"),
        pytest.param(
            lambda: signed("kill", "alice", secret="not-alices-key-0123456789"),
            "AuthError",
            id="wrongly-signed",
        ),
        pytest.param(lambda: signed("kill", "mallory"), "AuthError", id="unknown-key"),
        pytest.param(
            lambda: signed("kill", "alice", ts=int(time.time()) - 600), "ReplayError", id="stale"
        ),
    ],
)
async def test_bad_mqtt_kill_then_armed_no_cancel_and_refusal_journaled(
    running: Running, make: Callable[[], dict[str, object]], error: str
) -> None:
    payload = make()

    await running.publish("kill", payload)

    await eventually(lambda: bool(running.journal("command_refused")), "refusal journaled")
    await asyncio.sleep(0.3)  # a kill that slipped through would have cancelled by now
    assert running.state == "ARMED"
    assert running.sim.global_cancels == 0
    [refusal] = running.journal("command_refused")
    assert (refusal["channel"], refusal["action"], refusal["error"]) == ("mqtt", "kill", error)
    assert refusal["request_id"] == payload["nonce"]
    assert running.journal("command") == []


async def test_replayed_mqtt_kill_after_rearm_then_armed_and_no_new_cancel(
    running: Running,
) -> None:
    kill = signed("kill", "alice", mode="cancel")
    await running.publish("kill", kill)
    await eventually(lambda: running.state == "HALTED", "HALTED")
    await running.publish("arm", signed("arm", "bob", reason="bot fixed"))
    await eventually(lambda: running.state == "ARMED", "re-armed")
    await asyncio.sleep(0.3)  # the halted sweep has stopped
    cancels = running.sim.global_cancels

    await running.publish("kill", kill)  # the captured kill, byte for byte

    await eventually(lambda: bool(running.journal("command_refused")), "refusal journaled")
    await asyncio.sleep(0.3)  # nothing to await: a cancel that slipped through would be in
    assert running.state == "ARMED"
    assert running.sim.global_cancels == cancels
    [refusal] = running.journal("command_refused")
    assert (refusal["error"], refusal["request_id"]) == ("ReplayError", kill["nonce"])


async def test_mqtt_arm_with_a_kill_only_key_then_refused_and_still_halted(
    running: Running,
) -> None:
    await running.publish("kill", signed("kill", "alice", mode="cancel"))
    await eventually(lambda: running.state == "HALTED", "HALTED")

    await running.publish("arm", signed("arm", "alice", reason="all good"))

    await eventually(lambda: bool(running.journal("command_refused")), "refusal journaled")
    assert running.state == "HALTED"
    [refusal] = running.journal("command_refused")
    assert refusal["error"] == "AuthError" and "lacks the arm role" in refusal["refused_because"]


async def test_retained_state_after_kill_then_halted_and_guardctl_status_via_http(
    running: Running, capsys: pytest.CaptureFixture[str]
) -> None:
    await running.publish("kill", signed("kill", "alice", mode="cancel"))
    await eventually(lambda: running.state == "HALTED", "HALTED")

    async def retained_halted() -> dict[str, Any] | None:
        retained = await running.retained_state()
        return retained if retained["state"] == "HALTED" else None

    # the guard publishes its new state a moment after the kill
    retained = await eventually(retained_halted, "HALTED retained", interval_s=0.05)
    code = await guardctl(
        "status", "--via", "http", "--url", running.url,
        "--token-file", str(running.token_files["read"]),
    )  # fmt: skip

    assert (retained["state"], retained["online"]) == ("HALTED", True)
    assert retained["latch"]["principal"] == "alice"
    assert code == 0
    out = capsys.readouterr().out  # the guard's own log lines are captured here too
    assert f"{ACCOUNT}: HALTED since " in out and "by alice" in out


# ------------------------------------------------------------------------------------ HTTP


async def test_http_without_token_or_with_read_token_then_401_403_and_gateway_untouched(
    running: Running,
) -> None:
    no_token = await running.post("kill", {"reason": "x"}, role=None)
    read_token = await running.post("kill", {"reason": "x"}, role="read")

    assert no_token[0] == 401
    assert read_token[0] == 403
    await asyncio.sleep(0.3)  # nothing to await: a cancel despite the 401/403 would be in
    assert running.state == "ARMED"
    assert running.sim.global_cancels == 0
    refused = running.journal("command_refused")
    assert [(r["status"], r["channel"]) for r in refused] == [(401, "http"), (403, "http")]


async def test_http_kill_then_halted_at_gateway_and_arm_token_rearms(
    running: Running, bot: RunawayBot
) -> None:
    bot.place_limit("MSFT", "BUY", 10, 300.0)
    await eventually(lambda: len(bot_orders(running.sim)) == 1, "the bot's order rests")

    status, kill = await running.post("kill", {"reason": "drill", "mode": "cancel"}, "kill")

    assert (status, kill["state"], kill["accepted"]) == (200, "HALTED", True)
    await eventually(lambda: not bot_orders(running.sim), "the bot's order cancelled")
    assert running.sim.global_cancels >= 1
    await asyncio.sleep(0.3)  # a few evaluations: no kill-level breach holds

    status, arm = await running.post("arm", {"reason": "drill over"}, "arm")

    assert (status, arm["state"], arm["accepted"]) == (200, "ARMED", True)
    assert running.state == "ARMED"
    assert running.guard.engine.latch is None


async def test_two_person_rearm_http_then_mqtt_then_pending_then_armed(
    sim: SimGateway, mqtt_broker: Broker, tmp_path: Path
) -> None:
    async with running_guard(sim, mqtt_broker, tmp_path, two_person=True) as run:
        await run.post("kill", {"reason": "drill", "mode": "cancel"}, "kill")
        await eventually(lambda: run.state == "HALTED", "HALTED")

        first = await run.post("arm", {"reason": "drill over"}, "arm")
        again = await run.post("arm", {"reason": "drill over, really"}, "arm")
        halted_between = run.state
        await run.publish("arm", signed("arm", "bob", reason="agreed"))
        await eventually(lambda: run.state == "ARMED", "re-armed by the second person")
        commands = [r for r in run.journal("command") if r["action"] == "arm"]

    assert (first[0], first[1]["pending"], first[1]["state"]) == (202, True, "HALTED")
    assert again[0] == 202  # the same principal twice is still one person
    assert halted_between == "HALTED"
    assert [(c["channel"], c["pending"], c["accepted"]) for c in commands] == [
        ("http", True, False),
        ("http", True, False),
        ("mqtt", False, True),
    ]


async def test_two_person_rearm_while_kill_breach_holds_then_refused_unless_both_force(
    mqtt_broker: Broker, tmp_path: Path
) -> None:
    leveraged = {**SCENARIO, "positions": [{"symbol": "ES", "quantity": -60, "avg_price": 6000.0}]}
    async with (
        build_gateway(parse_scenario(leveraged), host="127.0.0.1", port=0) as gateway,
        running_guard(gateway, mqtt_broker, tmp_path, two_person=True, kill_mode="cancel") as run,
    ):
        # ~18x leverage against a kill limit of 3: halted by the rule, and the breach holds
        await eventually(lambda: run.state == "HALTED", "HALTED by the leverage rule")

        plain = await run.post("arm", {"reason": "looks fine"}, "arm")
        refused = await run.arm_over_mqtt("bob")
        one_forced = await run.post("arm", {"reason": "override", "force": True}, "arm")
        not_both = await run.arm_over_mqtt("bob")
        both_forced = await run.post("arm", {"reason": "override", "force": True}, "arm")
        forced = await run.arm_over_mqtt("bob", force=True)

    assert (plain[0], one_forced[0], both_forced[0]) == (202, 202, 202)
    assert (refused["accepted"], refused["pending"]) == (False, False)  # the engine refused it
    assert (not_both["accepted"], not_both["pending"]) == (False, False)  # force needs both
    assert (forced["accepted"], forced["force"]) == (True, True)
    assert positions(gateway) == {"ES": -60}  # cancel mode: nothing was closed


async def test_two_person_rearm_one_person_over_http_and_mqtt_then_still_pending(
    sim: SimGateway, mqtt_broker: Broker, tmp_path: Path
) -> None:
    # alice holds the HTTP arm token AND an MQTT key that may arm: two credentials, one person
    people = {
        "alice": {"http_tokens": ["arm"], "mqtt_keys": ["alice"]},
        "bob": {"mqtt_keys": ["bob"]},
    }
    roles = {"alice": ["kill", "arm"], "bob": ["kill", "arm"]}
    async with running_guard(
        sim, mqtt_broker, tmp_path, two_person=True, key_roles=roles, people=people
    ) as run:
        await run.post("kill", {"reason": "drill", "mode": "cancel"}, "kill")
        await eventually(lambda: run.state == "HALTED", "HALTED")

        over_http = await run.post("arm", {"reason": "fixed"}, "arm")
        over_mqtt = await run.arm_over_mqtt("alice")
        halted_after_alice = run.state
        by_bob = await run.arm_over_mqtt("bob")

    assert (over_http[0], over_http[1]["pending"]) == (202, True)
    assert (over_mqtt["pending"], over_mqtt["accepted"]) == (True, False)  # still alice
    assert halted_after_alice == "HALTED"
    assert (by_bob["accepted"], by_bob["person"], by_bob["principal"]) == (True, "bob", "bob")
    assert run.state == "ARMED"
    arms = [r for r in run.journal("command") if r["action"] == "arm"]
    assert [(a["channel"], a["principal"], a["person"]) for a in arms] == [
        ("http", arms[0]["principal"], "alice"),
        ("mqtt", "alice", "alice"),
        ("mqtt", "bob", "bob"),
    ]
    assert arms[0]["principal"].startswith("arm:")
    records = read_journal(run.guard.cfg.journal_path)
    assert any("two-person: alice and bob" in json.dumps(r) for r in records)


# ---------------------------------------------------------------------------------- config


def test_roles_for_an_unknown_key_id_then_config_error_naming_the_key(tmp_path: Path) -> None:
    key = tmp_path / "alice.key"
    key.write_text(KEYS["alice"])
    key.chmod(0o600)
    text = f"""
account = "{ACCOUNT}"
state_dir = "{tmp_path}"
[ib]
port = 7497
client_id = 0
[control.mqtt]
enabled = true
operator_key_files = {{ alice = "{key}" }}
operator_key_roles = {{ alice = ["kill"], bob = ["arm"] }}
"""

    with pytest.raises(ConfigError) as raised:
        parse_config(text)

    assert "control.mqtt.operator_key_roles.bob" in str(raised.value)
    assert "operator_key_files" in str(raised.value)


SHARED_OR_OPEN = [
    # (what, key files {key id: text}, arm token = kill token, key file mode, key path named)
    ("two key ids one key", {"alice": KEYS["alice"], "bob": KEYS["alice"]}, False, 0o600,
     "control.mqtt.operator_key_files.bob"),
    ("a key equal to a token", {"alice": "KILL-TOKEN"}, False, 0o600,
     "control.mqtt.operator_key_files.alice"),
    ("one token for two roles", {"alice": KEYS["alice"]}, True, 0o600,
     "control.http.token_files.arm"),
    ("a key readable by others", {"alice": KEYS["alice"]}, False, 0o644,
     "control.mqtt.operator_key_files.alice"),
]  # fmt: skip


def credentials_config(
    tmp_path: Path,
    ib_port: int,
    keys: dict[str, str],
    *,
    arm_token_is_kill_token: bool = False,
    key_mode: int = 0o600,
    extra: str = "",
) -> tuple[Path, str]:
    """A `guardd run` config with HTTP tokens and MQTT keys written as asked ("KILL-TOKEN" as a
    key's text stands for the kill token), and its HTTP URL."""
    broker_port = free_port()  # nothing listens: MQTT never needs to connect for these
    lines = []
    for key_id in keys:
        lines.append(f'{key_id} = "{tmp_path / (key_id + ".key")}"')
    config, url, kill_token = write_run_config(
        tmp_path / "state",
        ib_port,
        f"{extra}\n[control.mqtt]\nenabled = true\nport = {broker_port}\n"
        "[control.mqtt.operator_key_files]\n" + "\n".join(lines) + "\n",
    )
    for key_id, text in keys.items():
        path = tmp_path / f"{key_id}.key"
        path.write_text(kill_token if text == "KILL-TOKEN" else text)
        path.chmod(key_mode)
    if arm_token_is_kill_token:
        (tmp_path / "state" / "token-arm").write_text(kill_token)
    return config, url


async def guardd_run(config: Path, *, until_ready: str | None = None) -> tuple[int | None, str]:
    """Run the real daemon (`python -m guardd run -c config`); its exit code and stderr, or
    (None, "") once `until_ready` (its HTTP URL) answers ready, when the daemon started."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "guardd", "run", "-c", str(config),
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert proc.stderr is not None
    try:
        if until_ready is None:
            async with asyncio.timeout(60):
                stderr = await proc.stderr.read()
                return await proc.wait(), stderr.decode()
        async with aiohttp.ClientSession() as http:
            await http_ready(http, until_ready, timeout_s=60)
        return proc.returncode, ""
    finally:
        if proc.returncode is None:
            proc.terminate()
            await proc.wait()


@pytest.mark.parametrize(
    ("keys", "same_token", "mode", "key_path"),
    [c[1:] for c in SHARED_OR_OPEN],
    ids=[c[0] for c in SHARED_OR_OPEN],
)
async def test_shared_secret_or_open_secret_file_then_guardd_run_exits_78_naming_the_key(
    sim: SimGateway,
    tmp_path: Path,
    keys: dict[str, str],
    same_token: bool,
    mode: int,
    key_path: str,
) -> None:
    config, _ = credentials_config(
        tmp_path, sim.port, keys, arm_token_is_kill_token=same_token, key_mode=mode
    )

    code, stderr = await guardd_run(config)

    assert code == 78, stderr
    assert key_path in stderr


async def test_key_readable_by_others_with_explicit_allowance_then_guardd_runs(
    sim: SimGateway, tmp_path: Path
) -> None:
    config, url = credentials_config(
        tmp_path,
        sim.port,
        {"alice": KEYS["alice"]},
        key_mode=0o644,
        extra="[control]\nallow_insecure_permissions = true\n",
    )

    code, stderr = await guardd_run(config, until_ready=url)

    assert code is None, stderr  # still running, and ready
