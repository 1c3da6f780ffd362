"""Tokens, roles, signed-command canonical form, replay window and the two-person rule."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from guardd.control.auth import (
    KeyStore,
    NonceCache,
    Principal,
    TokenStore,
    TwoPersonRule,
    canonical_form,
    check_secrets_distinct,
    parse_signed_command,
    read_secret_file,
    sign,
    signed_payload,
    verify_signed_command,
)
from guardd.control.commands import CommandKind, ControlCommand, check_reason
from guardd.errors import AuthError, CommandError, ConfigError, NonceNotDurableError, ReplayError

NOW = 1_767_225_600
KEYS = KeyStore.from_secrets(
    {
        "alice": ("alice-secret-key-0123456789", ["kill", "arm"]),
        "rob": ("rob-key-0123456789ab", ["kill"]),
    }
)
SECRET = b"alice-secret-key-0123456789"
ALICE = SECRET.decode()


def verify(
    raw: bytes,
    *,
    action: CommandKind = "kill",
    target: str = "DU1",
    now: float = NOW,
    nonces: NonceCache | None = None,
) -> ControlCommand:
    command = parse_signed_command(raw, topic_action=action)
    cache = NonceCache(30) if nonces is None else nonces
    return verify_signed_command(
        command, target=target, keys=KEYS, nonces=cache, now=now, window_s=30
    )


def secret_file(path: Path, text: str) -> Path:
    """A secret file as an operator makes it: readable by its owner only."""
    path.write_text(text)
    path.chmod(0o600)
    return path


def make(**overrides: object) -> dict[str, object]:
    fields: dict[str, object] = dict(
        action="kill", target="DU1", reason="runaway bot", key_id="alice", secret=SECRET,
        ts=NOW, nonce="nonce-0001",
    )  # fmt: skip
    fields.update(overrides)
    return signed_payload(**fields)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------ tokens


def test_token_then_principal_and_only_its_hash_kept() -> None:
    store = TokenStore.from_tokens({"desk": ("desk-token-0123456789", ["kill"])})

    principal = store.authenticate("desk-token-0123456789")

    assert principal.name == "desk"
    assert "desk-token-0123456789" not in repr(store)


@pytest.mark.parametrize("token", [None, "", "desk-token-012345678", "x" * 100])
def test_missing_or_unknown_token_then_auth_error(token: str | None) -> None:
    store = TokenStore.from_tokens({"desk": ("desk-token-0123456789", ["kill"])})

    with pytest.raises(AuthError):
        store.authenticate(token)


@pytest.mark.parametrize(
    ("roles", "needed", "allowed"),
    [
        ({"read"}, "read", True),
        ({"read"}, "kill", False),
        ({"kill"}, "read", True),
        ({"kill"}, "arm", False),
        ({"arm"}, "read", True),
        ({"arm"}, "kill", False),
        (set(), "read", False),
    ],
)
def test_role_then_allowed_only_as_documented(roles: set[str], needed: str, allowed: bool) -> None:
    principal = Principal("p", frozenset(roles))  # type: ignore[arg-type]

    assert principal.may(needed) is allowed  # type: ignore[arg-type]
    if not allowed:
        with pytest.raises(AuthError, match=f"lacks the {needed} role"):
            principal.require(needed)  # type: ignore[arg-type]


def test_role_files_then_principals_named_after_files(tmp_path: Path) -> None:
    secret_file(tmp_path / "kill-token", "  kill-token-0123456789\n")
    secret_file(tmp_path / "read-token", "read-token-0123456789")

    store = TokenStore.from_role_files(kill=tmp_path / "kill-token", read=tmp_path / "read-token")

    assert store.authenticate("kill-token-0123456789") == Principal(
        "kill:kill-token", frozenset({"kill"})
    )
    assert store.authenticate("read-token-0123456789").roles == {"read"}


@pytest.mark.parametrize("text", ["short", "", "has a space 0123456789", "tøken-0123456789abc"])
def test_weak_or_odd_token_file_then_config_error_naming_key(tmp_path: Path, text: str) -> None:
    secret_file(tmp_path / "kill-token", text)

    with pytest.raises(ConfigError) as err:
        TokenStore.from_role_files(kill=tmp_path / "kill-token")

    assert err.value.key_path == "control.http.token_files.kill"


def test_missing_token_file_then_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        TokenStore.from_role_files(arm=tmp_path / "nope")


def test_same_token_for_two_roles_then_config_error_naming_the_key(tmp_path: Path) -> None:
    for name in ("a", "b"):
        secret_file(tmp_path / name, "same-token-0123456789")

    with pytest.raises(ConfigError, match="same token") as err:
        TokenStore.from_role_files(kill=tmp_path / "a", arm=tmp_path / "b")

    assert err.value.key_path == "control.http.token_files.arm"
    assert "control.http.token_files.kill" in err.value.rule


def test_two_key_ids_with_one_secret_then_config_error_naming_the_key(tmp_path: Path) -> None:
    secret_file(tmp_path / "alice.key", "shared-secret-key-0123456789")
    secret_file(tmp_path / "bob.key", "shared-secret-key-0123456789\n")

    with pytest.raises(ConfigError, match="same key") as err:
        KeyStore.from_files({"alice": tmp_path / "alice.key", "bob": tmp_path / "bob.key"})

    assert err.value.key_path == "control.mqtt.operator_key_files.bob"
    assert "control.mqtt.operator_key_files.alice" in err.value.rule


def test_key_equal_to_a_token_then_config_error_naming_the_key(tmp_path: Path) -> None:
    tokens = TokenStore.from_role_files(
        kill=secret_file(tmp_path / "token-kill", "desk-secret-0123456789")
    )
    keys = KeyStore.from_files({"alice": secret_file(tmp_path / "a.key", "desk-secret-0123456789")})

    with pytest.raises(ConfigError, match="same secret") as err:
        check_secrets_distinct(tokens, keys)

    assert err.value.key_path == "control.mqtt.operator_key_files.alice"
    assert "control.http.token_files.kill" in err.value.rule


def test_broker_password_equal_to_a_key_then_config_error_naming_the_password() -> None:
    keys = KeyStore.from_secrets({"alice": ("alice-secret-key-0123456789", ["kill"])})

    with pytest.raises(ConfigError) as err:
        check_secrets_distinct(None, keys, mqtt_password="alice-secret-key-0123456789")

    assert err.value.key_path == "control.mqtt.password_file"


def test_distinct_secrets_then_no_error(tmp_path: Path) -> None:
    tokens = TokenStore.from_role_files(
        kill=secret_file(tmp_path / "token-kill", "desk-secret-0123456789")
    )

    check_secrets_distinct(tokens, KEYS, mqtt_password="broker-password-0123")


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o620, 0o660])
def test_secret_file_open_to_group_or_others_then_config_error_naming_key(
    tmp_path: Path, mode: int
) -> None:
    path = secret_file(tmp_path / "kill-token", "kill-token-0123456789")
    path.chmod(mode)

    with pytest.raises(ConfigError, match=f"mode {mode:04o}") as err:
        TokenStore.from_role_files(kill=path)
    with pytest.raises(ConfigError) as key_err:
        KeyStore.from_files({"alice": path})

    assert err.value.key_path == "control.http.token_files.kill"
    assert key_err.value.key_path == "control.mqtt.operator_key_files.alice"
    assert "chmod 600" in err.value.rule


def test_secret_file_open_to_others_with_explicit_allowance_then_read(tmp_path: Path) -> None:
    path = secret_file(tmp_path / "kill-token", "kill-token-0123456789")
    path.chmod(0o644)

    store = TokenStore.from_role_files(kill=path, allow_insecure_permissions=True)
    keys = KeyStore.from_files({"alice": path}, allow_insecure_permissions=True)

    assert store.authenticate("kill-token-0123456789").roles == {"kill"}
    assert keys.get("alice").secret == b"kill-token-0123456789"


@pytest.mark.parametrize("mode", [0o600, 0o400])
def test_secret_file_private_then_read(tmp_path: Path, mode: int) -> None:
    path = secret_file(tmp_path / "kill-token", "kill-token-0123456789")
    path.chmod(mode)

    assert read_secret_file(path, what="k") == "kill-token-0123456789"


def set_acl(path: Path, *entries: tuple[int, int, int]) -> None:
    """A POSIX access ACL on ``path`` (tag, permissions, id), as setfacl would write it."""
    raw = (2).to_bytes(4, "little") + b"".join(
        tag.to_bytes(2, "little") + perm.to_bytes(2, "little") + ident.to_bytes(4, "little")
        for tag, perm, ident in sorted(entries)  # the kernel wants them in tag order
    )
    try:
        os.setxattr(path, "system.posix_acl_access", raw)
    except OSError as exc:
        pytest.fail(f"the test directory's file system refuses ACLs: {exc}", pytrace=False)


ANY = 0xFFFFFFFF
USER_OBJ, USER, GROUP_OBJ, GROUP, MASK, OTHER = 0x01, 0x02, 0x04, 0x08, 0x10, 0x20


def test_systemd_credential_with_acl_for_our_user_then_read(tmp_path: Path) -> None:
    # systemd's LoadCredential=: a 0400 file owned by root, read access for the service's
    # (dynamic) user through an ACL entry; `ls -l` shows -r--r-----+ (group bits = ACL mask)
    path = secret_file(tmp_path / "token-kill", "kill-token-0123456789")
    path.chmod(0o400)
    os.chown(path, 4242, 4242)  # owned by someone else (root, under systemd)
    set_acl(path, (USER_OBJ, 4, ANY), (USER, 4, os.geteuid()), (GROUP_OBJ, 0, ANY), (MASK, 4, ANY),
            (OTHER, 0, ANY))  # fmt: skip

    assert stat.S_IMODE(path.stat().st_mode) == 0o440
    assert TokenStore.from_role_files(kill=path).authenticate("kill-token-0123456789")


@pytest.mark.parametrize(
    ("entry", "who"),
    [((USER, 4, 4343), "user 4343"), ((GROUP, 4, 4343), "group 4343"),
     ((GROUP_OBJ, 4, ANY), "its group")],
    ids=["another-user", "a-group", "its-group"],
)  # fmt: skip
def test_secret_file_with_acl_for_someone_else_then_config_error(
    tmp_path: Path, entry: tuple[int, int, int], who: str
) -> None:
    path = secret_file(tmp_path / "token-kill", "kill-token-0123456789")
    path.chmod(0o400)
    group_obj = [] if entry[0] == GROUP_OBJ else [(GROUP_OBJ, 0, ANY)]
    set_acl(path, (USER_OBJ, 4, ANY), entry, *group_obj, (MASK, 4, ANY), (OTHER, 0, ANY))

    with pytest.raises(ConfigError, match=f"open to {who}") as err:
        TokenStore.from_role_files(kill=path)

    assert err.value.key_path == "control.http.token_files.kill"


def test_credentials_with_people_then_principals_name_their_person(tmp_path: Path) -> None:
    tokens = TokenStore.from_role_files(
        arm=secret_file(tmp_path / "token-arm", "arm-token-0123456789"),
        kill=secret_file(tmp_path / "token-kill", "kill-token-0123456789"),
        people={"arm": "alice"},
    )
    keys = KeyStore.from_secrets(
        {"alice": (ALICE, ["kill", "arm"]), "rob": ("rob-key-0123456789ab", ["kill"])},
        people={"alice": "alice"},
    )

    assert tokens.authenticate("arm-token-0123456789").person == "alice"
    assert tokens.authenticate("kill-token-0123456789").person is None
    command = verify_signed_command(
        parse_signed_command(json.dumps(make()).encode(), topic_action="kill"),
        target="DU1", keys=keys, nonces=NonceCache(30), now=NOW, window_s=30,
    )  # fmt: skip
    assert (command.principal, command.person) == ("alice", "alice")


def test_key_files_then_kill_only_unless_granted_arm(tmp_path: Path) -> None:
    secret_file(tmp_path / "alice.key", "alice-secret-key-0123456789\n")
    secret_file(tmp_path / "bob.key", "bob-secret-key-0123456789ab\n")

    keys = KeyStore.from_files(
        {"alice": tmp_path / "alice.key", "bob": tmp_path / "bob.key"},
        roles={"alice": ["kill", "arm"]},
    )

    assert keys.get("alice").roles == {"kill", "arm"}
    assert keys.get("bob").roles == {"kill"}
    assert keys.get("alice").secret == SECRET
    with pytest.raises(AuthError):
        keys.get("carol")


# ------------------------------------------------------------------------------ signing


def test_canonical_form_then_nine_lines_without_trailing_newline() -> None:
    canonical = canonical_form(
        action="kill", target="all", reason="r", mode=None, force=False, key_id="k", ts=5,
        nonce="n",
    )  # fmt: skip

    assert canonical == b"guardd-v1\nkill\nall\nr\n\nfalse\nk\n5\nn"


def test_signature_then_same_as_openssl_dgst_hmac() -> None:
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.fail("openssl is not installed (apt-get install -y openssl)", pytrace=False)
    canonical = canonical_form(
        action="arm", target="DU1", reason="all clear ✓", mode=None, force=True, key_id="alice",
        ts=NOW, nonce="nonce-0001",
    )  # fmt: skip

    out = subprocess.run(
        [openssl, "dgst", "-sha256", "-hmac", SECRET.decode(), "-r"],
        input=canonical,
        capture_output=True,
        check=True,
    ).stdout.decode()

    assert out.split()[0] == sign(SECRET, canonical)


def test_signed_kill_then_verified_command() -> None:
    command = verify(json.dumps(make(mode="flatten")).encode())

    assert (command.action, command.principal, command.mode) == ("kill", "alice", "flatten")
    assert command.request_id == "nonce-0001"
    assert command.channel == "mqtt"


reasons = st.text(st.characters(blacklist_categories=("Cc", "Cs")), min_size=1, max_size=80).filter(
    str.strip
)
nonces = st.text(
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-", min_size=8, max_size=64
)


@settings(max_examples=200, deadline=None)
@given(
    action=st.sampled_from(["kill", "arm"]),
    reason=reasons,
    mode=st.sampled_from([None, "cancel", "flatten"]),
    force=st.booleans(),
    nonce=nonces,
    skew=st.integers(-30, 30),
)
def test_any_signed_command_then_round_trips(
    action: str, reason: str, mode: str | None, force: bool, nonce: str, skew: int
) -> None:
    mode = mode if action == "kill" else None
    force = force if action == "arm" else False
    raw = json.dumps(
        make(action=action, reason=reason, mode=mode, force=force, nonce=nonce, ts=NOW + skew)
    ).encode()

    command = verify(raw, action=action)  # type: ignore[arg-type]

    assert (command.action, command.reason, command.mode, command.force) == (
        action, reason, mode, force,
    )  # fmt: skip
    assert check_reason(command.reason) == reason


tampering = st.sampled_from(
    [
        ("reason", "other reason"),
        ("reason", "runaway bot "),
        ("mode", "flatten"),
        ("ts", NOW + 1),
        ("nonce", "nonce-0002"),
        ("key_id", "rob"),
        ("sig", "0" * 64),
    ]
)


@settings(max_examples=100, deadline=None)
@given(change=tampering, target=st.sampled_from(["DU1", "DU2", "all"]))
def test_any_tampered_field_or_other_target_then_refused(
    change: tuple[str, object], target: str
) -> None:
    field, value = change
    raw = json.dumps({**make(), field: value}).encode()

    with pytest.raises(AuthError):
        verify(raw, target=target)


@pytest.mark.parametrize(
    "payload",
    [
        b"not json",
        b"[" * 5000,
        b"\xff\xfe",
        b"[]",
        b'{"action": "kill"}',
        json.dumps({**make(), "extra": 1}).encode(),
        json.dumps({**make(), "ts": "1767225600"}).encode(),
        json.dumps({**make(), "ts": True}).encode(),
        json.dumps({**make(), "nonce": "short"}).encode(),
        json.dumps({**make(), "sig": "xyz"}).encode(),
        json.dumps({**make(), "reason": "two\nlines"}).encode(),
        json.dumps({**make(), "force": True}).encode(),
        json.dumps({**make(), "action": "arm"}).encode(),
    ],
)
def test_malformed_payload_then_command_error_not_auth(payload: bytes) -> None:
    with pytest.raises(CommandError) as err:
        verify(payload)

    assert type(err.value) is CommandError


def test_kill_only_key_signing_arm_then_refused_for_role() -> None:
    raw = json.dumps(make(action="arm", key_id="rob", secret=b"rob-key-0123456789ab")).encode()

    with pytest.raises(AuthError, match="lacks the arm role"):
        verify(raw, action="arm")


# ------------------------------------------------------------------------------ replay


@pytest.mark.parametrize(
    ("skew", "fresh"), [(0, True), (30, True), (-30, True), (31, False), (-31, False)]
)
def test_timestamp_then_accepted_only_within_window(skew: int, fresh: bool) -> None:
    raw = json.dumps(make(ts=NOW + skew)).encode()

    if fresh:
        assert verify(raw).action == "kill"
    else:
        with pytest.raises(ReplayError):
            verify(raw)


@pytest.mark.parametrize(
    ("skew", "words"),
    [(101, "is 101 s old (window 30 s)"), (-45, "is from the future by 45 s (window 30 s)")],
)
def test_stale_or_future_timestamp_then_message_says_by_how_much(skew: int, words: str) -> None:
    raw = json.dumps(make(ts=NOW - skew)).encode()

    with pytest.raises(ReplayError) as err:
        verify(raw)

    assert str(err.value) == f"timestamp {NOW - skew} {words}"


def test_timestamp_beyond_float_range_then_replay_refused() -> None:
    # JSON integers are unbounded; a signed one too large for a float is far outside the window
    raw = json.dumps(make(ts=10**400)).encode()

    with pytest.raises(ReplayError, match="from the future, beyond any clock"):
        verify(raw)


def test_same_nonce_twice_then_replay_refused_until_window_passed() -> None:
    cache = NonceCache(30)
    raw = json.dumps(make()).encode()
    verify(raw, nonces=cache)

    with pytest.raises(ReplayError, match="already used"):
        verify(raw, nonces=cache, now=NOW + 30)
    cache.remember("x", "nonce-late", ts=NOW + 31, now=NOW + 31)  # prunes the expired entry
    assert len(cache) == 1


def test_refused_command_then_nonce_not_used_up() -> None:
    cache = NonceCache(30)
    good = make()
    forged = {**good, "sig": "0" * 64}

    with pytest.raises(AuthError):
        verify(json.dumps(forged).encode(), nonces=cache)

    assert verify(json.dumps(good).encode(), nonces=cache).request_id == "nonce-0001"


class _NoDisk:
    """A nonce book whose disk is broken: it remembers in memory and says it is not durable."""

    def __init__(self) -> None:
        self.cache = NonceCache(30)

    def remember(
        self, key_id: str, nonce: str, *, ts: float, now: float, durable: bool = True
    ) -> None:
        self.cache.remember(key_id, nonce, ts=ts, now=now)
        raise NonceNotDurableError("disk full")

    def sync(self) -> None:
        pass


def test_nonce_not_durable_then_kill_carried_out_and_arm_refused() -> None:
    book = _NoDisk()
    kill = parse_signed_command(json.dumps(make()).encode(), topic_action="kill")
    arm = parse_signed_command(
        json.dumps(make(action="arm", nonce="nonce-0002")).encode(), topic_action="arm"
    )

    command = verify_signed_command(
        kill, target="DU1", keys=KEYS, nonces=book, now=NOW, window_s=30
    )
    with pytest.raises(NonceNotDurableError):
        verify_signed_command(arm, target="DU1", keys=KEYS, nonces=book, now=NOW, window_s=30)
    with pytest.raises(ReplayError, match="already used"):  # in memory, still refused
        verify_signed_command(kill, target="DU1", keys=KEYS, nonces=book, now=NOW, window_s=30)

    assert command.action == "kill"


def test_full_nonce_cache_then_fails_closed() -> None:
    cache = NonceCache(30, max_entries=2)
    cache.remember("k", "n1", ts=NOW, now=NOW)
    cache.remember("k", "n2", ts=NOW, now=NOW)

    with pytest.raises(ReplayError, match="too many"):
        cache.remember("k", "n3", ts=NOW, now=NOW)
    cache.remember("k", "n3", ts=NOW + 31, now=NOW + 31)
    assert len(cache) == 1


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from("abc"), st.integers(0, 100)), max_size=40))
def test_nonce_stream_then_repeat_refused_exactly_within_window(
    stream: list[tuple[str, int]],
) -> None:
    cache = NonceCache(10)
    last_accepted: dict[str, int] = {}
    now = 0
    for nonce, step in stream:
        now += step // 10
        seen = last_accepted.get(nonce)
        if seen is not None and now - seen <= 10:
            with pytest.raises(ReplayError):
                cache.remember("k", nonce, ts=now, now=now)
        else:
            cache.remember("k", nonce, ts=now, now=now)
            last_accepted[nonce] = now
        assert len(cache) <= 3


# ------------------------------------------------------------------------------ two-person rule


def test_two_person_rule_then_second_different_operator_confirms() -> None:
    rule = TwoPersonRule(window_s=60)

    first = rule.offer("alice", now=0)
    again = rule.offer("alice", now=10)
    second = rule.offer("bob", now=50)

    assert (first.confirmed, again.confirmed, second.confirmed) == (False, False, True)
    assert second.first == "alice"
    assert rule.pending is None


def test_two_person_rule_after_window_then_pending_again() -> None:
    rule = TwoPersonRule(window_s=60)
    rule.offer("alice", now=0)

    late = rule.offer("bob", now=61)

    assert late.confirmed is False
    assert rule.pending == "bob"


def test_two_person_rule_cleared_then_no_confirmation() -> None:
    rule = TwoPersonRule(window_s=60)
    rule.offer("alice", now=0)
    rule.clear()

    assert rule.offer("bob", now=1).confirmed is False
