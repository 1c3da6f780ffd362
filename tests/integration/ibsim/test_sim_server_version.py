"""The simulated gateway's highest server version: configurable in scenarios and on the command
line, and what ibapi negotiates with a running `guardd sim`."""

from __future__ import annotations

import asyncio
import sys

import pytest

from guardd.cli import main
from ibsim.gateway import GatewayConfig
from ibsim.scenario import ScenarioError, parse_scenario
from tests.conftest import eventually, free_port
from tests.ibapi_harness import IbapiClient


def test_scenario_server_version_then_gateway_offers_it() -> None:
    assert (
        parse_scenario({"gateway": {"server_version": 203}}).gateway_config().server_version == 203
    )
    assert parse_scenario({}).gateway_config().server_version == GatewayConfig().server_version


@pytest.mark.parametrize("version", [177, 227])
def test_scenario_server_version_out_of_range_then_error_names_the_key(version: int) -> None:
    with pytest.raises(ScenarioError, match=r"gateway\.server_version"):
        parse_scenario({"gateway": {"server_version": version}})


@pytest.mark.parametrize("version", [177, 227])
def test_gateway_config_out_of_range_then_refused(version: int) -> None:
    with pytest.raises(ValueError, match="server_version"):
        GatewayConfig(server_version=version)


@pytest.mark.parametrize("text", ["300", "latest"])
def test_guardd_sim_with_bad_server_version_then_usage_error(
    text: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["sim", "--server-version", text])

    assert exited.value.code == 2
    assert "--server-version" in capsys.readouterr().err


@pytest.mark.integration
async def test_guardd_sim_program_with_server_version_then_ibapi_negotiates_it() -> None:
    port = free_port()
    proc = await asyncio.create_subprocess_exec(
        *[sys.executable, "-m", "ibsim", "--port", str(port), "--server-version", "215"],
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    client = IbapiClient()
    try:

        async def started() -> bool:
            try:
                await client.start(port, 4, timeout=2)
            except (ConnectionRefusedError, OSError, TimeoutError):
                return False
            return True

        await eventually(started, "ibapi connected to the ibsim program", interval_s=0.1)
        assert client.serverVersion() == 215
        client.reqPositions()
        await client.wait_for("positionEnd")
    finally:
        await client.stop()
        proc.terminate()
        raw, _ = await asyncio.wait_for(proc.communicate(), 10)
    assert "server versions 178..215" in raw.decode()


def test_gateway_without_a_version_then_offers_the_runs_wire(pytestconfig: pytest.Config) -> None:
    # scripts/test runs the guard's tests again with --sim-server-version 178 (the text wire).
    chosen = pytestconfig.getoption("--sim-server-version")

    assert GatewayConfig().server_version == (226 if chosen is None else chosen)
