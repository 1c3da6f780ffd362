"""Plain data shared by the simulated gateway's parts: contracts, orders, fills and the events the
exchange model emits for the gateway to route to clients.

The exchange model (`exchange.py`) is pure: it takes `now` (epoch seconds) as an argument and
returns events; the TCP gateway (`gateway.py`) turns events into TWS messages (`codec.py`) for
the clients that should see them (the order's owner and the master API client).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

SecType = Literal["STK", "FUT", "CASH", "OPT"]
Action = Literal["BUY", "SELL"]
OrderType = Literal["MKT", "LMT", "STP", "STP LMT", "TRAIL", "TRAIL LIMIT", "MOC", "LOC"]
ORDER_TYPES: tuple[OrderType, ...] = (
    "MKT",
    "LMT",
    "STP",
    "STP LMT",
    "TRAIL",
    "TRAIL LIMIT",
    "MOC",
    "LOC",
)
STOP_TYPES = frozenset({"STP", "STP LMT", "TRAIL", "TRAIL LIMIT"})  # held until triggered
TRAIL_TYPES = frozenset({"TRAIL", "TRAIL LIMIT"})
LIMIT_TYPES = frozenset({"LMT", "STP LMT", "LOC"})  # a limit price the client gives
AUCTION_TYPES = frozenset({"MOC", "LOC"})  # executed in the closing auction only
TIFS = ("DAY", "GTC", "IOC", "OPG")
OrderStatusName = Literal[
    "PendingSubmit",
    "PreSubmitted",
    "Submitted",
    "PendingCancel",
    "Filled",
    "Cancelled",
    "ApiCancelled",
    "Inactive",
]
WORKING_STATUSES = frozenset({"PendingSubmit", "PreSubmitted", "Submitted", "PendingCancel"})


@dataclass(frozen=True, slots=True)
class Instrument:
    """A tradable contract the simulated market knows, with its price model parameters."""

    con_id: int
    symbol: str
    sec_type: SecType
    exchange: str  # routing exchange: SMART for stocks, the listing exchange for futures
    primary_exchange: str
    currency: str
    multiplier: float = 1.0  # contract multiplier; 1 for stocks
    last_trade_date: str = ""  # YYYYMMDD for futures
    local_symbol: str = ""
    trading_class: str = ""
    initial_price: float = 100.0
    volatility: float = 0.02  # standard deviation of one day's log return
    spread: float = 0.02  # ask - bid, in price units
    min_tick: float = 0.01
    initial_margin_rate: float = 0.25  # fraction of notional (STK) ...
    maint_margin_rate: float = 0.25
    # ... or fixed per contract (FUT); when > 0 it is used instead of the rates
    initial_margin_per_contract: float = 0.0
    maint_margin_per_contract: float = 0.0
    # Options (secType OPT): the right ("C"/"P"), strike and underlying (by conId), priced by
    # Black-Scholes from the underlying's last price at `implied_vol` (annualised), expiring at
    # the close of `last_trade_date`
    right: str = ""
    strike: float = 0.0
    underlying_con_id: int = 0
    implied_vol: float = 0.0

    @property
    def is_option(self) -> bool:
        return self.sec_type == "OPT"

    @property
    def is_fx(self) -> bool:
        """A currency pair (secType CASH on IDEALPRO): `symbol` is the pair's base currency, in
        which quantity counts, and `currency` its quote currency, in which price and value are."""
        return self.sec_type == "CASH"


@dataclass(frozen=True, slots=True)
class ContractHours:
    """A contract's hours as contractDetails reports them (`ibsim.hours.Calendar.ib_hours`):
    the zone, every session (tradingHours) and the regular ones (liquidHours)."""

    time_zone: str = "US/Eastern"
    trading: str = ""
    liquid: str = ""


@dataclass(frozen=True, slots=True)
class ContractSpec:
    """The contract fields a client sent (placeOrder, reqMktData, reqContractDetails)."""

    con_id: int = 0
    symbol: str = ""
    sec_type: str = ""
    last_trade_date: str = ""
    strike: float = 0.0
    right: str = ""
    multiplier: str = ""
    exchange: str = ""
    primary_exchange: str = ""
    currency: str = ""
    local_symbol: str = ""
    trading_class: str = ""


@dataclass(frozen=True, slots=True)
class OrderRequest:
    """What placeOrder carried that the simulator acts on."""

    order_id: int
    contract: ContractSpec
    action: str
    total_quantity: float
    order_type: str
    lmt_price: float | None
    aux_price: float | None
    tif: str = "DAY"
    account: str = ""
    order_ref: str = ""
    outside_rth: bool = False
    transmit: bool = True
    parent_id: int = 0
    oca_group: str = ""
    oca_type: int = 0  # 1 cancel the others, 2 reduce them with block, 3 reduce without block
    trailing_percent: float | None = None
    trail_stop_price: float | None = None
    lmt_price_offset: float | None = None  # TRAIL LIMIT: limit = stop -/+ offset


@dataclass(slots=True)
class SimOrder:
    """A live or finished order inside the simulator (mutable: its fills move it)."""

    perm_id: int
    order_id: int
    client_id: int
    account: str
    instrument: Instrument
    action: Action
    total_quantity: float
    order_type: OrderType
    lmt_price: float | None
    tif: str
    order_ref: str
    outside_rth: bool
    status: OrderStatusName = "PreSubmitted"
    filled: float = 0.0
    avg_fill_price: float = 0.0
    last_fill_price: float = 0.0
    why_held: str = ""
    aux_price: float | None = None  # stop price (STP, STP LMT) or trailing amount (TRAIL*)
    trailing_percent: float | None = None
    trail_stop_price: float | None = None  # where a trailing stop stands now
    lmt_price_offset: float | None = None
    parent_id: int = 0
    oca_group: str = ""
    oca_type: int = 0
    transmitted: bool = True  # False: placed with transmit=False and not released yet
    triggered: bool = False  # a stop whose trigger price was reached (it now works as MKT/LMT)

    @property
    def remaining(self) -> float:
        return self.total_quantity - self.filled

    @property
    def is_working(self) -> bool:
        return self.status in WORKING_STATUSES


@dataclass(frozen=True, slots=True)
class Fill:
    """One execution of an order."""

    exec_id: str
    perm_id: int
    order_id: int
    client_id: int
    account: str
    instrument: Instrument
    side: Literal["BOT", "SLD"]
    shares: float
    price: float
    time: float  # epoch seconds
    cum_qty: float
    avg_price: float
    order_ref: str
    commission: float
    realized_pnl: float


@dataclass(frozen=True, slots=True)
class PositionView:
    account: str
    instrument: Instrument
    position: float
    avg_cost: float  # per unit including the multiplier, as IB reports it
    market_price: float
    market_value: float
    unrealized_pnl: float
    realized_pnl: float


# Events the exchange model emits. The gateway routes order events to the owning client and to
# the master client, account events to subscribers of that account.


@dataclass(frozen=True, slots=True)
class OrderChanged:
    """An order's status or fills changed: send openOrder (when `open_order`) and orderStatus."""

    order: SimOrder
    open_order: bool = True


@dataclass(frozen=True, slots=True)
class OrderRejected:
    """Order refused (error 201 with the reason); the order ends Inactive/Cancelled."""

    order: SimOrder
    code: int
    reason: str


@dataclass(frozen=True, slots=True)
class OrderWarning:
    """A notice about an accepted order (399: it waits for its session; 2109: outsideRth does
    not apply): error `code` to the owner, the order keeps working."""

    order: SimOrder
    code: int
    message: str


@dataclass(frozen=True, slots=True)
class Executed:
    """A fill: send execDetails then commissionReport."""

    fill: Fill


@dataclass(frozen=True, slots=True)
class PositionChanged:
    position: PositionView


@dataclass(frozen=True, slots=True)
class AccountChanged:
    """Account values that moved, as (key, value, currency)."""

    account: str
    values: tuple[tuple[str, str, str], ...] = field(default_factory=tuple)


SimEvent = OrderChanged | OrderRejected | OrderWarning | Executed | PositionChanged | AccountChanged
