"""The engine: guardd's state machine ARMED / WARNING / REDUCING / HALTED, with HALTED latched.

Inputs (`EngineInput`) are an `Evaluation` (the rules' findings plus a few facts about the Book),
a `Kill` or an `Arm` command; each `Engine.step(input, now)` returns one `Decision`: the new
state, the actions for the shell to carry out in order, and the reasons. The engine is pure and
deterministic: the same inputs and `now` values give the same decisions (decision ids are a
counter), so a journal of inputs replays.

- A kill (a kill-level finding after debounce, or a `Kill` command) enters HALTED. The first
  action is always `CancelAll`: reqGlobalCancel is idempotent and harmless, so it never waits for
  a disk. Then `LatchHalt` (the shell writes the latch, fsynced), then `Flatten` when the kill
  mode is "flatten": closing orders go out only after the latch write was attempted.
- HALTED is left only by an `Arm`, refused while a kill-level finding still holds (raw, before
  debounce) or before any synced evaluation has been seen, unless `force=True`. A refused Arm
  is a Decision with `refused=True` and no state change.
- While HALTED the engine sweeps: when the Book shows working orders that appeared since the last
  cancel (order_seq moved), or that linger `resweep_s` after it, it emits `CancelAll` again. On
  every re-sync (Book synced again after a (re)connect, or the first sync after a restored
  latch) it repeats `CancelAll` and, in "flatten" mode, `Flatten`: a kill requested while
  disconnected is carried out on reconnect. The Book counts as synced only while the guard can
  act (TWS's Read-Only API off), so a kill made while IB refused every order and cancel (321)
  is carried out again once the API can act.
- Below HALTED the state follows the worst debounced finding: reduce → REDUCING (with a
  `Reduce(target_leverage)` on entry or when the target changes), warn → WARNING, none → ARMED.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import Final, Literal, assert_never, get_args

from guardd.core.book import Book
from guardd.core.rules import SEVERITY, Finding, Level

KillMode = Literal["cancel", "flatten"]
"""What a kill does, the one definition (config, commands, the latch file): cancel: cancel
every order and keep them cancelled; flatten: also close every position."""
KILL_MODES: Final[tuple[KillMode, ...]] = get_args(KillMode)


def kill_mode(value: object) -> KillMode | None:
    """`value` as a kill mode, None when it is not one (read from a command or a file)."""
    for mode in KILL_MODES:
        if value == mode:
            return mode
    return None


class State(StrEnum):
    """The guard's state."""

    ARMED = "ARMED"
    WARNING = "WARNING"
    REDUCING = "REDUCING"
    HALTED = "HALTED"


@dataclass(frozen=True, slots=True)
class Latch:
    """The latch that keeps the account HALTED: why, from where (http, mqtt, cli, rule:<name>),
    who (the principal; "guardd" for a rule), what it does (`mode`), since when (epoch seconds)
    and the decision that set it (0: none, e.g. a latch file that could not be read). The state
    file holds exactly this (`guardd.state.latch`), restored before connecting on start, so a
    restart keeps who killed. `detail` says more, e.g. why the file could not be read."""

    reason: str
    source: str
    principal: str
    mode: KillMode
    since: float
    decision_id: int
    detail: str = ""

    def summary(self) -> dict[str, str | float]:
        """What people and the journal are told of it: reason, source, principal, mode, since."""
        return {
            "reason": self.reason,
            "source": self.source,
            "principal": self.principal,
            "mode": self.mode,
            "since": self.since,
        }


# ---------------------------------------------------------------------------- inputs


@dataclass(frozen=True, slots=True)
class Evaluation:
    """One round of rule findings with the Book facts the engine needs for the sweep."""

    findings: tuple[Finding, ...]
    synced: bool = True
    working_orders: int = 0
    order_seq: int = 0

    @classmethod
    def of(cls, book: Book, findings: Sequence[Finding]) -> Evaluation:
        """Bundle findings with the Book's sync state and the counters of the orders a sweep must
        cancel: every working order but guardd's own close orders, which a sweep would otherwise
        cancel in the middle of a flatten. Synced only while the guard can act: the API going
        from read-only back to normal is a re-sync."""
        return cls(
            tuple(findings),
            book.synced and not book.read_only,
            book.foreign_working_count,
            book.foreign_order_seq,
        )


@dataclass(frozen=True, slots=True)
class Kill:
    """A kill command. `source` is where it came from (http, mqtt, cli, rule:<name>);
    `mode` None means the policy's default."""

    source: str
    principal: str
    reason: str
    mode: KillMode | None = None


@dataclass(frozen=True, slots=True)
class Arm:
    """A re-arm command from an authorised principal, with a reason."""

    principal: str
    reason: str
    force: bool = False


EngineInput = Evaluation | Kill | Arm


# ---------------------------------------------------------------------------- actions


@dataclass(frozen=True, slots=True)
class LatchHalt:
    """Write this latch to the state file (atomic, fsync), right after the kill's cancel and
    before any closing order. A write that fails never stops the kill (the shell retries)."""

    latch: Latch


@dataclass(frozen=True, slots=True)
class CancelAll:
    """reqGlobalCancel, then verify through open-order state."""

    reason: str


@dataclass(frozen=True, slots=True)
class Flatten:
    """Close every position of the guarded account (after the cancel)."""

    reason: str


@dataclass(frozen=True, slots=True)
class Reduce:
    """Bring gross exposure down to `target_leverage` × net liquidation, pro rata."""

    target_leverage: float
    reason: str


@dataclass(frozen=True, slots=True)
class Alert:
    """Tell people: log, MQTT event, metrics. `level` is a finding level or "info"."""

    level: str
    message: str
    rule: str = ""


@dataclass(frozen=True, slots=True)
class ClearLatch:
    """Remove the latch from the state file (an authorised re-arm)."""

    principal: str
    reason: str


Action = LatchHalt | CancelAll | Flatten | Reduce | Alert | ClearLatch
"""What a decision asks the shell to do, in order (not an order's side: `planner.Side`; not an
operator's command: `control.commands.CommandKind`)."""


@dataclass(frozen=True, slots=True)
class Decision:
    """The engine's answer to one input."""

    decision_id: int
    state: State
    previous_state: State
    actions: tuple[Action, ...]
    reasons: tuple[str, ...]
    refused: bool = False


# ---------------------------------------------------------------------------- policy


@dataclass(frozen=True, slots=True)
class Policy:
    """How the engine acts: default kill mode, debounce counts per rule, sweep interval, and the
    target leverage used when a reduce finding names none."""

    kill_mode: KillMode = "cancel"
    debounce: Mapping[str, int] = field(default_factory=dict)
    resweep_s: float = 5.0
    default_target_leverage: float = 1.0


class Debouncer:
    """A breach counts only after `n` consecutive breaching evaluations of the same rule; until
    then it is reported as "ok" (message says so). Anything else resets the count."""

    def __init__(self, counts: Mapping[str, int]) -> None:
        self._required = dict(counts)
        self._streak: dict[str, int] = {}

    def apply(self, finding: Finding) -> Finding:
        """Return the finding as it counts now."""
        need = self._required.get(finding.rule, 1)
        if not finding.breach:
            self._streak.pop(finding.rule, None)
            return finding
        streak = self._streak.get(finding.rule, 0) + 1
        self._streak[finding.rule] = streak
        if streak >= need:
            return finding
        return replace(
            finding, level="ok", message=f"debouncing {streak}/{need}: {finding.message}"
        )

    def reset(self) -> None:
        """Forget every streak."""
        self._streak.clear()

    def require(self, counts: Mapping[str, int]) -> None:
        """Count against `counts` from now on; a streak in progress is kept."""
        self._required = dict(counts)


_STATE_OF: Mapping[Level, State] = {
    "ok": State.ARMED,
    "data": State.ARMED,
    "warn": State.WARNING,
    "reduce": State.REDUCING,
}


class Engine:
    """The state machine. One instance per guarded account; feed it with `step`."""

    def __init__(
        self, policy: Policy | None = None, latch: Latch | None = None, first_decision_id: int = 1
    ) -> None:
        self.policy = policy or Policy()
        self._latch = latch
        self._state = State.HALTED if latch is not None else State.ARMED
        self._next_id = first_decision_id
        self._debouncer = Debouncer(self.policy.debounce)
        self._kill_holds: tuple[Finding, ...] = ()
        self._seen_synced = False
        self._last_synced = False
        self._order_seq = 0
        self._swept_seq: int | None = None  # None: never swept since halting
        self._last_sweep: float | None = None
        self._target: float | None = None
        self._data_rules: frozenset[str] = frozenset()

    def set_policy(self, policy: Policy) -> None:
        """Act by `policy` from the next step on (the limits were reloaded). The state, the
        latch and every debounce streak in progress are kept; a streak is measured against the
        new counts."""
        self.policy = policy
        self._debouncer.require(policy.debounce)

    @property
    def state(self) -> State:
        """The current state."""
        return self._state

    @property
    def latch(self) -> Latch | None:
        """The latch while HALTED, else None."""
        return self._latch

    def step(self, item: EngineInput, now: float) -> Decision:
        """Apply one input at `now` (float epoch seconds) and return the decision."""
        match item:
            case Evaluation():
                return self._evaluate(item, now)
            case Kill():
                return self._kill(item, now)
            case Arm():
                return self._arm(item)
            case _:
                assert_never(item)

    # -------------------------------------------------------------------- internals

    def _decide(
        self,
        state: State,
        actions: Sequence[Action],
        reasons: Sequence[str],
        refused: bool = False,
    ) -> Decision:
        decision = Decision(
            decision_id=self._next_id,
            state=state,
            previous_state=self._state,
            actions=tuple(actions),
            reasons=tuple(reasons),
            refused=refused,
        )
        self._next_id += 1
        self._state = state
        return decision

    def _halt(
        self, now: float, source: str, principal: str, reason: str, mode: KillMode
    ) -> Decision:
        if self._latch is not None:
            # a second kill keeps the first one's time and escalates cancel → flatten
            mode = "flatten" if "flatten" in (mode, self._latch.mode) else "cancel"
            since = self._latch.since
        else:
            since = now
        self._latch = Latch(reason, source, principal, mode, since, self._next_id)
        self._swept_seq = self._order_seq
        self._last_sweep = now
        self._target = None
        actions: list[Action] = [CancelAll(reason), LatchHalt(self._latch)]
        if mode == "flatten":
            actions.append(Flatten(reason))
        actions.append(Alert("kill", f"HALTED by {source} ({principal}): {reason}"))
        return self._decide(State.HALTED, actions, (f"kill from {source}: {reason}",))

    def _kill(self, cmd: Kill, now: float) -> Decision:
        mode = cmd.mode or self.policy.kill_mode
        return self._halt(now, cmd.source, cmd.principal, cmd.reason, mode)

    def _arm(self, cmd: Arm) -> Decision:
        if self._state is not State.HALTED:
            return self._decide(self._state, (), ("re-arm refused: not halted",), refused=True)
        if not cmd.force:
            if self._kill_holds:
                held = "; ".join(f.message for f in self._kill_holds)
                return self._decide(
                    self._state, (), (f"re-arm refused: kill breach holds: {held}",), refused=True
                )
            if not self._seen_synced:
                return self._decide(
                    self._state,
                    (),
                    ("re-arm refused: no synced evaluation since start",),
                    refused=True,
                )
        self._latch = None
        self._debouncer.reset()
        self._swept_seq = None
        self._target = None
        forced = " (forced)" if cmd.force else ""
        reason = f"re-armed by {cmd.principal}{forced}: {cmd.reason}"
        actions: list[Action] = [ClearLatch(cmd.principal, cmd.reason), Alert("info", reason)]
        return self._decide(State.ARMED, actions, (reason,))

    def _evaluate(self, ev: Evaluation, now: float) -> Decision:
        counted = [self._debouncer.apply(f) for f in ev.findings]
        self._kill_holds = tuple(f for f in ev.findings if f.level == "kill")
        resynced = ev.synced and not self._last_synced
        self._last_synced = ev.synced
        self._seen_synced = self._seen_synced or ev.synced
        self._order_seq = ev.order_seq

        actions: list[Action] = []
        reasons: list[str] = []
        data_rules = frozenset(f.rule for f in ev.findings if f.level == "data")
        for f in ev.findings:
            if f.level == "data" and f.rule not in self._data_rules:
                actions.append(Alert("data", f.message, f.rule))
        self._data_rules = data_rules

        if self._state is State.HALTED:
            return self._sweep(ev, now, resynced, actions)

        breaches = [f for f in counted if f.breach]
        top = max(breaches, key=lambda f: SEVERITY[f.level], default=None)
        if top is not None and top.level == "kill":
            decision = self._halt(
                now, f"rule:{top.rule}", "guardd", top.message, self.policy.kill_mode
            )
            if actions:
                decision = replace(decision, actions=decision.actions + tuple(actions))
            return decision
        level: Level = top.level if top is not None else "ok"
        state = _STATE_OF[level]
        reasons.extend(f"{f.rule}: {f.message}" for f in breaches)
        if state is State.REDUCING:
            targets = [
                f.target_leverage
                for f in breaches
                if f.level == "reduce" and f.target_leverage is not None
            ]
            target = min(targets, default=self.policy.default_target_leverage)
            if self._state is not State.REDUCING or target != self._target:
                actions.append(Reduce(target, reasons[0]))
            self._target = target
        else:
            self._target = None
        if state is not self._state:
            why = reasons[0] if reasons else "no breach holds"
            actions.append(Alert(level if level != "ok" else "info", f"{state}: {why}"))
        return self._decide(state, actions, reasons)

    def _sweep(self, ev: Evaluation, now: float, resynced: bool, actions: list[Action]) -> Decision:
        assert self._latch is not None
        reasons: list[str] = []
        new_orders = self._swept_seq is None or ev.order_seq != self._swept_seq
        lingering = self._last_sweep is None or now - self._last_sweep >= self.policy.resweep_s
        if resynced or (ev.working_orders > 0 and (new_orders or lingering)):
            why = (
                "re-synced while halted"
                if resynced
                else f"sweep: {ev.working_orders} working order(s) while halted"
            )
            actions.insert(0, CancelAll(why))
            if resynced and self._latch.mode == "flatten":
                actions.insert(1, Flatten(why))
            reasons.append(why)
            self._swept_seq = ev.order_seq
            self._last_sweep = now
        return self._decide(State.HALTED, actions, reasons)
