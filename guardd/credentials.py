"""Every credential the config names, read and checked before anything connects.

`guardd run` reads them first thing (then listens, then connects to IB), and `guardd check-config`
reads the same files the same way, so a missing, unreadable or malformed credential is found by
either, as a ``ConfigError`` naming the key that points at the file (exit 78); secrets must be
private files (``control.allow_insecure_permissions`` aside) and each used for one purpose:

- ``control.http.token_files.{read,kill,arm}``: one bearer token per role (HTTP enabled);
- ``control.people.<name>.http_token_file``: a person's own bearer token (HTTP enabled);
- ``control.http.tls_cert_file`` / ``tls_key_file``: the HTTP server's certificate and key;
- ``control.mqtt.password_file``, ``control.mqtt.operator_key_files.<id>`` and, with
  ``control.mqtt.tls``, ``control.mqtt.tls_ca_file`` (MQTT enabled);
- ``notify.webhooks.<name>.key_file`` (a webhook's HMAC key) and ``notify.*.<name>.url_file``
  (a target URL that carries a token); an apprise URL must be one apprise takes.

A channel that is disabled uses none of its files, so they are not read.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path

from guardd.config import Config
from guardd.control.auth import KeyStore, TokenStore, check_secrets_distinct, read_secret_file
from guardd.control.http import server_ssl_context
from guardd.errors import ConfigError
from guardd.notifications import Target, apprise_for

__all__ = ["Credentials", "load_credentials"]


@dataclass(frozen=True, slots=True)
class Credentials:
    """What the control plane needs from the credential files; None where a channel is off."""

    http_tokens: TokenStore | None = None
    http_tls: ssl.SSLContext | None = None
    mqtt_password: str | None = None
    mqtt_keys: KeyStore | None = None
    mqtt_tls: ssl.SSLContext | None = None
    notify_targets: tuple[Target, ...] = ()


def load_credentials(cfg: Config) -> Credentials:
    """Read every credential file of the enabled channels; ``ConfigError`` names the first bad
    key (a missing, unreadable or world-readable file, a malformed secret, one secret serving two
    purposes, a certificate that does not load)."""
    control = cfg.control
    insecure = control.allow_insecure_permissions
    http_tokens = http_tls = None
    http = control.http
    if http.enabled:
        files = http.token_files
        http_tokens = TokenStore.from_role_files(
            read=files.read,
            kill=files.kill,
            arm=files.arm,
            people=control.http_token_people,
            personal={
                person: (held.http_token_file, held.http_token_roles)
                for person, held in control.people.items()
                if held.http_token_file is not None
            },
            allow_insecure_permissions=insecure,
        )
    mqtt_password = mqtt_keys = mqtt_tls = None
    mqtt = control.mqtt
    if mqtt.enabled:
        if mqtt.password_file is not None:
            mqtt_password = read_secret_file(
                mqtt.password_file,
                what="control.mqtt.password_file",
                allow_insecure_permissions=insecure,
            )
        mqtt_keys = KeyStore.from_files(
            dict(mqtt.operator_key_files),
            roles=dict(mqtt.operator_key_roles),
            people=control.mqtt_key_people,
            allow_insecure_permissions=insecure,
        )
    notify_targets = _notify_targets(cfg)
    # Checked together: one secret must not serve two purposes.
    check_secrets_distinct(
        http_tokens,
        mqtt_keys,
        mqtt_password=mqtt_password,
        others={
            f"notify.webhooks.{t.name}.key_file": t.key.decode()
            for t in notify_targets
            if t.key is not None
        },
    )
    if http.enabled and http.tls_cert_file is not None and http.tls_key_file is not None:
        _readable(http.tls_cert_file, "control.http.tls_cert_file")
        _readable(http.tls_key_file, "control.http.tls_key_file")
        http_tls = server_ssl_context(http.tls_cert_file, http.tls_key_file)
    if mqtt.enabled and mqtt.tls:
        mqtt_tls = _client_tls(mqtt.tls_ca_file)
    return Credentials(
        http_tokens=http_tokens,
        http_tls=http_tls,
        mqtt_password=mqtt_password,
        mqtt_keys=mqtt_keys,
        mqtt_tls=mqtt_tls,
        notify_targets=notify_targets,
    )


def _notify_targets(cfg: Config) -> tuple[Target, ...]:
    """The notification targets with their URL and key files read and checked."""
    notify = cfg.notify
    insecure = cfg.control.allow_insecure_permissions
    targets: list[Target] = []
    for name, hook in notify.webhooks.items():
        where = f"notify.webhooks.{name}"
        url = hook.url
        if hook.url_file is not None:
            url = read_secret_file(
                hook.url_file, what=f"{where}.url_file", allow_insecure_permissions=insecure
            )
            if not url.startswith(("http://", "https://")):
                raise ConfigError(f"{where}.url_file", f"{hook.url_file} must hold an http(s) URL")
        key = read_secret_file(
            hook.key_file, what=f"{where}.key_file", allow_insecure_permissions=insecure
        )
        assert url is not None  # exactly one of url / url_file (config)
        targets.append(Target(name, "webhook", url, frozenset(hook.kinds), key=key.encode("utf-8")))
    for name, service in notify.apprise.items():
        where = f"notify.apprise.{name}"
        url = service.url
        key_name = f"{where}.url"
        if service.url_file is not None:
            key_name = f"{where}.url_file"
            url = read_secret_file(
                service.url_file, what=key_name, allow_insecure_permissions=insecure
            )
        assert url is not None
        try:
            apprise_for(url)
        except ValueError as exc:
            raise ConfigError(key_name, str(exc)) from exc
        targets.append(Target(name, "apprise", url, frozenset(service.kinds)))
    return tuple(targets)


def _readable(path: Path, key: str) -> None:
    try:
        with path.open("rb") as handle:
            handle.read(1)
    except OSError as exc:
        raise ConfigError(key, f"cannot read {path}: {exc.strerror or exc}") from exc


def _client_tls(ca_file: Path | None) -> ssl.SSLContext:
    if ca_file is None:
        return ssl.create_default_context()
    _readable(ca_file, "control.mqtt.tls_ca_file")
    try:
        return ssl.create_default_context(cafile=str(ca_file))
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError("control.mqtt.tls_ca_file", f"cannot load {ca_file}: {exc}") from exc
