"""Start-up with many positions: guard start -> every position valued and every rule evaluable.

The simulated gateway (`bench.simproc`, its own process) holds N stock positions and plays IB's
market-data line limit (100 a client, error 101 beyond). The guard (`guardd run`, the real daemon)
is started with the leverage, margin-cushion and daily-loss rules on (levels far away, so nothing
trips) and read from outside through `GET /v1/status`, polled every 10 ms:

- `ready`: `/readyz` answers 200 (synced: positions and open orders downloaded);
- `valued`: status `positions` = N and `positions_unvalued` = 0 (every held position has a value);
- `evaluable`: also `rule_levels` holds each configured rule and none of them says "data".

Times are from just before the guard process is spawned (host monotonic clock). Also reported:
the guard's CPU seconds until `evaluable`, the market-data lines it then holds, the host's load
average before and after, and the import floor measured in the same run: the wall time of a
Python process that only imports what `guardd run` imports (no guard can be ready before it).

The guard starts from byte-compiled modules, as an installed guard does (`pip install` writes
every module's ``.pyc``; a development environment with ``PYTHONDONTWRITEBYTECODE`` set, or a
read-only install under systemd's ``ProtectSystem=strict`` without them, compiles every module
from source at every start): `compile_bytecode` writes what is missing first. The import floor
is also measured compiling from source (no bytecode cache), to show what that costs.
The full mode also waits for the background subscriptions (reqPnLSingle per position) to
complete, which the quick mode skips.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sysconfig
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

from bench.run import BUDGET, PY, ROOT, Guard, GuardSetup, Sim

RULES = ("leverage", "margin_cushion", "daily_loss")
LIMITS_TOML = """
[limits.leverage]
kill = 1000.0
[limits.margin_cushion]
kill = 0.0001
[limits.daily_loss]
kill = 0.99
"""
IB_LINES = 100  # IB's default market-data lines; the guard's default is 90 of them
POLL_S = 0.01


class LimitedSim(Sim):
    """The benchmark's gateway with IB's line limit."""

    def __init__(self, positions: int, max_tickers: int) -> None:
        super().__init__(positions)
        self.args += ["--max-tickers", str(max_tickers)]


class RulesGuard(Guard):
    """The benchmark's guard with the position-value rules on."""

    def write_config(self) -> Path:
        path = super().write_config()
        path.write_text(path.read_text() + LIMITS_TOML)
        return path


FLOOR_IMPORTS = "import guardd.cli; guardd.cli.import_structlog(); import guardd.runtime.guard"
"""What `guardd run` imports before it starts (`guardd.cli._run`)."""


def compile_bytecode() -> None:
    """Write the ``.pyc`` of guardd, ibsim and the environment's packages that are missing."""
    subprocess.run(
        [PY, "-m", "compileall", "-q", "-j", "0", "guardd", "ibsim", sysconfig.get_path("purelib")],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        check=False,  # a package's unparsable test fixture is not the guard's business
    )


async def import_floor(*, from_source: bool = False) -> float:
    """Seconds for a Python process that imports the guard's modules and exits; `from_source`:
    with an empty bytecode cache (every module compiled, none written)."""
    with tempfile.TemporaryDirectory(prefix="guardd-nopyc-") as empty:
        flags = ["-B", "-X", f"pycache_prefix={empty}"] if from_source else []
        started = time.monotonic()
        proc = await asyncio.create_subprocess_exec(
            PY, *flags, "-c", FLOOR_IMPORTS, cwd=ROOT, stdout=subprocess.DEVNULL
        )
        await proc.wait()
        return time.monotonic() - started


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process, in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def evaluable(status: dict[str, Any], positions: int) -> tuple[bool, bool]:
    """(every position valued, and every configured rule evaluable) in a status document."""
    valued = (
        bool(status.get("synced"))
        and status.get("positions") == positions
        and status.get("positions_unvalued") == 0
        and status.get("gross_position_value") is not None
    )
    levels = status.get("rule_levels") or {}
    judged = all(levels.get(rule) not in (None, "data") for rule in RULES)
    return valued, valued and judged


async def bench_startup(
    workdir: Path, http: aiohttp.ClientSession, positions: int, *, background: bool
) -> dict[str, Any]:
    """One start of the guard against `positions` positions (see the module doc)."""
    compile_bytecode()
    load_before = os.getloadavg()
    floor_from_source = await import_floor(from_source=True)
    floor = await import_floor()
    async with LimitedSim(positions, IB_LINES) as sim:
        guard = RulesGuard(sim.port, GuardSetup(), workdir / f"startup-{positions}")
        t0 = time.monotonic()
        marks: dict[str, float] = {}
        last: dict[str, Any] = {}
        try:
            await guard.start(http, timeout_s=120)
            marks["ready"] = time.monotonic() - t0
            deadline = t0 + 120
            while time.monotonic() < deadline:
                last = await guard.status(http)
                valued, judged = evaluable(last, positions)
                now = time.monotonic() - t0
                if valued:
                    marks.setdefault("valued", now)
                if judged:
                    marks["evaluable"] = now
                    break
                await asyncio.sleep(POLL_S)
            assert guard.proc is not None
            cpu = cpu_seconds(guard.proc.pid)
            lines_then = last.get("market_data_lines")
            await asyncio.sleep(2.0)  # the lines settle
            lines_later = (await guard.status(http)).get("market_data_lines")
            subscribed = None
            if background:
                started = time.monotonic()
                await sim.wait_subscribed(0, positions, positions / BUDGET * 4 + 30)
                subscribed = time.monotonic() - started + (started - t0)
            state = await sim.req("state")
        finally:
            guard.stop()
    return {
        "positions": positions,
        "ready_s": _r(marks.get("ready")),
        "valued_s": _r(marks.get("valued")),
        "evaluable_s": _r(marks.get("evaluable")),
        "pnl_single_all_subscribed_s": _r(subscribed),
        "import_floor_s": _r(floor),
        "import_floor_from_source_s": _r(floor_from_source),
        "guard_cpu_s_to_evaluable": round(cpu, 2),
        "lines_at_evaluable": lines_then,
        "lines_2s_later": lines_later,
        "error_100": state["pacing_violations"],
        "rule_levels": last.get("rule_levels"),
        "loadavg_before": [round(x, 2) for x in load_before],
        "loadavg_after": [round(x, 2) for x in os.getloadavg()],
    }


def _r(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


def row(result: dict[str, Any]) -> tuple[str, str, str, bool | None]:
    """The summary table's row for `bench.run.table`."""
    figure = (
        f"{result['evaluable_s']} s (ready {result['ready_s']} s, valued {result['valued_s']} s, "
        f"import floor {result['import_floor_s']} s ({result['import_floor_from_source_s']} s "
        f"compiling), guard CPU "
        f"{result['guard_cpu_s_to_evaluable']} s; {result['lines_2s_later']} lines, "
        f"load {result['loadavg_before'][0]})"
    )
    met = result["evaluable_s"] is not None and result["evaluable_s"] < 2.0
    return (f"9. start -> {result['positions']} valued + rules", figure, "< 2 s", met)
