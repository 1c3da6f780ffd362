"""The simulated exchange's FX pairs (secType CASH on IDEALPRO): IB's quantity conventions, cash
in both currencies, pair prices as the account's exchange rates, IDEALPRO odd lots."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ibsim.exchange import Exchange, idealpro_minimum
from ibsim.scenario import ScenarioError, parse_scenario
from ibsim.types import ContractSpec, Instrument, OrderRejected, OrderRequest

EURUSD = Instrument(
    con_id=12087792,
    symbol="EUR",
    sec_type="CASH",
    exchange="IDEALPRO",
    primary_exchange="",
    currency="USD",
    local_symbol="EUR.USD",
    trading_class="EUR.USD",
    initial_price=1.10,
    volatility=0.0,
    spread=0.0001,
    min_tick=0.00005,
    initial_margin_rate=0.03,
    maint_margin_rate=0.03,
)
USDJPY = Instrument(
    con_id=15016059,
    symbol="USD",
    sec_type="CASH",
    exchange="IDEALPRO",
    primary_exchange="",
    currency="JPY",
    local_symbol="USD.JPY",
    trading_class="USD.JPY",
    initial_price=150.0,
    volatility=0.0,
    spread=0.01,
    min_tick=0.005,
    initial_margin_rate=0.03,
    maint_margin_rate=0.03,
)
ACCOUNT = "DU1"


def _exchange() -> Exchange:
    return Exchange([EURUSD, USDJPY], {ACCOUNT: 1_000_000.0})


def _order(
    order_id: int,
    inst: Instrument,
    action: str,
    quantity: float,
    contract: ContractSpec | None = None,
) -> OrderRequest:
    return OrderRequest(
        order_id=order_id,
        contract=contract or ContractSpec(con_id=inst.con_id),
        action=action,
        total_quantity=quantity,
        order_type="MKT",
        lmt_price=None,
        aux_price=None,
    )


def _values(exchange: Exchange) -> dict[tuple[str, str], str]:
    return {(k, c): v for k, v, c in exchange.account_values(ACCOUNT)}


def test_buy_eurusd_then_quantity_in_eur_and_cash_moves_in_both_currencies() -> None:
    # Arrange
    exchange = _exchange()
    ask = exchange.quote(EURUSD.con_id).ask

    # Act: buy 100,000 EUR.USD, named as IB names it (symbol EUR, currency USD, IDEALPRO)
    spec = ContractSpec(symbol="EUR", sec_type="CASH", exchange="IDEALPRO", currency="USD")
    exchange.place_order(1, _order(1, EURUSD, "BUY", 100_000, spec), 0.0)

    # Assert: the position counts EUR, its value is in USD, and cash moved in EUR and USD
    pos = exchange.position(ACCOUNT, EURUSD.con_id)
    assert pos.position == 100_000
    assert pos.market_value == pytest.approx(100_000 * exchange.quote(EURUSD.con_id).last)
    values = _values(exchange)
    assert float(values[("CashBalance", "EUR")]) == pytest.approx(100_000)
    commission = max(2.0, 0.00002 * 100_000 * ask)
    assert float(values[("CashBalance", "USD")]) == pytest.approx(
        1_000_000 - 100_000 * ask - commission, abs=0.01
    )
    # NetLiquidation: the value is counted once (in the cash balances), not again as a position
    last = exchange.quote(EURUSD.con_id).last
    expected = 1_000_000 - 100_000 * ask - commission + 100_000 * last
    assert exchange.net_liquidation(ACCOUNT) == pytest.approx(expected)
    assert float(values[("GrossPositionValue", "USD")]) == pytest.approx(100_000 * last, abs=0.01)


def test_pair_against_base_then_its_price_is_the_exchange_rate_and_moves_with_it() -> None:
    # Arrange: a USD account; EUR.USD prices EUR, USD.JPY prices JPY (inverted)
    exchange = _exchange()

    # Act
    before = _values(exchange)
    exchange.jump_price(EURUSD.con_id, 0.10, 1.0)
    exchange.jump_price(USDJPY.con_id, -0.20, 1.0)
    after = _values(exchange)

    # Assert
    assert float(before[("ExchangeRate", "EUR")]) == pytest.approx(1.10)
    assert float(before[("ExchangeRate", "JPY")]) == pytest.approx(1 / 150, rel=1e-6)
    assert float(after[("ExchangeRate", "EUR")]) == pytest.approx(1.21)
    assert float(after[("ExchangeRate", "JPY")]) == pytest.approx(1 / 120, rel=1e-6)


def test_short_usdjpy_then_closed_by_buying_back_and_no_usd_left_over() -> None:
    # Arrange: sell 150,000 USD.JPY (quantity in USD)
    exchange = _exchange()
    exchange.place_order(1, _order(1, USDJPY, "SELL", 150_000), 0.0)
    assert exchange.position(ACCOUNT, USDJPY.con_id).position == -150_000

    # Act: buy it back
    exchange.place_order(1, _order(2, USDJPY, "BUY", 150_000), 0.0)

    # Assert: flat; the JPY balance is the spread and commissions, the USD balance unchanged
    assert exchange.positions(ACCOUNT) == []
    values = _values(exchange)
    assert float(values[("CashBalance", "USD")]) == pytest.approx(1_000_000)
    jpy = float(values[("CashBalance", "JPY")])
    assert jpy < 0
    assert jpy == pytest.approx(
        -150_000 * 0.01 - 2 * max(2.0 * 150, 0.00002 * 150_000 * 150), rel=0.01
    )


def test_order_below_idealpro_minimum_then_fills_as_odd_lot_unless_rejecting() -> None:
    # Arrange
    exchange = _exchange()
    odd = idealpro_minimum("EUR") - 1

    # Act / Assert: IB routes it as an odd lot; it fills
    exchange.place_order(1, _order(1, EURUSD, "BUY", odd), 0.0)
    assert exchange.position(ACCOUNT, EURUSD.con_id).position == odd

    # Act / Assert: a gateway that refuses odd lots rejects it with 201 and no fill
    exchange.reject_fx_odd_lots = True
    events = exchange.place_order(1, _order(2, EURUSD, "SELL", odd), 0.0)
    rejected = [e for e in events if isinstance(e, OrderRejected)]
    assert rejected and "IDEALPRO minimum" in rejected[0].reason
    assert exchange.position(ACCOUNT, EURUSD.con_id).position == odd


@settings(max_examples=40, deadline=None)
@given(
    trades=st.lists(
        st.tuples(st.sampled_from(["BUY", "SELL"]), st.integers(1, 400_000)), min_size=1, max_size=8
    ),
    move=st.floats(-0.3, 0.3),
)
def test_fx_trades_then_net_liquidation_is_cash_at_rates_and_position_is_eur_balance(
    trades: list[tuple[str, int]], move: float
) -> None:
    # Arrange
    exchange = _exchange()
    exchange.check_margin = False

    # Act
    for n, (action, quantity) in enumerate(trades, start=1):
        exchange.place_order(1, _order(n, EURUSD, action, quantity), 0.0)
    exchange.jump_price(EURUSD.con_id, move, 1.0)

    # Assert: the EUR.USD position is the EUR balance; NetLiq = USD + EUR at the pair's price
    values = _values(exchange)
    eur = float(values[("CashBalance", "EUR")])
    usd = float(values[("CashBalance", "USD")])
    assert exchange.position(ACCOUNT, EURUSD.con_id).position == pytest.approx(eur)
    last = exchange.quote(EURUSD.con_id).last
    assert exchange.net_liquidation(ACCOUNT) == pytest.approx(usd + eur * last, abs=0.02)


def test_scenario_fx_pair_then_ib_conventions_and_seeded_as_cash_balances() -> None:
    # Arrange / Act
    scenario = parse_scenario(
        {
            "accounts": [{"id": ACCOUNT, "cash": 500_000}],
            "instruments": [
                {"symbol": "EUR", "sec_type": "CASH", "currency": "USD", "con_id": 1, "price": 1.1}
            ],
            "positions": [{"symbol": "EUR.USD", "quantity": 100_000, "avg_price": 1.0}],
        }
    )
    exchange = scenario.build_exchange(now=0.0)

    # Assert
    (inst,) = exchange.instruments
    assert (inst.exchange, inst.local_symbol, inst.min_tick) == ("IDEALPRO", "EUR.USD", 0.00005)
    values = _values(exchange)
    assert float(values[("CashBalance", "EUR")]) == 100_000
    assert float(values[("CashBalance", "USD")]) == pytest.approx(400_000)
    assert exchange.net_liquidation(ACCOUNT) == pytest.approx(400_000 + 110_000)


def test_scenario_fixed_rate_for_a_currency_a_pair_prices_then_refused() -> None:
    with pytest.raises(ScenarioError, match=r"EUR\.USD's price is EUR's rate"):
        parse_scenario(
            {
                "currencies": {"rates": {"EUR": 1.2}},
                "instruments": [
                    {"symbol": "EUR", "sec_type": "CASH", "currency": "USD", "con_id": 1}
                ],
            }
        )
