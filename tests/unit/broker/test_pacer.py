"""The message budget, the lane queue and the paced sender."""

from __future__ import annotations

import asyncio
import bisect
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from guardd.broker.pacer import (
    DEFAULT_BURST,
    Lane,
    LaneQueue,
    MessageBudget,
    PacedSender,
)
from guardd.config import BudgetConfig
from guardd.errors import BrokerDisconnectedError


def most_in_any_window(times: list[float], window: float) -> int:
    """The largest number of `times` inside any half-open interval [t, t + window)."""
    ordered = sorted(times)
    # A densest window can always start at a send time.
    return max(
        (bisect.bisect_left(ordered, t + window) - i for i, t in enumerate(ordered)), default=0
    )


def drive(budget: MessageBudget, attempts: list[float]) -> list[float]:
    """Ask the budget at each attempt time (sorted); return the times it granted."""
    granted = []
    for now in sorted(attempts):
        if budget.try_take(now):
            granted.append(now)
    return granted


def test_fresh_budget_then_burst_then_spaced_by_rate() -> None:
    budget = MessageBudget(40, burst=2, now=0.0)

    assert budget.try_take(0.0) and budget.try_take(0.0)
    assert not budget.try_take(0.0)
    assert budget.delay(0.0) == pytest.approx(1 / 40)
    assert budget.try_take(1 / 40)


def test_window_full_then_delay_until_oldest_leaves() -> None:
    budget = MessageBudget(3, window=1.0, burst=3, now=0.0)
    for t in (0.0, 0.1, 0.2):
        assert budget.try_take(t)

    # The bucket has refilled by 0.5 s, but three sends already fall in [0.0, 1.0).
    assert budget.delay(0.5) == pytest.approx(0.5)
    assert not budget.try_take(0.99)
    assert budget.try_take(1.0)


@pytest.mark.parametrize(("budget", "burst", "window"), [(0, 1, 1.0), (5, 6, 1.0), (5, 1, 0.0)])
def test_bad_budget_then_value_error(budget: int, burst: int, window: float) -> None:
    with pytest.raises(ValueError):
        MessageBudget(budget, window=window, burst=burst, now=0.0)


@settings(max_examples=200, deadline=None)
@given(
    budget=st.integers(1, 50),
    burst_fraction=st.floats(0.0, 1.0),
    attempts=st.lists(st.floats(0.0, 5.0, allow_nan=False), max_size=400),
    regular=st.booleans(),
)
def test_any_request_pattern_then_never_more_than_budget_per_window(
    budget: int, burst_fraction: float, attempts: list[float], regular: bool
) -> None:
    burst = max(1, round(budget * burst_fraction))
    if regular:  # evenly spaced requests hit the window boundaries exactly
        attempts = [i / (2 * budget) for i in range(6 * budget)]
    pacer = MessageBudget(budget, window=1.0, burst=burst, now=0.0)

    granted = drive(pacer, attempts)

    assert most_in_any_window(granted, 1.0) <= budget


@settings(max_examples=100, deadline=None)
@given(budget=st.integers(1, 50), burst=st.integers(1, 50))
def test_asking_whenever_due_then_full_rate_and_still_within_budget(
    budget: int, burst: int
) -> None:
    burst = min(burst, budget)
    pacer = MessageBudget(budget, window=1.0, burst=burst, now=0.0)
    now, granted = 0.0, []
    while now < 5.0:
        now = pacer.due(now)
        assert pacer.try_take(now)  # due is exact: no epsilon left to wait for
        granted.append(now)

    assert most_in_any_window(granted, 1.0) <= budget
    assert len(granted) >= 5 * budget - 1  # the budget is actually used, not wasted


IB_MESSAGES_PER_SECOND = 50  # IB's default limit per API client, as the simulated gateway counts


@settings(max_examples=300, deadline=None)
@given(
    budget=st.integers(1, 49),
    reserve_fraction=st.floats(0.0, 1.0),
    burst=st.integers(1, 10),
    requests=st.lists(
        st.tuples(
            st.sampled_from(list(Lane)),
            st.floats(0.0, 0.2),  # gap before the request is made, seconds
            st.floats(0.0, 0.2),  # how late the sender wakes for it, seconds
        ),
        max_size=300,
    ),
)
def test_sender_budgets_with_burst_and_late_wakeups_then_never_over_ibs_limit_in_any_second(
    budget: int,
    reserve_fraction: float,
    burst: int,
    requests: list[tuple[Lane, float, float]],
) -> None:
    # Arrange: the two budgets as PacedSender composes them (every message takes from the full
    # budget; NORMAL also from budget - kill_reserve), with a burst, at any valid budget
    reserve = min(budget - 1, round(budget * reserve_fraction))
    BudgetConfig(messages_per_second=budget, kill_reserve=reserve)  # a budget the config takes
    full = MessageBudget(budget, burst=min(burst, budget), now=0.0)
    normal = MessageBudget(budget - reserve, burst=min(burst, budget - reserve), now=0.0)

    # Act: each message is sent when its budgets allow (a kill-lane message keeps only the
    # window cap, ahead of the spacing, as the sender writes it), plus the late wake-up
    now, sent, sent_normal = 0.0, [], []
    for lane, gap, late in requests:
        now += gap
        kill = lane is Lane.KILL
        take = full.try_take_unspaced if kill else full.try_take
        while True:
            due = full.window_due(now) if kill else full.due(now)
            if lane is Lane.NORMAL:
                due = max(due, normal.due(now))
            if due > now:
                now = due + late
            if (lane is not Lane.NORMAL or normal.due(now) <= now) and take(now):
                if lane is Lane.NORMAL:
                    assert normal.try_take(now)
                    sent_normal.append(now)
                sent.append(now)
                break

    # Assert: never more than the budget (and so never IB's 50) in any 1 s window, and NORMAL
    # never more than its share, whatever the burst and the lateness
    assert most_in_any_window(sent, 1.0) <= budget < IB_MESSAGES_PER_SECOND
    assert most_in_any_window(sent_normal, 1.0) <= budget - reserve


@settings(max_examples=100, deadline=None)
@given(
    budget=st.integers(10, 49),
    lateness=st.lists(st.floats(0.0, 1.0), min_size=1, max_size=50),
)
def test_late_wakeups_within_the_burst_then_budget_spent_in_full(
    budget: int, lateness: list[float]
) -> None:
    # Arrange: a sender that always has work and wakes late for every token, by up to the
    # time the burst covers ((DEFAULT_BURST - 1) intervals) minus a little
    interval = 1.0 / budget
    cover = (DEFAULT_BURST - 1) * interval * 0.9
    pacer = MessageBudget(budget, burst=DEFAULT_BURST, now=0.0)

    # Act: 20 s of sends; whenever the sender has to sleep for a token it wakes that late
    now, sent = 0.0, []
    while now < 20.0:
        due = pacer.due(now)
        if due > now:
            now = due + lateness[len(sent) % len(lateness)] * cover
        assert pacer.try_take(now)
        sent.append(now)

    # Assert: the late wake-ups cost at most one wake-up per window, not one per send: at least
    # budget / (1 s + the longest delay) a second (with one token a second bucket it fell to
    # 1 / (interval + delay): 38 instead of 40 at 1 ms late)
    rate = len(sent) / sent[-1]
    assert rate >= budget / (1.0 + cover) - 1 / 20
    assert most_in_any_window(sent, 1.0) <= budget


def test_one_token_bucket_and_late_wakeups_then_budget_lost() -> None:
    # Arrange: why the sender's bucket holds more than one token
    pacer = MessageBudget(40, burst=1, now=0.0)

    # Act: 10 s of sends; the sender wakes 2 ms late whenever it sleeps for a token
    now, sent = 0.0, 0
    while now < 10.0:
        due = pacer.due(now)
        if due > now:
            now = due + 0.002
        assert pacer.try_take(now)
        sent += 1

    # Assert: every late wake-up is lost: 1 / (25 ms + 2 ms) = 37 a second, not 40
    assert sent / now < 37.5


@given(
    before=st.lists(st.sampled_from([Lane.NORMAL, Lane.FLATTEN]), max_size=60),
    popped=st.integers(0, 60),
)
def test_kill_behind_other_messages_then_popped_next(before: list[Lane], popped: int) -> None:
    queue: LaneQueue[str] = LaneQueue()
    for i, lane in enumerate(before):
        queue.push(lane, f"{lane.name}-{i}")
    for _ in range(min(popped, len(before))):
        queue.pop()

    queue.push(Lane.KILL, "kill")

    assert queue.pop() == "kill"


def test_lanes_then_priority_order_and_fifo_within_a_lane() -> None:
    queue: LaneQueue[str] = LaneQueue()
    for item, lane in [
        ("n1", Lane.NORMAL),
        ("f1", Lane.FLATTEN),
        ("c1", Lane.CLOSE_DATA),
        ("n2", Lane.NORMAL),
        ("k1", Lane.KILL),
        ("f2", Lane.FLATTEN),
        ("k2", Lane.KILL),
    ]:
        queue.push(lane, item)

    assert queue.first_lane() is Lane.KILL
    popped = [queue.pop() for _ in range(len(queue))]
    assert popped == ["k1", "k2", "f1", "f2", "c1", "n1", "n2"]
    assert queue.first_lane() is None
    with pytest.raises(IndexError):
        queue.pop()


async def test_sender_then_paced_at_budget_in_priority_order() -> None:
    sent: list[tuple[str, float]] = []
    async with PacedSender(100, clock=time.monotonic) as sender:

        def message(label: str) -> asyncio.Future[None]:
            return sender.submit(
                Lane.NORMAL if label.startswith("n") else Lane.KILL,
                label,
                lambda: sent.append((label, time.monotonic())),
            )

        normals = [message(f"n{i}") for i in range(30)]
        await asyncio.sleep(0.055)  # a few have gone out
        kill = message("kill")
        await kill
        await asyncio.gather(*normals)

    labels = [label for label, _ in sent]
    assert len(labels) == 31
    at = labels.index("kill")
    # Sent on the next token, ahead of the ~20 normal messages still queued (the first
    # DEFAULT_BURST normals went at once, then about 5 more in the 55 ms)
    assert 0 < at <= 7 + DEFAULT_BURST
    assert labels[:at] == [f"n{i}" for i in range(at)]
    times = [t for _, t in sent]
    assert most_in_any_window(times, 1.0) <= 100
    # Spaced by the token rate (1/100 s) after the first burst, with a little slack for timer
    # granularity.
    assert times[-1] - times[0] >= (31 - DEFAULT_BURST) * 0.01 * 0.9


async def test_sender_idle_then_message_sent_at_once() -> None:
    sent: list[float] = []
    async with PacedSender(40) as sender:
        await asyncio.sleep(0.05)  # the task is waiting for work
        started = time.monotonic()
        await sender.submit(Lane.KILL, "reqGlobalCancel", lambda: sent.append(time.monotonic()))

    assert len(sent) == 1 and sent[0] - started < 0.02
    assert sender.sent_by_lane[Lane.KILL] == 1


async def test_send_raises_then_future_fails_and_sender_goes_on() -> None:
    def broken() -> None:
        raise BrokerDisconnectedError("socket gone")

    sent: list[str] = []
    async with PacedSender(200) as sender:
        failing = sender.submit(Lane.NORMAL, "broken", broken)
        fine = sender.submit(Lane.NORMAL, "fine", lambda: sent.append("fine"))
        with pytest.raises(BrokerDisconnectedError):
            await failing
        await fine

    assert sent == ["fine"]


async def test_stop_with_queued_messages_then_they_fail_disconnected() -> None:
    sender = PacedSender(1)
    sender.start()
    first = sender.submit(Lane.NORMAL, "first", lambda: None)
    second = sender.submit(Lane.NORMAL, "second", lambda: None)
    await first  # the one token of this second

    await sender.stop()

    with pytest.raises(BrokerDisconnectedError):
        await second
    assert sender.depth(Lane.NORMAL) == 0


async def test_normal_flood_then_never_more_than_budget_less_kill_reserve_per_window() -> None:
    # Arrange: 200 a second, 150 of them kept for the kill path: NORMAL gets 50
    sent: list[float] = []
    async with PacedSender(200, kill_reserve=150) as sender:
        # Act: 60 subscriptions at once (more than NORMAL's share of one window)
        await asyncio.gather(
            *(
                sender.submit(Lane.NORMAL, f"n{i}", lambda: sent.append(time.monotonic()))
                for i in range(60)
            )
        )

    # Assert: never more than 50 in any window (without the reserve: 60 in 0.3 s)
    assert len(sent) == 60
    assert most_in_any_window(sent, 1.0) <= 50


async def test_normal_spent_its_share_then_kill_and_close_prices_go_first_at_full_rate() -> None:
    # Arrange: NORMAL has its 20 a second queued up far beyond its share
    order: list[str] = []
    async with PacedSender(100, kill_reserve=80) as sender:

        def submit(lane: Lane, label: str) -> asyncio.Future[None]:
            return sender.submit(lane, label, lambda: order.append(label))

        normals = [submit(Lane.NORMAL, f"n{i}") for i in range(40)]
        await asyncio.sleep(0.3)  # the sender now waits on NORMAL's share
        mark = len(order)

        # Act: a close needs 30 prices, and a kill comes in
        prices = [submit(Lane.CLOSE_DATA, f"p{i}") for i in range(30)]
        kill = submit(Lane.KILL, "kill")
        await asyncio.gather(kill, *prices)
        before_last_price = order[mark:]
        for n in normals:
            n.cancel()

    # Assert: the kill, then every price, and no NORMAL message in between: the prices were
    # paced at the full budget, not held to NORMAL's 20 a second
    assert before_last_price[0] == "kill"
    assert before_last_price[1:] == [f"p{i}" for i in range(30)]
    assert sender.kill_reserve == 80


def test_kill_reserve_not_below_budget_then_value_error() -> None:
    with pytest.raises(ValueError, match="kill_reserve"):
        PacedSender(10, kill_reserve=10)


def test_spaced_send_then_unspaced_take_at_once_and_next_spaced_after_it() -> None:
    budget = MessageBudget(40, burst=1, now=0.0)
    assert budget.try_take(0.0)

    # A spaced message would wait 1/40 s; the kill lane's take does not.
    assert not budget.try_take(0.001)
    assert budget.try_take_unspaced(0.001)

    # The next spaced message is spaced from both.
    assert budget.due(0.001) == pytest.approx(2 / 40)


def test_window_full_then_unspaced_take_waits_for_the_window_too() -> None:
    budget = MessageBudget(3, window=1.0, burst=3, now=0.0)
    for t in (0.0, 0.1, 0.2):
        assert budget.try_take_unspaced(t)

    assert budget.window_due(0.5) == pytest.approx(1.0)
    assert not budget.try_take_unspaced(0.99)
    assert budget.try_take_unspaced(1.0)


@settings(max_examples=200, deadline=None)
@given(
    budget=st.integers(1, 50),
    attempts=st.lists(st.tuples(st.floats(0.0, 5.0, allow_nan=False), st.booleans()), max_size=400),
)
def test_spaced_and_unspaced_takes_mixed_then_never_more_than_budget_per_window(
    budget: int, attempts: list[tuple[float, bool]]
) -> None:
    pacer = MessageBudget(budget, window=1.0, burst=1, now=0.0)
    granted = []
    for now, unspaced in sorted(attempts):
        if pacer.try_take_unspaced(now) if unspaced else pacer.try_take(now):
            granted.append(now)

    assert most_in_any_window(granted, 1.0) <= budget


async def test_kill_while_others_wait_for_a_token_then_written_before_submit_returns() -> None:
    # Arrange: 10 a second, a subscription just sent: the next token is 100 ms away
    sent: list[str] = []
    async with PacedSender(10) as sender:
        await sender.submit(Lane.NORMAL, "n0", lambda: sent.append("n0"))
        sender.submit(Lane.NORMAL, "n1", lambda: sent.append("n1"))
        sender.submit(Lane.FLATTEN, "f1", lambda: sent.append("f1"))

        # Act: the kill is submitted; nothing awaited yet
        kill = sender.submit(Lane.KILL, "reqGlobalCancel", lambda: sent.append("kill"))

        # Assert: written on the caller's turn, ahead of what waits for its token
        assert sent == ["n0", "kill"]
        assert kill.done() and kill.exception() is None
        await kill
        assert sender.sent_by_lane[Lane.KILL] == 1


async def test_startup_subscriptions_saturate_budget_then_kill_goes_out_at_once() -> None:
    # Arrange: guardd's default budget and reserve; 200 start-up subscriptions queued, sent
    # until NORMAL has spent its share of the window (30 of 40)
    sent: list[tuple[str, float]] = []
    async with PacedSender(40, kill_reserve=10) as sender:
        subs = [
            sender.submit(Lane.NORMAL, f"sub{i}", lambda i=i: sent.append((f"sub{i}", 0.0)))
            for i in range(200)
        ]
        await subs[29]
        depth_before = sender.depth(Lane.NORMAL)

        # Act: kills come in, one after another, while 170 subscriptions wait
        kills = []
        for n in range(3):
            kills.append(sender.submit(Lane.KILL, f"kill{n}", lambda: sent.append(("kill", 0.0))))

        # Assert: every kill was written inside submit, none behind a subscription
        assert all(fut.done() for fut in kills)
        assert [label for label, _ in sent[-3:]] == ["kill"] * 3
        assert sender.depth(Lane.NORMAL) == depth_before
        for sub in subs:
            sub.cancel()


async def test_kill_lane_window_full_then_queued_and_sent_when_it_has_room() -> None:
    # Arrange: a budget of 2 a second, both spent by kills
    sent: list[str] = []
    async with PacedSender(2) as sender:
        for n in range(2):
            await sender.submit(Lane.KILL, f"k{n}", lambda n=n: sent.append(f"k{n}"))

        # Act: a third kill in the same window
        third = sender.submit(Lane.KILL, "k2", lambda: sent.append("k2"))

        # Assert: it waits for the window (IB's limit), then goes out
        assert not third.done()
        await asyncio.wait_for(third, 2.0)
    assert sent == ["k0", "k1", "k2"]


async def test_kill_written_directly_and_send_raises_then_future_fails() -> None:
    def broken() -> None:
        raise BrokerDisconnectedError("socket gone")

    async with PacedSender(40) as sender:
        kill = sender.submit(Lane.KILL, "reqGlobalCancel", broken)
        with pytest.raises(BrokerDisconnectedError):
            await kill
    assert sender.sent_by_lane[Lane.KILL] == 0
