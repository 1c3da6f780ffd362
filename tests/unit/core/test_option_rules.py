"""Options in the Book and the leverage rule: IB's option computation (tickOptionComputation)
folded per contract, an option valued at its market price x multiplier in the base currency, and
`limits.leverage.options = "delta"` counting delta x underlying price x multiplier x quantity,
a data finding (never 0) without a fresh delta."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from guardd.config import parse_config
from guardd.core.book import Book
from guardd.core.events import (
    AccountValue,
    BrokerEvent,
    ConId,
    Connected,
    OpenOrdersEnd,
    OptionComputation,
    OptionSource,
    PositionsEnd,
    PositionUpdate,
    PriceTick,
)
from guardd.core.rules import Leverage, Thresholds
from guardd.runtime.rulebook import build_rules

ACC = "DU1"
T = 1000.0
STOCK, CALL, PUT = 1, 2, 3


def av(key: str, value: str, currency: str = "USD") -> AccountValue:
    return AccountValue(account=ACC, key=key, value=value, currency=currency, ts=T)


def pos(con_id: int, qty: float, *, sec_type: str = "OPT", currency: str = "USD") -> PositionUpdate:
    return PositionUpdate(
        account=ACC,
        con_id=ConId(con_id),
        symbol=f"S{con_id}",
        sec_type=sec_type,
        currency=currency,
        multiplier=100.0 if sec_type == "OPT" else 1.0,
        exchange="",
        quantity=qty,
        avg_cost=1.0,
        ts=T,
    )


def tick(con_id: int, price: float, ts: float = T) -> PriceTick:
    return PriceTick(con_id=ConId(con_id), field="last", price=price, ts=ts)


def greeks(
    con_id: int,
    delta: float,
    underlying: float = 200.0,
    *,
    source: OptionSource = "model",
    ts: float = T,
) -> OptionComputation:
    return OptionComputation(
        con_id=ConId(con_id),
        source=source,
        implied_vol=0.3,
        delta=delta,
        gamma=0.02,
        vega=0.2,
        theta=-0.05,
        underlying_price=underlying,
        ts=ts,
    )


def book_with(*events: BrokerEvent) -> Book:
    book = Book(ACC, "USD", created_at=T - 10)
    book.fold(Connected(server_version=178, managed_accounts=(ACC,), next_order_id=1, ts=T - 10))
    book.fold(PositionsEnd(ts=T - 10))
    book.fold(OpenOrdersEnd(ts=T - 10))
    for e in events:
        book.fold(e)
    return book


NOTIONAL = Leverage(Thresholds(warn=2.0, reduce=3.0, kill=4.0))
DELTA = Leverage(Thresholds(warn=2.0, reduce=3.0, kill=4.0), options="delta")


def test_option_computations_then_model_preferred_and_unknown_kept_nan() -> None:
    book = book_with(
        greeks(CALL, 0.40, source="bid", ts=T - 2),
        greeks(CALL, 0.45, source="ask", ts=T - 1),
    )
    # without IB's model computation: the latest at a price
    found = book.option_greeks(ConId(CALL))
    assert found is not None and found.delta == 0.45 and found.ts == T - 1

    book.fold(greeks(CALL, 0.42, ts=T - 5))
    book.fold(greeks(CALL, 0.50, source="last", ts=T))

    model = book.option_greeks(ConId(CALL))
    assert model is not None and model.source == "model" and model.delta == 0.42
    assert book.option_greeks(ConId(PUT)) is None
    book.fold(greeks(CALL, math.nan))
    after = book.option_greeks(ConId(CALL))
    assert after is not None and math.isnan(after.delta)  # not computed: unknown, not the last


def test_option_position_then_valued_at_price_times_multiplier_in_base() -> None:
    # Arrange: a EUR account; 3 calls quoted 4.50 USD a share, USD at 0.90 EUR
    book = Book(ACC, "EUR", created_at=T - 10)
    book.fold(Connected(server_version=178, managed_accounts=(ACC,), next_order_id=1, ts=T - 10))

    # Act
    for e in (av("ExchangeRate", "0.90"), pos(CALL, 3), tick(CALL, 4.50)):
        book.fold(e)

    # Assert: 3 x 100 x 4.50 = 1,350 USD = 1,215 EUR
    held = book.position(ConId(CALL))
    assert held is not None and held.value == pytest.approx(1_350.0)
    assert book.exposure().gross == pytest.approx(1_215.0)


def test_leverage_notional_then_options_at_market_value() -> None:
    # 10 calls at 5.00 = 5,000; 100 shares at 200 = 20,000; NetLiquidation 10,000
    book = book_with(
        av("NetLiquidation", "10000"),
        pos(CALL, 10),
        tick(CALL, 5.0),
        pos(STOCK, 100, sec_type="STK"),
        tick(STOCK, 200.0),
        greeks(CALL, 0.6),
    )

    assert NOTIONAL.evaluate(book, T).value == pytest.approx(2.5)


def test_leverage_delta_then_delta_times_underlying_times_multiplier() -> None:
    # Arrange: long 10 calls (delta 0.60), short 5 puts (delta -0.30), underlying 200
    book = book_with(
        av("NetLiquidation", "100000"),
        pos(CALL, 10),
        tick(CALL, 5.0),
        greeks(CALL, 0.60),
        pos(PUT, -5),
        tick(PUT, 3.0),
        greeks(PUT, -0.30),
        pos(STOCK, 100, sec_type="STK"),
        tick(STOCK, 200.0),
    )

    # Act
    found = DELTA.evaluate(book, T)

    # Assert: |0.6 x 200 x 100 x 10| + |-0.3 x 200 x 100 x -5| + 100 x 200
    # = 120,000 + 30,000 + 20,000 = 170,000 / 100,000
    assert found.level == "ok"
    assert found.value == pytest.approx(1.7)
    assert NOTIONAL.evaluate(book, T).value == pytest.approx((5_000 + 1_500 + 20_000) / 100_000)


@pytest.mark.parametrize(
    "computation",
    [
        None,
        greeks(CALL, math.nan),
        greeks(CALL, 0.5, underlying=math.nan),
        greeks(CALL, 0.5, ts=T - 100),
    ],
    ids=["none", "delta-not-computed", "no-underlying", "stale"],
)
def test_leverage_delta_without_a_fresh_delta_then_data_never_zero(
    computation: OptionComputation | None,
) -> None:
    events: list[BrokerEvent] = [av("NetLiquidation", "1000"), pos(CALL, 100), tick(CALL, 5.0)]
    if computation is not None:
        events.append(computation)
    book = book_with(*events)

    found = DELTA.evaluate(book, T)

    assert found.level == "data"
    assert found.subject == "S2"
    assert NOTIONAL.evaluate(book, T).level == "kill"  # 50,000 / 1,000: notional still judges


@given(
    delta=st.floats(min_value=-1.0, max_value=1.0),
    underlying=st.floats(min_value=1.0, max_value=5_000.0),
    quantity=st.integers(min_value=-500, max_value=500).filter(bool),
    rate=st.floats(min_value=0.01, max_value=200.0),
)
def test_leverage_delta_any_option_then_gross_is_abs_delta_exposure_in_base(
    delta: float, underlying: float, quantity: int, rate: float
) -> None:
    book = book_with(
        av("NetLiquidation", "1000000", currency="EUR"),
        av("ExchangeRate", str(rate)),
        pos(CALL, quantity),
        tick(CALL, 7.0),
        greeks(CALL, delta, underlying),
    )
    book.base_currency = "EUR"

    found = DELTA.evaluate(book, T)

    expected = abs(delta * underlying * 100 * quantity) * float(str(rate)) / 1_000_000
    assert found.value == pytest.approx(expected, rel=1e-9, abs=1e-12)


def test_config_leverage_options_then_rule_built_with_it() -> None:
    text = """
account = "DU1"
state_dir = "state"
[ib]
client_id = 7
[limits.leverage]
kill = 4.0
options = "delta"
"""
    rules = build_rules(parse_config(text)).periodic
    lev = [r for r in rules if isinstance(r, Leverage)]
    assert [r.options for r in lev] == ["delta"]
    default = parse_config(text.replace('options = "delta"\n', ""))
    assert default.limits.leverage.options == "notional"
