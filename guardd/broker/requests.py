"""Requests and order ids: subscriptions, reqIds / nextValidId, placing and cancelling orders.

Every request goes through the connection's one PacedSender on a lane (`guardd.broker.pacer`);
a request made while disconnected raises BrokerDisconnectedError. After every (re)connect the
adapter resubscribes: positions, account updates (which value every position, updatePortfolio),
PnL, every client's open orders, executions, per-position PnL and contract hours (on
`Lane.BACKGROUND`: nothing waits for them) and the market-data lines. The `PositionsEnd` and
`OpenOrdersEnd` barriers therefore follow every `Connected`.

Market-data lines: IB gives a login a fixed number (100 by default, shared with TWS and every
other client) and refuses one more with error 101. The adapter holds at most
`market_data_lines` of them, chosen by `guardd.core.lines.choose_lines` from what it is told:
`rank_lines` (the guard's positions by exposure), `watch_prices` (contracts wanted at a low
priority) and `closing` (contracts a close works on: first, always, and not held to the
configured number, only to what IB grants). Each change re-chooses:
a line no longer chosen is cancelled (cancelMktData, on `Lane.CLOSE_DATA` so that it is freed
before a close's request takes its place), a new one requested. On 101 the refused line is
released and its contract left out for `line_retry_s`, and the limit drops to the lines IB
granted until then (`LineLimit`); a later re-choice tries again, most urgent first.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Iterable
from decimal import Decimal
from typing import Any, Final

import structlog
from ibapi.contract import Contract
from ibapi.execution import ExecutionFilter
from ibapi.order import Order
from ibapi.order_cancel import OrderCancel

from guardd.broker import convert
from guardd.broker.connection import IbConnection, settle
from guardd.broker.pacer import Lane
from guardd.broker.session import IbSession
from guardd.core import events as ev
from guardd.core.lines import LineLimit, LineWant, choose_lines
from guardd.errors import BrokerDisconnectedError

log = structlog.get_logger("guardd.broker.ib")

DATA_REQ_ID_BASE: Final = 1 << 30
"""Request ids of data subscriptions start here: an IB error names a request or an order by the
same field (reqId), and an error of a price or PnL request must never be taken for one of an
order of ours (order ids stay far below)."""
READ_ONLY_PROBE_ID: Final = (1 << 31) - 2
"""The order id of the Read-only probe: a cancel of an order that never exists (the largest
32-bit id below ibapi's "unset" marker, which it would send as empty). Refused with 321
while the API is read-only, answered 10147 (not found) once it is not."""
ORDER_IDS_TIMEOUT_S: Final = 2.0
"""How long `refresh_order_ids` waits for the answer to reqIds."""
DEFAULT_MARKET_DATA_LINES: Final = 90
"""Market-data lines held at most (IB: 100 a login by default; `[ib] market_data_lines`)."""
LINE_RETRY_S: Final = 60.0
"""After a 101: how long the refused contract waits and the lowered limit holds."""


class IbRequests(IbConnection):
    """What the guard asks of the gateway (see the module doc)."""

    def __init__(
        self, *args: Any, market_data_lines: int = DEFAULT_MARKET_DATA_LINES, **kwargs: Any
    ) -> None:
        self.market_data_lines = market_data_lines
        super().__init__(*args, **kwargs)

    def _init_state(self) -> None:
        super()._init_state()
        # The highest order id seen from ANY client (ours sent, any reported in openOrder,
        # orderStatus or execDetails, reserved): IB refuses a Master API client's new order whose
        # id is not above every id reported to it (error 103), and nextValidId lags behind the
        # ids of other clients' orders reported after it. New ids start above it, so an id of
        # ours already sent or reported is never re-used (after a gateway restart nextValidId
        # may roll back, and re-sending a still-working order's id would MODIFY that order).
        self.highest_order_id_seen = 0
        self.order_ids_skipped = 0
        self._req_ids = itertools.count(DATA_REQ_ID_BASE)
        self._watched: set[ev.ConId] = set()  # `watch_prices`: wanted at the lowest priority
        self._line_wants: dict[ev.ConId, LineWant] = {}  # `rank_lines`: by exposure
        self._closing: frozenset[ev.ConId] = frozenset()  # contracts a close is working on
        self._exchanges: dict[ev.ConId, str] = {}
        self._line_limit = LineLimit(self.market_data_lines)
        self._line_refused: dict[ev.ConId, float] = {}  # contract -> retry at (monotonic)
        self.line_retry_s = LINE_RETRY_S
        self.lines_refused = 0  # error 101 answers, all told

    # ---- subscriptions ---------------------------------------------------------------------

    def _on_connected(self, session: IbSession) -> None:
        self._resubscribe(session)

    def _resubscribe(self, session: IbSession) -> None:
        """Everything the Book needs after a (re)connect or a 1101; both barriers follow."""
        session.pnl_req.clear()
        session.pnl_single_req.clear()
        session.pnl_single_con.clear()
        session.tick_req.clear()
        session.price_requests.clear()
        session.stale_data_req.clear()
        account = self.account
        pnl_id = next(self._req_ids)
        session.pnl_req[pnl_id] = account
        exec_id = next(self._req_ids)
        normal = Lane.NORMAL
        # A close in progress waits for the positions, open-orders and executions downloads:
        # they go ahead of every subscription then.
        sync = Lane.CLOSE_DATA if self._closing else Lane.NORMAL
        self._request(session, sync, "reqPositions", _req_positions)
        self._request(session, sync, "reqAllOpenOrders", lambda s: s.reqAllOpenOrders())
        self._request(
            session, sync, "reqExecutions", lambda s: s.reqExecutions(exec_id, ExecutionFilter())
        )
        self._request(
            session, normal, "reqAccountUpdates", lambda s: s.reqAccountUpdates(True, account)
        )
        self._request(session, normal, "reqPnL", lambda s: s.reqPnL(pnl_id, account, ""))
        self._choose_lines(session)

    def _request_position_value(self, session: IbSession, con_id: ev.ConId) -> None:
        req_id = next(self._req_ids)
        session.pnl_single_req[req_id] = con_id
        session.pnl_single_con.add(con_id)
        account = self.account
        self._request(
            session,
            Lane.BACKGROUND,
            "reqPnLSingle",
            lambda s: s.reqPnLSingle(req_id, account, "", con_id),
        )

    def _request_hours(self, session: IbSession, con_id: ev.ConId) -> None:
        """contractDetails of a position's contract, for its market hours (once a connection:
        IB's hours cover about a week, and the gateway's daily reset brings a new connection)."""
        req_id = next(self._req_ids)
        session.hours_req[req_id] = con_id
        session.hours_con.add(con_id)
        contract = Contract()
        contract.conId = con_id
        contract.exchange = self._exchanges.get(con_id) or "SMART"
        self._request(
            session,
            Lane.BACKGROUND,
            "reqContractDetails",
            lambda s: s.reqContractDetails(req_id, contract),
        )

    def _request_prices(self, session: IbSession, con_id: ev.ConId) -> None:
        req_id = next(self._req_ids)
        session.tick_req[req_id] = con_id
        contract = Contract()
        contract.conId = con_id
        contract.exchange = self._exchanges.get(con_id) or "SMART"
        # The price of a position being closed is what its close orders are priced from.
        lane = Lane.CLOSE_DATA if con_id in self._closing else Lane.NORMAL
        session.price_requests[con_id] = self._request(
            session,
            lane,
            "reqMktData",
            lambda s: s.reqMktData(req_id, contract, "", False, False, []),
        )

    def closing(self, con_ids: Iterable[int]) -> None:
        """The contracts a close is working on now (empty: no close). Each gets a line, first
        (a lower line gives way; beyond `market_data_lines` if need be, only what IB grants
        bounds them), and their price requests (and, after a reconnect, the
        downloads a close waits for) go on `Lane.CLOSE_DATA`, ahead of every other subscription:
        a flood of other requests never starves a close of its prices. A price request still
        queued on NORMAL is moved ahead."""
        closing = frozenset(ev.ConId(int(c)) for c in con_ids if int(c))
        new = closing - self._closing
        self._closing = closing
        session = self._session
        if session is None or not session.announced:
            return
        for con_id in sorted(new):
            queued = session.price_requests.get(con_id)
            if queued is not None and not queued.done():
                queued.cancel()  # the sender skips it; the same request goes ahead instead
                self._forget_line(session, con_id)
        self._choose_lines(session)

    def watch_prices(self, con_ids: Iterable[int]) -> None:
        """Stream bid/ask/last for these contracts, now and after every reconnect, as far as
        the lines allow (at the lowest priority: exposure 0 unless `rank_lines` says more).
        The exchange for reqMktData is the contract's position's, else SMART."""
        self._watched.update(ev.ConId(int(c)) for c in con_ids if int(c))
        session = self._session
        if session is not None and session.announced:
            self._choose_lines(session)

    def rank_lines(self, wants: Iterable[LineWant]) -> None:
        """The contracts that want a line, with their exposures (the guard's positions);
        replaces the previous ranking and re-chooses the lines (`guardd.core.lines`)."""
        self._line_wants = {w.con_id: w for w in wants if w.con_id}
        session = self._session
        if session is not None and session.announced:
            self._choose_lines(session)

    @property
    def lines(self) -> frozenset[ev.ConId]:
        """The contracts with a line now (requested and not refused)."""
        session = self._session
        return frozenset() if session is None else frozenset(session.tick_req.values())

    def _choose_lines(self, session: IbSession) -> None:
        """Cancel the lines no longer chosen, request the newly chosen ones."""
        now = time.monotonic()
        wants = dict(self._line_wants)
        for con_id in self._watched:
            wants.setdefault(con_id, LineWant(con_id))
        for con_id in self._closing:
            exposure = wants[con_id].exposure if con_id in wants else 0.0
            wants[con_id] = LineWant(con_id, exposure, closing=True)
        self._line_refused = {c: t for c, t in self._line_refused.items() if t > now}
        held = {con_id: req_id for req_id, con_id in session.tick_req.items()}
        chosen = choose_lines(
            wants.values(),
            self._line_limit.at(now),
            closing_limit=self._line_limit.granted(now),
            held=held,
            refused=self._line_refused,
            now=now,
        )
        keep = frozenset(chosen)
        for con_id, req_id in held.items():
            if con_id not in keep:
                self._release_line(session, con_id, req_id)
        for con_id in chosen:
            if con_id not in held:
                self._request_prices(session, con_id)

    def _forget_line(self, session: IbSession, con_id: ev.ConId) -> None:
        for req_id in [r for r, c in session.tick_req.items() if c == con_id]:
            del session.tick_req[req_id]
        session.price_requests.pop(con_id, None)

    def _release_line(self, session: IbSession, con_id: ev.ConId, req_id: int) -> None:
        """Give a line back: a request still queued is dropped, a sent one cancelled."""
        session.tick_req.pop(req_id, None)
        queued = session.price_requests.pop(con_id, None)
        if queued is not None and not queued.done():
            queued.cancel()  # never sent: nothing to cancel at IB
            return
        self._request(session, Lane.CLOSE_DATA, "cancelMktData", lambda s: s.cancelMktData(req_id))

    def _line_refused_by_ib(self, session: IbSession, error: ev.BrokerMessage) -> None:
        """Error 101 "Max number of tickers has been reached.": the line was not granted.
        Release it, lower the limit to the lines held, leave the contract out for
        `line_retry_s` (a closing contract is not left out: a lower line gives way to it), and
        choose again."""
        con_id = session.tick_req.pop(error.req_id, None)
        if con_id is None:
            return
        session.price_requests.pop(con_id, None)
        now = time.monotonic()
        granted = len(session.tick_req)
        self._line_limit = self._line_limit.refused(granted, now, self.line_retry_s)
        if con_id not in self._closing:
            self._line_refused[con_id] = now + self.line_retry_s
        self.lines_refused += 1
        log.warning(
            "market_data_line_refused",
            con_id=con_id,
            lines=granted,
            limit=self._line_limit.at(now),
            retry_in_s=self.line_retry_s,
            closing=con_id in self._closing,
        )
        self._choose_lines(session)

    # ---- order ids -------------------------------------------------------------------------

    def _on_next_id(self, session: IbSession, order_id: int) -> None:
        """nextValidId: the first announces the session; a later one answers reqIds."""
        if session.first_order_id is None:
            session.first_order_id = order_id
            session.next_id = order_id
            self._maybe_announce(session)
        else:  # an answer to reqIds: never go below what this session already used
            session.next_id = max(session.next_id or order_id, order_id)
        waiters, session.id_waiters = session.id_waiters, []
        for waiter in waiters:
            settle(waiter, None)

    def _saw_order_id(self, order_id: int) -> None:
        if 0 < order_id < READ_ONLY_PROBE_ID:
            self.highest_order_id_seen = max(self.highest_order_id_seen, int(order_id))

    # ---- requests --------------------------------------------------------------------------

    def _live_session(self, what: str) -> IbSession:
        session = self._session
        if session is None or not session.announced:
            raise BrokerDisconnectedError(f"{what}: not connected to IB")
        return session

    def reserve_order_ids(self, order_ids: Iterable[int]) -> None:
        """Never hand out these ids (e.g. child orders a previous life of the guard journaled:
        they may be working at the gateway under our client id, or may arrive there late)."""
        for order_id in order_ids:
            if int(order_id) > 0:
                self._saw_order_id(int(order_id))

    def next_order_id(self) -> ev.OrderId:
        """A fresh order id: this session's nextValidId, or above every order id seen from any
        client when that is higher (IB refuses a Master API client's id that is not above every
        id reported to it, error 103; ids roll back after a gateway restart, and re-using a
        working order's id would modify it)."""
        session = self._live_session("next_order_id")
        assert session.next_id is not None
        order_id = session.next_id
        floor = self.highest_order_id_seen + 1
        if order_id < floor:
            self.order_ids_skipped += floor - order_id
            log.warning("order_ids_behind", next_valid_id=order_id, using=floor)
            order_id = floor
        session.next_id = order_id + 1
        return ev.OrderId(order_id)

    async def refresh_order_ids(self, lane: Lane = Lane.FLATTEN) -> None:
        """Ask the gateway for the next valid id (reqIds) and wait, at most
        `ORDER_IDS_TIMEOUT_S`, for the answer: `next_order_id` then goes by it. For when an id
        was refused (103) or is in doubt; a missing answer leaves the ids as they were."""
        session = self._live_session("refresh_order_ids")
        waiter: asyncio.Future[None] = self.loop.create_future()
        session.id_waiters.append(waiter)
        try:
            await self._request(session, lane, "reqIds", lambda s: s.reqIds(-1))
            await asyncio.wait_for(asyncio.shield(waiter), ORDER_IDS_TIMEOUT_S)
        except TimeoutError:
            log.warning("order_ids_not_answered", timeout_s=ORDER_IDS_TIMEOUT_S)
        finally:
            if waiter in session.id_waiters:
                session.id_waiters.remove(waiter)

    async def place_order(
        self,
        order_id: int,
        *,
        con_id: int = 0,
        symbol: str = "",
        sec_type: str = "STK",
        exchange: str = "SMART",
        currency: str = "USD",
        last_trade_date: str = "",
        multiplier: str = "",
        local_symbol: str = "",
        action: str,
        quantity: Decimal | float,
        order_type: str,
        lmt_price: float | None = None,
        order_ref: str = "",
        outside_rth: bool = False,
        account: str | None = None,
        tif: str = "DAY",
        lane: Lane,
    ) -> None:
        """Send one order (paced on `lane`); returns once it has been written to the socket."""
        session = self._live_session("place_order")
        self._saw_order_id(int(order_id))
        contract = convert.order_contract(
            con_id=con_id,
            symbol=symbol,
            sec_type=sec_type,
            exchange=exchange,
            currency=currency,
            last_trade_date=last_trade_date,
            multiplier=multiplier,
            local_symbol=local_symbol,
        )
        order = Order()
        order.action = action
        order.totalQuantity = quantity if isinstance(quantity, Decimal) else Decimal(str(quantity))
        order.orderType = order_type
        if lmt_price is not None:
            order.lmtPrice = lmt_price
        order.orderRef = order_ref
        order.outsideRth = outside_rth
        order.account = account or self.account
        order.tif = tif
        order.transmit = True
        log.info(
            "order_sending",
            order_id=order_id,
            symbol=symbol,
            con_id=con_id,
            action=action,
            quantity=str(quantity),
            order_type=order_type,
            lmt_price=lmt_price,
            order_ref=order_ref,
            lane=lane.name,
        )
        await self._request(
            session,
            lane,
            f"placeOrder {order_id}",
            lambda s: s.placeOrder(order_id, contract, order),
        )

    async def cancel_order(self, order_id: int, lane: Lane) -> None:
        """Cancel one of guardd's own orders by id (foreign orders need `global_cancel`)."""
        session = self._live_session("cancel_order")
        await self._request(
            session,
            lane,
            f"cancelOrder {order_id}",
            lambda s: s.cancelOrder(order_id, OrderCancel()),
        )

    async def global_cancel(self) -> None:
        """reqGlobalCancel on the kill lane: every open order of the login, every client's."""
        session = self._live_session("global_cancel")
        log.warning("global_cancel_sending", client_id=self.client_id)
        await self._request(
            session, Lane.KILL, "reqGlobalCancel", lambda s: s.reqGlobalCancel(OrderCancel())
        )

    async def refresh_positions(self) -> None:
        """reqPositions again because a close doubts a position figure (it disagrees with every
        fill the guard knows): on `Lane.CLOSE_DATA`, ahead of other subscriptions."""
        session = self._live_session("refresh_positions")
        log.warning("positions_rerequested", why="close_figure_disagrees")
        await self._request(session, Lane.CLOSE_DATA, "reqPositions", relist_positions)


def _req_positions(session: IbSession) -> None:
    """reqPositions, counted (`positions_requests`: positionEnd answers them in order)."""
    session.reqPositions()
    session.positions_requests += 1


def relist_positions(session: IbSession) -> None:
    """reqPositions sent again: the guarded account's contracts listed in its answer are noted
    (`session.relist`), so that an unknown position IB leaves out is known to be gone."""
    _req_positions(session)
    session.relist = (session.positions_requests, set(), session.now())
