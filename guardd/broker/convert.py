"""ibapi's callback arguments to core BrokerEvents: plain functions, no socket, no state.

Each function takes what an EWrapper callback receives (and the adapter's stamp `ts`) and
returns the event the Book folds, or None where the callback carries nothing the guard reads.
`convert.open_order(...)` reads as the event it returns.

Unset values: a field a protobuf message leaves out (server version 201+) reaches the EWrapper
as ibapi's unset marker (`ibapi.const`: UNSET_DECIMAL for an absent quantity, UNSET_INTEGER
2147483647 for an absent client or order id, UNSET_LONG for an absent permId, UNSET_DOUBLE for
an absent price). They are recognised by equality with those constants, never by magnitude: a
quantity, price or fill count becomes NaN ("unknown", never 0 and never a number the Book
folds), an order id 0 (none reported), a client id `ev.UNKNOWN_CLIENT_ID` and a permId 0 (not
known yet), so an unset id never matches the guard's own identity.
"""

from __future__ import annotations

import math
from decimal import Decimal
from typing import Any, Final
from zoneinfo import ZoneInfo

from ibapi.const import UNSET_DECIMAL, UNSET_DOUBLE, UNSET_INTEGER, UNSET_LONG
from ibapi.contract import Contract
from ibapi.order import Order

from guardd.broker.hours import market_hours
from guardd.core import events as ev
from guardd.core.options import expiry_time

# tickPrice tick types -> price field (live and delayed).
TICK_FIELDS: Final[dict[int, ev.PriceField]] = {
    1: "bid",
    2: "ask",
    4: "last",
    37: "mark",
    66: "bid",
    67: "ask",
    68: "last",
}
# tickSize tick types -> the price field whose size they give (live and delayed).
SIZE_FIELDS: Final[dict[int, ev.PriceField]] = {
    0: "bid",
    3: "ask",
    5: "last",
    69: "bid",
    70: "ask",
    71: "last",
}
DELAYED_TICKS: Final = frozenset({66, 67, 68, 69, 70, 71})
# tickOptionComputation tick types -> the price IB's option model was computed at (live, delayed).
OPTION_SOURCES: Final[dict[int, ev.OptionSource]] = {
    10: "bid",
    11: "ask",
    12: "last",
    13: "model",
    80: "bid",
    81: "ask",
    82: "last",
    83: "model",
}
DELAYED_OPTION_TICKS: Final = frozenset({80, 81, 82, 83})
REAL_TIME_DATA: Final = 1  # marketDataType: 1 real-time; 2 frozen, 3 delayed, 4 delayed frozen

_OPTION_ZONE: Final = ZoneInfo("America/New_York")


# ---- values ---------------------------------------------------------------------------------


def number(value: Any) -> float:
    """IB's number as a float; ibapi's unset markers (UNSET_DECIMAL, UNSET_DOUBLE, and
    UNSET_INTEGER / UNSET_LONG where a count arrives as an int) and non-finite values become NaN:
    unknown, never a number."""
    if value is None or value == "":
        return math.nan
    if isinstance(value, Decimal):
        if value == UNSET_DECIMAL or not value.is_finite():
            return math.nan
        return float(value)
    if isinstance(value, int) and value in (UNSET_INTEGER, UNSET_LONG):
        return math.nan
    result = float(value)
    if result == UNSET_DOUBLE or not math.isfinite(result):
        return math.nan
    return result


def order_id(value: Any) -> ev.OrderId:
    """An order id; unset (UNSET_INTEGER, e.g. left out of a protobuf orderStatus) becomes 0,
    "no API order id", which never names an order of ours."""
    value = int(value)
    return ev.OrderId(0 if value in (UNSET_INTEGER, UNSET_LONG) else value)


def client_id(value: Any) -> ev.ClientId:
    """A client id; unset (UNSET_INTEGER 2147483647) becomes `ev.UNKNOWN_CLIENT_ID`, which is
    never the guard's."""
    value = int(value)
    return ev.ClientId(ev.UNKNOWN_CLIENT_ID if value in (UNSET_INTEGER, UNSET_LONG) else value)


def perm_id(value: Any) -> ev.PermId:
    """A permId; unset (UNSET_LONG, or UNSET_INTEGER) becomes 0, "not known yet"."""
    value = int(value)
    return ev.PermId(0 if value in (UNSET_INTEGER, UNSET_LONG) else value)


def multiplier(text: str) -> float:
    """A contract's multiplier; empty or unreadable is 1."""
    try:
        return float(text) if text else 1.0
    except ValueError:
        return 1.0


def option_terms(contract: Contract) -> dict[str, Any]:
    """An option's strike, right and expiry (epoch seconds) from its contract, as the Book
    keeps them; nothing for any other contract (the Book's NaN / "": not an option's terms)."""
    if contract.secType != "OPT":
        return {}
    strike = number(contract.strike)
    right = {"C": "C", "CALL": "C", "P": "P", "PUT": "P"}.get(str(contract.right).upper(), "")
    return {
        "strike": strike if strike > 0 else math.nan,
        "right": right,
        "expiry": expiry_time(str(contract.lastTradeDateOrContractMonth), _OPTION_ZONE),
    }


def managed_accounts(accounts_list: str) -> tuple[str, ...]:
    """managedAccounts' comma-separated list as account codes."""
    return tuple(a.strip() for a in accounts_list.split(",") if a.strip())


# ---- events ---------------------------------------------------------------------------------


def broker_message(req_id: int, code: int, message: str, ts: float) -> ev.BrokerMessage:
    return ev.BrokerMessage(req_id=int(req_id), code=int(code), message=str(message), ts=ts)


def position_update(
    account: str, contract: Contract, position: Decimal, avg_cost: float, ts: float
) -> ev.PositionUpdate:
    """position(): one position of any account of the login."""
    return ev.PositionUpdate(
        account=account,
        con_id=ev.ConId(int(contract.conId)),
        symbol=contract.symbol,
        sec_type=contract.secType,
        currency=contract.currency,
        multiplier=multiplier(contract.multiplier),
        exchange=contract.exchange or contract.primaryExchange,
        quantity=number(position),
        avg_cost=number(avg_cost),
        ts=ts,
        **option_terms(contract),
    )


def account_value(key: str, value: str, currency: str, account: str, ts: float) -> ev.AccountValue:
    return ev.AccountValue(account=account, key=key, value=value, currency=currency, ts=ts)


def pnl_update(
    account: str, daily: float, unrealized: float, realized: float, ts: float
) -> ev.PnLUpdate:
    return ev.PnLUpdate(
        account=account,
        daily=number(daily),
        unrealized=number(unrealized),
        realized=number(realized),
        ts=ts,
    )


def portfolio_value(
    contract: Contract,
    position: Decimal,
    market_price: float,
    market_value: float,
    account: str,
    ts: float,
) -> ev.PortfolioValue:
    """updatePortfolio(): one position of the account-updates subscription, valued by IB (price
    and value in the position's currency)."""
    return ev.PortfolioValue(
        account=account,
        con_id=ev.ConId(int(contract.conId)),
        position=number(position),
        market_price=number(market_price),
        market_value=number(market_value),
        ts=ts,
    )


def position_value(
    account: str,
    con_id: ev.ConId,
    position: Decimal,
    daily: float,
    unrealized: float,
    realized: float,
    value: float,
    ts: float,
) -> ev.PositionValue:
    """pnlSingle(): one position's figures, `con_id` being the contract its request named."""
    return ev.PositionValue(
        account=account,
        con_id=con_id,
        position=number(position),
        daily=number(daily),
        unrealized=number(unrealized),
        realized=number(realized),
        value=number(value),
        ts=ts,
    )


def price_tick(
    con_id: ev.ConId, tick_type: int, price: float, ts: float, *, stale: bool
) -> ev.PriceTick | None:
    """tickPrice(): a bid, ask, last or mark (None for a tick type the guard does not read).
    `stale`: IB switched the request to frozen or delayed data (marketDataType)."""
    field = TICK_FIELDS.get(int(tick_type))
    if field is None:
        return None
    value = number(price)
    if value == -1.0:  # IB's "no price available"
        value = math.nan
    delayed = int(tick_type) in DELAYED_TICKS or stale
    return ev.PriceTick(con_id=con_id, field=field, price=value, ts=ts, delayed=delayed)


def size_tick(con_id: ev.ConId, tick_type: int, ts: float, *, stale: bool) -> ev.SizeTick | None:
    """tickSize(): the size of a bid, ask or last (None for a tick type the guard does not read)."""
    field = SIZE_FIELDS.get(int(tick_type))
    if field is None:
        return None
    delayed = int(tick_type) in DELAYED_TICKS or stale
    return ev.SizeTick(con_id=con_id, field=field, ts=ts, delayed=delayed)


def option_computation(
    con_id: ev.ConId,
    tick_type: int,
    implied_vol: float | None,
    delta: float | None,
    gamma: float | None,
    vega: float | None,
    theta: float | None,
    underlying_price: float | None,
    ts: float,
    *,
    stale: bool,
) -> ev.OptionComputation | None:
    """tickOptionComputation(): IB's option model (None for a tick type the guard does not read).
    ibapi passes None for a figure IB did not compute (-1 / -2) on both wires: NaN here."""
    source = OPTION_SOURCES.get(int(tick_type))
    if source is None:
        return None
    delayed = int(tick_type) in DELAYED_OPTION_TICKS or stale
    return ev.OptionComputation(
        con_id=con_id,
        source=source,
        implied_vol=number(implied_vol),
        delta=number(delta),
        gamma=number(gamma),
        vega=number(vega),
        theta=number(theta),
        underlying_price=number(underlying_price),
        ts=ts,
        delayed=delayed,
    )


def open_order(
    ib_order_id: int, contract: Contract, order: Order, order_state: Any, ts: float
) -> ev.OpenOrder:
    """openOrder(): one working order of any client."""
    return ev.OpenOrder(
        perm_id=perm_id(order.permId),
        order_id=order_id(ib_order_id),
        client_id=client_id(order.clientId),
        account=order.account,
        con_id=ev.ConId(int(contract.conId)),
        symbol=contract.symbol,
        sec_type=contract.secType,
        action=order.action,
        quantity=number(order.totalQuantity),
        order_type=order.orderType,
        lmt_price=number(order.lmtPrice),
        order_ref=order.orderRef or "",
        status=order_state.status,
        currency=contract.currency,
        multiplier=multiplier(contract.multiplier),
        ts=ts,
        aux_price=number(order.auxPrice),
        trail_stop_price=number(order.trailStopPrice),
        trailing_percent=number(order.trailingPercent),
        tif=order.tif or "",
        outside_rth=bool(order.outsideRth),
        parent_id=int(order.parentId or 0),
        oca_group=order.ocaGroup or "",
    )


def order_status(
    ib_order_id: int,
    status: str,
    filled: Decimal,
    remaining: Decimal,
    avg_fill_price: float,
    ib_perm_id: int,
    ib_client_id: int,
    ts: float,
) -> ev.OrderStatus:
    return ev.OrderStatus(
        perm_id=perm_id(ib_perm_id),
        order_id=order_id(ib_order_id),
        client_id=client_id(ib_client_id),
        status=status,
        filled=number(filled),
        remaining=number(remaining),
        avg_fill_price=number(avg_fill_price),
        ts=ts,
    )


def execution(req_id: int, contract: Contract, ib_execution: Any, ts: float) -> ev.Execution:
    """execDetails(): one fill; live (not part of a reqExecutions download) when reqId is -1."""
    return ev.Execution(
        exec_id=ib_execution.execId,
        perm_id=perm_id(ib_execution.permId),
        order_id=order_id(ib_execution.orderId),
        client_id=client_id(ib_execution.clientId),
        account=ib_execution.acctNumber,
        con_id=ev.ConId(int(contract.conId)),
        symbol=contract.symbol,
        side=ib_execution.side,
        shares=number(ib_execution.shares),
        price=number(ib_execution.price),
        time=ib_execution.time,
        order_ref=ib_execution.orderRef or "",
        ts=ts,
        live=req_id == -1,
    )


def contract_hours(con_id: ev.ConId, details: Any, ts: float) -> ev.ContractHours:
    """contractDetails(): the contract's market hours; raises HoursFormatError when unreadable."""
    hours = market_hours(
        str(details.timeZoneId or ""),
        str(details.tradingHours or ""),
        str(details.liquidHours or ""),
    )
    return ev.ContractHours(con_id=con_id, hours=hours, ts=ts)


# ---- requests -------------------------------------------------------------------------------


def order_contract(
    *,
    con_id: int,
    symbol: str,
    sec_type: str,
    exchange: str,
    currency: str,
    last_trade_date: str,
    multiplier: str,
    local_symbol: str,
) -> Contract:
    """The ibapi Contract an order is placed for."""
    contract = Contract()
    contract.conId = con_id
    contract.symbol = symbol
    contract.secType = sec_type
    contract.exchange = exchange
    contract.currency = currency
    contract.lastTradeDateOrContractMonth = last_trade_date
    contract.multiplier = multiplier
    contract.localSymbol = local_symbol
    return contract
