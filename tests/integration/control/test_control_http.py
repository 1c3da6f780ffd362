"""The HTTP control server against a real aiohttp listener on a free loopback port."""

from __future__ import annotations

import asyncio
import json
import resource
import ssl
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from guardd.control.auth import TokenStore, TwoPersonRule
from guardd.control.http import (
    FD_RESERVE,
    ControlHttpServer,
    connection_cap,
    server_ssl_context,
)
from tests.conftest import eventually
from tests.mqtt_broker import MemoryHandler

TOKENS = {
    "read": "read-token-0123456789",
    "kill": "kill-token-0123456789",
    "arm": "arm-token-0123456789ab",
}


def token_store(tmp_path: Path) -> TokenStore:
    files = {}
    for role, token in TOKENS.items():
        path = tmp_path / f"guardd-{role}-token"
        path.write_text(token + "\n")
        path.chmod(0o600)
        files[role] = path
    return TokenStore.from_role_files(**files)


def auth(role: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {TOKENS[role]}"}


class Control:
    """A running server, its handler, and a client session."""

    def __init__(
        self, server: ControlHttpServer, handler: MemoryHandler, session: aiohttp.ClientSession
    ):
        self.server = server
        self.handler = handler
        self.session = session

    async def post(
        self,
        path: str,
        body: object = None,
        *,
        role: str | None = None,
        raw: bytes | None = None,
        content_type: str = "application/json",
    ) -> tuple[int, dict[str, object]]:
        headers = {**(auth(role) if role else {}), "Content-Type": content_type}
        data = raw if raw is not None else json.dumps(body).encode()
        async with self.session.post(self.server.url + path, data=data, headers=headers) as resp:
            return resp.status, await resp.json()

    async def get(self, path: str, *, role: str | None = None) -> tuple[int, dict[str, object]]:
        headers = auth(role) if role else {}
        async with self.session.get(self.server.url + path, headers=headers) as resp:
            return resp.status, await resp.json()


async def metrics(request: web.Request) -> web.Response:
    return web.Response(text="guardd_up 1\n")


@pytest.fixture
async def control(tmp_path: Path) -> AsyncIterator[Control]:
    handler = MemoryHandler()
    server = ControlHttpServer(
        handler,
        tokens=token_store(tmp_path),
        port=0,
        max_body_bytes=1024,
        routes=[web.get("/metrics", metrics)],
    )
    async with server, aiohttp.ClientSession() as session:
        yield Control(server, handler, session)


async def test_no_token_on_kill_then_401_audited_and_unchanged(control: Control) -> None:
    status, body = await control.post("/v1/kill", {"reason": "test"})

    assert status == 401
    assert body["error"] == "unauthorized"
    assert control.handler.state == "ARMED"
    assert control.handler.handled == []
    [record] = control.handler.audited
    assert record["channel"] == "http"
    assert record["action"] == "kill"
    assert record["principal"] is None
    assert record["status"] == 401


async def test_unknown_token_then_401(control: Control) -> None:
    headers = {"Authorization": "Bearer not-a-known-token-at-all"}
    async with control.session.post(
        control.server.url + "/v1/kill", json={"reason": "x"}, headers=headers
    ) as resp:
        assert resp.status == 401
        assert resp.headers["WWW-Authenticate"].startswith("Bearer")
    assert control.handler.state == "ARMED"


async def test_read_token_on_kill_then_403_audited_with_principal(control: Control) -> None:
    status, body = await control.post("/v1/kill", {"reason": "test"}, role="read")

    assert status == 403
    assert "lacks the kill role" in str(body["message"])
    assert control.handler.state == "ARMED"
    assert control.handler.audited[0]["principal"] == "read:guardd-read-token"


async def test_arm_token_on_kill_then_403(control: Control) -> None:
    status, _ = await control.post("/v1/kill", {"reason": "test"}, role="arm")

    assert status == 403
    assert control.handler.state == "ARMED"


async def test_kill_token_then_200_and_handler_halted(control: Control) -> None:
    status, body = await control.post(
        "/v1/kill", {"reason": "runaway bot", "mode": "flatten"}, role="kill"
    )

    assert status == 200
    assert body["accepted"] is True
    assert body["state"] == "HALTED"
    assert control.handler.state == "HALTED"
    [command] = control.handler.handled
    assert command.action == "kill"
    assert command.channel == "http"
    assert command.mode == "flatten"
    assert command.reason == "runaway bot"
    assert command.principal == "kill:guardd-kill-token"
    assert command.request_id == body["request_id"]


async def test_kill_without_mode_then_mode_left_to_default(control: Control) -> None:
    status, _ = await control.post("/v1/kill", {"reason": "x", "mode": None}, role="kill")

    assert status == 200
    assert control.handler.handled[0].mode is None


@pytest.mark.parametrize("role", ["read", "kill", "arm"])
async def test_any_role_reads_status_then_200(control: Control, role: str) -> None:
    status, body = await control.get("/v1/status", role=role)

    assert status == 200
    assert body == {"state": "ARMED", "commands": 0}


async def test_status_without_token_then_401(control: Control) -> None:
    status, _ = await control.get("/v1/status")

    assert status == 401


async def test_arm_token_while_halted_then_armed(control: Control) -> None:
    control.handler.state = "HALTED"

    status, body = await control.post("/v1/arm", {"reason": "all clear"}, role="arm")

    assert status == 200
    assert body["state"] == "ARMED"
    assert control.handler.state == "ARMED"


async def test_kill_token_on_arm_then_403_and_still_halted(control: Control) -> None:
    control.handler.state = "HALTED"

    status, _ = await control.post("/v1/arm", {"reason": "all clear"}, role="kill")

    assert status == 403
    assert control.handler.state == "HALTED"


async def test_arm_while_kill_breach_holds_then_409_unless_forced(control: Control) -> None:
    control.handler.state = "HALTED"
    control.handler.kill_breach_holds = True

    refused, body = await control.post("/v1/arm", {"reason": "try"}, role="arm")
    assert refused == 409
    assert body["accepted"] is False
    assert control.handler.state == "HALTED"

    forced, _ = await control.post(
        "/v1/arm", {"reason": "known bad feed", "force": True}, role="arm"
    )
    assert forced == 200
    assert control.handler.state == "ARMED"
    assert control.handler.handled[-1].force is True


async def test_oversize_body_then_413_audited_and_unchanged(control: Control) -> None:
    status, body = await control.post("/v1/kill", {"reason": "x" * 2000}, role="kill")

    assert status == 413
    assert body["error"] == "too_large"
    assert control.handler.state == "ARMED"
    assert control.handler.audited[0]["status"] == 413


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (b"{not json", 400),
        (b"", 400),
        (b"\xff\xfe", 400),
        (b"[1, 2]", 400),
        (b'"kill"', 400),
        (b"{}", 400),
        (b'{"mode": "cancel"}', 400),
        (b'{"reason": "x", "mode": "nuke"}', 422),
        (b'{"reason": ""}', 422),
        (b'{"reason": "   "}', 422),
        (b'{"reason": 5}', 422),
        (b'{"reason": "two\\nlines"}', 422),
        (b'{"reason": "x", "force": true}', 422),
        (b'{"reason": "x", "extra": 1}', 422),
        (b"[" * 5000, 400),
    ],
)
async def test_bad_kill_body_then_4xx_and_unchanged(
    control: Control, raw: bytes, expected: int
) -> None:
    status, body = await control.post("/v1/kill", raw=raw[:1024], role="kill")

    assert status == expected, body
    assert control.handler.state == "ARMED"
    assert control.handler.handled == []
    assert len(control.handler.audited) == 1


@pytest.mark.parametrize(
    ("raw", "expected"),
    [(b'{"reason": "x", "force": "yes"}', 422), (b'{"reason": "x", "mode": "cancel"}', 422)],
)
async def test_bad_arm_body_then_422_and_still_halted(
    control: Control, raw: bytes, expected: int
) -> None:
    control.handler.state = "HALTED"

    status, _ = await control.post("/v1/arm", raw=raw, role="arm")

    assert status == expected
    assert control.handler.state == "HALTED"


async def test_health_and_readiness_then_follow_handler(control: Control) -> None:
    assert await control.get("/healthz") == (200, {"alive": True, "waiting_for": None})
    assert await control.get("/readyz") == (200, {"ready": True, "waiting_for": None})
    control.handler.is_ready = False
    assert await control.get("/healthz") == (200, {"alive": True, "waiting_for": "ib_sync"})
    assert await control.get("/readyz") == (503, {"ready": False, "waiting_for": "ib_sync"})


async def test_wrong_method_or_path_then_405_or_404_as_json(control: Control) -> None:
    assert (await control.get("/v1/kill", role="kill"))[0] == 405
    assert (await control.get("/v1/nope", role="kill"))[0] == 404
    assert control.handler.state == "ARMED"


async def test_extra_route_then_served_by_same_app(control: Control) -> None:
    async with control.session.get(control.server.url + "/metrics") as resp:
        assert resp.status == 200
        assert await resp.text() == "guardd_up 1\n"


async def test_two_person_rule_then_second_operator_rearms(tmp_path: Path) -> None:
    tokens = TokenStore.from_tokens(
        {
            "alice": ("alice-token-0123456789", ["arm"]),
            "bob": ("bob-token-01234567890", ["arm"]),
        }
    )
    handler = MemoryHandler(state="HALTED", two_person=TwoPersonRule(window_s=60))
    async with (
        ControlHttpServer(handler, tokens=tokens, port=0) as server,
        aiohttp.ClientSession() as session,
    ):
        url = server.url + "/v1/arm"

        async def arm(token: str) -> int:
            headers = {"Authorization": f"Bearer {token}"}
            async with session.post(url, json={"reason": "ok"}, headers=headers) as resp:
                return resp.status

        assert await arm("alice-token-0123456789") == 202
        assert await arm("alice-token-0123456789") == 202
        assert handler.state == "HALTED"
        assert await arm("bob-token-01234567890") == 200
        assert handler.state == "ARMED"


async def test_tls_server_then_kill_over_https(tmp_path: Path) -> None:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    await asyncio.to_thread(
        subprocess.run,
        [
            "openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
            "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "1",
            "-subj", "/CN=localhost", "-addext", "subjectAltName=IP:127.0.0.1",
        ],
        check=True,
        capture_output=True,
    )  # fmt: skip
    handler = MemoryHandler()
    client_ssl = ssl.create_default_context(cafile=str(cert))
    async with (
        ControlHttpServer(
            handler, tokens=token_store(tmp_path), port=0, ssl=server_ssl_context(cert, key)
        ) as server,
        aiohttp.ClientSession() as session,
    ):
        assert server.url.startswith("https://")
        async with session.post(
            server.url + "/v1/kill", json={"reason": "tls"}, headers=auth("kill"), ssl=client_ssl
        ) as resp:
            assert resp.status == 200
    assert handler.state == "HALTED"


# ------------------------------------------------------------------------- fuzzing

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=10,
)
field_values = st.one_of(
    st.sampled_from(["cancel", "flatten", "nuke", "", " ", "ok", "a\nb", True, False, None, 0]),
    json_values,
)
bodies = st.one_of(
    st.binary(max_size=200),
    json_values.map(lambda v: json.dumps(v).encode()),
    st.dictionaries(
        st.sampled_from(["reason", "mode", "force", "extra"]), field_values, max_size=4
    ).map(lambda v: json.dumps(v).encode()),
    st.binary(min_size=1025, max_size=1100),
)


async def test_fuzzed_bodies_then_never_5xx_and_change_only_when_valid_and_authorised(
    control: Control,
) -> None:
    loop = asyncio.get_running_loop()

    @settings(
        max_examples=150,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow],
    )
    @given(
        path=st.sampled_from(["/v1/kill", "/v1/arm"]),
        role=st.sampled_from([None, "read", "kill", "arm"]),
        raw=bodies,
    )
    def check(path: str, role: str | None, raw: bytes) -> None:
        start = "ARMED" if path == "/v1/kill" else "HALTED"
        control.handler.state = start
        future = asyncio.run_coroutine_threadsafe(control.post(path, raw=raw, role=role), loop)
        status, body = future.result(timeout=10)

        assert status < 500, body
        authorised = (path, role) in {("/v1/kill", "kill"), ("/v1/arm", "arm")}
        if status == 200:
            assert authorised
            parsed = json.loads(raw)
            assert isinstance(parsed, dict)
            assert isinstance(parsed["reason"], str)
            assert parsed["reason"].strip()
            assert control.handler.state != start
        else:
            assert control.handler.state == start

    await asyncio.to_thread(check)


async def test_guard_fails_to_carry_out_then_json_500_command_failed(tmp_path: Path) -> None:
    from guardd.control.commands import CommandOutcome, ControlCommand
    from guardd.errors import LatchError

    class BrokenDisk(MemoryHandler):
        async def handle(self, command: ControlCommand) -> CommandOutcome:
            raise LatchError("cannot write the latch: disk full")

    server = ControlHttpServer(BrokenDisk(), tokens=token_store(tmp_path), port=0)
    async with (
        server,
        aiohttp.ClientSession() as session,
        session.post(
            server.url + "/v1/kill", json={"reason": "runaway"}, headers=auth("kill")
        ) as resp,
    ):
        status, body = resp.status, await resp.json()
    assert status == 500
    assert body["error"] == "command_failed"
    assert "disk full" in str(body["message"])


# ------------------------------------------------------------------------- under exhaustion


async def raw_request(url: str, data: bytes, *, timeout: float = 5.0) -> bytes:
    """Send ``data`` on a fresh TCP connection and read until the server closes it."""
    host, _, port = url.removeprefix("http://").partition(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(data)
        await writer.drain()
        async with asyncio.timeout(timeout):
            return await reader.read()
    finally:
        writer.close()


def json_body(response: bytes) -> tuple[int, dict[str, object], str]:
    """(status, JSON body, X-Request-Id) of a raw HTTP/1.1 answer."""
    head, _, body = response.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    assert headers["Content-Type"].startswith("application/json"), headers
    return int(lines[0].split()[1]), json.loads(body), headers.get("X-Request-Id", "")


async def test_every_error_then_json_with_request_id(control: Control) -> None:
    url = control.server.url
    answers = [
        await control.post("/v1/kill", {"reason": "x"}),  # 401
        await control.get("/v1/status"),  # 401
        await control.post("/v1/kill", {"reason": "x"}, role="read"),  # 403
        await control.get("/v1/nothing"),  # 404
        await control.get("/v1/kill"),  # 405
        await control.post("/v1/kill", raw=b"{", role="kill"),  # 400
        await control.post("/v1/kill", {"reason": ""}, role="kill"),  # 422
        await control.post("/v1/kill", {"reason": "x" * 2000}, role="kill"),  # 413
        await control.post("/v1/kill", {"reason": "x"}, role="kill", content_type="text/plain"),
    ]
    unparsable = json_body(await raw_request(url, b"GET /\x00 HTTP/1.1\r\nHost: x\r\n\r\n"))
    bad_header = json_body(await raw_request(url, b"GET / HTTP/1.1\r\nHo st: x\r\n\r\n"))

    statuses = [status for status, _ in answers] + [unparsable[0], bad_header[0]]
    assert statuses == [401, 401, 403, 404, 405, 400, 422, 413, 415, 400, 400]
    bodies = [body for _, body in answers] + [unparsable[1], bad_header[1]]
    for body in bodies:
        assert isinstance(body["request_id"], str) and len(body["request_id"]) == 32, body
        assert body["error"] and body["message"]
    assert unparsable[2] == unparsable[1]["request_id"]
    assert control.handler.state == "ARMED"


async def test_command_not_json_content_type_then_415_audited_and_unchanged(
    control: Control,
) -> None:
    for content_type in ("text/plain", "application/x-www-form-urlencoded", "application/jsonx"):
        status, body = await control.post(
            "/v1/kill", {"reason": "x"}, role="kill", content_type=content_type
        )
        assert status == 415
        assert body["error"] == "unsupported_media_type"

    charset, _ = await control.post(
        "/v1/kill", {"reason": "x"}, role="kill", content_type="application/json; charset=utf-8"
    )
    assert charset == 200
    assert [r["status"] for r in control.handler.audited] == [415, 415, 415]
    assert len(control.handler.handled) == 1


@pytest.fixture
async def quick_timeouts(tmp_path: Path) -> AsyncIterator[Control]:
    handler = MemoryHandler()
    server = ControlHttpServer(
        handler,
        tokens=token_store(tmp_path),
        port=0,
        header_timeout_s=0.3,
        body_timeout_s=0.3,
        max_connections=16,
    )
    async with server, aiohttp.ClientSession() as session:
        yield Control(server, handler, session)


async def test_body_slower_than_timeout_then_408_audited_and_closed(
    quick_timeouts: Control,
) -> None:
    head = (
        "POST /v1/kill HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Authorization: Bearer {TOKENS['kill']}\r\nContent-Length: 100\r\n\r\n"
        '{"reason": '
    )

    status, body, _ = json_body(await raw_request(quick_timeouts.server.url, head.encode()))

    assert status == 408
    assert body["error"] == "timeout" and body["request_id"]
    assert quick_timeouts.handler.state == "ARMED"
    assert [r["status"] for r in quick_timeouts.handler.audited] == [408]


async def test_headers_slower_than_timeout_then_connection_closed(
    quick_timeouts: Control,
) -> None:
    partial = b"POST /v1/kill HTTP/1.1\r\nHost: x\r\n"  # never finished

    answer = await raw_request(quick_timeouts.server.url, partial)
    silent = await raw_request(quick_timeouts.server.url, b"")

    assert answer == b"" and silent == b""  # closed by the server, without an answer
    assert quick_timeouts.server.connections == 0


async def test_connections_over_cap_then_oldest_idle_closed_and_kill_answered(
    tmp_path: Path,
) -> None:
    handler = MemoryHandler()
    server = ControlHttpServer(
        handler, tokens=token_store(tmp_path), port=0, header_timeout_s=60.0, max_connections=16
    )
    async with server, aiohttp.ClientSession() as session:
        idle = [await asyncio.open_connection("127.0.0.1", server.port) for _ in range(40)]
        try:
            await eventually(lambda: server.evicted >= 40 - server.cap)

            status, body = await Control(server, handler, session).post(
                "/v1/kill", {"reason": "x"}, role="kill"
            )

            assert status == 200 and body["state"] == "HALTED"
            assert server.connections <= server.cap
            closed = [await _closed(reader) for reader, _ in idle[:20]]
            assert all(closed)  # the oldest went first
        finally:
            for _, writer in idle:
                writer.close()


async def _closed(reader: asyncio.StreamReader) -> bool:
    async with asyncio.timeout(2):
        return await reader.read() == b""


def test_connection_cap_then_open_file_limit_less_reserve() -> None:
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)

    assert connection_cap(10) == min(10, soft - FD_RESERVE)
    assert connection_cap(10**9) == soft - FD_RESERVE
