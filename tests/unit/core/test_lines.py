"""Market-data line choice: closing first, unvalued next, the largest exposures, few swaps."""

from __future__ import annotations

import math

from hypothesis import given
from hypothesis import strategies as st

from guardd.core.events import ConId
from guardd.core.lines import KEEP_RATIO, LineLimit, LineWant, choose_lines, line_rank


def want(con_id: int, exposure: float, closing: bool = False) -> LineWant:
    return LineWant(ConId(con_id), exposure, closing)


def test_more_positions_than_lines_then_the_largest_exposures_first() -> None:
    wants = [want(n, float(n * 100)) for n in range(1, 21)]
    assert choose_lines(wants, 5) == (20, 19, 18, 17, 16)


def test_short_position_then_ranked_by_absolute_exposure() -> None:
    assert choose_lines([want(1, 500.0), want(2, -900.0), want(3, 100.0)], 2) == (2, 1)


def test_closing_contract_then_a_line_even_when_smallest() -> None:
    wants = [want(n, float(n * 100)) for n in range(1, 21)] + [want(1, 100.0, closing=True)]
    chosen = choose_lines(wants, 5)
    assert chosen[0] == 1
    assert chosen[1:] == (20, 19, 18, 17)


def test_unvalued_position_then_before_every_valued_one() -> None:
    chosen = choose_lines([want(1, 1e9), want(2, math.nan), want(3, 5.0)], 2)
    assert chosen == (2, 1)


def test_refused_contract_then_left_out_until_its_retry_time() -> None:
    wants = [want(1, 300.0), want(2, 200.0), want(3, 100.0)]
    assert choose_lines(wants, 2, refused={ConId(1): 50.0}, now=10.0) == (2, 3)
    assert choose_lines(wants, 2, refused={ConId(1): 50.0}, now=50.0) == (1, 2)


def test_held_line_then_kept_against_a_slightly_larger_newcomer() -> None:
    wants = [want(1, 1000.0), want(2, 110.0), want(3, 100.0)]
    assert choose_lines(wants, 2, held=[ConId(1), ConId(3)]) == (1, 3)


def test_held_line_then_given_up_to_a_much_larger_newcomer() -> None:
    wants = [want(1, 1000.0), want(2, 200.0), want(3, 100.0)]
    assert choose_lines(wants, 2, held=[ConId(1), ConId(3)]) == (1, 2)


def test_zero_limit_then_no_line_but_for_a_close() -> None:
    assert choose_lines([want(1, 1.0)], 0) == ()
    assert choose_lines([want(1, 1.0, closing=True)], 0) == (1,)


def test_more_closing_contracts_than_the_limit_then_each_gets_a_line() -> None:
    wants = [want(n, float(n), closing=True) for n in range(1, 11)] + [want(99, 1e9)]
    assert set(choose_lines(wants, 5)) == set(range(1, 11))


def test_ib_granted_fewer_then_closing_contracts_held_to_it_largest_first() -> None:
    wants = [want(n, float(n), closing=True) for n in range(1, 11)] + [want(99, 1e9)]
    assert choose_lines(wants, 3, closing_limit=3) == (10, 9, 8)


def test_refusal_then_limit_lowered_to_what_ib_granted_until_retry() -> None:
    limit = LineLimit(90).refused(granted=60, now=100.0, retry_s=30.0)
    assert limit.at(100.0) == 60
    assert limit.at(129.9) == 60
    assert limit.at(130.0) == 90
    again = limit.refused(granted=70, now=110.0, retry_s=30.0)
    assert again.at(110.0) == 60  # never above the lowest seen while it holds
    assert again.granted(110.0) == 60
    assert again.granted(140.0) is None


wants_st = st.lists(
    st.builds(
        LineWant,
        st.integers(1, 40).map(ConId),
        st.one_of(st.floats(-1e6, 1e6, allow_nan=False), st.just(math.nan)),
        st.booleans(),
    ),
    max_size=40,
)


@given(
    wants_st,
    st.integers(0, 20),
    st.one_of(st.none(), st.integers(0, 20)),
    st.sets(st.integers(1, 40)),
)
def test_any_wants_then_within_limits_unique_and_every_close_first(
    wants: list[LineWant], limit: int, closing_limit: int | None, held: set[int]
) -> None:
    chosen = choose_lines(wants, limit, closing_limit=closing_limit, held=[ConId(c) for c in held])
    assert len(set(chosen)) == len(chosen)
    assert set(chosen) <= {w.con_id for w in wants}
    closing = {w.con_id for w in wants if w.closing}
    bound = len(closing) if closing_limit is None else min(len(closing), closing_limit)
    assert len(set(chosen) & closing) == bound
    others = {w.con_id for w in wants} - closing
    assert len(chosen) == bound + min(max(0, limit - bound), len(others))


@given(wants_st, st.integers(1, 20))
def test_nothing_held_then_exactly_the_top_ranked(wants: list[LineWant], limit: int) -> None:
    best: dict[ConId, LineWant] = {}
    for w in wants:
        if w.con_id not in best or line_rank(w) < line_rank(best[w.con_id]):
            best[w.con_id] = w
    ranked = sorted(best.values(), key=line_rank)
    closing = [w.con_id for w in ranked if w.closing]
    others = [w.con_id for w in ranked if not w.closing]
    top = tuple(closing + others[: max(0, limit - len(closing))])
    assert choose_lines(wants, limit) == top


@given(wants_st, st.integers(1, 20), st.sets(st.integers(1, 40)))
def test_chosen_then_choosing_again_with_those_held_changes_nothing(
    wants: list[LineWant], limit: int, held: set[int]
) -> None:
    first = choose_lines(wants, limit, held=[ConId(c) for c in held])
    assert choose_lines(wants, limit, held=first) == first


@given(wants_st, st.integers(1, 20), st.sets(st.integers(1, 40)))
def test_left_out_position_then_never_much_larger_than_a_chosen_one(
    wants: list[LineWant], limit: int, held: set[int]
) -> None:
    chosen = set(choose_lines(wants, limit, held=[ConId(c) for c in held]))
    best: dict[ConId, LineWant] = {}
    for w in wants:
        if w.con_id not in best or line_rank(w) < line_rank(best[w.con_id]):
            best[w.con_id] = w
    valued_in = [abs(w.exposure) for c, w in best.items() if c in chosen and line_rank(w)[0] == 2]
    valued_out = [abs(w.exposure) for c, w in best.items() if c not in chosen]
    if valued_in and valued_out:
        assert max(valued_out) <= KEEP_RATIO * min(valued_in)
