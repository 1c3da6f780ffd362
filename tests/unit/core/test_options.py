"""Black-Scholes prices and greeks (guardd.core.options): textbook values and properties."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from guardd.core.options import black_scholes, implied_vol, intrinsic_value

spots = st.floats(min_value=1.0, max_value=1_000.0)
moneyness = st.floats(min_value=0.5, max_value=2.0)
years = st.floats(min_value=1 / 365, max_value=3.0)
vols = st.floats(min_value=0.05, max_value=2.0)
rates = st.floats(min_value=0.0, max_value=0.1)
rights = st.sampled_from(["C", "P"])


def test_at_the_money_one_year_then_the_textbook_values() -> None:
    # Hull's example: S = K = 100, T = 1, sigma = 20 %, r = 5 %
    call = black_scholes("C", 100.0, 100.0, 1.0, 0.2, 0.05)
    put = black_scholes("P", 100.0, 100.0, 1.0, 0.2, 0.05)

    assert call.price == pytest.approx(10.4506, abs=1e-4)
    assert put.price == pytest.approx(5.5735, abs=1e-4)
    assert call.delta == pytest.approx(0.6368, abs=1e-4)
    assert put.delta == pytest.approx(-0.3632, abs=1e-4)
    assert call.gamma == pytest.approx(0.018762, abs=1e-6)
    assert call.vega == pytest.approx(0.37524, abs=1e-5)  # per volatility point
    assert call.theta == pytest.approx(-6.4140 / 365, abs=1e-5)  # per calendar day
    assert put.theta == pytest.approx(-1.6579 / 365, abs=1e-5)


def test_at_expiry_then_intrinsic_value_and_no_time_greeks() -> None:
    itm_call = black_scholes("C", 110.0, 100.0, 0.0, 0.3)
    otm_put = black_scholes("P", 110.0, 100.0, 0.0, 0.3)

    assert (itm_call.price, itm_call.delta, itm_call.gamma) == (10.0, 1.0, 0.0)
    assert (otm_put.price, otm_put.delta, otm_put.vega) == (0.0, 0.0, 0.0)
    assert intrinsic_value("P", 90.0, 100.0) == 10.0


@pytest.mark.parametrize(
    ("spot", "strike", "t", "vol"),
    [(0.0, 100.0, 1.0, 0.2), (100.0, 100.0, -1.0, 0.2), (100.0, 100.0, 1.0, math.nan)],
)
def test_bad_inputs_then_value_error(spot: float, strike: float, t: float, vol: float) -> None:
    with pytest.raises(ValueError):
        black_scholes("C", spot, strike, t, vol)


@given(rights, spots, moneyness, years, vols, rates)
def test_any_option_then_price_within_no_arbitrage_bounds(
    right: str, spot: float, m: float, t: float, vol: float, rate: float
) -> None:
    strike = spot * m
    value = black_scholes(right, spot, strike, t, vol, rate)  # type: ignore[arg-type]

    discounted = strike * math.exp(-rate * t)
    lower = max(0.0, spot - discounted) if right == "C" else max(0.0, discounted - spot)
    upper = spot if right == "C" else discounted
    assert lower - 1e-9 <= value.price <= upper + 1e-9
    assert (0.0 <= value.delta <= 1.0) if right == "C" else (-1.0 <= value.delta <= 0.0)
    assert value.gamma >= 0.0 and value.vega >= 0.0


@given(spots, moneyness, years, vols, rates)
def test_call_and_put_then_put_call_parity(
    spot: float, m: float, t: float, vol: float, rate: float
) -> None:
    strike = spot * m
    call = black_scholes("C", spot, strike, t, vol, rate)
    put = black_scholes("P", spot, strike, t, vol, rate)

    assert call.price - put.price == pytest.approx(
        spot - strike * math.exp(-rate * t), abs=1e-9 * spot
    )
    assert call.delta - put.delta == pytest.approx(1.0)


@given(rights, spots, st.floats(min_value=0.8, max_value=1.25), years, vols)
def test_model_price_then_implied_vol_gives_the_vol_back(
    right: str, spot: float, m: float, t: float, vol: float
) -> None:
    value = black_scholes(right, spot, spot * m, t, vol)  # type: ignore[arg-type]
    # a price too close to its bound carries no information about the volatility
    if value.vega * 100 < 1e-6 * spot:
        return

    found = implied_vol(right, value.price, spot, spot * m, t)  # type: ignore[arg-type]

    assert found == pytest.approx(vol, rel=1e-5)


def test_price_under_intrinsic_or_at_expiry_then_no_implied_vol() -> None:
    assert implied_vol("C", 5.0, 110.0, 100.0, 0.5) is None
    assert implied_vol("C", 10.0, 110.0, 100.0, 0.0) is None
    assert implied_vol("P", 0.0, 110.0, 100.0, 0.5) is None


@given(rights, spots, moneyness, years, vols)
def test_the_simulated_gateway_s_own_pricing_then_agrees_with_the_guard_s(
    right: str, spot: float, ratio: float, t: float, vol: float
) -> None:
    # ibsim/options.py is written apart from guardd/core/options.py (the gateway plays IB's own
    # model): with no rate both must give the same price, greeks and implied volatility.
    from ibsim import options as gateway

    strike = spot * ratio
    ours = black_scholes(right, spot, strike, t, vol)  # type: ignore[arg-type]
    ib = gateway.black_scholes(right, spot, strike, t, vol)  # type: ignore[arg-type]
    for field in ("price", "delta", "gamma", "vega", "theta"):
        assert getattr(ib, field) == pytest.approx(getattr(ours, field), rel=1e-7, abs=1e-9)
    back = gateway.implied_vol(right, ours.price, spot, strike, t)  # type: ignore[arg-type]
    if ours.price > intrinsic_value(right, spot, strike) + 1e-6 * spot:  # type: ignore[arg-type]
        assert back == pytest.approx(implied_vol(right, ours.price, spot, strike, t), rel=1e-6)  # type: ignore[arg-type]
