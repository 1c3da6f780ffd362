"""Who may send which command: bearer tokens, signed MQTT commands, replay window, two-person rule.

Pure: no sockets, no clock reads (``now`` is an argument), no logging. Reading credential files is
the only I/O, done once at start by the ``from_files`` constructors.

Roles
    ``read`` (status), ``kill``, ``arm`` (re-arm). A kill or arm credential may also read.

HTTP bearer tokens
    One token per file (e.g. systemd ``LoadCredential=`` under ``$CREDENTIALS_DIRECTORY``); the
    file's text, stripped of surrounding whitespace, is the token. Only its SHA-256 is kept, and a
    presented token's SHA-256 is compared with every known one by ``hmac.compare_digest``.

Signed MQTT commands
    ``sig`` is the lowercase hex HMAC-SHA256, keyed by the operator key's text (UTF-8), of the
    canonical form: these nine fields joined by a single ``\\n``, no trailing newline::

        guardd-v1
        <action>            kill | arm  (must match the topic)
        <target>            the account in the topic, or "all" for guardd/all/cmd/kill
        <reason>            exactly as sent (no newlines or control characters allowed)
        <mode>              cancel | flatten | empty when absent
        <force>             true | false
        <key_id>
        <ts>                integer epoch seconds, decimal
        <nonce>             8..64 of [A-Za-z0-9_-]

    so that ``printf 'guardd-v1\\nkill\\n%s\\n%s\\n%s\\nfalse\\n%s\\n%s\\n%s' ... |
    openssl dgst -sha256 -hmac "$KEY" -r`` reproduces it (docs/control.md has the full example).
    A command is refused when its key id is unknown, the signature is wrong, the key lacks the
    role, ``|now - ts| > window``, or its (key id, nonce) was seen within the window.

Two-person re-arm
    ``TwoPersonRule`` is a helper for the app: it applies it inside ``CommandHandler.handle``
    (one place for every channel, next to the journal), answering the first arm ``pending``.
"""

from __future__ import annotations

import hashlib
import heapq
import hmac
import json
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final, Literal, get_args

from guardd.control.commands import (
    Action,
    Channel,
    ControlCommand,
    KillMode,
    check_force,
    check_mode,
    check_reason,
)
from guardd.errors import AuthError, CommandError, ConfigError, ReplayError

__all__ = [
    "CANONICAL_VERSION",
    "MIN_SECRET_CHARS",
    "ROLES",
    "KeyStore",
    "NonceCache",
    "OperatorKey",
    "Principal",
    "Role",
    "SignedCommand",
    "TokenStore",
    "TwoPersonRule",
    "TwoPersonVerdict",
    "canonical_form",
    "parse_signed_command",
    "read_secret_file",
    "required_role",
    "sign",
    "signed_payload",
    "verify_signed_command",
]

Role = Literal["read", "kill", "arm"]
ROLES: Final[tuple[Role, ...]] = get_args(Role)
CANONICAL_VERSION: Final = "guardd-v1"
MIN_SECRET_CHARS: Final = 16

_KEY_ID = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_NONCE = re.compile(r"[A-Za-z0-9_-]{8,64}")
_SIG = re.compile(r"[0-9a-fA-F]{64}")
_SECRET = re.compile(r"[!-~]+")  # printable ASCII, no spaces: survives `-hmac "$KEY"` intact
_PAYLOAD_FIELDS: Final = frozenset(
    {"action", "reason", "mode", "force", "key_id", "ts", "nonce", "sig"}
)


def required_role(action: Action) -> Role:
    """The role a command needs: ``kill`` for kill, ``arm`` for a re-arm."""
    return "kill" if action == "kill" else "arm"


@dataclass(frozen=True, slots=True)
class Principal:
    """An authenticated caller: a token's or an operator key's name and its roles."""

    name: str
    roles: frozenset[Role]

    def may(self, role: Role) -> bool:
        """True when this principal holds ``role`` (kill and arm imply read)."""
        return role in self.roles or (role == "read" and bool(self.roles & {"kill", "arm"}))

    def require(self, role: Role) -> None:
        """Raise ``AuthError`` unless this principal holds ``role``."""
        if not self.may(role):
            held = ",".join(sorted(self.roles)) or "none"
            raise AuthError(f"{self.name} lacks the {role} role (holds {held})")


def read_secret_file(path: Path, *, what: str) -> str:
    """A token or key from a file: its text without surrounding whitespace; ``ConfigError`` if bad.

    ``what`` names the config key (or the credential) in the error message.
    """
    try:
        text = path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(what, f"cannot read {path}: {exc}") from exc
    if len(text) < MIN_SECRET_CHARS or not _SECRET.fullmatch(text):
        raise ConfigError(
            what,
            f"{path} must hold one secret of at least {MIN_SECRET_CHARS} printable ASCII "
            "characters without spaces",
        )
    return text


def _sha256(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8")).digest()


@dataclass(frozen=True, slots=True)
class _TokenEntry:
    digest: bytes
    principal: Principal


@dataclass(frozen=True, slots=True)
class TokenStore:
    """Bearer tokens kept only as SHA-256 digests, each with a principal and its roles."""

    entries: tuple[_TokenEntry, ...]

    @classmethod
    def from_tokens(cls, tokens: Mapping[str, tuple[str, Iterable[Role]]]) -> TokenStore:
        """From ``{principal name: (token, roles)}``; the tokens themselves are not kept."""
        entries: list[_TokenEntry] = []
        seen: dict[bytes, str] = {}
        for name, (token, roles) in tokens.items():
            digest = _sha256(token)
            if digest in seen:
                raise ConfigError(name, f"uses the same token as {seen[digest]}")
            seen[digest] = name
            entries.append(_TokenEntry(digest, Principal(name, frozenset(roles))))
        return cls(tuple(entries))

    @classmethod
    def from_files(cls, files: Mapping[str, tuple[Path, Iterable[Role]]]) -> TokenStore:
        """From ``{principal name: (token file, roles)}``; one token per file."""
        return cls.from_tokens(
            {
                name: (read_secret_file(path, what=name), roles)
                for name, (path, roles) in files.items()
            }
        )

    @classmethod
    def from_role_files(
        cls, *, read: Path | None = None, kill: Path | None = None, arm: Path | None = None
    ) -> TokenStore:
        """From one file per role, as in ``control.http.token_files``; the principal is the
        file's name (e.g. the systemd credential name). A role without a file is refused."""
        by_role: tuple[tuple[Role, Path | None], ...] = (
            ("read", read),
            ("kill", kill),
            ("arm", arm),
        )
        tokens: dict[str, tuple[str, Iterable[Role]]] = {}
        for role, path in by_role:
            if path is not None:
                what = f"control.http.token_files.{role}"
                tokens[f"{role}:{path.name}"] = (read_secret_file(path, what=what), (role,))
        return cls.from_tokens(tokens)

    def authenticate(self, token: str | None) -> Principal:
        """The principal holding ``token``, or ``AuthError`` (no early exit on a match)."""
        if not token:
            raise AuthError("no bearer token")
        digest = _sha256(token)
        found: Principal | None = None
        for entry in self.entries:
            if hmac.compare_digest(entry.digest, digest):
                found = entry.principal
        if found is None:
            raise AuthError("unknown bearer token")
        return found


@dataclass(frozen=True, slots=True)
class OperatorKey:
    """An operator's HMAC key for signed MQTT commands."""

    key_id: str
    secret: bytes = field(repr=False)
    roles: frozenset[Role]


@dataclass(frozen=True, slots=True)
class KeyStore:
    """Operator keys by key id."""

    keys: Mapping[str, OperatorKey]

    @classmethod
    def from_secrets(cls, secrets: Mapping[str, tuple[str, Iterable[Role]]]) -> KeyStore:
        """From ``{key id: (secret text, roles)}``."""
        keys: dict[str, OperatorKey] = {}
        for key_id, (secret, roles) in secrets.items():
            if not _KEY_ID.fullmatch(key_id):
                raise ConfigError(key_id, "key id must be 1..64 of [A-Za-z0-9_.-]")
            keys[key_id] = OperatorKey(key_id, secret.encode("utf-8"), frozenset(roles))
        return cls(keys)

    @classmethod
    def from_files(
        cls,
        files: Mapping[str, Path],
        *,
        roles: Mapping[str, Iterable[Role]] | None = None,
        default_roles: Iterable[Role] = ("kill",),
    ) -> KeyStore:
        """From ``control.mqtt.operator_key_files`` (key id -> file); each key gets its entry in
        ``roles`` or else ``default_roles`` (kill only: a re-arm needs a key granted ``arm``)."""
        granted = roles or {}
        secrets: dict[str, tuple[str, Iterable[Role]]] = {}
        for key_id, path in files.items():
            what = f"control.mqtt.operator_key_files.{key_id}"
            secret = read_secret_file(path, what=what)
            secrets[key_id] = (secret, granted.get(key_id, default_roles))
        return cls.from_secrets(secrets)

    def get(self, key_id: str) -> OperatorKey:
        """The key with this id, or ``AuthError``."""
        key = self.keys.get(key_id)
        if key is None:
            raise AuthError(f"unknown key id {key_id!r}")
        return key


def canonical_form(
    *,
    action: str,
    target: str,
    reason: str,
    mode: str | None,
    force: bool,
    key_id: str,
    ts: int,
    nonce: str,
) -> bytes:
    """The bytes an MQTT command's signature covers (see the module docstring)."""
    fields = (
        CANONICAL_VERSION,
        action,
        target,
        reason,
        mode or "",
        "true" if force else "false",
        key_id,
        str(ts),
        nonce,
    )
    return "\n".join(fields).encode("utf-8")


def sign(secret: bytes, canonical: bytes) -> str:
    """Lowercase hex HMAC-SHA256 of ``canonical`` under ``secret``."""
    return hmac.new(secret, canonical, hashlib.sha256).hexdigest()


@dataclass(frozen=True, slots=True)
class SignedCommand:
    """An MQTT command payload that parsed; not yet authenticated."""

    action: Action
    reason: str
    mode: KillMode | None
    force: bool
    key_id: str
    ts: int
    nonce: str
    sig: str

    def canonical(self, target: str) -> bytes:
        """The canonical form of this command for ``target`` (account or "all")."""
        return canonical_form(
            action=self.action,
            target=target,
            reason=self.reason,
            mode=self.mode,
            force=self.force,
            key_id=self.key_id,
            ts=self.ts,
            nonce=self.nonce,
        )


def signed_payload(
    *,
    action: Action,
    target: str,
    reason: str,
    key_id: str,
    secret: bytes,
    ts: int,
    nonce: str,
    mode: KillMode | None = None,
    force: bool = False,
) -> dict[str, object]:
    """A signed command payload ready to publish as JSON (what ``guardctl`` sends)."""
    canonical = canonical_form(
        action=action,
        target=target,
        reason=reason,
        mode=mode,
        force=force,
        key_id=key_id,
        ts=ts,
        nonce=nonce,
    )
    payload: dict[str, object] = {"action": action, "reason": reason}
    if mode is not None:
        payload["mode"] = mode
    if force:
        payload["force"] = True
    payload.update(key_id=key_id, ts=ts, nonce=nonce, sig=sign(secret, canonical))
    return payload


def parse_signed_command(payload: bytes, *, topic_action: Action) -> SignedCommand:
    """Parse and check an MQTT command payload's shape; ``CommandError`` says what is wrong."""
    try:
        data = json.loads(payload)
    except (ValueError, RecursionError) as exc:  # RecursionError: deeply nested arrays
        raise CommandError("payload is not JSON") from exc
    if not isinstance(data, dict):
        raise CommandError("payload must be a JSON object")
    unknown = sorted(str(k) for k in data if k not in _PAYLOAD_FIELDS)
    if unknown:
        raise CommandError(f"unknown field(s): {', '.join(unknown)}")
    missing = [k for k in ("action", "reason", "key_id", "ts", "nonce", "sig") if k not in data]
    if missing:
        raise CommandError(f"missing field(s): {', '.join(missing)}")
    if data["action"] != topic_action:
        raise CommandError(f"action must be {topic_action!r} on this topic")
    reason = check_reason(data["reason"])
    mode = check_mode(data.get("mode"))
    force = check_force(data.get("force"))
    if topic_action == "arm" and mode is not None:
        raise CommandError("mode applies to kill only")
    if topic_action == "kill" and force:
        raise CommandError("force applies to arm only")
    key_id, ts, nonce, sig = data["key_id"], data["ts"], data["nonce"], data["sig"]
    if not isinstance(key_id, str) or not _KEY_ID.fullmatch(key_id):
        raise CommandError("key_id must be 1..64 of [A-Za-z0-9_.-]")
    if isinstance(ts, bool) or not isinstance(ts, int) or ts < 0:
        raise CommandError("ts must be an integer number of epoch seconds")
    if not isinstance(nonce, str) or not _NONCE.fullmatch(nonce):
        raise CommandError("nonce must be 8..64 of [A-Za-z0-9_-]")
    if not isinstance(sig, str) or not _SIG.fullmatch(sig):
        raise CommandError("sig must be 64 hex digits")
    return SignedCommand(topic_action, reason, mode, force, key_id, ts, nonce, sig.lower())


@dataclass(slots=True)
class NonceCache:
    """Nonces seen within the replay window, bounded; entries expire once their command would be
    stale anyway. Full of live entries, it refuses (fail closed) rather than forget one."""

    window_s: float
    max_entries: int = 10_000
    _expiry: dict[tuple[str, str], float] = field(default_factory=dict)
    _heap: list[tuple[float, tuple[str, str]]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self._expiry)

    def _prune(self, now: float) -> None:
        while self._heap and self._heap[0][0] < now:
            expires, key = heapq.heappop(self._heap)
            if self._expiry.get(key) == expires:
                del self._expiry[key]

    def remember(self, key_id: str, nonce: str, *, ts: float, now: float) -> None:
        """Record a nonce, or ``ReplayError`` if it was seen within the window or the cache is
        full."""
        self._prune(now)
        key = (key_id, nonce)
        if key in self._expiry:
            raise ReplayError(f"nonce {nonce!r} already used within {self.window_s:g} s")
        if len(self._expiry) >= self.max_entries:
            raise ReplayError("too many commands within the replay window")
        expires = max(ts, now) + self.window_s
        self._expiry[key] = expires
        heapq.heappush(self._heap, (expires, key))


def verify_signed_command(
    command: SignedCommand,
    *,
    target: str,
    keys: KeyStore,
    nonces: NonceCache,
    now: float,
    window_s: float,
    channel: Channel = "mqtt",
) -> ControlCommand:
    """Authenticate a parsed command: key, signature, role, timestamp window, then nonce (only a
    command that passed every other check uses up its nonce)."""
    key = keys.get(command.key_id)
    expected = sign(key.secret, command.canonical(target))
    if not hmac.compare_digest(expected, command.sig):
        raise AuthError(f"bad signature for key id {command.key_id!r}")
    Principal(key.key_id, key.roles).require(required_role(command.action))
    try:
        skew = float(now - command.ts)
    except OverflowError:  # an integer ts beyond float range (ts >= 0: far in the future)
        skew = -math.inf
    if abs(skew) > window_s:
        raise ReplayError(
            f"timestamp {command.ts} is {skew:+.0f} s from now (window {window_s:g} s)"
        )
    nonces.remember(command.key_id, command.nonce, ts=command.ts, now=now)
    return ControlCommand(
        action=command.action,
        principal=command.key_id,
        channel=channel,
        reason=command.reason,
        mode=command.mode,
        force=command.force,
        request_id=command.nonce,
    )


@dataclass(frozen=True, slots=True)
class TwoPersonVerdict:
    """The two-person rule's answer to an arm: ``confirmed`` re-arms; otherwise it is pending."""

    confirmed: bool
    first: str  # the principal whose arm opened the pending request
    message: str


@dataclass(slots=True)
class TwoPersonRule:
    """Re-arm needs two different principals within ``window_s``.

    The first arm from A is recorded as pending; an arm from a different principal B within the
    window confirms it. A second arm from A only refreshes A's request; an expired request is
    replaced. ``clear()`` drops a pending request (e.g. on a new kill). The app applies this in
    ``CommandHandler.handle``, so HTTP and MQTT arms count together.
    """

    window_s: float
    _pending: tuple[str, float] | None = None

    @property
    def pending(self) -> str | None:
        """The principal whose arm is waiting for a second person, if any (unexpired or not)."""
        return self._pending[0] if self._pending else None

    def offer(self, principal: str, *, now: float) -> TwoPersonVerdict:
        """Record an arm from ``principal`` at ``now`` and say whether it completes the pair."""
        if self._pending is not None:
            first, since = self._pending
            if now - since <= self.window_s and first != principal:
                self._pending = None
                message = f"re-arm confirmed by {principal} after {first}"
                return TwoPersonVerdict(True, first, message)
        self._pending = (principal, now)
        return TwoPersonVerdict(
            False,
            principal,
            f"re-arm pending: a second operator must confirm within {self.window_s:g} s",
        )

    def clear(self) -> None:
        """Forget a pending re-arm."""
        self._pending = None
