"""Market-data lines: which contracts get a live price stream within IB's line limit.

IB allows a login a fixed number of simultaneous market-data lines (100 by default, shared by
every API client and TWS itself) and refuses one more with error 101 "Max number of tickers has
been reached.". Every held position is valued without a line by the account-updates stream
(updatePortfolio, refreshed about every three minutes); a line adds a live price for what moves.
guardd spends at most `[ib] market_data_lines` of them, chosen here.

Pure: the wants, the lines held and the refusals come in, the chosen contracts go out; no clock
reads (`now` is passed in).

Priority, most urgent first:
1. a contract a close is working on (its limit prices need a fresh price), always: closing
   contracts are not held to the configured number, only to what IB grants (`closing_limit`,
   learned from 101); they take the lines first, and the rest share what is left;
2. a held position without any value yet (its exposure is unknown: it may be the largest);
3. the rest by exposure (|value| in the base currency), largest first.
Ties go to the lower contract id, so the choice is deterministic.

Churn: a line held now is kept against a challenger that is not held unless the challenger's
exposure exceeds the holder's by more than `keep_ratio` (each swap costs a cancel and a request
from the message budget, and a new line needs a moment before its first tick).

Refusals: a contract refused with 101 is left out until its `retry_at`; the caller also lowers
the limit to the lines IB actually granted (`LineLimit`) until then, so the most urgent wants
take the lines that exist, and tries the configured number again later.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from guardd.core.events import ConId

__all__ = ["LineLimit", "LineWant", "choose_lines", "line_rank"]

KEEP_RATIO = 1.25
"""A held line gives way only to a contract with more than 1.25x its exposure."""


@dataclass(frozen=True, slots=True)
class LineWant:
    """One contract that would use a line: `exposure` is |value| in the base currency (NaN when
    unknown: ranked before every known exposure), `closing` when a close works on it."""

    con_id: ConId
    exposure: float = 0.0
    closing: bool = False


def line_rank(want: LineWant) -> tuple[int, float, int]:
    """The sort key of a want: closing first, then unvalued, then the largest exposure."""
    if want.closing:
        return (0, -_known(want.exposure), int(want.con_id))
    if math.isnan(want.exposure):
        return (1, 0.0, int(want.con_id))
    return (2, -abs(want.exposure), int(want.con_id))


def _known(exposure: float) -> float:
    return abs(exposure) if math.isfinite(exposure) else math.inf


def choose_lines(
    wants: Iterable[LineWant],
    limit: int,
    *,
    closing_limit: int | None = None,
    held: Iterable[ConId] = (),
    refused: Mapping[ConId, float] | None = None,
    now: float = 0.0,
    keep_ratio: float = KEEP_RATIO,
) -> tuple[ConId, ...]:
    """The contracts that should have a line now, most urgent first.

    Closing contracts first, at most `closing_limit` of them (None: every one); then the rest by
    `line_rank` while fewer than `limit` are chosen. A contract refused until after `now` is not
    chosen. A held line keeps its place against a challenger that is not held unless the
    challenger's exposure is more than `keep_ratio` times the holder's (closing and unvalued
    wants always win their place).
    """
    blocked = refused or {}
    by_con: dict[ConId, LineWant] = {}
    for want in wants:
        if blocked.get(want.con_id, -math.inf) > now:
            continue
        known = by_con.get(want.con_id)
        if known is None or line_rank(want) < line_rank(known):
            by_con[want.con_id] = want
    ranked = sorted(by_con.values(), key=line_rank)
    closing = [w for w in ranked if w.closing]
    if closing_limit is not None:
        closing = closing[: max(0, closing_limit)]
    others = [w for w in ranked if not w.closing]
    room = max(0, limit - len(closing))
    chosen = closing + others[:room]
    left = others[room:]
    holding = frozenset(held)
    # Give held lines left out a second chance against the weakest chosen newcomers.
    keepers = [w for w in left if w.con_id in holding and line_rank(w)[0] == 2]
    newcomers = [w for w in reversed(chosen) if w.con_id not in holding and line_rank(w)[0] == 2]
    for keeper in keepers:  # strongest keeper first (ranked order)
        if not newcomers:
            break
        weakest = newcomers[0]  # weakest newcomer first (reversed ranked order)
        if abs(weakest.exposure) > keep_ratio * abs(keeper.exposure):
            break  # every later newcomer is stronger, every later keeper weaker
        newcomers.pop(0)
        chosen[chosen.index(weakest)] = keeper
    return tuple(w.con_id for w in sorted(chosen, key=line_rank))


@dataclass(frozen=True, slots=True)
class LineLimit:
    """How many lines guardd may hold now: the configured number, or fewer for a while after IB
    refused one (101: the login's lines are used elsewhere too, e.g. by TWS or another client).

    `lowered_to` is the number of lines IB had granted when it refused one more; it holds until
    `until`, after which the configured number is tried again.
    """

    configured: int
    lowered_to: int | None = None
    until: float = -math.inf

    def at(self, now: float) -> int:
        """The limit at `now`."""
        granted = self.granted(now)
        return self.configured if granted is None else min(self.configured, granted)

    def granted(self, now: float) -> int | None:
        """What IB granted when it last refused a line, while that holds (None: no refusal
        holds): the bound for closing contracts, which the configured number does not bind."""
        if self.lowered_to is not None and now < self.until:
            return self.lowered_to
        return None

    def refused(self, granted: int, now: float, retry_s: float) -> LineLimit:
        """IB refused a line while `granted` lines were held: hold at most that many until
        `now + retry_s` (never above a lower figure learned in that time)."""
        known = self.granted(now)
        lowest = granted if known is None else min(granted, known)
        return LineLimit(self.configured, max(0, lowest), now + retry_s)
