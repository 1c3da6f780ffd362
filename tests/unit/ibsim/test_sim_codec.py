"""The simulated gateway's codec, proven against the real clients at server version 178: our frames
go through ibapi's and ib_async's own decoders, and their own clients write what we decode."""

from __future__ import annotations

import math
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from ib_async.contract import ComboLeg as AsyncComboLeg
from ib_async.contract import Contract as AsyncContract
from ib_async.objects import ExecutionFilter as AsyncExecutionFilter
from ib_async.order import LimitOrder as AsyncLimitOrder
from ibapi.client import EClient
from ibapi.contract import ComboLeg, Contract
from ibapi.execution import ExecutionFilter
from ibapi.order import Order
from ibapi.order_cancel import OrderCancel
from ibapi.order_condition import Create, OrderCondition
from ibapi.tag_value import TagValue

from ibsim import codec
from ibsim.types import ContractSpec, Fill, Instrument, PositionView, SimOrder
from ibsim.wire import UNSET_DOUBLE
from tests.sim_codec_clients import (
    Call,
    ib_async_deliver,
    ib_async_sent,
    ibapi_deliver,
    ibapi_sent,
)

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


def _order(**overrides: Any) -> SimOrder:
    values: dict[str, Any] = {
        "perm_id": 1_234_567_890,
        "order_id": 5,
        "client_id": 3,
        "account": "DU111",
        "instrument": AAPL,
        "action": "BUY",
        "total_quantity": 100.0,
        "order_type": "LMT",
        "lmt_price": 187.5,
        "tif": "DAY",
        "order_ref": "bot:alpha",
        "outside_rth": False,
        "status": "Submitted",
    }
    values.update(overrides)
    return SimOrder(**values)


def _fill(**overrides: Any) -> Fill:
    values: dict[str, Any] = {
        "exec_id": "0000e0d5.6789.01.01",
        "perm_id": 1_234_567_890,
        "order_id": 5,
        "client_id": 3,
        "account": "DU111",
        "instrument": ES,
        "side": "SLD",
        "shares": 2.0,
        "price": 5012.25,
        "time": 1_782_400_000.0,
        "cum_qty": 2.0,
        "avg_price": 5012.25,
        "order_ref": "guardd:flatten:7",
        "commission": 4.5,
        "realized_pnl": 125.0,
    }
    values.update(overrides)
    return Fill(**values)


def _one(calls: list[Call], name: str) -> tuple[Any, ...]:
    matching = [args for n, args in calls if n == name]
    assert len(matching) == 1, calls
    return matching[0]


# ---------------------------------------------------------------------------------------------
# Server -> client, through ibapi's Decoder and ib_async's Decoder


SIMPLE_MESSAGES: list[tuple[list[Any], Call, Call]] = [
    (codec.next_valid_id_fields(42), ("nextValidId", (42,)), ("nextValidId", (42,))),
    (
        codec.managed_accounts_fields(["DU111", "DU222"]),
        ("managedAccounts", ("DU111,DU222",)),
        ("managedAccounts", ("DU111,DU222",)),
    ),
    (
        codec.current_time_fields(1_782_400_000),
        ("currentTime", (1_782_400_000,)),
        ("currentTime", (1_782_400_000,)),
    ),
    (codec.position_end_fields(), ("positionEnd", ()), ("positionEnd", ())),
    (codec.open_order_end_fields(), ("openOrderEnd", ()), ("openOrderEnd", ())),
    (codec.completed_orders_end_fields(), ("completedOrdersEnd", ()), ("completedOrdersEnd", ())),
    (codec.exec_details_end_fields(9), ("execDetailsEnd", (9,)), ("execDetailsEnd", (9,))),
    (
        codec.contract_details_end_fields(4),
        ("contractDetailsEnd", (4,)),
        ("contractDetailsEnd", (4,)),
    ),
    (
        codec.account_summary_end_fields(8),
        ("accountSummaryEnd", (8,)),
        ("accountSummaryEnd", (8,)),
    ),
    (
        codec.account_update_multi_end_fields(8),
        ("accountUpdateMultiEnd", (8,)),
        ("accountUpdateMultiEnd", (8,)),
    ),
    (
        codec.account_download_end_fields("DU111"),
        ("accountDownloadEnd", ("DU111",)),
        ("accountDownloadEnd", ("DU111",)),
    ),
    (
        codec.account_time_fields("09:31"),
        ("updateAccountTime", ("09:31",)),
        ("updateAccountTime", ("09:31",)),
    ),
    (
        codec.account_value_fields("NetLiquidation", "1000000.00", "USD", "DU111"),
        ("updateAccountValue", ("NetLiquidation", "1000000.00", "USD", "DU111")),
        ("updateAccountValue", ("NetLiquidation", "1000000.00", "USD", "DU111")),
    ),
    (
        codec.account_summary_fields(8, "DU111", "ExcessLiquidity", "250000.5", "USD"),
        ("accountSummary", (8, "DU111", "ExcessLiquidity", "250000.5", "USD")),
        ("accountSummary", (8, "DU111", "ExcessLiquidity", "250000.5", "USD")),
    ),
    (
        codec.account_update_multi_fields(8, "DU111", "", "ExchangeRate", "1.0842", "EUR"),
        ("accountUpdateMulti", (8, "DU111", "", "ExchangeRate", "1.0842", "EUR")),
        ("accountUpdateMulti", (8, "DU111", "", "ExchangeRate", "1.0842", "EUR")),
    ),
    (
        codec.pnl_fields(3, -1520.5, -1200.0, -320.5),
        ("pnl", (3, -1520.5, -1200.0, -320.5)),
        ("pnl", (3, -1520.5, -1200.0, -320.5)),
    ),
    (
        codec.pnl_single_fields(4, -2.0, 310.0, 250.0, 60.0, -501_225.0),
        ("pnlSingle", (4, Decimal("-2"), 310.0, 250.0, 60.0, -501_225.0)),
        ("pnlSingle", (4, -2.0, 310.0, 250.0, 60.0, -501_225.0)),
    ),
    (
        codec.market_data_type_fields(-1, 3),
        ("marketDataType", (-1, 3)),
        ("marketDataType", (-1, 3)),
    ),
    (
        codec.tick_snapshot_end_fields(12),
        ("tickSnapshotEnd", (12,)),
        ("tickSnapshotEnd", (12,)),
    ),
    (
        codec.tick_req_params_fields(12, 0.01, "9c0001", 3),
        ("tickReqParams", (12, 0.01, "9c0001", 3)),
        ("tickReqParams", (12, 0.01, "9c0001", 3)),
    ),
    (
        codec.order_bound_fields(1_234_567_890, 0, 17),
        ("orderBound", (1_234_567_890, 0, 17)),
        ("orderBound", (1_234_567_890, 0, 17)),
    ),
    (
        codec.tick_size_fields(12, 0, 300.0),
        ("tickSize", (12, 0, Decimal("300"))),
        ("tickSize", (12, 0, 300.0)),
    ),
]


@pytest.mark.parametrize(("fields", "ibapi_call", "ib_async_call"), SIMPLE_MESSAGES)
def test_simple_message_then_both_clients_call_back_with_its_values(
    fields: list[Any], ibapi_call: Call, ib_async_call: Call
) -> None:
    assert ibapi_deliver(fields) == [ibapi_call]
    assert ib_async_deliver(fields) == [ib_async_call]


def test_farm_notice_then_both_clients_get_code_text_and_empty_reject_json() -> None:
    fields = codec.error_fields(-1, 2104, "Market data farm connection is OK:usfarm")

    ibapi_args = _one(ibapi_deliver(fields), "error")
    ib_async_args = _one(ib_async_deliver(fields), "error")

    assert (ibapi_args[0], ibapi_args[2:]) == (
        -1,
        (2104, "Market data farm connection is OK:usfarm", ""),
    )
    assert ib_async_args == (-1, 2104, "Market data farm connection is OK:usfarm", "")


def test_error_text_with_non_ascii_and_backslash_then_ibapi_reads_it_back_unchanged() -> None:
    text = "Order rejected: Preis über Limit \\ 5%"
    fields = codec.error_fields(7, 201, text, '{"code":"X"}')

    args = _one(ibapi_deliver(fields), "error")

    assert args[2:] == (201, text, '{"code":"X"}')


def test_position_then_both_clients_see_contract_quantity_and_cost() -> None:
    view = PositionView("DU111", ES, -2.0, 250_612.5, 5010.0, -501_000.0, 1225.0, 0.0)
    fields = codec.position_fields(view)

    account, contract, position, avg_cost = _one(ibapi_deliver(fields), "position")
    a_account, a_contract, a_position, a_avg_cost = _one(ib_async_deliver(fields), "position")

    assert (account, contract.conId, contract.secType, contract.multiplier) == (
        "DU111",
        495512563,
        "FUT",
        "50",
    )
    assert (contract.exchange, contract.localSymbol, position, avg_cost) == (
        "CME",
        "ESZ6",
        Decimal("-2"),
        250_612.5,
    )
    assert (a_account, a_contract.conId, a_contract.lastTradeDateOrContractMonth) == (
        "DU111",
        495512563,
        "20261218",
    )
    assert (a_position, a_avg_cost) == (-2.0, 250_612.5)


def test_portfolio_update_then_both_clients_see_price_value_and_pnl() -> None:
    view = PositionView("DU111", AAPL, 300.0, 180.25, 187.5, 56_250.0, 2175.0, -40.0)
    fields = codec.portfolio_fields(view)

    ibapi_args = _one(ibapi_deliver(fields), "updatePortfolio")
    ib_async_args = _one(ib_async_deliver(fields), "updatePortfolio")

    assert ibapi_args[0].primaryExchange == "NASDAQ"
    assert ibapi_args[1:] == (Decimal("300"), 187.5, 56_250.0, 180.25, 2175.0, -40.0, "DU111")
    assert ib_async_args[0].conId == 265598
    assert ib_async_args[1:] == (300.0, 187.5, 56_250.0, 180.25, 2175.0, -40.0, "DU111")


@settings(max_examples=40, deadline=None)
@given(
    order_id=st.integers(0, 2**31 - 2),
    perm_id=st.integers(1, 2**31 - 2),
    client_id=st.integers(0, 999),
    quantity=st.floats(1, 1e6, allow_nan=False).map(lambda q: round(q, 2)),
    lmt=st.one_of(st.none(), st.floats(0.01, 1e5).map(lambda p: round(p, 2))),
    ref=st.text(st.characters(min_codepoint=33, max_codepoint=126), max_size=30),
    status=st.sampled_from(["PreSubmitted", "Submitted", "Filled", "Cancelled"]),
    outside_rth=st.booleans(),
    instrument=st.sampled_from([AAPL, ES]),
)
def test_any_open_order_then_both_clients_read_its_identity_and_terms(
    order_id: int,
    perm_id: int,
    client_id: int,
    quantity: float,
    lmt: float | None,
    ref: str,
    status: str,
    outside_rth: bool,
    instrument: Instrument,
) -> None:
    order = _order(
        order_id=order_id,
        perm_id=perm_id,
        client_id=client_id,
        total_quantity=quantity,
        order_type="MKT" if lmt is None else "LMT",
        lmt_price=lmt,
        order_ref=ref,
        status=status,
        outside_rth=outside_rth,
        instrument=instrument,
    )
    fields = codec.open_order_fields(order)

    oid, contract, o, state = _one(ibapi_deliver(fields), "openOrder")
    a_oid, a_contract, a_o, a_state = _one(ib_async_deliver(fields), "openOrder")

    expected = (order_id, perm_id, client_id, ref, status, outside_rth, instrument.con_id)
    assert (oid, o.permId, o.clientId, o.orderRef, state.status, o.outsideRth) == expected[:6]
    assert contract.conId == instrument.con_id
    assert (a_oid, a_o.permId, a_o.clientId, a_o.orderRef, a_state.status) == expected[:5]
    assert (a_o.outsideRth, a_contract.conId) == expected[5:]
    assert float(o.totalQuantity) == a_o.totalQuantity == quantity
    assert o.lmtPrice == a_o.lmtPrice == (lmt if lmt is not None else 0.0)
    assert (o.account, o.tif, a_o.account, a_o.action) == ("DU111", "DAY", "DU111", "BUY")
    assert o.conditions == [] and a_o.conditions == []
    assert o.algoStrategy == a_o.algoStrategy == ""


def test_open_order_then_layout_is_the_178_field_count() -> None:
    fields = codec.open_order_fields(_order())

    # id + orderId + 11 contract + 73 order fields to status + 9 margins + 4 commission + 28 tail
    assert len(fields) == 127


def test_order_status_then_both_clients_see_fill_progress() -> None:
    order = _order(status="Submitted", filled=40.0, avg_fill_price=187.4, last_fill_price=187.45)
    fields = codec.order_status_fields(order)

    ibapi_args = _one(ibapi_deliver(fields), "orderStatus")
    ib_async_args = _one(ib_async_deliver(fields), "orderStatus")

    assert ibapi_args == (
        5,
        "Submitted",
        Decimal("40"),
        Decimal("60"),
        187.4,
        1_234_567_890,
        0,
        187.45,
        3,
        "",
        0.0,
    )
    assert ib_async_args == (
        5,
        "Submitted",
        40.0,
        60.0,
        187.4,
        1_234_567_890,
        0,
        187.45,
        3,
        "",
        0.0,
    )


def test_completed_order_then_both_clients_see_final_status_and_fill() -> None:
    order = _order(status="Filled", filled=100.0, avg_fill_price=187.4)
    fields = codec.completed_order_fields(order, "20260625 10:01:02 US/Eastern", "Filled")

    contract, o, state = _one(ibapi_deliver(fields), "completedOrder")
    a_contract, a_o, a_state = _one(ib_async_deliver(fields), "completedOrder")

    assert (contract.symbol, o.permId, o.filledQuantity, state.completedStatus) == (
        "AAPL",
        1_234_567_890,
        Decimal("100"),
        "Filled",
    )
    assert state.completedTime == a_state.completedTime == "20260625 10:01:02 US/Eastern"
    assert (a_contract.conId, a_o.permId, a_o.filledQuantity, a_state.status) == (
        265598,
        1_234_567_890,
        100.0,
        "Filled",
    )


def test_execution_and_commission_then_both_clients_see_the_fill() -> None:
    fill = _fill()
    exec_fields = codec.exec_details_fields(-1, fill)
    commission_fields = codec.commission_report_fields(fill)

    req_id, contract, execution = _one(ibapi_deliver(exec_fields), "execDetails")
    report = _one(ibapi_deliver(commission_fields), "commissionAndFeesReport")[0]
    a_req_id, a_contract, a_execution = _one(ib_async_deliver(exec_fields), "execDetails")
    a_report = _one(ib_async_deliver(commission_fields), "commissionReport")[0]

    assert (req_id, contract.localSymbol, execution.execId, execution.side) == (
        -1,
        "ESZ6",
        "0000e0d5.6789.01.01",
        "SLD",
    )
    assert (execution.shares, execution.price, execution.permId, execution.orderRef) == (
        Decimal("2"),
        5012.25,
        1_234_567_890,
        "guardd:flatten:7",
    )
    assert (a_req_id, a_contract.multiplier, a_execution.cumQty, a_execution.clientId) == (
        -1,
        "50",
        2.0,
        3,
    )
    assert a_execution.time.timestamp() == fill.time
    assert (report.execId, report.commissionAndFees, report.realizedPNL) == (
        fill.exec_id,
        4.5,
        125.0,
    )
    assert (a_report.execId, a_report.commission, a_report.currency) == (fill.exec_id, 4.5, "USD")


def test_opening_fill_with_unset_realized_pnl_then_clients_see_unset() -> None:
    fields = codec.commission_report_fields(_fill(realized_pnl=UNSET_DOUBLE))

    report = _one(ibapi_deliver(fields), "commissionAndFeesReport")[0]
    a_report = _one(ib_async_deliver(fields), "commissionReport")[0]

    assert report.realizedPNL == a_report.realizedPNL == UNSET_DOUBLE


def test_bid_tick_then_ibapi_adds_size_tick_and_ib_async_sees_price_and_size() -> None:
    fields = codec.tick_price_fields(12, 1, 187.49, 300.0, attr_mask=1)

    calls = ibapi_deliver(fields)
    a_calls = ib_async_deliver(fields)

    assert [name for name, _ in calls] == ["tickPrice", "tickSize"]
    assert calls[0][1][:3] == (12, 1, 187.49) and calls[0][1][3].canAutoExecute
    assert calls[1][1] == (12, 0, Decimal("300"))
    assert a_calls == [("priceSizeTick", (12, 1, 187.49, 300.0))]


@pytest.mark.parametrize("instrument", [AAPL, ES])
def test_contract_details_then_both_clients_can_qualify_the_contract(
    instrument: Instrument,
) -> None:
    fields = codec.contract_details_fields(4, instrument)

    req_id, details = _one(ibapi_deliver(fields), "contractDetails")
    a_req_id, a_details = _one(ib_async_deliver(fields), "contractDetails")

    for rid, c in ((req_id, details.contract), (a_req_id, a_details.contract)):
        assert (rid, c.conId, c.symbol, c.secType) == (4, instrument.con_id, *_sym(instrument))
        assert (c.exchange, c.primaryExchange, c.currency) == (
            instrument.exchange,
            instrument.primary_exchange,
            "USD",
        )
        assert c.lastTradeDateOrContractMonth == instrument.last_trade_date
    assert details.minTick == a_details.minTick == instrument.min_tick


def _sym(instrument: Instrument) -> tuple[str, str]:
    return instrument.symbol, instrument.sec_type


# ---------------------------------------------------------------------------------------------
# Client -> server: the real clients write, our decoders read


def _ibapi_stock() -> Contract:
    contract = Contract()
    contract.symbol, contract.secType, contract.exchange = "AAPL", "STK", "SMART"
    contract.currency, contract.primaryExchange = "USD", "NASDAQ"
    return contract


def _ibapi_limit(qty: str = "100", price: float = 187.5) -> Order:
    order = Order()
    order.action, order.orderType = "SELL", "LMT"
    order.totalQuantity, order.lmtPrice = Decimal(qty), price
    order.account, order.orderRef, order.tif = "DU111", "guardd:flatten:7", "GTC"
    order.outsideRth = True
    return order


def test_ibapi_plain_limit_order_then_decoded_order_matches() -> None:
    (frame,) = ibapi_sent(lambda c: c.placeOrder(11, _ibapi_stock(), _ibapi_limit()))

    placed = codec.decode_place_order_in_full(frame)

    order = placed.order
    assert len(frame) == 114  # a plain LMT stock order at 178, message id included
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
    assert order.contract == ContractSpec(
        symbol="AAPL",
        sec_type="STK",
        exchange="SMART",
        primary_exchange="NASDAQ",
        currency="USD",
    )
    assert (placed.what_if, placed.features) == (False, ())


def test_ibapi_market_order_then_unset_prices_decode_as_none() -> None:
    order = Order()
    order.action, order.orderType, order.totalQuantity = "BUY", "MKT", Decimal("0.5")
    (frame,) = ibapi_sent(lambda c: c.placeOrder(12, _ibapi_stock(), order))

    decoded = codec.decode_place_order(frame)

    assert (decoded.lmt_price, decoded.aux_price, decoded.total_quantity) == (None, None, 0.5)


def test_ibapi_what_if_algo_conditions_order_then_features_named_and_fields_consumed() -> None:
    order = _ibapi_limit()
    order.whatIf = True
    order.algoStrategy = "Adaptive"
    order.algoParams = [TagValue("adaptivePriority", "Normal")]
    price = Create(OrderCondition.Price)
    price.conId, price.exchange, price.price, price.isMore = 265598, "SMART", 190.0, True
    price.triggerMethod = 0
    time_cond = Create(OrderCondition.Time)
    time_cond.time, time_cond.isMore = "20260625 15:00:00 US/Eastern", True
    order.conditions = [price, time_cond]
    order.hedgeType, order.hedgeParam = "F", "0.5"
    (frame,) = ibapi_sent(lambda c: c.placeOrder(13, _ibapi_stock(), order))

    placed = codec.decode_place_order_in_full(frame)

    assert placed.what_if is True
    assert placed.features == ("hedge", "algo", "conditions")
    assert placed.order.order_ref == "guardd:flatten:7"


def test_ibapi_combo_order_then_combo_feature_and_fields_consumed() -> None:
    contract = Contract()
    contract.symbol, contract.secType, contract.exchange, contract.currency = (
        "SPY",
        "BAG",
        "SMART",
        "USD",
    )
    legs = []
    for con_id, action in ((1001, "BUY"), (1002, "SELL")):
        leg = ComboLeg()
        leg.conId, leg.ratio, leg.action, leg.exchange = con_id, 1, action, "SMART"
        legs.append(leg)
    contract.comboLegs = legs
    (frame,) = ibapi_sent(lambda c: c.placeOrder(14, contract, _ibapi_limit("1", 1.25)))

    placed = codec.decode_place_order_in_full(frame)

    assert placed.features == ("combo",)
    assert placed.order.lmt_price == 1.25


def test_ibapi_small_requests_then_decoded_values_match() -> None:
    execution_filter = ExecutionFilter()
    execution_filter.clientId, execution_filter.acctCode, execution_filter.symbol = 3, "DU111", "ES"
    stock = _ibapi_stock()
    stock.conId = 265598

    def send(client: EClient) -> None:
        client.cancelOrder(21, OrderCancel())
        client.reqMktData(22, stock, "233,236", False, False, [])
        client.reqContractDetails(23, stock)
        client.reqExecutions(24, execution_filter)

    cancel, mkt_data, details, executions = ibapi_sent(send)

    assert codec.decode_cancel_order(cancel) == 21
    request = codec.decode_mkt_data_request(mkt_data)
    assert (request.req_id, request.contract.con_id, request.generic_ticks) == (
        22,
        265598,
        "233,236",
    )
    assert request.snapshot is False
    assert codec.decode_contract_details_request(details) == (
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
    assert codec.decode_executions_request(executions) == codec.ExecutionsRequest(
        24, 3, "DU111", "", "ES", "", "", ""
    )


async def test_ib_async_requests_then_decoded_values_match() -> None:
    stock = AsyncContract(secType="STK", conId=265598, symbol="AAPL", exchange="SMART")
    stock.currency, stock.primaryExchange = "USD", "NASDAQ"
    order = AsyncLimitOrder("BUY", 25, 187.25, account="DU111", orderRef="bot:beta", tif="DAY")
    combo = AsyncContract(secType="BAG", symbol="SPY", exchange="SMART", currency="USD")
    combo.comboLegs = [AsyncComboLeg(1001, 1, "BUY", "SMART"), AsyncComboLeg(1002, 1, "SELL")]

    def send(client: Any) -> None:
        client.placeOrder(31, stock, order)
        client.placeOrder(32, combo, AsyncLimitOrder("SELL", 1, 0.75))
        client.cancelOrder(31)
        client.reqMktData(33, stock, "", True, False, [])
        client.reqContractDetails(34, stock)
        client.reqExecutions(35, AsyncExecutionFilter(clientId=0, acctCode="DU111"))

    frames, start_api = await ib_async_sent(send, expect=6)
    place, place_combo, cancel, mkt_data, details, executions = frames

    assert start_api == ["71", "2", "7", ""]
    placed = codec.decode_place_order_in_full(place)
    assert (placed.order.order_id, placed.order.total_quantity, placed.order.lmt_price) == (
        31,
        25.0,
        187.25,
    )
    assert (placed.order.account, placed.order.order_ref, placed.features) == (
        "DU111",
        "bot:beta",
        (),
    )
    assert placed.order.contract.con_id == 265598
    assert codec.decode_place_order_in_full(place_combo).features == ("combo",)
    assert codec.decode_cancel_order(cancel) == 31
    assert codec.decode_mkt_data_request(mkt_data).snapshot is True
    assert codec.decode_contract_details_request(details)[0] == 34
    assert codec.decode_executions_request(executions).account == "DU111"


# ---------------------------------------------------------------------------------------------
# Malformed input


def _plain_order_frame() -> list[str]:
    (frame,) = ibapi_sent(lambda c: c.placeOrder(11, _ibapi_stock(), _ibapi_limit()))
    return frame


@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_truncated_place_order_then_codec_error_never_index_error(data: st.DataObject) -> None:
    frame = _PLAIN_FRAME
    cut = data.draw(st.integers(0, len(frame) - 1))

    with pytest.raises(codec.CodecError):
        codec.decode_place_order(frame[:cut])


def test_place_order_with_extra_field_then_codec_error() -> None:
    with pytest.raises(codec.CodecError, match="trailing"):
        codec.decode_place_order([*_PLAIN_FRAME, "1"])


@pytest.mark.parametrize(
    ("index", "value"),
    [(1, "eleven"), (17, "1.5.2"), (19, "nan"), (27, "yes")],
)
def test_place_order_with_garbage_field_then_codec_error(index: int, value: str) -> None:
    frame = list(_PLAIN_FRAME)
    frame[index] = value

    with pytest.raises(codec.CodecError):
        codec.decode_place_order(frame)


def test_request_with_another_message_id_then_codec_error() -> None:
    with pytest.raises(codec.CodecError, match="message id"):
        codec.decode_cancel_order(["3", "1", "21", ""])
    with pytest.raises(codec.CodecError, match="empty"):
        codec.decode_executions_request([])


def test_unset_markers_from_either_client_then_read_as_unset() -> None:
    frame = list(_PLAIN_FRAME)
    frame[19] = "1.7976931348623157e+308"  # lmtPrice, as ibapi would write it unhandled
    frame[20] = ""  # auxPrice, as ib_async writes it
    frame[28] = "2147483647"  # parentId

    order = codec.decode_place_order(frame)

    assert (order.lmt_price, order.aux_price, order.parent_id) == (None, None, 0)
    assert math.isclose(order.total_quantity, 100.0)


_PLAIN_FRAME = _plain_order_frame()
