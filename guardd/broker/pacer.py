"""The one paced sender: every message guardd sends to IB passes through here, kill path first.

IB allows about 50 messages a second per API client and answers more with error 100, after which
it may drop the client. guardd spends a smaller budget (default 40 a second) and splits it into
priority lanes: `Lane.KILL` (global cancel, kill-path cancels) always goes before `Lane.FLATTEN`
(close orders and their cancels) before `Lane.CLOSE_DATA` (what a close needs to read: prices of
the positions being closed, the re-sync it waits for) before `Lane.NORMAL` (every other
subscription and request) before `Lane.BACKGROUND` (per-position requests nothing waits for:
1,000 positions queue 2,000 of them at start, behind the account stream and the price lines).
Of the budget, `kill_reserve` messages a second are kept for the kill path: `Lane.NORMAL` and
`Lane.BACKGROUND` together never send more than `budget - kill_reserve` in any window, so a flood
of subscriptions can neither fill the window a kill arrives in nor starve a close of its prices.

Two layers:
- `MessageBudget` and `LaneQueue` are pure: no clock reads, no asyncio. `MessageBudget` is a token
  bucket (rate `budget / window`, capacity `burst`) for smooth spacing, capped by a sliding log so
  that no half-open window of `window` seconds ever holds more than `budget` sends — the way
  IB (and the simulated gateway) count. The sender's bucket holds `DEFAULT_BURST` tokens: a
  send that leaves late (the task woke a few milliseconds after its token was due, or the loop
  was busy) does not push every later token back, so the budget is spent in full; with a
  capacity of one token each late wake-up was lost for good (38.1-38.6 of 40 messages a second
  measured). The burst never lifts the window cap: at most `budget` sends (at most 49: the
  config keeps it under IB's 50) in any 1 s window, whatever the pattern.
- `PacedSender` owns one queue and one task (`_send_loop`) that drains the lanes in priority
  order. It sleeps until the next token is due and picks the lane only when it may send.
- The kill lane waits for nothing but the window cap: a kill message is written by `submit`
  itself, on the caller's turn (before the caller's next await, so before any fsync it does
  after), whenever the window has room, ahead of the spacing of the other lanes' messages; it
  spends a token like any other, so what follows is spaced from it. Only when the window is
  full (IB would answer error 100) is it queued, first in line.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Generic, TypeVar

import structlog

from guardd.errors import BrokerDisconnectedError

__all__ = [
    "DEFAULT_BURST",
    "DEFAULT_MESSAGES_PER_SECOND",
    "Lane",
    "LaneQueue",
    "MessageBudget",
    "PacedSender",
]

log = structlog.get_logger(__name__)

DEFAULT_MESSAGES_PER_SECOND = 40.0
"""guardd's default budget: IB's limit is 50 messages a second per client."""

DEFAULT_BURST = 4
"""Tokens the sender's bucket holds: up to 3 intervals (75 ms at 40 a second) of late wake-ups
are made up, never more than the budget in any window."""

T = TypeVar("T")


class Lane(IntEnum):
    """A priority lane of the sender; a lower value always goes first."""

    KILL = 0
    FLATTEN = 1
    CLOSE_DATA = 2  # market data and re-sync requests a close in progress waits for
    NORMAL = 3
    BACKGROUND = 4  # per-position requests nothing waits for (pnlSingle, contract hours)


class MessageBudget:
    """Pure send budget: a token bucket capped by a sliding window, driven by the caller's clock.

    At most `budget` sends fall in any half-open interval `[t, t + window)`, whatever the
    pattern of requests. Between bursts of at most `burst` messages, sends are spaced
    `window / budget` apart. The bucket is kept in its time form (GCRA: a theoretical arrival
    time), and every check compares absolute times, so `due(now)` is exactly the first time at
    which `try_take` succeeds — no rounding can leave a caller waiting for an epsilon forever.
    """

    def __init__(self, budget: int, *, window: float = 1.0, burst: int = 1, now: float) -> None:
        if budget < 1:
            raise ValueError("budget must be at least 1 message per window")
        if window <= 0:
            raise ValueError("window must be positive")
        if not 1 <= burst <= budget:
            raise ValueError("burst must be between 1 and budget")
        self.budget = budget
        self.window = window
        self.burst = burst
        self._interval = window / budget  # one token per interval
        self._tolerance = (burst - 1) * self._interval  # how far ahead a burst may run
        self._arrival = now  # theoretical arrival time of the next message at the full rate
        self._sent: deque[float] = deque()  # send times inside the last window

    def due(self, now: float) -> float:
        """The earliest time, not before `now`, at which one message may be sent."""
        while self._sent and now >= self._sent[0] + self.window:
            self._sent.popleft()
        due = max(now, self._arrival - self._tolerance)
        if len(self._sent) >= self.budget:
            # The send that must leave the window before one more fits in it.
            due = max(due, self._sent[-self.budget] + self.window)
        return due

    def delay(self, now: float) -> float:
        """Seconds from `now` until one message may be sent (0.0: now)."""
        return self.due(now) - now

    def try_take(self, now: float) -> bool:
        """Spend one message at `now` if the budget allows it; True when it was spent."""
        if self.due(now) > now:
            return False
        self._spend(now)
        return True

    def window_due(self, now: float) -> float:
        """The earliest time, not before `now`, at which the window has room for one more
        message, whatever the spacing (the only limit the kill lane keeps)."""
        while self._sent and now >= self._sent[0] + self.window:
            self._sent.popleft()
        if len(self._sent) >= self.budget:
            return max(now, self._sent[-self.budget] + self.window)
        return now

    def try_take_unspaced(self, now: float) -> bool:
        """Spend one message at `now` if the window has room, ahead of the spacing; the messages
        after it are spaced from it as from any other. True when it was spent."""
        if self.window_due(now) > now:
            return False
        self._spend(now)
        return True

    def _spend(self, now: float) -> None:
        self._arrival = max(self._arrival, now) + self._interval
        self._sent.append(now)


@dataclass(slots=True)
class LaneQueue(Generic[T]):
    """Pure FIFO queues per lane; `pop` takes from the most urgent non-empty lane."""

    _lanes: dict[Lane, deque[T]] = field(default_factory=lambda: {lane: deque() for lane in Lane})

    def push(self, lane: Lane, item: T) -> None:
        """Queue `item` at the back of `lane`."""
        self._lanes[lane].append(item)

    def pop(self) -> T:
        """The oldest item of the most urgent non-empty lane; IndexError when all are empty."""
        for lane in Lane:
            queue = self._lanes[lane]
            if queue:
                return queue.popleft()
        raise IndexError("pop from an empty LaneQueue")

    def drain(self) -> list[T]:
        """Remove and return everything queued, most urgent lane first."""
        items = [item for lane in Lane for item in self._lanes[lane]]
        for queue in self._lanes.values():
            queue.clear()
        return items

    def __len__(self) -> int:
        return sum(len(queue) for queue in self._lanes.values())

    def depth(self, lane: Lane) -> int:
        """How many items wait in `lane`."""
        return len(self._lanes[lane])

    def first_lane(self) -> Lane | None:
        """The lane `pop` would take from now; None when all are empty."""
        return next((lane for lane in Lane if self._lanes[lane]), None)


@dataclass(slots=True)
class _Outgoing:
    lane: Lane
    label: str
    send: Callable[[], None]
    sent: asyncio.Future[None]
    enqueued: float


def _retrieve(future: asyncio.Future[None]) -> None:
    # A caller may fire and forget; mark a failure as seen so asyncio does not log it as lost.
    if not future.cancelled():
        future.exception()


class PacedSender:
    """One queue and one task that send messages under a `MessageBudget`, most urgent lane first.

    Use as `async with PacedSender(...) as sender:`; `submit` queues a message and returns a
    future that completes when the message has been handed to the socket (or fails with the
    error the send raised). `clock` must be monotonic; it is only read on the event loop.

    `kill_reserve` messages of each window are kept for the kill path (every lane ahead of
    `Lane.NORMAL`): NORMAL and BACKGROUND messages also pass a second budget of
    `budget - kill_reserve`, so a window full of subscriptions still has room for a
    kill, which `submit` writes at once.
    """

    def __init__(
        self,
        messages_per_second: float = DEFAULT_MESSAGES_PER_SECOND,
        *,
        kill_reserve: int = 0,
        burst: int = DEFAULT_BURST,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        budget = max(1, math.floor(messages_per_second))
        if not 0 <= kill_reserve < budget:
            raise ValueError("kill_reserve must be at least 0 and less than the budget")
        self._clock = clock
        self._budget = MessageBudget(budget, window=1.0, burst=min(burst, budget), now=clock())
        normal = budget - kill_reserve
        self._normal = MessageBudget(normal, window=1.0, burst=min(burst, normal), now=clock())
        self.kill_reserve = kill_reserve
        self._queue: LaneQueue[_Outgoing] = LaneQueue()
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.sent_by_lane: dict[Lane, int] = dict.fromkeys(Lane, 0)

    async def __aenter__(self) -> PacedSender:
        self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def start(self) -> None:
        """Start the send task (idempotent)."""
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._send_loop(), name="paced_send_loop")

    async def stop(self) -> None:
        """Stop the send task; anything still queued fails with BrokerDisconnectedError."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self.fail_pending("sender stopped")

    def submit(self, lane: Lane, label: str, send: Callable[[], None]) -> asyncio.Future[None]:
        """Queue `send` (one message) on `lane`; the future completes once it is sent."""
        sent: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        sent.add_done_callback(_retrieve)
        item = _Outgoing(lane, label, send, sent, self._clock())
        if lane is Lane.KILL and not self._queue.depth(Lane.KILL) and self._task is not None:
            # Written now, on the caller's turn, when the window has room: a kill waits for
            # no task wake-up and no spacing behind other lanes' messages.
            now = item.enqueued
            if self._budget.try_take_unspaced(now):
                self._send(item)
                return sent
        self._queue.push(lane, item)
        self._wakeup.set()
        return sent

    def fail_pending(self, reason: str) -> int:
        """Fail every queued message with BrokerDisconnectedError(reason); returns how many."""
        dropped = self._queue.drain()
        for item in dropped:
            if not item.sent.done():
                item.sent.set_exception(BrokerDisconnectedError(f"{item.label} not sent: {reason}"))
        if dropped:
            log.warning("queued_messages_dropped", count=len(dropped), reason=reason)
        return len(dropped)

    def depth(self, lane: Lane) -> int:
        """How many messages wait in `lane`."""
        return self._queue.depth(lane)

    async def _send_loop(self) -> None:
        while True:
            if not self._queue:
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            now = self._clock()
            lane = self._queue.first_lane()
            # The kill lane keeps only the window cap; every other lane the spacing too.
            due = self._budget.window_due(now) if lane is Lane.KILL else self._budget.due(now)
            if due > now:
                await asyncio.sleep(due - now)
                continue
            lane = self._queue.first_lane()  # chosen again now, when a token is in hand
            shared = lane is not None and lane >= Lane.NORMAL  # NORMAL's share of the budget
            if shared:
                normal_due = self._normal.due(now)
                if normal_due > now:
                    # NORMAL has spent its share: wait for it, or for a more urgent message.
                    self._wakeup.clear()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._wakeup.wait(), normal_due - now)
                    continue
            took = (
                self._budget.try_take_unspaced(now)
                if lane is Lane.KILL
                else self._budget.try_take(now)
            )
            if not took:
                continue
            if shared:
                self._normal.try_take(now)
            item = self._queue.pop()
            if item.sent.done():  # the caller gave up waiting
                continue
            self._send(item)

    def _send(self, item: _Outgoing) -> None:
        """Hand one message to the socket (its budget already spent) and settle its future."""
        try:
            item.send()
        except Exception as exc:  # the send function translates; never kill the loop
            log.warning("message_send_failed", label=item.label, error=str(exc))
            item.sent.set_exception(exc)
            return
        self.sent_by_lane[item.lane] += 1
        item.sent.set_result(None)
        if item.lane < Lane.NORMAL:
            log.info(
                "message_sent",
                label=item.label,
                lane=item.lane.name,
                queued_s=round(self._clock() - item.enqueued, 4),
            )
