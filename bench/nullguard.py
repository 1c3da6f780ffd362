"""The null guard: the floor of the kill on this machine, re-measured in every benchmark run.

`python -m bench.nullguard --ib-port P --client-id C --http-port H --token-file F
[--mqtt-port M --mqtt-key-file K]` connects to the gateway with ibapi as guardd does (an
`EClient` whose `run()` decodes on a thread of its own, TCP_NODELAY on its socket, as guardd
sets it), then answers a kill and nothing else, with one reqGlobalCancel written on the turn the
command arrived in: no engine, no latch, no journal, no pacing, no logging.

- HTTP: `POST /v1/kill` with `Authorization: Bearer <token>` (guardd's endpoint and shape) ->
  reqGlobalCancel, then `{"accepted": true, "state": "HALTED"}`; `POST /v1/arm` answers ARMED.
- MQTT (when `--mqtt-port` is given): a signed kill on `nullguard/<account>/cmd/kill`, QoS 1,
  through the same mosquitto as the guard, TCP_NODELAY on the client socket as guardd has it; the
  HMAC is checked (guardd's canonical form) and the cancel written; nothing else is checked.

Prints one JSON line `{"ready": true}` once connected and listening; runs until stdin closes.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hmac
import json
import socket
import sys
import threading
from pathlib import Path
from typing import Any

import aiomqtt
from aiohttp import web
from ibapi.client import EClient
from ibapi.order_cancel import OrderCancel
from ibapi.wrapper import EWrapper

from guardd.control.auth import parse_signed_command, sign

ACCOUNT = "DU000001"
TOPIC_PREFIX = "nullguard"


class _Wrapper(EWrapper):  # type: ignore[misc]
    def __init__(self) -> None:
        super().__init__()
        self.ready = threading.Event()

    def nextValidId(self, orderId: int) -> None:
        self.ready.set()

    def error(self, *args: Any) -> None:
        pass


class NullGuard:
    def __init__(self, client: EClient, token: str, mqtt_key: bytes | None) -> None:
        self.client = client
        self.expected_auth = f"Bearer {token}"
        self.mqtt_key = mqtt_key
        self.cancels = 0

    def cancel(self) -> None:
        self.client.reqGlobalCancel(OrderCancel())
        self.cancels += 1

    async def http_kill(self, request: web.Request) -> web.Response:
        if not hmac.compare_digest(request.headers.get("Authorization", ""), self.expected_auth):
            return web.json_response({"error": "unauthorized"}, status=401)
        await request.read()  # the body, as guardd reads it (not interpreted)
        self.cancel()
        return web.json_response({"accepted": True, "state": "HALTED"})

    async def http_arm(self, request: web.Request) -> web.Response:
        await request.read()
        return web.json_response({"accepted": True, "state": "ARMED"})

    async def mqtt_loop(self, host: str, port: int) -> None:
        assert self.mqtt_key is not None
        topic = f"{TOPIC_PREFIX}/{ACCOUNT}/cmd/kill"
        async with aiomqtt.Client(
            host, port, socket_options=((socket.IPPROTO_TCP, socket.TCP_NODELAY, 1),)
        ) as mqtt:
            await mqtt.subscribe(topic, qos=1)
            self.mqtt_ready.set()
            async for message in mqtt.messages:
                with contextlib.suppress(Exception):  # anything that does not verify: ignored
                    command = parse_signed_command(message.payload, topic_action="kill")
                    if hmac.compare_digest(
                        sign(self.mqtt_key, command.canonical(ACCOUNT)), command.sig
                    ):
                        self.cancel()

    mqtt_ready: asyncio.Event


async def serve(args: argparse.Namespace) -> None:
    wrapper = _Wrapper()
    client = EClient(wrapper)
    await asyncio.to_thread(client.connect, "127.0.0.1", args.ib_port, args.client_id)
    client.conn.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    threading.Thread(target=client.run, name="ibapi-run", daemon=True).start()
    if not await asyncio.to_thread(wrapper.ready.wait, 10):
        raise SystemExit("no nextValidId from the gateway")
    guard = NullGuard(client, args.token, args.mqtt_key)
    guard.mqtt_ready = asyncio.Event()
    app = web.Application()
    app.router.add_post("/v1/kill", guard.http_kill)
    app.router.add_post("/v1/arm", guard.http_arm)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", args.http_port).start()
    tasks = []
    if args.mqtt_port:
        tasks.append(asyncio.create_task(guard.mqtt_loop("127.0.0.1", args.mqtt_port)))
        await asyncio.wait_for(guard.mqtt_ready.wait(), 10)
    print(json.dumps({"ready": True}), flush=True)
    # Until the driver closes stdin (or dies).
    await asyncio.to_thread(sys.stdin.read)
    for task in tasks:
        task.cancel()
    await runner.cleanup()
    client.disconnect()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--ib-port", type=int, required=True)
    parser.add_argument("--client-id", type=int, default=5)
    parser.add_argument("--http-port", type=int, required=True)
    parser.add_argument("--token-file", required=True)
    parser.add_argument("--mqtt-port", type=int, default=0)
    parser.add_argument("--mqtt-key-file", default="")
    args = parser.parse_args()
    args.token = Path(args.token_file).read_text().strip()
    args.mqtt_key = Path(args.mqtt_key_file).read_bytes().strip() if args.mqtt_key_file else None
    asyncio.run(serve(args))


if __name__ == "__main__":
    main()
