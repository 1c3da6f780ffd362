"""The bounded buffer between the gateway's socket and the core, with its policy.

- Value updates are coalesced: a price, size or option tick, a position's value (pnlSingle or
  updatePortfolio), the account's PnL or an account value that arrives while an earlier one of
  the same contract (and field) still waits supersedes it: the earlier one is dropped and the
  new one queued in arrival order. The core sees exactly the order in which events arrived, less
  the values a later one made stale before it got to them.
- Nothing else is ever dropped or merged: orders, order statuses, executions, positions, errors,
  barriers and connection events are delivered one by one, in order.
- Bounded: at `high` buffered events the broker stops reading the socket (TCP pushes back on the
  gateway; what it sends waits in the kernel, and nothing is lost) until the core has taken the
  buffer down to `low`.

The kill path never passes through here: a kill is written to the socket by the paced sender.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Hashable
from typing import Final

from guardd.core import events as ev

HIGH: Final = 20_000
"""Buffered events at which reading stops."""
LOW: Final = 5_000
"""Buffered events at which reading resumes."""


def coalesce_key(event: ev.BrokerEvent) -> Hashable | None:
    """The key under which a later event replaces this one while it waits; None: never."""
    match event:
        case ev.PriceTick(con_id=con_id, field=field):
            return (ev.PriceTick, con_id, field)
        case ev.SizeTick(con_id=con_id, field=field):
            return (ev.SizeTick, con_id, field)
        case ev.OptionComputation(con_id=con_id, source=source):
            return (ev.OptionComputation, con_id, source)
        case ev.PositionValue(account=account, con_id=con_id):
            return (ev.PositionValue, account, con_id)
        case ev.PortfolioValue(account=account, con_id=con_id):
            return (ev.PortfolioValue, account, con_id)
        case ev.PnLUpdate(account=account):
            return (ev.PnLUpdate, account)
        case ev.AccountValue(account=account, key=key, currency=currency):
            return (ev.AccountValue, account, key, currency)
        case _:
            return None


class _Slot:
    __slots__ = ("event", "key")

    def __init__(self, event: ev.BrokerEvent, key: Hashable | None) -> None:
        self.event: ev.BrokerEvent | None = event
        self.key = key


class EventBuffer:
    """FIFO of broker events with value updates coalesced (see the module doc). One consumer."""

    def __init__(self, high: int = HIGH, low: int = LOW) -> None:
        self.high = high
        self.low = low
        self.coalesced = 0  # events replaced by a later one of the same key before delivery
        self._slots: deque[_Slot] = deque()
        self._waiting: dict[Hashable, _Slot] = {}
        self._ready = asyncio.Event()
        self._closed = False

    def __len__(self) -> int:
        """Slots held (superseded ones included until their turn: what memory holds)."""
        return len(self._slots)

    def put(self, event: ev.BrokerEvent) -> None:
        key = coalesce_key(event)
        slot = _Slot(event, key)
        if key is not None:
            stale = self._waiting.get(key)
            if stale is not None:
                stale.key = None
                stale.event = None  # superseded: skipped when its turn comes
                self.coalesced += 1
            self._waiting[key] = slot
        self._slots.append(slot)
        self._ready.set()

    def close(self) -> None:
        """No more events: `get` returns None once the buffer is empty (and ever after)."""
        self._closed = True
        self._ready.set()

    async def get(self) -> ev.BrokerEvent | None:
        """The next event, waiting for one; None once closed and empty."""
        while True:
            while not self._slots:
                if self._closed:
                    return None
                self._ready.clear()
                await self._ready.wait()
            slot = self._slots.popleft()
            if slot.event is None:
                continue  # superseded by a later value of the same key
            if slot.key is not None:
                del self._waiting[slot.key]
            return slot.event
