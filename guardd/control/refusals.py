"""Refused commands, accounted for without a disk write per junk message.

A flood of junk (forged, stale, malformed commands) must neither delay a valid command nor fill
the disk, yet every refusal must be accounted for. ``RefusalLedger`` decides which refusals are
kept in full and counts the rest, per interval:

- the first refusal of each kind (channel, error class and, for HTTP, the status: e.g.
  ``mqtt:AuthError``, ``http:AuthError:401``, ``http:AuthError:403``) in an interval is kept in
  full (the journal's ``command_refused`` record, an MQTT event, a log line);
- every further refusal of that kind in the interval is only counted;
- when the interval is over, ``flush`` returns a ``RefusalSummary``: the counts by kind of the
  refusals not kept in full (the journal's ``command_refusals_aggregated`` record).

So for any stretch of time, full records + summed counts = refusals, and the disk sees at most
(kinds + 1) records per interval whatever the flood. A full record that could not be written
(``unkept``) is counted into the next summary instead. Kinds are bounded (``MAX_KINDS``; more
are counted under ``OTHER_KIND``), so memory does not grow with what an attacker sends.

Pure: ``now`` is an argument, no I/O.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Final

__all__ = ["MAX_KINDS", "OTHER_KIND", "RefusalLedger", "RefusalSummary", "refusal_kind"]

MAX_KINDS: Final = 32
OTHER_KIND: Final = "other"


def refusal_kind(channel: object, error: object, status: object = None) -> str:
    """The kind a refusal is counted under: ``<channel>:<error class>[:<HTTP status>]``, e.g.
    ``mqtt:ReplayError`` or ``http:AuthError:403`` (a known token lacking the role is told apart
    from a flood of unknown tokens, 401)."""
    return f"{channel}:{error}" if status is None else f"{channel}:{error}:{status}"


@dataclass(frozen=True, slots=True)
class RefusalSummary:
    """Refusals of one interval that were counted but not kept in full, by kind."""

    since: float  # the interval's first refusal
    until: float  # when it was summed up
    counts: dict[str, int]

    @property
    def total(self) -> int:
        """All refusals this summary counts."""
        return sum(self.counts.values())


@dataclass(slots=True)
class RefusalLedger:
    """Counts every refusal; says which to keep in full (the first of its kind per interval)."""

    interval_s: float
    totals: Counter[str] = field(default_factory=Counter)  # every refusal since start, by kind
    _since: float | None = None
    _kept: set[str] = field(default_factory=set)
    _counts: Counter[str] = field(default_factory=Counter)

    def note(self, kind: str, now: float) -> bool:
        """Count one refusal of ``kind`` at ``now``; True when it is to be kept in full."""
        if kind not in self.totals and len(self.totals) >= MAX_KINDS:
            kind = OTHER_KIND
        self.totals[kind] += 1
        if self._since is None:
            self._since = now
        if kind in self._kept:
            self._counts[kind] += 1
            return False
        self._kept.add(kind)
        return True

    def unkept(self, kind: str, now: float) -> None:
        """A refusal ``note`` said to keep could not be kept (e.g. the journal failed): count it
        into the summary instead, so that it is still accounted for."""
        if kind not in self.totals:
            kind = OTHER_KIND
        self._counts[kind] += 1
        if self._since is None:
            self._since = now

    def carry(self, summary: RefusalSummary) -> None:
        """A summary that could not be kept: its counts go into the next one."""
        self._counts.update(summary.counts)
        self._since = summary.since if self._since is None else min(self._since, summary.since)

    @property
    def total(self) -> int:
        """Every refusal counted since start."""
        return sum(self.totals.values())

    def flush(self, now: float, *, force: bool = False) -> RefusalSummary | None:
        """End the interval once ``interval_s`` has passed since its first refusal (or at once
        with ``force``): the summary of what was only counted, or None when nothing was."""
        if self._since is None or (not force and now - self._since < self.interval_s):
            return None
        summary = (
            RefusalSummary(self._since, now, dict(sorted(self._counts.items())))
            if self._counts
            else None
        )
        self._since = None
        self._kept.clear()
        self._counts.clear()
        return summary
