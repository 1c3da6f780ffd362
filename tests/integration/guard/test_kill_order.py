"""A kill's global cancel is at the gateway before its latch is written (issue 15).

The real guard, real HTTP and real MQTT control, against the simulated gateway running on a
thread and event loop of its own, so that the gateway reads while the guard's event loop is busy
writing its latch. The latch write is held (on the guard's loop, as a slow disk would hold it)
until the gateway has seen the reqGlobalCancel, for at most 5 s, and then carried out as usual:
had the cancel not been written to the socket before the write, the gateway could not see it
while the guard's loop is held.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from guardd.core.engine import Latch
from guardd.state.latch import LatchFile, read_latch
from ibsim.gateway import REQ_GLOBAL_CANCEL, SimGateway
from ibsim.scenario import Scenario
from ibsim.server import build_gateway
from tests.conftest import eventually
from tests.control_harness import running_guard, signed
from tests.mqtt_broker import Broker


class ThreadedSim:
    """A simulated gateway on its own thread; `cancels` is appended to on that thread."""

    def __init__(self, scenario: Scenario) -> None:
        self.scenario = scenario
        self.cancels: list[tuple[float, int]] = []  # (monotonic, client id)
        self.gateway: SimGateway | None = None
        self._loop = asyncio.new_event_loop()
        self._stop: asyncio.Event | None = None
        self._started = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sim", daemon=True)

    def _run(self) -> None:
        try:
            self._loop.run_until_complete(self._serve())
        finally:
            self._loop.close()

    async def _serve(self) -> None:
        self._stop = asyncio.Event()
        async with build_gateway(self.scenario, host="127.0.0.1", port=0) as gateway:
            gateway.on_message(self._on_message)
            self.gateway = gateway
            self._started.set()
            await self._stop.wait()

    def _on_message(self, client_id: int, msg_id: int, fields: list[str]) -> None:
        if msg_id == REQ_GLOBAL_CANCEL:
            self.cancels.append((time.monotonic(), client_id))

    def __enter__(self) -> SimGateway:
        self._thread.start()
        assert self._started.wait(10), "the simulated gateway did not start"
        assert self.gateway is not None
        return self.gateway

    def __exit__(self, *exc: object) -> None:
        if self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)


@pytest.fixture
def threaded_sim(scenario: Scenario) -> Iterator[tuple[SimGateway, ThreadedSim]]:
    sim = ThreadedSim(scenario)
    with sim as gateway:
        yield gateway, sim


@pytest.mark.parametrize("channel", ["http", "mqtt"])
async def test_kill_then_global_cancel_at_gateway_before_latch_written_then_answer_durable(
    threaded_sim: tuple[SimGateway, ThreadedSim],
    mqtt_broker: Broker,
    tmp_path: Path,
    channel: str,
) -> None:
    # Arrange: the latch write of a kill waits (at most 5 s) for the gateway to see the cancel
    gateway, sim = threaded_sim
    async with running_guard(gateway, mqtt_broker, tmp_path) as running:
        executor = running.guard.executor
        write = executor.persist_latch
        at_write: list[tuple[bool, bool]] = []  # (cancel at the gateway, latch halted on disk)

        def held_write(state: LatchFile, *, retry: bool = False) -> bool:
            if isinstance(state, Latch) and not at_write:
                deadline = time.monotonic() + 5.0
                while not sim.cancels and time.monotonic() < deadline:
                    time.sleep(0.001)  # the guard's loop is held, as by a slow disk
                on_disk = read_latch(executor.latch_path, allow_missing=True)
                at_write.append((bool(sim.cancels), isinstance(on_disk, Latch)))
            return write(state, retry=retry)

        executor.persist_latch = held_write  # type: ignore[method-assign]

        # Act
        if channel == "http":
            code, answer = await running.post("kill", {"reason": "ordering drill"}, "kill")
            assert code == 200, answer
            assert answer["latch_durable"] is True
        else:
            await running.publish("kill", signed("kill", "alice", reason="ordering drill"))
            await eventually(lambda: bool(running.journal("command")), "kill journaled")
            assert running.journal("command")[-1]["latch_durable"] is True

        # Assert: the cancel was at the gateway while the latch was not yet written; then the
        # latch is durable (and, over HTTP, only then answered)
        assert at_write == [(True, False)]
        assert isinstance(read_latch(executor.latch_path, allow_missing=False), Latch)
        assert executor.latch_durable
