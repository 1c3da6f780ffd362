"""The seam between the control plane and the guard: commands in, outcomes out.

HTTP, MQTT and ``guardctl`` turn what an operator sent into a ``ControlCommand`` and hand it to a
``CommandHandler`` (implemented by the app, which feeds the engine and journals the command). A
command the control plane refuses before it reaches ``handle`` (bad credential, bad signature,
replay, stale, malformed) is journaled through ``CommandHandler.audit`` with a ``refusal_record``.

The checks on the fields an operator types (reason, mode, force) live here so that every channel
applies the same rule: a reason is 1..500 characters, not blank, with no control characters (the
MQTT canonical form joins fields with newlines, so a newline inside a field must be impossible).
"""

from __future__ import annotations

import unicodedata
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final, Literal, Protocol, get_args

from guardd.core.engine import KillMode, kill_mode
from guardd.errors import CommandError, GuarddError

__all__ = [
    "CHANNELS",
    "MAX_REASON_CHARS",
    "Channel",
    "CommandHandler",
    "CommandKind",
    "CommandOutcome",
    "ControlCommand",
    "HttpRefusedError",
    "Role",
    "check_force",
    "check_mode",
    "check_reason",
    "command_from_body",
    "http_error_name",
    "refusal_record",
]

Role = Literal["read", "kill", "arm"]
"""What a credential allows (an HTTP token's role, in the config and the token store): read the
status, kill, re-arm."""
CommandKind = Literal["kill", "arm"]
"""What an operator asks for (the ``action`` of a command on every channel): not the engine's
actions (`guardd.core.engine.Action`), nor an order's side (`guardd.core.planner.Side`)."""
Channel = Literal["http", "mqtt", "cli"]

CHANNELS: Final[tuple[Channel, ...]] = get_args(Channel)
MAX_REASON_CHARS: Final = 500


@dataclass(frozen=True, slots=True)
class ControlCommand:
    """A kill or re-arm an operator asked for, already authenticated and checked."""

    action: CommandKind
    principal: str  # who: token name / MQTT key id / operator
    channel: Channel
    reason: str
    mode: KillMode | None = None  # kill only; None = the configured default
    force: bool = False  # arm only: re-arm although a kill-level breach still holds
    request_id: str = ""  # MQTT nonce or a generated id, for the journal
    person: str | None = None  # who is behind the credential (control.people), when named


@dataclass(frozen=True, slots=True)
class CommandOutcome:
    """What the guard did with a command.

    ``pending`` is for the two-person re-arm rule: the first of two arms is recorded but does not
    re-arm yet (``accepted`` is False, ``state`` still HALTED). HTTP answers it with 202.
    ``latch_durable`` False: the command was carried out (a kill's cancel and close went out), but
    the latch file could not be written and the guard is retrying; HTTP answers 500
    ``latch_not_durable``.
    """

    accepted: bool
    state: str  # engine state after the command: ARMED / WARNING / REDUCING / HALTED
    message: str
    decision_id: str | None = None
    pending: bool = False
    latch_durable: bool = True

    def as_json(self) -> dict[str, object]:
        """The outcome as a JSON-able mapping (what HTTP answers and MQTT publishes as an event)."""
        return {
            "accepted": self.accepted,
            "pending": self.pending,
            "state": self.state,
            "message": self.message,
            "decision_id": self.decision_id,
            "latch_durable": self.latch_durable,
        }

    def http_answer(
        self, *, action: str, principal: str, request_id: str
    ) -> tuple[int, dict[str, object]]:
        """The HTTP status and JSON body that answer this outcome (the API and the console):
        200 accepted, 202 pending, 409 refused; 500 ``latch_not_durable`` when carried out but
        the latch could not be written (a restart would not know it: the operator must see it)."""
        status = 200 if self.accepted else 202 if self.pending else 409
        extra: dict[str, object] = {}
        if not self.latch_durable:
            status, extra = 500, {"error": "latch_not_durable"}
        body = {
            **self.as_json(),
            **extra,
            "action": action,
            "principal": principal,
            "request_id": request_id,
        }
        return status, body


class HttpRefusedError(Exception):
    """A request the HTTP API or the console refuses with this HTTP status (caught where the
    answer is written; never raised out of the control plane)."""

    def __init__(self, status: int, error: GuarddError) -> None:
        super().__init__(str(error))
        self.status = status
        self.error = error


_HTTP_ERRORS: Final[Mapping[int, str]] = {
    400: "malformed",
    401: "unauthorized",
    403: "forbidden",
    408: "timeout",
    409: "refused",
    413: "too_large",
    415: "unsupported_media_type",
    422: "invalid",
}


def http_error_name(status: int) -> str:
    """The ``error`` word of an HTTP refusal (the API's and the console's) for its status."""
    return _HTTP_ERRORS.get(status, "error")


_FIELDS: Final[Mapping[CommandKind, frozenset[str]]] = {
    "kill": frozenset({"reason", "mode"}),
    "arm": frozenset({"reason", "force"}),
}
"""The JSON fields an HTTP kill or arm may carry (the API's and the console's)."""


def command_from_body(
    body: object, action: CommandKind, principal: str, request_id: str, *, person: str | None
) -> ControlCommand:
    """The HTTP command in a JSON `body` (the API's and the console's), or `HttpRefusedError`:
    400 when it is not an object, 422 for an unknown field or a bad value."""
    if not isinstance(body, dict):
        raise HttpRefusedError(400, CommandError("body must be a JSON object"))
    try:
        unknown = sorted(str(k) for k in body if k not in _FIELDS[action])
        if unknown:
            raise CommandError(f"unknown field(s) for {action}: {', '.join(unknown)}")
        return ControlCommand(
            action=action,
            principal=principal,
            channel="http",
            reason=check_reason(body.get("reason")),
            mode=check_mode(body.get("mode")),
            force=check_force(body.get("force")),
            request_id=request_id,
            person=person,
        )
    except CommandError as exc:
        raise HttpRefusedError(422, exc) from exc


class CommandHandler(Protocol):
    """The guard's side of the seam; the app implements it."""

    async def handle(self, command: ControlCommand) -> CommandOutcome:
        """Carry out (or refuse) a command and journal it; returns the resulting state."""
        ...

    def status(self) -> Mapping[str, object]:
        """The guard's status, JSON-able."""
        ...

    def ready(self) -> bool:
        """True once the latch is restored and the broker is synced."""
        ...

    def waiting_for(self) -> str | None:
        """What the guard waits for before it guards ("ib_connect", "ib_sync"); None when
        ready. Commands are served meanwhile: a kill is latched and carried out on sync."""
        ...

    def audit(self, record: Mapping[str, object]) -> None:
        """Journal a command the control plane refused (who, channel, what, why)."""
        ...


def check_reason(value: object) -> str:
    """The operator's reason, unchanged, or ``CommandError`` saying what is wrong with it."""
    if not isinstance(value, str):
        raise CommandError("reason must be a string")
    if not value.strip():
        raise CommandError("reason must not be empty")
    if len(value) > MAX_REASON_CHARS:
        raise CommandError(f"reason must be at most {MAX_REASON_CHARS} characters")
    if any(unicodedata.category(ch) in ("Cc", "Cs") for ch in value):
        raise CommandError("reason must not contain control characters or newlines")
    return value


def check_mode(value: object) -> KillMode | None:
    """A kill mode (``cancel`` / ``flatten``), None when absent, or ``CommandError``."""
    if value is None:
        return None
    mode = kill_mode(value)
    if mode is None:
        raise CommandError('mode must be "cancel" or "flatten"')
    return mode


def check_force(value: object) -> bool:
    """The arm ``force`` flag: a JSON boolean, False when absent, or ``CommandError``."""
    if value is None:
        return False
    if not isinstance(value, bool):
        raise CommandError("force must be true or false")
    return value


def refusal_record(
    *,
    channel: Channel,
    principal: str | None,
    action: str | None,
    reason: object,
    error: GuarddError,
    request_id: str = "",
    **where: object,
) -> dict[str, object]:
    """The audit record of a refused command: who, channel, what, why (and where it came from)."""
    shown_reason = reason[:MAX_REASON_CHARS] if isinstance(reason, str) else None
    return {
        "kind": "command_refused",
        "channel": channel,
        "principal": principal,
        "action": action,
        "reason": shown_reason,
        "refused_because": str(error),
        "error": type(error).__name__,
        "request_id": request_id,
        **where,
    }
