"""systemd readiness and watchdog: sd_notify over $NOTIFY_SOCKET, and a health-checked watchdog.

Under ``Type=notify`` the app sends ``READY=1`` once the latch is loaded and the broker is synced,
``STATUS=...`` lines that ``systemctl status`` shows, and ``STOPPING=1`` on the way out. With
``WatchdogSec=`` set, systemd passes ``$WATCHDOG_USEC`` and restarts the guard when no
``WATCHDOG=1`` arrives in time; `HealthWatchdog` pings only while the guard is healthy, so a
wedged guard (a blocked event loop, a broker adapter that broke its promise of a next sign of
life, an evaluate loop that stopped going round) is restarted.
Outside systemd ($NOTIFY_SOCKET unset) every call is a no-op.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
from collections.abc import Callable, Mapping
from typing import Self

import structlog

__all__ = ["HealthWatchdog", "Notifier", "watchdog_interval"]

log = structlog.stdlib.get_logger(__name__)


def _socket_address(value: str) -> str | None:
    """$NOTIFY_SOCKET as a sendto() address: a path, or ``@name`` for the abstract namespace."""
    if value.startswith("@"):
        return "\0" + value[1:]
    if value.startswith("/"):
        return value
    return None  # vsock and other forms are not used for services


class Notifier:
    """Sends sd_notify messages to `address` (the value of $NOTIFY_SOCKET); None does nothing.

    Use it with ``with`` (or call `close`) to release its socket.

    A failed send is logged and reported as False, never raised: the guard keeps guarding when
    systemd cannot be told about it.
    """

    def __init__(self, address: str | None) -> None:
        self.address = address
        self._target = _socket_address(address) if address else None
        self._sock: socket.socket | None = None
        if address and self._target is None:
            log.warning("sd_notify_socket_unsupported", notify_socket=address)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> Notifier:
        """A notifier for the $NOTIFY_SOCKET in `environ` (the entry point passes os.environ)."""
        return cls(environ.get("NOTIFY_SOCKET") or None)

    @property
    def enabled(self) -> bool:
        """True when messages go somewhere."""
        return self._target is not None

    def notify(self, *assignments: str) -> bool:
        """Send ``KEY=value`` lines in one datagram; True when sent (False when disabled)."""
        if self._target is None:
            return False
        payload = "\n".join(assignments).encode()
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                self._sock.setblocking(False)
            self._sock.sendto(payload, self._target)
        except OSError as exc:
            log.warning("sd_notify_failed", message=assignments[0], error=str(exc))
            return False
        return True

    def ready(self, status: str | None = None) -> bool:
        """``READY=1``: the latch is loaded and the broker synced; optionally with a status."""
        return self.notify("READY=1", *([f"STATUS={status}"] if status else []))

    def status(self, text: str) -> bool:
        """``STATUS=text``: one line for ``systemctl status``."""
        return self.notify(f"STATUS={' '.join(text.splitlines())}")

    def watchdog(self) -> bool:
        """``WATCHDOG=1``: the guard is healthy."""
        return self.notify("WATCHDOG=1")

    def stopping(self) -> bool:
        """``STOPPING=1``: shutting down on purpose."""
        return self.notify("STOPPING=1")

    def close(self) -> None:
        """Close the socket (a later send opens a new one)."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def watchdog_interval(
    environ: Mapping[str, str] = os.environ, pid: int | None = None
) -> float | None:
    """Seconds between watchdog pings: half of $WATCHDOG_USEC, or None when no watchdog is asked.

    $WATCHDOG_PID, when set, must name this process (`pid`, default ours): a watchdog meant for
    another process is not ours to feed.
    """
    usec = environ.get("WATCHDOG_USEC", "")
    if not usec.isdigit() or int(usec) == 0:
        return None
    watchdog_pid = environ.get("WATCHDOG_PID", "")
    if watchdog_pid and watchdog_pid != str(os.getpid() if pid is None else pid):
        return None
    return int(usec) / 2 / 1_000_000


class HealthWatchdog:
    """Feeds systemd's watchdog only while the event loop is responsive and the guard is alive.

    Every `sample_s` it measures how late its own sleep woke up (the event loop's lag) and keeps
    the worst lag seen. Every `interval_s` (from `watchdog_interval()`) it decides: it sends
    ``WATCHDOG=1`` when the worst lag since the last decision is under `max_loop_lag_s` and
    `alive()` is True (else the reason is ``broker_stalled``); otherwise it withholds the ping
    and logs why. With the interval
    at half of ``WatchdogSec`` one withheld ping is forgiven (a hiccup); two in a row and systemd
    restarts the guard. The HALTED latch is on disk, so a restarted guard comes back HALTED.

    The guard's `alive` (`Guard._alive`) asks whether the broker adapter keeps its promise
    of a next sign of life (`IbBroker.alive`) and the evaluate loop went round lately. It must
    answer "is the guard working?", not "is IB up?": while disconnected, a reconnect loop that
    keeps trying is alive. IB Gateway restarts every
    night; a guard that got itself restarted for it would lose its control plane for nothing.
    IB being down is an alert (``guardd_ib_connected``), not a reason to restart.
    """

    def __init__(
        self,
        notifier: Notifier,
        interval_s: float,
        alive: Callable[[], bool],
        *,
        max_loop_lag_s: float = 1.0,
        sample_s: float | None = None,
        clock: Callable[[], float] = time.monotonic,
        on_withheld: Callable[[str], None] | None = None,
    ) -> None:
        if interval_s <= 0 or max_loop_lag_s <= 0:
            raise ValueError("the watchdog interval and the loop lag bound must be positive")
        self._notifier = notifier
        self.interval_s = interval_s
        self._alive = alive
        self.max_loop_lag_s = max_loop_lag_s
        self.sample_s = min(interval_s / 4, 0.25) if sample_s is None else sample_s
        self._clock = clock
        self._on_withheld = on_withheld
        self.pings = 0
        """WATCHDOG=1 messages sent."""
        self.withheld = 0
        """Decisions that withheld the ping."""
        self.last_reason: str | None = None
        """Why the last ping was withheld ("loop_lag", "broker_stalled"), None after a ping."""

    async def run(self) -> None:
        """Ping (or not) until cancelled; the app runs this as a named task in its TaskGroup."""
        worst_lag = 0.0
        next_decision = self._clock()  # the first ping goes out at once
        while True:
            now = self._clock()
            if now >= next_decision:
                self._decide(worst_lag)
                worst_lag = 0.0
                next_decision = now + self.interval_s
            before = self._clock()
            await asyncio.sleep(self.sample_s)
            worst_lag = max(worst_lag, self._clock() - before - self.sample_s)

    def _decide(self, worst_lag: float) -> None:
        reason: str | None = None
        if worst_lag >= self.max_loop_lag_s:
            reason = "loop_lag"
        elif not self._safe_alive():
            reason = "broker_stalled"
        if reason is None:
            if self._notifier.watchdog():
                self.pings += 1
            if self.last_reason is not None:
                log.info("watchdog_resumed", after=self.last_reason)
            self.last_reason = None
            return
        self.withheld += 1
        if self._on_withheld is not None:
            self._on_withheld(reason)  # counted in guardd_watchdog_withheld_total
        if reason != self.last_reason:
            log.warning("watchdog_withheld", reason=reason, loop_lag_s=round(worst_lag, 4))
        self.last_reason = reason

    def _safe_alive(self) -> bool:
        try:
            return bool(self._alive())
        except Exception as exc:  # a failing health check is unhealthy, not a crash
            log.warning("watchdog_check_failed", error=repr(exc))
            return False
