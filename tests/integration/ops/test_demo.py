"""`guardd demo` on both wires: the protobuf wire a current TWS speaks (226) and the text wire
(178). The guard kills the runaway bot, every order ends cancelled and every position flat."""

from __future__ import annotations

import io

import pytest

from guardd.demo import run_demo

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.mark.parametrize("version", [178, 226])
async def test_demo_on_either_wire_then_exit_0_cancelled_and_flat(version: int) -> None:
    out = io.StringIO()

    code = await run_demo(out, server_version=version)

    text = out.getvalue()
    assert code == 0, text
    assert f"server versions up to {version}" in text
    assert "flat confirmed by the broker" in text
    assert "pacing violations: 0" in text
