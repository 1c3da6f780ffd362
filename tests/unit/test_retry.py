"""The one retry policy (guardd.retry): capped exponential back-off with jitter."""

from __future__ import annotations

import asyncio

import pytest
from hypothesis import given
from hypothesis import strategies as st

from guardd.retry import Backoff, RetryPolicy

policies = st.builds(
    RetryPolicy,
    initial_s=st.floats(0.001, 10.0),
    max_s=st.floats(10.0, 600.0),
    jitter=st.floats(0.0, 1.0),
    factor=st.floats(1.0, 16.0),
)
draws = st.floats(0.0, 1.0, exclude_max=True)


def test_failed_tries_then_delays_double_up_to_the_cap() -> None:
    # Arrange: no jitter drawn
    backoff = Backoff(RetryPolicy(0.5, 10.0), draw=lambda: 0.0)

    # Act
    delays = [backoff.next() for _ in range(7)]

    # Assert
    assert delays == [0.5, 1.0, 2.0, 4.0, 8.0, 10.0, 10.0]


def test_success_then_the_next_failure_waits_the_first_delay_again() -> None:
    backoff = Backoff(RetryPolicy(0.5, 10.0), draw=lambda: 0.0)
    for _ in range(4):
        backoff.next()

    backoff.reset()

    assert backoff.next() == 0.5


@given(policies, st.integers(1, 10_000))
def test_any_attempt_then_steps_never_shrink_and_never_pass_the_cap(
    policy: RetryPolicy, attempt: int
) -> None:
    assert policy.initial_s <= policy.step(attempt) <= policy.step(attempt + 1) <= policy.max_s


@given(policies, st.integers(1, 10_000), draws)
def test_any_draw_then_jitter_takes_at_most_its_fraction_off(
    policy: RetryPolicy, attempt: int, draw: float
) -> None:
    step = policy.step(attempt)

    delay = policy.delay(attempt, draw)

    assert step * (1 - policy.jitter) - 1e-9 <= delay <= step


def test_jitter_then_guards_that_failed_together_wait_different_delays() -> None:
    policy = RetryPolicy(1.0, 30.0, jitter=0.5)

    delays = {Backoff(policy).next() for _ in range(20)}

    assert len(delays) > 1
    assert all(0.5 <= d <= 1.0 for d in delays)


@pytest.mark.parametrize(
    ("initial_s", "max_s", "jitter", "factor"),
    [(0.0, 1.0, 0.2, 2.0), (2.0, 1.0, 0.2, 2.0), (1.0, 2.0, 1.5, 2.0), (1.0, 2.0, 0.2, 0.5)],
)
def test_policy_out_of_range_then_refused(
    initial_s: float, max_s: float, jitter: float, factor: float
) -> None:
    with pytest.raises(ValueError):
        RetryPolicy(initial_s, max_s, jitter, factor)


async def test_shutdown_during_a_long_back_off_then_the_retry_loop_ends_at_once() -> None:
    # Arrange: a retry loop whose next try is an hour away
    backoff = Backoff(RetryPolicy(3600.0, 3600.0))
    waiting = asyncio.Event()

    async def retry_loop() -> None:
        while True:
            waiting.set()
            await backoff.sleep()

    task = asyncio.create_task(retry_loop(), name="retry_loop")
    await waiting.wait()

    # Act: shutdown cancels the task
    task.cancel()

    # Assert: it ends without waiting out the delay (the test's timeout would catch that)
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, timeout=5.0)
    assert backoff.attempts == 1
