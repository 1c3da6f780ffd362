"""`guardd demo`: the simulated gateway, a runaway bot and the guard, with a readable timeline.

The gateway holds an account with stocks and a short future. A bot (its own API client id) starts
sending orders far faster than the order-rate limit allows. The guard, connected as the Master API
client, sees the bot's orders, halts on the order that breaks the limit, writes its latch, cancels
every order with reqGlobalCancel, flattens every position with paced child orders, keeps
sweeping the bot's later orders, and confirms flat from the broker's own positions.

The demo exits 0 only when, at the gateway, no order is working and every position is flat.
It prints the web console's URL and where its throwaway tokens are; with ``--stay`` the gateway
and the guard keep running after the demo (HALTED, flat) until Ctrl-C, so the console can be
looked at and the guard re-armed from it.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import TextIO

from guardd.config import Config, load_config
from guardd.runtime.guard import Guard
from guardd.shipped import shipped
from ibsim.bot import RunawayBot
from ibsim.gateway import SimGateway
from ibsim.scenario import parse_scenario
from ibsim.server import build_gateway
from ibsim.types import OrderRequest

BOT_CLIENT_ID = 7
# Installed wheels carry configs/demo.toml inside the package; a checkout has it at the top.
DEMO_CONFIG = shipped("demo.toml")

DEMO_SCENARIO: dict[str, object] = {
    "gateway": {"seed": 11, "market_interval_s": 0.1, "pnl_interval_s": 0.5},
    "accounts": [{"id": "DU000001", "cash": 1_000_000}],
    "instruments": [
        {"symbol": "AAPL", "con_id": 265598, "price": 190.0, "volatility": 0.01},
        {"symbol": "MSFT", "con_id": 272093, "price": 420.0, "volatility": 0.01},
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
            "volatility": 0.01,
            "initial_margin_per_contract": 16000,
            "maint_margin_per_contract": 14500,
        },
    ],
    "positions": [
        {"symbol": "AAPL", "quantity": 2000, "avg_price": 185.0},
        {"symbol": "MSFT", "quantity": 300, "avg_price": 410.0},
        {"symbol": "ES", "quantity": -2, "avg_price": 6010.0},
    ],
}


class Timeline:
    """Prints what happens, with seconds since the start."""

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.start = time.monotonic()

    def say(self, who: str, what: str) -> None:
        print(f"{time.monotonic() - self.start:6.2f}s  {who:<8} {what}", file=self.out, flush=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def demo_config(base: Config, *, ib_port: int, state_dir: Path) -> Config:
    """The demo's guard config: configs/demo.toml pointed at the embedded gateway and a fresh
    state directory, with throwaway HTTP tokens."""
    tokens = {}
    for role in ("read", "kill", "arm"):
        path = state_dir / f"token-{role}"
        path.write_text(secrets.token_urlsafe(24))
        path.chmod(0o600)
        tokens[role] = path
    http = base.control.http.model_copy(
        update={
            "port": _free_port(),
            "token_files": base.control.http.token_files.model_copy(update=tokens),
        }
    )
    return base.model_copy(
        update={
            "ib": base.ib.model_copy(update={"port": ib_port}),
            "state_dir": state_dir,
            "control": base.control.model_copy(update={"http": http}),
        }
    )


def _watch_gateway(gateway: SimGateway, timeline: Timeline, guard_client: int) -> None:
    bot_orders = 0
    cancels = 0

    def on_order(client_id: int, req: OrderRequest) -> None:
        nonlocal bot_orders
        what = f"{req.action} {req.total_quantity:g} {req.contract.symbol} {req.order_type}" + (
            f" {req.lmt_price:.2f}" if req.lmt_price is not None else ""
        )
        if client_id == guard_client:
            timeline.say("guard", f"close order {req.order_ref}: {what}")
        else:
            bot_orders += 1
            if bot_orders <= 3 or bot_orders % 5 == 0:
                timeline.say("bot", f"order #{bot_orders} (client {client_id}): {what}")

    def on_message(client_id: int, msg_id: int, fields: list[str]) -> None:
        nonlocal cancels
        if msg_id == 58:
            cancels += 1
            working = len(gateway.exchange.working_orders())
            if cancels == 1:
                timeline.say(
                    "gateway", f"reqGlobalCancel from client {client_id}: {working} orders working"
                )
            elif cancels % 10 == 0:
                timeline.say("guard", f"still sweeping: global cancel #{cancels}")

    gateway.on_order(on_order)
    gateway.on_message(on_message)


def _book(gateway: SimGateway, account: str) -> str:
    parts = [f"{p.instrument.symbol} {p.position:g}" for p in gateway.exchange.positions(account)]
    return ", ".join(parts) or "flat"


async def run_demo(
    out: TextIO = sys.stdout,
    *,
    timeout_s: float = 45.0,
    stay: asyncio.Event | None = None,
    server_version: int | None = None,
) -> int:
    """Run the whole demo; 0 when every order is cancelled and every position is flat. With
    ``stay``, keep the gateway and the guard (and the console) up afterwards until it is set or
    the demo is interrupted. `server_version` caps the simulated gateway's (default 226, the
    protobuf wire)."""
    timeline = Timeline(out)
    base = load_config(DEMO_CONFIG)
    scenario = parse_scenario(DEMO_SCENARIO)
    with tempfile.TemporaryDirectory(prefix="guardd-demo-") as tmp:
        async with build_gateway(
            scenario, host="127.0.0.1", port=0, server_version=server_version
        ) as gateway:
            account = base.account
            timeline.say(
                "gateway",
                f"simulated IB Gateway on 127.0.0.1:{gateway.port} "
                f"(server versions up to {gateway.config.server_version})",
            )
            timeline.say("gateway", f"account {account}: {_book(gateway, account)}")
            cfg = demo_config(base, ib_port=gateway.port, state_dir=Path(tmp))
            _watch_gateway(gateway, timeline, cfg.ib.client_id)
            guard = Guard.open(cfg, fresh_start=True)
            stop = asyncio.Event()
            guard_task = asyncio.create_task(guard.run(stop), name="guard")
            bot = RunawayBot("127.0.0.1", gateway.port, BOT_CLIENT_ID)
            try:
                await asyncio.wait_for(guard.ready_event.wait(), 10)
                if guard.http is not None:
                    files = cfg.control.http.token_files
                    timeline.say(
                        "console",
                        f"{guard.http.url}/console  (log in with the token in {files.kill} "
                        f"to kill, {files.arm} to re-arm, {files.read} to look)",
                    )
                timeline.say(
                    "guard",
                    f"master client {cfg.ib.client_id}, synced, state {guard.engine.state}; "
                    f"kill when a client sends >= "
                    f"{cfg.limits.order_rate.per_client_1s.kill:g} orders/s",
                )
                await bot.connect()
                timeline.say("bot", f"client {BOT_CLIENT_ID} connected; it starts running away")
                run = asyncio.create_task(
                    bot.run_away(symbol="AAPL", price=180.0, rate=12, count=40)
                )
                ok = await _follow(guard, gateway, timeline, account, timeout_s)
                await run
                await asyncio.sleep(0.5)  # the last swept orders settle
                ok = ok and _flat_and_cancelled(gateway, account)
                if stay is not None:
                    timeline.say("demo", "the console stays up: Ctrl-C to end")
                    with contextlib.suppress(asyncio.CancelledError):
                        await stay.wait()
            finally:
                await bot.disconnect()
                stop.set()
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(guard_task, 10)
            working = gateway.exchange.working_orders()
            timeline.say("gateway", f"working orders: {len(working)}; positions: "
                         f"{_book(gateway, account)}")  # fmt: skip
            timeline.say("gateway", f"pacing violations: {gateway.pacing_violations}")
            if ok:
                timeline.say("demo", "every order cancelled, every position flat: exit 0")
                return 0
            timeline.say("demo", "NOT flat and cancelled: exit 1")
            return 1


async def _follow(
    guard: Guard, gateway: SimGateway, timeline: Timeline, account: str, timeout_s: float
) -> bool:
    """Narrate the guard's state until it has confirmed flat (or time runs out)."""
    deadline = time.monotonic() + timeout_s
    state = str(guard.engine.state)
    flat_said = False
    while time.monotonic() < deadline:
        await asyncio.sleep(0.02)
        now_state = str(guard.engine.state)
        if now_state != state:
            latch = guard.engine.latch
            why = f": {latch.reason}" if latch is not None else ""
            timeline.say("guard", f"{state} -> {now_state}{why}")
            state = now_state
        if guard.executor.last_flat_confirmed is not None and not flat_said:
            flat_said = True
            timeline.say("guard", f"flat confirmed by the broker: {_book(gateway, account)}")
        if flat_said and _flat_and_cancelled(gateway, account):
            return True
    timeline.say("demo", f"timed out after {timeout_s:.0f}s")
    return False


def _flat_and_cancelled(gateway: SimGateway, account: str) -> bool:
    return not gateway.exchange.working_orders() and not gateway.exchange.positions(account)


def demo_main(*, stay: bool = False, server_version: int | None = None) -> int:
    """Entry point of `guardd demo` (``--stay``: keep serving the console until Ctrl-C)."""
    from guardd.logs import configure_logging

    configure_logging("console", "error")

    async def main() -> int:
        return await run_demo(stay=asyncio.Event() if stay else None, server_version=server_version)

    return asyncio.run(main())
