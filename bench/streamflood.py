"""The stream flood the benchmarks drive through the simulated gateway (not part of it).

`flood(gateway, rate, seconds)` writes streaming updates (pnlSingle, pnl, last-price ticks) on
every subscription of every started client of an in-process `SimGateway` at a target rate, in
small batches, skipping (and counting) what a client's socket does not take: it measures what a
client absorbs and never grows memory without bound. `bench.simproc` starts it on command.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from ibsim import messages
from ibsim.gateway import TICK_LAST, Session, SimGateway


@dataclass(slots=True)
class FloodStats:
    """What one `flood` sent: `sent` written, `skipped` for a full client buffer."""

    target_per_s: float
    seconds: float
    sent: int = 0
    skipped: int = 0
    elapsed_s: float = 0.0

    @property
    def sent_per_s(self) -> float:
        return self.sent / self.elapsed_s if self.elapsed_s > 0 else 0.0


async def flood(
    gateway: SimGateway,
    events_per_s: float,
    seconds: float,
    *,
    tick_s: float = 0.001,
    max_buffer_bytes: int = 256 * 1024,
    stop: asyncio.Event | None = None,
    ticks: bool = True,
) -> FloodStats:
    """Send streaming updates to `gateway`'s subscribed clients at `events_per_s` for `seconds`.

    Each event is one message of a stream a client subscribed to: pnlSingle (reqPnLSingle),
    pnl (reqPnL) or a last-price tickPrice (reqMktData), round-robin over every stream of
    every started client. Values are the exchange's own, refreshed every 0.1 s. Events are
    sent in small batches every `tick_s`, so the gateway keeps answering requests in between.
    An event whose client already has `max_buffer_bytes` unsent is skipped (counted in
    `FloodStats.skipped`): the flood measures what a client absorbs, and never grows memory
    without bound. Bounded in time by `seconds` and in count by `events_per_s * seconds`;
    setting `stop` ends it early (with its stats, unlike cancelling the task). `ticks=False`
    leaves the market-data streams out (a tickPrice is two callbacks: tickPrice and tickSize).
    """
    if events_per_s <= 0 or seconds <= 0:
        raise ValueError("events_per_s and seconds must be positive")
    stats = FloodStats(target_per_s=events_per_s, seconds=seconds)
    loop = asyncio.get_running_loop()
    start = loop.time()
    end = start + seconds
    limit = int(events_per_s * seconds)
    max_batch = max(1, int(events_per_s * 0.05))  # after a stall, catch up 50 ms at most
    streams: list[tuple[Session, bytes]] = []
    refreshed = -1.0
    index = 0
    attempted = 0
    while attempted < limit:
        now = loop.time()
        if now >= end or (stop is not None and stop.is_set()):
            break
        if now - refreshed >= 0.1:
            streams = _frames(gateway, ticks=ticks)
            refreshed = now
        due = min(int((now - start) * events_per_s) - attempted, max_batch, limit - attempted)
        if due > 0 and not streams:
            stats.skipped += due  # nobody subscribed: nothing to send
            attempted += due
        elif due > 0:
            for _ in range(due):
                session, frame = streams[index % len(streams)]
                index += 1
                transport = session.writer.transport
                if (
                    session._closed
                    or transport.is_closing()
                    or transport.get_write_buffer_size() > max_buffer_bytes
                ):
                    stats.skipped += 1
                else:
                    session.writer.write(frame)
                    stats.sent += 1
            attempted += due
        await asyncio.sleep(tick_s)
    stats.elapsed_s = loop.time() - start
    return stats


def _frames(gateway: SimGateway, *, ticks: bool) -> list[tuple[Session, bytes]]:
    """One encoded message per subscribed stream of every started client (`ticks`: the
    market-data streams too, not only the PnL ones)."""
    out: list[tuple[Session, bytes]] = []
    for s in list(gateway.sessions.values()):
        version = s.client_version
        for req_id, (account, con_id) in s.subs.pnl_single.items():
            values = gateway.exchange.pnl_single(account, con_id)
            out.append((s, messages.pnl_single(req_id, *values).encode(version)))
        for req_id, account in s.subs.pnl.items():
            pnl = messages.pnl(req_id, *gateway.exchange.pnl(account))
            out.append((s, pnl.encode(version)))
        for req_id, con_id in s.subs.market_data.items():
            quote = gateway.exchange.quote(con_id)
            tick = messages.tick_price(req_id, TICK_LAST, quote.last, quote.last_size)
            out.append((s, tick.encode(version)))
    return out
