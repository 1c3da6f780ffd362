"""TWS API protobuf messages as the simulated gateway writes and reads them (server version 201+).

Server -> client: each function returns one message built with the generated classes ibapi ships
(`ibapi.protobuf`), ready for `SerializeToString`. As on the text wire, only what the simulator
knows is filled in; a field left out arrives in ibapi as its unset value (UNSET_DECIMAL,
UNSET_INTEGER, an empty string...), so these builders set every field the guard reads, and
`omit` names fields to leave out on purpose (the `omit_fields` fault).

Client -> server: `decode_request` parses the protobuf request ibapi 10.50.2 sends from the
versions in `ibapi.common.getServerVersionForMessage`, and returns it in the shape the gateway's
handlers take: the text fields of the same request at server version 178 (message id first), or,
for placeOrder, the decoded `codec.PlacedOrder`. `tests/unit/ibsim/test_sim_codec.py` proves both
directions
with ibapi's own EClient and EDecoder.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from typing import Any

from ibapi.protobuf.AccountDataEnd_pb2 import AccountDataEnd
from ibapi.protobuf.AccountDataRequest_pb2 import AccountDataRequest
from ibapi.protobuf.AccountSummary_pb2 import AccountSummary
from ibapi.protobuf.AccountSummaryEnd_pb2 import AccountSummaryEnd
from ibapi.protobuf.AccountSummaryRequest_pb2 import AccountSummaryRequest
from ibapi.protobuf.AccountUpdateMulti_pb2 import AccountUpdateMulti
from ibapi.protobuf.AccountUpdateMultiEnd_pb2 import AccountUpdateMultiEnd
from ibapi.protobuf.AccountUpdatesMultiRequest_pb2 import AccountUpdatesMultiRequest
from ibapi.protobuf.AccountUpdateTime_pb2 import AccountUpdateTime
from ibapi.protobuf.AccountValue_pb2 import AccountValue
from ibapi.protobuf.AllOpenOrdersRequest_pb2 import AllOpenOrdersRequest
from ibapi.protobuf.AutoOpenOrdersRequest_pb2 import AutoOpenOrdersRequest
from ibapi.protobuf.CancelAccountSummary_pb2 import CancelAccountSummary
from ibapi.protobuf.CancelAccountUpdatesMulti_pb2 import CancelAccountUpdatesMulti
from ibapi.protobuf.CancelMarketData_pb2 import CancelMarketData
from ibapi.protobuf.CancelOrderRequest_pb2 import CancelOrderRequest
from ibapi.protobuf.CancelPnL_pb2 import CancelPnL
from ibapi.protobuf.CancelPnLSingle_pb2 import CancelPnLSingle
from ibapi.protobuf.CancelPositions_pb2 import CancelPositions
from ibapi.protobuf.CommissionAndFeesReport_pb2 import CommissionAndFeesReport
from ibapi.protobuf.CompletedOrder_pb2 import CompletedOrder
from ibapi.protobuf.CompletedOrdersEnd_pb2 import CompletedOrdersEnd
from ibapi.protobuf.CompletedOrdersRequest_pb2 import CompletedOrdersRequest
from ibapi.protobuf.Contract_pb2 import Contract
from ibapi.protobuf.ContractData_pb2 import ContractData
from ibapi.protobuf.ContractDataEnd_pb2 import ContractDataEnd
from ibapi.protobuf.ContractDataRequest_pb2 import ContractDataRequest
from ibapi.protobuf.CurrentTime_pb2 import CurrentTime
from ibapi.protobuf.CurrentTimeRequest_pb2 import CurrentTimeRequest
from ibapi.protobuf.ErrorMessage_pb2 import ErrorMessage
from ibapi.protobuf.ExecutionDetails_pb2 import ExecutionDetails
from ibapi.protobuf.ExecutionDetailsEnd_pb2 import ExecutionDetailsEnd
from ibapi.protobuf.ExecutionRequest_pb2 import ExecutionRequest
from ibapi.protobuf.GlobalCancelRequest_pb2 import GlobalCancelRequest
from ibapi.protobuf.IdsRequest_pb2 import IdsRequest
from ibapi.protobuf.ManagedAccounts_pb2 import ManagedAccounts
from ibapi.protobuf.ManagedAccountsRequest_pb2 import ManagedAccountsRequest
from ibapi.protobuf.MarketDataRequest_pb2 import MarketDataRequest
from ibapi.protobuf.MarketDataType_pb2 import MarketDataType
from ibapi.protobuf.MarketDataTypeRequest_pb2 import MarketDataTypeRequest
from ibapi.protobuf.NextValidId_pb2 import NextValidId
from ibapi.protobuf.OpenOrder_pb2 import OpenOrder
from ibapi.protobuf.OpenOrdersEnd_pb2 import OpenOrdersEnd
from ibapi.protobuf.OpenOrdersRequest_pb2 import OpenOrdersRequest
from ibapi.protobuf.OrderBound_pb2 import OrderBound
from ibapi.protobuf.OrderStatus_pb2 import OrderStatus
from ibapi.protobuf.PlaceOrderRequest_pb2 import PlaceOrderRequest
from ibapi.protobuf.PnL_pb2 import PnL
from ibapi.protobuf.PnLRequest_pb2 import PnLRequest
from ibapi.protobuf.PnLSingle_pb2 import PnLSingle
from ibapi.protobuf.PnLSingleRequest_pb2 import PnLSingleRequest
from ibapi.protobuf.PortfolioValue_pb2 import PortfolioValue
from ibapi.protobuf.Position_pb2 import Position
from ibapi.protobuf.PositionEnd_pb2 import PositionEnd
from ibapi.protobuf.PositionsRequest_pb2 import PositionsRequest
from ibapi.protobuf.StartApiRequest_pb2 import StartApiRequest
from ibapi.protobuf.TickOptionComputation_pb2 import TickOptionComputation
from ibapi.protobuf.TickPrice_pb2 import TickPrice
from ibapi.protobuf.TickReqParams_pb2 import TickReqParams
from ibapi.protobuf.TickSize_pb2 import TickSize
from ibapi.protobuf.TickSnapshotEnd_pb2 import TickSnapshotEnd

from ibsim import codec
from ibsim.types import (
    ContractHours,
    ContractSpec,
    Fill,
    Instrument,
    OrderRequest,
    PositionView,
    SimOrder,
)
from ibsim.wire import UNSET_DOUBLE, format_field

Proto = Any  # a generated protobuf message (ibapi ships no type stubs for them)

NO_OMISSIONS: frozenset[str] = frozenset()


class ProtoDecodeError(codec.CodecError):
    """A protobuf request that does not parse, or whose message id the gateway does not read."""


# ---------------------------------------------------------------------------------------------
# Server -> client: session, errors, time


def next_valid_id(order_id: int) -> Proto:
    """nextValidId (9)."""
    return NextValidId(orderId=order_id)


def managed_accounts(accounts: Collection[str]) -> Proto:
    """managedAccounts (15): comma-separated account codes."""
    return ManagedAccounts(accountsList=",".join(accounts))


def current_time(epoch: int) -> Proto:
    """currentTime (49): whole epoch seconds."""
    return CurrentTime(currentTime=epoch)


def error(
    req_id: int, code: int, message: str, advanced_json: str = "", error_time_ms: int = 0
) -> Proto:
    """error (4): also every notice. Protobuf strings are UTF-8: no escaping as on the text wire."""
    msg = ErrorMessage(id=req_id, errorCode=code, errorMsg=message, errorTime=error_time_ms)
    if advanced_json:
        msg.advancedOrderRejectJson = advanced_json
    return msg


# ---------------------------------------------------------------------------------------------
# Server -> client: account and positions


def position(pos: PositionView, omit: Collection[str] = NO_OMISSIONS) -> Proto:
    """position (61): the reqPositions stream; the contract's exchange is the listing exchange."""
    inst = pos.instrument
    msg = Position(
        account=pos.account,
        contract=_contract(inst, exchange=inst.primary_exchange or inst.exchange),
        avgCost=pos.avg_cost,
    )
    if "position" not in omit:
        msg.position = _decimal(pos.position)
    return msg


def position_end() -> Proto:
    """positionEnd (62)."""
    return PositionEnd()


def account_summary(req_id: int, account: str, tag: str, value: str, currency: str) -> Proto:
    """accountSummary (63)."""
    return AccountSummary(reqId=req_id, account=account, tag=tag, value=value, currency=currency)


def account_summary_end(req_id: int) -> Proto:
    """accountSummaryEnd (64)."""
    return AccountSummaryEnd(reqId=req_id)


def account_value(key: str, value: str, currency: str, account: str) -> Proto:
    """updateAccountValue (6)."""
    return AccountValue(key=key, value=value, currency=currency, accountName=account)


def portfolio(pos: PositionView, omit: Collection[str] = NO_OMISSIONS) -> Proto:
    """updatePortfolio (7): the contract carries its primary exchange, as on the text wire."""
    inst = pos.instrument
    msg = PortfolioValue(
        contract=_contract(inst, exchange="", primary_exchange=inst.primary_exchange),
        marketPrice=pos.market_price,
        marketValue=pos.market_value,
        averageCost=pos.avg_cost,
        unrealizedPNL=pos.unrealized_pnl,
        realizedPNL=pos.realized_pnl,
        accountName=pos.account,
    )
    if "position" not in omit:
        msg.position = _decimal(pos.position)
    return msg


def account_time(hhmm: str) -> Proto:
    """updateAccountTime (8)."""
    return AccountUpdateTime(timeStamp=hhmm)


def account_download_end(account: str) -> Proto:
    """accountDownloadEnd (54)."""
    return AccountDataEnd(accountName=account)


def account_update_multi(
    req_id: int, account: str, model_code: str, key: str, value: str, currency: str
) -> Proto:
    """accountUpdateMulti (73)."""
    return AccountUpdateMulti(
        reqId=req_id,
        account=account,
        modelCode=model_code,
        key=key,
        value=value,
        currency=currency,
    )


def account_update_multi_end(req_id: int) -> Proto:
    """accountUpdateMultiEnd (74)."""
    return AccountUpdateMultiEnd(reqId=req_id)


def pnl(req_id: int, daily: float, unrealized: float, realized: float) -> Proto:
    """pnl (94)."""
    return PnL(reqId=req_id, dailyPnL=daily, unrealizedPnL=unrealized, realizedPnL=realized)


def pnl_single(
    req_id: int,
    pos: float,
    daily: float,
    unrealized: float,
    realized: float,
    value: float,
    omit: Collection[str] = NO_OMISSIONS,
) -> Proto:
    """pnlSingle (95): `value` is the position's market value."""
    msg = PnLSingle(
        reqId=req_id,
        dailyPnL=daily,
        unrealizedPnL=unrealized,
        realizedPnL=realized,
    )
    if "position" not in omit:
        msg.position = _decimal(pos)
    if "value" not in omit:
        msg.value = value
    return msg


# ---------------------------------------------------------------------------------------------
# Server -> client: orders and executions


def open_order(order: SimOrder) -> Proto:
    """openOrder (5)."""
    inst = order.instrument
    msg = OpenOrder(orderId=order.order_id, contract=_contract(inst, exchange=inst.exchange))
    _fill_order(msg.order, order)
    msg.order.clientId = order.client_id
    msg.orderState.status = order.status
    return msg


def order_status(
    order: SimOrder, mkt_cap_price: float = 0.0, omit: Collection[str] = NO_OMISSIONS
) -> Proto:
    """orderStatus (3)."""
    msg = OrderStatus(
        status=order.status,
        avgFillPrice=order.avg_fill_price,
        parentId=order.parent_id,
        lastFillPrice=order.last_fill_price,
        mktCapPrice=mkt_cap_price,
    )
    if "order_id" not in omit:
        msg.orderId = order.order_id
    if "perm_id" not in omit:
        msg.permId = order.perm_id
    if "client_id" not in omit:
        msg.clientId = order.client_id
    if "filled" not in omit:
        msg.filled = _decimal(order.filled)
    if "remaining" not in omit:
        msg.remaining = _decimal(order.remaining)
    if order.why_held:
        msg.whyHeld = order.why_held
    return msg


def open_order_end() -> Proto:
    """openOrderEnd (53)."""
    return OpenOrdersEnd()


def completed_order(order: SimOrder, completed_time: str = "", completed_status: str = "") -> Proto:
    """completedOrder (101): `completed_status` defaults to the order's status."""
    inst = order.instrument
    msg = CompletedOrder(contract=_contract(inst, exchange=inst.exchange))
    _fill_order(msg.order, order)
    msg.order.filledQuantity = _decimal(order.filled)
    msg.orderState.status = order.status
    msg.orderState.completedStatus = completed_status or order.status
    if completed_time:
        msg.orderState.completedTime = completed_time
    return msg


def completed_orders_end() -> Proto:
    """completedOrdersEnd (102)."""
    return CompletedOrdersEnd()


def order_bound(perm_id: int, client_id: int, order_id: int) -> Proto:
    """orderBound (100)."""
    return OrderBound(permId=perm_id, clientId=client_id, orderId=order_id)


def exec_details(req_id: int, fill: Fill, tz: str = codec.TWS_TIMEZONE) -> Proto:
    """execDetails (11): `req_id` is -1 for executions that were not requested (live fills)."""
    inst = fill.instrument
    msg = ExecutionDetails(reqId=req_id, contract=_contract(inst, exchange=inst.exchange))
    e = msg.execution
    e.orderId = fill.order_id
    e.execId = fill.exec_id
    e.time = codec.format_tws_time(fill.time, tz)
    e.acctNumber = fill.account
    e.exchange = inst.primary_exchange or inst.exchange
    e.side = fill.side
    e.shares = _decimal(fill.shares)
    e.price = fill.price
    e.permId = fill.perm_id
    e.clientId = fill.client_id
    e.isLiquidation = False
    e.cumQty = _decimal(fill.cum_qty)
    e.avgPrice = fill.avg_price
    if fill.order_ref:
        e.orderRef = fill.order_ref
    e.lastLiquidity = 0
    e.isPriceRevisionPending = False
    return msg


def exec_details_end(req_id: int) -> Proto:
    """execDetailsEnd (55)."""
    return ExecutionDetailsEnd(reqId=req_id)


def commission_report(fill: Fill) -> Proto:
    """commissionReport (59). The realized PnL of an opening fill stays UNSET_DOUBLE, as TWS
    reports it on the text wire."""
    return CommissionAndFeesReport(
        execId=fill.exec_id,
        commissionAndFees=fill.commission,
        currency=fill.instrument.currency,
        realizedPNL=fill.realized_pnl,
    )


# ---------------------------------------------------------------------------------------------
# Server -> client: market data and contracts


def tick_price(req_id: int, tick_type: int, price: float, size: float, attr_mask: int = 0) -> Proto:
    """tickPrice (1): ibapi follows a bid/ask/last price with the matching size tick."""
    return TickPrice(
        reqId=req_id, tickType=tick_type, price=price, size=_decimal(size), attrMask=attr_mask
    )


def tick_option_computation(
    req_id: int,
    tick_type: int,
    implied_vol: float | None,
    delta: float,
    opt_price: float,
    gamma: float,
    vega: float,
    theta: float,
    und_price: float,
) -> Proto:
    """tickOptionComputation (21): as the text wire, an implied vol not computed is -1."""
    return TickOptionComputation(
        reqId=req_id,
        tickType=tick_type,
        tickAttrib=1,
        impliedVol=-1.0 if implied_vol is None else implied_vol,
        delta=delta,
        optPrice=opt_price,
        pvDividend=0.0,
        gamma=gamma,
        vega=vega,
        theta=theta,
        undPrice=und_price,
    )


def tick_size(req_id: int, tick_type: int, size: float) -> Proto:
    """tickSize (2)."""
    return TickSize(reqId=req_id, tickType=tick_type, size=_decimal(size))


def tick_req_params(
    req_id: int, min_tick: float, bbo_exchange: str = "", snapshot_permissions: int = 3
) -> Proto:
    """tickReqParams (81)."""
    msg = TickReqParams(
        reqId=req_id, minTick=format_field(min_tick), snapshotPermissions=snapshot_permissions
    )
    if bbo_exchange:
        msg.bboExchange = bbo_exchange
    return msg


def tick_snapshot_end(req_id: int) -> Proto:
    """tickSnapshotEnd (57)."""
    return TickSnapshotEnd(reqId=req_id)


def market_data_type(req_id: int, market_data_type: int) -> Proto:
    """marketDataType (58)."""
    return MarketDataType(reqId=req_id, marketDataType=market_data_type)


def contract_details(
    req_id: int, instrument: Instrument, hours: ContractHours | None = None
) -> Proto:
    """contractDetails (10): what `codec.contract_details_fields` says, as protobuf."""
    inst = instrument
    hours = hours or ContractHours(codec.TWS_TIMEZONE)
    msg = ContractData(
        reqId=req_id,
        contract=_contract(inst, exchange=inst.exchange, primary_exchange=inst.primary_exchange),
    )
    d = msg.contractDetails
    d.marketName = codec.trading_class(inst)
    d.minTick = format_field(inst.min_tick)
    d.orderTypes = "LMT,MKT" if inst.sec_type == "STK" else "LMT,MKT,STP"
    d.validExchanges = codec.valid_exchanges(inst)
    d.priceMagnifier = 1
    d.underConId = inst.underlying_con_id
    d.longName = inst.symbol
    if inst.last_trade_date:
        d.contractMonth = inst.last_trade_date[:6]
        d.realExpirationDate = inst.last_trade_date
    d.timeZoneId = hours.time_zone
    if hours.trading:
        d.tradingHours = hours.trading
    if hours.liquid:
        d.liquidHours = hours.liquid
    d.aggGroup = 0
    if inst.sec_type == "STK":
        d.stockType = "COMMON"
    d.minSize = "1"
    d.sizeIncrement = "1"
    d.suggestedSizeIncrement = "1"
    return msg


def contract_details_end(req_id: int) -> Proto:
    """contractDetailsEnd (52)."""
    return ContractDataEnd(reqId=req_id)


def _contract(inst: Instrument, *, exchange: str, primary_exchange: str = "") -> Proto:
    """The contract the text wire's 11-field contract run carries, with `exchange` as there."""
    c = Contract(
        conId=inst.con_id,
        symbol=inst.symbol,
        secType=inst.sec_type,
        currency=inst.currency,
        localSymbol=codec.local_symbol(inst),
        tradingClass=codec.trading_class(inst),
    )
    if inst.last_trade_date:
        c.lastTradeDateOrContractMonth = inst.last_trade_date
    if inst.strike:
        c.strike = inst.strike
    if inst.right:
        c.right = inst.right
    if codec.multiplier_text(inst):
        c.multiplier = inst.multiplier
    if exchange:
        c.exchange = exchange
    if primary_exchange:
        c.primaryExch = primary_exchange
    return c


def _fill_order(o: Proto, order: SimOrder) -> None:
    """The order fields openOrder and completedOrder share: the text wire's order head, permId
    outsideRth, OCA group and type, parentId and the trailing-stop fields."""
    o.orderId = order.order_id
    o.action = order.action
    o.totalQuantity = _decimal(order.total_quantity)
    o.orderType = order.order_type
    o.lmtPrice = order.lmt_price if order.lmt_price is not None else 0.0
    o.auxPrice = order.aux_price if order.aux_price is not None else 0.0
    o.tif = order.tif
    o.account = order.account
    o.origin = 0
    if order.order_ref:
        o.orderRef = order.order_ref
    o.permId = order.perm_id
    o.outsideRth = order.outside_rth
    if order.oca_group:
        o.ocaGroup = order.oca_group
    o.ocaType = order.oca_type
    o.parentId = order.parent_id
    if order.trail_stop_price is not None:
        o.trailStopPrice = order.trail_stop_price
    if order.trailing_percent is not None:
        o.trailingPercent = order.trailing_percent
    if order.lmt_price_offset is not None:
        o.lmtPriceOffset = order.lmt_price_offset


def _decimal(value: float) -> str:
    """A quantity as TWS writes a Decimal: `100`, `0.5`."""
    return format_field(float(value))


# ---------------------------------------------------------------------------------------------
# Client -> server


def decode_request(msg_id: int, body: bytes) -> list[str] | codec.PlacedOrder:
    """One protobuf request -> the same request as text fields at server version 178 (message id
    first), or the decoded placeOrder. Raises ProtoDecodeError for a body that does not parse or
    an id the gateway does not read."""
    entry = _REQUESTS.get(msg_id)
    if entry is None:
        raise ProtoDecodeError(f"protobuf request {msg_id} is not read by the simulator")
    cls, convert = entry
    msg = cls()
    try:
        msg.ParseFromString(body)
    except Exception as exc:  # protobuf's DecodeError; its module has no type stubs
        raise ProtoDecodeError(f"protobuf request {msg_id} does not parse: {exc}") from exc
    return convert(msg)


def _s(value: object) -> str:
    return format_field(value)  # type: ignore[arg-type]


def _spec(c: Proto) -> ContractSpec:
    """A request's contract as the gateway matches it."""
    return ContractSpec(
        con_id=c.conId,
        symbol=c.symbol,
        sec_type=c.secType,
        last_trade_date=c.lastTradeDateOrContractMonth,
        strike=c.strike,
        right=c.right,
        multiplier=codec.format_multiplier(c.multiplier) if c.HasField("multiplier") else "",
        exchange=c.exchange,
        primary_exchange=c.primaryExch,
        currency=c.currency,
        local_symbol=c.localSymbol,
        trading_class=c.tradingClass,
    )


def _spec_fields(spec: ContractSpec) -> list[str]:
    """The 12-field contract run of reqMktData / reqContractDetails at 178."""
    return [
        _s(spec.con_id),
        spec.symbol,
        spec.sec_type,
        spec.last_trade_date,
        _s(spec.strike),
        spec.right,
        spec.multiplier,
        spec.exchange,
        spec.primary_exchange,
        spec.currency,
        spec.local_symbol,
        spec.trading_class,
    ]


def _place_order(m: Proto) -> codec.PlacedOrder:
    c, o = m.contract, m.order
    spec = _spec(c)
    features: list[str] = []
    if c.secIdType or c.secId:
        features.append("sec_id")
    if spec.sec_type == "BAG" or len(c.comboLegs):
        features.append("combo")
    if o.deltaNeutralOrderType:
        features.append("delta_neutral")
    if o.HasField("scalePriceIncrement") and o.scalePriceIncrement > 0.0:
        features.append("scale")
    if o.hedgeType:
        features.append("hedge")
    if c.HasField("deltaNeutralContract"):
        features.append("delta_neutral_contract")
    if o.algoStrategy:
        features.append("algo")
    if o.orderType in ("PEG BENCH", "PEGBENCH"):
        features.append("peg_bench")
    if len(o.conditions):
        features.append("conditions")
    if o.HasField("cashQty") and o.cashQty not in (0.0, UNSET_DOUBLE):
        features.append("cash_qty")
    if o.orderType in ("PEG BEST", "PEGBEST"):
        features.append("peg_best")
    elif o.orderType in ("PEG MID", "PEGMID"):
        features.append("peg_mid")
    if m.HasField("attachedOrders") and m.attachedOrders.ListFields():
        features.append("attached_orders")
    try:
        quantity = float(o.totalQuantity) if o.totalQuantity else 0.0
    except ValueError:
        raise ProtoDecodeError(f"placeOrder: {o.totalQuantity!r} is not a quantity") from None
    order = OrderRequest(
        order_id=m.orderId,
        contract=spec,
        action=o.action,
        total_quantity=quantity,
        order_type=o.orderType,
        lmt_price=o.lmtPrice if o.HasField("lmtPrice") else None,
        aux_price=o.auxPrice if o.HasField("auxPrice") else None,
        tif=o.tif,
        account=o.account,
        order_ref=o.orderRef,
        outside_rth=o.outsideRth,
        transmit=o.HasField("transmit") and o.transmit,  # ibapi sends it only when true
        parent_id=o.parentId,
        oca_group=o.ocaGroup,
        oca_type=o.ocaType if o.HasField("ocaType") else 0,
        trailing_percent=_optional(o, "trailingPercent"),
        trail_stop_price=_optional(o, "trailStopPrice"),
        lmt_price_offset=_optional(o, "lmtPriceOffset"),
    )
    return codec.PlacedOrder(
        order=order,
        what_if=o.whatIf,
        oca_group=o.ocaGroup,
        good_after_time=o.goodAfterTime,
        good_till_date=o.goodTillDate,
        hidden=o.hidden,
        features=tuple(features),
    )


def _optional(o: Proto, name: str) -> float | None:
    """A double ibapi sets only when valid (not UNSET_DOUBLE)."""
    if not o.HasField(name):
        return None
    value = float(getattr(o, name))
    return None if value == UNSET_DOUBLE else value


def _cancel_order(m: Proto) -> list[str]:
    return ["4", "1", _s(m.orderId), m.orderCancel.manualOrderCancelTime]


def _executions(m: Proto) -> list[str]:
    f = m.executionFilter
    return [
        "7",
        "3",
        _s(m.reqId),
        _s(f.clientId),
        f.acctCode,
        f.time,
        f.symbol,
        f.secType,
        f.exchange,
        f.side,
    ]


def _mkt_data(m: Proto) -> list[str]:
    spec_fields = _spec_fields(_spec(m.contract))
    legs: list[str] = []
    if m.contract.secType == "BAG":
        legs = [_s(len(m.contract.comboLegs))]
        for leg in m.contract.comboLegs:
            legs += [_s(leg.conId), _s(leg.ratio), leg.action, leg.exchange]
    return [
        "1",
        "11",
        _s(m.reqId),
        *spec_fields,
        *legs,
        "0",  # no delta-neutral contract
        m.genericTickList,
        _s(m.snapshot),
        _s(m.regulatorySnapshot),
        "",
    ]


def _contract_data(m: Proto) -> list[str]:
    c = m.contract
    return [
        "9",
        "8",
        _s(m.reqId),
        *_spec_fields(_spec(c)),
        _s(c.includeExpired),
        c.secIdType,
        c.secId,
        c.issuerId,
    ]


_REQUESTS: dict[int, tuple[Callable[[], Proto], Callable[[Proto], list[str] | codec.PlacedOrder]]]
_REQUESTS = {
    # text layouts at 178: (message id, version, ...) as EClient writes them
    1: (MarketDataRequest, _mkt_data),
    2: (CancelMarketData, lambda m: ["2", "2", _s(m.reqId)]),
    3: (PlaceOrderRequest, _place_order),
    4: (CancelOrderRequest, _cancel_order),
    5: (OpenOrdersRequest, lambda m: ["5", "1"]),
    6: (AccountDataRequest, lambda m: ["6", "2", _s(m.subscribe), m.acctCode]),
    7: (ExecutionRequest, _executions),
    8: (IdsRequest, lambda m: ["8", "1", _s(m.numIds)]),
    9: (ContractDataRequest, _contract_data),
    15: (AutoOpenOrdersRequest, lambda m: ["15", "1", _s(m.autoBind)]),
    16: (AllOpenOrdersRequest, lambda m: ["16", "1"]),
    17: (ManagedAccountsRequest, lambda m: ["17", "1"]),
    49: (CurrentTimeRequest, lambda m: ["49", "1"]),
    58: (GlobalCancelRequest, lambda m: ["58", "1"]),
    59: (MarketDataTypeRequest, lambda m: ["59", "1", _s(m.marketDataType)]),
    61: (PositionsRequest, lambda m: ["61", "1"]),
    62: (AccountSummaryRequest, lambda m: ["62", "1", _s(m.reqId), m.group, m.tags]),
    63: (CancelAccountSummary, lambda m: ["63", "1", _s(m.reqId)]),
    64: (CancelPositions, lambda m: ["64", "1"]),
    71: (StartApiRequest, lambda m: ["71", "2", _s(m.clientId), m.optionalCapabilities]),
    76: (
        AccountUpdatesMultiRequest,
        lambda m: ["76", "1", _s(m.reqId), m.account, m.modelCode, _s(m.ledgerAndNLV)],
    ),
    77: (CancelAccountUpdatesMulti, lambda m: ["77", "1", _s(m.reqId)]),
    92: (PnLRequest, lambda m: ["92", _s(m.reqId), m.account, m.modelCode]),
    93: (CancelPnL, lambda m: ["93", _s(m.reqId)]),
    94: (
        PnLSingleRequest,
        lambda m: ["94", _s(m.reqId), m.account, m.modelCode, _s(m.conId)],
    ),
    95: (CancelPnLSingle, lambda m: ["95", _s(m.reqId)]),
    99: (CompletedOrdersRequest, lambda m: ["99", _s(m.apiOnly)]),
}
