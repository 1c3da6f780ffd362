"""The converters from ibapi's callback arguments to core events: plain functions, no socket."""

from __future__ import annotations

import math
from decimal import Decimal
from types import SimpleNamespace

import pytest
from ibapi.const import UNSET_DECIMAL, UNSET_DOUBLE, UNSET_INTEGER, UNSET_LONG
from ibapi.contract import Contract
from ibapi.execution import Execution
from ibapi.order import Order

from guardd.broker import convert
from guardd.broker.hours import HoursFormatError
from guardd.core.events import UNKNOWN_CLIENT_ID, ConId

AAPL = ConId(265598)


def stock() -> Contract:
    contract = Contract()
    contract.conId = AAPL
    contract.symbol = "AAPL"
    contract.secType = "STK"
    contract.currency = "USD"
    contract.primaryExchange = "NASDAQ"
    return contract


def test_position_with_unset_quantity_then_unknown_never_zero() -> None:
    event = convert.position_update("DU1", stock(), UNSET_DECIMAL, UNSET_DOUBLE, ts=5.0)

    assert math.isnan(event.quantity) and math.isnan(event.avg_cost)
    assert event.con_id == AAPL and event.multiplier == 1.0 and event.exchange == "NASDAQ"
    assert math.isnan(event.strike) and event.right == "" and event.ts == 5.0


def test_portfolio_update_then_value_in_the_position_currency_and_unset_is_nan() -> None:
    event = convert.portfolio_value(stock(), Decimal(100), 190.5, 19050.0, "DU1", ts=3.0)
    assert (event.account, event.con_id, event.position) == ("DU1", AAPL, 100.0)
    assert (event.market_price, event.market_value, event.ts) == (190.5, 19050.0, 3.0)

    unset = convert.portfolio_value(stock(), UNSET_DECIMAL, UNSET_DOUBLE, UNSET_DOUBLE, "DU1", 3.0)
    assert math.isnan(unset.position) and math.isnan(unset.market_value)


def test_option_position_then_its_terms() -> None:
    contract = stock()
    contract.secType, contract.strike, contract.right = "OPT", 150.0, "PUT"
    contract.lastTradeDateOrContractMonth, contract.multiplier = "20270115", "100"

    event = convert.position_update("DU1", contract, Decimal(-2), 310.5, ts=0.0)

    assert (event.quantity, event.strike, event.right, event.multiplier) == (-2.0, 150.0, "P", 100)
    assert math.isfinite(event.expiry)


def test_order_status_with_unset_ids_then_none_is_ours() -> None:
    event = convert.order_status(
        UNSET_INTEGER, "Submitted", UNSET_DECIMAL, Decimal(10), 0.0, UNSET_LONG, UNSET_INTEGER, 1.0
    )

    assert event.order_id == 0 and event.perm_id == 0
    assert event.client_id == UNKNOWN_CLIENT_ID
    assert math.isnan(event.filled) and event.remaining == 10.0


def test_open_order_then_every_field_read_from_the_order() -> None:
    order = Order()
    order.permId, order.clientId, order.account = 77, 3, "DU1"
    order.action, order.totalQuantity, order.orderType = "SELL", Decimal(5), "LMT"
    order.lmtPrice, order.orderRef, order.tif = 101.5, "guardd-x", "GTC"

    event = convert.open_order(12, stock(), order, SimpleNamespace(status="PreSubmitted"), ts=2.0)

    assert (event.order_id, event.perm_id, event.client_id) == (12, 77, 3)
    assert (event.action, event.quantity, event.lmt_price) == ("SELL", 5.0, 101.5)
    assert (event.status, event.order_ref, event.tif) == ("PreSubmitted", "guardd-x", "GTC")
    assert math.isnan(event.aux_price)  # ibapi's unset double


def test_execution_then_live_only_outside_a_download() -> None:
    fill = Execution()
    fill.execId, fill.permId, fill.orderId, fill.clientId = "e1", 77, 12, UNSET_INTEGER
    fill.acctNumber, fill.side, fill.shares, fill.price = "DU1", "SLD", Decimal(5), 101.0

    live = convert.execution(-1, stock(), fill, ts=3.0)
    downloaded = convert.execution(9, stock(), fill, ts=3.0)

    assert live.live and not downloaded.live
    assert live.client_id == UNKNOWN_CLIENT_ID and live.shares == 5.0


@pytest.mark.parametrize(
    ("tick_type", "field", "delayed"), [(1, "bid", False), (2, "ask", False), (68, "last", True)]
)
def test_price_tick_then_field_and_delay(tick_type: int, field: str, delayed: bool) -> None:
    tick = convert.price_tick(AAPL, tick_type, 100.25, ts=1.0, stale=False)

    assert tick is not None
    assert (tick.field, tick.price, tick.delayed) == (field, 100.25, delayed)


def test_price_tick_without_a_price_or_of_another_type_then_unknown_or_none() -> None:
    no_price = convert.price_tick(AAPL, 1, -1.0, ts=1.0, stale=True)

    assert no_price is not None and math.isnan(no_price.price) and no_price.delayed
    assert convert.price_tick(AAPL, 9, 100.0, ts=1.0, stale=False) is None  # close price
    assert convert.size_tick(AAPL, 8, ts=1.0, stale=False) is None  # volume


def test_option_computation_without_figures_then_nan() -> None:
    computation = convert.option_computation(
        AAPL, 13, None, 0.5, None, None, None, UNSET_DOUBLE, ts=1.0, stale=False
    )

    assert computation is not None and computation.source == "model"
    assert computation.delta == 0.5
    assert math.isnan(computation.implied_vol) and math.isnan(computation.underlying_price)


def test_unreadable_hours_then_an_error_not_an_empty_schedule() -> None:
    details = SimpleNamespace(timeZoneId="US/Eastern", tradingHours="garbage", liquidHours="")

    with pytest.raises(HoursFormatError):
        convert.contract_hours(AAPL, details, ts=1.0)


def test_managed_accounts_then_codes_without_blanks() -> None:
    assert convert.managed_accounts("DU1, DU2,,") == ("DU1", "DU2")
