"""Drills on IB's order-id rule and the Read-only API: the real guard against the simulated gateway
over TCP, a bot on the official ibapi client, the end state read by an independent client.

- Flatten while another client holds higher order ids: IB refuses a Master API client's order
  whose id is not above every id reported to it (103); the guard allocates above them, and a child
  refused anyway is re-id'd (reqIds) and sent again, never left counted as working.
- Kill in Read-only mode: every order and cancel is refused (321). The kill still latches, the
  guard says it cannot act (status, metric, journal), and once the operator switches Read-only
  off the guard cancels and flattens.
"""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path

import pytest

from guardd.core.engine import Latch
from guardd.runtime.guard import Guard
from ibsim.gateway import SimGateway
from ibsim.types import ContractSpec, OrderRequest
from tests.conftest import eventually
from tests.drill_helpers import client, gateway_says_flat, kill_command, running
from tests.guard_harness import (
    AAPL,
    ACCOUNT,
    GUARD_CLIENT_ID,
    guard_config,
    guard_orders,
    journal,
    journal_kinds,
    sim_gateway,
    starting_positions,
    zero_crossings,
)
from tests.ibapi_harness import limit_order, stock

pytestmark = [pytest.mark.integration, pytest.mark.both_wires, pytest.mark.slow]

BOT = 7
FLATTEN = '[kill]\nmode = "flatten"\n\n[flatten]\nverify_timeout_s = 20.0\n'
HIGH_ID = 900


def guard_sold(sim: SimGateway) -> float:
    return sum(f.shares for f in sim.exchange.fills() if f.client_id == GUARD_CLIENT_ID)


async def test_flatten_while_a_bot_holds_higher_order_ids_then_flat_and_no_id_refused(
    tmp_path: Path,
) -> None:
    # Arrange: long AAPL; after the guard connected (its nextValidId is 1), a bot works orders
    # under ids 900 and up, which the gateway reports to the guard (the Master API client)
    async with sim_gateway(positions=[{"symbol": "AAPL", "quantity": 300}]) as sim:
        start = starting_positions(sim)
        cfg = guard_config(sim.port, tmp_path, FLATTEN)
        async with running(cfg) as guard, client(sim.port, BOT) as bot:
            for n in range(3):
                bot.placeOrder(HIGH_ID + n, stock("AAPL"), limit_order("BUY", 10, 1.0))
            await eventually(
                lambda: guard.broker.highest_order_id_seen >= HIGH_ID + 2,
                "bot ids seen",
                timeout_s=5,
            )

            # Act
            await guard.handle(kill_command("flatten"))
            await eventually(
                lambda: guard.executor.last_flat_confirmed is not None,
                "flat confirmed",
                timeout_s=15,
            )

        # Assert: flat and nothing working, read by another client; every guard id above 902
        positions, working = await gateway_says_flat(sim.port)
        assert positions == {} and working == 0
        assert zero_crossings(sim, start) == []
        assert guard_sold(sim) == 300
        assert all(o.order_id > HIGH_ID + 2 for o in guard_orders(sim))
        assert "child_order_refused" not in journal_kinds(cfg)


async def test_child_refused_as_duplicate_id_then_reid_after_reqids_and_flat(
    tmp_path: Path,
) -> None:
    # Arrange: the moment the guard's first child arrives, a bot's order under a far higher id
    # is reported to the guard first, so the child's id is no longer above every id it was told
    # of and the gateway refuses it with 103
    async with sim_gateway(positions=[{"symbol": "AAPL", "quantity": 300}]) as sim:
        start = starting_positions(sim)
        cfg = guard_config(sim.port, tmp_path, FLATTEN)
        injected: list[int] = []

        def bot_order_first(client_id: int, child: OrderRequest) -> None:
            if client_id != GUARD_CLIENT_ID or injected:
                return
            child_id = child.order_id
            high = child_id + 1000
            injected.append(high)
            req = OrderRequest(
                order_id=high,
                contract=ContractSpec(con_id=AAPL),
                action="BUY",
                total_quantity=10,
                order_type="LMT",
                lmt_price=1.0,
                aux_price=None,
            )
            sim.route(sim.exchange.place_order(BOT, req, sim.clock()))

        sim.on_order(bot_order_first)
        async with running(cfg) as guard:
            # Act
            await guard.handle(kill_command("flatten"))
            await eventually(lambda: bool(injected), "the first child", timeout_s=5)
            await eventually(
                lambda: guard.executor.last_flat_confirmed is not None,
                "flat confirmed",
                timeout_s=15,
            )
            # the bot's order came after the kill's cancel: the sweep cancels it
            await eventually(lambda: sim.exchange.working_orders() == [], "swept", timeout_s=10)

        # Assert: the refused child was re-id'd after reqIds, above the bot's id, and it closed
        positions, working = await gateway_says_flat(sim.port)
        assert positions == {} and working == 0
        assert zero_crossings(sim, start) == []
        assert guard_sold(sim) == 300
        refused = [r for r in journal(cfg) if r.get("kind") == "child_order_refused"]
        assert [r["code"] for r in refused] == [103]
        assert all(o.order_id > injected[0] for o in guard_orders(sim))
        assert sim.received_by_id[8] >= 1  # reqIds


def read_only_metric(guard: Guard) -> float | None:
    value: float | None = guard.registry.get_sample_value(
        "guardd_ib_read_only", {"account": ACCOUNT}
    )
    return value


async def test_kill_in_read_only_mode_then_latched_says_cannot_act_and_completes_when_lifted(
    tmp_path: Path,
) -> None:
    # Arrange: long AAPL, a bot's working order, TWS's Read-Only API on
    async with sim_gateway(positions=[{"symbol": "AAPL", "quantity": 300}]) as sim:
        cfg = guard_config(sim.port, tmp_path, FLATTEN)

        def fast_probe(guard: Guard) -> None:
            guard.broker.read_only_probe_s = 0.2

        async with running(cfg, prepare=fast_probe) as guard, client(sim.port, BOT) as bot:
            bot.placeOrder(50, stock("AAPL"), limit_order("BUY", 10, 1.0))
            await eventually(lambda: guard.book.working_order_count == 1, "bot order", timeout_s=5)
            sim.set_read_only(True)

            # Act: the kill
            outcome = await guard.handle(kill_command("flatten"))
            await eventually(lambda: guard.book.read_only, "read-only noticed", timeout_s=5)

            # Assert: latched and durable, and loud that it cannot act; nothing could be done
            assert outcome.accepted and outcome.latch_durable
            assert isinstance(guard.executor.latch_on_disk, Latch)
            status = guard.status()
            assert status["state"] == "HALTED"
            assert status["can_act"] is False and status["ib_read_only"] is True
            assert read_only_metric(guard) == 1
            assert "READ-ONLY" in guard.sd_status()
            assert "ib_read_only" in journal_kinds(cfg)
            assert [o.order_id for o in sim.exchange.working_orders()] == [50]
            assert guard_sold(sim) == 0

            # Act: the operator switches Read-only off
            sim.set_read_only(False)
            await eventually(lambda: not guard.book.read_only, "read-only lifted", timeout_s=5)
            await eventually(
                lambda: guard.executor.last_flat_confirmed is not None,
                "flat confirmed",
                timeout_s=15,
            )

            # Assert: the kill is carried out
            assert guard.status()["can_act"] is True
            assert read_only_metric(guard) == 0

        positions, working = await gateway_says_flat(sim.port)
        assert positions == {} and working == 0
        assert guard_sold(sim) == 300
        kinds = journal_kinds(cfg)
        assert kinds.index("ib_read_only") < kinds.index("ib_read_only_lifted")
        assert "child_order_rejected" not in kinds  # a 321 refusal is not a reject
        assert sim.read_only_refusals >= 1
        assert Decimal(0) == sum(
            (Decimal(str(p.position)) for p in sim.exchange.positions(ACCOUNT)), Decimal(0)
        )
