"""The simulated gateway's messages at every wire it speaks, proven against ibapi's own EDecoder
and EClient: at 178 (text), between 179 and 200 (text with the fields each version adds), and at
203, 215 and 226 (4-byte ids, protobuf where `messages.PROTOBUF_FROM` says). Every message is
decoded with no text field left unread and every protobuf field read; every request ibapi writes
at a version is read back by the gateway as the same request."""

from __future__ import annotations

from collections.abc import Callable
from decimal import Decimal
from typing import Any

import pytest
from ibapi.client import EClient
from ibapi.common import getServerVersionForMessage
from ibapi.const import UNSET_DECIMAL, UNSET_INTEGER, UNSET_LONG
from ibapi.contract import Contract
from ibapi.execution import ExecutionFilter
from ibapi.message import OUT
from ibapi.order import Order
from ibapi.order_cancel import OrderCancel
from ibapi.tag_value import TagValue

from ibsim import codec, messages
from ibsim.messages import PROTOBUF_FROM, Outgoing
from ibsim.types import ContractSpec, Fill, Instrument, PositionView, SimOrder
from ibsim.wire import UNSET_DOUBLE
from tests.sim_codec_clients import Call, ibapi_deliver_at, ibapi_reads_at

# The four the issue names (TWS 10.37 answers 203, 10.40 215, 10.50 226), and text versions
# where layouts gain fields: 183 customer account, 190 RFQ undone, 194 error time, 195 order
# preview, 198 submitter, 199 imbalance only, 200 execution days; 201 the first binary-id wire.
VERSIONS = [
    178,
    183,
    186,
    188,
    190,
    192,
    194,
    195,
    198,
    199,
    200,
    201,
    203,
    204,
    207,
    211,
    215,
    226,
]
WIRES = [178, 203, 215, 226]

AAPL = Instrument(
    con_id=265598,
    symbol="AAPL",
    sec_type="STK",
    exchange="SMART",
    primary_exchange="NASDAQ",
    currency="USD",
)
ES = Instrument(
    con_id=495512563,
    symbol="ES",
    sec_type="FUT",
    exchange="CME",
    primary_exchange="CME",
    currency="USD",
    multiplier=50.0,
    last_trade_date="20261218",
    local_symbol="ESZ6",
    trading_class="ES",
)
ORDER = SimOrder(
    perm_id=1_234_567_890,
    order_id=5,
    client_id=3,
    account="DU111",
    instrument=ES,
    action="SELL",
    total_quantity=4.0,
    order_type="LMT",
    lmt_price=6001.25,
    tif="GTC",
    order_ref="guardd:flatten:7",
    outside_rth=True,
    status="Submitted",
    filled=1.0,
    avg_fill_price=6001.5,
    last_fill_price=6001.5,
)
FILL = Fill(
    exec_id="0000e0d5.6789.01.01",
    perm_id=1_234_567_890,
    order_id=5,
    client_id=3,
    account="DU111",
    instrument=ES,
    side="SLD",
    shares=2.0,
    price=5012.25,
    time=1_782_400_000.0,
    cum_qty=2.0,
    avg_price=5012.25,
    order_ref="guardd:flatten:7",
    commission=4.5,
    realized_pnl=125.0,
)
POSITION = PositionView("DU111", ES, -2.0, 250_612.5, 5010.0, -501_000.0, 1225.0, 0.0)
CALL = Instrument(
    con_id=900001,
    symbol="AAPL",
    sec_type="OPT",
    exchange="SMART",
    primary_exchange="",
    currency="USD",
    multiplier=100.0,
    last_trade_date="20261218",
    local_symbol="AAPL  261218C00190000",
    trading_class="AAPL",
    right="C",
    strike=190.0,
    underlying_con_id=265598,
    implied_vol=0.3,
)

Check = Callable[[tuple[Any, ...]], None]


def _one(calls: list[Call], name: str) -> tuple[Any, ...]:
    matching = [args for n, args in calls if n == name]
    assert len(matching) == 1, calls
    return matching[0]


def _check_es(contract: Any) -> None:
    assert (contract.conId, contract.symbol, contract.secType) == (495512563, "ES", "FUT")
    assert (contract.multiplier, contract.localSymbol, contract.currency) == ("50", "ESZ6", "USD")
    assert contract.lastTradeDateOrContractMonth == "20261218"


def _open_order(args: tuple[Any, ...]) -> None:
    order_id, contract, order, state = args
    _check_es(contract)
    assert (order_id, order.permId, order.clientId, order.orderRef) == (
        5,
        1_234_567_890,
        3,
        "guardd:flatten:7",
    )
    assert (order.action, order.totalQuantity, order.orderType, order.lmtPrice) == (
        "SELL",
        Decimal("4"),
        "LMT",
        6001.25,
    )
    assert (order.tif, order.account, order.outsideRth, state.status) == (
        "GTC",
        "DU111",
        True,
        "Submitted",
    )


def _completed_order(args: tuple[Any, ...]) -> None:
    contract, order, state = args
    _check_es(contract)
    assert (order.permId, order.filledQuantity, order.orderRef) == (
        1_234_567_890,
        Decimal("1"),
        "guardd:flatten:7",
    )
    assert (state.completedStatus, state.completedTime) == ("Cancelled", "20260625 10:01:02 EST")


def _exec_details(args: tuple[Any, ...]) -> None:
    req_id, contract, e = args
    _check_es(contract)
    assert (req_id, e.orderId, e.execId, e.acctNumber, e.side) == (
        -1,
        5,
        "0000e0d5.6789.01.01",
        "DU111",
        "SLD",
    )
    assert (e.shares, e.price, e.permId, e.clientId, e.cumQty, e.avgPrice) == (
        Decimal("2"),
        5012.25,
        1_234_567_890,
        3,
        Decimal("2"),
        5012.25,
    )
    assert e.orderRef == "guardd:flatten:7"
    assert e.time == codec.format_tws_time(FILL.time)


def _contract_details(args: tuple[Any, ...]) -> None:
    req_id, details = args
    _check_es(details.contract)
    assert (req_id, details.minTick, details.contract.exchange) == (4, 0.01, "CME")
    assert (details.contract.primaryExchange, details.timeZoneId) == ("CME", "US/Eastern")


def _position(args: tuple[Any, ...]) -> None:
    account, contract, quantity, avg_cost = args
    _check_es(contract)
    assert (account, contract.exchange, quantity, avg_cost) == (
        "DU111",
        "CME",
        Decimal("-2"),
        250_612.5,
    )


def _portfolio(args: tuple[Any, ...]) -> None:
    contract, *values = args
    _check_es(contract)
    assert contract.primaryExchange == "CME"
    assert values == [Decimal("-2"), 5010.0, -501_000.0, 250_612.5, 1225.0, 0.0, "DU111"]


def _option_position(args: tuple[Any, ...]) -> None:
    account, contract, quantity, avg_cost = args
    assert (contract.conId, contract.secType, contract.lastTradeDateOrContractMonth) == (
        900001,
        "OPT",
        "20261218",
    )
    assert (contract.strike, contract.right, contract.multiplier) == (190.0, "C", "100")
    assert (contract.localSymbol, contract.tradingClass) == ("AAPL  261218C00190000", "AAPL")
    assert (account, quantity, avg_cost) == ("DU111", Decimal("-3"), 1450.0)


def _option_details(args: tuple[Any, ...]) -> None:
    _req_id, details = args
    assert (details.contract.strike, details.contract.right) == (190.0, "C")
    assert (details.underConId, details.contract.multiplier) == (265598, "100")


def _equals(*expected: Any) -> Check:
    def check(args: tuple[Any, ...]) -> None:
        assert args == expected

    return check


def _error(args: tuple[Any, ...]) -> None:
    req_id, _time, code, text, advanced = args
    assert (req_id, code, text, advanced) == (7, 201, "Order rejected: Preis über Limit \\ 5%", "")


def _commission(args: tuple[Any, ...]) -> None:
    (report,) = args
    assert (report.execId, report.commissionAndFees, report.currency, report.realizedPNL) == (
        FILL.exec_id,
        4.5,
        "USD",
        125.0,
    )


def _tick_price(calls: list[Call]) -> None:
    calls = [(name, args) for name, args in calls if not name.endswith("ProtoBuf")]
    assert [name for name, _ in calls] == ["tickPrice", "tickSize"]
    assert calls[0][1][:3] == (12, 4, 6001.25)
    assert calls[1][1] == (12, 5, Decimal("3"))


# (message, EWrapper callback, check of its arguments)
MESSAGES: list[tuple[str, Outgoing, str, Check]] = [
    ("nextValidId", messages.next_valid_id(42), "nextValidId", _equals(42)),
    (
        "managedAccounts",
        messages.managed_accounts(["DU111", "DU2"]),
        "managedAccounts",
        _equals("DU111,DU2"),
    ),
    ("currentTime", messages.current_time(1_782_400_000), "currentTime", _equals(1_782_400_000)),
    (
        "error",
        messages.error(7, 201, "Order rejected: Preis über Limit \\ 5%", time_ms=1_782_400_000_123),
        "error",
        _error,
    ),
    ("position", messages.position(POSITION), "position", _position),
    ("positionEnd", messages.position_end(), "positionEnd", _equals()),
    (
        "accountSummary",
        messages.account_summary(8, "DU111", "ExcessLiquidity", "250000.5", "USD"),
        "accountSummary",
        _equals(8, "DU111", "ExcessLiquidity", "250000.5", "USD"),
    ),
    ("accountSummaryEnd", messages.account_summary_end(8), "accountSummaryEnd", _equals(8)),
    (
        "updateAccountValue",
        messages.account_value("NetLiquidation", "1000000.00", "USD", "DU111"),
        "updateAccountValue",
        _equals("NetLiquidation", "1000000.00", "USD", "DU111"),
    ),
    ("updatePortfolio", messages.portfolio(POSITION), "updatePortfolio", _portfolio),
    ("updateAccountTime", messages.account_time("09:31"), "updateAccountTime", _equals("09:31")),
    (
        "accountDownloadEnd",
        messages.account_download_end("DU111"),
        "accountDownloadEnd",
        _equals("DU111"),
    ),
    (
        "accountUpdateMulti",
        messages.account_update_multi(8, "DU111", "", "ExchangeRate", "1.0842", "EUR"),
        "accountUpdateMulti",
        _equals(8, "DU111", "", "ExchangeRate", "1.0842", "EUR"),
    ),
    (
        "accountUpdateMultiEnd",
        messages.account_update_multi_end(8),
        "accountUpdateMultiEnd",
        _equals(8),
    ),
    ("pnl", messages.pnl(3, -1520.5, -1200.0, -320.5), "pnl", _equals(3, -1520.5, -1200.0, -320.5)),
    (
        "pnlSingle",
        messages.pnl_single(4, -2.0, 310.0, 250.0, 60.0, -501_225.0),
        "pnlSingle",
        _equals(4, Decimal("-2"), 310.0, 250.0, 60.0, -501_225.0),
    ),
    ("openOrder", messages.open_order(ORDER), "openOrder", _open_order),
    (
        "orderStatus",
        messages.order_status(ORDER),
        "orderStatus",
        _equals(
            5, "Submitted", Decimal("1"), Decimal("3"), 6001.5, 1_234_567_890, 0, 6001.5, 3, "", 0.0
        ),
    ),
    ("openOrderEnd", messages.open_order_end(), "openOrderEnd", _equals()),
    (
        "completedOrder",
        messages.completed_order(ORDER, "20260625 10:01:02 EST", "Cancelled"),
        "completedOrder",
        _completed_order,
    ),
    ("completedOrdersEnd", messages.completed_orders_end(), "completedOrdersEnd", _equals()),
    (
        "orderBound",
        messages.order_bound(1_234_567_890, 0, 17),
        "orderBound",
        _equals(1_234_567_890, 0, 17),
    ),
    ("execDetails", messages.exec_details(-1, FILL), "execDetails", _exec_details),
    ("execDetailsEnd", messages.exec_details_end(9), "execDetailsEnd", _equals(9)),
    ("commissionReport", messages.commission_report(FILL), "commissionAndFeesReport", _commission),
    ("tickSize", messages.tick_size(12, 0, 300.0), "tickSize", _equals(12, 0, Decimal("300"))),
    (
        "tickOptionComputation",
        messages.tick_option_computation(12, 13, 0.3, 0.62, 14.5, 0.02, 0.21, -0.08, 200.0),
        "tickOptionComputation",
        _equals(12, 13, 1, 0.3, 0.62, 14.5, 0.0, 0.02, 0.21, -0.08, 200.0),
    ),
    (
        "tickOptionComputation without an implied volatility",
        messages.tick_option_computation(12, 10, None, 0.99, 10.01, 0.0, 0.0, 0.0, 200.0),
        "tickOptionComputation",
        _equals(12, 10, 1, None, 0.99, 10.01, 0.0, 0.0, 0.0, 0.0, 200.0),
    ),
    (
        "position of an option",
        messages.position(PositionView("DU111", CALL, -3.0, 1450.0, 14.0, -4200.0, 150.0, 0.0)),
        "position",
        _option_position,
    ),
    (
        "contractDetails of an option",
        messages.contract_details(4, CALL),
        "contractDetails",
        _option_details,
    ),
    ("tickSnapshotEnd", messages.tick_snapshot_end(12), "tickSnapshotEnd", _equals(12)),
    ("marketDataType", messages.market_data_type(-1, 3), "marketDataType", _equals(-1, 3)),
    (
        "tickReqParams",
        messages.tick_req_params(12, 0.01, "9c0001", 3),
        "tickReqParams",
        _equals(12, 0.01, "9c0001", 3),
    ),
    ("contractDetails", messages.contract_details(4, ES), "contractDetails", _contract_details),
    ("contractDetailsEnd", messages.contract_details_end(4), "contractDetailsEnd", _equals(4)),
]


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize(
    ("outgoing", "callback", "check"),
    [pytest.param(m, c, k, id=name) for name, m, c, k in MESSAGES],
)
def test_message_at_any_version_then_ibapi_decodes_every_field(
    outgoing: Outgoing, callback: str, check: Check, version: int
) -> None:
    calls = ibapi_deliver_at(outgoing, version)

    check(_one(calls, callback))


@pytest.mark.parametrize("version", VERSIONS)
def test_last_price_tick_at_any_version_then_ibapi_adds_the_size_tick(version: int) -> None:
    calls = ibapi_deliver_at(messages.tick_price(12, 4, 6001.25, 3.0), version)

    _tick_price(calls)


def test_opening_fill_on_protobuf_then_realized_pnl_stays_unset() -> None:
    unset = messages.commission_report(
        Fill(
            exec_id="e1",
            perm_id=1,
            order_id=1,
            client_id=1,
            account="DU111",
            instrument=AAPL,
            side="BOT",
            shares=1.0,
            price=1.0,
            time=1_782_400_000.0,
            cum_qty=1.0,
            avg_price=1.0,
            order_ref="",
            commission=1.0,
            realized_pnl=UNSET_DOUBLE,
        )
    )

    for version in WIRES:
        (report,) = _one(ibapi_deliver_at(unset, version), "commissionAndFeesReport")
        assert report.realizedPNL == UNSET_DOUBLE


def test_every_message_the_guard_uses_has_a_protobuf_form_from_226() -> None:
    assert {m.msg_id for _, m, _, _ in MESSAGES} | {codec.TICK_PRICE} == set(PROTOBUF_FROM)
    assert all(m.is_protobuf(226) and not m.is_protobuf(200) for _, m, _, _ in MESSAGES)


@pytest.mark.parametrize("version", WIRES)
def test_omitted_quantities_then_ibapi_sees_unset_decimal(version: int) -> None:
    omit = {"position"}

    position = _one(ibapi_deliver_at(messages.position(POSITION, omit), version), "position")
    portfolio = _one(
        ibapi_deliver_at(messages.portfolio(POSITION, omit), version), "updatePortfolio"
    )
    single = _one(
        ibapi_deliver_at(messages.pnl_single(4, -2.0, 1.0, 2.0, 3.0, 4.0, omit), version),
        "pnlSingle",
    )

    assert position[2] == portfolio[1] == single[1] == UNSET_DECIMAL


# ---------------------------------------------------------------------------------------------
# Client -> server: what ibapi writes at each version, read by the gateway


def _stock() -> Contract:
    contract = Contract()
    contract.symbol, contract.secType, contract.exchange = "AAPL", "STK", "SMART"
    contract.currency, contract.primaryExchange, contract.conId = "USD", "NASDAQ", 265598
    return contract


def _limit() -> Order:
    order = Order()
    order.action, order.orderType = "SELL", "LMT"
    order.totalQuantity, order.lmtPrice = Decimal("100"), 187.5
    order.account, order.orderRef, order.tif = "DU111", "guardd:flatten:7", "GTC"
    order.outsideRth = True
    return order


def _is_protobuf(request_id: int, version: int) -> bool:
    return getServerVersionForMessage(request_id) <= version


@pytest.mark.parametrize("version", VERSIONS)
def test_plain_limit_order_at_any_version_then_gateway_reads_the_same_order(version: int) -> None:
    (request,) = ibapi_reads_at(lambda c: c.placeOrder(11, _stock(), _limit()), version)

    placed = request.placed or codec.decode_place_order_in_full(request.fields, request.version)
    order = placed.order
    assert request.msg_id == OUT.PLACE_ORDER
    assert (order.order_id, order.action, order.total_quantity, order.order_type) == (
        11,
        "SELL",
        100.0,
        "LMT",
    )
    assert (order.lmt_price, order.aux_price, order.tif, order.account) == (
        187.5,
        None,
        "GTC",
        "DU111",
    )
    assert (order.order_ref, order.outside_rth, order.transmit, order.parent_id) == (
        "guardd:flatten:7",
        True,
        True,
        0,
    )
    assert (order.contract.con_id, order.contract.symbol, order.contract.primary_exchange) == (
        265598,
        "AAPL",
        "NASDAQ",
    )
    assert (placed.what_if, placed.features) == (False, ())
    assert (request.placed is not None) == _is_protobuf(OUT.PLACE_ORDER, version)


@pytest.mark.parametrize("version", VERSIONS)
def test_what_if_algo_order_at_any_version_then_gateway_names_what_it_will_not_simulate(
    version: int,
) -> None:
    order = _limit()
    order.whatIf = True
    order.algoStrategy = "Adaptive"
    order.algoParams = [TagValue("adaptivePriority", "Normal")]
    order.transmit = False

    (request,) = ibapi_reads_at(lambda c: c.placeOrder(13, _stock(), order), version)

    placed = request.placed or codec.decode_place_order_in_full(request.fields, request.version)
    assert placed.what_if is True
    assert placed.features == ("algo",)
    assert placed.order.transmit is False


@pytest.mark.parametrize("version", VERSIONS)
def test_small_requests_at_any_version_then_gateway_reads_the_same_values(version: int) -> None:
    execution_filter = ExecutionFilter()
    execution_filter.clientId, execution_filter.acctCode, execution_filter.symbol = 3, "DU111", "ES"

    def send(client: EClient) -> None:
        client.cancelOrder(21, OrderCancel())
        client.reqMktData(22, _stock(), "233,236", False, False, [])
        client.reqContractDetails(23, _stock())
        client.reqExecutions(24, execution_filter)
        client.reqGlobalCancel(OrderCancel())

    cancel, mkt_data, details, executions, global_cancel = ibapi_reads_at(send, version)

    assert codec.decode_cancel_order(cancel.fields, cancel.version) == 21
    wanted = codec.decode_mkt_data_request(mkt_data.fields)
    assert (wanted.req_id, wanted.contract.con_id, wanted.generic_ticks, wanted.snapshot) == (
        22,
        265598,
        "233,236",
        False,
    )
    assert codec.decode_contract_details_request(details.fields) == (
        23,
        ContractSpec(
            con_id=265598,
            symbol="AAPL",
            sec_type="STK",
            exchange="SMART",
            primary_exchange="NASDAQ",
            currency="USD",
        ),
    )
    assert codec.decode_executions_request(
        executions.fields, executions.version
    ) == codec.ExecutionsRequest(24, 3, "DU111", "", "ES", "", "", "")
    assert global_cancel.msg_id == OUT.REQ_GLOBAL_CANCEL


@pytest.mark.parametrize("version", VERSIONS)
def test_session_requests_at_any_version_then_gateway_reads_the_178_fields(version: int) -> None:
    def send(client: EClient) -> None:
        client.clientId, client.optCapab = 7, ""
        client.startApi()
        client.reqIds(1)
        client.reqCurrentTime()
        client.reqPositions()
        client.cancelPositions()
        client.reqAccountSummary(9, "All", "NetLiquidation,Cushion")
        client.cancelAccountSummary(9)
        client.reqAccountUpdates(True, "DU111")
        client.reqAccountUpdatesMulti(10, "DU111", "", False)
        client.cancelAccountUpdatesMulti(10)
        client.reqPnL(11, "DU111", "")
        client.cancelPnL(11)
        client.reqPnLSingle(12, "DU111", "", 265598)
        client.cancelPnLSingle(12)
        client.cancelMktData(22)
        client.reqMarketDataType(3)
        client.reqOpenOrders()
        client.reqAllOpenOrders()
        client.reqAutoOpenOrders(True)
        client.reqCompletedOrders(False)

    got = [(r.msg_id, r.fields[1:]) for r in ibapi_reads_at(send, version)]

    # The fields each handler reads (after the message id) mean the same at every version.
    assert [(msg_id, fields[:4]) for msg_id, fields in got] == [
        (71, ["2", "7", ""]),
        (8, ["1", "1"]),
        (49, ["1"]),
        (61, ["1"]),
        (64, ["1"]),
        (62, ["1", "9", "All", "NetLiquidation,Cushion"]),
        (63, ["1", "9"]),
        (6, ["2", "1", "DU111"]),
        (76, ["1", "10", "DU111", ""]),
        (77, ["1", "10"]),
        (92, ["11", "DU111", ""]),
        (93, ["11"]),
        (94, ["12", "DU111", "", "265598"]),
        (95, ["12"]),
        (2, ["2", "22"]),
        (59, ["1", "3"]),
        (5, ["1"]),
        (16, ["1"]),
        (15, ["1", "1"]),
        (99, ["0"]),
    ]


@pytest.mark.parametrize("version", [203, 226])  # orderStatus is protobuf from 203
def test_omitted_order_status_fields_then_ibapi_sees_unset_values(version: int) -> None:
    omit = {"order_id", "client_id", "perm_id", "filled", "remaining"}

    args = _one(ibapi_deliver_at(messages.order_status(ORDER, omit), version), "orderStatus")
    single = _one(
        ibapi_deliver_at(messages.pnl_single(4, -2.0, 1.0, 2.0, 3.0, 4.0, {"value"}), version),
        "pnlSingle",
    )

    order_id, _, filled, remaining, _, perm_id, _, _, client_id, *_ = args
    assert (order_id, client_id, perm_id) == (UNSET_INTEGER, UNSET_INTEGER, UNSET_LONG)
    assert filled == remaining == UNSET_DECIMAL
    assert single[5] == UNSET_DOUBLE
