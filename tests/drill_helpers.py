"""Helpers for the fault drills (tests/integration/drills/test_drills.py): guards in process and as
`guardd run` processes, a bot that modifies its orders, and checks on the gateway's own records.

`GuardProcesses` starts `guardd run -c FILE` processes quickly: a zygote interpreter imports
guardd once and forks one child per run, and each child runs exactly what the `guardd` console
script runs (`guardd.cli.main(["run", "-c", FILE, ...])`), so a child is a real guard process that
a test can SIGKILL at any instant. (A fresh interpreter spends about 1.5 s importing guardd; 100
of them would not fit the drill's time budget.)

`guardd_run(tmp_path, ib_port)` is the plain way: one `python -m guardd run` child with HTTP
control, as a `GuardRun` (its log, journal, latch; `stop_with(signal)`).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

import aiohttp
from ibapi.contract import Contract
from ibapi.order import Order

from guardd.config import Config
from guardd.control.commands import ControlCommand
from guardd.runtime.guard import Guard
from guardd.state.journal import read_journal
from ibsim.bot import RunawayBot
from ibsim.gateway import PLACE_ORDER, SimGateway
from ibsim.types import OrderRequest
from tests.conftest import eventually, free_port
from tests.guard_harness import (
    ACCOUNT,
    GUARD_CLIENT_ID,
    zero_crossings,
)
from tests.ibapi_harness import IbapiClient, connected

REQ_POSITIONS, REQ_ALL_OPEN_ORDERS, REQ_GLOBAL_CANCEL = 61, 16, 58
CHECKER_CLIENT_ID = 9  # the independent client that reads the end state


@contextlib.asynccontextmanager
async def running(
    cfg: Config,
    *,
    fresh_start: bool = True,
    wait_ready: bool = True,
    heartbeat: tuple[float, float] | None = None,
    prepare: Callable[[Guard], None] | None = None,
    **guard_kwargs: Any,
) -> AsyncIterator[Guard]:
    """A Guard running as a task (like tests.guard_harness.running_guard), with its broker's
    heartbeat set to (interval, timeout) and `prepare(guard)` called before it runs."""
    guard = Guard.open(cfg, fresh_start=fresh_start, **guard_kwargs)
    if heartbeat is not None:
        guard.broker.heartbeat_interval_s, guard.broker.heartbeat_timeout_s = heartbeat
    if prepare is not None:
        prepare(guard)
    stop = asyncio.Event()
    task = asyncio.create_task(guard.run(stop), name="guard")
    try:
        if wait_ready:
            ready = asyncio.create_task(guard.ready_event.wait())
            done, _ = await asyncio.wait({ready, task}, timeout=10, return_when="FIRST_COMPLETED")
            if task in done:
                ready.cancel()
                task.result()
                raise AssertionError("the guard stopped before it was ready")
            if ready not in done:
                ready.cancel()
                raise AssertionError("the guard was not ready in 10 s")
        yield guard
    finally:
        stop.set()
        await asyncio.wait_for(task, 15)


@contextlib.asynccontextmanager
async def client(port: int, client_id: int) -> AsyncIterator[IbapiClient]:
    """An official ibapi client connected as `client_id`, stopped on exit."""
    c = await connected(port, client_id)
    try:
        yield c
    finally:
        await c.stop()


async def gateway_says_flat(port: int) -> tuple[dict[int, Decimal], int]:
    """Positions (non-zero, guarded account) and working orders, as a fresh client sees them."""
    async with client(port, CHECKER_CLIENT_ID) as checker:
        checker.reqPositions()
        await checker.wait_for("positionEnd")
        positions = {
            int(args[1].conId): Decimal(str(args[2]))
            for args in checker.named("position")
            if args[0] == ACCOUNT and Decimal(str(args[2])) != 0
        }
        checker.reqAllOpenOrders()
        await checker.wait_for("openOrderEnd")
        working = {
            args[0]
            for args in checker.named("orderStatus")
            if args[1] not in ("Filled", "Cancelled", "ApiCancelled", "Inactive")
        }
        return positions, len(working)


def kill_command(mode: str | None = None, reason: str = "drill") -> ControlCommand:
    return ControlCommand(
        action="kill",
        principal="drill",
        channel="http",
        reason=reason,
        mode=mode,  # type: ignore[arg-type]
    )


# ---- a bot that modifies ------------------------------------------------------------------------


def modify_limit(
    bot: RunawayBot, order_id: int, symbol: str, action: str, qty: float, px: float
) -> None:
    """Re-send a working order's id with a new limit price (a modification at IB)."""
    contract = Contract()
    contract.symbol, contract.secType, contract.exchange, contract.currency = (
        symbol,
        "STK",
        "SMART",
        "USD",
    )
    order = Order()
    order.action, order.orderType, order.tif = action, "LMT", "DAY"
    order.totalQuantity = Decimal(str(qty))
    order.lmtPrice = px
    bot.client.placeOrder(order_id, contract, order)


# ---- what the guard sent, as the gateway received it --------------------------------------------


@dataclass(frozen=True, slots=True)
class Sent:
    at: float
    msg_id: int
    order_id: int = 0
    order_ref: str = ""


class GuardWire:
    """Every message the guard's client id sends, in arrival order (placeOrder decoded)."""

    def __init__(self, sim: SimGateway, client_id: int = GUARD_CLIENT_ID) -> None:
        self.sent: list[Sent] = []
        self.client_id = client_id
        sim.on_message(self._on_message)
        sim.on_order(self._on_order)

    def _on_message(self, client_id: int, msg_id: int, fields: list[str]) -> None:
        if client_id == self.client_id and msg_id != PLACE_ORDER:
            self.sent.append(Sent(time.monotonic(), msg_id))

    def _on_order(self, client_id: int, req: OrderRequest) -> None:
        if client_id == self.client_id:
            self.sent.append(Sent(time.monotonic(), PLACE_ORDER, req.order_id, req.order_ref))

    def places(self) -> list[Sent]:
        return [s for s in self.sent if s.msg_id == PLACE_ORDER]

    def mark(self) -> int:
        return len(self.sent)


# ---- `guardd run` processes ---------------------------------------------------------------------

_ZYGOTE = r"""
import os, signal, sys
import guardd.cli
signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # children are reaped by the kernel
for line in sys.stdin:
    args = line.split()
    log = args.pop()
    pid = os.fork()
    if pid == 0:
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)
        code = 1
        try:
            code = guardd.cli.main(args)
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    print(pid, flush=True)
"""


class GuardProcesses:
    """Forks `guardd run` processes from one pre-imported interpreter (see the module doc)."""

    def __init__(self) -> None:
        self._zygote = subprocess.Popen(
            [sys.executable, "-c", _ZYGOTE],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            bufsize=1,
        )

    def start(self, config: Path, log: Path, *, fresh_start: bool) -> int:
        """Start `guardd run -c config [--fresh-start]`; returns its pid."""
        assert self._zygote.stdin is not None and self._zygote.stdout is not None
        args = ["run", "-c", str(config)] + (["--fresh-start"] if fresh_start else [])
        self._zygote.stdin.write(" ".join([*args, str(log)]) + "\n")
        return int(self._zygote.stdout.readline())

    def close(self) -> None:
        if self._zygote.stdin is not None:
            self._zygote.stdin.close()
        self._zygote.wait(timeout=10)
        if self._zygote.stdout is not None:
            self._zygote.stdout.close()


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


async def wait_gone(pid: int, timeout_s: float = 10.0) -> None:
    """Wait for process `pid` to end; SIGKILL it (and fail) when it outlives `timeout_s`."""
    try:
        await eventually(lambda: not alive(pid), f"guard process {pid} ended", timeout_s=timeout_s)
    except AssertionError:
        os.kill(pid, signal.SIGKILL)
        raise


def write_run_config(state_dir: Path, ib_port: int, extra_toml: str = "") -> tuple[Path, str, str]:
    """A `guardd run` config for the gateway on `ib_port` with HTTP control on a free port.

    Returns (config path, base URL, kill token)."""
    state_dir.mkdir(parents=True, exist_ok=True)
    http_port = free_port()
    tokens: dict[str, str] = {}
    lines = []
    for role in ("read", "kill", "arm"):
        token = secrets.token_urlsafe(24)
        path = state_dir / f"token-{role}"
        path.write_text(token)
        path.chmod(0o600)
        tokens[role] = token
        lines.append(f'{role} = "{path}"')
    text = f"""
account = "{ACCOUNT}"
state_dir = "{state_dir}"

[ib]
host = "127.0.0.1"
port = {ib_port}
client_id = {GUARD_CLIENT_ID}
connect_timeout_s = 3.0
reconnect_backoff_min_s = 0.1
reconnect_backoff_max_s = 0.5

[budget]
messages_per_second = 40

[log]
format = "json"
level = "warning"

[metrics]
enabled = false

[control.http]
port = {http_port}

[control.http.token_files]
{chr(10).join(lines)}

{extra_toml}
"""
    config = state_dir / "guardd.toml"
    config.write_text(text)
    return config, f"http://127.0.0.1:{http_port}", tokens["kill"]


async def http_answers(session: aiohttp.ClientSession, url: str) -> bool:
    """Whether `url` answers 200 now (False while nothing listens)."""
    with contextlib.suppress(aiohttp.ClientError, OSError):
        async with session.get(url) as response:
            return response.status == 200
    return False


async def http_ready(session: aiohttp.ClientSession, url: str, timeout_s: float = 15.0) -> None:
    """Wait until the guard's /readyz at `url` answers 200 (ready: latch restored, synced)."""
    await eventually(
        lambda: http_answers(session, f"{url}/readyz"), f"{url} ready", timeout_s=timeout_s
    )


async def http_kill(
    session: aiohttp.ClientSession, url: str, token: str, mode: str | None = "flatten"
) -> tuple[int, dict[str, Any]]:
    body: dict[str, object] = {"reason": "drill"}
    if mode is not None:
        body["mode"] = mode
    headers = {"Authorization": f"Bearer {token}"}
    async with session.post(f"{url}/v1/kill", json=body, headers=headers) as response:
        return response.status, await response.json()


STOP_WITHIN_S = 2.0  # the requirement


class GuardRun:
    """`python -m guardd run -c CONFIG --fresh-start` as a child process, its log in a file."""

    def __init__(self, proc: asyncio.subprocess.Process, log: Path, state_dir: Path) -> None:
        self.proc = proc
        self.log = log
        self.state_dir = state_dir

    def logged(self, event: str) -> bool:
        return event in self.log.read_text(errors="replace")

    def journal_kinds(self) -> list[str]:
        return [str(r.get("kind")) for r in read_journal(self.state_dir / "journal.jsonl")]

    def latch(self) -> bytes:
        return (self.state_dir / "latch.json").read_bytes()

    async def stop_with(self, sig: signal.Signals) -> float:
        """Send `sig`; returns how long the process took to exit (fails past the bound)."""
        assert self.proc.returncode is None, f"the guard already exited: {self.log.read_text()}"
        sent = time.monotonic()
        os.kill(self.proc.pid, sig)
        try:
            await asyncio.wait_for(self.proc.wait(), STOP_WITHIN_S * 5)
        except TimeoutError:
            self.proc.kill()
            raise AssertionError(f"not stopped: {self.log.read_text()}") from None
        return time.monotonic() - sent


@contextlib.asynccontextmanager
async def guardd_run(
    tmp_path: Path, ib_port: int, extra_toml: str = "", env: dict[str, str] | None = None
) -> AsyncIterator[tuple[GuardRun, str, str]]:
    """A running `guardd run` process (`env` added to its environment); yields (run, control
    URL, kill token). Its config file is ``run.state_dir / "guardd.toml"``."""
    state_dir = tmp_path / "state"
    config, url, token = write_run_config(state_dir, ib_port, extra_toml)
    log = tmp_path / "guardd.log"
    with log.open("wb") as out:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "guardd",
            "run",
            "-c",
            str(config),
            "--fresh-start",
            stdin=asyncio.subprocess.DEVNULL,
            stdout=out,
            stderr=out,
            env=None if env is None else {**os.environ, **env},
        )
    run = GuardRun(proc, log, state_dir)
    try:
        async with aiohttp.ClientSession() as session:
            await control_up(session, url, run)
        yield run, url, token
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def control_up(session: aiohttp.ClientSession, url: str, run: GuardRun) -> None:
    async def up() -> bool:
        assert run.proc.returncode is None, f"guardd exited: {run.log.read_text()}"
        return await http_answers(session, f"{url}/healthz")

    try:
        await eventually(up, "the control plane up", timeout_s=20, interval_s=0.05)
    except AssertionError as failed:
        raise AssertionError(f"{failed}: {run.log.read_text()}") from None


# The settle time must cover the position stream's lag (guardd.core.close, assumption A3): a
# figure the guard cannot reconcile with the fills it saw is trusted only after this much quiet.
FLATTEN = """
[kill]
mode = "flatten"

[flatten]
verify_timeout_s = 30.0
position_settle_s = 3.0
lost_order_grace_s = 1.0
"""


# A slow close: each order fills at most 50 per 0.1 s market step, so a child works for seconds.
SLOW_FILLS = {"partial_fill_quantity": 50, "market_interval_s": 0.1}


def guard_totals(sim: SimGateway) -> dict[int, Decimal]:
    """Signed quantity the guard's client id filled, per contract (BUY +, SELL -)."""
    totals: dict[int, Decimal] = {}
    for fill in sim.exchange.fills():
        if fill.client_id == GUARD_CLIENT_ID and fill.order_id != 0:  # 0: IB's own orders
            sign = 1 if fill.side == "BOT" else -1
            con = fill.instrument.con_id
            totals[con] = totals.get(con, Decimal(0)) + sign * Decimal(str(fill.shares))
    return totals


def others_totals(sim: SimGateway) -> dict[int, Decimal]:
    """Signed quantity everyone but the guard filled (bots, IB liquidations), per contract."""
    totals: dict[int, Decimal] = {}
    for fill in sim.exchange.fills():
        if fill.client_id != GUARD_CLIENT_ID or fill.order_id == 0:
            sign = 1 if fill.side == "BOT" else -1
            con = fill.instrument.con_id
            totals[con] = totals.get(con, Decimal(0)) + sign * Decimal(str(fill.shares))
    return totals


def child_mid_fill(sim: SimGateway) -> bool:
    """A close child of the guard is working and has filled part of its quantity."""
    return any(
        o.client_id == GUARD_CLIENT_ID and o.order_id != 0 and o.is_working and o.filled > 0
        for o in sim.exchange.orders()
    )


def flat_and_idle(sim: SimGateway) -> bool:
    return not sim.exchange.positions(ACCOUNT) and not sim.exchange.working_orders()


async def assert_flat_never_crossed(sim: SimGateway, start: dict[int, float]) -> None:
    """The end state every drill must reach, read three ways (see the module doc)."""
    positions, working = await gateway_says_flat(sim.port)
    assert positions == {} and working == 0, (positions, working)
    assert zero_crossings(sim, start) == [], "a position crossed zero"
    others = others_totals(sim)
    want = {
        con: -(Decimal(str(qty)) + others.get(con, Decimal(0)))
        for con, qty in start.items()
        if Decimal(str(qty)) + others.get(con, Decimal(0)) != 0
    }
    assert guard_totals(sim) == want, "the guard closed more or less than there was"
    assert sim.pacing_violations == 0


async def guard_confirms_flat(guard: Any, timeout_s: float = 20.0) -> None:
    await eventually(
        lambda: guard.executor.episode is not None and guard.executor.episode.at_target,
        "the guard confirms flat",
        timeout_s=timeout_s,
    )
