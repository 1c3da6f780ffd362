"""Run the simulated gateway as a program:
`guardd sim --port N [--scenario FILE] [--server-version V]`."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import signal
from pathlib import Path

from guardd.sim.gateway import SimGateway
from guardd.sim.hours import SimClock
from guardd.sim.scenario import Scenario, load_scenario, run_faults

log = logging.getLogger("guardd.sim")


def build_gateway(
    scenario: Scenario, *, host: str, port: int, server_version: int | None = None
) -> SimGateway:
    """A gateway for `scenario`, not yet listening; `server_version` overrides the scenario's
    highest offered server version."""
    config = scenario.gateway_config(host=host, port=port)
    if server_version is not None:
        config = dataclasses.replace(config, server_version=server_version)
    clock = SimClock(scenario.start_time())
    return SimGateway(scenario.build_exchange(now=clock()), config, clock=clock)


async def serve(
    scenario: Scenario, *, host: str, port: int, server_version: int | None = None
) -> None:
    """Serve until SIGINT or SIGTERM, playing the scenario's faults."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    async with build_gateway(
        scenario, host=host, port=port, server_version=server_version
    ) as gateway:
        accounts = ", ".join(gateway.exchange.accounts)
        symbols = ", ".join(i.symbol for i in gateway.exchange.instruments)
        log.info("accounts: %s; instruments: %s", accounts, symbols)
        faults = asyncio.ensure_future(run_faults(gateway, scenario))
        await stop.wait()
        faults.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await faults
        log.info("stopping")


def sim_main(
    *, host: str, port: int, scenario_path: Path | None, server_version: int | None = None
) -> int:
    """Entry point of `guardd sim`; returns the exit code."""
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s sim %(message)s", datefmt="%H:%M:%S"
    )
    scenario = load_scenario(scenario_path) if scenario_path is not None else Scenario()
    asyncio.run(serve(scenario, host=host, port=port, server_version=server_version))
    return 0
