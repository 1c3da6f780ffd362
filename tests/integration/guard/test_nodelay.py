"""Every socket of the guard's kill path sends without Nagle (TCP_NODELAY), issue 15.

The real guard, in this process, on the simulated gateway, with real HTTP and a real mosquitto
(started with `set_tcp_nodelay true`, as deploy/mosquitto/guardd.conf ships it). The sockets are
found as the kernel sees them (by their addresses) among this process's socket objects, and the
option read back from the kernel.
"""

from __future__ import annotations

import asyncio
import gc
import socket
from pathlib import Path

from guardd.broker.connection import no_delay
from ibsim.gateway import SimGateway
from tests.control_harness import running_guard
from tests.mqtt_broker import DEPLOY_MOSQUITTO, Broker


def tcp_sockets() -> list[tuple[socket.socket, tuple[str, int], tuple[str, int]]]:
    """(socket, local address, peer address) of every connected TCP socket of this process."""
    found = []
    for obj in gc.get_objects():
        if not isinstance(obj, socket.socket) or obj.fileno() < 0:
            continue
        if obj.family != socket.AF_INET or obj.type != socket.SOCK_STREAM:
            continue
        try:
            found.append((obj, obj.getsockname(), obj.getpeername()))
        except OSError:  # listening or not connected
            continue
    return found


def nodelay(sock: socket.socket) -> bool:
    return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0


async def test_guard_connected_then_ib_mqtt_and_http_sockets_without_nagle(
    sim: SimGateway, mqtt_broker: Broker, tmp_path: Path
) -> None:
    async with running_guard(sim, mqtt_broker, tmp_path) as running:
        http_port = int(running.url.rsplit(":", 1)[1])
        reader, writer = await asyncio.open_connection("127.0.0.1", http_port)
        try:
            ours = writer.get_extra_info("sockname")
            await asyncio.sleep(0.1)  # accepted by the guard's server
            sockets = tcp_sockets()

            # The guard's end of each connection: to the gateway, to the broker, and the
            # server's end of our HTTP connection
            to_ib = [s for s, _, peer in sockets if peer[1] == sim.port]
            to_mqtt = [s for s, _, peer in sockets if peer[1] == mqtt_broker.port]
            http = [s for s, local, peer in sockets if local[1] == http_port and peer == ours]

            assert to_ib and all(nodelay(s) for s in to_ib)
            assert to_mqtt and all(nodelay(s) for s in to_mqtt)
            assert http and all(nodelay(s) for s in http)
        finally:
            writer.close()
            await writer.wait_closed()
            del reader


def test_no_delay_on_a_closed_socket_then_no_error() -> None:
    sock = socket.socket()
    sock.close()
    no_delay(sock)
    no_delay(None)


def test_deployed_and_test_brokers_then_set_tcp_nodelay() -> None:
    deployed = (DEPLOY_MOSQUITTO / "guardd.conf").read_text().splitlines()
    assert "set_tcp_nodelay true" in deployed
