"""TWS API text messages, as the simulated gateway writes and reads them, at server versions
178 to 226.

Server -> client: every `*_fields` function returns one whole message as a list of fields, message
id first, ready for `ibsim.wire.encode_frame`. Client -> server: the `decode_*` functions take
one whole frame's fields (message id first) and raise `CodecError` when they do not fit.

Layouts are read from the official `ibapi` 10.50.2 (client.py, decoder.py, orderdecoder.py) and from
`ib_async` 2.1.0 (client.py, decoder.py). `tests/unit/ibsim/test_sim_codec.py` proves them
both ways: our
fields go through both libraries' own decoders, and both libraries' own clients write the requests
that our decoders read. Field lists differ by version: each function takes the negotiated
`version` (default 178, the version ib_async speaks) and lays out the fields ibapi 10.50.2 reads at
it. From version 201 most of these messages travel as protobuf instead (`protocodec.py`, and the
table of which message from which version in `messages.py`); the text layouts here cover every
version at which a message is still text.

Unset values follow TWS: an unset double or int goes out as an empty field (both clients read it
back as unset), a count ("0" legs, "0" conditions) is never empty, booleans are `1`/`0`.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from datetime import datetime
from zoneinfo import ZoneInfo

from ibsim.types import (
    ContractHours,
    ContractSpec,
    Fill,
    Instrument,
    OrderRequest,
    PositionView,
    SimOrder,
)
from ibsim.wire import UNSET_DOUBLE, UNSET_INTEGER, Field

SERVER_VERSION = 178  # the text protocol's base version here; ib_async tops out at it

# Server versions at which the layouts below gain fields (ibapi server_versions.py).
V_LAST_TRADE_DATE = 182
V_CUSTOMER_ACCOUNT = 183
V_PROFESSIONAL_CUSTOMER = 184
V_BOND_ACCRUED_INTEREST = 185
V_INELIGIBILITY_REASONS = 186
V_RFQ_FIELDS = 187
V_INCLUDE_OVERNIGHT = 189
V_UNDO_RFQ_FIELDS = 190
V_CME_TAGGING_FIELDS = 192
V_CME_TAGGING_FIELDS_IN_OPEN_ORDER = 193
V_ERROR_TIME = 194
V_FULL_ORDER_PREVIEW_FIELDS = 195
V_SUBMITTER = 198
V_IMBALANCE_ONLY = 199
V_PARAMETRIZED_DAYS_OF_EXECUTIONS = 200
TWS_TIMEZONE = "US/Eastern"  # the zone TWS writes execution and completion times in

# Server -> client message ids (ibapi message.IN).
TICK_PRICE = 1
TICK_SIZE = 2
TICK_OPTION_COMPUTATION = 21
ORDER_STATUS = 3
ERR_MSG = 4
OPEN_ORDER = 5
ACCT_VALUE = 6
PORTFOLIO_VALUE = 7
ACCT_UPDATE_TIME = 8
NEXT_VALID_ID = 9
CONTRACT_DATA = 10
EXECUTION_DATA = 11
MANAGED_ACCTS = 15
CURRENT_TIME = 49
CONTRACT_DATA_END = 52
OPEN_ORDER_END = 53
ACCT_DOWNLOAD_END = 54
EXECUTION_DATA_END = 55
TICK_SNAPSHOT_END = 57
MARKET_DATA_TYPE = 58
COMMISSION_REPORT = 59
POSITION_DATA = 61
POSITION_END = 62
ACCOUNT_SUMMARY = 63
ACCOUNT_SUMMARY_END = 64
ACCOUNT_UPDATE_MULTI = 73
ACCOUNT_UPDATE_MULTI_END = 74
TICK_REQ_PARAMS = 81
PNL = 94
PNL_SINGLE = 95
ORDER_BOUND = 100
COMPLETED_ORDER = 101
COMPLETED_ORDERS_END = 102

# Client -> server message ids decoded here (ibapi message.OUT).
REQ_MKT_DATA = 1
PLACE_ORDER = 3
CANCEL_ORDER = 4
REQ_EXECUTIONS = 7
REQ_CONTRACT_DATA = 9

# Order condition type -> fields after the type (ibapi order_condition make_fields):
# price 1, time 3, margin 4, execution 5, volume 6, percent change 7.
_CONDITION_FIELDS = {1: 6, 3: 3, 4: 3, 5: 4, 6: 5, 7: 5}

Fields = list[Field]


class CodecError(ValueError):
    """A client message whose fields do not fit the layout of its message id."""


# ---------------------------------------------------------------------------------------------
# Server -> client: session, errors, time


def next_valid_id_fields(order_id: int) -> Fields:
    """nextValidId (9)."""
    return [NEXT_VALID_ID, 1, order_id]


def managed_accounts_fields(accounts: Sequence[str]) -> Fields:
    """managedAccounts (15): comma-separated account codes (ib_async needs it non-empty)."""
    return [MANAGED_ACCTS, 1, ",".join(accounts)]


def current_time_fields(epoch: int) -> Fields:
    """currentTime (49): whole epoch seconds."""
    return [CURRENT_TIME, 1, epoch]


def error_fields(
    req_id: int,
    code: int,
    message: str,
    advanced_json: str = "",
    *,
    version: int = SERVER_VERSION,
    error_time_ms: int = 0,
) -> Fields:
    """error (4): also every notice (2104 farm OK, 1100 connectivity lost, 202 cancelled...).

    ibapi decodes the text with `unicode-escape` from server version 153, so non-ASCII characters
    and backslashes are escaped the way TWS escapes them. From 194 the version field is gone and
    the error's time (epoch milliseconds) comes last.
    """
    text: Fields = [req_id, code, _ascii7(message), _ascii7(advanced_json)]
    if version >= V_ERROR_TIME:
        return [ERR_MSG, *text, error_time_ms]
    return [ERR_MSG, 2, *text]


# ---------------------------------------------------------------------------------------------
# Server -> client: account and positions


def position_fields(pos: PositionView, *, omit: Collection[str] = ()) -> Fields:
    """position (61), version 3: the reqPositions stream. `omit={"position"}` sends the quantity
    empty, which ibapi reads as UNSET_DECIMAL (the `omit_fields` fault)."""
    inst = pos.instrument
    return [
        POSITION_DATA,
        3,
        pos.account,
        *_contract_fields(inst, _listing_exchange(inst)),
        None if "position" in omit else pos.position,
        pos.avg_cost,
    ]


def position_end_fields() -> Fields:
    """positionEnd (62)."""
    return [POSITION_END, 1]


def account_summary_fields(
    req_id: int, account: str, tag: str, value: str, currency: str
) -> Fields:
    """accountSummary (63)."""
    return [ACCOUNT_SUMMARY, 1, req_id, account, tag, value, currency]


def account_summary_end_fields(req_id: int) -> Fields:
    """accountSummaryEnd (64)."""
    return [ACCOUNT_SUMMARY_END, 1, req_id]


def account_value_fields(key: str, value: str, currency: str, account: str) -> Fields:
    """updateAccountValue (6), version 2: the reqAccountUpdates stream."""
    return [ACCT_VALUE, 2, key, value, currency, account]


def portfolio_fields(pos: PositionView, *, omit: Collection[str] = ()) -> Fields:
    """updatePortfolio (7), version 8: the reqAccountUpdates per-position stream."""
    inst = pos.instrument
    return [
        PORTFOLIO_VALUE,
        8,
        *_contract_fields(inst, inst.primary_exchange),
        None if "position" in omit else pos.position,
        pos.market_price,
        pos.market_value,
        pos.avg_cost,
        pos.unrealized_pnl,
        pos.realized_pnl,
        pos.account,
    ]


def account_time_fields(hhmm: str) -> Fields:
    """updateAccountTime (8): `HH:MM`."""
    return [ACCT_UPDATE_TIME, 1, hhmm]


def account_download_end_fields(account: str) -> Fields:
    """accountDownloadEnd (54)."""
    return [ACCT_DOWNLOAD_END, 1, account]


def account_update_multi_fields(
    req_id: int, account: str, model_code: str, key: str, value: str, currency: str
) -> Fields:
    """accountUpdateMulti (73)."""
    return [ACCOUNT_UPDATE_MULTI, 1, req_id, account, model_code, key, value, currency]


def account_update_multi_end_fields(req_id: int) -> Fields:
    """accountUpdateMultiEnd (74)."""
    return [ACCOUNT_UPDATE_MULTI_END, 1, req_id]


def pnl_fields(req_id: int, daily: float, unrealized: float, realized: float) -> Fields:
    """pnl (94): no version field."""
    return [PNL, req_id, daily, unrealized, realized]


def pnl_single_fields(
    req_id: int,
    pos: float,
    daily: float,
    unrealized: float,
    realized: float,
    value: float,
    *,
    omit: Collection[str] = (),
) -> Fields:
    """pnlSingle (95): no version field; `value` is the position's market value."""
    quantity = None if "position" in omit else pos
    worth = UNSET_DOUBLE if "value" in omit else value  # as TWS writes an unset double
    return [PNL_SINGLE, req_id, quantity, daily, unrealized, realized, worth]


# ---------------------------------------------------------------------------------------------
# Server -> client: orders and executions


def open_order_fields(order: SimOrder, *, version: int = SERVER_VERSION) -> Fields:
    """openOrder (5): no version field; every field ibapi's processOpenOrder reads at `version`."""
    inst = order.instrument
    f: Fields = [OPEN_ORDER, order.order_id]
    f += _contract_fields(inst, inst.exchange)
    f += _order_head_fields(order)
    f += [
        order.client_id,
        order.perm_id,
        order.outside_rth,
        False,  # hidden
        0.0,  # discretionaryAmt
        "",  # goodAfterTime
        "",  # sharesAllocation (deprecated)
        "",  # faGroup
        "",  # faMethod
        "",  # faPercentage (faProfile is gone from 177)
        "",  # modelCode
        "",  # goodTillDate
        "",  # rule80A
        "",  # percentOffset
        "",  # settlingFirm
        0,  # shortSaleSlot
        "",  # designatedLocation
        -1,  # exemptCode
        0,  # auctionStrategy
        "",  # startingPrice
        "",  # stockRefPrice
        "",  # delta
        "",  # stockRangeLower
        "",  # stockRangeUpper
        "",  # displaySize
        False,  # blockOrder
        False,  # sweepToFill
        False,  # allOrNone
        "",  # minQty
        order.oca_type,
        False,  # eTradeOnly
        False,  # firmQuoteOnly
        "",  # nbboPriceCap
        order.parent_id,
        0,  # triggerMethod
        "",  # volatility
        0,  # volatilityType
        "",  # deltaNeutralOrderType: empty, else 8 more fields follow
        "",  # deltaNeutralAuxPrice
        False,  # continuousUpdate
        0,  # referencePriceType
        _optional(order.trail_stop_price),
        _optional(order.trailing_percent),
        "",  # basisPoints
        "",  # basisPointsType
        "",  # comboLegsDescrip
        0,  # combo legs count
        0,  # order combo legs count
        0,  # smart combo routing params count
        "",  # scaleInitLevelSize
        "",  # scaleSubsLevelSize
        "",  # scalePriceIncrement: unset, so no scale fields follow
        "",  # hedgeType: empty, so no hedgeParam
        False,  # optOutSmartRouting
        "",  # clearingAccount
        "",  # clearingIntent
        False,  # notHeld
        False,  # delta-neutral contract present
        "",  # algoStrategy: empty, so no params
        False,  # solicited
        False,  # whatIf
        order.status,
    ]
    f += [""] * 9  # margin before/change/after: init, maint, equity with loan (what-if only)
    f += ["", "", "", ""]  # commission, min, max, commission currency
    if version >= V_FULL_ORDER_PREVIEW_FIELDS:
        f += [""]  # marginCurrency
        f += [""] * 9  # margins outside RTH: init, maint, equity with loan (before/change/after)
        f += ["", "", 0]  # suggestedSize, rejectReason, order allocations count
    f += [
        "",  # warningText
        False,  # randomizeSize
        False,  # randomizePrice
        0,  # conditions count
        "",  # adjustedOrderType
        "",  # triggerPrice
        _optional(order.trail_stop_price),
        _optional(order.lmt_price_offset),
        "",  # adjustedStopPrice
        "",  # adjustedStopLimitPrice
        "",  # adjustedTrailingAmount
        0,  # adjustableTrailingUnit
        "",  # softDollarTier name
        "",  # softDollarTier value
        "",  # softDollarTier display name
        "",  # cashQty
        False,  # dontUseAutoPriceForHedge
        False,  # isOmsContainer
        False,  # discretionaryUpToLimitPrice
        False,  # usePriceMgmtAlgo
        "",  # duration
        "",  # postToAts
        False,  # autoCancelParent
        "",  # minTradeQty
        "",  # minCompeteSize
        "",  # competeAgainstBestOffset
        "",  # midOffsetAtWhole
        "",  # midOffsetAtHalf
    ]
    if version >= V_CUSTOMER_ACCOUNT:
        f += [""]  # customerAccount
    if version >= V_PROFESSIONAL_CUSTOMER:
        f += [False]  # professionalCustomer
    if version >= V_BOND_ACCRUED_INTEREST:
        f += [""]  # bondAccruedInterest
    if version >= V_INCLUDE_OVERNIGHT:
        f += [False]  # includeOvernight
    if version >= V_CME_TAGGING_FIELDS_IN_OPEN_ORDER:
        f += ["", ""]  # extOperator, manualOrderIndicator
    if version >= V_SUBMITTER:
        f += [""]  # submitter
    if version >= V_IMBALANCE_ONLY:
        f += [False]  # imbalanceOnly
    return f


def order_status_fields(
    order: SimOrder, mkt_cap_price: float = 0.0, *, omit: Collection[str] = ()
) -> Fields:
    """orderStatus (3) at 178: no version field, mktCapPrice last. A field in `omit` is sent
    empty (ibapi reads an empty id as 0 on this wire, an empty count as UNSET_DECIMAL)."""
    return [
        ORDER_STATUS,
        None if "order_id" in omit else order.order_id,
        order.status,
        None if "filled" in omit else order.filled,
        None if "remaining" in omit else order.remaining,
        order.avg_fill_price,
        None if "perm_id" in omit else order.perm_id,
        order.parent_id,
        order.last_fill_price,
        None if "client_id" in omit else order.client_id,
        order.why_held,
        mkt_cap_price,
    ]


def open_order_end_fields() -> Fields:
    """openOrderEnd (53)."""
    return [OPEN_ORDER_END, 1]


def completed_order_fields(
    order: SimOrder,
    completed_time: str = "",
    completed_status: str = "",
    *,
    version: int = SERVER_VERSION,
) -> Fields:
    """completedOrder (101): no order id, no version; ibapi's processCompletedOrderMsg layout.

    `completed_status` defaults to the order's status ("Filled", "Cancelled", ...).
    """
    inst = order.instrument
    f: Fields = [COMPLETED_ORDER]
    f += _contract_fields(inst, inst.exchange)
    f += _order_head_fields(order)
    f += [
        order.perm_id,
        order.outside_rth,
        False,  # hidden
        0.0,  # discretionaryAmt
        "",  # goodAfterTime
        "",  # faGroup
        "",  # faMethod
        "",  # faPercentage
        "",  # modelCode
        "",  # goodTillDate
        "",  # rule80A
        "",  # percentOffset
        "",  # settlingFirm
        0,  # shortSaleSlot
        "",  # designatedLocation
        -1,  # exemptCode
        "",  # startingPrice
        "",  # stockRefPrice
        "",  # delta
        "",  # stockRangeLower
        "",  # stockRangeUpper
        "",  # displaySize
        False,  # sweepToFill
        False,  # allOrNone
        "",  # minQty
        order.oca_type,
        0,  # triggerMethod
        "",  # volatility
        0,  # volatilityType
        "",  # deltaNeutralOrderType
        "",  # deltaNeutralAuxPrice
        False,  # continuousUpdate
        0,  # referencePriceType
        _optional(order.trail_stop_price),
        _optional(order.trailing_percent),
        "",  # comboLegsDescrip
        0,  # combo legs count
        0,  # order combo legs count
        0,  # smart combo routing params count
        "",  # scaleInitLevelSize
        "",  # scaleSubsLevelSize
        "",  # scalePriceIncrement
        "",  # hedgeType
        "",  # clearingAccount
        "",  # clearingIntent
        False,  # notHeld
        False,  # delta-neutral contract present
        "",  # algoStrategy
        False,  # solicited
        order.status,
        False,  # randomizeSize
        False,  # randomizePrice
        0,  # conditions count
        _optional(order.trail_stop_price),
        _optional(order.lmt_price_offset),
        "",  # cashQty
        False,  # dontUseAutoPriceForHedge
        False,  # isOmsContainer
        "",  # autoCancelDate
        order.filled,  # filledQuantity
        0,  # refFuturesConId
        False,  # autoCancelParent
        "",  # shareholder
        False,  # imbalanceOnly
        False,  # routeMarketableToBbo
        0,  # parentPermId
        completed_time,
        completed_status or order.status,
        "",  # minTradeQty
        "",  # minCompeteSize
        "",  # competeAgainstBestOffset
        "",  # midOffsetAtWhole
        "",  # midOffsetAtHalf
    ]
    if version >= V_CUSTOMER_ACCOUNT:
        f += [""]  # customerAccount
    if version >= V_PROFESSIONAL_CUSTOMER:
        f += [False]  # professionalCustomer
    if version >= V_SUBMITTER:
        f += [""]  # submitter
    return f


def completed_orders_end_fields() -> Fields:
    """completedOrdersEnd (102): the message id alone."""
    return [COMPLETED_ORDERS_END]


def order_bound_fields(perm_id: int, client_id: int, order_id: int) -> Fields:
    """orderBound (100): a TWS order bound to an API order id (reqAutoOpenOrders, clientId 0)."""
    return [ORDER_BOUND, perm_id, client_id, order_id]


def format_tws_time(epoch: float, tz: str = TWS_TIMEZONE) -> str:
    """`YYYYMMDD HH:MM:SS <zone>`, the way TWS writes execution times (ib_async parses the zone)."""
    local = datetime.fromtimestamp(epoch, ZoneInfo(tz))
    return f"{local:%Y%m%d %H:%M:%S} {tz}"


def exec_details_fields(
    req_id: int, fill: Fill, tz: str = TWS_TIMEZONE, *, version: int = SERVER_VERSION
) -> Fields:
    """execDetails (11): no version field; pendingPriceRevision last, then the submitter from 198.
    `req_id` is -1 for executions that were not requested (live fills)."""
    inst = fill.instrument
    f: Fields = [
        EXECUTION_DATA,
        req_id,
        fill.order_id,
        *_contract_fields(inst, inst.exchange),
        fill.exec_id,
        format_tws_time(fill.time, tz),
        fill.account,
        _listing_exchange(inst),  # where it executed
        fill.side,
        fill.shares,
        fill.price,
        fill.perm_id,
        fill.client_id,
        0,  # liquidation
        fill.cum_qty,
        fill.avg_price,
        fill.order_ref,
        "",  # evRule
        "",  # evMultiplier
        "",  # modelCode
        0,  # lastLiquidity
        False,  # pendingPriceRevision
    ]
    if version >= V_SUBMITTER:
        f += [""]  # submitter
    return f


def exec_details_end_fields(req_id: int) -> Fields:
    """execDetailsEnd (55)."""
    return [EXECUTION_DATA_END, 1, req_id]


def commission_report_fields(fill: Fill) -> Fields:
    """commissionReport (59). TWS reports the realized PnL of an opening fill as UNSET_DOUBLE;
    pass that through in `fill.realized_pnl` where it applies."""
    return [
        COMMISSION_REPORT,
        1,
        fill.exec_id,
        fill.commission,
        fill.instrument.currency,
        fill.realized_pnl,
        "",  # yield
        "",  # yieldRedemptionDate
    ]


# ---------------------------------------------------------------------------------------------
# Server -> client: market data and contracts


def tick_price_fields(
    req_id: int, tick_type: int, price: float, size: float, attr_mask: int = 0
) -> Fields:
    """tickPrice (1), version 6: ibapi follows a bid/ask/last price with the matching size tick."""
    return [TICK_PRICE, 6, req_id, tick_type, price, size, attr_mask]


def tick_option_computation_fields(
    req_id: int,
    tick_type: int,
    implied_vol: float | None,
    delta: float,
    opt_price: float,
    gamma: float,
    vega: float,
    theta: float,
    und_price: float,
) -> Fields:
    """tickOptionComputation (21) from version 156 (no version field): tickAttrib 1 (price
    based), impliedVol (-1 when not computed), delta, optPrice, pvDividend (0: no dividends),
    gamma, vega, theta, undPrice."""
    iv = -1.0 if implied_vol is None else implied_vol
    return [
        TICK_OPTION_COMPUTATION, req_id, tick_type, 1, iv, delta, opt_price, 0.0,
        gamma, vega, theta, und_price,
    ]  # fmt: skip


def tick_size_fields(req_id: int, tick_type: int, size: float) -> Fields:
    """tickSize (2), version 6."""
    return [TICK_SIZE, 6, req_id, tick_type, size]


def tick_req_params_fields(
    req_id: int, min_tick: float, bbo_exchange: str = "", snapshot_permissions: int = 3
) -> Fields:
    """tickReqParams (81): TWS sends it first in answer to reqMktData."""
    return [TICK_REQ_PARAMS, req_id, min_tick, bbo_exchange, snapshot_permissions]


def tick_snapshot_end_fields(req_id: int) -> Fields:
    """tickSnapshotEnd (57): closes a snapshot request."""
    return [TICK_SNAPSHOT_END, 1, req_id]


def market_data_type_fields(req_id: int, market_data_type: int) -> Fields:
    """marketDataType (58): 1 live, 2 frozen, 3 delayed, 4 delayed frozen."""
    return [MARKET_DATA_TYPE, 1, req_id, market_data_type]


def contract_details_fields(
    req_id: int,
    instrument: Instrument,
    *,
    version: int = SERVER_VERSION,
    hours: ContractHours | None = None,
) -> Fields:
    """contractDetails (10): no version field (dropped at 164); lastTradeDate from 182, the
    ineligibility reasons count from 186 (fund fields, from 179, only for secType FUND)."""
    inst = instrument
    hours = hours or ContractHours(TWS_TIMEZONE)
    order_types = "LMT,MKT" if inst.sec_type == "STK" else "LMT,MKT,STP"
    f: Fields = [
        CONTRACT_DATA,
        req_id,
        inst.symbol,
        inst.sec_type,
        inst.last_trade_date,  # lastTradeDateOrContractMonth[ time[ zone]]
    ]
    if version >= V_LAST_TRADE_DATE:
        f += [inst.last_trade_date]  # lastTradeDate
    f += [
        inst.strike,
        inst.right,
        inst.exchange,
        inst.currency,
        local_symbol(inst),
        trading_class(inst),  # marketName
        trading_class(inst),
        inst.con_id,
        inst.min_tick,
        multiplier_text(inst),
        order_types,
        valid_exchanges(inst),
        1,  # priceMagnifier
        inst.underlying_con_id,  # underConId
        inst.symbol,  # longName
        inst.primary_exchange,
        inst.last_trade_date[:6],  # contractMonth
        "",  # industry
        "",  # category
        "",  # subcategory
        hours.time_zone,  # timeZoneId
        hours.trading,  # tradingHours
        hours.liquid,  # liquidHours
        "",  # evRule
        "",  # evMultiplier
        0,  # secIdList count
        0,  # aggGroup
        "",  # underSymbol
        "",  # underSecType
        "",  # marketRuleIds
        inst.last_trade_date,  # realExpirationDate
        "COMMON" if inst.sec_type == "STK" else "",  # stockType
        1,  # minSize
        1,  # sizeIncrement
        1,  # suggestedSizeIncrement
    ]
    if version >= V_INELIGIBILITY_REASONS:
        f += [0]  # ineligibility reasons count
    return f


def contract_details_end_fields(req_id: int) -> Fields:
    """contractDetailsEnd (52)."""
    return [CONTRACT_DATA_END, 1, req_id]


# ---------------------------------------------------------------------------------------------
# Client -> server


@dataclass(frozen=True, slots=True)
class MktDataRequest:
    """reqMktData (1)."""

    req_id: int
    contract: ContractSpec
    generic_ticks: str
    snapshot: bool
    regulatory_snapshot: bool = False


@dataclass(frozen=True, slots=True)
class ExecutionsRequest:
    """reqExecutions (7) with its ExecutionFilter; empty strings and client id 0 match all."""

    req_id: int
    client_id: int
    account: str
    time: str
    symbol: str
    sec_type: str
    exchange: str
    side: str


@dataclass(frozen=True, slots=True)
class PlacedOrder:
    """placeOrder read in full: the order, and what the gateway must notice to refuse it or to not
    execute it. `features` names what a plain order does not use (combo, algo, conditions, scale,
    hedge, delta_neutral, delta_neutral_contract, sec_id, cash_qty, peg_bench, peg_best, peg_mid).
    """

    order: OrderRequest
    what_if: bool
    oca_group: str
    good_after_time: str
    good_till_date: str
    hidden: bool
    features: tuple[str, ...]


class _Cursor:
    """Reads one message's fields in order, tolerant of both clients' ways to say "unset"."""

    __slots__ = ("_fields", "_name", "_pos")

    def __init__(self, name: str, fields: Sequence[str], msg_id: int) -> None:
        self._name = name
        self._fields = fields
        self._pos = 0
        if not fields:
            raise CodecError(f"{name}: empty message")
        if self.integer() != msg_id:
            raise CodecError(f"{name}: message id {fields[0]!r} is not {msg_id}")

    def text(self) -> str:
        if self._pos >= len(self._fields):
            raise CodecError(f"{self._name}: ran out of fields after {self._pos}")
        value = self._fields[self._pos]
        self._pos += 1
        return value

    def skip(self, count: int = 1) -> None:
        for _ in range(count):
            self.text()

    def integer(self) -> int:
        """An int; 0 when empty or UNSET_INTEGER."""
        raw = self.text().strip()
        if raw in ("", str(UNSET_INTEGER)):
            return 0
        try:
            return int(raw)
        except ValueError:
            raise CodecError(f"{self._name}: {raw!r} is not an integer") from None

    def number(self) -> float | None:
        """A double; None when empty or UNSET_DOUBLE."""
        raw = self.text().strip()
        if raw == "":
            return None
        if raw in ("Infinity", "Infinite"):
            return math.inf
        try:
            value = float(raw)
        except ValueError:
            raise CodecError(f"{self._name}: {raw!r} is not a number") from None
        if math.isnan(value):
            raise CodecError(f"{self._name}: NaN where a number belongs")
        return None if value == UNSET_DOUBLE else value

    def flag(self) -> bool:
        raw = self.text().strip()
        if raw in ("", "0"):
            return False
        if raw == "1":
            return True
        raise CodecError(f"{self._name}: {raw!r} is not a boolean")

    def count(self) -> int:
        value = self.integer()
        if not 0 <= value <= 1000:
            raise CodecError(f"{self._name}: count {value} out of range")
        return value

    def contract(self) -> ContractSpec:
        """conId, symbol, secType, lastTradeDate, strike, right, multiplier, exchange,
        primaryExchange, currency, localSymbol, tradingClass."""
        return ContractSpec(
            con_id=self.integer(),
            symbol=self.text(),
            sec_type=self.text(),
            last_trade_date=self.text(),
            strike=self.number() or 0.0,
            right=self.text(),
            multiplier=self.text(),
            exchange=self.text(),
            primary_exchange=self.text(),
            currency=self.text(),
            local_symbol=self.text(),
            trading_class=self.text(),
        )

    def end(self) -> None:
        extra = len(self._fields) - self._pos
        if extra:
            raise CodecError(f"{self._name}: {extra} unexpected trailing field(s)")


def decode_place_order(fields: Sequence[str]) -> OrderRequest:
    """placeOrder (3) -> the order the simulator acts on. See `decode_place_order_in_full` for
    whatIf and the features a plain order does not use."""
    return decode_place_order_in_full(fields).order


def decode_place_order_in_full(fields: Sequence[str], version: int = SERVER_VERSION) -> PlacedOrder:
    """placeOrder (3), field for field as ibapi's EClient.placeOrder writes it at `version` and
    ib_async's Client.placeOrder at 178 (no version field; both agree at 178)."""
    c = _Cursor("placeOrder", fields, PLACE_ORDER)
    features: list[str] = []
    order_id = c.integer()
    contract = c.contract()
    sec_id_type, sec_id = c.text(), c.text()
    if sec_id_type or sec_id:
        features.append("sec_id")
    action = c.text()
    total_quantity = c.number() or 0.0
    order_type = c.text()
    lmt_price = c.number()
    aux_price = c.number()
    tif = c.text()
    oca_group = c.text()
    account = c.text()
    c.skip(2)  # openClose, origin
    order_ref = c.text()
    transmit = c.flag()
    parent_id = c.integer()
    c.skip(4)  # blockOrder, sweepToFill, displaySize, triggerMethod
    outside_rth = c.flag()
    hidden = c.flag()
    if contract.sec_type == "BAG":
        features.append("combo")
        c.skip(8 * c.count())  # combo legs
        c.skip(c.count())  # order combo leg prices
        c.skip(2 * c.count())  # smart combo routing params
    c.skip(2)  # sharesAllocation (deprecated), discretionaryAmt
    good_after_time = c.text()
    good_till_date = c.text()
    c.skip(4)  # faGroup, faMethod, faPercentage, modelCode (faProfile gone from 177)
    c.skip(3)  # shortSaleSlot, designatedLocation, exemptCode
    oca_type = c.integer()
    c.skip(5)  # rule80A, settlingFirm, allOrNone, minQty, percentOffset
    c.skip(3)  # eTradeOnly, firmQuoteOnly, nbboPriceCap
    c.skip(7)  # auctionStrategy, startingPrice, stockRefPrice, delta, range lower/upper, override
    c.skip(2)  # volatility, volatilityType
    delta_neutral = c.text()  # deltaNeutralOrderType
    c.skip()  # deltaNeutralAuxPrice
    if delta_neutral:
        features.append("delta_neutral")
        c.skip(8)  # conId, settlingFirm, clearing account/intent, openClose, shortSale, slot, loc
    c.skip(2)  # continuousUpdate, referencePriceType
    trail_stop_price = c.number()
    trailing_percent = c.number()
    c.skip(2)  # scaleInitLevelSize, scaleSubsLevelSize
    increment = c.number()
    if increment is not None and increment > 0.0:
        features.append("scale")
        c.skip(7)
    c.skip(3)  # scaleTable, activeStartTime, activeStopTime
    if c.text():  # hedgeType
        features.append("hedge")
        c.skip()  # hedgeParam
    c.skip(4)  # optOutSmartRouting, clearingAccount, clearingIntent, notHeld
    if c.flag():  # delta-neutral contract: conId, delta, price
        features.append("delta_neutral_contract")
        c.skip(3)
    if c.text():  # algoStrategy
        features.append("algo")
        c.skip(2 * c.count())
    c.skip()  # algoId
    what_if = c.flag()
    c.skip(4)  # miscOptions, solicited, randomizeSize, randomizePrice
    if order_type in ("PEG BENCH", "PEGBENCH"):
        features.append("peg_bench")
        c.skip(5)
    conditions = c.count()
    if conditions:
        features.append("conditions")
        for _ in range(conditions):
            kind = c.integer()
            if kind not in _CONDITION_FIELDS:
                raise CodecError(f"placeOrder: unknown order condition type {kind}")
            c.skip(_CONDITION_FIELDS[kind])
        c.skip(2)  # conditionsIgnoreRth, conditionsCancelOrder
    c.skip(2)  # adjustedOrderType, triggerPrice
    lmt_price_offset = c.number()
    c.skip(4)  # adjusted stop, stop-limit, trailing amount and unit
    c.skip(3)  # extOperator, softDollarTier name and value
    if c.number():  # cashQty
        features.append("cash_qty")
    c.skip(4)  # MiFID II decision maker/algo, execution trader/algo
    c.skip(4)  # dontUseAutoPriceForHedge, isOmsContainer, discretionaryUpToLimitPrice, priceMgmt
    c.skip(5)  # duration, postToAts, autoCancelParent, advancedErrorOverride, manualOrderTime
    if contract.exchange == "IBKRATS":
        c.skip()  # minTradeQty
    if order_type in ("PEG BEST", "PEGBEST"):
        features.append("peg_best")
        c.skip()  # minCompeteSize
        if c.number() == math.inf:  # competeAgainstBestOffset "up to mid"
            c.skip(2)  # midOffsetAtWhole, midOffsetAtHalf
    elif order_type in ("PEG MID", "PEGMID"):
        features.append("peg_mid")
        c.skip(2)
    if version >= V_CUSTOMER_ACCOUNT:
        c.skip()  # customerAccount
    if version >= V_PROFESSIONAL_CUSTOMER:
        c.skip()  # professionalCustomer
    if V_RFQ_FIELDS <= version < V_UNDO_RFQ_FIELDS:
        c.skip(2)  # the RFQ fields of 187-189
    if version >= V_INCLUDE_OVERNIGHT:
        c.skip()  # includeOvernight
    if version >= V_CME_TAGGING_FIELDS:
        c.skip()  # manualOrderIndicator
    if version >= V_IMBALANCE_ONLY:
        c.skip()  # imbalanceOnly
    c.end()
    order = OrderRequest(
        order_id=order_id,
        contract=contract,
        action=action,
        total_quantity=total_quantity,
        order_type=order_type,
        lmt_price=lmt_price,
        aux_price=aux_price,
        tif=tif,
        account=account,
        order_ref=order_ref,
        outside_rth=outside_rth,
        transmit=transmit,
        parent_id=parent_id,
        oca_group=oca_group,
        oca_type=oca_type,
        trailing_percent=trailing_percent,
        trail_stop_price=trail_stop_price,
        lmt_price_offset=lmt_price_offset,
    )
    return PlacedOrder(
        order=order,
        what_if=what_if,
        oca_group=oca_group,
        good_after_time=good_after_time,
        good_till_date=good_till_date,
        hidden=hidden,
        features=tuple(features),
    )


def decode_cancel_order(fields: Sequence[str], version: int = SERVER_VERSION) -> int:
    """cancelOrder (4) -> the order id. At 178: version 1, orderId, manualOrderCancelTime; the
    version field goes at 192, which adds extOperator and manualOrderIndicator."""
    c = _Cursor("cancelOrder", fields, CANCEL_ORDER)
    if version < V_CME_TAGGING_FIELDS:
        c.skip()  # version
    order_id = c.integer()
    c.skip()  # manualOrderCancelTime (169)
    if V_RFQ_FIELDS <= version < V_UNDO_RFQ_FIELDS:
        c.skip(3)  # the RFQ fields of 187-189
    if version >= V_CME_TAGGING_FIELDS:
        c.skip(2)  # extOperator, manualOrderIndicator
    c.end()
    return order_id


def decode_mkt_data_request(fields: Sequence[str]) -> MktDataRequest:
    """reqMktData (1), version 11."""
    c = _Cursor("reqMktData", fields, REQ_MKT_DATA)
    c.skip()  # version
    req_id = c.integer()
    contract = c.contract()
    if contract.sec_type == "BAG":
        c.skip(4 * c.count())  # legs: conId, ratio, action, exchange
    if c.flag():  # delta-neutral contract: conId, delta, price
        c.skip(3)
    generic_ticks = c.text()
    snapshot = c.flag()
    regulatory_snapshot = c.flag()
    c.skip()  # mktDataOptions
    c.end()
    return MktDataRequest(req_id, contract, generic_ticks, snapshot, regulatory_snapshot)


def decode_contract_details_request(fields: Sequence[str]) -> tuple[int, ContractSpec]:
    """reqContractDetails (9), version 8 -> (req_id, contract)."""
    c = _Cursor("reqContractDetails", fields, REQ_CONTRACT_DATA)
    c.skip()  # version
    req_id = c.integer()
    contract = c.contract()
    c.skip(4)  # includeExpired, secIdType, secId, issuerId (176)
    c.end()
    return req_id, contract


def decode_executions_request(
    fields: Sequence[str], version: int = SERVER_VERSION
) -> ExecutionsRequest:
    """reqExecutions (7), version 3; lastNDays and the specific dates follow from 200 (read and
    not applied: the simulator keeps one session's executions)."""
    c = _Cursor("reqExecutions", fields, REQ_EXECUTIONS)
    c.skip()  # version
    request = ExecutionsRequest(
        req_id=c.integer(),
        client_id=c.integer(),
        account=c.text(),
        time=c.text(),
        symbol=c.text(),
        sec_type=c.text(),
        exchange=c.text(),
        side=c.text(),
    )
    if version >= V_PARAMETRIZED_DAYS_OF_EXECUTIONS:
        c.skip()  # lastNDays
        c.skip(c.count())  # specific dates
    c.end()
    return request


# ---------------------------------------------------------------------------------------------
# Contract field conventions


def _contract_fields(inst: Instrument, exchange: str) -> Fields:
    """The contract run that position, portfolio, openOrder, completedOrder and execDetails share:
    conId, symbol, secType, lastTradeDate, strike, right, multiplier, exchange, currency,
    localSymbol, tradingClass. Only the exchange differs between them."""
    return [
        inst.con_id,
        inst.symbol,
        inst.sec_type,
        inst.last_trade_date,
        inst.strike,
        inst.right,
        multiplier_text(inst),
        exchange,
        inst.currency,
        local_symbol(inst),
        trading_class(inst),
    ]


def _order_head_fields(order: SimOrder) -> Fields:
    """The order fields openOrder and completedOrder both start with, after the contract:
    action, totalQuantity, orderType, lmtPrice, auxPrice, tif, ocaGroup, account, openClose,
    origin, orderRef."""
    return [
        order.action,
        order.total_quantity,
        order.order_type,
        order.lmt_price if order.lmt_price is not None else 0.0,
        order.aux_price if order.aux_price is not None else 0.0,
        order.tif,
        order.oca_group,
        order.account,
        "",  # openClose
        0,  # origin: customer
        order.order_ref,
    ]


def _optional(value: float | None) -> Field:
    """An optional double: empty when unset, as TWS writes it."""
    return "" if value is None else value


def multiplier_text(inst: Instrument) -> str:
    """Stocks and FX pairs carry an empty multiplier; futures their contract multiplier ("50")."""
    if inst.sec_type in ("STK", "CASH") and inst.multiplier == 1.0:
        return ""
    return format_multiplier(inst.multiplier)


def format_multiplier(value: float) -> str:
    """A multiplier as TWS writes it: `50`, `0.1`."""
    return str(int(value)) if value.is_integer() else repr(value)


def _listing_exchange(inst: Instrument) -> str:
    return inst.primary_exchange or inst.exchange


def valid_exchanges(inst: Instrument) -> str:
    if not inst.primary_exchange or inst.primary_exchange == inst.exchange:
        return inst.exchange
    return f"{inst.exchange},{inst.primary_exchange}"


def local_symbol(inst: Instrument) -> str:
    return inst.local_symbol or inst.symbol


def trading_class(inst: Instrument) -> str:
    if inst.trading_class:
        return inst.trading_class
    return "NMS" if inst.sec_type == "STK" else inst.symbol


def _ascii7(text: str) -> str:
    """Escape as TWS does from server version 153: backslash and non-ASCII as Python escapes."""
    if text.isascii() and "\\" not in text:
        return text
    return text.encode("unicode-escape").decode("ascii")
