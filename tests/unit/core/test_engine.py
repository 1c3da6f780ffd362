"""Engine: transitions, the latch, re-arm, the sweep, debounce, determinism."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from guardd.core.engine import (
    Alert,
    Arm,
    CancelAll,
    ClearLatch,
    Debouncer,
    Decision,
    Engine,
    EngineInput,
    Evaluation,
    Flatten,
    Kill,
    Latch,
    LatchHalt,
    Policy,
    Reduce,
    State,
)
from guardd.core.rules import Finding, Level


def finding(level: Level, rule: str = "leverage", target: float | None = None) -> Finding:
    return Finding(rule, level, 1.0, 1.0, f"{rule} is {level}", "", target)


def ev(*findings: Finding, synced: bool = True, working: int = 0, seq: int = 0) -> Evaluation:
    return Evaluation(findings, synced=synced, working_orders=working, order_seq=seq)


LATCH = Latch("test", "http", "alice", "flatten", 10.0, 7)


def test_all_ok_then_armed_without_actions() -> None:
    d = Engine().step(ev(finding("ok")), 1.0)
    assert (d.state, d.actions) == (State.ARMED, ())


def test_warn_finding_then_warning_with_alert() -> None:
    d = Engine().step(ev(finding("warn")), 1.0)
    assert d.state is State.WARNING
    assert any(isinstance(a, Alert) for a in d.actions)


def test_reduce_finding_then_reducing_with_target_once() -> None:
    engine = Engine()
    d1 = engine.step(ev(finding("reduce", "volatility", target=1.5)), 1.0)
    d2 = engine.step(ev(finding("reduce", "volatility", target=1.5)), 2.0)
    assert d1.state is State.REDUCING
    assert Reduce(1.5, "volatility: volatility is reduce") in d1.actions
    assert not any(isinstance(a, Reduce) for a in d2.actions)


def test_breach_clears_then_back_to_armed() -> None:
    engine = Engine()
    engine.step(ev(finding("reduce")), 1.0)
    d = engine.step(ev(finding("ok")), 2.0)
    assert (d.previous_state, d.state) == (State.REDUCING, State.ARMED)


def test_kill_finding_then_halted_cancel_first_then_latch_then_flatten() -> None:
    d = Engine(Policy(kill_mode="flatten")).step(ev(finding("kill")), 5.0)
    assert d.state is State.HALTED
    assert isinstance(d.actions[0], CancelAll)
    assert isinstance(d.actions[1], LatchHalt)
    assert d.actions[1].latch.source == "rule:leverage"
    assert isinstance(d.actions[2], Flatten)


def test_manual_kill_cancel_mode_then_no_flatten() -> None:
    d = Engine().step(Kill("http", "alice", "fat finger"), 5.0)
    assert d.state is State.HALTED
    assert [type(a) for a in d.actions[:2]] == [CancelAll, LatchHalt]
    assert not any(isinstance(a, Flatten) for a in d.actions)


def test_second_kill_with_flatten_then_escalates_and_keeps_since() -> None:
    engine = Engine()
    engine.step(Kill("http", "alice", "first"), 5.0)
    d = engine.step(Kill("mqtt", "bob", "now flatten", mode="flatten"), 9.0)
    latch = d.actions[1]
    assert isinstance(latch, LatchHalt)
    assert (latch.latch.mode, latch.latch.since) == ("flatten", 5.0)
    assert any(isinstance(a, Flatten) for a in d.actions)


def test_halted_and_findings_clear_then_stays_halted() -> None:
    engine = Engine()
    engine.step(ev(finding("kill")), 1.0)
    d = engine.step(ev(finding("ok")), 2.0)
    assert d.state is State.HALTED


def test_restored_latch_then_starts_halted_and_sweeps_on_sync() -> None:
    engine = Engine(latch=LATCH)
    assert engine.state is State.HALTED
    d0 = engine.step(ev(synced=False), 1.0)
    d1 = engine.step(ev(synced=True), 2.0)
    assert d0.actions == ()
    assert isinstance(d1.actions[0], CancelAll)
    assert isinstance(d1.actions[1], Flatten)


def test_new_order_while_halted_then_cancel_all_sweep() -> None:
    engine = Engine(latch=LATCH)
    engine.step(ev(seq=3), 1.0)
    quiet = engine.step(ev(seq=3), 1.5)
    d = engine.step(ev(working=1, seq=4), 2.0)
    assert quiet.actions == ()
    assert isinstance(d.actions[0], CancelAll)
    assert d.state is State.HALTED


def test_lingering_order_while_halted_then_resweep_after_interval() -> None:
    engine = Engine(Policy(resweep_s=5.0))
    engine.step(ev(working=0, seq=1), 0.0)
    engine.step(Kill("http", "alice", "x"), 1.0)
    early = engine.step(ev(working=1, seq=1), 3.0)
    late = engine.step(ev(working=1, seq=1), 6.5)
    assert early.actions == ()
    assert isinstance(late.actions[0], CancelAll)


def test_arm_while_kill_breach_holds_then_refused_without_state_change() -> None:
    engine = Engine()
    engine.step(ev(finding("kill")), 1.0)
    engine.step(ev(finding("kill")), 2.0)
    d = engine.step(Arm("carol", "looks fine"), 3.0)
    assert d.refused
    assert d.state is State.HALTED
    assert d.actions == ()
    assert "kill breach holds" in d.reasons[0]


def test_arm_forced_while_kill_breach_holds_then_armed_and_latch_cleared() -> None:
    engine = Engine()
    engine.step(ev(finding("kill")), 1.0)
    d = engine.step(Arm("carol", "override", force=True), 3.0)
    assert (d.state, d.refused) == (State.ARMED, False)
    assert ClearLatch("carol", "override") in d.actions
    assert engine.latch is None


def test_arm_after_breach_clears_then_armed() -> None:
    engine = Engine()
    engine.step(ev(finding("kill")), 1.0)
    engine.step(ev(finding("ok")), 2.0)
    assert engine.step(Arm("carol", "cleared"), 3.0).state is State.ARMED


def test_arm_restored_latch_before_any_synced_evaluation_then_refused() -> None:
    engine = Engine(latch=LATCH)
    assert engine.step(Arm("carol", "restart"), 1.0).refused
    engine.step(ev(synced=True), 2.0)
    assert engine.step(Arm("carol", "restart"), 3.0).state is State.ARMED


def test_arm_when_not_halted_then_refused() -> None:
    d = Engine().step(Arm("carol", "why"), 1.0)
    assert d.refused and d.state is State.ARMED


def test_debounce_three_then_kill_only_on_third_consecutive() -> None:
    engine = Engine(Policy(debounce={"leverage": 3}))
    states = [engine.step(ev(finding("kill")), float(t)).state for t in range(3)]
    assert states == [State.ARMED, State.ARMED, State.HALTED]


def test_debounce_interrupted_by_ok_then_streak_restarts() -> None:
    deb = Debouncer({"leverage": 2})
    assert deb.apply(finding("kill")).level == "ok"
    deb.apply(finding("ok"))
    assert deb.apply(finding("kill")).level == "ok"
    assert deb.apply(finding("kill")).level == "kill"


def test_policy_replaced_mid_streak_then_streak_kept_and_new_count_applies() -> None:
    engine = Engine(Policy(debounce={"leverage": 3}))
    assert engine.step(ev(finding("kill")), 0.0).state is State.ARMED  # streak 1 of 3

    engine.set_policy(Policy(debounce={"leverage": 2}))  # a reload lowered the count

    assert engine.step(ev(finding("kill")), 1.0).state is State.HALTED  # streak 2 of 2


def test_data_finding_then_alert_once_not_breach() -> None:
    engine = Engine()
    d1 = engine.step(ev(finding("data")), 1.0)
    d2 = engine.step(ev(finding("data")), 2.0)
    assert d1.state is State.ARMED
    assert next(a for a in d1.actions if isinstance(a, Alert)).level == "data"
    assert d2.actions == ()


def test_decision_ids_then_consecutive_from_first_id() -> None:
    engine = Engine(first_decision_id=100)
    ids = [engine.step(ev(), float(t)).decision_id for t in range(3)]
    assert ids == [100, 101, 102]


# -- properties -----------------------------------------------------------------------------

_inputs: st.SearchStrategy[EngineInput] = st.one_of(
    st.builds(
        lambda levels, synced, working, seq: ev(
            *(finding(lv, f"r{i}") for i, lv in enumerate(levels)),
            synced=synced,
            working=working,
            seq=seq,
        ),
        st.lists(st.sampled_from(["ok", "data", "warn", "reduce", "kill"]), max_size=3),
        st.booleans(),
        st.integers(0, 3),
        st.integers(0, 5),
    ),
    st.builds(
        Kill, st.just("http"), st.just("p"), st.just("r"), st.sampled_from([None, "flatten"])
    ),
    st.builds(Arm, st.just("p"), st.just("r"), st.booleans()),
)


def _run(inputs: list[EngineInput], latch: Latch | None) -> list[Decision]:
    engine = Engine(Policy(debounce={"r0": 2}), latch=latch)
    return [engine.step(item, float(t)) for t, item in enumerate(inputs)]


@settings(max_examples=200, deadline=None)
@given(st.lists(_inputs, max_size=30), st.sampled_from([None, LATCH]))
def test_any_input_sequence_then_halted_left_only_by_accepted_arm(
    inputs: list[EngineInput], latch: Latch | None
) -> None:
    for item, d in zip(inputs, _run(inputs, latch), strict=True):
        if d.previous_state is State.HALTED and d.state is not State.HALTED:
            assert isinstance(item, Arm)
            assert not d.refused
        if d.refused:
            assert d.state is d.previous_state
            assert d.actions == ()
        # A kill: the cancel first, the latch second, and any closing order after both.
        latches = [i for i, a in enumerate(d.actions) if isinstance(a, LatchHalt)]
        assert latches in ([], [1])
        if latches:
            assert isinstance(d.actions[0], CancelAll)
            assert all(not isinstance(a, Flatten) for a in d.actions[:1])
        if d.state is State.HALTED and d.previous_state is not State.HALTED:
            assert latches == [1]


@settings(max_examples=50, deadline=None)
@given(st.lists(_inputs, max_size=30))
def test_same_inputs_then_same_decisions(inputs: list[EngineInput]) -> None:
    assert _run(inputs, None) == _run(inputs, None)
