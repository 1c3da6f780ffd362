"""The stress-loss limit (guardd.core.stress): each configured scenario's projected loss of the
whole book, options revalued in full by Black-Scholes at IB's implied volatility, the rest
linearly, FX through ExchangeRate; worst loss / NetLiquidation graded warn/reduce/kill; any
missing input a data finding, never a loss of 0."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from guardd.config import parse_config
from guardd.core.book import PORTFOLIO_MAX_AGE_S, Book
from guardd.core.events import (
    AccountValue,
    BrokerEvent,
    ConId,
    Connected,
    OpenOrdersEnd,
    OptionComputation,
    PortfolioValue,
    PositionsEnd,
    PositionUpdate,
    PriceTick,
)
from guardd.core.options import SECONDS_PER_YEAR, black_scholes
from guardd.core.rules import Thresholds
from guardd.core.stress import Scenario, StressLoss
from guardd.errors import ConfigError
from guardd.runtime.rulebook import build_policy, build_rules

ACC = "DU1"
T = 1_000_000.0
EXPIRY = T + 0.25 * SECONDS_PER_YEAR  # a quarter of a year left

DOWN10 = Scenario("down 10%", underlying_move=-0.10)
UP10 = Scenario("up 10%", underlying_move=0.10)
VOL_UP = Scenario("vol +50%", vol_move=0.5)
EUR_DOWN = Scenario("EUR -5%", fx_moves={"EUR": -0.05})


def av(key: str, value: str, currency: str = "USD") -> AccountValue:
    return AccountValue(account=ACC, key=key, value=value, currency=currency, ts=T)


def pos(
    con_id: int,
    qty: float,
    *,
    sec_type: str = "STK",
    currency: str = "USD",
    strike: float = math.nan,
    right: str = "",
    expiry: float = math.nan,
) -> PositionUpdate:
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
        strike=strike,
        right=right,
        expiry=expiry,
    )


def option(con_id: int, qty: float, strike: float, right: str) -> PositionUpdate:
    return pos(con_id, qty, sec_type="OPT", strike=strike, right=right, expiry=EXPIRY)


def tick(con_id: int, price: float) -> PriceTick:
    return PriceTick(con_id=ConId(con_id), field="last", price=price, ts=T)


def computation(con_id: int, vol: float = 0.30, spot: float = 100.0) -> OptionComputation:
    return OptionComputation(
        con_id=ConId(con_id),
        source="model",
        implied_vol=vol,
        delta=0.5,
        gamma=0.02,
        vega=0.2,
        theta=-0.05,
        underlying_price=spot,
        ts=T,
    )


def book_with(*events: BrokerEvent, base: str = "USD", nl: str = "100000") -> Book:
    book = Book(ACC, base, created_at=T - 10)
    book.fold(Connected(server_version=178, managed_accounts=(ACC,), next_order_id=1, ts=T - 10))
    book.fold(PositionsEnd(ts=T - 10))
    book.fold(OpenOrdersEnd(ts=T - 10))
    book.fold(av("NetLiquidation", nl, base))
    for e in events:
        book.fold(e)
    return book


def rule(*scenarios: Scenario) -> StressLoss:
    return StressLoss(Thresholds(warn=0.05, reduce=0.10, kill=0.20), scenarios, target_leverage=1.0)


def bs(right: str, spot: float, strike: float, vol: float) -> float:
    assert right in ("C", "P")
    return black_scholes("C" if right == "C" else "P", spot, strike, 0.25, vol).price


# ------------------------------------------------------------------------- linear


def test_linear_book_then_loss_is_value_times_move_and_graded() -> None:
    # long 500 at 100 (50,000), short 100 at 50 (-5,000): down 10 % loses 5,000 - 500 = 4,500
    book = book_with(pos(1, 500), tick(1, 100.0), pos(2, -100), tick(2, 50.0), nl="80000")

    losses = rule(DOWN10, UP10).losses(book, T).losses
    found = rule(DOWN10, UP10).evaluate(book, T)

    assert losses == pytest.approx({"down 10%": 4_500.0, "up 10%": -4_500.0})
    assert found.level == "warn" and found.subject == "down 10%"
    assert found.value == pytest.approx(4_500 / 80_000)


def test_reduce_breach_then_target_leverage_asked() -> None:
    book = book_with(pos(1, 1_200), tick(1, 100.0))  # 120,000: down 10 % loses 12 %

    found = rule(DOWN10).evaluate(book, T)

    assert found.level == "reduce" and found.target_leverage == 1.0
    assert found.value == pytest.approx(0.12)


@given(
    st.lists(
        st.tuples(
            st.floats(-1_000, 1_000, allow_nan=False).filter(lambda q: q != 0),
            st.floats(1.0, 500.0),
            st.sampled_from(["USD", "EUR"]),
        ),
        min_size=1,
        max_size=6,
    ),
    st.floats(-0.5, 0.5),
    st.floats(-0.3, 0.3),
)
def test_linear_book_then_loss_is_exactly_the_sum(
    positions: list[tuple[float, float, str]], move: float, eur_move: float
) -> None:
    events: list[BrokerEvent] = [av("ExchangeRate", "1.1", "EUR")]
    for i, (qty, price, ccy) in enumerate(positions, start=1):
        events += [pos(i, qty, currency=ccy), tick(i, price)]
    book = book_with(*events)
    scenario = Scenario("s", underlying_move=move, fx_moves={"EUR": eur_move})

    loss = rule(scenario).losses(book, T).losses["s"]

    expected = sum(
        q
        * p
        * (1.0 if c == "USD" else 1.1)
        * (1 - (1 + move) * (1 + (eur_move if c == "EUR" else 0)))
        for q, p, c in positions
    )
    assert loss == pytest.approx(expected, rel=1e-9, abs=1e-6)


def test_fx_move_then_cash_and_foreign_positions_revalued_pairs_not_counted_twice() -> None:
    # a USD account: 100,000 EUR cash (at 1.10) from a EUR.USD purchase, whose CASH position is
    # in that cash already, and a EUR stock worth 10,000 EUR
    book = book_with(
        av("ExchangeRate", "1.10", "EUR"),
        av("TotalCashBalance", "100000", "EUR"),
        av("TotalCashBalance", "-110000", "USD"),
        pos(1, 100_000, sec_type="CASH"),
        tick(1, 1.10),
        pos(2, 100, currency="EUR"),
        tick(2, 100.0),
        nl="1000000",
    )

    loss = rule(EUR_DOWN).losses(book, T).losses["EUR -5%"]

    assert loss == pytest.approx(100_000 * 1.10 * 0.05 + 10_000 * 1.10 * 0.05)


def test_fx_move_of_the_base_currency_then_nothing_moves() -> None:
    book = book_with(pos(1, 100), tick(1, 100.0))

    loss = rule(Scenario("USD", fx_moves={"USD": -0.5})).losses(book, T).losses["USD"]

    assert loss == 0.0


# ------------------------------------------------------------------------- options


def test_option_book_then_fully_revalued_by_black_scholes() -> None:
    # long 10 calls 100 strike, short 5 puts 95 strike, the underlying at 100, vols 30 % / 35 %
    book = book_with(
        option(1, 10, 100.0, "C"),
        computation(1, 0.30),
        option(2, -5, 95.0, "P"),
        computation(2, 0.35),
    )

    losses = rule(DOWN10, VOL_UP).losses(book, T).losses

    call_down = bs("C", 100, 100, 0.30) - bs("C", 90, 100, 0.30)
    put_down = bs("P", 100, 95, 0.35) - bs("P", 90, 95, 0.35)
    assert losses["down 10%"] == pytest.approx(1_000 * call_down - 500 * put_down)
    call_vol = bs("C", 100, 100, 0.30) - bs("C", 100, 100, 0.45)
    put_vol = bs("P", 100, 95, 0.35) - bs("P", 100, 95, 0.525)
    assert losses["vol +50%"] == pytest.approx(1_000 * call_vol - 500 * put_vol)
    assert losses["vol +50%"] < 0 < losses["down 10%"]  # short puts lose on the way down


def test_no_moves_then_an_option_book_loses_nothing() -> None:
    book = book_with(option(1, 10, 100.0, "C"), computation(1), pos(3, 50), tick(3, 100.0))

    assert rule(Scenario("none")).losses(book, T).losses["none"] == pytest.approx(0.0)


@given(
    st.floats(50.0, 150.0),
    st.floats(0.05, 1.5),
    st.floats(-0.99, 0.0),
    st.floats(-0.9, 3.0),
    st.integers(1, 50),
)
def test_long_call_down_move_then_loss_never_exceeds_premium(
    strike: float, vol: float, move: float, vol_move: float, qty: int
) -> None:
    book = book_with(option(1, qty, strike, "C"), computation(1, vol))
    scenario = Scenario("s", underlying_move=move, vol_move=vol_move)

    loss = rule(scenario).losses(book, T).losses["s"]

    premium = qty * 100 * bs("C", 100.0, strike, vol)
    assert loss <= premium + 1e-9


@pytest.mark.parametrize(
    ("event", "what"),
    [
        (computation(1, vol=math.nan), "no implied volatility"),
        (computation(1, spot=math.nan), "no underlying price"),
        (tick(1, 5.0), "no fresh option computation"),
    ],
)
def test_option_without_its_computation_then_data_never_zero(event: BrokerEvent, what: str) -> None:
    book = book_with(option(1, 10, 100.0, "C"), event)

    found = rule(DOWN10).evaluate(book, T)

    assert found.level == "data" and found.value is None
    assert what in found.message and "S1 100C option" in found.message


@pytest.mark.parametrize(
    ("terms", "what"),
    [
        ({"strike": math.nan, "right": "C", "expiry": EXPIRY}, "no strike"),
        ({"strike": 100.0, "right": "", "expiry": EXPIRY}, "no right"),
        ({"strike": 100.0, "right": "C", "expiry": math.nan}, "no expiry"),
    ],
)
def test_option_without_its_terms_then_data(terms: dict[str, object], what: str) -> None:
    event = pos(1, 10, sec_type="OPT", **terms)  # type: ignore[arg-type]
    book = book_with(event, computation(1))

    found = rule(DOWN10).evaluate(book, T)

    assert found.level == "data" and what in found.message


def test_stale_computation_then_data() -> None:
    book = book_with(option(1, 10, 100.0, "C"), computation(1))

    found = rule(DOWN10).evaluate(book, T + 31)

    assert found.level == "data" and "no fresh option computation" in found.message


def test_position_valued_by_the_portfolio_stream_then_judged_until_it_is_overdue() -> None:
    # 1,000 shares valued 100,000 by updatePortfolio at T, no line: down 10 % loses 10,000
    portfolio = PortfolioValue(
        account=ACC,
        con_id=ConId(1),
        position=1_000,
        market_price=100.0,
        market_value=100_000.0,
        ts=T,
    )
    book = book_with(pos(1, 1_000), portfolio)

    assert rule(DOWN10).losses(book, T + 120).losses == pytest.approx({"down 10%": 10_000.0})
    late = rule(DOWN10).evaluate(book, T + PORTFOLIO_MAX_AGE_S + 1)
    assert late.level == "data" and "no fresh value" in late.message


# ------------------------------------------------------------------------- other missing data


def test_missing_inputs_then_data() -> None:
    unvalued = book_with(pos(1, 100))
    no_rate = book_with(pos(1, 100, currency="EUR"), tick(1, 10.0))
    cash_no_rate = book_with(av("TotalCashBalance", "5000", "EUR"))
    unsynced = Book(ACC, "USD", created_at=T)

    assert "no fresh value of S1" in rule(DOWN10).evaluate(unvalued, T).message
    assert "no ExchangeRate for EUR" in rule(DOWN10).evaluate(no_rate, T).message
    assert rule(EUR_DOWN).evaluate(cash_no_rate, T).level == "data"
    assert rule(DOWN10).evaluate(unsynced, T).level == "data"
    assert rule(DOWN10).evaluate(book_with(nl="0"), T).level == "data"


# ------------------------------------------------------------------------- configuration


CONFIG = """
account = "DU1"
state_dir = "state"
[ib]
client_id = 7
[limits.stress]
warn = 0.05
reduce = 0.10
kill = 0.20
debounce = 3
target_leverage = 1.0
[[limits.stress.scenarios]]
name = "down 10%"
underlying_move = -0.10
[[limits.stress.scenarios]]
name = "2020-03-16"
underlying_move = -0.12
vol_move = 1.0
fx_moves = { EUR = -0.02 }
"""


def test_config_then_rule_built_and_debounced() -> None:
    cfg = parse_config(CONFIG)

    built = [r for r in build_rules(cfg).periodic if isinstance(r, StressLoss)]
    policy = build_policy(cfg)

    assert len(built) == 1 and built[0].target_leverage == 1.0
    assert [s.name for s in built[0].scenarios] == ["down 10%", "2020-03-16"]
    assert built[0].scenarios[1].fx_moves == {"EUR": -0.02}
    assert policy.debounce["stress_loss"] == 3


@pytest.mark.parametrize(
    "broken",
    [
        CONFIG.replace("target_leverage = 1.0\n", ""),
        CONFIG.replace('name = "2020-03-16"', 'name = "down 10%"'),
        CONFIG.split("[[limits.stress.scenarios]]")[0],
    ],
)
def test_config_without_target_or_scenarios_then_refused(broken: str) -> None:
    with pytest.raises(ConfigError):
        parse_config(broken)
