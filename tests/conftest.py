"""Shared fixtures and the two helpers every test uses: `eventually` and `free_port`.

- `await eventually(check, "what is awaited")`: poll `check` (a plain or an async function) until
  it returns something truthy and return that; fail the test after `timeout_s` saying what was
  awaited. Await an event instead where the code under test offers one.
- `free_port()`: a loopback TCP port that was free a moment ago, for a program that must be told
  its port before it starts (servers in the test process bind port 0 and report theirs).
- the `sim` fixture: a simulated gateway on a free loopback port; the support modules' fixtures
  (`pytest_plugins` below) are there for every test too.

`--sim-server-version N` sets the highest server version every simulated gateway of the run offers
(unless a test names one): 226 by default, the protobuf wire a current TWS speaks with ibapi;
`scripts/test` runs the guard's integration tests, drills and demo a second time at 178, the text
wire.
"""

from __future__ import annotations

import asyncio
import inspect
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

import pytest

from ibsim import gateway as sim_gateway
from ibsim.gateway import SimGateway
from ibsim.messages import MAX_SERVER_VERSION, MIN_SERVER_VERSION
from ibsim.scenario import Scenario, parse_scenario
from ibsim.server import build_gateway

# Fixtures of the support modules, for every test to take by name: mqtt_broker and
# mqtt_broker_with_password (a real mosquitto), systemd (the notify socket), bot (a runaway bot).
pytest_plugins = ["tests.mqtt_broker", "tests.fake_systemd", "tests.control_harness"]


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--sim-server-version",
        type=int,
        default=None,
        help=f"highest TWS API server version the simulated gateways offer "
        f"({MIN_SERVER_VERSION}-{MAX_SERVER_VERSION}; default {MAX_SERVER_VERSION})",
    )


def pytest_configure(config: pytest.Config) -> None:
    version = config.getoption("--sim-server-version")
    if version is not None:
        if not MIN_SERVER_VERSION <= version <= MAX_SERVER_VERSION:
            raise pytest.UsageError(f"--sim-server-version {version} is not a version we speak")
        sim_gateway.DEFAULT_SERVER_VERSION = version


def pytest_report_header(config: pytest.Config) -> str:
    return f"simulated gateway: server version {sim_gateway.DEFAULT_SERVER_VERSION}"


T = TypeVar("T")


async def eventually(
    check: Callable[[], T | Awaitable[T]],
    what: str | None = None,
    *,
    timeout_s: float = 10.0,
    interval_s: float = 0.02,
) -> T:
    """The first truthy result of `check()` (awaited when it is a coroutine), polled every
    `interval_s`; AssertionError after `timeout_s` naming `what` (by default `check`'s source)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while True:
        result = check()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return result
        if loop.time() > deadline:
            raise AssertionError(f"not within {timeout_s:g} s: {what or _source(check)}")
        await asyncio.sleep(interval_s)


def _source(check: Callable[..., object]) -> str:
    try:
        return inspect.getsource(check).strip()
    except (OSError, TypeError):
        return repr(check)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (another process may take it before the
    caller binds it: use port 0 where the server reports the port it got)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


SCENARIO = {
    "gateway": {"seed": 3, "market_interval_s": 0.05, "pnl_interval_s": 0.2},
    "accounts": [{"id": "DU000001", "cash": 1_000_000}],
    "instruments": [
        {"symbol": "AAPL", "con_id": 265598, "price": 190.0, "volatility": 0.0},
        {"symbol": "MSFT", "con_id": 272093, "price": 420.0, "volatility": 0.0},
        {
            "symbol": "ES",
            "sec_type": "FUT",
            "con_id": 620731015,
            "exchange": "CME",
            "multiplier": 50,
            "last_trade_date": "20261218",
            "local_symbol": "ESZ6",
            "price": 6000.0,
            "spread": 0.25,
            "min_tick": 0.25,
            "volatility": 0.0,
            "initial_margin_per_contract": 16000,
            "maint_margin_per_contract": 14500,
        },
    ],
    "positions": [
        {"symbol": "AAPL", "quantity": 1000, "avg_price": 180.0},
        {"symbol": "ES", "quantity": -2, "avg_price": 6010.0},
    ],
}


@pytest.fixture
def scenario() -> Scenario:
    return parse_scenario(SCENARIO)


@pytest.fixture
async def sim(scenario: Scenario) -> AsyncIterator[SimGateway]:
    """A running simulated gateway on a free loopback port (volatility 0: prices stay put)."""
    async with build_gateway(scenario, host="127.0.0.1", port=0) as gateway:
        yield gateway
