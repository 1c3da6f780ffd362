"""The deployment files (deploy/: systemd units, Prometheus alert rules, the Grafana dashboard)
as tests read them, the tools that check them, and a Prometheus's firing alerts."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import aiohttp
import pytest

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
UNITS = {
    "guardd.service": DEPLOY / "systemd" / "guardd.service",
    # a template verifies and scores as an instance of it
    "guardd@DU1234567.service": DEPLOY / "systemd" / "guardd@.service",
}
DASHBOARD = DEPLOY / "grafana" / "guardd.json"
ALERTS = DEPLOY / "prometheus" / "alerts.yml"


def tool(name: str, package: str) -> str:
    """The path of `name`, or a test failure naming the package that provides it."""
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} not found on PATH: install the {package} package (scripts/bootstrap)")
    return path


def directives(unit: Path) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for line in unit.read_text().splitlines():
        if "=" in line and not line.lstrip().startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            found.setdefault(key.strip(), []).append(value.strip())
    return found


def dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return loaded


def panel_exprs(board: dict[str, Any]) -> list[tuple[str, str]]:
    """(panel title, expr) of every target of every panel, rows' nested panels included."""
    found = []
    for panel in board["panels"]:
        for inner in [panel, *panel.get("panels", [])]:
            for target in inner.get("targets", []):
                found.append((inner["title"], target["expr"]))
    return found


async def firing_alert(
    session: aiohttp.ClientSession, url: str, name: str
) -> dict[str, Any] | None:
    """The firing alert called `name` on the Prometheus at `url`; None while there is none (or
    Prometheus does not answer yet)."""
    try:
        async with session.get(f"{url}/api/v1/alerts") as response:
            body = await response.json()
    except aiohttp.ClientError:
        return None
    for alert in body["data"]["alerts"]:
        if alert["labels"]["alertname"] == name and alert["state"] == "firing":
            found: dict[str, Any] = alert
            return found
    return None
