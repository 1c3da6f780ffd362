"""IbBroker against the simulated gateway over TCP: the real ibapi client, no mocks."""

from __future__ import annotations

import asyncio
import contextlib
import copy
import socket
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from guardd.broker.buffer import EventBuffer
from guardd.broker.ib import (
    DATA_REQ_ID_BASE,
    READ_ONLY_PROBE_ID,
    ClientIdInUseError,
    IbBroker,
    reconnect_delay,
)
from guardd.broker.pacer import Lane
from guardd.core import events as ev
from guardd.errors import (
    AccountNotManagedError,
    BrokerConnectError,
    BrokerDisconnectedError,
    BrokerError,
)
from guardd.retry import RetryPolicy
from ibsim import codec
from ibsim.gateway import REQ_MKT_DATA, SimGateway
from ibsim.hours import US_EQUITY
from ibsim.scenario import parse_scenario
from ibsim.server import build_gateway
from tests.conftest import SCENARIO, eventually, free_port
from tests.ibapi_harness import IbapiClient, limit_order, stock

pytestmark = pytest.mark.integration

ACCOUNT = "DU000001"
AAPL, MSFT, ES = 265598, 272093, 620731015
GUARD_ID = 0  # the sim's master API client id
BOT_ID = 7


class Recorder:
    """Collects a broker's events in a background task; tests wait on predicates."""

    def __init__(self, broker: IbBroker) -> None:
        self.events: list[ev.BrokerEvent] = []
        self._changed = asyncio.Condition()
        self._task = asyncio.create_task(self._collect_loop(broker), name="test_collect_loop")

    async def _collect_loop(self, broker: IbBroker) -> None:
        async for event in broker.events():
            async with self._changed:
                self.events.append(event)
                self._changed.notify_all()

    def of(self, kind: type[Any]) -> list[Any]:
        return [e for e in self.events if isinstance(e, kind)]

    async def wait_for(
        self,
        kind: type[Any],
        pred: Callable[[Any], bool] = lambda e: True,
        *,
        count: int = 1,
        after: int = 0,
        timeout: float = 5.0,
    ) -> list[Any]:
        """Events of `kind` matching `pred` at index >= `after`, once there are `count`."""

        def hits() -> list[Any]:
            return [e for e in self.events[after:] if isinstance(e, kind) and pred(e)]

        async with self._changed:
            await asyncio.wait_for(self._changed.wait_for(lambda: len(hits()) >= count), timeout)
        return hits()

    def index(self, kind: type[Any], after: int = 0) -> int:
        return next(i for i, e in enumerate(self.events) if i >= after and isinstance(e, kind))

    async def close(self) -> None:
        await asyncio.wait_for(self._task, 5)


@pytest.fixture
async def guard(sim: SimGateway) -> AsyncIterator[tuple[IbBroker, Recorder]]:
    broker = IbBroker(
        "127.0.0.1",
        sim.port,
        GUARD_ID,
        ACCOUNT,
        connect_timeout_s=5.0,
        messages_per_second=40,
        reconnect_initial_s=0.2,
        reconnect_max_s=1.0,
    )
    await broker.start()
    recorder = Recorder(broker)
    try:
        yield broker, recorder
    finally:
        await broker.stop()
        await recorder.close()
        assert sim.pacing_violations == 0
        assert broker.pacing_violations == 0


@contextlib.asynccontextmanager
async def bot(sim: SimGateway) -> AsyncIterator[IbapiClient]:
    client = IbapiClient()
    await client.start(sim.port, BOT_ID)
    try:
        yield client
    finally:
        await stop_bot(client)


async def stop_bot(client: IbapiClient) -> None:
    """End a harness client by closing its socket and joining its run thread.

    `IbapiClient.stop()` calls `EClient.disconnect()`, which resets the client's server version
    while `run()` may still be decoding queued messages; the run thread then dies with a
    TypeError. Closing the socket lets `run()` drain its queue and end by itself.
    """
    sock = getattr(client.conn, "socket", None)
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
    thread = client._thread
    if thread is not None:
        await asyncio.to_thread(thread.join, 5.0)
        assert not thread.is_alive()


async def synced(recorder: Recorder, after: int = 0) -> None:
    await recorder.wait_for(ev.PositionsEnd, after=after)
    await recorder.wait_for(ev.OpenOrdersEnd, after=after)


def ibapi_threads() -> set[str]:
    return {t.name for t in threading.enumerate() if t.name.startswith("ibapi-")}


async def test_connect_then_positions_account_pnl_and_both_barriers(
    guard: tuple[IbBroker, Recorder], sim: SimGateway
) -> None:
    broker, recorder = guard

    await synced(recorder)
    await recorder.wait_for(ev.AccountValue, lambda e: e.key == "NetLiquidation")
    await recorder.wait_for(ev.AccountDownloadEnd)
    pnl = await recorder.wait_for(ev.PnLUpdate)
    # one value per position; a position's stream may tick again before the next one's first
    await recorder.wait_for(ev.PositionValue, lambda e: e.con_id == ES)
    values = await recorder.wait_for(ev.PositionValue, lambda e: e.con_id == AAPL)
    values = recorder.of(ev.PositionValue)

    connected = recorder.of(ev.Connected)
    assert len(connected) == 1 and recorder.index(ev.Connected) == 0
    assert ACCOUNT in connected[0].managed_accounts and connected[0].next_order_id >= 1
    positions = {e.con_id: e for e in recorder.of(ev.PositionUpdate)}
    assert positions[AAPL].quantity == 1000 and positions[AAPL].symbol == "AAPL"
    assert positions[ES].quantity == -2 and positions[ES].multiplier == 50
    assert recorder.index(ev.PositionUpdate) < recorder.index(ev.PositionsEnd)
    assert pnl[0].account == ACCOUNT
    assert {v.con_id for v in values} == {AAPL, ES}
    aapl_value = next(v for v in values if v.con_id == AAPL)
    assert aapl_value.value == pytest.approx(1000 * 190.0, rel=0.01)
    assert broker.connected


async def test_injected_clock_then_events_stamped_with_it(sim: SimGateway) -> None:
    async with IbBroker("127.0.0.1", sim.port, 3, ACCOUNT, 5.0, clock=lambda: 1234.5) as broker:
        recorder = Recorder(broker)
        await recorder.wait_for(ev.PositionsEnd)
    await recorder.close()
    assert recorder.events and all(e.ts == 1234.5 for e in recorder.events)


async def test_bot_places_order_then_master_sees_open_order_and_status(
    guard: tuple[IbBroker, Recorder], sim: SimGateway
) -> None:
    _, recorder = guard
    await synced(recorder)
    async with bot(sim) as client:
        order_id = client.named("nextValidId")[0][0]
        client.placeOrder(order_id, stock("MSFT"), limit_order("BUY", 10, 1.0))

        opened = await recorder.wait_for(
            ev.OpenOrder, lambda e: e.client_id == BOT_ID and e.order_id == order_id
        )
        status = await recorder.wait_for(
            ev.OrderStatus, lambda e: e.client_id == BOT_ID and e.status == "Submitted"
        )

    assert opened[0].symbol == "MSFT" and opened[0].action == "BUY"
    assert opened[0].quantity == 10 and opened[0].lmt_price == 1.0
    assert opened[0].perm_id > 0 and status[0].perm_id == opened[0].perm_id
    assert status[0].remaining == 10


async def test_global_cancel_then_bot_orders_cancelled_at_gateway(
    guard: tuple[IbBroker, Recorder], sim: SimGateway
) -> None:
    broker, recorder = guard
    await synced(recorder)
    async with bot(sim) as client:
        first = client.named("nextValidId")[0][0]
        for i in range(3):
            client.placeOrder(first + i, stock("MSFT"), limit_order("BUY", 10, 1.0 + i))
        await recorder.wait_for(
            ev.OrderStatus, lambda e: e.client_id == BOT_ID and e.status == "Submitted", count=3
        )
        assert len(sim.exchange.working_orders()) == 3

        await broker.global_cancel()

        await recorder.wait_for(
            ev.OrderStatus, lambda e: e.client_id == BOT_ID and e.status == "Cancelled", count=3
        )
    assert sim.exchange.working_orders() == []
    assert sim.global_cancels == 1


async def test_place_and_cancel_own_order_then_gateway_follows(
    guard: tuple[IbBroker, Recorder], sim: SimGateway
) -> None:
    broker, recorder = guard
    await synced(recorder)
    order_id = broker.next_order_id()
    assert broker.next_order_id() == order_id + 1

    await broker.place_order(
        order_id,
        con_id=MSFT,
        symbol="MSFT",
        action="BUY",
        quantity=5,
        order_type="LMT",
        lmt_price=2.0,
        order_ref="guardd:flatten:test",
        lane=Lane.FLATTEN,
    )
    opened = await recorder.wait_for(ev.OpenOrder, lambda e: e.order_id == order_id)
    assert opened[0].client_id == GUARD_ID and opened[0].order_ref == "guardd:flatten:test"
    assert len(sim.exchange.working_orders()) == 1

    await broker.cancel_order(order_id, Lane.KILL)
    await recorder.wait_for(
        ev.OrderStatus, lambda e: e.order_id == order_id and e.status == "Cancelled"
    )
    assert sim.exchange.working_orders() == []


async def test_watch_prices_then_bid_ask_ticks_for_the_contract(
    guard: tuple[IbBroker, Recorder], sim: SimGateway
) -> None:
    broker, recorder = guard
    await synced(recorder)

    broker.watch_prices([AAPL, ES])

    wanted = {(AAPL, "bid"), (AAPL, "ask"), (ES, "bid"), (ES, "ask")}
    ticks = await recorder.wait_for(ev.PriceTick, lambda t: (t.con_id, t.field) in wanted, count=4)
    while {(t.con_id, t.field) for t in ticks} < wanted:
        ticks = await recorder.wait_for(
            ev.PriceTick, lambda t: (t.con_id, t.field) in wanted, count=len(ticks) + 1
        )
    aapl_bid = next(t for t in ticks if t.con_id == AAPL and t.field == "bid")
    assert aapl_bid.price == pytest.approx(190.0, rel=0.01)


async def test_quiet_then_size_ticks_and_delayed_feed_then_ticks_marked_delayed(
    guard: tuple[IbBroker, Recorder], sim: SimGateway
) -> None:
    broker, recorder = guard
    await synced(recorder)
    broker.watch_prices([AAPL])
    # prices do not move (volatility 0): size ticks say the bid still stands
    await recorder.wait_for(ev.SizeTick, lambda t: t.con_id == AAPL and t.field == "bid", count=3)
    assert not [t for t in recorder.of(ev.PriceTick) if t.delayed]

    mark = len(recorder.events)
    sim.fault_market_data([AAPL], lag_s=0.2, delayed_ticks=True)
    sim.jump_price(AAPL, -0.05)

    delayed = await recorder.wait_for(
        ev.PriceTick, lambda t: t.con_id == AAPL and t.field == "last", after=mark
    )
    assert delayed[0].delayed and delayed[0].price < 185
    await recorder.wait_for(ev.SizeTick, lambda t: t.delayed, after=mark)

    mark = len(recorder.events)
    sim.clear_market_data_fault([AAPL])
    live = await recorder.wait_for(ev.PriceTick, lambda t: t.con_id == AAPL, after=mark)
    assert not live[0].delayed


async def test_gateway_drops_clients_then_disconnected_reconnected_and_resynced(
    guard: tuple[IbBroker, Recorder], sim: SimGateway
) -> None:
    broker, recorder = guard
    await synced(recorder)
    broker.watch_prices([AAPL])
    await recorder.wait_for(ev.PriceTick)
    old_id = broker.next_order_id()

    await sim.drop_all_clients(0.5)

    gone = await recorder.wait_for(ev.Disconnected)
    after = recorder.events.index(gone[0])
    await recorder.wait_for(ev.Connected, after=after, timeout=10)
    back = recorder.index(ev.Connected, after=after)
    await synced(recorder, after=back)
    await recorder.wait_for(ev.PriceTick, after=back)
    await recorder.wait_for(ev.PnLUpdate, after=back)
    assert broker.connected and broker.reconnects == 1
    # Order ids restart from the gateway's nextValidId, never from the old session's counter.
    reconnected = recorder.events[back]
    assert isinstance(reconnected, ev.Connected)
    assert broker.next_order_id() == reconnected.next_order_id
    assert reconnected.next_order_id == old_id  # the sim never saw order `old_id`


async def test_disconnected_then_requests_refused(
    guard: tuple[IbBroker, Recorder], sim: SimGateway
) -> None:
    broker, recorder = guard
    await synced(recorder)
    drop = asyncio.create_task(sim.drop_all_clients(1.0))
    await recorder.wait_for(ev.Disconnected)

    with pytest.raises(BrokerDisconnectedError):
        await broker.global_cancel()
    with pytest.raises(BrokerDisconnectedError):
        broker.next_order_id()
    await drop
    await recorder.wait_for(ev.Connected, count=2, timeout=10)


async def test_connectivity_notices_then_lost_and_restored_with_resync(
    guard: tuple[IbBroker, Recorder], sim: SimGateway
) -> None:
    _, recorder = guard
    await synced(recorder)
    mark = len(recorder.events)

    sim.connectivity_lost()
    await recorder.wait_for(ev.ConnectivityLost, after=mark)
    sim.connectivity_restored(data_lost=True)

    restored = await recorder.wait_for(ev.ConnectivityRestored, after=mark)
    assert restored[0].data_lost
    resync = recorder.events.index(restored[0])
    await synced(recorder, after=resync)  # 1101: everything was requested again
    await recorder.wait_for(ev.PnLUpdate, after=resync)


@dataclass
class SilentListener:
    port: int
    accepted: list[socket.socket]


@pytest.fixture
def silent_listener() -> Iterator[SilentListener]:
    """A TCP listener that accepts connections and never says a word."""
    server = socket.create_server(("127.0.0.1", 0))
    accepted: list[socket.socket] = []
    stop = threading.Event()

    def accept_loop() -> None:
        server.settimeout(0.1)
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                accepted.append(server.accept()[0])

    thread = threading.Thread(target=accept_loop, name="silent_listener", daemon=True)
    thread.start()
    try:
        yield SilentListener(server.getsockname()[1], accepted)
    finally:
        stop.set()
        thread.join(2)
        for conn in accepted:
            conn.close()
        server.close()


def read_until_closed(conn: socket.socket, timeout_s: float) -> bytes:
    """Everything the peer sent until it closed its end (TimeoutError if it never does)."""
    conn.settimeout(timeout_s)
    received = b""
    while chunk := conn.recv(4096):
        received += chunk
    return received


async def test_listener_never_answers_then_connect_error_within_timeout(
    silent_listener: SilentListener,
) -> None:
    broker = IbBroker("127.0.0.1", silent_listener.port, GUARD_ID, ACCOUNT, connect_timeout_s=0.5)
    started = time.monotonic()

    with pytest.raises(BrokerConnectError, match="handshake"):
        await broker.start()

    assert time.monotonic() - started < 3.0
    [conn] = silent_listener.accepted
    sent = await asyncio.to_thread(read_until_closed, conn, 2.0)
    assert sent.startswith(b"API\0")  # the handshake was sent, then the socket closed


async def test_stopped_while_the_handshake_is_never_answered_then_stop_bounded_and_closed(
    silent_listener: SilentListener,
) -> None:
    # Only the guard's own deadline (60 s here) or a stop ends a handshake nobody answers.
    broker = IbBroker("127.0.0.1", silent_listener.port, GUARD_ID, ACCOUNT, connect_timeout_s=60.0)
    task = asyncio.create_task(broker.start())
    await eventually(lambda: silent_listener.accepted, "a connect attempt", interval_s=0.01)
    await asyncio.sleep(0.2)  # waiting for the handshake's answer

    stopped_at = time.monotonic()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    await broker.stop()

    assert time.monotonic() - stopped_at < 2.0
    sent = await asyncio.to_thread(read_until_closed, silent_listener.accepted[0], 2.0)
    assert sent.startswith(b"API\0")
    assert not any(name.startswith("ibapi") for name in ibapi_threads())


async def test_connect_with_gateway_down_then_retries_until_it_listens() -> None:
    port = free_port()
    broker = IbBroker(
        "127.0.0.1",
        port,
        GUARD_ID,
        ACCOUNT,
        connect_timeout_s=2.0,
        reconnect_initial_s=0.05,
        reconnect_max_s=0.2,
        progress_slack_s=0.5,
    )
    task = asyncio.create_task(broker.connect())
    await asyncio.sleep(0.5)  # several refused attempts
    assert not task.done()
    assert broker.alive(), "a connect loop that keeps retrying is alive"

    async with build_gateway(parse_scenario(copy.deepcopy(SCENARIO)), host="127.0.0.1", port=port):
        await asyncio.wait_for(task, 10)
        assert broker.connected
        await broker.stop()


async def test_connect_to_a_login_without_the_account_then_raised_not_retried(
    sim: SimGateway,
) -> None:
    broker = IbBroker("127.0.0.1", sim.port, GUARD_ID, "U9999999", connect_timeout_s=5.0)

    with pytest.raises(AccountNotManagedError):
        await asyncio.wait_for(broker.connect(), 10)

    await broker.stop()


async def test_nothing_listening_then_connect_error() -> None:
    port = free_port()
    broker = IbBroker("127.0.0.1", port, GUARD_ID, ACCOUNT, connect_timeout_s=2.0)

    with pytest.raises(BrokerConnectError):
        await broker.start()


async def test_account_not_managed_then_refused(sim: SimGateway) -> None:
    broker = IbBroker("127.0.0.1", sim.port, GUARD_ID, "U9999999", connect_timeout_s=5.0)

    with pytest.raises(BrokerError, match="not managed"):
        await broker.start()

    await broker.stop()
    assert sim.pacing_violations == 0


async def test_client_id_in_use_then_connect_error(sim: SimGateway) -> None:
    async with bot(sim):
        broker = IbBroker("127.0.0.1", sim.port, BOT_ID, ACCOUNT, connect_timeout_s=5.0)
        with pytest.raises(BrokerConnectError, match="326"):
            await broker.start()


async def test_stop_then_threads_joined_and_events_end(sim: SimGateway) -> None:
    broker = IbBroker("127.0.0.1", sim.port, GUARD_ID, ACCOUNT, connect_timeout_s=5.0)
    await broker.start()
    recorder = Recorder(broker)
    await recorder.wait_for(ev.PositionsEnd)

    await broker.stop()

    await recorder.close()  # events() ended
    assert isinstance(recorder.events[-1], ev.Disconnected)
    assert recorder.events[-1].reason == "stopped"
    assert ibapi_threads() == set()
    assert sim.pacing_violations == 0


async def test_gateway_pacing_tighter_than_budget_then_error_100_counted() -> None:
    strict = copy.deepcopy(SCENARIO)
    strict["gateway"] |= {"pacing_limit": 3, "pacing_disconnect": False}
    async with (
        build_gateway(parse_scenario(strict), host="127.0.0.1", port=0) as gateway,
        IbBroker("127.0.0.1", gateway.port, GUARD_ID, ACCOUNT, 5.0, 40) as broker,
    ):
        recorder = Recorder(broker)
        # reqPositions, reqAllOpenOrders, reqAccountUpdates, reqPnL, reqExecutions in 0.1 s.
        errors = await recorder.wait_for(ev.BrokerMessage, lambda e: e.code == 100)
        await asyncio.sleep(0.3)  # let the rest of the burst be answered
        assert errors and broker.pacing_violations >= 1
        assert broker.pacing_violations == gateway.pacing_violations
        assert broker.connected  # this gateway only warns
    await recorder.close()


@pytest.mark.parametrize(
    ("attempt", "error", "draw", "expected"),
    [
        (1, BrokerConnectError("refused"), 0.0, 0.5),
        (2, BrokerConnectError("refused"), 0.0, 1.0),
        (4, BrokerConnectError("refused"), 0.5, 3.6),  # jitter: up to a fifth off
        (20, BrokerConnectError("refused"), 0.0, 30.0),  # capped
        (20, BrokerConnectError("refused"), 0.99, 24.06),  # capped, then jittered below the cap
        (1, ClientIdInUseError("326"), 0.0, 15.0),  # slower after 326
        (10, ClientIdInUseError("326"), 0.0, 30.0),  # the capped exponential wins when slower
    ],
)
def test_reconnect_attempt_then_backoff_grows_capped_and_slower_after_326(
    attempt: int, error: BaseException, draw: float, expected: float
) -> None:
    backoff_s = RetryPolicy(initial_s=0.5, max_s=30.0).delay(attempt, draw)

    delay = reconnect_delay(backoff_s, error, client_id_in_use_s=15.0)

    assert delay == pytest.approx(expected)


# ---- heartbeat: silent TCP death ----------------------------------------------------------------


@contextlib.asynccontextmanager
async def heartbeat_broker(
    sim: SimGateway, interval_s: float | None, timeout_s: float = 0.6
) -> AsyncIterator[tuple[IbBroker, Recorder]]:
    broker = IbBroker(
        "127.0.0.1",
        sim.port,
        GUARD_ID,
        ACCOUNT,
        connect_timeout_s=3.0,
        reconnect_initial_s=0.2,
        reconnect_max_s=0.5,
        heartbeat_interval_s=interval_s,
        heartbeat_timeout_s=timeout_s,
    )
    await broker.start()
    recorder = Recorder(broker)
    try:
        yield broker, recorder
    finally:
        await broker.stop()
        await recorder.close()


async def test_gateway_frozen_then_heartbeat_drops_session_and_reconnects_after_thaw(
    sim: SimGateway,
) -> None:
    async with heartbeat_broker(sim, 0.3, 0.6) as (broker, recorder):
        await synced(recorder)
        loop = asyncio.get_running_loop()

        frozen_at = loop.time()
        freeze = asyncio.create_task(sim.freeze(3.0))
        gone = await recorder.wait_for(ev.Disconnected, timeout=3.0)
        noticed_after = loop.time() - frozen_at
        assert "heartbeat" in gone[0].reason
        assert noticed_after <= 0.3 + 0.6 + 0.5, "noticed within interval + timeout"
        assert not broker.connected and broker.heartbeat_failures == 1
        after = recorder.events.index(gone[0])
        await freeze
        await recorder.wait_for(ev.Connected, after=after, timeout=8)
        back = recorder.index(ev.Connected, after=after)
        await synced(recorder, after=back)
        assert broker.connected
        assert sim.pacing_violations == 0


async def test_idle_gateway_answers_heartbeats_then_session_kept(sim: SimGateway) -> None:
    async with heartbeat_broker(sim, 0.2, 0.5) as (broker, recorder):
        await synced(recorder)
        await asyncio.sleep(1.5)  # heartbeats answered: no disconnect may come
        assert recorder.of(ev.Disconnected) == []
        assert broker.heartbeat_failures == 0
        assert sim.received_by_id[49] >= 4  # reqCurrentTime


async def test_heartbeat_disabled_then_no_periodic_current_time_requests(sim: SimGateway) -> None:
    async with heartbeat_broker(sim, None) as (_, recorder):
        await synced(recorder)
        await recorder.wait_for(ev.ServerTime)
        await asyncio.sleep(0.5)  # no periodic reqCurrentTime may follow
    assert sim.received_by_id[49] == 1  # once on connect: the gateway's clock, for market hours


async def test_connect_then_contract_hours_and_server_time_from_the_gateway(
    sim: SimGateway,
) -> None:
    # Arrange: the gateway's clock on Saturday noon in New York, stocks on US equity hours
    saturday = 1796490000.0  # 2026-12-05 12:00 New York
    sim.set_clock(saturday)
    sim.exchange.set_calendar(AAPL, US_EQUITY)
    async with heartbeat_broker(sim, None) as (_, recorder):
        # Act
        hours = await recorder.wait_for(ev.ContractHours, lambda e: e.con_id == AAPL)
        (server_time,) = await recorder.wait_for(ev.ServerTime)

    # Assert: the gateway's clock (whole seconds), and the stock's sessions around it
    assert server_time.server_time - saturday == pytest.approx(0, abs=2)
    aapl = hours[0].hours
    assert aapl.session_at(saturday) == "closed"
    assert aapl.session_at(saturday + 2 * 86400 - 2.5 * 3600) == "regular"  # Monday 09:30
    assert aapl.session_at(saturday + 2 * 86400 - 3 * 3600) == "extended"  # Monday 09:00


async def test_order_ids_roll_back_after_gateway_restart_then_working_ids_never_reused(
    guard: tuple[IbBroker, Recorder], sim: SimGateway
) -> None:
    broker, recorder = guard
    await synced(recorder)
    first = broker.next_order_id()
    await broker.place_order(
        first,
        con_id=MSFT,
        symbol="MSFT",
        action="BUY",
        quantity=5,
        order_type="LMT",
        lmt_price=2.0,
        order_ref="guardd:flatten:1:1",
        lane=Lane.FLATTEN,
    )
    await recorder.wait_for(ev.OpenOrder, lambda e: e.order_id == first)

    await sim.restart(0.5, next_order_id=first)

    gone = await recorder.wait_for(ev.Disconnected)
    after = recorder.events.index(gone[0])
    back = await recorder.wait_for(ev.Connected, after=after, timeout=10)
    assert back[0].next_order_id == first  # the gateway rolled back
    await synced(recorder, after=recorder.events.index(back[0]))
    second = broker.next_order_id()
    assert second != first and broker.order_ids_skipped >= 1
    await broker.place_order(
        second,
        con_id=MSFT,
        symbol="MSFT",
        action="BUY",
        quantity=5,
        order_type="LMT",
        lmt_price=2.5,
        order_ref="guardd:flatten:1:2",
        lane=Lane.FLATTEN,
    )
    await recorder.wait_for(ev.OpenOrder, lambda e: e.order_id == second)
    working = sorted((o.order_ref, o.lmt_price) for o in sim.exchange.working_orders())
    assert working == [("guardd:flatten:1:1", 2.0), ("guardd:flatten:1:2", 2.5)]


async def test_reserved_order_ids_then_never_handed_out(
    guard: tuple[IbBroker, Recorder], sim: SimGateway
) -> None:
    broker, recorder = guard
    await synced(recorder)
    first = broker.next_order_id()
    broker.reserve_order_ids([first + 1, first + 2])
    assert broker.next_order_id() == first + 3


async def test_close_in_progress_then_its_prices_go_ahead_of_a_subscription_backlog(
    sim: SimGateway,
) -> None:
    # Arrange: 10 messages a second, 5 of them kept for the kill path; 20 price subscriptions
    # queued (4 s of NORMAL's share), then MSFT's behind them
    broker = IbBroker(
        "127.0.0.1", sim.port, GUARD_ID, ACCOUNT, messages_per_second=10, kill_reserve=5
    )
    arrived: list[int] = []

    def on_message(client_id: int, msg_id: int, fields: list[str]) -> None:
        if client_id == GUARD_ID and msg_id == REQ_MKT_DATA:
            arrived.append(codec.decode_mkt_data_request(fields).contract.con_id)

    sim.on_message(on_message)
    await broker.start()
    recorder = Recorder(broker)
    try:
        await synced(recorder)
        backlog = list(range(900_001, 900_021))  # unknown contracts: answered with error 200
        broker.watch_prices(backlog)
        broker.watch_prices([MSFT])

        # Act: a close starts on AAPL and MSFT
        broker.closing([AAPL, MSFT])
        await recorder.wait_for(ev.PriceTick, lambda t: t.con_id == AAPL)
        await recorder.wait_for(ev.PriceTick, lambda t: t.con_id == MSFT)

        # Assert: both went ahead of the backlog (MSFT's queued request was moved, not doubled)
        assert sorted(arrived[:2]) == [AAPL, MSFT]
        assert arrived.count(AAPL) == 1 and arrived.count(MSFT) == 1
    finally:
        await broker.stop()
        await recorder.close()
    assert sim.pacing_violations == 0


# ---- order ids above every client's; data request ids apart; Read-only API --------------------


async def test_error_of_a_price_request_then_its_req_id_is_never_an_order_id(
    guard: tuple[IbBroker, Recorder], sim: SimGateway
) -> None:
    # Arrange
    broker, recorder = guard
    await synced(recorder)
    # Act: prices of a contract the gateway does not list (error 200 with the request's id)
    broker.watch_prices([999_999])
    error = await recorder.wait_for(ev.BrokerMessage, lambda e: e.code == 200)
    # Assert: request ids live far above order ids, so no child can be taken for it
    assert error[0].req_id >= DATA_REQ_ID_BASE > broker.next_order_id()


async def test_bot_order_ids_above_next_valid_id_then_guard_allocates_above_them(
    guard: tuple[IbBroker, Recorder], sim: SimGateway
) -> None:
    # Arrange: a bot works an order under id 700 after the guard's nextValidId (1)
    broker, recorder = guard
    await synced(recorder)
    async with bot(sim) as b:
        b.placeOrder(700, stock("MSFT"), limit_order("BUY", 1, 1.0))
        await recorder.wait_for(ev.OrderStatus, lambda e: e.order_id == 700)
        # Act
        order_id = broker.next_order_id()
        await broker.place_order(
            order_id,
            con_id=MSFT,
            symbol="MSFT",
            action="BUY",
            quantity=1,
            order_type="LMT",
            lmt_price=1.0,
            lane=Lane.FLATTEN,
        )
        # Assert: above the bot's id, and accepted (no 103)
        await recorder.wait_for(ev.OrderStatus, lambda e: e.order_id == order_id)
        assert order_id == 701
        assert [e for e in recorder.of(ev.BrokerMessage) if e.code == 103] == []


async def test_refresh_order_ids_then_next_id_from_reqids(
    guard: tuple[IbBroker, Recorder], sim: SimGateway
) -> None:
    # Arrange: the gateway's id floor for the guard jumps (ids it was told of, unseen by it)
    broker, recorder = guard
    await synced(recorder)
    sim._saw_order_id(GUARD_ID, 5000)
    # Act
    await broker.refresh_order_ids()
    # Assert
    assert broker.next_order_id() == 5001
    assert sim.received_by_id[8] == 1


async def test_read_only_api_then_said_once_probed_and_lifted(
    guard: tuple[IbBroker, Recorder], sim: SimGateway
) -> None:
    # Arrange
    broker, recorder = guard
    broker.read_only_probe_s = 0.1
    await synced(recorder)
    sim.set_read_only(True)
    # Act: a cancel refused with 321 (Read-Only)
    await broker.global_cancel()
    on = await recorder.wait_for(ev.ApiReadOnly)
    await recorder.wait_for(ev.BrokerMessage, lambda e: e.code == 321)
    probes = sim.read_only_refusals
    await eventually(lambda: sim.read_only_refusals >= probes + 2)  # the probe keeps asking
    sim.set_read_only(False)
    off = await recorder.wait_for(ev.ApiReadOnly, lambda e: not e.read_only)
    # Assert: one event each way; the probe's own answers are not emitted as errors
    assert on[0].read_only and not broker.read_only
    assert len(recorder.of(ev.ApiReadOnly)) == 2 and off
    assert all(e.req_id != READ_ONLY_PROBE_ID for e in recorder.of(ev.BrokerMessage))


async def test_socket_refuses_global_cancel_then_it_raises_and_is_not_counted_sent(
    guard: tuple[IbBroker, Recorder], sim: SimGateway
) -> None:
    # Arrange: connected and synced; then the socket takes no more writes, as the heartbeat's
    # abort leaves it, while the session still looks connected. ibapi does not raise on a failed
    # write: it reports it as an error callback (538 for reqGlobalCancel) on the sending thread.
    broker, recorder = guard
    await synced(recorder)
    session = broker._session
    assert session is not None
    session.conn.socket.shutdown(socket.SHUT_WR)
    assert broker.connected

    # Act / Assert: the kill's cancel fails (the executor defers it and repeats it on re-sync)
    with pytest.raises(BrokerDisconnectedError, match="538"):
        await broker.global_cancel()
    assert sim.global_cancels == 0


async def test_events_not_taken_then_reading_pauses_and_nothing_but_values_is_dropped(
    sim: SimGateway,
) -> None:
    # Arrange: a small buffer, and nobody taking events at first
    broker = IbBroker("127.0.0.1", sim.port, GUARD_ID, ACCOUNT, heartbeat_interval_s=None)
    broker._events = EventBuffer(high=50, low=10)
    await broker.start()
    try:
        # Act: 300 notices (never coalesced) while the buffer is not read
        for n in range(300):
            sim.broadcast_error(2104, f"notice {n}")
        await eventually(lambda: broker.events_held >= 1, "reading paused")
        assert len(broker._events) < 300  # the rest waits in the socket, not in memory
        recorder = Recorder(broker)

        # Assert: every notice arrives, in order, once the guard takes events again
        notices = await recorder.wait_for(
            ev.BrokerMessage, lambda e: e.message.startswith("notice "), count=300, timeout=10
        )
        assert [e.message for e in notices] == [f"notice {n}" for n in range(300)]
    finally:
        await broker.stop()
