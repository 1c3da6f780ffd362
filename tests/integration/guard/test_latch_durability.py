"""Cancel first, then make it durable: a kill whose latch cannot be written is still carried out.

Against the real guard on the simulated gateway over TCP, with real HTTP. The latch write is made
to fail for real: the executor's latch file is pointed under a path whose parent is a regular
file, so creating it fails in the kernel (as a full disk or a read-only mount would make it fail).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from guardd.control.guardctl import EXIT_NOT_DURABLE
from guardd.runtime.guard import Guard
from guardd.state.journal import read_journal
from ibsim.bot import RunawayBot
from ibsim.gateway import SimGateway
from tests.conftest import eventually
from tests.control_harness import ACCOUNT, Running, bot_orders, guardctl, positions, running_guard
from tests.mqtt_broker import Broker


@pytest.fixture
def blocker(tmp_path: Path) -> Iterator[Path]:
    """A regular file: a latch file 'inside' it cannot be written."""
    path = tmp_path / "not-a-directory"
    path.write_text("")
    yield path


def make_directory(path: Path) -> None:
    path.unlink()
    path.mkdir()


def latch_durable_metric(guard: Guard) -> float | None:
    return guard.registry.get_sample_value("guardd_latch_durable", {"account": ACCOUNT})


async def status(running: Running) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {running.tokens['read']}"}
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"{running.url}/v1/status", headers=headers) as response,
    ):
        assert response.status == 200
        body: dict[str, Any] = await response.json()
        return body


async def test_latch_write_fails_during_kill_then_cancel_and_flatten_anyway_and_answer_says_so(
    sim: SimGateway, mqtt_broker: Broker, tmp_path: Path, blocker: Path, bot: RunawayBot
) -> None:
    # Arrange
    async with running_guard(sim, mqtt_broker, tmp_path, kill_mode="flatten") as running:
        bot.place_limit("MSFT", "BUY", 10, 300.0)
        await eventually(lambda: len(bot_orders(sim)) == 1, "the bot's order rests")
        assert any(positions(sim).values())
        running.guard.executor.latch_path = blocker / "latch.json"

        # Act
        code, answer = await running.post("kill", {"reason": "disk full drill"}, "kill")

        # Assert: carried out, and the answer is an error that says the latch is not durable
        assert code == 500
        assert (answer["error"], answer["accepted"], answer["state"]) == (
            "latch_not_durable",
            True,
            "HALTED",
        )
        assert answer["latch_durable"] is False
        assert "LATCH NOT DURABLE" in answer["message"]
        await eventually(lambda: not bot_orders(sim), "the bot's order cancelled")
        await eventually(lambda: not any(positions(sim).values()), "flat", timeout_s=20)
        shown = await status(running)
        assert shown["state"] == "HALTED"
        assert shown["latch_durable"] is False
        assert shown["latch_file"]["halted"] is False  # the engine and the disk disagree, shown
        assert "cannot write latch" in shown["latch_error"]
        assert latch_durable_metric(running.guard) == 0.0
        kinds = [r["kind"] for r in read_journal(running.guard.cfg.journal_path)]
        assert kinds.index("global_cancel_sent") < kinds.index("latch_write_failed")
        assert "close_started" in kinds
        cfg = running.guard.cfg

    # Act: restart on the same state directory, whose latch file still says armed
    assert json.loads(cfg.latch_path.read_text())["halted"] is False
    restarted = Guard.open(cfg, fresh_start=False)
    try:
        # Assert: the journal's record of the kill wins; the file is repaired
        assert restarted.engine.state == "HALTED"
        latch = restarted.engine.latch
        assert latch is not None and (latch.mode, latch.reason) == ("flatten", "disk full drill")
        on_disk = json.loads(cfg.latch_path.read_text())
        assert (on_disk["halted"], on_disk["mode"]) == (True, "flatten")
        started = [r for r in read_journal(cfg.journal_path) if r["kind"] == "guard_started"]
        assert started[-1]["latch_from"] == "journal"
    finally:
        restarted.journal.close()


async def test_latch_write_fails_then_guardctl_exit_5_and_retried_until_durable(
    sim: SimGateway,
    mqtt_broker: Broker,
    tmp_path: Path,
    blocker: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    async with running_guard(sim, mqtt_broker, tmp_path) as running:
        executor = running.guard.executor
        executor.latch_path = blocker / "latch.json"
        code = await guardctl(
            "kill", "--reason", "disk full drill", "--url", running.url,
            "--token-file", str(running.token_files["kill"]),
        )  # fmt: skip
        assert code == EXIT_NOT_DURABLE
        assert "LATCH NOT DURABLE" in capsys.readouterr().err
        assert running.state == "HALTED"
        assert not executor.latch_durable

        # Act: the disk recovers (the blocker becomes a directory)
        make_directory(blocker)

        # Assert: the retry lands, and the status and the metric say so
        await eventually(lambda: executor.latch_durable, "the latch retried and written")
        on_disk = json.loads((blocker / "latch.json").read_text())
        assert (on_disk["halted"], on_disk["reason"]) == (True, "disk full drill")
        assert latch_durable_metric(running.guard) == 1.0
        shown = await status(running)
        assert (shown["latch_durable"], shown["latch_file"]["halted"]) == (True, True)
        assert running.journal("latch_durable_again")
