"""The baseline: the panic script a trader keeps next to their bots, written with ib_async.

`python -m bench.panic --port P --client-id 9` connects, sends reqGlobalCancel, and closes every
position with a market order, then waits until the gateway reports every position flat. It prints
one JSON line of monotonic timestamps (`time.monotonic`, comparable across processes of a host):
when the interpreter started the script, when ib_async was imported, connected and synced, when
the cancel and the last close order were handed to the socket, and when flat was reported.
ib_async paces its own requests (45 a second), so it stays under IB's 50.
"""

from __future__ import annotations

import time

T_START = time.monotonic()

import argparse  # noqa: E402
import asyncio  # noqa: E402
import json  # noqa: E402

from ib_async import IB, MarketOrder  # noqa: E402

T_IMPORTED = time.monotonic()


async def panic(host: str, port: int, client_id: int, timeout_s: float) -> dict[str, float | int]:
    ib = IB()
    await ib.connectAsync(host, port, clientId=client_id, timeout=10)
    t_connected = time.monotonic()
    ib.reqGlobalCancel()
    t_cancel = time.monotonic()
    positions = [p for p in ib.positions() if p.position != 0]
    for p in positions:
        contract = p.contract
        contract.exchange = contract.exchange or "SMART"
        action = "SELL" if p.position > 0 else "BUY"
        ib.placeOrder(contract, MarketOrder(action, abs(p.position)))
    t_orders = time.monotonic()
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and any(p.position != 0 for p in ib.positions()):  # noqa: ASYNC110
        await asyncio.sleep(0.005)
    t_flat = time.monotonic()
    flat = not any(p.position != 0 for p in ib.positions())
    ib.disconnect()
    return {
        "t_start": T_START,
        "t_imported": T_IMPORTED,
        "t_connected": t_connected,
        "t_cancel_sent": t_cancel,
        "t_orders_sent": t_orders,
        "t_flat": t_flat,
        "flat": int(flat),
        "orders": len(positions),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--client-id", type=int, default=9)
    parser.add_argument("--timeout", type=float, default=120.0)
    args = parser.parse_args()
    result = asyncio.run(panic(args.host, args.port, args.client_id, args.timeout))
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
