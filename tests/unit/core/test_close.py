"""Unit tests for the close episode (guardd.core.close): keep-flat rounds, fill accounting by
identity, stale figures, lost children, reduce drift, tolerances, restore from the journal."""

from __future__ import annotations

from decimal import Decimal

from guardd.core.close import (
    CloseEpisode,
    CloseSettings,
    Fill,
    OrderReport,
    Round,
)
from guardd.core.planner import (
    Side,
)
from tests.close_view import (
    KEY,
    OURS,
    POLICY,
    SETTINGS,
    BookView,
    child_of,
    fill,
    kinds,
    send_all,
)


def close_fully(episode: CloseEpisode, view: BookView, order_id: int, quantity: int) -> Round:
    """Our child fills completely; execution, status and figure all arrive."""
    sign = 1 if child_of(episode, order_id).action is Side.BUY else -1
    view.fills.append(
        fill(f"own{order_id}", sign * quantity, view.now, client=OURS, order_id=order_id)
    )
    view.status(order_id, "Filled", quantity)
    view.figure(view.position + sign * quantity)
    return episode.step(view.obs(), POLICY, 4)


def test_flat_confirmed_then_a_new_fill_then_a_new_round_closes_it() -> None:
    # Arrange: long 10, closed and confirmed flat
    view = BookView(10)
    episode = CloseEpisode("flatten", 1, 0.0, SETTINGS)
    plan = episode.step(view.obs(), POLICY, 4)
    (first,) = send_all(episode, plan, view, 100)
    assert plan.orders[0].action is Side.SELL and plan.orders[0].quantity == 10
    done = close_fully(episode, view, first, 10)
    assert "flat_confirmed" in kinds(done) and episode.at_target

    # Act: a bot's market order fills after "flat confirmed": BOT 3
    view.now += 1
    view.fills.append(fill("bot1", 3, view.now))
    view.figure(3)
    again = episode.step(view.obs(), POLICY, 4)

    # Assert
    assert "close_round_started" in kinds(again) and episode.round == 2
    assert [(o.action, o.quantity) for o in again.orders] == [(Side.SELL, Decimal(3))]


def test_flat_confirmed_then_a_fill_before_its_figure_then_off_target_at_once() -> None:
    # Arrange: long 10, closed and confirmed flat; rounds go on with nothing new
    view = BookView(10)
    episode = CloseEpisode("flatten", 1, 0.0, SETTINGS)
    (first,) = send_all(episode, episode.step(view.obs(), POLICY, 4), view, 100)
    close_fully(episode, view, first, 10)
    view.now += 1
    assert episode.step(view.obs(), POLICY, 4).at_target

    # Act: a foreign BOT 3 is heard; the broker's figure still says 0
    view.now += 1
    view.fills.append(fill("bot1", 3, view.now))
    plan = episode.step(view.obs(), POLICY, 4)

    # Assert: flat no longer confirmed (a settled flat position is one with nothing new), and
    # nothing sold before the figure agrees
    assert "close_round_started" in kinds(plan) and not plan.at_target
    assert plan.orders == ()


def test_old_figure_after_flat_then_no_close() -> None:
    # Arrange: long 10, sold 10 (execution in), confirmed flat
    view = BookView(10)
    episode = CloseEpisode("flatten", 1, 0.0, SETTINGS)
    (first,) = send_all(episode, episode.step(view.obs(), POLICY, 4), view, 100)
    close_fully(episode, view, first, 10)

    # Act: after a reconnect, an update from before the sale arrives late: 10 again
    view.now += 1
    view.generation += 1
    view.synced_since = view.now
    view.orders = {}
    view.figure(10)
    plan = episode.step(view.obs(), POLICY, 4)

    # Assert: our own fills say it is gone; nothing is sold twice
    assert plan.orders == ()
    assert not episode.at_target  # the broker's figure disagrees: not confirmed flat


def test_figure_lags_our_fill_then_never_sells_twice() -> None:
    # Arrange: long 10, a child of 10 sent; its execution arrives, the figure does not
    view = BookView(10)
    episode = CloseEpisode("flatten", 1, 0.0, SETTINGS)
    (first,) = send_all(episode, episode.step(view.obs(), POLICY, 4), view, 100)
    view.now += 1
    view.fills.append(fill("own", -10, view.now, client=OURS, order_id=first))
    view.status(first, "Filled", 10)

    # Act: rounds while the position still says 10 (less than the settle time), then 0
    plans = []
    for _ in range(8):
        view.now += 0.5
        plans.append(episode.step(view.obs(), POLICY, 4))
    view.figure(0)
    last = episode.step(view.obs(), POLICY, 4)

    # Assert: never a second sale while our fill is unconfirmed by the position
    assert all(p.orders == () and not p.at_target for p in plans)
    assert last.orders == () and "flat_confirmed" in kinds(last)


def test_fill_of_a_foreign_order_with_our_ref_style_then_counted_foreign() -> None:
    # Arrange: long 10, our child 100 sells 10 and is working
    view = BookView(10)
    episode = CloseEpisode("flatten", 1, 0.0, SETTINGS)
    (first,) = send_all(episode, episode.step(view.obs(), POLICY, 4), view, 100)

    # Act: another client's fill with the same order id (ids are per client)
    view.now += 1
    view.fills.append(fill("x", -4, view.now, client=9, order_id=first))
    view.figure(6)
    plan = episode.step(view.obs(), POLICY, 4)

    # Assert: not ours; our child of 10 is now too big for the 6 left: cancelled
    assert child_of(episode, first).filled == 0
    assert [(c.order_id, c.why) for c in plan.cancels] == [(first, "over_working")]


def test_duplicate_execution_then_counted_once() -> None:
    view = BookView(10)
    episode = CloseEpisode("flatten", 1, 0.0, SETTINGS)
    (first,) = send_all(episode, episode.step(view.obs(), POLICY, 4), view, 100)
    own = fill("same", -4, view.now, client=OURS, order_id=first)
    view.fills.extend([own, own])

    episode.step(view.obs(), POLICY, 4)
    episode.step(view.obs(), POLICY, 4)

    assert child_of(episode, first).filled == 4


def test_child_missing_after_reconnect_then_lost_only_after_executions_and_grace() -> None:
    # Arrange: long 10, a child of 10 working on connection 1
    view = BookView(10)
    episode = CloseEpisode("flatten", 1, 0.0, SETTINGS)
    send_all(episode, episode.step(view.obs(), POLICY, 4), view, 100)

    # Act: connection 2 synced; its open-order download does not show the child
    view.generation, view.synced_since, view.orders = 2, view.now, {}
    view.executions_complete = False
    waiting = episode.step(view.obs(), POLICY, 4)
    view.now += 3
    still = episode.step(view.obs(), POLICY, 4)  # grace over, executions not in yet
    view.executions_complete = True
    lost = episode.step(view.obs(), POLICY, 4)

    # Assert: counted live (no new child) until then; then lost, and the 10 closed anew
    assert waiting.orders == () and still.orders == ()
    assert "child_order_lost" in kinds(lost)
    assert [(o.action, o.quantity) for o in lost.orders] == [(Side.SELL, Decimal(10))]


def test_lost_child_reported_again_then_counts_again() -> None:
    view = BookView(10)
    episode = CloseEpisode("flatten", 1, 0.0, SETTINGS)
    (first,) = send_all(episode, episode.step(view.obs(), POLICY, 4), view, 100)
    view.generation, view.synced_since, view.orders = 2, view.now, {}
    view.now += 3
    episode.step(view.obs(), POLICY, 4)  # lost; a new child would go out now

    view.status(first, "Submitted", 0)
    plan = episode.step(view.obs(), POLICY, 4)

    assert child_of(episode, first).live and plan.orders == ()


def test_liquidation_while_child_works_then_excess_cancelled_and_rest_closed() -> None:
    # Arrange: long 10, our child of 10 works; IB liquidates 6
    view = BookView(10)
    episode = CloseEpisode("flatten", 1, 0.0, SETTINGS)
    (first,) = send_all(episode, episode.step(view.obs(), POLICY, 4), view, 100)
    view.now += 1
    view.fills.append(fill("liq", -6, view.now, client=0, order_id=0))

    # Act
    plan = episode.step(view.obs(), POLICY, 4)
    view.status(first, "Cancelled", 0)
    view.now += 1
    after = episode.step(view.obs(), POLICY, 4)  # the figure still says 10 (late)

    # Assert: our 10 would cross zero by 6: cancelled; then only the 4 left are sold
    assert [c.why for c in plan.cancels] == ["over_working"]
    assert [(o.action, o.quantity) for o in after.orders] == [(Side.SELL, Decimal(4))]


def test_position_flips_under_a_live_child_then_it_is_cancelled_and_nothing_added() -> None:
    view = BookView(10)
    episode = CloseEpisode("flatten", 1, 0.0, SETTINGS)
    send_all(episode, episode.step(view.obs(), POLICY, 4), view, 100)
    view.now += 1
    view.fills.append(fill("bot", -25, view.now))
    view.figure(-15)

    plan = episode.step(view.obs(), POLICY, 4)

    assert [c.why for c in plan.cancels] == ["wrong_side"]
    assert plan.orders == ()


def test_unseen_fill_then_broker_figure_adopted_after_settle_time() -> None:
    # Arrange: long 10; the figure says 4 with no execution to explain it
    view = BookView(10)
    episode = CloseEpisode("flatten", 1, 0.0, SETTINGS)
    episode.step(view.obs(), POLICY, 0)  # anchored at 10, nothing sent
    view.now += 1
    view.figure(4)

    # Act: at once only what both witnesses agree on (4) is sold
    soon = episode.step(view.obs(), POLICY, 4)
    (child,) = send_all(episode, soon, view, 100)
    view.now += 1
    close_fully(episode, view, child, 4)  # the figure says 0, our fills say 6
    view.now += SETTINGS.settle_s - 0.5
    waiting = episode.step(view.obs(), POLICY, 4)
    view.now += 1
    settled = episode.step(view.obs(), POLICY, 4)

    # Assert: the figure is adopted only after the settle time, and never sold past
    assert [o.quantity for o in soon.orders] == [Decimal(4)]
    assert waiting.orders == () and not waiting.at_target
    assert settled.orders == () and settled.at_target
    assert {"position_disagrees", "flat_confirmed"} <= set(kinds(settled))


def test_reduce_target_drifts_then_re_pursued() -> None:
    # Arrange: reduce 10 to 6, done
    view = BookView(10)
    episode = CloseEpisode("reduce", 1, 0.0, SETTINGS, targets={KEY: Decimal(6)})
    plan = episode.step(view.obs(), POLICY, 4)
    (first,) = send_all(episode, plan, view, 100)
    assert plan.orders[0].quantity == 4
    done = close_fully(episode, view, first, 4)
    assert "reduce_confirmed" in kinds(done)

    # Act: a foreign buy of 3 takes it to 9
    view.now += 1
    view.fills.append(fill("bot", 3, view.now))
    view.figure(9)
    again = episode.step(view.obs(), POLICY, 4)

    # Assert
    assert "close_round_started" in kinds(again)
    assert [(o.action, o.quantity) for o in again.orders] == [(Side.SELL, Decimal(3))]


def test_position_within_tolerance_then_flat() -> None:
    view = BookView(1)
    settings = CloseSettings(client_id=OURS, tolerance={"FUT": Decimal(1)})
    episode = CloseEpisode("flatten", 1, 0.0, settings)

    plan = episode.step(view.obs(), POLICY, 4)

    assert plan.orders == () and plan.at_target and "flat_confirmed" in kinds(plan)


def test_restored_from_journal_then_old_figure_never_closes_twice() -> None:
    # Arrange: a previous process anchored long 10 and sold 10 with child 100; it died
    records = [
        {
            "kind": "close_anchor",
            "decision_id": 1,
            "account": "DU1",
            "con_id": 1,
            "quantity": "10",
            "fills": [],
            "child_fills": {},
        },
        {
            "kind": "child_order_sent",
            "decision_id": 1,
            "order_id": 100,
            "order_ref": "guardd:flatten:1:1",
            "account": "DU1",
            "con_id": 1,
            "action": "SELL",
            "quantity": "10",
            "planned_against": "10",
        },
    ]
    view = BookView(10)  # the new process's figure is late: still 10
    view.fills.append(fill("own", -10, 50.0, client=OURS, order_id=100))
    episode = CloseEpisode("flatten", 1, 90.0, SETTINGS)

    # Act
    assert episode.restore(records) == 1
    plans = []
    for _ in range(4):
        plans.append(episode.step(view.obs(), POLICY, 4))
        view.now += 1

    # Assert
    assert all(p.orders == () for p in plans)
    assert child_of(episode, 100).filled == 10


def test_child_acknowledged_then_perm_id_journaled_once_and_restored_by_it() -> None:
    # Arrange: long 10; child 100 sent, then acknowledged by the broker as permId 1100
    view = BookView(10)
    episode = CloseEpisode("flatten", 1, 0.0, SETTINGS)
    plan = episode.step(view.obs(), POLICY, 4)
    (first,) = send_all(episode, plan, view, 100)
    order = plan.orders[0]

    # Act
    acknowledged = episode.step(view.obs(), POLICY, 4)
    later = episode.step(view.obs(), POLICY, 4)

    # Assert: journaled once, with what a restart needs to know the child by
    records = [r for r in acknowledged.records if r.kind == "child_order_acknowledged"]
    assert [dict(r.fields) for r in records] == [
        {"decision_id": 1, "order_id": first, "perm_id": 1100, "order_ref": order.order_ref}
    ]
    assert "child_order_acknowledged" not in kinds(later)

    # Act: a restarted guard rebuilds the episode from the journal; then a different order
    # under the same id (ids rolled back at the gateway) reports a fill
    sent = {
        "kind": "child_order_sent",
        "decision_id": 1,
        "order_id": first,
        "order_ref": order.order_ref,
        "account": "DU1",
        "con_id": 1,
        "action": "SELL",
        "quantity": "10",
        "planned_against": "10",
    }
    restored = CloseEpisode("flatten", 1, 50.0, SETTINGS)
    assert restored.restore([sent, {"kind": records[0].kind, **records[0].fields}]) == 1
    again = BookView(10)
    again.generation = 2
    again.orders[first] = OrderReport(first, 2000, "Filled", Decimal(10))
    again.fills.append(Fill("x1", OURS, first, 2000, KEY, Decimal(-10), 99.0, True))
    restored.step(again.obs(), POLICY, 4)

    # Assert: the stranger's fill is not the child's (by its permId), and it is foreign
    child = child_of(restored, first)
    assert child.perm_id == 1100 and child.filled == 0


def test_foreign_sell_still_working_against_a_long_then_only_the_rest_closed() -> None:
    # Arrange: long 10; a bot's sell of 6 is still working (its cancel has not landed)
    view = BookView(10)
    view.foreign_selling[KEY] = Decimal(6)
    episode = CloseEpisode("flatten", 1, 0.0, SETTINGS)

    # Act
    plan = episode.step(view.obs(), POLICY, 4)
    (first,) = send_all(episode, plan, view, 100)

    # Assert: 4 now; the bot's 6 fills, ours fills, nothing more and flat
    assert [(o.action, o.quantity) for o in plan.orders] == [(Side.SELL, Decimal(4))]
    view.now += 1
    view.fills.append(fill("bot1", -6, view.now))
    view.foreign_selling.clear()
    view.figure(4)
    done = close_fully(episode, view, first, 4)
    assert done.orders == () and episode.at_target


def test_foreign_buy_working_against_a_long_then_the_whole_position_closed() -> None:
    view = BookView(10)
    view.foreign_buying[KEY] = Decimal(6)  # would add exposure: a later round closes it
    episode = CloseEpisode("flatten", 1, 0.0, SETTINGS)

    plan = episode.step(view.obs(), POLICY, 4)

    assert [(o.action, o.quantity) for o in plan.orders] == [(Side.SELL, Decimal(10))]


def test_foreign_sells_cover_the_whole_long_then_no_child_until_they_end() -> None:
    view = BookView(10)
    view.foreign_selling[KEY] = Decimal(12)
    episode = CloseEpisode("flatten", 1, 0.0, SETTINGS)

    plan = episode.step(view.obs(), POLICY, 4)
    assert plan.orders == () and not episode.at_target

    view.now += 1
    view.foreign_selling.clear()  # cancelled, nothing filled
    again = episode.step(view.obs(), POLICY, 4)
    assert [(o.action, o.quantity) for o in again.orders] == [(Side.SELL, Decimal(10))]


def test_many_fills_of_uncertain_containment_then_closes_what_every_case_allows() -> None:
    # Arrange: long 100 (crypto-like quantities, 8 decimals). Forty sells by a bot were received
    # just before the first figure: each may or may not be in it. Their subset sums are all
    # distinct (2^40 of them), so the round must not enumerate them.
    sells = [Decimal(f"0.{(7919 * 104729 * (k + 1)) % 10**8:08d}") for k in range(40)]
    view = BookView(100, now=100.0)
    view.updated = view.now
    view.fills = [
        Fill(f"bot{k}", 7, 5, 0, KEY, -q, view.now - 1, True) for k, q in enumerate(sells)
    ]
    episode = CloseEpisode("flatten", 1, 0.0, SETTINGS)

    # Act
    plan = episode.step(view.obs(), POLICY, 4)
    # Assert: closes only what holds whichever of them the figure contains (it may hold none),
    # in whole contracts
    assert 10 < sum(sells) < 30
    assert [o.action for o in plan.orders] == [Side.SELL]
    assert sum(o.quantity for o in plan.orders) == int(100 - sum(sells))


def test_execution_arrives_after_the_figure_that_holds_it_then_not_counted_twice() -> None:
    # Arrange: short 2; a bot buys 1 and the position stream (-1) runs ahead of the execution:
    # the first anchor is -1 with no fill known. Our BUY 1 is cancelled by someone else.
    view = BookView(-1, now=100.0)
    view.updated = view.now
    episode = CloseEpisode("flatten", 1, 0.0, SETTINGS)
    (child,) = send_all(episode, episode.step(view.obs(), POLICY, 4), view, 100)
    view.now = 100.1
    view.status(child, "Cancelled", 0)

    # Act: the bot's execution arrives 0.2 s after the figure that already holds it; then quiet
    view.now = 100.2
    view.fills.append(fill("bot1", 1, view.now))
    waiting = episode.step(view.obs(), POLICY, 4)
    view.now += SETTINGS.settle_s + 1
    later = episode.step(view.obs(), POLICY, 4)

    # Assert: the fill is not counted on top of the figure (that said flat, for ever)
    assert waiting.orders == ()
    assert [(o.action, o.quantity) for o in later.orders] == [(Side.BUY, Decimal(1))]


def test_broker_figure_farther_than_the_fills_then_asked_afresh_and_adopted_when_confirmed() -> (
    None
):
    # Arrange: short 2 and our BUY 1 cancelled by someone else; the position stream (-1) already
    # holds a bot's BUY 1 whose execution arrives only well after the settle time, so the fills
    # say flat (0) while the broker keeps saying -1.
    view = BookView(-1, now=100.0)
    view.updated = view.now
    episode = CloseEpisode("flatten", 1, 0.0, SETTINGS)
    (child,) = send_all(episode, episode.step(view.obs(), POLICY, 4), view, 100)
    view.now = 100.1
    view.status(child, "Cancelled", 0)
    view.now = 100.1 + SETTINGS.settle_s + 1
    view.fills.append(fill("bot1", 1, view.now))
    episode.step(view.obs(), POLICY, 4)  # the late execution is heard

    # Act: quiet for a settle time (the disagreement); much later, still no fresh figure; then
    # the answer to the refresh says -1 again
    view.now += SETTINGS.settle_s + 0.1
    noticed = episode.step(view.obs(), POLICY, 4)
    view.now += 10 * SETTINGS.settle_s
    stale = episode.step(view.obs(), POLICY, 4)
    asked = view.now  # the executor sends reqPositions after the round
    view.now += 0.5
    view.updated = view.now  # an update received after the doubt, not an answer: no evidence
    unanswered = episode.step(view.obs(), POLICY, 4)
    view.now += 0.5
    view.download(asked, -1)  # the reqPositions answer
    answered = episode.step(view.obs(), POLICY, 4)

    # Assert: a farther figure is never trusted on its own age (it may be old): the episode asks
    # for positions afresh (again while no answer comes), and closes the exposure once a fresh
    # figure confirms it (it used to wait for ever, the account open while HALTED)
    assert noticed.orders == () and noticed.refresh_positions
    assert any(r.kind == "position_disagrees" and r.level == "error" for r in noticed.records)
    assert stale.orders == () and stale.refresh_positions
    assert unanswered.orders == ()
    assert [(o.action, o.quantity) for o in answered.orders] == [(Side.BUY, Decimal(1))]


def test_stale_update_received_after_the_fills_then_not_closed_until_ib_answers_afresh() -> None:
    # Arrange (found by hypothesis in test_reprice_properties): long 2, our SELL 2 fills 1 + 1
    # and both executions arrive; the position stream is slow: it still says 2 past the settle
    # time (the disagreement begins), then delivers the update IB sent after the first fill
    # only (1): a figure farther from flat than the fills, received after the doubt began
    view = BookView(2, now=100.0)
    view.updated = view.now
    episode = CloseEpisode("flatten", 1, 0.0, SETTINGS)
    (child,) = send_all(episode, episode.step(view.obs(), POLICY, 4), view, 100)
    view.now = 100.2
    view.fills += [fill(e, -1, view.now, client=OURS, order_id=child) for e in ("e1", "e2")]
    view.status(child, "Filled", 2)
    episode.step(view.obs(), POLICY, 4)
    view.now += SETTINGS.settle_s + 1
    doubt = episode.step(view.obs(), POLICY, 4)
    view.now += 0.5
    view.figure(1)  # old news, received late

    # Act: rounds well past the settle time with that figure, then IB's answer to the refresh
    rounds = [doubt]
    for _ in range(4):
        view.now += SETTINGS.settle_s + 1
        rounds.append(episode.step(view.obs(), POLICY, 4))
    asked = view.now
    view.now += 0.3
    view.download(asked, 0)
    answered = episode.step(view.obs(), POLICY, 4)

    # Assert: no child on a figure merely received late (the account is flat: a child would
    # open a short), the episode asks afresh, and IB's answer confirms flat
    assert all(r.orders == () for r in rounds)
    assert any(r.refresh_positions for r in rounds)
    assert answered.orders == () and answered.at_target
