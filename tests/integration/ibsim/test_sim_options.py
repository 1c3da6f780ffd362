"""The simulated exchange's options (secType OPT): priced by Black-Scholes from the underlying's
last price, valued like stocks in the account, margined when short, exercised or expiring
worthless at the close of their last trading day; and tickOptionComputation on both wires."""

from __future__ import annotations

import dataclasses
import datetime as dt
import math
from collections.abc import AsyncIterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from ibapi.contract import Contract

from guardd.core.options import black_scholes
from ibsim.exchange import Exchange, option_expiry
from ibsim.gateway import SimGateway
from ibsim.scenario import ScenarioError, parse_scenario
from ibsim.server import build_gateway
from ibsim.types import ContractSpec, Instrument, OrderRejected, OrderRequest, PositionChanged
from tests.ibapi_harness import connected, market_order

ACCOUNT = "DU1"
EXPIRY = "20261218"
EXPIRES_AT = option_expiry(EXPIRY)
START = EXPIRES_AT - 30 * 86_400  # a month before expiry
AAPL = Instrument(
    con_id=265598,
    symbol="AAPL",
    sec_type="STK",
    exchange="SMART",
    primary_exchange="NASDAQ",
    currency="USD",
    initial_price=200.0,
    volatility=0.0,
)


def _option(con_id: int, right: str, strike: float) -> Instrument:
    return Instrument(
        con_id=con_id,
        symbol="AAPL",
        sec_type="OPT",
        exchange="SMART",
        primary_exchange="",
        currency="USD",
        multiplier=100.0,
        last_trade_date=EXPIRY,
        local_symbol=f"AAPL  261218{right}{round(strike * 1000):08d}",
        trading_class="AAPL",
        spread=0.05,
        initial_margin_rate=0.2,
        maint_margin_rate=0.2,
        right=right,
        strike=strike,
        underlying_con_id=AAPL.con_id,
        implied_vol=0.3,
    )


CALL_190 = _option(900001, "C", 190.0)
PUT_210 = _option(900002, "P", 210.0)
CALL_230 = _option(900003, "C", 230.0)


def _exchange() -> Exchange:
    ex = Exchange([AAPL, CALL_190, PUT_210, CALL_230], {ACCOUNT: 1_000_000.0}, now=START)
    ex.check_margin = False
    return ex


def _usd_values(ex: Exchange) -> dict[str, float]:
    """The account's values totalled in USD (the Currency row is text)."""
    return {k: float(v) for k, v, c in ex.account_values(ACCOUNT) if c == "USD" and k != "Currency"}


def _order(order_id: int, inst: Instrument, action: str, quantity: float) -> OrderRequest:
    return OrderRequest(
        order_id=order_id,
        contract=ContractSpec(con_id=inst.con_id),
        action=action,
        total_quantity=quantity,
        order_type="MKT",
        lmt_price=None,
        aux_price=None,
        account=ACCOUNT,
    )


def test_an_option_then_quoted_at_black_scholes_of_the_underlying() -> None:
    ex = _exchange()

    model = black_scholes("C", 200.0, 190.0, 30 / 365, 0.3).price
    quote = ex.quote(CALL_190.con_id)

    assert quote.last == pytest.approx(round(model, 2))
    assert quote.bid < quote.last < quote.ask
    state = ex.option_value(CALL_190.con_id)
    assert state is not None and state.underlying == 200.0
    assert state.years == pytest.approx(30 / 365)
    assert ex.option_value(AAPL.con_id) is None


def test_underlying_jumps_then_the_option_moves_with_it() -> None:
    ex = _exchange()
    call_before, put_before = ex.quote(CALL_190.con_id).last, ex.quote(PUT_210.con_id).last

    ex.jump_price(AAPL.con_id, -0.10, START)

    assert ex.quote(CALL_190.con_id).last < call_before
    assert ex.quote(PUT_210.con_id).last > put_before
    with pytest.raises(ValueError, match="underlying"):
        ex.jump_price(CALL_190.con_id, 0.1, START)


def test_contract_fields_then_the_one_option_is_found() -> None:
    ex = _exchange()
    spec = ContractSpec(symbol="AAPL", sec_type="OPT", last_trade_date=EXPIRY, strike=210.0)

    assert ex.find_instrument(dataclasses.replace(spec, right="PUT")) == PUT_210
    assert ex.find_instrument(dataclasses.replace(spec, right="C")) is None
    assert ex.find_instrument(ContractSpec(symbol="AAPL", sec_type="STK")) == AAPL


def test_buy_a_call_then_premium_paid_and_value_in_net_liquidation() -> None:
    ex = _exchange()
    ask = ex.quote(CALL_190.con_id).ask

    ex.place_order(1, _order(1, CALL_190, "BUY", 5), START)

    values = _usd_values(ex)
    last = ex.quote(CALL_190.con_id).last
    assert values["TotalCashValue"] == pytest.approx(1_000_000 - 5 * ask * 100 - 3.25)
    assert values["NetLiquidation"] == pytest.approx(1_000_000 - 5 * (ask - last) * 100 - 3.25)
    assert values["InitMarginReq"] == 0.0  # a long option is paid in full


def test_sell_a_put_then_margined_on_the_underlying() -> None:
    ex = _exchange()

    ex.place_order(1, _order(1, PUT_210, "SELL", 2), START)

    values = _usd_values(ex)
    last = ex.quote(PUT_210.con_id).last
    assert values["MaintMarginReq"] == pytest.approx(2 * 100 * (last + 0.2 * 200.0))


def test_expiry_in_the_money_then_positions_in_the_underlying() -> None:
    ex = _exchange()
    ex.set_position(ACCOUNT, CALL_190.con_id, 3, 12.0)  # long calls, 10 in the money
    ex.set_position(ACCOUNT, PUT_210.con_id, -2, 11.0)  # short puts, 10 in the money
    ex.set_position(ACCOUNT, CALL_230.con_id, 4, 1.0)  # out of the money
    ex.advance(EXPIRES_AT - 1)
    net_liq = ex.net_liquidation(ACCOUNT)

    events = ex.advance(EXPIRES_AT)

    held = {p.instrument.con_id: p.position for p in ex.positions(ACCOUNT)}
    # 3 calls buy 300 shares at 190; 2 short puts are assigned 200 shares at 210
    assert held == {AAPL.con_id: 500.0}
    changed = {e.position.instrument.con_id for e in events if isinstance(e, PositionChanged)}
    assert changed == {AAPL.con_id, CALL_190.con_id, PUT_210.con_id, CALL_230.con_id}
    # the calls out of the money expire worthless (their last tick: 0.01 x 100 x 4 = 4)
    assert ex.net_liquidation(ACCOUNT) == pytest.approx(net_liq - 4.0, abs=0.5)
    rejected = ex.place_order(1, _order(1, CALL_190, "BUY", 1), EXPIRES_AT + 1)
    assert isinstance(rejected[0], OrderRejected) and len(rejected) == 1
    assert rejected[0].reason == "Order rejected - reason:The contract has expired."


@settings(max_examples=40, deadline=None)
@given(
    st.floats(min_value=-0.3, max_value=0.3),
    st.integers(min_value=-20, max_value=20).filter(bool),
    st.sampled_from([CALL_190, PUT_210, CALL_230]),
)
def test_any_expiry_then_cash_and_shares_follow_the_strike(
    move: float, quantity: int, option: Instrument
) -> None:
    ex = _exchange()
    ex.set_position(ACCOUNT, option.con_id, quantity, 5.0)
    ex.jump_price(AAPL.con_id, move, START)
    spot = ex.quote(AAPL.con_id).last
    cash_before = ex.net_liquidation(ACCOUNT) - ex.quote(option.con_id).last * quantity * 100

    ex.advance(EXPIRES_AT)

    shares = ex.position(ACCOUNT, AAPL.con_id).position
    itm = spot - option.strike >= 0.01 if option.right == "C" else option.strike - spot >= 0.01
    direction = 1 if option.right == "C" else -1
    assert shares == (direction * quantity * 100 if itm else 0)
    assert ex.position(ACCOUNT, option.con_id).position == 0
    cash = _usd_values(ex)
    assert cash["TotalCashValue"] == pytest.approx(cash_before - shares * option.strike, abs=0.01)


OPTIONS_SCENARIO: dict[str, object] = {
    "gateway": {"start_time": dt.datetime.fromtimestamp(START, dt.UTC).isoformat()},
    "accounts": [{"id": ACCOUNT}],
    "instruments": [
        {"symbol": "AAPL", "con_id": 265598, "price": 200.0, "volatility": 0.0},
        {
            "symbol": "AAPL",
            "sec_type": "OPT",
            "con_id": 900001,
            "underlying": "AAPL",
            "strike": 190.0,
            "right": "C",
            "last_trade_date": EXPIRY,
            "implied_vol": 0.3,
        },
    ],
    "positions": [{"symbol": "AAPL 20261218 190C", "quantity": 2}],
}


def test_scenario_option_then_an_ib_like_contract() -> None:
    scenario = parse_scenario(OPTIONS_SCENARIO)

    ex = scenario.build_exchange(now=START)

    inst = ex.find_instrument(ContractSpec(con_id=900001))
    assert inst is not None
    assert (inst.local_symbol, inst.multiplier, inst.underlying_con_id) == (
        "AAPL  261218C00190000",
        100.0,
        265598,
    )
    pos = ex.position(ACCOUNT, 900001)
    assert pos.position == 2 and pos.avg_cost == pytest.approx(ex.quote(900001).last * 100)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"underlying": "MSFT"}, "no stock or future"),
        ({"right": ""}, "right"),
        ({"last_trade_date": "202612"}, "YYYYMMDD"),
    ],
)
def test_bad_option_then_scenario_error(change: dict[str, str], message: str) -> None:
    instruments = list(OPTIONS_SCENARIO["instruments"])  # type: ignore[call-overload]
    data = {**OPTIONS_SCENARIO, "instruments": [instruments[0], {**instruments[1], **change}]}

    with pytest.raises(ScenarioError, match=message):
        parse_scenario(data)


# ---- over the wire: the official ibapi client at 178 (text) and 226 (protobuf)


@pytest.fixture(params=[178, 226], ids=lambda v: f"v{v}")
async def option_sim(request: pytest.FixtureRequest) -> AsyncIterator[SimGateway]:
    scenario = parse_scenario(OPTIONS_SCENARIO)
    async with build_gateway(
        scenario, host="127.0.0.1", port=0, server_version=request.param
    ) as gateway:
        yield gateway


def _call_contract() -> Contract:
    contract = Contract()
    contract.symbol = "AAPL"
    contract.secType = "OPT"
    contract.lastTradeDateOrContractMonth = EXPIRY
    contract.strike = 190.0
    contract.right = "C"
    contract.multiplier = "100"
    contract.exchange = "SMART"
    contract.currency = "USD"
    return contract


@pytest.mark.integration
async def test_option_market_data_then_option_computations_as_tws_sends_them(
    option_sim: SimGateway,
) -> None:
    client = await connected(option_sim.port, 7)
    try:
        client.reqMktData(11, _call_contract(), "", False, False, [])

        ticks = await client.wait_for("tickOptionComputation", count=4)
    finally:
        await client.stop()

    by_type = {args[1]: args for args in ticks}
    assert sorted(by_type) == [10, 11, 12, 13]
    quote = option_sim.exchange.quote(900001)
    years = (EXPIRES_AT - option_sim.exchange.now) / (365 * 86_400)
    model = black_scholes("C", 200.0, 190.0, years, 0.3)
    # (reqId, tickType, tickAttrib, impliedVol, delta, optPrice, pvDividend, gamma, vega, theta,
    #  undPrice)
    _, _, attrib, vol, delta, price, dividend, gamma, vega, theta, und = by_type[13]
    assert (attrib, vol, price, dividend, und) == (1, 0.3, pytest.approx(model.price), 0.0, 200.0)
    assert (delta, gamma, vega, theta) == pytest.approx(
        (model.delta, model.gamma, model.vega, model.theta), rel=1e-3
    )
    for tick_type, touch in ((10, quote.bid), (11, quote.ask), (12, quote.last)):
        _, _, _, vol, delta, price, *_, und = by_type[tick_type]
        assert price == touch and und == 200.0
        assert math.isclose(black_scholes("C", 200.0, 190.0, years, vol).price, touch, rel_tol=1e-6)
    assert by_type[10][3] < 0.3 < by_type[11][3]  # the bid implies less volatility than the ask


@pytest.mark.integration
async def test_option_position_and_order_then_the_contract_on_the_wire(
    option_sim: SimGateway,
) -> None:
    client = await connected(option_sim.port, 7)
    try:
        client.reqPositions()
        (position,) = await client.wait_for("position", lambda a: a[1].secType == "OPT")
        client.placeOrder(client_order_id := 1000, _call_contract(), market_order("SELL", 2))
        await client.wait_for("orderStatus", lambda a: a[0] == client_order_id and a[1] == "Filled")
    finally:
        await client.stop()

    contract = position[1]
    assert (contract.conId, contract.strike, contract.right, contract.multiplier) == (
        900001,
        190.0,
        "C",
        "100",
    )
    assert contract.localSymbol == "AAPL  261218C00190000"
    assert position[2] == 2
    assert option_sim.exchange.position(ACCOUNT, 900001).position == 0
