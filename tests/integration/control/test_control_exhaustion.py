"""HTTP under exhaustion against the REAL guard (sim over TCP, real HTTP), run at the open-file
limit the systemd unit sets: another process holds 1,100 idle connections and 200 clients
dribbling a body, and a valid kill is still answered 200 and latched, status still answers, and
the guard recovers when they go. At systemd's default limit (1024, no LimitNOFILE) the same
flood would take every descriptor without the connection cap. How fast the kill is answered is
measured in `bench.flood` (HTTP exhaustion), not asserted here."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import resource
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import pytest

from guardd.control.http import FD_RESERVE
from ibsim.gateway import SimGateway
from tests.conftest import eventually
from tests.control_harness import Running, running_guard
from tests.deploy_files import UNITS, directives
from tests.mqtt_broker import Broker

pytestmark = pytest.mark.slow

IDLE = 1_100
SLOW_BODY = 200


@contextlib.contextmanager
def nofile(limit: int) -> Iterator[int]:
    """This process's (the guard's) soft RLIMIT_NOFILE set to ``limit``, restored after."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < limit:
        pytest.fail(f"the hard open-file limit {hard} is below {limit}", pytrace=False)
    resource.setrlimit(resource.RLIMIT_NOFILE, (limit, hard))
    try:
        yield limit
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


@pytest.fixture
def nofile_as_the_unit() -> Iterator[int]:
    """The soft RLIMIT_NOFILE of the systemd units' LimitNOFILE."""
    [limit] = {int(directives(unit)["LimitNOFILE"][0]) for unit in UNITS.values()}
    with nofile(limit):
        yield limit


HOLDER = """
import resource, socket, sys
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
host, port, idle, slow = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
head = sys.stdin.readline().encode().replace(b"|", b"\\r\\n")
held, failed = [], 0
for n in range(idle + slow):
    try:
        sock = socket.create_connection((host, port), timeout=5)
        if n >= idle:
            sock.sendall(head)  # the rest of the body never comes
        held.append(sock)
    except OSError:
        failed += 1
print("held", len(held), "failed", failed, flush=True)
sys.stdin.read()  # until the test closes stdin
"""


@contextlib.asynccontextmanager
async def held_connections(run: Running, port: int) -> AsyncIterator[str]:
    """Another process holding ``IDLE`` idle connections and ``SLOW_BODY`` kill requests whose
    body never comes; yields its report line once they are open."""
    head = (
        "POST /v1/kill HTTP/1.1|Host: guard|Content-Type: application/json|"
        f"Authorization: Bearer {run.tokens['kill']}|Content-Length: 1000||"
        '{"reason": "'
    )
    holder = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        HOLDER,
        "127.0.0.1",
        str(port),
        str(IDLE),
        str(SLOW_BODY),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
    )
    assert holder.stdin is not None and holder.stdout is not None
    try:
        holder.stdin.write(head.encode() + b"\n")
        await holder.stdin.drain()
        report = (await asyncio.wait_for(holder.stdout.readline(), 120)).decode()
        yield report
    finally:
        holder.stdin.close()
        try:
            await asyncio.wait_for(holder.wait(), 10)
        except TimeoutError:
            holder.kill()
            await holder.wait()


async def get_status(run: Running) -> tuple[int, dict[str, object]]:
    headers = {"Authorization": f"Bearer {run.tokens['read']}"}
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"{run.url}/v1/status", headers=headers) as response,
    ):
        return response.status, await response.json()


async def test_idle_and_slow_body_connections_held_then_kill_answered_latched_and_recovers(
    sim: SimGateway, mqtt_broker: Broker, tmp_path: Path, nofile_as_the_unit: int
) -> None:
    # Arrange: long timeouts, so that the connections are held, not timed out, during the kill
    timeouts = {"header_timeout_s": 300.0, "body_timeout_s": 300.0}
    async with running_guard(sim, mqtt_broker, tmp_path, http=timeouts) as run:
        server = run.guard.http
        assert server is not None
        async with held_connections(run, server.port) as report:
            assert report.split() == ["held", str(IDLE + SLOW_BODY), "failed", "0"]
            await eventually(
                lambda: server.connections + server.evicted >= IDLE + SLOW_BODY, "all accepted"
            )

            # Act
            status, body = await run.post("kill", {"reason": "under exhaustion"}, "kill")
            read_status, state = await get_status(run)
            open_files = len(os.listdir("/proc/self/fd"))

            # Assert: answered and latched while the connections are held
            assert status == 200, body
            assert body["state"] == "HALTED" and body["latch_durable"] is True
            latch = json.loads(run.guard.cfg.latch_path.read_text())
            assert latch["halted"] is True and latch["reason"] == "under exhaustion"
            assert read_status == 200 and state["state"] == "HALTED"
            assert server.cap <= nofile_as_the_unit - FD_RESERVE
            assert server.connections <= server.cap
            assert server.evicted >= IDLE + SLOW_BODY - server.cap  # idle ones made room
            assert open_files < nofile_as_the_unit

        # The guard recovers when they go
        await eventually(lambda: server.connections == 0, "every connection gone", timeout_s=30)
        armed, answer = await run.post("arm", {"reason": "recovered", "force": True}, "arm")
        assert armed == 200 and answer["state"] == "ARMED"
        assert (await get_status(run))[0] == 200


async def test_more_connections_than_descriptors_then_kill_still_answered(
    sim: SimGateway, mqtt_broker: Broker, tmp_path: Path
) -> None:
    # systemd's default soft limit without LimitNOFILE: 1,300 connections would not fit
    with nofile(1024):
        timeouts = {"header_timeout_s": 300.0, "body_timeout_s": 300.0}
        async with running_guard(sim, mqtt_broker, tmp_path, http=timeouts) as run:
            server = run.guard.http
            assert server is not None
            async with held_connections(run, server.port):
                status, body = await asyncio.wait_for(
                    run.post("kill", {"reason": "out of descriptors"}, "kill"), 30
                )

                assert status == 200 and body["latch_durable"] is True
                assert len(os.listdir("/proc/self/fd")) < 1024
