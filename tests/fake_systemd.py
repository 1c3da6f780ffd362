"""systemd's notify socket, real: a bound unix datagram socket a guard sends sd_notify messages
to (READY=1, WATCHDOG=1, STATUS=...). The `systemd` fixture (import it by name) gives one at a
short path, as $NOTIFY_SOCKET."""

from __future__ import annotations

import os
import socket
import tempfile
import threading
import time
from collections.abc import Iterator

import pytest


class FakeSystemd:
    """A bound AF_UNIX datagram socket, read by a thread that stamps each message on arrival."""

    def __init__(self, address: str) -> None:
        self.address = address
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.bind(("\0" + address[1:]) if address.startswith("@") else address)
        self._sock.settimeout(0.02)
        self.received: list[tuple[float, str]] = []
        self._lock = threading.Condition()  # notified on every message
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read, name="fake-systemd", daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while not self._stop.is_set():
            try:
                data = self._sock.recv(4096)
            except TimeoutError:
                continue
            with self._lock:
                self.received.append((time.monotonic(), data.decode()))
                self._lock.notify_all()

    def messages(self) -> list[str]:
        with self._lock:
            return [m for _, m in self.received]

    def pings(self, after: float = 0.0, before: float = float("inf")) -> list[float]:
        """Arrival times of WATCHDOG=1 between `after` and `before` (monotonic)."""
        with self._lock:
            return [t for t, m in self.received if m == "WATCHDOG=1" and after < t < before]

    def wait_for(self, count: int, timeout: float = 2.0) -> list[str]:
        """Every message so far, once there are `count` (or `timeout` has passed)."""
        with self._lock:
            self._lock.wait_for(lambda: len(self.received) >= count, timeout)
            return [m for _, m in self.received]

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self._sock.close()


@pytest.fixture
def systemd() -> Iterator[FakeSystemd]:
    # A short directory: unix socket paths are limited to 108 bytes.
    directory = tempfile.mkdtemp(prefix="sdn", dir="/tmp")
    path = os.path.join(directory, "notify")
    fake = FakeSystemd(path)
    yield fake
    fake.close()
    os.unlink(path)
    os.rmdir(directory)
