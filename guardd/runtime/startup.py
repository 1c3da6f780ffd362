"""What a guard starts from: its latch and what its journal says, read once before anything
connects (`Guard.open` calls `restore`; the guard's constructor does no I/O).

The latch file is read first (``--fresh-start`` writes the ARMED state it starts from). The
journal is then read once, every rotated segment included, oldest first, and that one pass gives
everything a restart needs from it (`JournalScan`):

- the last decision id: ids continue across restarts, so records stay unambiguous;
- the latch the journal's decisions say holds (`witness_step`), the latch file's second witness: a
  latch write may have failed, so a kill the journal records later than the file's state wins;
- every order id a previous process sent, or was about to send: never handed out again (a reused
  id would modify that order, or make a stranger's order look like our child);
- the child-order records of the restored kill's flatten, so its children are ours again.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from guardd.config import Config
from guardd.core.engine import Latch
from guardd.state.journal import journal_segments, read_journal
from guardd.state.latch import (
    FRESH_START,
    Armed,
    LatchFile,
    later_of,
    read_latch,
    witness_step,
    write_latch,
)

_CHILD_KINDS = frozenset({"child_order_sent", "child_order_acknowledged", "close_anchor"})
"""The records `Executor.restore_children` rebuilds a close episode's children from."""


@dataclass(frozen=True, slots=True)
class Restored:
    """The state a guard starts from.

    `on_disk` is the latch file as read (what a restart would read), `latch` the latch to start
    from: the file's, or the journal's when it records a later kill (`from_journal`, and the file
    is to be repaired). `children` are the journal records of the restored flatten's children
    (empty unless `latch` is a flatten kill)."""

    on_disk: LatchFile
    latch: LatchFile
    last_decision_id: int
    order_ids: frozenset[int]
    children: tuple[Mapping[str, Any], ...]

    @property
    def from_journal(self) -> bool:
        """Whether the journal's witness won over the latch file."""
        return self.latch is not self.on_disk

    @property
    def halted(self) -> Latch | None:
        """The kill the guard starts HALTED by, None when it starts ARMED."""
        return self.latch if isinstance(self.latch, Latch) else None


class JournalScan:
    """Everything a restart needs from the journal, fed one record at a time, oldest first.

    Child-order records are kept only for a decision that can still be the latch at the end: the
    latch file's (`file_decision_id`) and the journal's witness at that point of the scan (a
    decision's records follow its own decision record, and the witness only moves on to later
    kills), so a long journal's old closes are not held in memory.
    """

    def __init__(self, file_decision_id: int) -> None:
        self.last_decision_id = 0
        self.witness: Latch | None = None
        self.order_ids: set[int] = set()
        self._file_decision_id = file_decision_id
        self._children: dict[int, list[Mapping[str, Any]]] = {}

    def add(self, record: Mapping[str, Any]) -> None:
        """Take one journal record into account."""
        value = record.get("decision_id")
        if isinstance(value, int) and value > self.last_decision_id:
            self.last_decision_id = value
        witness = witness_step(self.witness, record)
        if witness is not self.witness:
            self.witness = witness
            keep = self._candidates()
            self._children = {d: recs for d, recs in self._children.items() if d in keep}
        kind = record.get("kind")
        if kind == "child_order_sent" and record.get("order_id") is not None:
            self.order_ids.add(int(record["order_id"]))
        if kind in _CHILD_KINDS and isinstance(value, int) and value in self._candidates():
            self._children.setdefault(value, []).append(record)

    def children(self, decision_id: int) -> tuple[Mapping[str, Any], ...]:
        """The child-order records of `decision_id` (the file's or the final witness's)."""
        return tuple(self._children.get(decision_id, ()))

    def _candidates(self) -> set[int]:
        candidates = {self._file_decision_id}
        if self.witness is not None:
            candidates.add(self.witness.decision_id)
        return candidates


def restore(cfg: Config, *, fresh_start: bool, now: float) -> Restored:
    """Read the latch file and scan the journal once (module docstring). A missing latch file is
    HALTED unless `fresh_start`, which writes the ARMED state it starts from; an unreadable one
    is HALTED. Raises JournalError when the journal cannot be read."""
    on_disk = read_latch(cfg.latch_path, allow_missing=fresh_start, now=now)
    if isinstance(on_disk, Armed) and on_disk.reason == FRESH_START:
        write_latch(cfg.latch_path, on_disk)
    scan = JournalScan(on_disk.decision_id)
    path = cfg.journal_path
    if journal_segments(path):  # every rotated segment too, oldest first
        for record in read_journal(path):
            scan.add(record)
    latch = later_of(on_disk, scan.witness)
    children: tuple[Mapping[str, Any], ...] = ()
    if isinstance(latch, Latch) and latch.mode == "flatten" and latch.decision_id:
        children = scan.children(latch.decision_id)
    return Restored(
        on_disk=on_disk,
        latch=latch,
        last_decision_id=scan.last_decision_id,
        order_ids=frozenset(scan.order_ids),
        children=children,
    )
