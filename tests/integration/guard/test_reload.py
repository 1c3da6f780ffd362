"""SIGHUP reloads the limits of a real `guardd run` process (`systemctl reload`, ExecReload=).

The file is checked first: a bad file, or one that changes a key outside [limits], is refused
(`config_reload_refused` naming the keys) and the guard keeps the limits it had; a good one swaps
the rule set (`config_reloaded` naming what changed), a removed rule's breach no longer holds, and
a breach of the new limits acts. Under systemd the guard says RELOADING=1, then READY=1.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from ibsim.gateway import SimGateway
from tests.conftest import eventually
from tests.drill_helpers import GuardRun, guardd_run, http_ready
from tests.fake_systemd import FakeSystemd

pytestmark = [pytest.mark.integration, pytest.mark.slow]

# The simulated account holds two positions (AAPL, ES; tests/conftest.py).
WARN_ON_TWO_POSITIONS = '[limits.positions]\nmax_count = 1\naction = "warn"\n'
KILL_ON_TWO_POSITIONS = '[limits.positions]\nmax_count = 1\naction = "kill"\n'
NO_POSITION_LIMIT = ""


def rewrite(run: GuardRun, old: str, new: str) -> None:
    config = run.state_dir / "guardd.toml"
    text = config.read_text()
    assert old in text
    config.write_text(text.replace(old, new))


def records(run: GuardRun, kind: str) -> list[dict[str, Any]]:
    from guardd.state.journal import read_journal

    return [r for r in read_journal(run.state_dir / "journal.jsonl") if r.get("kind") == kind]


async def reload(run: GuardRun, kind: str, count: int) -> dict[str, Any]:
    """SIGHUP the guard and wait for its `count`-th `kind` record (reloaded or refused)."""
    os.kill(run.proc.pid, signal.SIGHUP)
    await eventually(lambda: len(records(run, kind)) >= count, kind, timeout_s=10)
    assert run.proc.returncode is None, run.log.read_text()
    return records(run, kind)[count - 1]


async def state(session: aiohttp.ClientSession, url: str, run: GuardRun) -> str:
    token = (run.state_dir / "token-read").read_text()
    headers = {"Authorization": f"Bearer {token}"}
    async with session.get(f"{url}/v1/status", headers=headers) as response:
        return str((await response.json())["state"])


async def wait_state(session: aiohttp.ClientSession, url: str, run: GuardRun, want: str) -> None:
    """Poll the guard's status until it says `want`."""

    async def there() -> bool:
        return await state(session, url, run) == want

    await eventually(there, f"state {want}")


async def test_sighup_with_new_limits_then_rules_swapped_and_the_new_limit_acts(
    tmp_path: Path, sim: SimGateway, systemd: FakeSystemd
) -> None:
    env = {"NOTIFY_SOCKET": systemd.address}
    async with (
        guardd_run(tmp_path, sim.port, WARN_ON_TWO_POSITIONS, env=env) as (run, url, _),
        aiohttp.ClientSession() as session,
    ):
        await http_ready(session, url)
        await wait_state(session, url, run, "WARNING")  # two positions, at most one

        # The position limit removed: its breach no longer holds.
        rewrite(run, WARN_ON_TWO_POSITIONS, NO_POSITION_LIMIT)
        first = await reload(run, "config_reloaded", 1)
        await wait_state(session, url, run, "ARMED")

        # Back, at the kill level: it halts.
        config = run.state_dir / "guardd.toml"
        config.write_text(config.read_text() + KILL_ON_TWO_POSITIONS)
        second = await reload(run, "config_reloaded", 2)
        await wait_state(session, url, run, "HALTED")

    assert first["changed"] == ["limits.positions.action", "limits.positions.max_count"]
    assert second["changed"] == ["limits.positions.max_count"]
    halted = [r for r in records(run, "decision") if r["state"] == "HALTED"]
    assert halted[0]["latch"]["source"] == "rule:positions"
    messages = systemd.messages()
    reloading = [i for i, m in enumerate(messages) if m.startswith("RELOADING=1\nMONOTONIC_USEC=")]
    assert len(reloading) == 2
    assert all(messages[i + 1].startswith("READY=1") for i in reloading)


async def test_sighup_with_a_bad_file_or_a_restart_key_then_refused_named_and_limits_kept(
    tmp_path: Path, sim: SimGateway
) -> None:
    async with (
        guardd_run(tmp_path, sim.port, "[limits.positions]\nmax_count = 5\n") as (run, url, _),
        aiohttp.ClientSession() as session,
    ):
        await http_ready(session, url)
        assert await state(session, url, run) == "ARMED"

        rewrite(run, "max_count = 5", "max_count = -1")
        bad = await reload(run, "config_reload_refused", 1)

        # A valid file, but the IB port needs a restart: refused whole, max_count too.
        rewrite(run, "max_count = -1", "max_count = 1")
        rewrite(run, f"port = {sim.port}", f"port = {sim.port + 1}")
        restart = await reload(run, "config_reload_refused", 2)

        # What a good reload changes is measured against the limits in force: max_count is
        # still 5 (had either refused file counted, it would be in `changed`).
        rewrite(run, f"port = {sim.port + 1}", f"port = {sim.port}")
        rewrite(run, "max_count = 1", "max_count = 5\n[limits.leverage]\nwarn = 100.0")
        good = await reload(run, "config_reloaded", 1)
        assert await state(session, url, run) == "ARMED"

    assert bad["keys"] == ["limits.positions.max_count"]
    assert "greater than or equal to 0" in bad["error"]
    assert restart["keys"] == ["ib.port"]
    assert restart["error"] == "ib.port: needs a restart"
    assert good["changed"] == ["limits.leverage.warn"]
    assert "config_reload_refused" in run.log.read_text()  # said in the log too
    assert [r for r in records(run, "decision") if r["state"] == "HALTED"] == []
