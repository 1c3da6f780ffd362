"""The refusal ledger: the first of each kind per interval kept in full, every refusal counted."""

from __future__ import annotations

from collections import Counter

from hypothesis import given, settings
from hypothesis import strategies as st

from guardd.control.refusals import MAX_KINDS, OTHER_KIND, RefusalLedger, refusal_kind


def test_flood_of_one_kind_then_first_kept_rest_summed_at_interval_end() -> None:
    ledger = RefusalLedger(interval_s=10.0)

    kept = [ledger.note("mqtt:AuthError", 100.0 + n * 0.001) for n in range(5000)]
    early = ledger.flush(105.0)
    summary = ledger.flush(110.0)

    assert kept.count(True) == 1 and kept[0]
    assert early is None
    assert summary is not None
    assert summary.counts == {"mqtt:AuthError": 4999}
    assert (summary.since, summary.until) == (100.0, 110.0)
    assert ledger.total == 5000


def test_new_interval_then_first_of_each_kind_kept_again() -> None:
    ledger = RefusalLedger(interval_s=1.0)
    ledger.note("mqtt:AuthError", 0.0)
    ledger.flush(2.0)

    assert ledger.note("mqtt:AuthError", 3.0)
    assert ledger.note("http:AuthError", 3.0)
    assert not ledger.note("http:AuthError", 3.1)


def test_only_kept_refusals_then_no_summary() -> None:
    ledger = RefusalLedger(interval_s=1.0)
    ledger.note(refusal_kind("mqtt", "CommandError"), 0.0)

    assert ledger.flush(5.0) is None


def test_unkept_then_counted_in_next_summary() -> None:
    ledger = RefusalLedger(interval_s=1.0)
    assert ledger.note("mqtt:AuthError", 0.0)

    ledger.unkept("mqtt:AuthError", 0.0)  # the journal failed to take it
    summary = ledger.flush(1.0)

    assert summary is not None and summary.counts == {"mqtt:AuthError": 1}


def test_carried_summary_then_counted_again_next_flush() -> None:
    ledger = RefusalLedger(interval_s=1.0)
    ledger.note("a", 0.0)
    ledger.note("a", 0.5)
    first = ledger.flush(1.0)
    assert first is not None

    ledger.carry(first)  # could not be journaled
    again = ledger.flush(1.25)

    assert again is not None and again.counts == {"a": 1} and again.since == 0.0


def test_many_kinds_then_bounded_by_other() -> None:
    ledger = RefusalLedger(interval_s=1.0)
    for n in range(MAX_KINDS + 50):
        ledger.note(f"mqtt:Error{n}", 0.0)

    assert len(ledger.totals) == MAX_KINDS + 1
    assert ledger.totals[OTHER_KIND] == 50
    assert ledger.total == MAX_KINDS + 50


steps = st.lists(
    st.tuples(
        st.sampled_from(["mqtt:AuthError", "mqtt:CommandError", "http:AuthError", "flush"]),
        st.floats(min_value=0.0, max_value=3.0),
        st.booleans(),  # for a kept refusal: could it be journaled?
    ),
    max_size=200,
)


@settings(max_examples=200, deadline=None)
@given(steps=steps, interval=st.floats(min_value=0.1, max_value=5.0))
def test_any_sequence_then_kept_plus_summed_equals_refusals(
    steps: list[tuple[str, float, bool]], interval: float
) -> None:
    ledger = RefusalLedger(interval_s=interval)
    now = 0.0
    refused: Counter[str] = Counter()
    kept: Counter[str] = Counter()
    summed: Counter[str] = Counter()
    kept_this_interval: set[str] = set()
    since: float | None = None  # the model's interval: from its first refusal
    for kind, dt, journaled in steps:
        now += dt
        if kind == "flush":
            summary = ledger.flush(now)
            if since is not None and now - since >= interval:
                kept_this_interval, since = set(), None
            if summary is not None:
                summed.update(summary.counts)
            continue
        since = now if since is None else since
        refused[kind] += 1
        if ledger.note(kind, now):
            assert kind not in kept_this_interval  # at most one in full per kind and interval
            kept_this_interval.add(kind)
            if journaled:
                kept[kind] += 1
            else:
                ledger.unkept(kind, now)
    final = ledger.flush(now, force=True)
    if final is not None:
        summed.update(final.counts)

    assert kept + summed == refused
    assert ledger.totals == refused
