"""The simulated market's price process: determinism, tick grid, jumps and volatility scale."""

import itertools
import math
import statistics

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ibsim.market import SESSION_SECONDS, PriceProcess


def _process(seed: int = 1, **overrides: float) -> PriceProcess:
    params = {"volatility": 0.02, "spread": 0.02, "min_tick": 0.01}
    params.update(overrides)
    return PriceProcess(100.0, seed=seed, **params)


def _path(process: PriceProcess, steps: int, dt: float = 1.0) -> list[tuple[float, ...]]:
    out: list[tuple[float, ...]] = []
    for _ in range(steps):
        process.step(dt)
        q = process.quote()
        out.append((q.bid, q.ask, q.last, q.bid_size, q.ask_size, q.last_size))
    return out


def test_same_seed_then_same_prices_and_sizes() -> None:
    assert _path(_process(seed=7), 200) == _path(_process(seed=7), 200)


def test_other_seed_then_other_prices() -> None:
    assert _path(_process(seed=7), 50) != _path(_process(seed=8), 50)


@given(
    seed=st.integers(0, 2**32),
    tick=st.sampled_from([0.01, 0.05, 0.25, 1.0]),
    spread=st.floats(0.0, 3.0),
    vol=st.floats(0.0, 0.5),
)
def test_any_walk_then_prices_on_tick_positive_and_ordered(
    seed: int, tick: float, spread: float, vol: float
) -> None:
    process = PriceProcess(5.0, volatility=vol, spread=spread, min_tick=tick, seed=seed)
    for _ in range(30):
        process.step(SESSION_SECONDS)
        bid, ask, last = process.bid, process.ask, process.last
        for price in (bid, ask, last):
            assert price >= tick
            assert math.isclose(price / tick, round(price / tick), abs_tol=1e-6)
        assert bid <= last <= ask
        if spread > 0:
            assert bid < ask


def test_spread_then_bid_and_ask_half_spread_around_last() -> None:
    process = _process(spread=0.04)
    assert (process.bid, process.last, process.ask) == (99.98, 100.0, 100.02)


def test_spread_of_one_tick_on_coarse_grid_then_rounded_outward() -> None:
    process = PriceProcess(5000.0, volatility=0.0, spread=0.25, min_tick=0.25, seed=1)
    assert (process.bid, process.ask) == (4999.75, 5000.25)


def test_jump_of_minus_ten_percent_then_price_ten_percent_lower() -> None:
    process = _process()
    process.jump(-0.1)
    assert process.last == 90.0


def test_jump_that_would_leave_no_price_then_value_error() -> None:
    with pytest.raises(ValueError):
        _process().jump(-1.0)


def test_zero_volatility_then_price_stays() -> None:
    process = _process()
    process.set_volatility(0.0)
    _path(process, 100, dt=600.0)
    assert process.last == 100.0


def test_no_time_passed_then_nothing_moves() -> None:
    process = _process()
    before = process.quote()
    process.step(0.0)
    assert process.quote() == before


def test_session_steps_then_log_return_deviation_near_daily_volatility() -> None:
    process = PriceProcess(1000.0, volatility=0.03, spread=0.0, min_tick=0.0001, seed=3)
    prices = [process.last]
    for _ in range(2000):
        process.step(SESSION_SECONDS)
        prices.append(process.last)
    returns = [math.log(b / a) for a, b in itertools.pairwise(prices)]
    assert statistics.stdev(returns) == pytest.approx(0.03, rel=0.1)


def test_quarter_session_steps_then_deviation_scales_with_square_root_of_time() -> None:
    process = PriceProcess(1000.0, volatility=0.04, spread=0.0, min_tick=0.0001, seed=5)
    prices = [process.last]
    for _ in range(2000):
        process.step(SESSION_SECONDS / 4)
        prices.append(process.last)
    returns = [math.log(b / a) for a, b in itertools.pairwise(prices)]
    assert statistics.stdev(returns) == pytest.approx(0.02, rel=0.1)
