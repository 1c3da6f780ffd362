"""The benchmark's simulated IB Gateway, in a process of its own, driven over stdin/stdout.

`python -m bench.simproc --positions N --orders M` starts a `SimGateway` on a free loopback port
with N stock positions (every other one short) and M resting limit orders of a foreign bot
(client 7), prints one JSON line `{"port": P}`, then answers one JSON command per stdin line with
one JSON line on stdout. It records, on the machine's monotonic clock (`time.monotonic`, shared by
every process of the host), when each reqGlobalCancel and each placeOrder arrived, and when the
account first became flat. Commands: `state`, `marks`, `wait_cancel`, `flood`, `flood_stop`,
`flatten_report`, `quit`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import sys
import time
from typing import Any

from bench.streamflood import FloodStats, flood
from ibsim.gateway import GatewayConfig, SimGateway
from ibsim.scenario import parse_scenario
from ibsim.types import ContractSpec, OrderRequest

ACCOUNT = "DU000001"
BOT_CLIENT_ID = 7
PLACE_ORDER = 3
GLOBAL_CANCEL = 58
REQ_PNL_SINGLE = 94


def scenario_data(positions: int, instruments: int, cash: float) -> dict[str, object]:
    """N positions of 100..500 shares at 20..219 USD; odd ones short (closed with buys)."""
    count = max(positions, instruments, 1)
    return {
        "gateway": {"seed": 5, "market_interval_s": 0.1, "pnl_interval_s": 1.0},
        "accounts": [{"id": ACCOUNT, "cash": cash}],
        "instruments": [
            {
                "symbol": f"S{n:04d}",
                "con_id": 100_000 + n,
                "price": 20.0 + n % 200,
                "volatility": 0.005,
            }
            for n in range(count)
        ],
        "positions": [
            {"symbol": f"S{n:04d}", "quantity": (100 + 100 * (n % 5)) * (-1 if n % 2 else 1)}
            for n in range(positions)
        ],
    }


class Recorder:
    """What arrived at the gateway, and when (monotonic seconds)."""

    def __init__(self, gateway: SimGateway, initial: dict[int, float]) -> None:
        self.gateway = gateway
        self.initial = initial  # con id -> starting position
        self.cancels: list[tuple[float, int]] = []
        self.orders: list[tuple[float, int, int]] = []  # (t, client id, order id)
        self.closing: dict[int, dict[int, float]] = {}  # client -> con id -> signed qty sent
        self.flat_at: float | None = None
        self.cancel_event = asyncio.Event()
        self.closers: set[int] = set()
        self._loop = asyncio.get_running_loop()
        gateway.on_message(self.on_message)
        gateway.on_order(self.on_order)

    def on_message(self, client_id: int, msg_id: int, fields: list[str]) -> None:
        t = time.monotonic()
        if msg_id == GLOBAL_CANCEL:
            self.cancels.append((t, client_id))
            self.cancel_event.set()

    def on_order(self, client_id: int, req: OrderRequest) -> None:
        t = time.monotonic()
        self.orders.append((t, client_id, req.order_id))
        if client_id in self.closers:
            inst = self.gateway.exchange.find_instrument(req.contract)
            if inst is not None:
                signed = req.total_quantity * (1 if req.action.upper() == "BUY" else -1)
                sums = self.closing.setdefault(client_id, {})
                sums[inst.con_id] = sums.get(inst.con_id, 0.0) + signed
            # The order is matched after this listener returns: look once it has been.
            self._loop.call_soon(self._check_flat)

    def _check_flat(self) -> None:
        if self.flat_at is None and not self.gateway.exchange.positions(ACCOUNT):
            self.flat_at = time.monotonic()

    def flatten_report(self, client_id: int) -> dict[str, Any]:
        sums = self.closing.get(client_id, {})
        overshoot_shares = 0.0
        overshot = 0
        for con_id, start in self.initial.items():
            sent = sums.get(con_id, 0.0)
            # Same direction as the position adds to it; the other way may not pass zero.
            over = abs(sent) if sent * start > 0 else max(0.0, abs(sent) - abs(start))
            if over > 0:
                overshot += 1
                overshoot_shares += over
        finals = {p.instrument.con_id: p.position for p in self.gateway.exchange.positions(ACCOUNT)}
        flipped = sum(1 for c, q in finals.items() if q * self.initial.get(c, 0.0) < 0)
        times = [t for t, c, _ in self.orders if c == client_id]
        return {
            "children": len(times),
            "first_child": times[0] if times else None,
            "last_child": times[-1] if times else None,
            "flat_at": self.flat_at,
            "positions_left": len(finals),
            "overshoot_positions": overshot,
            "overshoot_shares": overshoot_shares,
            "flipped_positions": flipped,
        }


def place_resting_orders(gateway: SimGateway, count: int) -> None:
    """`count` buy limits of the bot far below the market: they rest until cancelled."""
    instruments = gateway.exchange.instruments
    now = time.time()
    for n in range(count):
        inst = instruments[n % len(instruments)]
        req = OrderRequest(
            order_id=1_000 + n,
            contract=ContractSpec(con_id=inst.con_id, exchange="SMART"),
            action="BUY",
            total_quantity=100.0,
            order_type="LMT",
            lmt_price=round(inst.initial_price * 0.5, 2),
            aux_price=None,
            account=ACCOUNT,
        )
        gateway.exchange.place_order(BOT_CLIENT_ID, req, now)


async def serve(args: argparse.Namespace) -> None:
    scenario = parse_scenario(scenario_data(args.positions, args.instruments, args.cash))
    config = GatewayConfig(
        host="127.0.0.1",
        port=0,
        pnl_interval_s=1.0,
        market_interval_s=0.1,
        farm_notices=False,
        max_tickers=args.max_tickers,
    )
    gateway = SimGateway(scenario.build_exchange(now=time.time()), config)
    place_resting_orders(gateway, args.orders)
    initial = {p.instrument.con_id: p.position for p in gateway.exchange.positions(ACCOUNT)}
    async with gateway:
        rec = Recorder(gateway, initial)
        rec.closers = {int(c) for c in args.closers.split(",") if c}
        out = sys.stdout
        out.write(json.dumps({"port": gateway.port}) + "\n")
        out.flush()
        reader = asyncio.StreamReader()
        loop = asyncio.get_running_loop()
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
        flood_task: asyncio.Task[FloodStats] | None = None
        flood_stop = asyncio.Event()
        while True:
            line = await reader.readline()
            if not line:
                break
            cmd = json.loads(line)
            name = cmd["cmd"]
            reply: dict[str, Any] = {"ok": True}
            if name == "state":
                reply.update(
                    positions=len(gateway.exchange.positions(ACCOUNT)),
                    working_orders=len(gateway.exchange.working_orders()),
                    pacing_violations=gateway.pacing_violations,
                    global_cancels=gateway.global_cancels,
                    received_by_client={str(k): v for k, v in gateway.received_by_client.items()},
                    pnl_single_subs={
                        str(cid): len(s.subs.pnl_single) for cid, s in gateway.sessions.items()
                    },
                    clients=sorted(gateway.sessions),
                )
            elif name == "marks":
                reply.update(cancels=rec.cancels, orders=rec.orders)
                if cmd.get("clear"):
                    rec.cancels, rec.orders = [], []
            elif name == "wait_cancel":
                deadline = time.monotonic() + float(cmd.get("timeout", 5.0))
                while len(rec.cancels) <= int(cmd["after"]) and time.monotonic() < deadline:
                    rec.cancel_event.clear()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(
                            rec.cancel_event.wait(), max(0.0, deadline - time.monotonic())
                        )
                reply.update(cancels=rec.cancels[int(cmd["after"]) :])
            elif name == "flood":
                if flood_task is not None and not flood_task.done():
                    flood_task.cancel()
                flood_stop = asyncio.Event()
                flood_task = asyncio.ensure_future(
                    flood(
                        gateway,
                        float(cmd["rate"]),
                        float(cmd["seconds"]),
                        stop=flood_stop,
                        ticks=bool(cmd.get("ticks", True)),
                    )
                )
                reply.update(started=time.monotonic())
            elif name == "flood_stop":
                stats = None
                if flood_task is not None:
                    flood_stop.set()
                    with contextlib.suppress(asyncio.CancelledError):
                        stats = await asyncio.wait_for(flood_task, 5)
                    flood_task = None
                reply.update(
                    stats=None
                    if stats is None
                    else {
                        "sent": stats.sent,
                        "skipped": stats.skipped,
                        "elapsed_s": stats.elapsed_s,
                        "sent_per_s": stats.sent_per_s,
                    }
                )
            elif name == "flatten_report":
                reply.update(rec.flatten_report(int(cmd["client"])))
            elif name == "quit":
                out.write(json.dumps(reply) + "\n")
                out.flush()
                break
            else:
                reply = {"ok": False, "error": f"unknown command {name}"}
            out.write(json.dumps(reply) + "\n")
            out.flush()
        if flood_task is not None:
            flood_task.cancel()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--positions", type=int, default=20)
    parser.add_argument("--instruments", type=int, default=20)
    parser.add_argument("--orders", type=int, default=0)
    parser.add_argument("--cash", type=float, default=1e9)
    parser.add_argument("--closers", default="0", help="client ids whose orders close positions")
    parser.add_argument(
        "--max-tickers", type=int, default=None, help="market-data lines a client (IB: 100)"
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s sim %(message)s")
    asyncio.run(serve(args))


if __name__ == "__main__":
    main()
