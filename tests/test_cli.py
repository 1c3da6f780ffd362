"""The `guardd` command line: check-config, and `run` refusing an account its login lacks."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import pytest

from guardd.sim.gateway import SimGateway
from tests.drill_helpers import write_run_config

ROOT = Path(__file__).resolve().parent.parent


async def guardd(*args: str, timeout_s: float = 30.0) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "guardd",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout_s)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


@pytest.mark.parametrize("name", ["guardd.example.toml", "demo.toml"])
async def test_shipped_config_then_check_config_ok(name: str) -> None:
    code, out, _ = await guardd("check-config", str(ROOT / "configs" / name))
    assert code == 0
    assert "ok" in out


async def test_bad_config_then_check_config_78_naming_the_key(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('account = "DU1"\nstate_dir = "s"\n[ib]\nclient_id = "zero"\n')
    code, _, err = await guardd("check-config", str(bad))
    assert code == 78
    assert "ib.client_id" in err


@pytest.mark.integration
async def test_account_not_managed_by_the_login_then_run_exits_78(
    sim: SimGateway, tmp_path: Path
) -> None:
    config, _, _ = write_run_config(tmp_path / "state", sim.port)
    text = config.read_text().replace('account = "DU000001"', 'account = "DU999999"')
    config.write_text(text)
    code, _, err = await guardd("run", "-c", str(config), "--fresh-start")
    assert code == 78
    assert "DU999999 is not managed by this login" in err
    assert sim.received_by_id.get(58, 0) == 0  # nothing was cancelled on someone else's login
