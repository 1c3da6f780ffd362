"""A journal that cannot rotate is surfaced by the running guard: logged and journaled once,
exported (`guardd_journal_rotation_failing`) and in the status, and cleared once it rotates.

The fault is injected at the one OS call that rotates (the rename of the live file into a
segment), as a full disk would refuse it; the guard, the journal and the gateway are real.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Any

import pytest

from guardd.control.guardctl import describe_status
from guardd.state.journal import journal_segments, read_journal
from ibsim.gateway import SimGateway
from tests.conftest import eventually
from tests.guard_harness import ACCOUNT, guard_config, running_guard

pytestmark = pytest.mark.integration

ROTATE_EVERY_KB = '[journal]\nrotate = "size"\nmax_bytes = 1024\n'


async def test_journal_cannot_rotate_then_said_once_exported_in_status_and_cleared(
    tmp_path: Path, sim: SimGateway, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = guard_config(sim.port, tmp_path / "state", ROTATE_EVERY_KB)
    journal_path = cfg.journal_path
    real_rename = os.rename

    def disk_full_for_the_journal(src: Any, dst: Any, *args: Any, **kwargs: Any) -> None:
        if Path(src) == journal_path:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_rename(src, dst, *args, **kwargs)

    async with running_guard(cfg) as guard:

        def failing() -> float | None:
            labels = {"account": ACCOUNT}
            return guard.registry.get_sample_value("guardd_journal_rotation_failing", labels)

        assert failing() == 0
        monkeypatch.setattr(os, "rename", disk_full_for_the_journal)
        for n in range(10):  # each append is due to rotate, and each rotation fails
            guard.journal.append("drill_record", n=n, pad="x" * 300)
        await eventually(lambda: failing() == 1, "the rotation failure exported")
        status = guard.status()
        for n in range(10, 20):
            guard.journal.append("drill_record", n=n, pad="x" * 300)

        monkeypatch.undo()
        guard.journal.append("drill_record", n=20)  # rotates now
        await eventually(lambda: failing() == 0, "the recovery exported")
        cleared = guard.status()

    assert "No space left on device" in str(status["journal_rotation_error"])
    assert "CANNOT ROTATE: cannot rotate journal" in describe_status(dict(status))  # guardctl
    assert cleared["journal_rotation_error"] is None
    kinds = [r["kind"] for r in read_journal(journal_path)]
    assert kinds.count("journal_rotation_failed") == 1  # twenty failed rotations, said once
    assert kinds.count("journal_rotation_recovered") == 1
    assert len(journal_segments(journal_path)) >= 2
    records = [r["n"] for r in read_journal(journal_path) if r["kind"] == "drill_record"]
    assert records == list(range(21))  # nothing lost meanwhile
