"""Notifications ([notify]): a real guard on the simulated gateway tells a local HTTP receiver.

The receiver is an aiohttp server on a loopback port: the plain webhook posts to it (signed,
checked here with `verify`, as a receiver would), and apprise posts to it through its ``json://``
URL scheme. A receiver that fails or hangs must never delay a kill; failures, drops and the rate
limit are read from the guard's own metrics. The pure parts (`guardd.core.notices`) get unit
tests and hypothesis properties.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import structlog.testing
from aiohttp import web
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry

from guardd.config import NotifyConfig, parse_config
from guardd.control.commands import ControlCommand
from guardd.core.close import Record
from guardd.core.engine import Arm, Engine, Evaluation, Kill, State
from guardd.core.notices import Lasting, Notice, RateLimit, notice_of_close, notices_of
from guardd.core.rules import Finding
from guardd.credentials import load_credentials
from guardd.errors import ConfigError
from guardd.metrics import Metrics
from guardd.notifications import (
    SIGNATURE_HEADER,
    TIMESTAMP_HEADER,
    Notifications,
    Target,
    sign,
    verify,
)
from ibsim.gateway import SimGateway
from tests.conftest import eventually
from tests.guard_harness import ACCOUNT, flat, guard_config, running_guard

# ---- a local receiver -------------------------------------------------------------------------


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: bytes

    def json(self) -> dict[str, Any]:
        data: dict[str, Any] = json.loads(self.body)
        return data


@dataclass
class Receiver:
    """A local HTTP receiver: answers `status`, or, with `hang`, holds each request open until
    `release` is set (counted in `hanging`)."""

    url: str = ""
    status: int = 200
    hang: bool = False
    received: list[Received] = field(default_factory=list)
    hanging: int = 0
    release: asyncio.Event = field(default_factory=asyncio.Event)
    location: str | None = None  # answered with `status` as a redirect to here

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        if self.hang and not self.release.is_set():
            self.hanging += 1
            try:
                await self.release.wait()
            finally:
                self.hanging -= 1
            return web.Response(status=200)
        self.received.append(Received(request.path, dict(request.headers), body))
        headers = {"Location": self.location} if self.location is not None else None
        return web.Response(status=self.status, headers=headers)

    def kinds(self, path: str = "/hook") -> list[str]:
        return [r.json()["kind"] for r in self.received if r.path == path]


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    rx = Receiver()
    app = web.Application()
    app.router.add_post("/{tail:.*}", rx.handle)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    rx.url = f"http://127.0.0.1:{port}"
    try:
        yield rx
    finally:
        rx.release.set()
        await runner.cleanup()


def secret_file(directory: Path, name: str, text: str | None = None) -> Path:
    path = directory / name
    path.write_text(text if text is not None else secrets.token_urlsafe(32))
    path.chmod(0o600)
    return path


def notify_toml(
    receiver: Receiver,
    key_file: Path,
    *,
    extra: str = "",
    kinds: str = "",
    apprise: bool = False,
) -> str:
    text = f"""
[notify]
timeout_s = 1.0
attempts = 2
retry_backoff_s = 0.05
retry_backoff_max_s = 0.1
{extra}

[notify.webhooks.ops]
url = "{receiver.url}/hook"
key_file = "{key_file}"
{kinds}
"""
    if apprise:
        host = receiver.url.removeprefix("http://")
        text += f'\n[notify.apprise.phone]\nurl = "json://{host}/apprise"\n{kinds}\n'
    return text


def sample(guard: Any, name: str, **labels: str) -> float:
    value = guard.registry.get_sample_value(name, {"account": ACCOUNT, **labels})
    return 0.0 if value is None else float(value)


KILL = ControlCommand(action="kill", principal="ops", channel="cli", reason="drill")


# ---- the guard tells people ---------------------------------------------------------------------


async def test_kill_then_signed_webhook_says_kill_and_flat_confirmed_and_apprise_delivers(
    sim: SimGateway, tmp_path: Path, receiver: Receiver
) -> None:
    # Arrange: a flatten-mode guard with a webhook and an apprise json:// target
    key_file = secret_file(tmp_path, "hook.key")
    toml = '[kill]\nmode = "flatten"\n' + notify_toml(receiver, key_file, apprise=True)
    cfg = guard_config(sim.port, tmp_path / "state", toml)
    async with running_guard(cfg) as guard:
        # Act
        outcome = await guard.handle(KILL)
        await eventually(lambda: flat(sim), "flat at the gateway", timeout_s=15)
        await eventually(
            lambda: receiver.kinds() == ["kill", "flat_confirmed"], "kill, flat confirmed"
        )
        await eventually(
            lambda: sum(r.path == "/apprise" for r in receiver.received) == 2,
            "both through apprise",
        )
        sent = sample(guard, "guardd_notifications_sent_total", kind="kill", target="ops")

    # Assert: signed JSON with kind kill, the signature verifies under the key file's text
    assert outcome.accepted and outcome.state == "HALTED"
    hook = [r for r in receiver.received if r.path == "/hook"]
    kill = hook[0]
    assert verify(
        key_file.read_text().encode(),
        kill.body,
        kill.headers.get(TIMESTAMP_HEADER),
        kill.headers.get(SIGNATURE_HEADER),
        now=time.time(),
    )
    body = kill.json()
    assert body["kind"] == "kill"
    assert body["account"] == ACCOUNT
    assert body["details"]["reason"] == "drill"
    assert body["details"]["mode"] == "flatten"
    assert body["status"]["state"] == "HALTED"
    assert body["status"]["latch_durable"] is True
    assert hook[1].json()["details"]["decision_id"] == body["details"]["decision_id"]
    assert not verify(
        b"another key of enough length",
        kill.body,
        kill.headers.get(TIMESTAMP_HEADER),
        kill.headers.get(SIGNATURE_HEADER),
        now=time.time(),
    )
    # apprise's json:// posts its own JSON: title, message and type
    posts = [r.json() for r in receiver.received if r.path == "/apprise"]
    assert "HALTED: drill" in posts[0]["title"]
    assert posts[0]["type"] == "failure"
    assert "flat confirmed" in posts[1]["title"]
    assert sent == 1.0


async def test_receiver_hangs_then_kill_cancels_at_gateway_and_failures_counted(
    sim: SimGateway, tmp_path: Path, receiver: Receiver
) -> None:
    # Arrange: a receiver that holds every request open; the guard's first kill is stuck in it
    receiver.hang = True
    key_file = secret_file(tmp_path, "hook.key")
    cfg = guard_config(sim.port, tmp_path / "state", notify_toml(receiver, key_file))
    async with running_guard(cfg) as guard:
        await guard.handle(KILL)
        await eventually(lambda: receiver.hanging == 1, "the receiver hanging")
        cancels_before = sim.global_cancels

        # Act: a second kill (flatten) while the receiver still hangs
        outcome = await guard.handle(
            ControlCommand(
                action="kill", principal="ops", channel="cli", reason="again", mode="flatten"
            )
        )
        hanging_when_answered = receiver.hanging
        await eventually(lambda: sim.global_cancels > cancels_before, "the cancel at the gateway")
        hanging_when_cancelled = receiver.hanging
        await eventually(lambda: flat(sim), "flat while the receiver hangs", timeout_s=15)
        hanging_when_flat = receiver.hanging
        await eventually(
            lambda: (
                sample(guard, "guardd_notifications_failed_total", kind="kill", target="ops") == 2.0
            ),
            "both kill notifications counted failed",
            timeout_s=15,
        )
        sent = sample(guard, "guardd_notifications_sent_total", kind="kill", target="ops")

    # Assert: the kill was carried out and answered while the receiver held a request open
    assert outcome.accepted and outcome.state == "HALTED"
    assert hanging_when_answered == 1
    assert hanging_when_cancelled == 1
    assert hanging_when_flat == 1
    assert receiver.received == []
    assert sent == 0.0


async def test_receiver_fails_then_retried_and_counted_failed(
    sim: SimGateway, tmp_path: Path, receiver: Receiver
) -> None:
    # Arrange
    receiver.status = 500
    key_file = secret_file(tmp_path, "hook.key")
    cfg = guard_config(sim.port, tmp_path / "state", notify_toml(receiver, key_file))
    async with running_guard(cfg) as guard:
        # Act
        await guard.handle(KILL)
        await eventually(
            lambda: (
                sample(guard, "guardd_notifications_failed_total", kind="kill", target="ops") == 1.0
            ),
            "the kill notification counted failed",
        )
        state = guard.engine.state

    # Assert: tried `attempts` (2) times, then given up
    assert state == State.HALTED
    assert receiver.kinds() == ["kill", "kill"]


async def test_kills_over_the_rate_limit_then_dropped_and_counted(
    sim: SimGateway, tmp_path: Path, receiver: Receiver
) -> None:
    # Arrange: one notice of a kind per hour
    key_file = secret_file(tmp_path, "hook.key")
    toml = notify_toml(
        receiver, key_file, extra="rate_limit_count = 1\nrate_limit_window_s = 3600.0"
    )
    cfg = guard_config(sim.port, tmp_path / "state", toml)
    async with running_guard(cfg) as guard:
        # Act: three kills
        for _ in range(3):
            await guard.handle(KILL)
        await eventually(lambda: receiver.kinds() == ["kill"], "one kill notification")
        dropped = sample(
            guard, "guardd_notifications_dropped_total", kind="kill", reason="rate_limited"
        )
        global_cancels = sim.global_cancels

    # Assert
    assert dropped == 2.0
    assert global_cancels >= 1


async def test_latch_not_durable_and_lasting_disconnect_then_notified_and_resolved(
    sim: SimGateway, tmp_path: Path, receiver: Receiver
) -> None:
    # Arrange: disconnects notified after 0.3 s; a latch path that cannot be written
    key_file = secret_file(tmp_path, "hook.key")
    toml = notify_toml(
        receiver,
        key_file,
        extra="disconnect_after_s = 0.3",
        kinds='kinds = ["disconnected", "latch_not_durable"]',
    )
    cfg = guard_config(sim.port, tmp_path / "state", toml)
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    async with running_guard(cfg) as guard:
        good_path = guard.executor.latch_path
        guard.executor.latch_path = blocker / "latch.json"

        # Act: a kill whose latch cannot be written, then the path repaired; then a 1.5 s drop
        await guard.handle(KILL)
        await eventually(lambda: "latch_not_durable" in receiver.kinds(), "not durable")
        guard.executor.latch_path = good_path
        await eventually(lambda: guard.executor.latch_durable, "latch durable again")
        await eventually(lambda: receiver.kinds().count("latch_not_durable") == 2, "resolved")
        dropped_at = time.time()

        def of_the_drop() -> list[dict[str, Any]]:
            # (a slow first connect may have been notified too: told apart by its start)
            bodies = [r.json() for r in receiver.received]
            return [
                b
                for b in bodies
                if b["kind"] == "disconnected" and b["details"]["since"] >= dropped_at
            ]

        await sim.drop_all_clients(1.5)
        await eventually(lambda: len(of_the_drop()) == 2, "began and ended", timeout_s=15)

    # Assert: each condition told when it began, and when it ended (resolved)
    by_kind: dict[str, list[dict[str, Any]]] = {}
    for r in receiver.received:
        body = r.json()
        by_kind.setdefault(body["kind"], []).append(body)
    assert [b["resolved"] for b in by_kind["latch_not_durable"]] == [False, True]
    assert "cannot write latch" in by_kind["latch_not_durable"][0]["details"]["error"]
    assert [b["resolved"] for b in of_the_drop()] == [False, True]
    assert "kill" not in by_kind  # the target asked for two kinds only


async def test_kill_while_api_read_only_then_kill_and_read_only_notified_then_resolved(
    sim: SimGateway, tmp_path: Path, receiver: Receiver
) -> None:
    # Arrange: TWS's Read-Only API on; the guard probes for its end every 0.2 s
    key_file = secret_file(tmp_path, "hook.key")
    toml = notify_toml(receiver, key_file, kinds='kinds = ["kill", "read_only"]')
    cfg = guard_config(sim.port, tmp_path / "state", toml)
    async with running_guard(cfg) as guard:
        guard.broker.read_only_probe_s = 0.2
        sim.set_read_only(True)

        # Act: a kill the gateway refuses (321), then the operator switches Read-Only off
        await guard.handle(KILL)
        await eventually(lambda: "read_only" in receiver.kinds(), "read-only notified")
        sim.set_read_only(False)
        await eventually(lambda: receiver.kinds().count("read_only") == 2, "lifted")

    # Assert
    bodies = [r.json() for r in receiver.received]
    assert [b["kind"] for b in bodies] == ["kill", "read_only", "read_only"]
    assert [b["resolved"] for b in bodies[1:]] == [False, True]
    assert bodies[1]["status"]["ib_read_only"] is True
    assert bodies[1]["status"]["state"] == "HALTED"


# ---- the sender's queue -------------------------------------------------------------------------


async def test_full_queue_then_oldest_dropped_and_counted(receiver: Receiver) -> None:
    # Arrange: a queue of 2 behind a receiver that hangs
    receiver.hang = True
    registry = CollectorRegistry()
    metrics = Metrics(registry, account=ACCOUNT, version="test")
    cfg = NotifyConfig.model_validate({"queue_size": 2, "timeout_s": 30.0, "attempts": 1})
    target = Target("ops", "webhook", f"{receiver.url}/hook", frozenset({"warn"}), key=b"k" * 32)
    sender = Notifications([target], cfg, account=ACCOUNT, metrics=metrics)
    task = asyncio.create_task(sender.run())
    try:
        sender.publish(Notice("warn", "w0", "first", time.time()))
        await eventually(lambda: receiver.hanging == 1, "the first in flight")

        # Act: four more while the first hangs
        for n in range(1, 5):
            sender.publish(Notice("warn", f"w{n}", "more", time.time()))
        queued = sender.queued("ops")
        receiver.release.set()
        await eventually(lambda: len(receiver.received) == 2, "the queue delivered")
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    # Assert: the two oldest waiting (w1, w2) dropped, the newest two delivered
    dropped = registry.get_sample_value(
        "guardd_notifications_dropped_total",
        {"account": ACCOUNT, "kind": "warn", "reason": "queue_full"},
    )
    assert queued == 2
    assert dropped == 2.0
    assert [r.json()["title"] for r in receiver.received] == ["w3", "w4"]


@pytest.mark.parametrize("redirect", [False, True])
async def test_delivery_fails_then_log_never_shows_the_url_token(
    receiver: Receiver, redirect: bool
) -> None:
    # Arrange: a URL (from a url_file) that carries a token, which aiohttp cannot parse, or
    # which the receiver redirects to itself for ever
    token = "TOKEN-" + secrets.token_hex(16)
    url = f"{receiver.url}/hook/{token}" if redirect else f"http://[::1/hook/{token}"
    receiver.status, receiver.location = 307, url
    registry = CollectorRegistry()
    metrics = Metrics(registry, account=ACCOUNT, version="test")
    cfg = NotifyConfig.model_validate({"attempts": 1, "timeout_s": 5.0})
    sender = Notifications(
        [Target("ops", "webhook", url, frozenset({"warn"}), key=b"k" * 32)],
        cfg,
        account=ACCOUNT,
        metrics=metrics,
    )
    labels = {"account": ACCOUNT, "kind": "warn", "target": "ops"}
    task = asyncio.create_task(sender.run())
    try:
        with structlog.testing.capture_logs() as logs:
            # Act
            sender.publish(Notice("warn", "w", "m", time.time()))
            await eventually(
                lambda: (
                    registry.get_sample_value("guardd_notifications_failed_total", labels) == 1.0
                ),
                "the failure counted",
            )
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    # Assert: the failure is logged, and nothing logged holds the token
    assert [e["event"] for e in logs if e["event"] == "notification_failed"] == [
        "notification_failed"
    ]
    assert token not in repr(logs)


# ---- configuration and credentials -------------------------------------------------------------


def test_target_with_url_and_url_file_then_config_error_names_the_key(tmp_path: Path) -> None:
    text = f"""
account = "DU1"
state_dir = "{tmp_path}"
[ib]
client_id = 0
[notify.apprise.phone]
url = "json://127.0.0.1/x"
url_file = "{tmp_path / "url"}"
"""
    with pytest.raises(ConfigError) as caught:
        parse_config(text)
    assert "notify.apprise.phone.url" in str(caught.value)


def test_unknown_kind_then_config_error(tmp_path: Path) -> None:
    text = f"""
account = "DU1"
state_dir = "{tmp_path}"
[ib]
client_id = 0
[notify.webhooks.ops]
url = "https://example.invalid/hook"
key_file = "{tmp_path / "k"}"
kinds = ["kill", "lunch"]
"""
    with pytest.raises(ConfigError) as caught:
        parse_config(text)
    assert "notify.webhooks.ops.kinds" in str(caught.value)


def credentials_config(tmp_path: Path, notify: str) -> Any:
    return parse_config(
        f"""
account = "DU1"
state_dir = "{tmp_path}"
[ib]
client_id = 0
[control.http]
enabled = false
[metrics]
enabled = false
{notify}
"""
    )


def test_world_readable_webhook_key_then_config_error(tmp_path: Path) -> None:
    key = secret_file(tmp_path, "hook.key")
    key.chmod(0o644)
    cfg = credentials_config(
        tmp_path, f'[notify.webhooks.ops]\nurl = "http://127.0.0.1:9/h"\nkey_file = "{key}"'
    )
    with pytest.raises(ConfigError) as caught:
        load_credentials(cfg)
    assert caught.value.key_path == "notify.webhooks.ops.key_file"


def test_apprise_url_file_apprise_refuses_then_config_error(tmp_path: Path) -> None:
    url = secret_file(tmp_path, "phone.url", "nosuchscheme://token-abcdefghijklmnop")
    cfg = credentials_config(tmp_path, f'[notify.apprise.phone]\nurl_file = "{url}"')
    with pytest.raises(ConfigError) as caught:
        load_credentials(cfg)
    assert caught.value.key_path == "notify.apprise.phone.url_file"


def test_apprise_url_file_then_read_and_not_shown(tmp_path: Path) -> None:
    url = secret_file(tmp_path, "phone.url", "tgram://123456789:abcdefghijklmnopqrstuvwxyz/12345")
    cfg = credentials_config(tmp_path, f'[notify.apprise.phone]\nurl_file = "{url}"')
    targets = load_credentials(cfg).notify_targets
    assert [(t.name, t.channel) for t in targets] == [("phone", "apprise")]
    assert targets[0].url.startswith("tgram://")
    assert "abcdefgh" not in repr(targets[0])


def test_webhook_key_equal_to_a_token_then_config_error(tmp_path: Path) -> None:
    shared = secrets.token_urlsafe(32)
    key = secret_file(tmp_path, "hook.key", shared)
    token = secret_file(tmp_path, "token-kill", shared)
    cfg = parse_config(
        f"""
account = "DU1"
state_dir = "{tmp_path}"
[ib]
client_id = 0
[control.http.token_files]
kill = "{token}"
[notify.webhooks.ops]
url = "http://127.0.0.1:9/h"
key_file = "{key}"
"""
    )
    with pytest.raises(ConfigError) as caught:
        load_credentials(cfg)
    assert caught.value.key_path == "notify.webhooks.ops.key_file"


# ---- signing ----------------------------------------------------------------------------------


def test_signature_over_body_and_timestamp_then_verifies_and_tampering_fails() -> None:
    key, body, ts = b"k" * 32, b'{"kind":"kill"}', 1_700_000_000
    signature = sign(key, ts, body)
    assert signature.startswith("sha256=")
    assert verify(key, body, str(ts), signature, now=ts + 10)
    assert not verify(key, body + b" ", str(ts), signature, now=ts + 10)
    assert not verify(key, body, str(ts + 1), signature, now=ts + 10)
    assert not verify(key, body, str(ts), signature, now=ts + 301)  # stale: a replay
    assert not verify(key, body, None, signature, now=ts)


# ---- the pure notices -------------------------------------------------------------------------


def test_decisions_then_notices_of_kill_rearm_warn_reduce() -> None:
    engine = Engine()
    warn = Finding("leverage", "warn", 1.6, 1.5, "leverage 1.6 >= warn 1.5")
    reduce = Finding("volatility", "reduce", 0.9, 0.8, "vol high", target_leverage=0.5)
    kinds = []
    for item in (
        Evaluation((warn,)),
        Evaluation((reduce,)),
        Kill(source="http", principal="ops", reason="drill", mode="cancel"),
        Evaluation(()),
        Arm(principal="ops", reason="done", force=True),
    ):
        kinds.append([n.kind for n in notices_of(engine.step(item, 1.0), 1.0)])
    assert kinds == [["warn"], ["reduce"], ["kill"], [], ["rearm"]]


def test_refused_rearm_then_no_notice() -> None:
    engine = Engine()
    decision = engine.step(Arm(principal="ops", reason="nothing to re-arm"), 1.0)
    assert decision.refused
    assert notices_of(decision, 1.0) == ()


def test_close_records_then_only_flat_confirmed_notified() -> None:
    flat_record = Record("flat_confirmed", {"decision_id": 3, "round": 1, "children": 2})
    notice = notice_of_close(flat_record, 5.0)
    assert notice is not None and notice.kind == "flat_confirmed"
    assert notice.details["decision_id"] == 3
    assert notice_of_close(Record("child_order_filled", {}), 5.0) is None


def test_blip_shorter_than_after_then_nothing() -> None:
    watch = Lasting(5.0)
    assert [watch.observe(a, t) for a, t in ((True, 0.0), (True, 4.9), (False, 5.0))] == [
        None,
        None,
        None,
    ]
    assert [watch.observe(a, t) for a, t in ((True, 6.0), (True, 11.0), (False, 12.0))] == [
        None,
        "began",
        "ended",
    ]


@given(st.lists(st.tuples(st.booleans(), st.floats(0, 10)), max_size=60), st.floats(0, 5))
def test_lasting_then_began_and_ended_alternate(
    steps: list[tuple[bool, float]], after: float
) -> None:
    watch = Lasting(after)
    now, changes = 0.0, []
    for active, dt in steps:
        now += dt
        change = watch.observe(active, now)
        if change is not None:
            changes.append(change)
    assert changes == ["began", "ended"] * (len(changes) // 2) + ["began"] * (len(changes) % 2)


@given(
    st.lists(st.floats(0, 5), max_size=80),
    st.integers(1, 5),
    st.floats(0.5, 20),
)
def test_rate_limit_then_never_more_than_count_in_any_window(
    gaps: list[float], count: int, window: float
) -> None:
    limit = RateLimit(count, window)
    now, allowed = 0.0, []
    for gap in gaps:
        now += gap
        if limit.allow("kill", now):
            allowed.append(now)
    for i, start in enumerate(allowed):
        in_window = [t for t in allowed[i:] if t - start < window]
        assert len(in_window) <= count
    # a kind of its own is not limited by another's sends
    assert limit.allow("warn", now)
