"""Helpers for running a real `Guard` against the simulated gateway over loopback TCP.

- `sim_gateway(**changes)`: a SimGateway built from the shared test scenario with changes to its
  sections (e.g. `gateway={"partial_fill_quantity": 100}`, `positions=[...]`).
- `guard_config(port, state_dir, extra_toml)`: a Config for that gateway, with HTTP control and
  metrics off unless asked (HTTP gets a free port and throwaway token files).
- `running_guard(cfg)`: start `Guard.run` as a task, wait until it is ready, stop it on exit.
- `journal(cfg)`: the audit journal's records.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import secrets
from collections.abc import AsyncIterator
from decimal import Decimal
from pathlib import Path
from typing import Any

from guardd.config import Config, parse_config
from guardd.runtime.guard import Guard
from guardd.state.journal import read_journal
from ibsim.gateway import SimGateway
from ibsim.scenario import parse_scenario
from ibsim.server import build_gateway
from tests.conftest import SCENARIO, free_port

ACCOUNT = "DU000001"
AAPL, MSFT, ES = 265598, 272093, 620731015
GUARD_CLIENT_ID = 0  # the sim's master client id

BASE_TOML = """
account = "{account}"
state_dir = "{state_dir}"
dry_run = {dry_run}

[ib]
host = "127.0.0.1"
port = {port}
client_id = {client_id}
connect_timeout_s = 5.0
reconnect_backoff_min_s = 0.2
reconnect_backoff_max_s = 1.0

[budget]
messages_per_second = 40

[metrics]
enabled = false
"""


def scenario_data(**changes: Any) -> dict[str, Any]:
    """The shared test scenario with whole sections replaced or (for `gateway`) updated."""
    data: dict[str, Any] = copy.deepcopy(SCENARIO)
    for key, value in changes.items():
        if key == "gateway":
            data["gateway"] = {**data["gateway"], **value}
        else:
            data[key] = value
    return data


@contextlib.asynccontextmanager
async def sim_gateway(**changes: Any) -> AsyncIterator[SimGateway]:
    """A running simulated gateway on a free port, from the test scenario with `changes`."""
    scenario = parse_scenario(scenario_data(**changes))
    async with build_gateway(scenario, host="127.0.0.1", port=0) as gateway:
        yield gateway


def guard_config(
    port: int,
    state_dir: Path,
    extra_toml: str = "",
    *,
    dry_run: bool = False,
    http: bool = False,
) -> Config:
    """A guard config for the gateway on `port`; `extra_toml` adds limits, kill mode, etc."""
    state_dir.mkdir(parents=True, exist_ok=True)
    text = BASE_TOML.format(
        account=ACCOUNT,
        state_dir=state_dir,
        dry_run="true" if dry_run else "false",
        port=port,
        client_id=GUARD_CLIENT_ID,
    )
    if http:
        lines = ["[control.http]", f"port = {free_port()}", "[control.http.token_files]"]
        for role in ("read", "kill", "arm"):
            path = state_dir / f"token-{role}"
            path.write_text(secrets.token_urlsafe(24))
            path.chmod(0o600)
            lines.append(f'{role} = "{path}"')
        text += "\n".join(lines) + "\n"
    else:
        text += "\n[control.http]\nenabled = false\n"
    return parse_config(text + "\n" + extra_toml, source="test config")


@contextlib.asynccontextmanager
async def running_guard(
    cfg: Config,
    *,
    fresh_start: bool = True,
    wait_ready: bool = True,
    ready_timeout_s: float = 10.0,
) -> AsyncIterator[Guard]:
    """A Guard running as a task; ready (synced) on entry unless told not to wait; stopped
    (and its task awaited, so errors surface) on exit."""
    guard = Guard.open(cfg, fresh_start=fresh_start)
    stop = asyncio.Event()
    task = asyncio.create_task(guard.run(stop), name="guard")
    try:
        if wait_ready:
            ready = asyncio.create_task(guard.ready_event.wait())
            done, _ = await asyncio.wait(
                {ready, task}, timeout=ready_timeout_s, return_when=asyncio.FIRST_COMPLETED
            )
            if task in done:
                ready.cancel()
                task.result()  # raises what killed the guard
                raise AssertionError("the guard stopped before it was ready")
            if ready not in done:
                ready.cancel()
                raise AssertionError(f"the guard was not ready in {ready_timeout_s} s")
        yield guard
    finally:
        stop.set()
        await asyncio.wait_for(task, 15)


def journal(cfg: Config) -> list[dict[str, Any]]:
    """Every record of the guard's audit journal."""
    return list(read_journal(cfg.journal_path))


def journal_kinds(cfg: Config) -> list[str]:
    return [str(rec.get("kind")) for rec in journal(cfg)]


def position(sim: SimGateway, con_id: int, account: str = ACCOUNT) -> float:
    """The gateway's position in one contract (0 when flat)."""
    for p in sim.exchange.positions(account):
        if p.instrument.con_id == con_id:
            return float(p.position)
    return 0.0


def flat(sim: SimGateway, account: str = ACCOUNT) -> bool:
    """No position left at the gateway, in any contract."""
    return all(p.position == 0 for p in sim.exchange.positions(account))


def guard_orders(sim: SimGateway) -> list[Any]:
    """Every order the guard (its client id) ever placed at the gateway."""
    return [o for o in sim.exchange.orders() if o.client_id == GUARD_CLIENT_ID]


def guard_fill_totals(sim: SimGateway) -> dict[int, Decimal]:
    """Signed quantity the guard's orders filled, per contract (BUY +, SELL -)."""
    totals: dict[int, Decimal] = {}
    for fill in sim.exchange.fills():
        if fill.client_id != GUARD_CLIENT_ID:
            continue
        sign = 1 if fill.side == "BOT" else -1
        con_id = fill.instrument.con_id
        totals[con_id] = totals.get(con_id, Decimal(0)) + sign * Decimal(str(fill.shares))
    return totals


def starting_positions(sim: SimGateway, account: str = ACCOUNT) -> dict[int, float]:
    """The gateway's positions now, by contract (take before the guard acts)."""
    return {p.instrument.con_id: float(p.position) for p in sim.exchange.positions(account)}


def zero_crossings(
    sim: SimGateway, start: dict[int, float], account: str = ACCOUNT, *, since: int = 0
) -> list[tuple[int, float, float]]:
    """Replay the gateway's fills from `start` (the positions before fill number `since`): every
    (con_id, before, after) where a position went through zero to the other side, or a guard
    order opened a position from flat. Empty when nothing was ever over-flattened."""
    running = dict(start)
    crossed: list[tuple[int, float, float]] = []
    for fill in sim.exchange.fills()[since:]:
        if fill.account != account:
            continue
        con_id = fill.instrument.con_id
        before = running.get(con_id, 0.0)
        after = before + (fill.shares if fill.side == "BOT" else -fill.shares)
        if before * after < 0 or (before == 0 and fill.client_id == GUARD_CLIENT_ID):
            crossed.append((con_id, before, after))
        running[con_id] = after
    return crossed
