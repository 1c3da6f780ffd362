"""``guardctl``: kill, re-arm and status of a guardd, over HTTP or signed MQTT.

::

    guardctl kill   --reason "runaway bot" [--mode cancel|flatten] [--via http|mqtt] ...
    guardctl arm    --reason "all clear"   [--force]                [--via http|mqtt] ...
    guardctl status                                                 [--via http|mqtt] ...
    guardctl completion bash|zsh|tcsh          # a shell completion script on stdout
    guardctl --version

``status`` prints a short human-readable summary; ``--json`` (on every command) prints the
guard's answer as one JSON document on stdout instead, whatever the exit code (an error of
guardctl's own is ``{"error": "..."}``).

Credentials never go on the command line: the HTTP bearer token comes from ``--token-file`` or
``$GUARDD_TOKEN``; the MQTT operator key from ``--key-file`` or ``$GUARDD_KEY`` (with
``--key-id``); the MQTT broker password from ``--mqtt-password-file`` or ``$GUARDD_MQTT_PASSWORD``.

Exit codes: 0 accepted (or status read), 1 refused (by the guard or for a credential; status:
the guard is offline), 2 bad usage or a credential that cannot be read, 3 re-arm pending a second
operator, 4 guardd (or the broker) did not answer, 5 carried out but the latch is not durable
(the kill went out; the guard could not write its latch file and is retrying: see its status).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import ssl
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Final

import aiohttp
import aiomqtt

from guardd import __version__
from guardd.completion import add_completion_command, complete_files, script
from guardd.control.auth import read_secret_file, signed_payload
from guardd.control.commands import CommandKind, check_reason
from guardd.core.engine import KILL_MODES, KillMode
from guardd.errors import CommandError, ConfigError

__all__ = [
    "EXIT_NOT_DURABLE",
    "EXIT_NO_ANSWER",
    "EXIT_PENDING",
    "EXIT_REFUSED",
    "EXIT_USAGE",
    "main",
]

EXIT_OK: Final = 0
EXIT_REFUSED: Final = 1
EXIT_USAGE: Final = 2
EXIT_PENDING: Final = 3
EXIT_NO_ANSWER: Final = 4
EXIT_NOT_DURABLE: Final = 5


@dataclass(frozen=True, slots=True)
class _Answer:
    """What guardctl prints and exits with; ``data`` is what ``--json`` prints instead."""

    code: int
    text: str
    data: object = None


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--via", choices=("http", "mqtt"), default="http")
    common.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for guardd")
    common.add_argument(
        "--json", action="store_true", help="print the guard's answer as JSON on stdout"
    )
    http = common.add_argument_group("HTTP")
    http.add_argument("--url", default=os.environ.get("GUARDD_URL", "http://127.0.0.1:8787"))
    complete_files(
        http.add_argument("--token-file", type=Path, help="bearer token file (else $GUARDD_TOKEN)")
    )
    complete_files(
        http.add_argument("--cafile", type=Path, help="CA bundle to verify an https guardd")
    )
    mqtt = common.add_argument_group("MQTT")
    mqtt.add_argument("--mqtt-host", default="127.0.0.1")
    mqtt.add_argument("--mqtt-port", type=int, default=1883)
    mqtt.add_argument("--mqtt-username")
    complete_files(
        mqtt.add_argument("--mqtt-password-file", type=Path, help="else $GUARDD_MQTT_PASSWORD")
    )
    mqtt.add_argument("--mqtt-tls", action="store_true")
    complete_files(mqtt.add_argument("--mqtt-ca-file", type=Path))
    mqtt.add_argument("--topic-prefix", default="guardd")
    mqtt.add_argument("--account", help='the guarded account; "all" for a fleet-wide kill')
    mqtt.add_argument("--key-id", help="your operator key id")
    complete_files(
        mqtt.add_argument("--key-file", type=Path, help="your operator key file (else $GUARDD_KEY)")
    )

    parser = argparse.ArgumentParser(
        prog="guardctl", description="Kill, re-arm or read the status of a guardd."
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    kill = commands.add_parser("kill", parents=[common], help="halt: cancel all orders")
    kill.add_argument("--reason", required=True)
    kill.add_argument("--mode", choices=KILL_MODES, help="default: the guard's configured mode")
    arm = commands.add_parser("arm", parents=[common], help="re-arm a halted guard")
    arm.add_argument("--reason", required=True)
    arm.add_argument("--force", action="store_true", help="although a kill breach still holds")
    commands.add_parser("status", parents=[common], help="print the guard's status")
    add_completion_command(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run guardctl; returns the exit code (see the module docstring)."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command == "completion":
        print(script(parser, args.shell), end="")
        return EXIT_OK
    try:
        if args.command != "status":
            check_reason(args.reason)
        answer = asyncio.run(_http(args) if args.via == "http" else _mqtt(args))
    except (CommandError, ConfigError) as exc:
        answer = _Answer(EXIT_USAGE, f"guardctl: {exc}")
    if args.json:
        data = answer.data if answer.data is not None else {"error": answer.text}
        print(json.dumps(data, indent=2, sort_keys=True))
        return answer.code
    stream = sys.stdout if answer.code == EXIT_OK else sys.stderr
    print(answer.text, file=stream)
    return answer.code


def _secret(path: Path | None, env: str, what: str) -> str:
    if path is not None:
        return read_secret_file(path, what=what)
    value = os.environ.get(env, "").strip()
    if not value:
        raise ConfigError(what, f"give a file or set ${env}")
    return value


# ---------------------------------------------------------------------------------- HTTP


async def _http(args: argparse.Namespace) -> _Answer:
    token = _secret(args.token_file, "GUARDD_TOKEN", "--token-file")
    tls: ssl.SSLContext | bool = (
        ssl.create_default_context(cafile=str(args.cafile)) if args.cafile else True
    )
    headers = {"Authorization": f"Bearer {token}"}
    url = args.url.rstrip("/")
    try:
        async with aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=args.timeout)
        ) as session:
            if args.command == "status":
                request = session.get(f"{url}/v1/status", headers=headers, ssl=tls)
            else:
                body: dict[str, object] = {"reason": args.reason}
                if args.command == "kill" and args.mode:
                    body["mode"] = args.mode
                if args.command == "arm" and args.force:
                    body["force"] = True
                request = session.post(
                    f"{url}/v1/{args.command}", json=body, headers=headers, ssl=tls
                )
            async with request as resp:
                text = await resp.text()
                status = resp.status
    except (aiohttp.ClientError, TimeoutError, OSError) as exc:
        return _Answer(
            EXIT_NO_ANSWER, f"guardctl: no answer from {url}: {exc or type(exc).__name__}"
        )
    try:
        data = json.loads(text)
    except ValueError:
        data = {"message": text.strip()}
    if not isinstance(data, dict):
        data = {"message": text.strip()}
    if args.command == "status":
        if status == 200:
            return _Answer(EXIT_OK, describe_status(data), data)
        return _Answer(
            EXIT_REFUSED,
            f"guardctl: status refused ({status}): {data.get('message')}",
            {"http_status": status, **data},
        )
    return _outcome(status, data)


def _outcome(status: int, data: dict[str, object]) -> _Answer:
    message = data.get("message", "")
    shown = {"http_status": status, **data}
    if data.get("accepted") is True and data.get("latch_durable") is False:
        return _Answer(
            EXIT_NOT_DURABLE,
            f"guardctl: carried out: state {data.get('state')}: {message}",
            shown,
        )
    if status == 200 and data.get("accepted") is True:
        return _Answer(EXIT_OK, f"accepted: state {data.get('state')}: {message}", shown)
    if status == 202 or data.get("pending") is True:
        return _Answer(
            EXIT_PENDING, f"guardctl: pending: state {data.get('state')}: {message}", shown
        )
    return _Answer(EXIT_REFUSED, f"guardctl: refused ({status}): {message}", shown)


# ---------------------------------------------------------------------------------- status


def describe_status(status: dict[str, object]) -> str:
    """The guard's status (``GET /v1/status`` or the retained MQTT state) for a person: the
    state and why first, then IB, the latch, the book, a close in progress and the findings.
    Keys the guard did not send are left out; ``--json`` shows everything."""
    lines = [_headline(status)]
    if "ib_connected" in status:
        ib = "connected" if status.get("ib_connected") else "DISCONNECTED"
        if status.get("ib_connected") and not status.get("synced", True):
            ib += ", syncing"
        if status.get("ib_read_only"):
            ib += ", READ-ONLY API (orders and cancels refused)"
        elif status.get("can_act") is False:
            ib += ", cannot act"
        if status.get("waiting_for"):
            ib += f", waiting for {status['waiting_for']}"
        lines.append(f"  IB         {ib}")
    if status.get("latch_durable") is False:
        lines.append(f"  latch      NOT DURABLE: {status.get('latch_error')} (retrying)")
    if status.get("journal_rotation_error"):
        lines.append(f"  journal    CANNOT ROTATE: {status['journal_rotation_error']} (retrying)")
    if "positions" in status or "working_orders" in status:
        book = f"{status.get('positions')} positions, {status.get('working_orders')} working orders"
        nl = status.get("net_liquidation")
        if isinstance(nl, int | float):
            book += f", net liquidation {nl:,.2f} {status.get('base_currency') or ''}".rstrip()
        missing = status.get("missing_exchange_rates")
        if isinstance(missing, list) and missing:
            book += f", NO EXCHANGE RATE for {', '.join(map(str, missing))}"
        lines.append(f"  book       {book}")
    close = status.get("close")
    if isinstance(close, dict):
        progress = "at target" if close.get("at_target") else "in progress"
        if close.get("overdue"):
            progress += ", OVERDUE"
        lines.append(
            f"  close      {close.get('kind')} {progress} "
            f"(round {close.get('round')}, {close.get('children')} closing orders)"
        )
    findings = status.get("findings")
    if isinstance(findings, dict):
        for name, finding in sorted(findings.items()):
            if isinstance(finding, dict):
                lines.append(f"  {finding.get('level')!s:<10} {name}: {finding.get('message')}")
    if status.get("dry_run"):
        lines.append("  dry run: decisions are journaled, nothing is sent")
    return "\n".join(lines)


def _headline(status: dict[str, object]) -> str:
    account = status.get("account")
    head = f"{account}: {status.get('state')}" if account else f"{status.get('state')}"
    if status.get("online") is False:
        head += " (guardd OFFLINE; last state)"
    latch = status.get("latch")
    if isinstance(latch, dict):
        since = latch.get("since")
        when = f" since {_time(since)}" if isinstance(since, int | float) and since > 0 else ""
        by = f" by {latch.get('principal')}" if latch.get("principal") else ""
        head += (
            f"{when}: {latch.get('source')}{by}: {latch.get('reason')} (mode {latch.get('mode')})"
        )
    return head


def _time(epoch: float) -> str:
    stamp = datetime.fromtimestamp(epoch, tz=UTC)
    return stamp.isoformat(timespec="seconds").replace("+00:00", "Z")


# ---------------------------------------------------------------------------------- MQTT


def _mqtt_client(args: argparse.Namespace) -> aiomqtt.Client:
    password = None
    if args.mqtt_username is not None and (
        args.mqtt_password_file is not None or os.environ.get("GUARDD_MQTT_PASSWORD")
    ):
        password = _secret_text(args.mqtt_password_file, "GUARDD_MQTT_PASSWORD")
    tls = None
    if args.mqtt_tls or args.mqtt_ca_file:
        tls = ssl.create_default_context(
            cafile=str(args.mqtt_ca_file) if args.mqtt_ca_file else None
        )
    return aiomqtt.Client(
        args.mqtt_host,
        args.mqtt_port,
        username=args.mqtt_username,
        password=password,
        identifier=f"guardctl-{secrets.token_hex(6)}",
        tls_context=tls,
        timeout=args.timeout,
    )


def _secret_text(path: Path | None, env: str) -> str:
    if path is None:
        return os.environ.get(env, "").strip()
    try:
        return path.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise ConfigError("--mqtt-password-file", f"cannot read {path}: {exc}") from exc


async def _mqtt(args: argparse.Namespace) -> _Answer:
    if not args.account:
        raise ConfigError("--account", "is required with --via mqtt")
    prefix = args.topic_prefix
    try:
        if args.command == "status":
            return await _mqtt_status(args, f"{prefix}/{args.account}/state")
        return await _mqtt_command(args)
    except aiomqtt.MqttError as exc:
        host = f"{args.mqtt_host}:{args.mqtt_port}"
        return _Answer(EXIT_NO_ANSWER, f"guardctl: MQTT broker {host}: {exc}")


async def _mqtt_status(args: argparse.Namespace, topic: str) -> _Answer:
    if args.account == "all":
        raise ConfigError("--account", 'status needs one account, not "all"')
    async with _mqtt_client(args) as client:
        await client.subscribe(topic, qos=1)
        try:
            async with asyncio.timeout(args.timeout):
                message = await anext(aiter(client.messages))
        except TimeoutError:
            return _Answer(EXIT_NO_ANSWER, f"guardctl: no state on {topic} (never published?)")
    text = message.payload.decode("utf-8", errors="replace")
    try:
        state = json.loads(text)
    except ValueError:
        return _Answer(EXIT_REFUSED, f"guardctl: unreadable state on {topic}: {text[:200]}")
    if not isinstance(state, dict):
        return _Answer(EXIT_REFUSED, f"guardctl: unreadable state on {topic}: {text[:200]}")
    shown = describe_status(state)
    if state.get("online") is False:
        return _Answer(EXIT_REFUSED, f"guardctl: guardd is offline; last state:\n{shown}", state)
    return _Answer(EXIT_OK, shown, state)


async def _mqtt_command(args: argparse.Namespace) -> _Answer:
    if not args.key_id:
        raise ConfigError("--key-id", "is required with --via mqtt")
    if args.account == "all" and args.command != "kill":
        raise ConfigError("--account", '"all" is for a fleet-wide kill only')
    key = _secret(args.key_file, "GUARDD_KEY", "--key-file")
    action: CommandKind = "kill" if args.command == "kill" else "arm"
    mode: KillMode | None = args.mode if action == "kill" else None
    nonce = secrets.token_hex(16)
    command = signed_payload(
        action=action,
        target=args.account,
        reason=args.reason,
        key_id=args.key_id,
        secret=key.encode("utf-8"),
        ts=int(time.time()),
        nonce=nonce,
        mode=mode,
        force=bool(getattr(args, "force", False)),
    )
    prefix, fleet = args.topic_prefix, args.account == "all"
    events = f"{prefix}/+/events" if fleet else f"{prefix}/{args.account}/events"
    async with _mqtt_client(args) as client:
        await client.subscribe(events, qos=1)
        topic = f"{prefix}/{args.account}/cmd/{action}"
        await client.publish(topic, json.dumps(command), qos=1)
        answers = await _answers(client, nonce, args.timeout, fleet)
    if not answers:
        return _Answer(
            EXIT_NO_ANSWER,
            f"guardctl: published on {topic} but no guardd answered within {args.timeout:g} s; "
            "check status",
        )
    if fleet:
        accepted = [a for a in answers if a[1].get("accepted") is True]
        lines = [f"{account}: {_describe(event)}" for account, event in answers]
        code = EXIT_OK if len(accepted) == len(answers) else EXIT_REFUSED
        return _Answer(code, "\n".join(lines), dict(answers))
    event = answers[0][1]
    if event.get("accepted") is True and event.get("latch_durable") is False:
        return _Answer(EXIT_NOT_DURABLE, f"guardctl: carried out: {_describe(event)}", event)
    if event.get("accepted") is True:
        return _Answer(EXIT_OK, f"accepted: {_describe(event)}", event)
    if event.get("pending") is True:
        return _Answer(EXIT_PENDING, f"guardctl: pending: {_describe(event)}", event)
    return _Answer(EXIT_REFUSED, f"guardctl: refused: {_describe(event)}", event)


def _describe(event: dict[str, object]) -> str:
    if event.get("type") == "command_refused":
        return str(event.get("refused_because"))
    return f"state {event.get('state')}: {event.get('message')}"


async def _answers(
    client: aiomqtt.Client, nonce: str, timeout: float, fleet: bool
) -> list[tuple[str, dict[str, object]]]:
    """Events answering our nonce: the first one, or (fleet-wide) all within the timeout."""
    found: list[tuple[str, dict[str, object]]] = []
    try:
        async with asyncio.timeout(timeout):
            async for message in client.messages:
                try:
                    event = json.loads(message.payload)
                except ValueError:
                    continue
                if isinstance(event, dict) and event.get("request_id") == nonce:
                    found.append((str(message.topic).split("/")[-2], event))
                    if not fleet:
                        return found
    except TimeoutError:
        pass
    return found
