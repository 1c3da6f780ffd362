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
reconnects under the retry policy (`guardd.retry`; `RECONNECT` by default: 0.5 s doubling up to
30 s, jittered); while disconnected, ``publish_state`` keeps only the latest state and
``publish_event`` keeps at most ``max_queued_events`` (oldest dropped).

A junk flood never delays a valid command. Every message is screened in the receive path, as the
MQTT client reads it and before anything touches the disk: a heartbeat is folded at once, a
command is parsed and its signature, role and timestamp checked (one JSON parse and one HMAC),
then its nonce (the only disk write, and only for a command that passed every other check). Only a
verified command is queued, on a bounded command queue of its own
(``max_queued_commands``), for the guard to carry out in order; junk never takes a place in it.
Every refused command (malformed, unknown key, bad signature, wrong role, stale, replayed) changes
nothing and goes to ``handler.audit`` (the guard counts each one and journals the first of each
kind per interval in full, the rest as counts: ``guardd.control.refusals``). Events and log lines
about refusals follow the same rule: the first of each kind per interval in full, then one
``command_refusals_aggregated`` event with the counts. So memory, disk writes and outgoing
messages stay bounded whatever is published on the command topics.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import socket
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
    signed_command_from,
    verify_signed_command,
)
from guardd.control.commands import (
    CommandHandler,
    CommandKind,
    CommandOutcome,
    ControlCommand,
    refusal_record,
)
from guardd.control.refusals import RefusalLedger, refusal_kind
from guardd.errors import CommandError, ConfigError, GuarddError, ReplayError
from guardd.retry import Backoff, RetryPolicy

__all__ = [
    "MAX_QUEUED_COMMANDS",
    "OFFLINE",
    "RECONNECT",
    "MqttControl",
    "Topics",
    "client_ssl_context",
]

log = structlog.get_logger(__name__)

OFFLINE: Final = b'{"online": false}'
MAX_QUEUED_COMMANDS: Final = 64
"""Verified commands waiting for the guard; one more is refused (and journaled), never lost."""
RECONNECT: Final = RetryPolicy(initial_s=0.5, max_s=30.0)
"""The MQTT reconnect's back-off: the kill channel comes back soon after a broker restart."""
_PAYLOAD_EXCERPT: Final = 200


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

    def route(self, topic: str) -> tuple[CommandKind, str] | None:
        """The (action, target) a command topic stands for, or None for any other topic."""
        if topic == self.kill:
            return "kill", self.account
        if topic == self.arm:
            return "arm", self.account
        if topic == self.all_kill:
            return "kill", "all"
        return None


_BOT_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")


_NOT_JSON: Final = object()


def _load(payload: bytes) -> object:
    """The payload's JSON value, or ``_NOT_JSON`` (parsed once: to check it, and to audit it)."""
    try:
        return json.loads(payload)
    except (ValueError, RecursionError):  # RecursionError: deeply nested arrays
        return _NOT_JSON


def _claims(data: object) -> dict[str, str]:
    """What an unverified payload claims (key id, nonce, reason), for the audit of a refusal."""
    if not isinstance(data, dict):
        return {}
    return {k: v[:200] for k in ("key_id", "nonce", "reason") if isinstance(v := data.get(k), str)}


class _Verified(aiomqtt.Message):
    """A command message whose signature, role, timestamp and nonce checked out: the only kind
    of message the command queue carries."""

    def __init__(self, message: aiomqtt.Message, command: ControlCommand, target: str) -> None:
        super().__init__(
            message.topic,
            message.payload if isinstance(message.payload, bytes) else b"",
            message.qos,
            message.retain,
            message.mid,
            message.properties,
        )
        self.command = command
        self.target = target


def _command_queue(
    screen: Callable[[aiomqtt.Message], _Verified | None],
    full: Callable[[_Verified], None],
) -> type[asyncio.Queue[aiomqtt.Message]]:
    """The client's incoming queue class: each message is screened as it is received
    (``screen``); only a verified command is queued, and one that finds the queue full is handed
    to ``full`` (refused and audited) instead of being dropped silently."""

    class CommandQueue(asyncio.Queue[aiomqtt.Message]):
        def put_nowait(self, item: aiomqtt.Message) -> None:
            verified = screen(item)
            if verified is None:
                return
            try:
                super().put_nowait(verified)
            except asyncio.QueueFull:
                full(verified)

    return CommandQueue


class MqttControl:
    """Signed MQTT commands for one account, used as ``async with``.

    ``handle_payload`` is the whole command path (``verify``: parse, authenticate; then hand to
    the guard and publish the outcome). Connected, the client's receive path runs ``verify`` on
    each message as it is read and queues only verified commands for the connection task.
    ``publish_state`` and ``publish_event`` never wait for the broker.
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
        reconnect: RetryPolicy = RECONNECT,
        state_interval_s: float = 1.0,
        max_queued_events: int = 100,
        max_queued_commands: int = MAX_QUEUED_COMMANDS,
        refusal_interval_s: float = 10.0,
        on_heartbeat: Callable[[str], None] | None = None,
        nonces: NonceBook | None = None,
        on_dropped: Callable[[str], None] | None = None,
    ) -> None:
        self.topics = Topics(topic_prefix, account)
        self._handler = handler
        self._on_heartbeat = on_heartbeat
        self._on_dropped = on_dropped
        self._max_queued_commands = max_queued_commands
        # Events and log lines about refusals: the first of each kind per interval in full.
        self._refusals = RefusalLedger(refusal_interval_s)
        self.crashes = 0  # messages whose handling raised (a bug): logged, counted, survived
        self._keys = keys
        self._host = host
        self._port = port
        self._username = username
        self._password = password
        self._tls = tls
        self._window_s = window_s
        self._client_id = client_id or f"guardd-{account}"
        self._clock = clock
        self._reconnect = reconnect
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

    @property
    def refused(self) -> int:
        """Commands refused by this adapter since start (every one, junk included)."""
        return self._refusals.total

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
        verified = self.verify(topic, payload, retain=retain)
        if verified is None:
            return None
        command, target = verified
        return await self._carry_out(topic, command, target)

    def verify(
        self, topic: str, payload: bytes, *, retain: bool = False
    ) -> tuple[ControlCommand, str] | None:
        """Parse and authenticate a command message: (command, target), or None when it is not
        a command topic or the command is refused (audited here; a retained message always is).
        No await; the disk only for a verified command's nonce, or a refusal the guard journals."""
        route = self.topics.route(topic)
        if route is None:
            log.debug("mqtt_message_ignored", topic=topic)
            return None
        action, target = route
        data = _load(payload)
        try:
            if retain:
                raise ReplayError("a retained message on a command topic is never acted on")
            if data is _NOT_JSON:
                raise CommandError("payload is not JSON")
            signed = signed_command_from(data, topic_action=action)
            command = verify_signed_command(
                signed,
                target=target,
                keys=self._keys,
                nonces=self._nonces,
                now=self._clock(),
                window_s=self._window_s,
            )
        except CommandError as exc:
            self._refuse(topic, action, payload, exc, claimed=_claims(data))
            return None
        return command, target

    async def _carry_out(
        self, topic: str, command: ControlCommand, target: str
    ) -> CommandOutcome | None:
        action = command.action
        try:
            try:
                outcome = await self._handler.handle(command)
            finally:  # a kill's nonce, written once the kill is carried out (verify_signed_command)
                self._nonces.sync()
        except CommandError as exc:
            self._refuse(topic, action, b"", exc, command=command)
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

    def _refuse(
        self,
        topic: str,
        action: CommandKind,
        payload: bytes,
        error: CommandError,
        *,
        command: ControlCommand | None = None,
        claimed: dict[str, str] | None = None,
    ) -> None:
        """Audit a refused command (every one), and log and publish it when it is the first of
        its kind in the interval (the rest are summed in ``_flush_refusals``)."""
        if command is not None:  # verified, then refused (by the guard, or the queue was full)
            claimed = {"key_id": command.principal, "nonce": command.request_id}
            claimed["reason"] = command.reason
        elif claimed is None:
            claimed = _claims(_load(payload))
        where: dict[str, object] = {"topic": topic}
        if "reason" not in claimed and payload:  # what was sent, escaped, when it says no reason
            where["payload"] = payload[:_PAYLOAD_EXCERPT]
        record = refusal_record(
            channel="mqtt",
            principal=claimed.get("key_id"),
            action=action,
            reason=claimed.get("reason"),
            error=error,
            request_id=claimed.get("nonce", ""),
            **where,
        )
        try:
            self._handler.audit(record)
        except GuarddError as exc:  # the refusal stands even if the journal is failing
            log.error("refusal_not_journaled", error=str(exc), topic=topic)
        if not self._refusals.note(refusal_kind("mqtt", record["error"]), self._clock()):
            return
        log.warning(
            "command_refused",
            channel="mqtt",
            topic=topic,
            key_id=record["principal"],
            why=str(error),
        )
        self.publish_event(
            {
                "type": "command_refused",
                "action": action,
                "request_id": record["request_id"],
                "refused_because": str(error),
                "accepted": False,
            }
        )

    def _flush_refusals(self, *, force: bool = False) -> None:
        summary = self._refusals.flush(self._clock(), force=force)
        if summary is None:
            return
        log.warning("mqtt_refusals_aggregated", total=summary.total, counts=summary.counts)
        self.publish_event(
            {
                "type": "command_refusals_aggregated",
                "since": summary.since,
                "until": summary.until,
                "counts": summary.counts,
                "total": summary.total,
            }
        )

    # ------------------------------------------------------------------ the receive path

    def _screen(self, message: aiomqtt.Message) -> _Verified | None:
        """Called by the MQTT client for each message as it is read, before it is queued: a
        heartbeat is folded, a command verified (or refused); only a verified command is
        returned for the queue. Never raises: a bug here must not take the connection down."""
        topic = str(message.topic)
        try:
            bot = self.topics.heartbeat_of(topic)
            if bot is not None and self._on_heartbeat is not None:
                self._on_heartbeat(bot)  # liveness only: a bot's payload is not read
                return None
            if self.topics.route(topic) is None:
                self._dropped("not_a_command")
                return None
            payload = message.payload if isinstance(message.payload, bytes) else b""
            verified = self.verify(topic, payload, retain=message.retain)
            if verified is None:
                return None
            command, target = verified
            return _Verified(message, command, target)
        except Exception:
            self.crashes += 1
            log.exception("mqtt_message_crashed", topic=topic)
            return None

    def _queue_full(self, message: _Verified) -> None:
        self._dropped("queue_full")
        error = CommandError(
            f"{self._max_queued_commands} commands already wait for the guard; send it again"
        )
        self._refuse(
            str(message.topic), message.command.action, b"", error, command=message.command
        )

    def _dropped(self, why: str) -> None:
        if self._on_dropped is not None:
            self._on_dropped(why)

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
            queue_type=_command_queue(self._screen, self._queue_full),
            max_queued_incoming_messages=self._max_queued_commands,
            # Each acknowledgement goes out at once: with Nagle, a PUBACK waits for the broker's
            # delayed ACK of the previous one while the broker waits for it (its in-flight window
            # full), and every message behind it, a kill included, waits too.
            socket_options=((socket.IPPROTO_TCP, socket.TCP_NODELAY, 1),),
        )

    async def _connection_loop(self) -> None:
        backoff = Backoff(self._reconnect)
        while True:
            error = "connection ended"
            try:
                async with self._new_client() as client:
                    await client.subscribe(
                        [(self.topics.kill, 1), (self.topics.arm, 1), (self.topics.all_kill, 1)]
                    )
                    if self._on_heartbeat is not None:
                        await client.subscribe(self.topics.heartbeat + "+", qos=0)
                    self._client = client
                    backoff.reset()
                    log.info("mqtt_connected", host=self._host, port=self._port)
                    self._publish_status()
                    async for message in client.messages:
                        await self._handle_message(message)
            except aiomqtt.MqttError as exc:  # swallowed here only: reconnect, log and back off
                error = str(exc)
            finally:
                self._client = None
            delay = backoff.next()
            log.warning("mqtt_disconnected", error=error, retry_in_s=round(delay, 3))
            await asyncio.sleep(delay)

    async def _handle_message(self, message: aiomqtt.Message) -> None:
        """One verified command from the queue; a bug in carrying it out must not take the kill
        channel down with it."""
        if not isinstance(message, _Verified):  # only verified commands are ever queued
            return
        try:
            await self._carry_out(str(message.topic), message.command, message.target)
        except Exception:
            self.crashes += 1
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

    def _publish_status(self) -> None:
        """Publish the guard's status; a failure to build it is logged and counted, never the
        end of the MQTT control task (the kill channel)."""
        try:
            self.publish_state(self._handler.status())
        except Exception:
            self.crashes += 1
            log.exception("mqtt_status_failed")

    async def _state_loop(self) -> None:
        while True:
            await asyncio.sleep(self._state_interval_s)
            try:
                self._flush_refusals()
                status = dict(self._handler.status())
            except Exception:  # a bug here must not end the MQTT control task (the kill channel)
                self.crashes += 1
                log.exception("mqtt_state_loop_failed")
                continue
            if status != self._last_status:
                self.publish_state(status)
