"""The MQTT control adapter: signed kill / arm commands in, retained state and events out.

Topics (``prefix`` defaults to ``guardd``; see docs/control.md for the payload and signature):

- ``<prefix>/<account>/cmd/kill``: signed kill for this account (subscribed, QoS 1)
- ``<prefix>/<account>/cmd/arm``: signed re-arm for this account (subscribed, QoS 1)
- ``<prefix>/all/cmd/kill``: fleet-wide signed kill (subscribed, QoS 1)
- ``<prefix>/<account>/heartbeat/<bot>``: a bot's liveness ping, any payload (subscribed, QoS 0,
  only when the guard watches heartbeats)
- ``<prefix>/<account>/state``: the guard's status, retained; last will ``{"online": false}``
- ``<prefix>/<account>/events``: one event per command handled or refused (not retained)

A retained message on a command topic is never acted on (an attacker with publish-and-retain
rights must not get a command delivered to every future start): it is refused and audited.
Nonces of accepted commands go to ``nonces`` (a ``NonceStore`` on disk in the guard, so that a
restart does not forget them; a ``NonceCache`` in memory by default).

The adapter runs on its own task: a broker that is down never blocks HTTP or the guard. It
reconnects with capped exponential backoff; while disconnected, ``publish_state`` keeps only the
latest state and ``publish_event`` keeps at most ``max_queued_events`` (oldest dropped). Every
refused command (malformed, unknown key, bad signature, wrong role, stale, replayed) is journaled
through ``handler.audit`` and changes nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import ssl
import time
from collections import deque
from collections.abc import Callable, Mapping
from pathlib import Path
from types import TracebackType
from typing import Final, Self

import aiomqtt
import structlog

from guardd.control.auth import (
    KeyStore,
    NonceBook,
    NonceCache,
    parse_signed_command,
    verify_signed_command,
)
from guardd.control.commands import Action, CommandHandler, CommandOutcome, refusal_record
from guardd.errors import CommandError, ConfigError, GuarddError, ReplayError

__all__ = ["OFFLINE", "MqttControl", "Topics", "client_ssl_context"]

log = structlog.get_logger(__name__)

OFFLINE: Final = b'{"online": false}'


def client_ssl_context(ca_file: Path | None = None) -> ssl.SSLContext:
    """A TLS client context verifying the broker (system CAs, or ``ca_file``)."""
    try:
        return ssl.create_default_context(cafile=str(ca_file) if ca_file else None)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError("control.mqtt.tls_ca_file", f"cannot load CA file: {exc}") from exc


class Topics:
    """The topics of one guarded account under a prefix."""

    __slots__ = ("account", "all_kill", "arm", "events", "heartbeat", "kill", "prefix", "state")

    def __init__(self, prefix: str, account: str) -> None:
        if account == "all":
            raise ConfigError("account", '"all" is reserved for the fleet-wide kill topic')
        self.prefix = prefix
        self.account = account
        self.kill = f"{prefix}/{account}/cmd/kill"
        self.arm = f"{prefix}/{account}/cmd/arm"
        self.all_kill = f"{prefix}/all/cmd/kill"
        self.state = f"{prefix}/{account}/state"
        self.events = f"{prefix}/{account}/events"
        self.heartbeat = f"{prefix}/{account}/heartbeat/"  # + the bot's name

    def heartbeat_of(self, topic: str) -> str | None:
        """The bot a heartbeat topic names, or None for any other topic (or a bad name)."""
        if not topic.startswith(self.heartbeat):
            return None
        bot = topic[len(self.heartbeat) :]
        return bot if _BOT_NAME.fullmatch(bot) else None

    def route(self, topic: str) -> tuple[Action, str] | None:
        """The (action, target) a command topic stands for, or None for any other topic."""
        if topic == self.kill:
            return "kill", self.account
        if topic == self.arm:
            return "arm", self.account
        if topic == self.all_kill:
            return "kill", "all"
        return None


_BOT_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")


def _peek(payload: bytes) -> dict[str, str]:
    """What an unverified payload claims (key id, nonce, reason), for the audit of a refusal."""
    try:
        data = json.loads(payload)
    except (ValueError, RecursionError):
        return {}
    if not isinstance(data, dict):
        return {}
    return {k: v[:200] for k in ("key_id", "nonce", "reason") if isinstance(v := data.get(k), str)}


class MqttControl:
    """Signed MQTT commands for one account, used as ``async with``.

    ``handle_payload`` is the whole command path (parse, verify, hand to the guard, publish the
    outcome); the connection task only feeds it. ``publish_state`` and ``publish_event`` never
    wait for the broker.
    """

    def __init__(
        self,
        handler: CommandHandler,
        *,
        account: str,
        keys: KeyStore,
        host: str = "127.0.0.1",
        port: int = 1883,
        username: str | None = None,
        password: str | None = None,
        tls: ssl.SSLContext | None = None,
        window_s: float = 30.0,
        topic_prefix: str = "guardd",
        client_id: str | None = None,
        clock: Callable[[], float] = time.time,
        backoff_min_s: float = 0.5,
        backoff_max_s: float = 30.0,
        state_interval_s: float = 1.0,
        max_queued_events: int = 100,
        on_heartbeat: Callable[[str], None] | None = None,
        nonces: NonceBook | None = None,
    ) -> None:
        self.topics = Topics(topic_prefix, account)
        self._handler = handler
        self._on_heartbeat = on_heartbeat
        self._keys = keys
        self._host = host
        self._port = port
        self._username = username
        self._password = password
        self._tls = tls
        self._window_s = window_s
        self._client_id = client_id or f"guardd-{account}"
        self._clock = clock
        self._backoff = (backoff_min_s, backoff_max_s)
        self._state_interval_s = state_interval_s
        self._nonces: NonceBook = nonces if nonces is not None else NonceCache(window_s)
        self._events: deque[bytes] = deque(maxlen=max_queued_events)
        self._state: bytes | None = None
        self._last_status: Mapping[str, object] | None = None
        self._wake = asyncio.Event()
        self._client: aiomqtt.Client | None = None
        self._task: asyncio.Task[None] | None = None

    @property
    def connected(self) -> bool:
        """True while connected to the broker and subscribed."""
        return self._client is not None

    # ------------------------------------------------------------------ publishing

    def publish_state(self, status: Mapping[str, object]) -> None:
        """Publish the guard's status, retained, on the state topic (latest one wins)."""
        self._last_status = dict(status)
        self._state = json.dumps({"online": True, **status}, default=str).encode()
        self._wake.set()

    def publish_event(self, event: Mapping[str, object]) -> None:
        """Publish an event (not retained); queued boundedly while disconnected."""
        if len(self._events) == self._events.maxlen:
            log.warning("mqtt_event_dropped", queued=len(self._events))
        self._events.append(json.dumps(event, default=str).encode())
        self._wake.set()

    # ------------------------------------------------------------------ commands

    async def handle_payload(
        self, topic: str, payload: bytes, *, retain: bool = False
    ) -> CommandOutcome | None:
        """Handle one message on a command topic: the guard's outcome, or None if refused.

        ``retain``: the broker delivered it as a retained message (on subscribing), refused."""
        route = self.topics.route(topic)
        if route is None:
            log.debug("mqtt_message_ignored", topic=topic)
            return None
        action, target = route
        try:
            if retain:
                raise ReplayError("a retained message on a command topic is never acted on")
            signed = parse_signed_command(payload, topic_action=action)
            command = verify_signed_command(
                signed,
                target=target,
                keys=self._keys,
                nonces=self._nonces,
                now=self._clock(),
                window_s=self._window_s,
            )
            outcome = await self._handler.handle(command)
        except CommandError as exc:
            self._refuse(topic, action, payload, exc)
            return None
        except GuarddError as exc:  # the guard failed to carry it out: say so, keep listening
            log.error("command_failed", channel="mqtt", topic=topic, error=str(exc))
            self.publish_event(
                {
                    "type": "command_failed",
                    "action": action,
                    "request_id": command.request_id,
                    "accepted": False,
                    "message": str(exc),
                }
            )
            return None
        log.info(
            "command_handled",
            channel="mqtt",
            action=action,
            target=target,
            principal=command.principal,
            accepted=outcome.accepted,
            state=outcome.state,
            request_id=command.request_id,
        )
        self.publish_event(
            {
                "type": "command",
                "action": action,
                "target": target,
                "principal": command.principal,
                "request_id": command.request_id,
                **outcome.as_json(),
                **({} if outcome.latch_durable else {"error": "latch_not_durable"}),
            }
        )
        self.publish_state(self._handler.status())
        return outcome

    def _refuse(self, topic: str, action: Action, payload: bytes, error: CommandError) -> None:
        claimed = _peek(payload)
        record = refusal_record(
            channel="mqtt",
            principal=claimed.get("key_id"),
            action=action,
            reason=claimed.get("reason"),
            error=error,
            request_id=claimed.get("nonce", ""),
            topic=topic,
        )
        log.warning(
            "command_refused",
            channel="mqtt",
            topic=topic,
            key_id=record["principal"],
            why=str(error),
        )
        try:
            self._handler.audit(record)
        except GuarddError as exc:  # the refusal stands even if the journal is failing
            log.error("refusal_not_journaled", error=str(exc), topic=topic)
        self.publish_event(
            {
                "type": "command_refused",
                "action": action,
                "request_id": record["request_id"],
                "refused_because": str(error),
                "accepted": False,
            }
        )

    # ------------------------------------------------------------------ lifecycle

    async def __aenter__(self) -> Self:
        self._task = asyncio.create_task(self._run(), name="mqtt_control")
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        client = self._client
        if client is not None:  # say so before leaving: a clean disconnect sends no will
            offline = json.dumps({**(self._last_status or {}), "online": False}, default=str)
            with contextlib.suppress(aiomqtt.MqttError, TimeoutError):
                await asyncio.wait_for(  # bounded: the guard stops within 2 s
                    client.publish(self.topics.state, offline, qos=1, retain=True), 0.5
                )
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _run(self) -> None:
        async with asyncio.TaskGroup() as tasks:
            tasks.create_task(self._connection_loop(), name="mqtt_connection")
            tasks.create_task(self._publish_loop(), name="mqtt_publish")
            tasks.create_task(self._state_loop(), name="mqtt_state")

    def _new_client(self) -> aiomqtt.Client:
        return aiomqtt.Client(
            self._host,
            self._port,
            username=self._username,
            password=self._password,
            identifier=self._client_id,
            will=aiomqtt.Will(self.topics.state, OFFLINE, qos=1, retain=True),
            tls_context=self._tls,
            timeout=10.0,
            keepalive=15,
        )

    async def _connection_loop(self) -> None:
        backoff_min, backoff_max = self._backoff
        delay = backoff_min
        while True:
            try:
                async with self._new_client() as client:
                    await client.subscribe(
                        [(self.topics.kill, 1), (self.topics.arm, 1), (self.topics.all_kill, 1)]
                    )
                    if self._on_heartbeat is not None:
                        await client.subscribe(self.topics.heartbeat + "+", qos=0)
                    self._client = client
                    delay = backoff_min
                    log.info("mqtt_connected", host=self._host, port=self._port)
                    self.publish_state(self._handler.status())
                    async for message in client.messages:
                        await self._handle_message(message)
            except aiomqtt.MqttError as exc:  # swallowed here only: reconnect, log and back off
                log.warning("mqtt_disconnected", error=str(exc), retry_in_s=delay)
            finally:
                self._client = None
            await asyncio.sleep(delay)
            delay = min(delay * 2, backoff_max)

    async def _handle_message(self, message: aiomqtt.Message) -> None:
        """One message; a bug in handling it must not take the kill channel down with it."""
        bot = self.topics.heartbeat_of(str(message.topic))
        if bot is not None and self._on_heartbeat is not None:
            self._on_heartbeat(bot)  # liveness only: a bot's payload is not read
            return
        try:
            await self.handle_payload(str(message.topic), message.payload, retain=message.retain)
        except Exception:
            log.exception("mqtt_message_crashed", topic=str(message.topic))

    async def _publish_loop(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            client = self._client
            if client is None:
                continue  # connecting publishes the state again; events wait in the queue
            try:
                if self._state is not None:
                    state, self._state = self._state, None
                    await client.publish(self.topics.state, state, qos=1, retain=True)
                while self._events and self._client is client:
                    await client.publish(self.topics.events, self._events.popleft(), qos=1)
            except aiomqtt.MqttError as exc:
                log.warning("mqtt_publish_failed", error=str(exc))

    async def _state_loop(self) -> None:
        while True:
            await asyncio.sleep(self._state_interval_s)
            status = dict(self._handler.status())
            if status != self._last_status:
                self.publish_state(status)
