"""Run the simulated gateway as a program:
`guardd sim --port N [--scenario FILE] [--server-version V] [--state FILE] [--show-every S]`."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import signal
import sys
from pathlib import Path

from ibsim.gateway import SimGateway
from ibsim.hours import SimClock
from ibsim.scenario import Scenario, load_scenario, run_faults
from ibsim.show import render_gateway_side
from ibsim.state import StateFile

log = logging.getLogger("ibsim")


def build_gateway(
    scenario: Scenario,
    *,
    host: str,
    port: int,
    server_version: int | None = None,
    state_path: Path | None = None,
) -> SimGateway:
    """A gateway for `scenario`, not yet listening; `server_version` overrides the scenario's
    highest offered server version. With `state_path` the account (positions, cash, orders,
    fills, id sequences) comes from that file when it exists, and is saved to it on every
    change (ibsim/state.py); a file that cannot be read raises StateFileError."""
    config = scenario.gateway_config(host=host, port=port)
    if server_version is not None:
        config = dataclasses.replace(config, server_version=server_version)
    clock = SimClock(scenario.start_time())
    state_file = StateFile(state_path) if state_path is not None else None
    saved = state_file.load() if state_file is not None else None
    gateway = SimGateway(
        scenario.build_exchange(now=clock()), config, clock=clock, state_file=state_file
    )
    if saved is not None:
        gateway.restore(saved)
        log.info("state restored from %s", state_path)
    return gateway


async def serve(
    scenario: Scenario,
    *,
    host: str,
    port: int,
    server_version: int | None = None,
    state_path: Path | None = None,
    show_every_s: float | None = None,
) -> None:
    """Serve until SIGINT or SIGTERM, playing the scenario's faults. The gateway side (positions
    and working orders per client, ibsim/show.py) is printed to stdout on SIGUSR1, and
    every `show_every_s` seconds when given."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    gateway = build_gateway(
        scenario, host=host, port=port, server_version=server_version, state_path=state_path
    )
    with contextlib.suppress(NotImplementedError, AttributeError):  # no SIGUSR1 on Windows
        loop.add_signal_handler(signal.SIGUSR1, _show, gateway)
    async with gateway:
        accounts = ", ".join(gateway.exchange.accounts)
        symbols = ", ".join(i.symbol for i in gateway.exchange.instruments)
        log.info("accounts: %s; instruments: %s", accounts, symbols)
        faults = asyncio.ensure_future(run_faults(gateway, scenario))
        shows = (
            asyncio.ensure_future(_show_loop(gateway, show_every_s))
            if show_every_s is not None
            else None
        )
        await stop.wait()
        for task in (faults, shows):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        log.info("stopping")


async def _show_loop(gateway: SimGateway, every_s: float) -> None:
    while True:
        await asyncio.sleep(every_s)
        _show(gateway)


def _show(gateway: SimGateway) -> None:
    """Print the gateway side to stdout in one write; a stdout that cannot be written to is
    logged, never the end of the gateway (the clients trading against it come first)."""
    try:
        sys.stdout.write(render_gateway_side(gateway.exchange))
        sys.stdout.flush()
    except (OSError, ValueError) as exc:  # ValueError: stdout closed
        log.warning("cannot print the gateway side: %s", exc)


def sim_main(
    *,
    host: str,
    port: int,
    scenario_path: Path | None,
    server_version: int | None = None,
    state_path: Path | None = None,
    show_every_s: float | None = None,
) -> int:
    """Entry point of `guardd sim`; returns the exit code (StateFileError and ScenarioError
    are the caller's to report)."""
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s sim %(message)s", datefmt="%H:%M:%S"
    )
    scenario = load_scenario(scenario_path) if scenario_path is not None else Scenario()
    asyncio.run(
        serve(
            scenario,
            host=host,
            port=port,
            server_version=server_version,
            state_path=state_path,
            show_every_s=show_every_s,
        )
    )
    return 0
