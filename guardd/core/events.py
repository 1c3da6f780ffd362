"""Broker events: the plain, frozen facts the broker adapter produces from ibapi callbacks.

The adapter (`guardd.broker`) translates each EWrapper callback into one of these dataclasses and
stamps it with `ts`, the receive time in float epoch seconds. The core folds them into a `Book`
(`guardd.core.book`) and never sees ibapi types. Quantities and prices are floats. A value IB
left unset (ibapi's UNSET_DECIMAL / UNSET_DOUBLE markers, e.g. a field a protobuf message leaves
out) arrives here as NaN and means "unknown": never 0, never a number to fold (a position whose
quantity is NaN is held at its last known figure and marked unknown, see `Book`). An unset order
id arrives as 0, an unset permId as 0 and an unset client id as `UNKNOWN_CLIENT_ID`.
Every class is keyword-only so that a reordered field cannot silently swap two numbers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, NewType

from guardd.core.hours import MarketHours

PermId = NewType("PermId", int)
"""IB's permanent order id: unique per login, stable across clients and reconnects."""
OrderId = NewType("OrderId", int)
"""An API client's own order id (0 for orders entered in TWS)."""
ClientId = NewType("ClientId", int)
"""The API client id that placed an order (0 for TWS / the auto-bind client)."""
ConId = NewType("ConId", int)
"""IB's contract id."""
UNKNOWN_CLIENT_ID = ClientId(-1)
"""The client id of an order or fill whose client id IB left unset: no API client's."""

PriceField = Literal["bid", "ask", "last", "mark"]
OptionSource = Literal["bid", "ask", "last", "model"]


@dataclass(frozen=True, slots=True, kw_only=True)
class Connected:
    """The API session is up: handshake done, managedAccounts and nextValidId received."""

    server_version: int
    managed_accounts: tuple[str, ...]
    next_order_id: int
    ts: float


@dataclass(frozen=True, slots=True, kw_only=True)
class Disconnected:
    """The socket to TWS / IB Gateway is closed (or the handshake failed)."""

    reason: str
    ts: float


@dataclass(frozen=True, slots=True, kw_only=True)
class ConnectivityLost:
    """Error 1100: TWS lost its connection to IB's servers; the API socket is still open."""

    ts: float


@dataclass(frozen=True, slots=True, kw_only=True)
class ConnectivityRestored:
    """Error 1101 (`data_lost=True`: subscriptions must be renewed) or 1102 (data kept)."""

    data_lost: bool
    ts: float


@dataclass(frozen=True, slots=True, kw_only=True)
class PositionUpdate:
    """One `position` callback (reqPositions): the broker-confirmed quantity of one contract."""

    account: str
    con_id: ConId
    symbol: str
    sec_type: str
    currency: str
    multiplier: float  # 1.0 when IB sends "" (stocks)
    exchange: str
    quantity: float  # signed: short positions are negative; NaN: IB left it unset (unknown)
    avg_cost: float
    ts: float
    # an option's terms from its contract (NaN / "" for anything else or where IB left them out):
    # strike, right "C"/"P", expiry in epoch seconds (the close of its last trading day)
    strike: float = math.nan
    right: str = ""
    expiry: float = math.nan


@dataclass(frozen=True, slots=True, kw_only=True)
class PositionsEnd:
    """`positionEnd`: the position download that followed a (re)subscription is complete."""

    ts: float


@dataclass(frozen=True, slots=True, kw_only=True)
class PositionsListed:
    """A positions download the adapter asked for again (reqPositions, because quantities
    arrived unset) has ended: `con_ids` are the contracts of `account` it listed. A position of
    that account whose quantity is unknown and that it did not list is no longer held (the same
    inference as the sweep at `PositionsEnd` after a (re)connect). `asked` is when the download
    was asked for: every figure received since then is at least as new as IB's answer."""

    account: str
    con_ids: frozenset[ConId]
    ts: float
    asked: float


@dataclass(frozen=True, slots=True, kw_only=True)
class AccountValue:
    """One `updateAccountValue` / `accountSummary` value, e.g. NetLiquidation or ExchangeRate.

    `value` stays the string IB sent; numbers are parsed by the reader. For `ExchangeRate`,
    `currency` names the foreign currency and `value` is base-currency units per unit of it.
    """

    account: str
    key: str
    value: str
    currency: str
    ts: float


@dataclass(frozen=True, slots=True, kw_only=True)
class AccountDownloadEnd:
    """`accountDownloadEnd`: the first full batch of account values has arrived."""

    account: str
    ts: float


@dataclass(frozen=True, slots=True, kw_only=True)
class PnLUpdate:
    """`pnl` (reqPnL): the account's PnL in its base currency, about once a second."""

    account: str
    daily: float
    unrealized: float
    realized: float
    ts: float


@dataclass(frozen=True, slots=True, kw_only=True)
class PositionValue:
    """`pnlSingle` (reqPnLSingle): live PnL and market value of one position.

    `value` is taken to be in the position's own currency (like updatePortfolio's marketValue).
    """

    account: str
    con_id: ConId
    position: float
    daily: float
    unrealized: float
    realized: float
    value: float
    ts: float


@dataclass(frozen=True, slots=True, kw_only=True)
class PortfolioValue:
    """`updatePortfolio` (the reqAccountUpdates subscription, one account): a position's market
    price and market value, both in the position's own currency.

    IB sends every position of the account at once when the subscription starts, then each one
    again when it changes and otherwise about every three minutes: a value with an age, not a
    live price. `ts` is when guardd received it.
    """

    account: str
    con_id: ConId
    position: float
    market_price: float
    market_value: float
    ts: float


@dataclass(frozen=True, slots=True, kw_only=True)
class PriceTick:
    """`tickPrice` for a contract, already mapped from IB's tick type to a field name.

    `delayed`: IB's delayed or frozen market data (tick types 66-68, or a subscription IB switched
    to delayed / frozen data), which is minutes old or more when it arrives.
    """

    con_id: ConId
    field: PriceField
    price: float
    ts: float
    delayed: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class SizeTick:
    """`tickSize` for a contract's bid, ask or last: the size at that price changed, so the price
    still stands at `ts` (IB sends a size change at an unchanged price as a size tick alone)."""

    con_id: ConId
    field: PriceField
    ts: float
    delayed: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class OptionComputation:
    """`tickOptionComputation` for an option: IB's option model at one of its prices.

    `source` is the price it was computed at: tick types 10/80 "bid", 11/81 "ask", 12/82 "last",
    13/83 "model" (IB's own model price). `delta` and `gamma` are per share (one underlying unit),
    `vega` per volatility point, `theta` per calendar day, `implied_vol` annualised, and
    `underlying_price` the underlying's price IB used. NaN where IB left a figure out or says it
    was not computed (-1 / -2): unknown, never 0. `delayed`: tick types 80-83.
    """

    con_id: ConId
    source: OptionSource
    implied_vol: float
    delta: float
    gamma: float
    vega: float
    theta: float
    underlying_price: float
    ts: float
    delayed: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class OpenOrder:
    """`openOrder`: an order's terms (and status) as TWS reports them to the master client.

    `currency` and `multiplier` come from the order's contract so notional can be valued.
    """

    perm_id: PermId
    order_id: OrderId
    client_id: ClientId
    account: str
    con_id: ConId
    symbol: str
    sec_type: str
    action: str  # "BUY" / "SELL"
    quantity: float
    order_type: str  # "MKT", "LMT", "STP", "STP LMT", "TRAIL", "TRAIL LIMIT", "MOC", "LOC"...
    lmt_price: float  # NaN when unset
    order_ref: str
    status: str
    currency: str
    multiplier: float
    ts: float
    aux_price: float = math.nan  # stop price (STP, STP LMT) or trailing amount (TRAIL...)
    trail_stop_price: float = math.nan  # where a trailing stop stands
    trailing_percent: float = math.nan
    tif: str = ""
    outside_rth: bool = False
    parent_id: int = 0  # a bracket child's parent order id (same client); 0 for none
    oca_group: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class OrderStatus:
    """`orderStatus`: fill progress of an order; may arrive before its `openOrder`."""

    perm_id: PermId
    order_id: OrderId
    client_id: ClientId
    status: str
    filled: float
    remaining: float
    avg_fill_price: float
    ts: float


@dataclass(frozen=True, slots=True, kw_only=True)
class OpenOrdersEnd:
    """`openOrderEnd`: the open-order download is complete."""

    ts: float


@dataclass(frozen=True, slots=True, kw_only=True)
class Execution:
    """`execDetails`: one fill. IB may send the same `exec_id` more than once."""

    exec_id: str
    perm_id: PermId
    order_id: OrderId
    client_id: ClientId
    account: str
    con_id: ConId
    symbol: str
    side: str  # "BOT" / "SLD"
    shares: float
    price: float
    time: str  # IB's execution time string, kept verbatim
    order_ref: str
    ts: float
    live: bool = False  # reported as it happened (reqId -1), not as an answer to reqExecutions


@dataclass(frozen=True, slots=True, kw_only=True)
class ExecutionsEnd:
    """`execDetailsEnd`: the executions download that followed a (re)subscription is complete:
    every fill of the day the broker reports to this client is in."""

    ts: float


@dataclass(frozen=True, slots=True, kw_only=True)
class BrokerMessage:
    """IB's `error` callback: an error, warning or notice (its class: `guardd.core.ibcodes`) not
    translated into a more specific event. An event, not an exception: the exception raised when
    a broker request fails is `guardd.errors.BrokerError`."""

    req_id: int
    code: int
    message: str
    ts: float


@dataclass(frozen=True, slots=True, kw_only=True)
class ApiReadOnly:
    """TWS's "Read-Only API" setting as the adapter learns it: `read_only` True from the first
    error 321 "... Read-Only mode" (orders and cancels are refused), False once a probe cancel is
    answered as a normal cancel would be."""

    read_only: bool
    ts: float


@dataclass(frozen=True, slots=True, kw_only=True)
class ServerTime:
    """currentTime: the gateway's wall clock (`server_time`, epoch seconds, whole seconds) at
    about `ts` (guardd's clock when it arrived)."""

    server_time: float
    ts: float


@dataclass(frozen=True, slots=True, kw_only=True)
class ContractHours:
    """A contract's market hours from contractDetails, as epoch-second intervals."""

    con_id: ConId
    hours: MarketHours
    ts: float


@dataclass(frozen=True, slots=True, kw_only=True)
class Heartbeat:
    """A trading bot's liveness signal (from MQTT or HTTP); `ts` is when guardd received it."""

    bot: str
    ts: float


BrokerEvent = (
    Connected
    | Disconnected
    | ConnectivityLost
    | ConnectivityRestored
    | PositionUpdate
    | PositionsEnd
    | PositionsListed
    | AccountValue
    | AccountDownloadEnd
    | PnLUpdate
    | PositionValue
    | PortfolioValue
    | PriceTick
    | SizeTick
    | OptionComputation
    | OpenOrder
    | OrderStatus
    | OpenOrdersEnd
    | Execution
    | ExecutionsEnd
    | BrokerMessage
    | ApiReadOnly
    | ServerTime
    | ContractHours
    | Heartbeat
)
"""Everything the Book folds."""
