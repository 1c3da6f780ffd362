"""The raw decode rate: the official ibapi client alone, counting callbacks, no guard behind it.

`python -m bench.rawclient --port P --con-ids 100000,100001 --seconds S` connects as client 11,
subscribes reqPnL and reqPnLSingle per contract (the streams the guard folds), prints
`{"subscribed": true}`, then every 0.25 s a line `{"t": monotonic, "count": callbacks}` until S
seconds have passed. The callbacks do nothing but count: this is ibapi's decode ceiling on this
machine, the figure the guard's fold rate is compared with.
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from decimal import Decimal
from typing import Any

from ibapi.client import EClient
from ibapi.wrapper import EWrapper

ACCOUNT = "DU000001"


class Counting(EWrapper):  # type: ignore[misc]
    def __init__(self) -> None:
        super().__init__()
        self.count = 0
        self.ready = threading.Event()

    def nextValidId(self, orderId: int) -> None:
        self.ready.set()

    def pnl(self, reqId: int, *args: Any) -> None:
        self.count += 1

    def pnlSingle(self, reqId: int, pos: Decimal, *args: Any) -> None:
        self.count += 1

    def error(self, *args: Any) -> None:
        pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--con-ids", required=True)
    parser.add_argument("--seconds", type=float, required=True)
    args = parser.parse_args()
    wrapper = Counting()
    client = EClient(wrapper)
    client.connect("127.0.0.1", args.port, 11)
    thread = threading.Thread(target=client.run, daemon=True)
    thread.start()
    if not wrapper.ready.wait(10):
        raise SystemExit("no nextValidId from the gateway")
    client.reqPnL(1, ACCOUNT, "")
    for n, con_id in enumerate(int(c) for c in args.con_ids.split(",")):
        client.reqPnLSingle(10 + n, ACCOUNT, "", con_id)
        time.sleep(0.03)  # under the gateway's 50 messages a second
    print(json.dumps({"subscribed": True}), flush=True)
    end = time.monotonic() + args.seconds
    while time.monotonic() < end:
        time.sleep(0.25)
        print(json.dumps({"t": time.monotonic(), "count": wrapper.count}), flush=True)
    client.disconnect()
    thread.join(5)


if __name__ == "__main__":
    main()
