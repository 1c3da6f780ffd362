"""The MQTT control adapter: the payload path directly, and against a real mosquitto."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Mapping
from pathlib import Path

import aiohttp
import aiomqtt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from guardd.control.auth import KeyStore, TokenStore, signed_payload
from guardd.control.commands import CommandOutcome, ControlCommand
from guardd.control.http import ControlHttpServer
from guardd.control.mqtt import MqttControl
from guardd.control.nonces import NonceStore, read_nonce_file
from guardd.retry import RetryPolicy
from tests.conftest import eventually, free_port
from tests.mqtt_broker import Broker, MemoryHandler, start_broker

ACCOUNT = "DU000001"
ALICE_KEY = "alice-secret-key-0123456789"
ROB_KEY = "rob-secret-key-0123456789ab"
KEYS = KeyStore.from_secrets({"alice": (ALICE_KEY, ["kill", "arm"]), "rob": (ROB_KEY, ["kill"])})

ROOT = Path(__file__).resolve().parents[3]


def payload(
    action: str = "kill",
    *,
    target: str = ACCOUNT,
    key_id: str = "alice",
    secret: str = ALICE_KEY,
    ts: int | None = None,
    nonce: str = "nonce-0001",
    reason: str = "runaway bot",
    mode: str | None = None,
    force: bool = False,
) -> dict[str, object]:
    return signed_payload(
        action=action,  # type: ignore[arg-type]
        target=target,
        reason=reason,
        key_id=key_id,
        secret=secret.encode(),
        ts=int(time.time()) if ts is None else ts,
        nonce=nonce,
        mode=mode,  # type: ignore[arg-type]
        force=force,
    )


def encode(data: object) -> bytes:
    return json.dumps(data).encode()


KILL_TOPIC = f"guardd/{ACCOUNT}/cmd/kill"
ARM_TOPIC = f"guardd/{ACCOUNT}/cmd/arm"


def control(handler: MemoryHandler, broker: Broker | None = None, **kw: object) -> MqttControl:
    return MqttControl(
        handler,
        account=ACCOUNT,
        keys=KEYS,
        host=broker.host if broker else "127.0.0.1",
        port=broker.port if broker else free_port(),
        reconnect=RetryPolicy(0.05, 0.2),
        state_interval_s=0.05,
        **kw,  # type: ignore[arg-type]
    )


async def next_message(client: aiomqtt.Client, timeout: float = 5.0) -> aiomqtt.Message:
    async with asyncio.timeout(timeout):
        async for message in client.messages:
            return message
    raise AssertionError("no message")


# ------------------------------------------------------------------ the payload path, directly


async def test_signed_kill_payload_then_halted_with_principal_and_nonce() -> None:
    handler = MemoryHandler()
    mqtt = control(handler)

    outcome = await mqtt.handle_payload(KILL_TOPIC, encode(payload(mode="cancel")))

    assert outcome is not None
    assert outcome.accepted
    assert handler.state == "HALTED"
    [command] = handler.handled
    assert (command.principal, command.channel, command.mode) == ("alice", "mqtt", "cancel")
    assert command.request_id == "nonce-0001"


async def test_replayed_payload_then_refused_audited_and_unchanged() -> None:
    handler = MemoryHandler()
    mqtt = control(handler)
    raw = encode(payload())
    await mqtt.handle_payload(KILL_TOPIC, raw)
    handler.state = "ARMED"

    outcome = await mqtt.handle_payload(KILL_TOPIC, raw)

    assert outcome is None
    assert handler.state == "ARMED"
    assert len(handler.handled) == 1
    [record] = handler.audited
    assert record["error"] == "ReplayError"
    assert record["principal"] == "alice"
    assert record["request_id"] == "nonce-0001"


@pytest.mark.parametrize("topic", [KILL_TOPIC, ARM_TOPIC])
async def test_validly_signed_but_retained_then_refused_audited_and_nonce_not_used(
    topic: str,
) -> None:
    handler = MemoryHandler(state="HALTED" if topic == ARM_TOPIC else "ARMED")
    mqtt = control(handler)
    raw = encode(payload("arm" if topic == ARM_TOPIC else "kill"))

    outcome = await mqtt.handle_payload(topic, raw, retain=True)

    assert outcome is None
    assert handler.handled == []
    [record] = handler.audited
    assert (record["error"], record["topic"]) == ("ReplayError", topic)
    assert "retained" in str(record["refused_because"])
    assert (await mqtt.handle_payload(topic, raw)) is not None  # the same, sent live: carried out


class DiskCheckingHandler(MemoryHandler):
    """A guard that, when a command reaches it, reads what a restarted guard would read."""

    def __init__(self, nonce_file: Path) -> None:
        super().__init__()
        self.nonce_file = nonce_file
        self.on_disk_when_handled: list[list[str]] = []

    async def handle(self, command: ControlCommand) -> CommandOutcome:
        records, _ = read_nonce_file(self.nonce_file)
        self.on_disk_when_handled.append([r.nonce for r in records])
        return await super().handle(command)


async def test_signed_kill_then_nonce_on_disk_once_the_guard_has_acted(tmp_path: Path) -> None:
    # A kill waits for no fsync: its nonce is refused again at once (memory) and written after
    # the guard acted; a replay after a crash in between could only halt again.
    path = tmp_path / "nonces.jsonl"
    handler = DiskCheckingHandler(path)
    nonces = NonceStore.open(path, window_s=30, now=time.time())
    mqtt = control(handler, nonces=nonces)

    await mqtt.handle_payload(KILL_TOPIC, encode(payload(nonce="nonce-first")))
    await mqtt.handle_payload(KILL_TOPIC, encode(payload(nonce="nonce-second")))

    assert handler.on_disk_when_handled == [[], ["nonce-first"]]
    assert [r.nonce for r in read_nonce_file(path)[0]] == ["nonce-first", "nonce-second"]
    assert await mqtt.handle_payload(KILL_TOPIC, encode(payload(nonce="nonce-first"))) is None


async def test_signed_arm_then_nonce_on_disk_before_the_guard_acts(tmp_path: Path) -> None:
    path = tmp_path / "nonces.jsonl"
    handler = DiskCheckingHandler(path)
    nonces = NonceStore.open(path, window_s=30, now=time.time())
    mqtt = control(handler, nonces=nonces)

    await mqtt.handle_payload(ARM_TOPIC, encode(payload("arm", nonce="nonce-arm-1")))

    assert handler.on_disk_when_handled == [["nonce-arm-1"]]


def _unsigned() -> dict[str, object]:
    data = payload()
    del data["sig"]
    return data


def _wrong_key() -> dict[str, object]:
    return payload(secret=ROB_KEY)


def _tampered_reason() -> dict[str, object]:
    return {**payload(), "reason": "something else"}


@pytest.mark.parametrize(
    ("make", "error"),
    [
        (_unsigned, "CommandError"),
        (_wrong_key, "AuthError"),
        (_tampered_reason, "AuthError"),
        (lambda: payload(key_id="mallory"), "AuthError"),
        (lambda: payload(ts=int(time.time()) - 31), "ReplayError"),
        (lambda: payload(ts=int(time.time()) + 31), "ReplayError"),
        (lambda: payload(target="DU999999"), "AuthError"),
        (lambda: payload(target="all"), "AuthError"),
    ],
    ids=["unsigned", "wrong-key", "tampered", "unknown-key", "stale", "future", "other", "all"],
)
async def test_bad_kill_payload_then_refused_audited_and_unchanged(
    make: Callable[[], dict[str, object]], error: str
) -> None:
    handler = MemoryHandler()

    outcome = await control(handler).handle_payload(KILL_TOPIC, encode(make()))

    assert outcome is None
    assert handler.state == "ARMED"
    assert handler.handled == []
    [record] = handler.audited
    assert record["error"] == error
    assert record["channel"] == "mqtt"
    assert record["topic"] == KILL_TOPIC


async def test_kill_only_key_on_arm_then_refused_for_role() -> None:
    handler = MemoryHandler(state="HALTED")

    outcome = await control(handler).handle_payload(
        ARM_TOPIC, encode(payload("arm", key_id="rob", secret=ROB_KEY))
    )

    assert outcome is None
    assert handler.state == "HALTED"
    assert "lacks the arm role" in str(handler.audited[0]["refused_because"])


async def test_arm_payload_on_kill_topic_then_refused() -> None:
    handler = MemoryHandler()

    outcome = await control(handler).handle_payload(KILL_TOPIC, encode(payload("arm")))

    assert outcome is None
    assert handler.audited[0]["error"] == "CommandError"


async def test_signed_arm_then_armed_and_fleet_kill_then_halted() -> None:
    handler = MemoryHandler(state="HALTED")
    mqtt = control(handler)

    armed = await mqtt.handle_payload(ARM_TOPIC, encode(payload("arm", force=True)))
    killed = await mqtt.handle_payload(
        "guardd/all/cmd/kill", encode(payload(target="all", nonce="nonce-0002"))
    )

    assert armed is not None and armed.accepted
    assert handler.handled[0].force is True
    assert killed is not None and killed.accepted
    assert handler.state == "HALTED"


async def test_stale_by_injected_clock_then_refused() -> None:
    handler = MemoryHandler()
    mqtt = control(handler, clock=lambda: 1_000_000.0, window_s=5.0)

    fresh = await mqtt.handle_payload(KILL_TOPIC, encode(payload(ts=1_000_005)))
    handler.state = "ARMED"
    stale = await mqtt.handle_payload(KILL_TOPIC, encode(payload(ts=999_994, nonce="nonce-0003")))

    assert fresh is not None
    assert stale is None
    assert handler.state == "ARMED"


valid_fields = st.fixed_dictionaries(
    {},
    optional={
        "action": st.sampled_from(["kill", "arm", "nuke", 1]),
        "reason": st.text(max_size=30),
        "mode": st.sampled_from(["cancel", "flatten", "nuke", None, 3]),
        "force": st.sampled_from([True, False, "true", None]),
        "key_id": st.sampled_from(["alice", "rob", "mallory", "", 7]),
        "ts": st.integers(min_value=-10, max_value=2**40) | st.just(int(time.time())),
        "nonce": st.text(max_size=70) | st.just("nonce-fuzz-1"),
        "sig": st.text(alphabet="0123456789abcdefXYZ", max_size=70),
        "extra": st.integers(),
    },
)
fuzz_payloads = st.one_of(
    st.binary(max_size=300),
    valid_fields.map(encode),
    st.builds(
        lambda field, value: encode({**payload(nonce="nonce-fuzz-2"), field: value}),
        st.sampled_from(["action", "reason", "mode", "force", "key_id", "ts", "nonce", "sig"]),
        st.one_of(st.none(), st.booleans(), st.integers(), st.text(max_size=20)),
    ),
)


@settings(max_examples=300, deadline=None, database=None)
@given(topic=st.sampled_from([KILL_TOPIC, ARM_TOPIC, "guardd/all/cmd/kill"]), raw=fuzz_payloads)
def test_fuzzed_payload_then_refused_and_audited_unless_validly_signed(
    topic: str, raw: bytes
) -> None:
    handler = MemoryHandler(state="ARMED" if topic != ARM_TOPIC else "HALTED")
    start = handler.state

    outcome = asyncio.run(control(handler).handle_payload(topic, raw))

    if outcome is None:
        assert handler.state == start
        assert handler.handled == []
        assert len(handler.audited) == 1
    else:  # only an untouched signature can pass: the one-field change kept the same value
        data = json.loads(raw)
        assert data["sig"] == payload(**_signed_fields(data))["sig"]


def _signed_fields(data: dict[str, object]) -> dict[str, object]:
    fields = {k: data[k] for k in ("key_id", "ts", "nonce", "reason", "mode") if k in data}
    return {"secret": ALICE_KEY if data["key_id"] == "alice" else ROB_KEY, **fields}


# ------------------------------------------------------------------ against a real broker


@pytest.fixture
async def subscriber(mqtt_broker: Broker) -> AsyncIterator[aiomqtt.Client]:
    async with aiomqtt.Client(mqtt_broker.host, mqtt_broker.port, identifier="test-sub") as client:
        yield client


async def test_signed_kill_over_broker_then_halted_event_and_retained_state(
    mqtt_broker: Broker, subscriber: aiomqtt.Client
) -> None:
    handler = MemoryHandler()
    await subscriber.subscribe(f"guardd/{ACCOUNT}/events", qos=1)
    async with control(handler, mqtt_broker) as mqtt:
        await eventually(lambda: mqtt.connected)

        await subscriber.publish(KILL_TOPIC, encode(payload()), qos=1)
        event = json.loads(_text(await next_message(subscriber)))
        await eventually(lambda: handler.state == "HALTED")

        assert event["type"] == "command"
        assert event["accepted"] is True
        assert event["state"] == "HALTED"
        assert event["request_id"] == "nonce-0001"

        async with aiomqtt.Client(mqtt_broker.host, mqtt_broker.port) as late:
            await late.subscribe(f"guardd/{ACCOUNT}/state", qos=1)
            state = json.loads(_text(await next_message(late)))
        assert state == {"online": True, "state": "HALTED", "commands": 1}


async def test_replayed_and_bad_signature_over_broker_then_refused_and_audited(
    mqtt_broker: Broker, subscriber: aiomqtt.Client
) -> None:
    handler = MemoryHandler()
    await subscriber.subscribe(f"guardd/{ACCOUNT}/events", qos=1)
    async with control(handler, mqtt_broker) as mqtt:
        await eventually(lambda: mqtt.connected)
        raw = encode(payload())
        await subscriber.publish(KILL_TOPIC, raw, qos=1)
        await next_message(subscriber)
        handler.state = "ARMED"

        await subscriber.publish(KILL_TOPIC, raw, qos=1)
        replayed = json.loads(_text(await next_message(subscriber)))
        await subscriber.publish(
            KILL_TOPIC, encode(payload(nonce="nonce-0002", secret=ROB_KEY)), qos=1
        )
        forged = json.loads(_text(await next_message(subscriber)))

    assert replayed["type"] == "command_refused"
    assert "already used" in replayed["refused_because"]
    assert "bad signature" in forged["refused_because"]
    assert handler.state == "ARMED"
    assert [r["error"] for r in handler.audited] == ["ReplayError", "AuthError"]


async def test_retained_kill_waiting_on_broker_then_refused_at_subscribe_and_audited(
    mqtt_broker: Broker, subscriber: aiomqtt.Client
) -> None:
    # an attacker with publish-and-retain rights leaves a (captured, validly signed) kill and arm
    await subscriber.publish(KILL_TOPIC, encode(payload()), qos=1, retain=True)
    await subscriber.publish(
        ARM_TOPIC, encode(payload("arm", nonce="nonce-0002")), qos=1, retain=True
    )
    handler = MemoryHandler()
    await subscriber.subscribe(f"guardd/{ACCOUNT}/events", qos=1)

    async with control(handler, mqtt_broker, refusal_interval_s=0.2) as mqtt:
        await eventually(lambda: mqtt.connected)
        events = []
        while sum(_refusals_in(e) for e in events) < 2:
            events.append(json.loads(_text(await next_message(subscriber))))

        assert mqtt.connected
    # the first of the kind in full, the second counted (both audited, below)
    [first, summary] = events
    assert first["type"] == "command_refused" and "retained" in first["refused_because"]
    assert summary["counts"] == {"mqtt:ReplayError": 1}
    assert all("retained" in str(r["refused_because"]) for r in handler.audited)
    assert handler.handled == []
    assert handler.state == "ARMED"
    assert sorted(r["request_id"] for r in handler.audited) == ["nonce-0001", "nonce-0002"]


GARBAGE = [
    b"",
    b"\xff\xfe\x00",
    b"null",
    b"{}",
    b"[" * 2000,
    b'{"action": "kill", "reason": "x"}',
    json.dumps({**payload(nonce="nonce-stale-1"), "ts": 1}).encode(),
    json.dumps(payload(nonce="nonce-unkn-01", key_id="mallory")).encode(),
    b"x" * 100_000,
]


async def test_garbage_over_broker_then_each_refused_audited_and_still_connected(
    mqtt_broker: Broker, subscriber: aiomqtt.Client
) -> None:
    handler = MemoryHandler()
    await subscriber.subscribe(f"guardd/{ACCOUNT}/events", qos=1)
    async with control(handler, mqtt_broker, refusal_interval_s=0.2) as mqtt:
        await eventually(lambda: mqtt.connected)

        for raw in GARBAGE:
            await subscriber.publish(KILL_TOPIC, raw, qos=1)
        events = []
        while sum(_refusals_in(e) for e in events) < len(GARBAGE):
            events.append(json.loads(_text(await next_message(subscriber))))

        assert mqtt.connected
    # Every one audited; on the events topic the first of each kind in full, the rest as counts.
    assert len(handler.audited) == len(GARBAGE)
    assert mqtt.refused == len(GARBAGE)
    kinds = [e["refused_because"] for e in events if e["type"] == "command_refused"]
    assert len(kinds) == 2  # malformed (CommandError); bad signature, unknown key (AuthError)
    [summary] = [e for e in events if e["type"] == "command_refusals_aggregated"]
    assert summary["counts"] == {"mqtt:CommandError": 6, "mqtt:AuthError": 1}
    assert handler.state == "ARMED"
    assert handler.handled == []


def _refusals_in(event: dict[str, object]) -> int:
    if event["type"] == "command_refused":
        return 1
    total = event.get("total", 0)
    return total if isinstance(total, int) else 0


async def test_command_queue_full_then_verified_command_refused_audited_and_counted(
    mqtt_broker: Broker, subscriber: aiomqtt.Client
) -> None:
    release, busy = asyncio.Event(), asyncio.Event()

    class SlowGuard(MemoryHandler):
        async def handle(self, command: ControlCommand) -> CommandOutcome:
            busy.set()
            await release.wait()
            return await super().handle(command)

    handler = SlowGuard()
    dropped: list[str] = []
    async with control(
        handler, mqtt_broker, max_queued_commands=1, on_dropped=dropped.append
    ) as mqtt:
        await eventually(lambda: mqtt.connected)
        await subscriber.publish(KILL_TOPIC, encode(payload(nonce="nonce-0000")), qos=1)
        await asyncio.wait_for(busy.wait(), 5)  # the first is being carried out
        for n in (1, 2):  # one is queued, one finds the queue full
            await subscriber.publish(KILL_TOPIC, encode(payload(nonce=f"nonce-000{n}")), qos=1)
        await eventually(lambda: len(handler.audited) == 1)
        release.set()
        await eventually(lambda: len(handler.handled) == 2)

    assert dropped == ["queue_full"]
    [refused] = handler.audited
    assert refused["request_id"] == "nonce-0002"
    assert refused["principal"] == "alice"
    assert "wait for the guard" in str(refused["refused_because"])


async def test_clean_exit_then_retained_state_offline(mqtt_broker: Broker) -> None:
    handler = MemoryHandler()
    async with control(handler, mqtt_broker) as mqtt:
        await eventually(lambda: mqtt.connected)

    async with aiomqtt.Client(mqtt_broker.host, mqtt_broker.port) as late:
        await late.subscribe(f"guardd/{ACCOUNT}/state", qos=1)
        state = json.loads(_text(await next_message(late)))
    assert state["online"] is False
    assert state["state"] == "ARMED"


WILL_SCRIPT = """
import asyncio, sys
from guardd.control.auth import KeyStore
from guardd.control.mqtt import MqttControl
from tests.mqtt_broker import MemoryHandler

async def main() -> None:
    keys = KeyStore.from_secrets({})
    async with MqttControl(MemoryHandler(), account=sys.argv[2], keys=keys,
                           port=int(sys.argv[1])) as mqtt:
        while not mqtt.connected:
            await asyncio.sleep(0.02)
        print("connected", flush=True)
        await asyncio.sleep(60)

asyncio.run(main())
"""


async def test_abrupt_disconnect_then_last_will_marks_offline(mqtt_broker: Broker) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        WILL_SCRIPT,
        str(mqtt_broker.port),
        ACCOUNT,
        stdout=subprocess.PIPE,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    try:
        assert proc.stdout is not None
        async with asyncio.timeout(20):
            line = b""
            while line.strip() != b"connected":  # structlog lines come first
                line = await proc.stdout.readline()
                assert line, "the guard process exited before connecting"
        async with aiomqtt.Client(mqtt_broker.host, mqtt_broker.port) as watcher:
            await watcher.subscribe(f"guardd/{ACCOUNT}/state", qos=1)
            online = json.loads(_text(await next_message(watcher)))

            proc.send_signal(signal.SIGKILL)
            await proc.wait()
            will = json.loads(_text(await next_message(watcher)))
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert online["online"] is True
    assert will == {"online": False}


async def test_broker_down_then_http_kill_still_works(tmp_path: Path) -> None:
    handler = MemoryHandler()
    tokens = TokenStore.from_tokens({"ops": ("kill-token-0123456789", ["kill"])})
    async with (
        control(handler) as mqtt,  # nothing listens on its port
        ControlHttpServer(handler, tokens=tokens, port=0) as http,
        aiohttp.ClientSession() as session,
    ):
        started = time.monotonic()
        async with session.post(
            http.url + "/v1/kill",
            json={"reason": "broker is down"},
            headers={"Authorization": "Bearer kill-token-0123456789"},
        ) as resp:
            assert resp.status == 200
        assert time.monotonic() - started < 1.0
        assert handler.state == "HALTED"
        assert mqtt.connected is False
        mqtt.publish_event({"type": "test"})  # queued, never blocks


async def test_broker_restarts_then_reconnects_and_republishes_state(tmp_path: Path) -> None:
    handler = MemoryHandler()
    broker, stop = start_broker(tmp_path / "first")
    try:
        async with control(handler, broker) as mqtt:
            await eventually(lambda: mqtt.connected)
            stop()
            await eventually(lambda: not mqtt.connected)
            handler.state = "HALTED"
            broker, stop = start_broker(tmp_path / "second", port=broker.port)
            await eventually(lambda: mqtt.connected, timeout_s=10)

            async with aiomqtt.Client(broker.host, broker.port) as late:
                await late.subscribe(f"guardd/{ACCOUNT}/state", qos=1)
                state = json.loads(_text(await next_message(late)))
            assert state["state"] == "HALTED"
            assert state["online"] is True
    finally:
        stop()


async def test_password_broker_then_connects_only_with_credentials(
    mqtt_broker_with_password: Broker,
) -> None:
    broker = mqtt_broker_with_password
    good = control(
        MemoryHandler(), broker, username=broker.username, password=broker.password, client_id="g"
    )
    bad = control(
        MemoryHandler(), broker, username=broker.username, password="wrong", client_id="b"
    )
    async with good, bad:
        await eventually(lambda: good.connected)
        await asyncio.sleep(0.3)  # refused by the broker: it never connects, no event says so
        assert bad.connected is False


def _text(message: aiomqtt.Message) -> str:
    assert isinstance(message.payload, bytes | bytearray)
    return bytes(message.payload).decode()


class StatusBrokenHandler(MemoryHandler):
    """A guard whose status cannot be built (a bug): the kill channel must not die of it."""

    def status(self) -> Mapping[str, object]:
        raise RuntimeError("status is broken")


async def test_status_raises_then_mqtt_control_stays_up_and_a_kill_still_halts(
    mqtt_broker: Broker, subscriber: aiomqtt.Client
) -> None:
    handler = StatusBrokenHandler()
    async with control(handler, mqtt_broker) as mqtt:
        await eventually(lambda: mqtt.connected)
        await asyncio.sleep(0.2)  # several state-loop turns, each failing to build the status

        await subscriber.publish(KILL_TOPIC, encode(payload()), qos=1)
        await eventually(lambda: handler.state == "HALTED")

        assert mqtt.connected
        assert mqtt.crashes > 0  # each failure logged and counted
