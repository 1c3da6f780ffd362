"""What people are told, and when: notices of the guard's decisions and conditions (pure).

A `Notice` is one message for the operator's phone or chat: its kind, a one-line title, a message,
when, and JSON-able details. The shell (`guardd.notifications`) sends notices after the actions
they report, from a queue of their own; nothing here does I/O or reads a clock.

Kinds (`NOTICE_KINDS`), each a fact in the trader's words:

- ``kill``: a decision that latched HALTED (a rule's kill, a person's kill, a second kill);
- ``warn``: the guard entered WARNING; ``reduce``: it entered REDUCING or its target changed;
- ``flat_confirmed``: a flatten's broker-confirmed positions are flat (each close round);
- ``rearm``: an accepted re-arm cleared the latch;
- ``disconnected``: no session with IB for ``disconnect_after_s`` (`Lasting`), and again,
  ``resolved``, once reconnected;
- ``read_only``: TWS's Read-Only API refuses the guard's orders and cancels (error 321); again,
  resolved, once lifted;
- ``latch_not_durable``: a latch write failed (a restart would not come back as the guard is);
  again, resolved, once a retry has written it.

`RateLimit` keeps a flapping condition or a kill / re-arm storm from flooding a phone: at most
``count`` notices of one kind per ``window_s`` seconds; the rest are dropped (and counted by the
shell).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

from guardd.core.close import Record
from guardd.core.engine import ClearLatch, Decision, LatchHalt, Reduce, State

__all__ = [
    "NOTICE_KINDS",
    "Lasting",
    "Notice",
    "NoticeKind",
    "RateLimit",
    "condition_notice",
    "notice_of_close",
    "notices_of",
]

NoticeKind = Literal[
    "kill",
    "warn",
    "reduce",
    "flat_confirmed",
    "rearm",
    "disconnected",
    "read_only",
    "latch_not_durable",
]
NOTICE_KINDS: tuple[NoticeKind, ...] = (
    "kill",
    "warn",
    "reduce",
    "flat_confirmed",
    "rearm",
    "disconnected",
    "read_only",
    "latch_not_durable",
)


@dataclass(frozen=True, slots=True)
class Notice:
    """One notification: `kind`, a one-line `title`, a `message`, epoch seconds `ts`, whether it
    says a condition has ended (`resolved`), and JSON-able `details`."""

    kind: NoticeKind
    title: str
    message: str
    ts: float
    resolved: bool = False
    details: Mapping[str, object] = field(default_factory=dict)


def notices_of(decision: Decision, now: float) -> tuple[Notice, ...]:
    """The notices a decision the executor has carried out gives: a kill (a latch written),
    a re-arm (the latch cleared), entering WARNING, entering REDUCING (or a new reduce target).
    A refused decision, a sweep and a decision that changes nothing give none."""
    if decision.refused:
        return ()
    found: list[Notice] = []
    entered = decision.state if decision.state != decision.previous_state else None
    why = "; ".join(decision.reasons)
    for action in decision.actions:
        match action:
            case LatchHalt(latch=latch):
                found.append(
                    Notice(
                        "kill",
                        f"HALTED: {latch.reason}",
                        f"Kill from {latch.source} ({latch.principal}), mode {latch.mode}: "
                        f"{latch.reason}. Every order is cancelled and kept cancelled"
                        + ("; positions are being closed." if latch.mode == "flatten" else "."),
                        now,
                        details={
                            "reason": latch.reason,
                            "source": latch.source,
                            "principal": latch.principal,
                            "mode": latch.mode,
                            "since": latch.since,
                            "decision_id": decision.decision_id,
                            "previous_state": str(decision.previous_state),
                        },
                    )
                )
            case ClearLatch(principal=principal, reason=reason):
                found.append(
                    Notice(
                        "rearm",
                        f"re-armed by {principal}",
                        why or f"re-armed by {principal}: {reason}",
                        now,
                        details={
                            "principal": principal,
                            "reason": reason,
                            "decision_id": decision.decision_id,
                        },
                    )
                )
            case Reduce(target_leverage=target, reason=reason):
                found.append(
                    Notice(
                        "reduce",
                        f"REDUCING to leverage {target:g}",
                        f"Reduce-only: exposure is being brought to leverage {target:g}. {reason}",
                        now,
                        details={
                            "target_leverage": target,
                            "reasons": list(decision.reasons),
                            "decision_id": decision.decision_id,
                        },
                    )
                )
            case _:
                pass
    if entered is State.WARNING:
        found.append(
            Notice(
                "warn",
                f"WARNING: {decision.reasons[0] if decision.reasons else 'a warn limit holds'}",
                why or "a warn-level limit holds",
                now,
                details={
                    "reasons": list(decision.reasons),
                    "previous_state": str(decision.previous_state),
                    "decision_id": decision.decision_id,
                },
            )
        )
    return tuple(found)


def notice_of_close(record: Record, now: float) -> Notice | None:
    """The notice a close episode's fact gives: ``flat_confirmed`` (broker-confirmed flat)."""
    if record.kind != "flat_confirmed":
        return None
    fields = dict(record.fields)
    return Notice(
        "flat_confirmed",
        "flat confirmed",
        "The flatten is done: the broker confirms every position of the account is flat. "
        "The guard stays HALTED and keeps it flat until a re-arm.",
        now,
        details=fields,
    )


ConditionKind = Literal["disconnected", "read_only", "latch_not_durable"]

_CONDITION_TEXT: Mapping[ConditionKind, tuple[str, str, str, str]] = {
    "disconnected": (
        "disconnected from IB",
        "No session with TWS / IB Gateway: the guard cannot cancel or close. A kill decided "
        "meanwhile is latched and carried out on reconnect.",
        "reconnected to IB",
        "The session with TWS / IB Gateway is back.",
    ),
    "read_only": (
        "IB API is read-only: the guard cannot act",
        "TWS / IB Gateway refuses every order and cancel of the guard (error 321, Read-Only "
        'API). Untick "Read-Only API" in the gateway\'s API settings; a latched kill is then '
        "carried out by itself.",
        "IB API read-only lifted",
        "TWS / IB Gateway accepts the guard's orders and cancels again.",
    ),
    "latch_not_durable": (
        "latch NOT DURABLE",
        "The latch file could not be written (disk full, read-only file system...): a restart "
        "now would not come back as the guard is. It keeps retrying; the actions went out.",
        "latch durable again",
        "The latch file holds the guard's state again.",
    ),
}


def condition_notice(
    kind: ConditionKind,
    change: Literal["began", "ended"],
    now: float,
    details: Mapping[str, object] | None = None,
) -> Notice:
    """The notice of a condition that began (or ended: ``resolved``)."""
    title, message, title_ended, message_ended = _CONDITION_TEXT[kind]
    if change == "began":
        return Notice(kind, title, message, now, details=dict(details or {}))
    return Notice(kind, title_ended, message_ended, now, resolved=True, details=dict(details or {}))


class Lasting:
    """A condition that counts only once it has held for `after_s` seconds (0: at once).

    `observe(active, now)` returns "began" the first time the condition has held `after_s`
    without a break, "ended" when a condition that had begun stops holding, else None. A short
    blip that ends before `after_s` says nothing at all.
    """

    def __init__(self, after_s: float) -> None:
        if after_s < 0:
            raise ValueError("after_s must not be negative")
        self.after_s = after_s
        self.since: float | None = None  # when the condition started holding
        self.begun = False

    def observe(self, active: bool, now: float) -> Literal["began", "ended"] | None:
        """Note whether the condition holds at `now`; "began", "ended" or None."""
        if not active:
            self.since = None
            if self.begun:
                self.begun = False
                return "ended"
            return None
        if self.since is None:
            self.since = now
        if not self.begun and now - self.since >= self.after_s:
            self.begun = True
            return "began"
        return None


class RateLimit:
    """At most `count` notices of one kind in any `window_s` seconds (a sliding window)."""

    def __init__(self, count: int, window_s: float) -> None:
        if count < 1 or not window_s > 0:
            raise ValueError("a rate limit needs count >= 1 and window_s > 0")
        self.count = count
        self.window_s = window_s
        self._sent: dict[str, deque[float]] = {}

    def allow(self, kind: str, now: float) -> bool:
        """Whether a notice of `kind` may go at `now`; an allowed one is counted."""
        sent = self._sent.setdefault(kind, deque())
        while sent and now - sent[0] >= self.window_s:
            sent.popleft()
        if len(sent) >= self.count:
            return False
        sent.append(now)
        return True
