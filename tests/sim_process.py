"""`guardd sim` as a real process, for the drills that kill the gateway with -9 and start it
again on the same `--state FILE`
(tests/integration/ibsim/test_sim_state.py, tests/integration/drills/test_sim_state_drills.py)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ibsim.exchange import Exchange
from ibsim.scenario import load_scenario
from ibsim.state import StateFile
from tests.conftest import eventually


def write_scenario(
    path: Path, *, gateway: str = "", positions: str = "", market_interval_s: float = 0.05
) -> Path:
    """A scenario TOML: one account, AAPL and ES with prices that stay put; `gateway` adds lines
    to [gateway], `positions` [[positions]] tables."""
    path.write_text(
        f"""
[gateway]
seed = 3
market_interval_s = {market_interval_s}
pnl_interval_s = 0.2
{gateway}

[[accounts]]
id = "DU000001"
cash = 1000000

[[instruments]]
symbol = "AAPL"
con_id = 265598
price = 190.0
volatility = 0.0

[[instruments]]
symbol = "ES"
sec_type = "FUT"
con_id = 620731015
exchange = "CME"
multiplier = 50
last_trade_date = "20261218"
local_symbol = "ESZ6"
price = 6000.0
spread = 0.25
min_tick = 0.25
volatility = 0.0
initial_margin_per_contract = 16000
maint_margin_per_contract = 14500

{positions}
"""
    )
    return path


class SimProcess:
    """`python -m guardd sim --port P --scenario S --state F [extra...]`, started and killed at
    will; its stdout and stderr go to `log`."""

    def __init__(
        self, port: int, scenario: Path, state: Path, log: Path, extra: Sequence[str] = ()
    ) -> None:
        self.port, self.scenario, self.state, self.log = port, scenario, state, log
        self.extra = tuple(extra)
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def args(self) -> list[str]:
        return [
            sys.executable,
            "-m",
            "guardd",
            "sim",
            "--port",
            str(self.port),
            "--scenario",
            str(self.scenario),
            "--state",
            str(self.state),
            *self.extra,
        ]

    async def start(self, timeout_s: float = 20.0) -> None:
        """Start the process and wait until it listens (it listens once its state is loaded)."""
        self.proc = await asyncio.to_thread(self._launch)
        self.starts += 1

        def listening() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"guardd sim ended with {self.proc.returncode}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return True
            except OSError:
                return False

        try:
            await eventually(
                listening, "guardd sim listening", timeout_s=timeout_s, interval_s=0.05
            )
        except AssertionError as failed:
            raise AssertionError(f"{failed}: {self.tail()}") from None

    def _launch(self) -> subprocess.Popen[bytes]:
        with self.log.open("ab") as out:
            return subprocess.Popen(self.args(), stdout=out, stderr=subprocess.STDOUT)

    def kill9(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=10)

    def stop(self) -> int:
        """SIGTERM (a clean stop) and the exit code; nothing when it is not running."""
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc is not None else 0
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=10)

    def output(self) -> str:
        """Everything the process wrote so far (stdout and stderr), across its starts."""
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-2000:] if self.log.exists() else ""


def saved_state(path: Path) -> dict[str, Any]:
    """The state file as the gateway last wrote it (a read of a complete, renamed file)."""
    document: dict[str, Any] = json.loads(path.read_bytes())
    state: dict[str, Any] = document["state"]
    return state


def saved_exchange(scenario: Path, state: Path) -> Exchange:
    """An exchange holding what the state file holds (its fills, orders, positions)."""
    loaded = load_scenario(scenario)
    exchange = loaded.build_exchange(now=0.0)
    saved = StateFile(state).load()
    assert saved is not None, f"no state in {state}"
    exchange.restore(saved["exchange"])
    return exchange
