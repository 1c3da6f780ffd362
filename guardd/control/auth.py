"""Who may send which command: bearer tokens, signed MQTT commands, replay window, two-person rule.

Pure: no sockets, no clock reads (``now`` is an argument), no logging. Reading credential files is
the only I/O, done once at start by the ``from_files`` constructors. The durable record of used
nonces is ``guardd.control.nonces.NonceStore`` (a ``NonceBook``); ``NonceCache`` is in memory.

Credential files
    A secret file open to group or others (mode bits 0o077, or a POSIX ACL entry for anyone but
    its owner and guardd's own user: ``secret_exposure``) is a ``ConfigError`` naming its key,
    unless ``allow_insecure_permissions`` (the config's ``control.allow_insecure_permissions``).
    One secret serves one purpose: two roles' token files with the same token, two key ids with
    the same key, and a key, token or the MQTT broker password equal to another are config
    errors (``check_secrets_distinct``).

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

People
    A credential may name its person (``control.people``): ``Principal.person`` and
    ``OperatorKey.person``, carried to ``ControlCommand.person``.

Two-person re-arm
    ``TwoPersonRule`` is a helper for the app: it applies it inside ``CommandHandler.handle``
    (one place for every channel, next to the journal), answering the first arm ``pending``. It
    counts people: two arms from one person's two credentials are one person.
"""

from __future__ import annotations

import errno
import hashlib
import heapq
import hmac
import json
import math
import os
import re
import stat
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final, Protocol

from guardd.control.commands import (
    Channel,
    CommandKind,
    ControlCommand,
    Role,
    check_force,
    check_mode,
    check_reason,
)
from guardd.core.engine import KillMode
from guardd.errors import AuthError, CommandError, ConfigError, NonceNotDurableError, ReplayError

__all__ = [
    "CANONICAL_VERSION",
    "MIN_SECRET_CHARS",
    "KeyStore",
    "NonceBook",
    "NonceCache",
    "OperatorKey",
    "Principal",
    "SignedCommand",
    "TokenStore",
    "TwoPersonRule",
    "TwoPersonVerdict",
    "canonical_form",
    "check_secrets_distinct",
    "parse_signed_command",
    "read_secret_file",
    "required_role",
    "secret_exposure",
    "sign",
    "signed_command_from",
    "signed_payload",
    "verify_signed_command",
]

CANONICAL_VERSION: Final = "guardd-v1"
MIN_SECRET_CHARS: Final = 16

_KEY_ID = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_NONCE = re.compile(r"[A-Za-z0-9_-]{8,64}")
_SIG = re.compile(r"[0-9a-fA-F]{64}")
_SECRET = re.compile(r"[!-~]+")  # printable ASCII, no spaces: survives `-hmac "$KEY"` intact
_PAYLOAD_FIELDS: Final = frozenset(
    {"action", "reason", "mode", "force", "key_id", "ts", "nonce", "sig"}
)


def required_role(action: CommandKind) -> Role:
    """The role a command needs: ``kill`` for kill, ``arm`` for a re-arm."""
    return "kill" if action == "kill" else "arm"


@dataclass(frozen=True, slots=True)
class Principal:
    """An authenticated caller: a token's or an operator key's name, its roles, and the person
    it belongs to (``control.people``), when named."""

    name: str
    roles: frozenset[Role]
    person: str | None = None

    def may(self, role: Role) -> bool:
        """True when this principal holds ``role`` (kill and arm imply read)."""
        return role in self.roles or (role == "read" and bool(self.roles & {"kill", "arm"}))

    def require(self, role: Role) -> None:
        """Raise ``AuthError`` unless this principal holds ``role``."""
        if not self.may(role):
            held = ",".join(sorted(self.roles)) or "none"
            raise AuthError(f"{self.name} lacks the {role} role (holds {held})")


def read_secret_file(path: Path, *, what: str, allow_insecure_permissions: bool = False) -> str:
    """A token or key from a file: its text without surrounding whitespace; ``ConfigError`` if bad.

    ``what`` names the config key (or the credential) in the error message. A regular file that
    anyone but its owner and guardd's own user may read, write or execute (``secret_exposure``)
    is refused unless ``allow_insecure_permissions``: a secret others can read is no secret.
    """
    try:
        with path.open("rb") as handle:
            # the file read, not a name swapped later
            exposed = secret_exposure(handle.fileno())
            raw = handle.read()
        text = raw.decode("utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(what, f"cannot read {path}: {exc}") from exc
    if exposed is not None and not allow_insecure_permissions:
        raise ConfigError(
            what,
            f"{path} is open to {exposed}: make it 0600 (chmod 600 {path}), readable by "
            "guardd's user only",
        )
    if len(text) < MIN_SECRET_CHARS or not _SECRET.fullmatch(text):
        raise ConfigError(
            what,
            f"{path} must hold one secret of at least {MIN_SECRET_CHARS} printable ASCII "
            "characters without spaces",
        )
    return text


_ACL_XATTR: Final = "system.posix_acl_access"
_ACL_USER, _ACL_GROUP_OBJ, _ACL_GROUP, _ACL_MASK = 0x02, 0x04, 0x08, 0x10
_NO_ACL: Final = frozenset({errno.ENODATA, errno.ENOTSUP, errno.EOPNOTSUPP})


def secret_exposure(fd: int) -> str | None:
    """Who besides the file's owner and this process's user may access the open file ``fd``
    ("others", "its group", "user 1001", ...), or None when nobody does (or it is no regular
    file: a pipe or a terminal holds nothing at rest).

    With a POSIX ACL (as systemd's ``LoadCredential=`` grants the service's dynamic user read
    access on a root-owned 0400 file) the mode's group bits are the ACL mask, so the ACL's own
    entries are read instead: a named user other than the owner or this process, the owning group
    or a named group with any permission is an exposure. An ACL that cannot be parsed counts as
    the mode says.
    """
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        return None
    mode = stat.S_IMODE(st.st_mode)
    shown = f"mode {mode:04o}"
    if mode & 0o007:
        return f"others ({shown})"
    try:
        acl = os.getxattr(fd, _ACL_XATTR)
    except OSError as exc:
        if exc.errno not in _NO_ACL:
            raise
        return f"its group ({shown})" if mode & 0o070 else None
    entries = _acl_entries(acl)
    if entries is None:
        return f"its group ({shown}, unreadable ACL)" if mode & 0o070 else None
    mask = next((perm for tag, perm, _ in entries if tag == _ACL_MASK), 0o7)
    for tag, perm, ident in entries:
        if not perm & mask:
            continue
        if tag == _ACL_GROUP_OBJ:
            return f"its group (ACL, {shown})"
        if tag == _ACL_GROUP:
            return f"group {ident} (ACL)"
        if tag == _ACL_USER and ident not in (st.st_uid, os.geteuid()):
            return f"user {ident} (ACL)"
    return None


def _acl_entries(raw: bytes) -> list[tuple[int, int, int]] | None:
    """The (tag, permissions, id) entries of a Linux ``system.posix_acl_access`` value (version 2,
    then 8 bytes per entry, little-endian), or None if malformed."""
    if len(raw) < 4 or (len(raw) - 4) % 8 or int.from_bytes(raw[:4], "little") != 2:
        return None
    return [
        (
            int.from_bytes(raw[i : i + 2], "little"),
            int.from_bytes(raw[i + 2 : i + 4], "little"),
            int.from_bytes(raw[i + 4 : i + 8], "little"),
        )
        for i in range(4, len(raw), 8)
    ]


def _sha256(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8")).digest()


@dataclass(frozen=True, slots=True)
class _TokenEntry:
    digest: bytes
    principal: Principal
    source: str  # the config key of its file (or the principal's name), for error messages


@dataclass(frozen=True, slots=True)
class TokenStore:
    """Bearer tokens kept only as SHA-256 digests, each with a principal and its roles."""

    entries: tuple[_TokenEntry, ...]

    @classmethod
    def from_tokens(
        cls,
        tokens: Mapping[str, tuple[str, Iterable[Role]]],
        *,
        people: Mapping[str, str] | None = None,
        sources: Mapping[str, str] | None = None,
    ) -> TokenStore:
        """From ``{principal name: (token, roles)}``; the tokens themselves are not kept.

        ``people`` maps a principal name to its person; ``sources`` names each one's config key
        in errors. One token for two principals (two roles) is a ``ConfigError``.
        """
        named = people or {}
        where = sources or {}
        entries: list[_TokenEntry] = []
        seen: dict[bytes, str] = {}
        for name, (token, roles) in tokens.items():
            digest = _sha256(token)
            source = where.get(name, name)
            if digest in seen:
                raise ConfigError(
                    source,
                    f"holds the same token as {seen[digest]}: one secret for two roles; "
                    "give each role a token of its own",
                )
            seen[digest] = source
            principal = Principal(name, frozenset(roles), named.get(name))
            entries.append(_TokenEntry(digest, principal, source))
        return cls(tuple(entries))

    @classmethod
    def from_files(
        cls,
        files: Mapping[str, tuple[Path, Iterable[Role]]],
        *,
        allow_insecure_permissions: bool = False,
    ) -> TokenStore:
        """From ``{principal name: (token file, roles)}``; one token per file."""
        return cls.from_tokens(
            {
                name: (
                    read_secret_file(
                        path, what=name, allow_insecure_permissions=allow_insecure_permissions
                    ),
                    roles,
                )
                for name, (path, roles) in files.items()
            }
        )

    @classmethod
    def from_role_files(
        cls,
        *,
        read: Path | None = None,
        kill: Path | None = None,
        arm: Path | None = None,
        people: Mapping[Role, str] | None = None,
        personal: Mapping[str, tuple[Path, Iterable[Role]]] | None = None,
        allow_insecure_permissions: bool = False,
    ) -> TokenStore:
        """From one file per role, as in ``control.http.token_files``; the principal is the
        file's name (e.g. the systemd credential name). A role without a file is refused.
        ``people`` maps a role's token to the person holding it (``control.people``);
        ``personal`` maps a person to a token file of their own and its roles (principal
        ``person:<name>``, ``control.people.<name>.http_token_file``)."""
        by_role: tuple[tuple[Role, Path | None], ...] = (
            ("read", read),
            ("kill", kill),
            ("arm", arm),
        )
        named = people or {}
        tokens: dict[str, tuple[str, Iterable[Role]]] = {}
        persons: dict[str, str] = {}
        sources: dict[str, str] = {}
        for role, path in by_role:
            if path is not None:
                what = f"control.http.token_files.{role}"
                name = f"{role}:{path.name}"
                token = read_secret_file(
                    path, what=what, allow_insecure_permissions=allow_insecure_permissions
                )
                tokens[name] = (token, (role,))
                sources[name] = what
                if role in named:
                    persons[name] = named[role]
        for person, (path, roles) in (personal or {}).items():
            what = f"control.people.{person}.http_token_file"
            name = f"person:{person}"
            token = read_secret_file(
                path, what=what, allow_insecure_permissions=allow_insecure_permissions
            )
            tokens[name] = (token, tuple(roles))
            sources[name] = what
            persons[name] = person
        return cls.from_tokens(tokens, people=persons, sources=sources)

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
    person: str | None = None


@dataclass(frozen=True, slots=True)
class KeyStore:
    """Operator keys by key id."""

    keys: Mapping[str, OperatorKey]

    @classmethod
    def from_secrets(
        cls,
        secrets: Mapping[str, tuple[str, Iterable[Role]]],
        *,
        people: Mapping[str, str] | None = None,
    ) -> KeyStore:
        """From ``{key id: (secret text, roles)}``; ``people`` maps a key id to its person.

        Two key ids with the same secret are a ``ConfigError``: a signature must name its key.
        """
        named = people or {}
        keys: dict[str, OperatorKey] = {}
        seen: dict[bytes, str] = {}
        for key_id, (secret, roles) in secrets.items():
            if not _KEY_ID.fullmatch(key_id):
                raise ConfigError(key_id, "key id must be 1..64 of [A-Za-z0-9_.-]")
            raw = secret.encode("utf-8")
            digest = hashlib.sha256(raw).digest()
            if digest in seen:
                raise ConfigError(
                    _key_source(key_id),
                    f"holds the same key as {_key_source(seen[digest])}: one secret for two "
                    "key ids; give each key id a key of its own",
                )
            seen[digest] = key_id
            keys[key_id] = OperatorKey(key_id, raw, frozenset(roles), named.get(key_id))
        return cls(keys)

    @classmethod
    def from_files(
        cls,
        files: Mapping[str, Path],
        *,
        roles: Mapping[str, Iterable[Role]] | None = None,
        default_roles: Iterable[Role] = ("kill",),
        people: Mapping[str, str] | None = None,
        allow_insecure_permissions: bool = False,
    ) -> KeyStore:
        """From ``control.mqtt.operator_key_files`` (key id -> file); each key gets its entry in
        ``roles`` or else ``default_roles`` (kill only: a re-arm needs a key granted ``arm``),
        and its person from ``people`` (key id -> person)."""
        granted = roles or {}
        secrets: dict[str, tuple[str, Iterable[Role]]] = {}
        for key_id, path in files.items():
            secret = read_secret_file(
                path,
                what=_key_source(key_id),
                allow_insecure_permissions=allow_insecure_permissions,
            )
            secrets[key_id] = (secret, granted.get(key_id, default_roles))
        return cls.from_secrets(secrets, people=people)

    def get(self, key_id: str) -> OperatorKey:
        """The key with this id, or ``AuthError``."""
        key = self.keys.get(key_id)
        if key is None:
            raise AuthError(f"unknown key id {key_id!r}")
        return key


def _key_source(key_id: str) -> str:
    return f"control.mqtt.operator_key_files.{key_id}"


def check_secrets_distinct(
    tokens: TokenStore | None,
    keys: KeyStore | None,
    *,
    mqtt_password: str | None = None,
    others: Mapping[str, str] | None = None,
) -> None:
    """``ConfigError`` naming the key when one secret serves two purposes across credential
    kinds: an operator key equal to a bearer token, or the MQTT broker password equal to a token
    or a key. (Within a kind, the stores' constructors refuse it.) A shared secret would let
    whoever holds one credential act as the other, and make a leak impossible to place."""
    by_digest: dict[bytes, str] = {}
    for entry in tokens.entries if tokens is not None else ():
        by_digest.setdefault(entry.digest, entry.source)
    for key in keys.keys.values() if keys is not None else ():
        digest = hashlib.sha256(key.secret).digest()
        if digest in by_digest:
            raise ConfigError(
                _key_source(key.key_id),
                f"holds the same secret as {by_digest[digest]}: an operator key and a bearer "
                "token must differ",
            )
        by_digest[digest] = _key_source(key.key_id)
    if mqtt_password is not None:
        digest = _sha256(mqtt_password)
        if digest in by_digest:
            raise ConfigError(
                "control.mqtt.password_file",
                f"holds the same secret as {by_digest[digest]}: the broker password must differ "
                "from every token and key",
            )
        by_digest[digest] = "control.mqtt.password_file"
    for source, secret in (others or {}).items():
        # Other keys (a notification webhook's HMAC key): whoever holds one must not be able
        # to kill or re-arm with it, nor forge another.
        digest = _sha256(secret)
        if digest in by_digest:
            raise ConfigError(
                source,
                f"holds the same secret as {by_digest[digest]}: every key and token must differ",
            )
        by_digest[digest] = source


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

    action: CommandKind
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
    action: CommandKind,
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


def parse_signed_command(payload: bytes, *, topic_action: CommandKind) -> SignedCommand:
    """Parse and check an MQTT command payload's shape; ``CommandError`` says what is wrong."""
    try:
        data = json.loads(payload)
    except (ValueError, RecursionError) as exc:  # RecursionError: deeply nested arrays
        raise CommandError("payload is not JSON") from exc
    return signed_command_from(data, topic_action=topic_action)


def signed_command_from(data: object, *, topic_action: CommandKind) -> SignedCommand:
    """Check a parsed MQTT command payload's shape (``parse_signed_command`` after the JSON)."""
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


class NonceBook(Protocol):
    """Where ``verify_signed_command`` records a nonce: ``NonceCache`` (memory) or
    ``guardd.control.nonces.NonceStore`` (memory and disk, surviving restarts)."""

    def remember(
        self, key_id: str, nonce: str, *, ts: float, now: float, durable: bool = True
    ) -> None:
        """Record a nonce, or ``ReplayError`` if it was used within the window
        (``NonceNotDurableError``: recorded, but not durably). ``durable=False``: recorded now
        (a replay is refused at once) and written to disk by the next ``sync``."""
        ...

    def sync(self) -> None:
        """Write the nonces recorded with ``durable=False`` (never raises)."""
        ...


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

    def remember(
        self, key_id: str, nonce: str, *, ts: float, now: float, durable: bool = True
    ) -> None:
        """Record a nonce, or ``ReplayError`` if it was seen within the window or the cache is
        full (in memory only: ``durable`` makes no difference here)."""
        self._prune(now)
        key = (key_id, nonce)
        if key in self._expiry:
            raise ReplayError(f"nonce {nonce!r} already used within {self.window_s:g} s")
        if len(self._expiry) >= self.max_entries:
            raise ReplayError("too many commands within the replay window")
        self.restore(key_id, nonce, expires=max(ts, now) + self.window_s)

    def restore(self, key_id: str, nonce: str, *, expires: float) -> None:
        """Record a nonce used earlier (e.g. read back from disk) until ``expires``."""
        key = (key_id, nonce)
        self._expiry[key] = max(expires, self._expiry.get(key, expires))
        heapq.heappush(self._heap, (self._expiry[key], key))

    def sync(self) -> None:
        """Nothing to write: the cache is memory only."""


def verify_signed_command(
    command: SignedCommand,
    *,
    target: str,
    keys: KeyStore,
    nonces: NonceBook,
    now: float,
    window_s: float,
    channel: Channel = "mqtt",
) -> ControlCommand:
    """Authenticate a parsed command: key, signature, role, timestamp window, then nonce (only a
    command that passed every other check uses up its nonce).

    A nonce that could not be recorded durably (``NonceNotDurableError``) refuses an arm; a kill
    goes through, since its replay after a restart could only halt again.
    """
    key = keys.get(command.key_id)
    expected = sign(key.secret, command.canonical(target))
    if not hmac.compare_digest(expected, command.sig):
        raise AuthError(f"bad signature for key id {command.key_id!r}")
    Principal(key.key_id, key.roles).require(required_role(command.action))
    try:
        skew = float(now - command.ts)
    except OverflowError:  # an integer ts beyond float range (ts >= 0: far in the future)
        skew = -math.inf
    if skew > window_s:
        raise ReplayError(f"timestamp {command.ts} is {skew:.0f} s old (window {window_s:g} s)")
    if skew < -window_s:
        if math.isinf(skew):
            raise ReplayError(
                f"timestamp is from the future, beyond any clock (window {window_s:g} s)"
            )
        raise ReplayError(
            f"timestamp {command.ts} is from the future by {-skew:.0f} s (window {window_s:g} s)"
        )
    try:
        # A kill's nonce is written after the kill (``sync``): its replay could only halt again,
        # and a kill waits for no fsync before its cancel.
        nonces.remember(
            command.key_id, command.nonce, ts=command.ts, now=now, durable=command.action != "kill"
        )
    except NonceNotDurableError:
        if command.action != "kill":
            raise
    return ControlCommand(
        action=command.action,
        principal=command.key_id,
        person=key.person,
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
    first: str  # the person whose arm opened the pending request
    message: str


@dataclass(slots=True)
class TwoPersonRule:
    """Re-arm needs two different people within ``window_s``.

    The first arm from A is recorded as pending; an arm from a different person B within the
    window confirms it. A second arm from A only refreshes A's request; an expired request is
    replaced. ``clear()`` drops a pending request (e.g. on a new kill). The app applies this in
    ``CommandHandler.handle`` with each command's person (``control.people``), so HTTP and MQTT
    arms count together and one person's two credentials count once.
    """

    window_s: float
    _pending: tuple[str, float] | None = None

    @property
    def pending(self) -> str | None:
        """The person whose arm is waiting for a second person, if any (unexpired or not)."""
        return self._pending[0] if self._pending else None

    @property
    def pending_since(self) -> float | None:
        """When the pending arm came in (epoch seconds), if any; it lapses ``window_s`` later."""
        return self._pending[1] if self._pending else None

    def offer(self, person: str, *, now: float) -> TwoPersonVerdict:
        """Record an arm from ``person`` at ``now`` and say whether it completes the pair."""
        if self._pending is not None:
            first, since = self._pending
            if now - since <= self.window_s and first != person:
                self._pending = None
                message = f"re-arm confirmed by {person} after {first}"
                return TwoPersonVerdict(True, first, message)
        self._pending = (person, now)
        return TwoPersonVerdict(
            False,
            person,
            f"re-arm pending by {person}: a second person must confirm within {self.window_s:g} s",
        )

    def clear(self) -> None:
        """Forget a pending re-arm."""
        self._pending = None
