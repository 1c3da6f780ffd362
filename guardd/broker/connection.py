"""Connection supervision: connect, handshake, reconnect, liveness, stop.

No threads: the socket is read and written by the event loop, and ibapi's own framing and
`Decoder` run there (`guardd.broker.session`, `guardd.broker.wire`); the handshake
`EClient.connect` would do is done here (`_connect_once`), bounded by `connect_timeout_s`. Each
connection attempt is an `IbSession` (one EClient + EWrapper); its callbacks reach
`IbConnection.on_items` in order and become events in the bounded `EventBuffer`
(`guardd.broker.buffer`: value updates coalesced, reading paused while it is full). Requests are
sent from the event loop through the one `PacedSender`.

Connection life: `__aenter__` (`start`) connects once and raises BrokerConnectError when it cannot
(timeout, refused, client id in use, account not managed by the login); `connect` keeps trying
with the reconnect back-off instead (a guard started while its gateway is down), raising only
AccountNotManagedError. After that the `_reconnect_loop` keeps the session alive: a drop emits
`Disconnected`, then the broker reconnects under the retry policy (`guardd.retry`: capped,
jittered exponential back-off from `ib.reconnect_backoff_min_s` to `_max_s`; at least
`client_id_in_use_wait_s` after error 326), never giving up while it runs.

Stopping is bounded: `stop` aborts the socket of the session and of any connect attempt; there
is no thread to wait for.

Liveness (`alive`, for the systemd watchdog): the adapter promises its next sign of life and
keeps the promise. Connected, every message from the gateway is one, and the heartbeat makes one
due every `heartbeat_interval_s + heartbeat_timeout_s`; disconnected, each connect attempt and
each back-off sleep promise the next attempt. A reconnect loop that keeps retrying is alive; one
wedged (an attempt that never ends) breaks its promise and is not; a callback that never returns
blocks the event loop itself, which the watchdog's own loop-lag check sees.

Silent TCP death (a NAT or firewall forgets the connection; nothing is closed, nothing arrives) is
noticed by an application heartbeat: every `heartbeat_interval_s` the session sends reqCurrentTime
on the NORMAL lane, and when nothing at all (the answer or any other message) arrives within
`heartbeat_timeout_s` of it being written, the session is dropped as dead and the reconnect loop
takes over.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import socket
import time
from collections.abc import AsyncIterator, Callable
from typing import Final, Self

import structlog

from guardd.broker.buffer import EventBuffer
from guardd.broker.pacer import DEFAULT_MESSAGES_PER_SECOND, Lane, PacedSender
from guardd.broker.session import Accounts, IbSession, Pong, SessionProtocol
from guardd.core import events as ev
from guardd.core.ibcodes import IbCode
from guardd.errors import (
    AccountNotManagedError,
    BrokerConnectError,
    BrokerDisconnectedError,
    GuarddError,
)
from guardd.retry import Backoff, RetryPolicy

log = structlog.get_logger("guardd.broker.ib")


YIELD_EVERY: Final = 256
"""`events` gives the loop a turn after this many events taken from a backlog."""
TURN_BUDGET_S: Final = 0.001
"""... or once the events taken in this turn (and the consumer's work on them) took this long
(checked every CHECK_EVERY events): the loop's longest stretch in the fold."""
CHECK_EVERY: Final = 8
ABORT_GRACE_S: Final = 2.5
"""Slack on the liveness promise of a connect attempt, beyond its own `connect_timeout_s`."""


class ClientIdInUseError(BrokerConnectError):
    """Error 326: another session already uses guardd's client id at the gateway."""


def reconnect_delay(
    backoff_s: float, error: BaseException | None, *, client_id_in_use_s: float
) -> float:
    """Seconds before the next connect attempt: the retry policy's `backoff_s` (`guardd.retry`),
    and after error 326 (our client id still held by a session the gateway has not noticed is
    dead) at least `client_id_in_use_s`."""
    if isinstance(error, ClientIdInUseError):
        return max(backoff_s, client_id_in_use_s)
    return backoff_s


class IbConnection:
    """The supervised connection to TWS / IB Gateway: one live `IbSession` at a time.

    Subclasses handle what arrives (`_on_item`), subscribe after every connect (`_on_connected`)
    and add their own state (`_init_state`, called at the end of `__init__`).
    """

    def __init__(
        self,
        host: str,
        port: int,
        client_id: int,
        account: str,
        connect_timeout_s: float = 10.0,
        messages_per_second: float = DEFAULT_MESSAGES_PER_SECOND,
        *,
        kill_reserve: int = 0,
        clock: Callable[[], float] = time.time,
        reconnect_initial_s: float = 0.5,
        reconnect_max_s: float = 30.0,
        client_id_in_use_wait_s: float = 15.0,
        heartbeat_interval_s: float | None = 5.0,
        heartbeat_timeout_s: float = 5.0,
        progress_slack_s: float = 5.0,
    ) -> None:
        self.host = host
        self.port = port
        self.client_id = client_id
        self.account = account
        self.connect_timeout_s = connect_timeout_s
        self.clock = clock
        self.reconnect = RetryPolicy(reconnect_initial_s, reconnect_max_s)
        self.client_id_in_use_wait_s = client_id_in_use_wait_s
        self.heartbeat_interval_s = heartbeat_interval_s  # None: no heartbeat
        self.heartbeat_timeout_s = heartbeat_timeout_s
        self.heartbeat_failures = 0
        # Liveness: the monotonic time by which the adapter promised its next sign of life
        # (None: nothing promised yet, not started); `progress_slack_s` is added to each promise.
        self.progress_slack_s = progress_slack_s
        self._alive_until: float | None = None
        self._messages_per_second = messages_per_second
        self._kill_reserve = kill_reserve
        self._loop: asyncio.AbstractEventLoop | None = None
        self._sender: PacedSender | None = None
        self._session: IbSession | None = None
        self._attempt: IbSession | None = None  # the latest connect attempt's session
        self._sessions = itertools.count(1)
        self._lost = asyncio.Event()
        self._reconnect_task: asyncio.Task[None] | None = None
        self._stopping = False
        self._stopped = False
        self._events = EventBuffer()
        self._held = False  # reading paused: the event buffer is full
        self.events_held = 0
        self.reconnects = 0
        self._init_state()

    def _init_state(self) -> None:
        """Set up a subclass's own state (called last by `__init__`)."""

    # ---- lifecycle -------------------------------------------------------------------------

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        assert self._loop is not None, "IbBroker is used outside `async with`"
        return self._loop

    @property
    def connected(self) -> bool:
        """True while a session is up and announced (`Connected` emitted, not yet dropped)."""
        return self._session is not None and self._session.announced

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def alive(self) -> bool:
        """True while the adapter keeps its promise of a next sign of life (see the module doc):
        it answers "is the adapter working?", not "is IB up?"."""
        if self._stopped or self._alive_until is None:
            return True  # not started, or stopped on purpose: nothing is due
        task = self._reconnect_task
        if task is not None and task.done():
            return False  # nothing would ever reconnect
        if self.heartbeat_interval_s is None and self.connected:
            return True  # without a heartbeat a quiet session cannot be told from a dead one
        return time.monotonic() <= self._alive_until

    def _expect_progress(self, within_s: float) -> None:
        self._alive_until = time.monotonic() + within_s + self.progress_slack_s

    def _heard(self) -> None:
        """A message of the live session arrived: the next one is due within a heartbeat."""
        interval = self.heartbeat_interval_s
        if interval is not None:
            self._expect_progress(interval + self.heartbeat_timeout_s)

    async def connect(self) -> None:
        """Connect, retrying with the reconnect back-off until connected, then keep the
        connection alive (as `start`). Only AccountNotManagedError is raised: the login does not
        manage the account, which no retry mends. Cancel it to give up (bounded, see `stop`)."""
        backoff = Backoff(self.reconnect)
        while True:
            try:
                await self.start()
                return
            except AccountNotManagedError:
                raise
            except BrokerConnectError as exc:
                # Not fatal: the gateway may be restarting (it does every night).
                await self._back_off(backoff, exc, "ib_connect_failed")

    async def start(self) -> None:
        """Connect once (raising BrokerConnectError on failure), then keep the connection alive."""
        self._loop = asyncio.get_running_loop()
        self._sender = PacedSender(self._messages_per_second, kill_reserve=self._kill_reserve)
        self._sender.start()
        try:
            await self._connect_once()
        except BaseException:
            await self._sender.stop()
            if self._attempt is not None:
                self._attempt.abort()
            raise
        self._reconnect_task = asyncio.create_task(self._reconnect_loop(), name="ib_reconnect_loop")

    async def stop(self) -> None:
        """Disconnect, end the reconnect loop and the sender (bounded: nothing is joined)."""
        if self._stopped:
            return
        self._stopping = True
        task, self._reconnect_task = self._reconnect_task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self._stop_tasks()
        session = self._session
        if session is not None:
            session.abort()
            await cancelled(session.heartbeat_task)
            await cancelled(session.positions_retry_task)
        if self._attempt is not None:
            self._attempt.abort()
        if self._sender is not None:
            await self._sender.stop()
        if session is not None and self._session is session:
            self._end_session(session, "stopped")
        self._stopped = True
        self._events.close()
        log.info("broker_stopped", client_id=self.client_id)

    async def events(self) -> AsyncIterator[ev.BrokerEvent]:
        """Every BrokerEvent in arrival order (value updates coalesced, see `EventBuffer`),
        until the broker stops."""
        buffer = self._events
        clock = time.perf_counter
        taken = 0
        turn_started = clock()
        while True:
            if not buffer:  # `get` waits: the turn ends there
                event = await buffer.get()
                taken = 0
                turn_started = clock()
            else:
                event = await buffer.get()
            if event is None:
                return
            if self._held and len(buffer) <= buffer.low:
                self._hold(False)
            yield event
            taken += 1
            if taken == YIELD_EVERY or (
                taken % CHECK_EVERY == 0 and clock() - turn_started >= TURN_BUDGET_S
            ):
                # A backlog is folded in turns: a kill or a command is served in between.
                await asyncio.sleep(0)
                taken = 0
                turn_started = clock()

    @property
    def events_coalesced(self) -> int:
        """Value updates replaced by a later one before the guard took them."""
        return self._events.coalesced

    def _hold(self, held: bool) -> None:
        """Pause (True) or resume reading from the gateway: the event buffer is full / has room."""
        self._held = held
        if held:
            self.events_held += 1
            log.warning("broker_events_held", buffered=len(self._events))
        session = self._session
        if session is not None:
            session.hold(held)

    # ---- connecting ------------------------------------------------------------------------

    async def _connect_once(self) -> None:
        """One attempt: socket and handshake, startApi, managedAccounts and nextValidId, then
        resubscribe. Bounded by `connect_timeout_s` as a whole."""
        session = IbSession(self, next(self._sessions))
        self._attempt = session
        deadline = self.loop.time() + self.connect_timeout_s
        self._expect_progress(self.connect_timeout_s + ABORT_GRACE_S)

        log.info("broker_connecting", host=self.host, port=self.port, client_id=self.client_id)
        where = f"{self.host}:{self.port}"
        try:
            async with asyncio.timeout_at(deadline):
                transport, _ = await self.loop.create_connection(
                    lambda: SessionProtocol(session), self.host, self.port
                )
                no_delay(transport.get_extra_info("socket"))
                await asyncio.shield(session.handshaken)
        except TimeoutError as exc:
            session.abort()
            raise BrokerConnectError(
                f"no API handshake from {where} within {self.connect_timeout_s} s"
            ) from exc
        except OSError as exc:  # refused, unreachable; or closed during the handshake
            session.abort()
            raise BrokerConnectError(f"cannot connect to {where}: {exc}") from exc
        except BaseException:  # cancelled (stopping)
            session.abort()
            raise
        self._session = session
        session.clientId = self.client_id
        session.host, session.port = self.host, self.port
        session.startApi()
        session.connectAck()
        if self._held:
            session.hold(True)
        try:
            remaining = max(0.0, deadline - self.loop.time())
            await asyncio.wait_for(asyncio.shield(session.ready), remaining)
        except TimeoutError as exc:
            self._give_up(session)
            raise BrokerConnectError(
                f"no managedAccounts / nextValidId within {self.connect_timeout_s} s"
            ) from exc
        except BaseException:
            self._give_up(session)
            raise
        log.info(
            "broker_connected",
            client_id=self.client_id,
            server_version=session.serverVersion(),
            accounts=list(session.managed or ()),
            next_order_id=session.next_id,
        )
        self._on_connected(session)
        # The gateway's clock at once: market hours are judged at its time.
        self._request(session, Lane.NORMAL, "reqCurrentTime", lambda s: s.reqCurrentTime())
        if self.heartbeat_interval_s is not None:
            session.heartbeat_task = asyncio.create_task(
                self._heartbeat_loop(session), name="ib_heartbeat_loop"
            )

    async def _heartbeat_loop(self, session: IbSession) -> None:
        """Send reqCurrentTime every interval; drop the session when nothing answers in time.

        The timeout counts from the moment the request was written to the socket, so a paced
        queue full of kill-lane work never passes for a dead connection; any message after the
        write counts as an answer (a gateway busy streaming is alive).
        """
        interval = self.heartbeat_interval_s
        assert interval is not None
        timeout = self.heartbeat_timeout_s
        while self._session is session:
            await asyncio.sleep(interval)
            if self._session is not session:
                return
            session.heard.clear()  # before the write, so a quick answer is never missed
            sent = self._request(
                session, Lane.NORMAL, "reqCurrentTime", lambda s: s.reqCurrentTime()
            )
            try:
                await sent
            except GuarddError:
                return  # the session is already gone
            try:
                await asyncio.wait_for(session.heard.wait(), timeout)
            except TimeoutError:
                if self._session is not session:
                    return
                self.heartbeat_failures += 1
                session.drop_reason = f"no answer to a heartbeat within {timeout:g} s"
                log.error(
                    "ib_heartbeat_missed",
                    timeout_s=timeout,
                    client_id=self.client_id,
                    total=self.heartbeat_failures,
                )
                session.abort()  # the session ends; the reconnect loop takes over
                return

    def _give_up(self, session: IbSession) -> None:
        session.abort()
        if self._session is session:
            self._end_session(session, "connect attempt abandoned")

    def on_session_ended(self, session: IbSession) -> None:
        """The socket of `session` closed (the gateway, a drop or `stop`)."""
        if not session.ready.done():
            code, text = session.last_error or (0, "connection closed during the handshake")
            error_type = (
                ClientIdInUseError if code == IbCode.CLIENT_ID_IN_USE else BrokerConnectError
            )
            session.ready.set_exception(error_type(f"IB error {code}: {text}"))
        if self._session is session:
            reason = "connection closed"
            if self._stopping:
                reason = "stopped"
            elif session.drop_reason is not None:
                reason = session.drop_reason
            elif session.last_error is not None:
                reason = f"connection closed after IB error {session.last_error[0]}"
            was_up = session.announced
            self._end_session(session, reason)
            if was_up and not self._stopping:
                self._lost.set()  # a failed attempt is retried by the attempt's own caller

    def _end_session(self, session: IbSession, reason: str) -> None:
        self._session = None
        for task in (session.heartbeat_task, session.positions_retry_task):
            if task is not None and task is not asyncio.current_task():
                task.cancel()
        if session.announced:
            self._emit(ev.Disconnected(reason=reason, ts=self.clock()))
            log.warning("broker_disconnected", reason=reason, client_id=self.client_id)
        if self._sender is not None:
            self._sender.fail_pending(reason)

    async def _reconnect_loop(self) -> None:
        """Wait for a lost session and connect again, backing off, for as long as we run."""
        while True:
            await self._lost.wait()
            self._lost.clear()
            backoff = Backoff(self.reconnect)
            while True:
                try:
                    await self._connect_once()
                    break
                except Exception as exc:  # swallowed here only: log, back off, never give up
                    await self._back_off(backoff, exc, "broker_reconnect_failed")
            self.reconnects += 1

    async def _back_off(self, backoff: Backoff, error: Exception, event: str) -> None:
        """Log a failed connect attempt and wait before the next one, promising it (liveness)."""
        delay = reconnect_delay(
            backoff.next(), error, client_id_in_use_s=self.client_id_in_use_wait_s
        )
        log.warning(event, error=str(error), attempt=backoff.attempts, retry_in_s=round(delay, 3))
        self._expect_progress(delay)  # the back-off promises the next attempt
        await asyncio.sleep(delay)

    # ---- callbacks on the loop -------------------------------------------------------------

    def _emit(self, event: ev.BrokerEvent) -> None:
        buffer = self._events
        buffer.put(event)
        if not self._held and len(buffer) >= buffer.high:
            self._hold(True)

    def on_items(self, session: IbSession, items: list[object]) -> None:
        """Callbacks of `session` crossed into the loop, in the order they were decoded."""
        if session is self._session:
            self._heard()
        for item in items:
            self._on_item(session, item)

    def _on_item(self, session: IbSession, item: object) -> None:
        """Handle one callback on the event loop, in the order it was decoded: the
        handshake's and the heartbeat's here, every other message in `_on_message`."""
        if session is not self._session:
            if isinstance(item, ev.BrokerMessage):
                session.last_error = (item.code, item.message)
            return  # a late message of a session we already gave up
        session.heard.set()
        match item:
            case Pong(epoch_s=epoch_s, ts=ts):
                # An answer without its time field arrives from ibapi as 0: no time, not 1970
                # (it would put the gateway's clock 56 years behind and misjudge market hours).
                if epoch_s > 0:
                    self._emit(ev.ServerTime(server_time=float(epoch_s), ts=ts))
            case Accounts(accounts=accounts):
                session.managed = accounts
                self._maybe_announce(session)
            case _:
                self._on_message(session, item)

    def _on_message(self, session: IbSession, item: object) -> None:
        """One message of the live session other than the handshake's and the heartbeat's."""

    def _on_connected(self, session: IbSession) -> None:
        """A session was announced: subscribe to what the Book needs."""

    async def _stop_tasks(self) -> None:
        """End a subclass's background tasks (called by `stop` before the session closes)."""

    def _maybe_announce(self, session: IbSession) -> None:
        if session.managed is None or session.first_order_id is None or session.ready.done():
            return
        if self.account not in session.managed:
            session.ready.set_exception(
                AccountNotManagedError(
                    f"account {self.account} is not managed by this login "
                    f"(managedAccounts: {', '.join(session.managed) or 'none'}); "
                    "reqGlobalCancel reaches every account of a login: run one guardd per login"
                )
            )
            return
        session.announced = True
        self._emit(
            ev.Connected(
                server_version=int(session.serverVersion() or 0),
                managed_accounts=session.managed,
                next_order_id=session.first_order_id,
                ts=self.clock(),
            )
        )
        session.ready.set_result(None)

    def _request(
        self, session: IbSession, lane: Lane, label: str, call: Callable[[IbSession], None]
    ) -> asyncio.Future[None]:
        """Queue one ibapi request for `session` on the paced sender."""
        assert self._sender is not None

        def send() -> None:
            if (
                session is not self._session
                or not session.isConnected()
                or session.drop_reason is not None  # aborted: the socket is shut down
            ):
                raise BrokerDisconnectedError(f"{label}: not connected to IB")
            session.send_error = None
            call(session)
            if session.send_error is not None:  # never counted as sent: a kill is retried
                raise BrokerDisconnectedError(f"{label} not sent: {session.send_error}")

        return self._sender.submit(lane, label, send)


def no_delay(sock: socket.socket | None) -> None:
    """TCP_NODELAY on a connected socket: each request (a kill's reqGlobalCancel above all)
    leaves at once instead of waiting, under Nagle, for the ACK of the one before."""
    if sock is not None:
        with contextlib.suppress(OSError):  # closed already: the session ends anyway
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


async def cancelled(task: asyncio.Task[None] | None) -> None:
    """Cancel a task and wait for it to end."""
    if task is None or task.done():
        return
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


def settle(future: asyncio.Future[None], exc: BaseException | None) -> None:
    if future.done():
        return
    if exc is None:
        future.set_result(None)
    else:
        future.set_exception(exc)
