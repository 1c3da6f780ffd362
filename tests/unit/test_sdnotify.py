"""sd_notify against a real unix datagram socket standing in for systemd; the health watchdog."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from guardd.metrics import Metrics
from guardd.sdnotify import HealthWatchdog, Notifier, watchdog_interval
from tests.fake_systemd import FakeSystemd


@pytest.fixture
def notifier(systemd: FakeSystemd) -> Iterator[Notifier]:
    with Notifier(systemd.address) as sd:
        yield sd


def test_no_notify_socket_then_every_call_is_a_no_op() -> None:
    notifier = Notifier.from_env({})

    assert not notifier.enabled
    assert notifier.ready() is False
    assert notifier.watchdog() is False


def test_ready_status_stopping_then_arrive_at_the_socket(systemd: FakeSystemd) -> None:
    with Notifier.from_env({"NOTIFY_SOCKET": systemd.address}) as notifier:
        notifier.ready("synced, ARMED")
        notifier.status("HALTED by http\nsecond line")
        notifier.stopping()

    assert systemd.wait_for(3) == [
        "READY=1\nSTATUS=synced, ARMED",
        "STATUS=HALTED by http second line",
        "STOPPING=1",
    ]


def test_abstract_namespace_socket_then_messages_arrive() -> None:
    address = f"@guardd-test-{os.getpid()}-{time.monotonic_ns()}"
    fake = FakeSystemd(address)
    try:
        with Notifier(address) as notifier:
            sent = notifier.watchdog()

        assert sent is True
        assert fake.wait_for(1) == ["WATCHDOG=1"]
    finally:
        fake.close()


def test_socket_gone_then_send_fails_without_raising(tmp_path: Path) -> None:
    with Notifier(str(tmp_path / "nobody-listens")) as notifier:
        sent = notifier.ready()

    assert sent is False


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        ({"WATCHDOG_USEC": "10000000"}, 5.0),
        ({"WATCHDOG_USEC": "10000000", "WATCHDOG_PID": "1"}, None),
        ({"WATCHDOG_USEC": "10000000", "WATCHDOG_PID": str(os.getpid())}, 5.0),
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "ten"}, None),
        ({}, None),
    ],
)
def test_watchdog_environment_then_interval_is_half_or_none(
    environ: dict[str, str], expected: float | None
) -> None:
    assert watchdog_interval(environ) == expected


async def run_for(watchdog: HealthWatchdog, seconds: float) -> None:
    task = asyncio.create_task(watchdog.run(), name="watchdog")
    try:
        await asyncio.sleep(seconds)
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


async def test_healthy_guard_then_watchdog_pings_arrive(
    systemd: FakeSystemd, notifier: Notifier
) -> None:
    watchdog = HealthWatchdog(notifier, 0.05, lambda: True, max_loop_lag_s=0.5)

    await run_for(watchdog, 0.3)

    assert len(systemd.pings()) >= 3
    assert watchdog.withheld == 0


async def test_blocked_event_loop_then_pings_stop_until_it_recovers(
    systemd: FakeSystemd, notifier: Notifier
) -> None:
    watchdog = HealthWatchdog(notifier, 0.1, lambda: True, max_loop_lag_s=0.2, sample_s=0.02)
    task = asyncio.create_task(watchdog.run(), name="watchdog")
    await asyncio.sleep(0.25)

    blocked_at = time.monotonic()
    time.sleep(0.6)  # a wedged handler: nothing else on the loop runs  # noqa: ASYNC251
    unblocked_at = time.monotonic()
    await asyncio.sleep(0.4)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task

    assert systemd.pings(before=blocked_at), "pings before the block"
    # The first decision after the block saw the lag and withheld its ping.
    assert systemd.pings(after=blocked_at + 0.03, before=unblocked_at + 0.06) == []
    assert watchdog.withheld >= 1
    assert systemd.pings(after=unblocked_at + 0.06), "pings resume once the loop is responsive"


async def test_stalled_broker_then_pings_stop_and_resume_after(
    systemd: FakeSystemd, notifier: Notifier
) -> None:
    alive = [True]
    watchdog = HealthWatchdog(notifier, 0.05, lambda: alive[0], max_loop_lag_s=0.5)
    task = asyncio.create_task(watchdog.run(), name="watchdog")
    await asyncio.sleep(0.15)

    alive[0] = False
    stalled_at = time.monotonic()
    await asyncio.sleep(0.3)
    stalled_reason = watchdog.last_reason
    alive[0] = True
    revived_at = time.monotonic()
    await asyncio.sleep(0.2)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task

    assert systemd.pings(after=stalled_at + 0.03, before=revived_at) == []
    assert stalled_reason == "broker_stalled"
    assert watchdog.withheld >= 3
    assert systemd.pings(after=revived_at)


async def test_failing_health_check_then_ping_withheld(
    systemd: FakeSystemd, notifier: Notifier
) -> None:
    def broken() -> bool:
        raise RuntimeError("book lock poisoned")

    watchdog = HealthWatchdog(notifier, 0.05, broken, max_loop_lag_s=0.5)

    await run_for(watchdog, 0.2)

    assert systemd.pings() == []
    assert watchdog.last_reason == "broker_stalled"


async def test_withheld_ping_then_counted_by_reason_in_the_metric(
    systemd: FakeSystemd, notifier: Notifier
) -> None:
    registry = CollectorRegistry()
    metrics = Metrics(registry, account="DU1", version="test")
    watchdog = HealthWatchdog(
        notifier,
        0.05,
        lambda: False,
        max_loop_lag_s=0.5,
        on_withheld=metrics.count_watchdog_withheld,
    )

    await run_for(watchdog, 0.2)

    labels = {"account": "DU1", "reason": "broker_stalled"}
    counted = registry.get_sample_value("guardd_watchdog_withheld_total", labels)
    assert counted is not None and counted == watchdog.withheld >= 1
    lag = registry.get_sample_value(
        "guardd_watchdog_withheld_total", {**labels, "reason": "loop_lag"}
    )
    assert lag == 0
