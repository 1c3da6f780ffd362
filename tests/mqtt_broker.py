"""Control-plane test helpers: a real mosquitto on a free loopback port, and an in-memory guard.

Import the fixtures into a test module (``from tests.mqtt_broker import mqtt_broker``). The
broker is started with a config written to ``tmp_path`` (anonymous, or a password file; or the
deployment's own snippet, password users and ACL file: ``start_deployed_broker``), waited for until
it accepts connections, and stopped after the test. A missing ``mosquitto`` binary fails
the test with a clear message: these tests must not silently skip.

``MemoryHandler`` is a small real ``CommandHandler``: kill -> HALTED; arm -> ARMED unless a kill
breach holds and the arm is not forced (and, with a ``TwoPersonRule``, only on the second person).
It stands in for the app's wiring only.
"""

from __future__ import annotations

import base64
import hashlib
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from guardd.control.auth import TwoPersonRule
from guardd.control.commands import CommandOutcome, ControlCommand
from tests.conftest import free_port

MQTT_USER = "guardd"
MQTT_PASSWORD = "broker-password-0123"
ROOT = Path(__file__).resolve().parent.parent
DEPLOY_MOSQUITTO = ROOT / "deploy" / "mosquitto"


@dataclass(frozen=True, slots=True)
class Broker:
    """A running test broker."""

    host: str
    port: int
    username: str | None = None
    password: str | None = None


def mosquitto_binary() -> str:
    """The mosquitto executable (PATH, then the sbin directories), or fail the test."""
    found = shutil.which("mosquitto") or shutil.which(
        "mosquitto", path="/usr/sbin:/usr/local/sbin:/sbin"
    )
    if found is None:
        pytest.fail(
            "mosquitto is not installed (needed for the MQTT control tests): "
            "apt-get install -y mosquitto",
            pytrace=False,
        )
    return found


def _password_line(user: str, password: str) -> str:
    """A mosquitto 2.x password-file line ($7$: PBKDF2-SHA512, 101 iterations)."""
    salt = os.urandom(12)
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, 101, dklen=64)
    b64 = base64.b64encode
    return f"{user}:$7$101${b64(salt).decode()}${b64(digest).decode()}\n"


def _wait_accepting(proc: subprocess.Popen[bytes], port: int, log: Path) -> None:
    deadline = time.monotonic() + 10.0
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(
                f"mosquitto exited with {proc.returncode}: {log.read_text()}", pytrace=False
            )
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.02)
    pytest.fail(f"mosquitto did not accept on port {port} within 10 s: {log.read_text()}")


def start_broker(
    directory: Path,
    *,
    with_password: bool = False,
    port: int | None = None,
    conf_lines: Sequence[str] | None = None,
) -> tuple[Broker, Stopper]:
    """Start mosquitto in ``directory`` (on ``port``, or a free one); returns the broker and a
    function that stops it. ``conf_lines`` replaces the authentication lines (anonymous, or
    ``MQTT_USER``'s password file) with the caller's."""
    binary = mosquitto_binary()
    directory.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    lines = [f"listener {port} 127.0.0.1", "persistence false", "log_type error warning"]
    lines.append("user root" if os.geteuid() == 0 else "")
    if conf_lines is None:  # the deployment's snippet says it itself
        lines.append("set_tcp_nodelay true")  # as deploy/mosquitto/guardd.conf: no Nagle
    if conf_lines is not None:
        lines += conf_lines
    elif with_password:
        password_file = directory / "passwords"
        password_file.write_text(_password_line(MQTT_USER, MQTT_PASSWORD))
        password_file.chmod(0o600)
        lines += ["allow_anonymous false", f"password_file {password_file}"]
    else:
        lines.append("allow_anonymous true")
    conf = directory / "mosquitto.conf"
    conf.write_text("\n".join(lines) + "\n")
    log = directory / "mosquitto.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([binary, "-c", str(conf)], stdout=out, stderr=subprocess.STDOUT)
    _wait_accepting(proc, port, log)
    broker = Broker(
        "127.0.0.1",
        port,
        MQTT_USER if with_password else None,
        MQTT_PASSWORD if with_password else None,
    )
    return broker, Stopper(proc)


def start_deployed_broker(directory: Path, users: Mapping[str, str]) -> tuple[Broker, Stopper]:
    """Start mosquitto with the deployment's snippet (deploy/mosquitto/guardd.conf) and ACL
    (deploy/mosquitto/acl) as shipped, a password file holding ``users`` (name -> password) in
    place of the snippet's path, and a test listener. The broker's credentials are the guard's
    (``MQTT_USER``, which ``users`` must hold)."""
    directory.mkdir(parents=True, exist_ok=True)
    password_file = directory / "passwords"
    password_file.write_text("".join(_password_line(u, p) for u, p in users.items()))
    password_file.chmod(0o600)
    lines = []
    for line in (DEPLOY_MOSQUITTO / "guardd.conf").read_text().splitlines():
        key = line.partition(" ")[0]
        if key == "password_file":
            line = f"password_file {password_file}"
        elif key == "acl_file":
            line = f"acl_file {DEPLOY_MOSQUITTO / 'acl'}"
        elif key == "listener" or key.startswith(("certfile", "keyfile", "cafile")):
            line = ""  # the test listens on loopback without TLS
        lines.append(line)
    broker, stop = start_broker(directory, conf_lines=lines)
    return Broker(broker.host, broker.port, MQTT_USER, users[MQTT_USER]), stop


@dataclass(slots=True)
class Stopper:
    """Stops a broker process (once)."""

    proc: subprocess.Popen[bytes]

    def __call__(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)


@pytest.fixture
def mqtt_broker(tmp_path: Path) -> Iterator[Broker]:
    """A mosquitto allowing anonymous clients, on a free loopback port."""
    broker, stop = start_broker(tmp_path / "mosquitto")
    try:
        yield broker
    finally:
        stop()


@pytest.fixture
def mqtt_broker_with_password(tmp_path: Path) -> Iterator[Broker]:
    """A mosquitto requiring ``MQTT_USER`` / ``MQTT_PASSWORD``, on a free loopback port."""
    broker, stop = start_broker(tmp_path / "mosquitto-auth", with_password=True)
    try:
        yield broker
    finally:
        stop()


@dataclass
class MemoryHandler:
    """An in-memory guard: the state machine the control plane drives in these tests."""

    state: str = "ARMED"
    kill_breach_holds: bool = False
    is_ready: bool = True
    two_person: TwoPersonRule | None = None
    handled: list[ControlCommand] = field(default_factory=list)
    audited: list[Mapping[str, object]] = field(default_factory=list)

    async def handle(self, command: ControlCommand) -> CommandOutcome:
        self.handled.append(command)
        decision_id = f"d{len(self.handled)}"
        if command.action == "kill":
            self.state = "HALTED"
            if self.two_person is not None:
                self.two_person.clear()
            return CommandOutcome(True, self.state, f"killed by {command.principal}", decision_id)
        if self.state != "HALTED":
            return CommandOutcome(False, self.state, "re-arm refused: not halted", decision_id)
        if self.kill_breach_holds and not command.force:
            return CommandOutcome(False, self.state, "re-arm refused: kill breach holds")
        if self.two_person is not None:
            verdict = self.two_person.offer(command.principal, now=time.time())
            if not verdict.confirmed:
                return CommandOutcome(False, self.state, verdict.message, decision_id, True)
        self.state = "ARMED"
        return CommandOutcome(True, self.state, f"re-armed by {command.principal}", decision_id)

    def status(self) -> Mapping[str, object]:
        return {"state": self.state, "commands": len(self.handled)}

    def ready(self) -> bool:
        return self.is_ready

    def waiting_for(self) -> str | None:
        return None if self.is_ready else "ib_sync"

    def audit(self, record: Mapping[str, object]) -> None:
        self.audited.append(dict(record))
