"""Every refusal is accounted for: hypothesis over MQTT payloads and topics and over HTTP request
lines, headers and bodies, against the REAL guard (sim over TCP, real mosquitto, real HTTP).

For every example: the guard does not crash (its tasks run on, MQTT stays connected, no message
handling raised), nothing changes state without a valid credential, and each refusal is counted.
At the end the journal accounts for every refusal the guard counted (records in full + the counts
of command_refusals_aggregated), lone surrogates and invalid UTF-8 included.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from pathlib import Path
from typing import Any

import aiomqtt
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from guardd.control.auth import signed_payload
from guardd.state.journal import read_journal
from ibsim.gateway import SimGateway
from tests.conftest import eventually
from tests.control_harness import ACCOUNT, KEYS, Running, running_guard
from tests.mqtt_broker import Broker

KILL = f"guardd/{ACCOUNT}/cmd/kill"
ARM = f"guardd/{ACCOUNT}/cmd/arm"
ALL_KILL = "guardd/all/cmd/kill"
COMMAND_TOPICS = (KILL, ARM, ALL_KILL)

any_text = st.text(
    alphabet=st.characters(exclude_categories=[])
    | st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF, exclude_categories=[]),
    max_size=30,
)


def _json_text(value: object) -> bytes:
    """JSON as a sender would write it: a lone surrogate as its escape (json.loads reads it)."""
    return json.dumps(value).encode()


def _signed(action: str, **change: Any) -> dict[str, object]:
    data = signed_payload(
        action="kill" if action == "kill" else "arm",
        target=ACCOUNT,
        reason="fuzz",
        key_id="bob",
        secret=KEYS["bob"].encode(),
        ts=int(time.time()),
        nonce=secrets.token_hex(12),
    )
    return {**data, **change}


mqtt_payloads = st.one_of(
    st.binary(max_size=300),  # invalid UTF-8 and not JSON, mostly
    st.builds(lambda t: t.encode("utf-8", "surrogatepass"), any_text),  # invalid UTF-8 too
    st.builds(
        lambda fields: _json_text(fields),
        st.dictionaries(
            st.sampled_from(["action", "reason", "mode", "key_id", "ts", "nonce", "sig", "x"]),
            st.none() | st.booleans() | st.integers() | any_text,
            max_size=8,
        ),
    ),
    st.builds(  # a signed command with one field changed after signing (any text)
        lambda action, field, value: _json_text(_signed(action, **{field: value})),
        st.sampled_from(["kill", "arm"]),
        st.sampled_from(["reason", "mode", "key_id", "nonce", "sig", "ts"]),
        st.none() | st.integers() | any_text,
    ),
)
mqtt_topics = st.one_of(
    st.sampled_from(COMMAND_TOPICS),
    st.builds(
        lambda tail: f"guardd/{ACCOUNT}/cmd/{tail}",
        st.text(
            alphabet=st.characters(categories=["L", "N", "P", "S"], exclude_characters="+#"),
            max_size=12,
        ),
    ),
)


def guard_alive(run: Running) -> None:
    mqtt = run.guard.mqtt
    assert mqtt is not None and mqtt.connected
    assert mqtt.crashes == 0


def journal_errors(run: Running) -> float | None:
    labels = {"account": ACCOUNT}
    return run.guard.registry.get_sample_value("guardd_journal_write_errors_total", labels)


def journal_accounts(run: Running) -> int:
    """Refusals the journal accounts for: records in full + aggregated counts."""
    full = counted = 0
    for record in read_journal(run.guard.cfg.journal_path):
        if record["kind"] == "command_refused":
            full += 1
        elif record["kind"] == "command_refusals_aggregated":
            counted += sum(record["counts"].values())
    return full + counted


@pytest.mark.slow
async def test_fuzzed_mqtt_then_no_crash_no_state_change_and_every_refusal_journaled(
    sim: SimGateway, mqtt_broker: Broker, tmp_path: Path
) -> None:
    loop = asyncio.get_running_loop()
    async with (
        running_guard(sim, mqtt_broker, tmp_path) as run,
        aiomqtt.Client(mqtt_broker.host, mqtt_broker.port) as client,
    ):
        ledger = run.guard.refusals
        refused_by_test = examples = 0

        async def publish_then_barrier(topic: str, raw: bytes) -> tuple[int, int]:
            """(refused, carried out) for one message: a signed arm from bob follows it on the
            same connection, and once the guard has journaled that arm (a refused re-arm while
            ARMED, or the re-arm after an accepted kill), it has screened the message before."""
            before, commands = ledger.total, len(run.journal("command"))
            await client.publish(topic, raw, qos=1)
            barrier = _signed("arm")
            await client.publish(ARM, _json_text(barrier), qos=1)
            await eventually(
                lambda: any(r["request_id"] == barrier["nonce"] for r in run.journal("command")),
                "the barrier carried out",
            )
            return ledger.total - before, len(run.journal("command")) - commands - 1

        @settings(
            max_examples=150,
            deadline=None,
            database=None,
            suppress_health_check=[HealthCheck.too_slow],
        )
        @given(topic=mqtt_topics, raw=mqtt_payloads)
        @example(topic=KILL, raw=b'{"action": "kill", "reason": "\\ud800 lone"}')  # first: in full
        @example(topic=ARM, raw=b"\xff\xfe invalid utf-8")
        def check(topic: str, raw: bytes) -> None:
            nonlocal refused_by_test, examples
            examples += 1
            future = asyncio.run_coroutine_threadsafe(publish_then_barrier(topic, raw), loop)
            refused, accepted = future.result(timeout=30)

            guard_alive(run)
            assert journal_errors(run) == 0  # every record the guard wrote, it could write
            if topic in COMMAND_TOPICS:
                assert refused + accepted == 1  # reached the guard: refused, or carried out
            else:
                assert (refused, accepted) == (0, 0)  # not subscribed: never reaches it
            if accepted:  # only a command whose signature still matched can do that
                assert validly_signed(topic, json.loads(raw))
            assert run.state == "ARMED"  # unchanged, or re-armed by the barrier after a kill
            refused_by_test += refused

        await asyncio.to_thread(check)
        counted = ledger.total
    assert examples >= 150
    assert counted == refused_by_test
    assert journal_accounts(run) == counted  # the guard stopped: its last interval journaled


def validly_signed(topic: str, data: dict[str, Any]) -> bool:
    """True when ``data``'s signature is bob's over its own fields, for ``topic``'s target."""
    expected = signed_payload(
        action=data["action"],
        target="all" if topic == ALL_KILL else ACCOUNT,
        reason=data["reason"],
        key_id=data["key_id"],
        secret=KEYS["bob"].encode(),
        ts=data["ts"],
        nonce=data["nonce"],
        mode=data.get("mode"),
        force=bool(data.get("force", False)),
    )
    return data["key_id"] == "bob" and expected["sig"] == data["sig"]


# ------------------------------------------------------------------------------ HTTP

header_bytes = st.one_of(
    st.binary(max_size=40),
    st.builds(lambda t: t.encode("utf-8", "surrogatepass"), any_text),
).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b""))
http_bodies = st.one_of(
    st.binary(max_size=120),
    st.builds(lambda t: _json_text({"reason": t}), any_text),
    st.builds(
        lambda fields: _json_text(fields),
        st.dictionaries(
            st.sampled_from(["reason", "mode", "force", "extra"]),
            st.none() | st.booleans() | st.integers() | any_text,
            max_size=4,
        ),
    ),
)


def http_request(method: str, path: str, headers: list[tuple[bytes, bytes]], body: bytes) -> bytes:
    lines = [f"{method} {path} HTTP/1.1".encode(), b"Host: guard", b"Connection: close"]
    lines += [name + b": " + value for name, value in headers]
    lines.append(f"Content-Length: {len(body)}".encode())
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


async def send_raw(url: str, data: bytes) -> tuple[int, dict[str, Any]]:
    host, _, port = url.removeprefix("http://").partition(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(data)
        await writer.drain()
        async with asyncio.timeout(10):
            answer = await reader.read()
    finally:
        writer.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    return status, json.loads(body) if body else {}


async def test_fuzzed_http_then_no_crash_no_state_change_and_every_refusal_journaled(
    sim: SimGateway, mqtt_broker: Broker, tmp_path: Path
) -> None:
    loop = asyncio.get_running_loop()
    async with running_guard(sim, mqtt_broker, tmp_path) as run:
        ledger = run.guard.refusals
        tokens = {role: f"Bearer {token}".encode() for role, token in run.tokens.items()}
        refused_by_test = examples = 0

        async def send(data: bytes) -> tuple[int, dict[str, Any], int]:
            before = ledger.total
            status, body = await send_raw(run.url, data)
            return status, body, ledger.total - before

        @settings(
            max_examples=200,
            deadline=None,
            database=None,
            suppress_health_check=[HealthCheck.too_slow],
        )
        @given(
            method=st.sampled_from(["POST", "POST", "GET", "PUT"]),
            path=st.sampled_from(["/v1/kill", "/v1/arm", "/v1/status", "/v1/x", "/"]),
            auth=st.sampled_from([None, "kill", "read", "arm"]) | header_bytes,
            content_type=st.sampled_from([b"application/json", b"text/plain"]) | header_bytes,
            extra=st.tuples(st.from_regex(rb"\A[A-Za-z][A-Za-z0-9-]{0,15}\Z"), header_bytes),
            body=http_bodies,
        )
        @example(
            method="POST",
            path="/v1/kill",
            auth="read",
            content_type=b"application/json",
            extra=(b"X-Note", b"\xff"),
            body=b'{"reason": "\\ud800"}',
        )
        @example(
            method="POST",
            path="/v1/arm",
            auth="arm",
            content_type=b"application/json",
            extra=(b"X-Note", b"x"),
            body=b'{"reason": "arm while armed"}',
        )
        def check(
            method: str,
            path: str,
            auth: str | bytes | None,
            content_type: bytes,
            extra: tuple[bytes, bytes],
            body: bytes,
        ) -> None:
            nonlocal refused_by_test, examples
            examples += 1
            headers = [(b"Content-Type", content_type), extra]
            if auth is not None:
                headers.append((b"Authorization", tokens[auth] if isinstance(auth, str) else auth))
            data = http_request(method, path, headers, body)
            future = asyncio.run_coroutine_threadsafe(send(data), loop)
            status, answer, refused = future.result(timeout=30)

            guard_alive(run)
            assert journal_errors(run) == 0
            assert status < 500, answer
            if status >= 400:
                assert isinstance(answer["request_id"], str) and answer["request_id"], answer
            command = method == "POST" and path in ("/v1/kill", "/v1/arm")
            by_app = answer.get("error") not in ("unparsable_request", None)
            journaled_as_command = "state" in answer  # e.g. 409 re-arm while armed: a command
            if command and status >= 400 and status not in (404, 405) and by_app:
                assert refused == (0 if journaled_as_command else 1)  # every refusal counted
            else:
                assert refused == 0
            refused_by_test += refused
            if status == 200 and path == "/v1/kill":
                assert (auth, content_type) == ("kill", b"application/json")
                assert run.state == "HALTED"
                rearm = {"reason": "fuzz re-arm", "force": True}
                again = asyncio.run_coroutine_threadsafe(run.post("arm", rearm, "arm"), loop)
                assert again.result(timeout=30)[0] == 200
            assert run.state == "ARMED"

        await asyncio.to_thread(check)
        counted = ledger.total
    assert examples >= 200
    assert counted == refused_by_test
    assert journal_accounts(run) == counted  # the guard stopped: its last interval journaled
