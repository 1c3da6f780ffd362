"""The one retry policy: capped exponential back-off with jitter, for every loop that tries again.

A `RetryPolicy` says how long to wait before each next try: the first delay is `initial_s`, each
next one `factor` times longer, capped at `max_s`; then jitter takes up to `jitter` of it off
(each delay is drawn uniformly from ``[(1 - jitter) * d, d]``), so guards that lost the same
gateway or broker at the same moment do not all knock again at the same moment, and no delay is
ever longer than the cap. A `Backoff` counts the failed tries of one retried operation: `next`
gives the delay before the next try, `reset` starts again after a success.

Used by the IB connect and reconnect (`ib.reconnect_backoff_*_s`), the positions re-request, the
MQTT reconnect, the close loop after rejected children and notification deliveries
(`notify.retry_backoff*_s`). Each site's delays are parameters (tests pass tiny ones, the
simulator's drills take them from their config). There is no stop condition here: a retry loop
ends when its task is cancelled (shutdown), and a cancelled back-off sleep ends at once.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["Backoff", "RetryPolicy"]

DEFAULT_JITTER = 0.2
"""By default a delay is up to a fifth shorter than the exponential step it jitters."""


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Delays of capped exponential back-off with jitter (see the module doc), in seconds."""

    initial_s: float
    max_s: float
    jitter: float = DEFAULT_JITTER
    factor: float = 2.0

    def __post_init__(self) -> None:
        if not 0 < self.initial_s <= self.max_s:
            raise ValueError(f"need 0 < initial_s <= max_s, got {self.initial_s}, {self.max_s}")
        if not 0 <= self.jitter <= 1:
            raise ValueError(f"jitter must be within [0, 1], got {self.jitter}")
        if not 1 <= self.factor <= 16:
            raise ValueError(f"factor must be within [1, 16], got {self.factor}")

    def step(self, attempt: int) -> float:
        """The un-jittered delay after failed try `attempt` (1-based): `initial_s *
        factor**(attempt - 1)`, capped at `max_s`."""
        exponent = min(max(attempt - 1, 0), 64)  # 16**64 is past any cap, and no overflow
        return min(self.max_s, self.initial_s * self.factor**exponent)

    def delay(self, attempt: int, draw: float) -> float:
        """The delay after failed try `attempt`, jittered by `draw` in [0, 1) (0: the full
        step; towards 1: up to `jitter` of it taken off)."""
        return self.step(attempt) * (1.0 - self.jitter * draw)


class Backoff:
    """The failed tries of one retried operation under a `RetryPolicy`."""

    def __init__(self, policy: RetryPolicy, *, draw: Callable[[], float] = random.random) -> None:
        self.policy = policy
        self.attempts = 0  # failed tries since the last success
        self._draw = draw

    def next(self) -> float:
        """Count a failed try; the seconds to wait before the next one."""
        self.attempts += 1
        return self.policy.delay(self.attempts, self._draw())

    def reset(self) -> None:
        """A try succeeded: the next failure waits `initial_s` again."""
        self.attempts = 0

    async def sleep(self) -> float:
        """Count a failed try and wait before the next one (cancellable at once); the delay."""
        delay = self.next()
        await asyncio.sleep(delay)
        return delay
