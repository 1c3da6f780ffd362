"""The benchmarks' stream flood: updates at a target rate on the gateway's subscriptions."""

from __future__ import annotations

import asyncio

import pytest

from bench.streamflood import flood
from ibsim.gateway import SimGateway
from tests.ibapi_harness import IbapiClient

pytestmark = [pytest.mark.integration, pytest.mark.slow]

AAPL = 265598
MSFT = 272093


async def _subscribed(sim: SimGateway, client_id: int) -> IbapiClient:
    client = IbapiClient()
    await client.start(sim.port, client_id)
    client.reqPnL(1, "DU000001", "")
    client.reqPnLSingle(2, "DU000001", "", AAPL)
    client.reqPnLSingle(3, "DU000001", "", MSFT)
    await client.wait_for("pnlSingle", lambda a: a[0] == 3)
    return client


def _streamed(client: IbapiClient) -> int:
    return len(client.named("pnl")) + len(client.named("pnlSingle"))


async def test_flood_at_a_rate_then_about_that_many_stream_messages_arrive(
    sim: SimGateway,
) -> None:
    client = await _subscribed(sim, 3)
    try:
        before = _streamed(client)
        stats = await flood(sim, 2_000, 0.5)
        # answered behind the flood's last batch: once it is decoded, every flood message is too
        client.reqCurrentTime()
        await client.wait_for("currentTime")
        received = _streamed(client) - before
        assert stats.skipped == 0
        assert 400 <= stats.sent <= 1_000  # bounded by rate x seconds (lower: a busy CI host)
        assert received >= stats.sent  # plus the gateway's own once-a-second PnL round
        assert {a[0] for a in client.named("pnlSingle")} == {2, 3}
    finally:
        await client.stop()


async def test_flood_without_subscribers_then_nothing_sent_and_it_ends_on_time(
    sim: SimGateway,
) -> None:
    loop = asyncio.get_running_loop()
    started = loop.time()
    stats = await flood(sim, 1_000, 0.2)
    assert stats.sent == 0
    assert stats.skipped > 0
    assert loop.time() - started < 1.0


async def test_flood_with_bad_arguments_then_value_error(sim: SimGateway) -> None:
    with pytest.raises(ValueError):
        await flood(sim, 0, 1.0)
