"""The broker adapter: the official `ibapi` client bridged into asyncio as a stream of BrokerEvents.

`IbBroker` is the adapter the guard uses. It is built in layers, one seam each:
- `guardd.broker.session`: one connection (an EClient that is its own EWrapper); its callbacks
  become events by the pure converters of `guardd.broker.convert`;
- `guardd.broker.connection`: connection supervision (connect, handshake, reconnect, heartbeat,
  liveness, bounded stop);
- `guardd.broker.requests`: subscriptions, order ids (nextValidId / reqIds), placing and
  cancelling orders;
- this module: what the adapter does with what arrives (errors and IB's notices, the Read-only
  API, positions whose quantity is unknown).

Unset values (see `guardd.broker.convert`): a quantity ibapi reports as unset is NaN, unknown. A
position of the guarded account whose quantity arrives unset is asked for again: reqPositions
under the retry policy `positions_retry` (1 s doubling up to 30 s, jittered), at most
`positions_retries` times until every quantity is known again (logged `positions_rerequested`;
`positions_retries_exhausted` once the bound is reached; a new connection starts afresh).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import random
from typing import Final, cast

import structlog
from ibapi.order_cancel import OrderCancel

from guardd.broker.connection import (
    ClientIdInUseError,
    cancelled,
    reconnect_delay,
)
from guardd.broker.pacer import Lane
from guardd.broker.requests import (
    DATA_REQ_ID_BASE,
    READ_ONLY_PROBE_ID,
    IbRequests,
    relist_positions,
)
from guardd.broker.session import HoursUnreadable, IbSession, NextId
from guardd.core import events as ev
from guardd.core.ibcodes import IbClass, IbCode, ib_class
from guardd.errors import GuarddError
from guardd.retry import RetryPolicy

__all__ = [
    "DATA_REQ_ID_BASE",
    "READ_ONLY_PROBE_ID",
    "ClientIdInUseError",
    "IbBroker",
    "reconnect_delay",
]

log = structlog.get_logger(__name__)

POSITIONS_RETRY: Final = RetryPolicy(initial_s=1.0, max_s=30.0)
"""After a position quantity arrives unset: the first reqPositions again after about a second,
each next one after about twice as long as the one before, up to 30 s (`guardd.retry`)."""
POSITIONS_RETRIES: Final = 8
"""At most this many reqPositions again per connection while quantities stay unknown (the
bound resets once every quantity is known again)."""


class IbBroker(IbRequests):
    """guardd's connection to TWS / IB Gateway as the Master API client.

    Use as `async with IbBroker(host, port, client_id, account) as broker:` and read
    `async for event in broker.events()`. Every request goes through one PacedSender; a request
    made while disconnected raises BrokerDisconnectedError (the caller's latch carries a kill
    over to the next `Connected`).
    """

    def _init_state(self) -> None:
        super()._init_state()
        # TWS's Read-Only API (error 321): orders and cancels are refused until it is switched off.
        self.read_only = False
        self.read_only_probe_s = 5.0
        self._read_only_task: asyncio.Task[None] | None = None
        self.pacing_violations = 0
        # Asking again for positions whose quantity arrived unset (see the module doc).
        self.positions_retry = POSITIONS_RETRY
        self.positions_retries = POSITIONS_RETRIES
        self.positions_rerequests = 0

    async def _stop_tasks(self) -> None:
        await cancelled(self._read_only_task)

    # ---- what arrives, on the loop ---------------------------------------------------------

    def _on_message(self, session: IbSession, item: object) -> None:
        match item:
            case HoursUnreadable(con_id=con_id, why=why):
                log.warning("contract_hours_unreadable", con_id=con_id, error=why)
            case NextId(order_id=order_id):
                self._on_next_id(session, order_id)
            case ev.BrokerMessage():
                self._on_error(session, item)
            case ev.OpenOrder() | ev.OrderStatus() | ev.Execution():
                self._saw_order_id(item.order_id)
                self._emit(item)
            case ev.PositionUpdate():
                # IB's position() often leaves the exchange empty: FX is on IDEALPRO only
                fx = item.sec_type == "CASH"
                self._exchanges.setdefault(item.con_id, item.exchange or ("IDEALPRO" if fx else ""))
                self._emit(item)
                if item.account == self.account:
                    if session.relist is not None:
                        session.relist[1].add(item.con_id)
                    self._position_quantity(session, item)
                if item.account == self.account and item.con_id not in session.pnl_single_con:
                    self._request_position_value(session, item.con_id)
                if item.account == self.account and item.con_id not in session.hours_con:
                    self._request_hours(session, item.con_id)
            case ev.PositionsEnd():
                self._positions_end(session, item)
            case _:
                self._emit(cast(ev.BrokerEvent, item))

    def _positions_end(self, session: IbSession, item: ev.PositionsEnd) -> None:
        """positionEnd: the end of a download; the one asked for again says which contracts
        IB still lists (an unknown position it leaves out is no longer held)."""
        self._emit(item)
        session.positions_ends += 1
        relist = session.relist
        if relist is None or relist[0] != session.positions_ends:
            return
        session.relist = None
        listed = frozenset(relist[1])
        self._emit(
            ev.PositionsListed(account=self.account, con_ids=listed, ts=item.ts, asked=relist[2])
        )
        for con_id in [c for c in session.unknown_positions if c not in listed]:
            symbol = session.unknown_positions.pop(con_id)
            log.warning("position_not_listed", con_id=con_id, symbol=symbol)
        if not session.unknown_positions:
            session.positions_retries = 0

    def _position_quantity(self, session: IbSession, item: ev.PositionUpdate) -> None:
        """Track positions of the guarded account whose quantity arrived unset; ask again."""
        con_id = item.con_id
        if math.isnan(item.quantity):
            if con_id not in session.unknown_positions:
                session.unknown_positions[con_id] = item.symbol
                log.warning("position_quantity_unknown", con_id=con_id, symbol=item.symbol)
            self._schedule_positions_retry(session)
            return
        if session.unknown_positions.pop(con_id, None) is None:
            return
        log.warning(
            "position_quantity_known", con_id=con_id, symbol=item.symbol, quantity=item.quantity
        )
        if not session.unknown_positions:
            session.positions_retries = 0  # a later unset quantity gets the whole bound again

    def _schedule_positions_retry(self, session: IbSession) -> None:
        task = session.positions_retry_task
        if task is not None and not task.done():
            return
        if session.positions_retries >= self.positions_retries:
            return  # exhausted on this connection (said once, by the loop)
        session.positions_retry_task = asyncio.create_task(
            self._positions_retry_loop(session), name="ib_positions_retry_loop"
        )

    async def _positions_retry_loop(self, session: IbSession) -> None:
        """reqPositions again, backing off, while a position quantity of the guarded account is
        unknown (at most `positions_retries` times per connection)."""
        while self._session is session and session.unknown_positions:
            if session.positions_retries >= self.positions_retries:
                log.error(
                    "positions_retries_exhausted",
                    con_ids=sorted(session.unknown_positions),
                    symbols=sorted(set(session.unknown_positions.values())),
                    retries=session.positions_retries,
                )
                return
            delay = self.positions_retry.delay(session.positions_retries + 1, random.random())
            await asyncio.sleep(delay)
            if self._session is not session or not session.unknown_positions:
                return
            session.positions_retries += 1
            self.positions_rerequests += 1
            unknown = sorted(session.unknown_positions)
            log.warning(
                "positions_rerequested",
                con_ids=unknown,
                symbols=sorted(set(session.unknown_positions.values())),
                attempt=session.positions_retries,
                of=self.positions_retries,
                after_s=delay,
            )
            # A close waiting for the figure gets it ahead of other subscriptions.
            lane = Lane.CLOSE_DATA if self._closing & set(unknown) else Lane.NORMAL
            try:
                await self._request(session, lane, "reqPositions", relist_positions)
            except GuarddError:
                return  # the session is gone; the next one downloads positions afresh

    def _on_error(self, session: IbSession, error: ev.BrokerMessage) -> None:
        code = error.code
        informational = ib_class(code) is IbClass.INFORMATIONAL
        if not informational:
            session.last_error = (code, error.message)
        if error.req_id == READ_ONLY_PROBE_ID:
            self._on_probe_answer(error)
            return
        if code == IbCode.READ_ONLY and "read-only" in error.message.lower():
            self._read_only_seen(error)
        match code:
            case IbCode.CONNECTIVITY_LOST:
                log.warning("ib_connectivity_lost", code=code, message=error.message)
                self._emit(ev.ConnectivityLost(ts=error.ts))
            case IbCode.SERVER_CONNECTIVITY_BROKEN:
                log.warning("ib_server_connectivity_broken", code=code, message=error.message)
                self._emit(ev.ConnectivityLost(ts=error.ts))
            case IbCode.RESTORED_DATA_LOST | IbCode.RESTORED_DATA_KEPT:
                data_lost = code == IbCode.RESTORED_DATA_LOST
                log.warning("ib_connectivity_restored", code=code, data_lost=data_lost)
                self._emit(ev.ConnectivityRestored(data_lost=data_lost, ts=error.ts))
                if data_lost and session.announced:
                    self._resubscribe(session)
            case IbCode.PACING_VIOLATION:
                self.pacing_violations += 1
                log.error(
                    "ib_pacing_violated",
                    total=self.pacing_violations,
                    message=error.message,
                    client_id=self.client_id,
                )
                self._emit(error)
            case IbCode.MAX_TICKERS:
                self._line_refused_by_ib(session, error)
                self._emit(error)
            case IbCode.CLIENT_ID_IN_USE:
                log.error("ib_client_id_in_use", client_id=self.client_id, message=error.message)
                self._emit(error)
            case IbCode.NOT_CONNECTED:
                log.warning("ib_not_connected", message=error.message)
                self._emit(error)
                session.abort()  # the session ends and the reconnect loop takes over
            case _:
                if informational:
                    log.info("ib_notice", code=code, message=error.message)
                else:
                    log.warning("ib_error", req_id=error.req_id, code=code, message=error.message)
                self._emit(error)

    # ---- Read-only API ---------------------------------------------------------------------

    def _read_only_seen(self, error: ev.BrokerMessage) -> None:
        """Error 321 "... Read-Only mode": say so once, then probe until it is switched off."""
        if self.read_only:
            return
        self.read_only = True
        log.error(
            "ib_read_only",
            code=error.code,
            req_id=error.req_id,
            message=error.message,
            client_id=self.client_id,
        )
        self._emit(ev.ApiReadOnly(read_only=True, ts=error.ts))
        if self._read_only_task is None or self._read_only_task.done():
            self._read_only_task = asyncio.create_task(
                self._read_only_probe_loop(), name="ib_read_only_probe_loop"
            )

    def _on_probe_answer(self, error: ev.BrokerMessage) -> None:
        if error.code == IbCode.READ_ONLY:
            return  # still read-only
        if self.read_only:
            # Any other answer (10147: not found) means the cancel was taken up as usual.
            self.read_only = False
            log.warning("ib_read_only_lifted", code=error.code, client_id=self.client_id)
            self._emit(ev.ApiReadOnly(read_only=False, ts=error.ts))

    async def _read_only_probe_loop(self) -> None:
        """While read-only, every `read_only_probe_s` cancel an order that never exists: 321
        means still read-only, 10147 (not found) that orders and cancels work again."""
        while self.read_only and not self._stopping:
            await asyncio.sleep(self.read_only_probe_s)
            session = self._session
            if session is None or not session.announced or not self.read_only:
                continue
            with contextlib.suppress(GuarddError):
                await self._request(
                    session,
                    Lane.NORMAL,
                    "cancelOrder read-only probe",
                    lambda s: s.cancelOrder(READ_ONLY_PROBE_ID, OrderCancel()),
                )
