"""Logging: JSON lines that parse, bound decision keys, stdlib records in the same shape."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import structlog

from guardd.config import load_config
from guardd.control.commands import ControlCommand
from guardd.demo import DEMO_CONFIG, demo_config
from guardd.logs import bind_decision, configure_logging, get_logger
from guardd.runtime.guard import Guard
from tests.conftest import eventually, free_port
from tests.drill_helpers import write_run_config


class FakeTerminal(io.StringIO):
    """A text stream that says it is a terminal."""

    def isatty(self) -> bool:
        return True


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    """Leave the root logger and structlog as they were."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    structlog.reset_defaults()
    structlog.contextvars.clear_contextvars()


def lines(stream: io.StringIO) -> list[dict[str, Any]]:
    """Every line written, parsed as JSON."""
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_json_event_then_line_parses_with_keys_level_and_utc_time() -> None:
    out = io.StringIO()
    configure_logging("json", "info", stream=out)

    get_logger("guardd.runtime.executor").info("orders_cancelled", count=3, perm_ids=[1, 2, 3])

    (record,) = lines(out)
    assert record["event"] == "orders_cancelled"
    assert record["count"] == 3
    assert record["perm_ids"] == [1, 2, 3]
    assert record["level"] == "info"
    assert record["logger"] == "guardd.runtime.executor"
    stamp = datetime.fromisoformat(record["timestamp"].replace("Z", "+00:00"))
    assert stamp.utcoffset() == timedelta(0)


def test_decision_bound_then_every_line_carries_it_until_exit() -> None:
    out = io.StringIO()
    configure_logging("json", "info", stream=out)
    log = get_logger("guardd.runtime.guard")

    with bind_decision(17, "DU000001"):
        log.warning("leverage_breached", value=3.1, limit=3.0)
        logging.getLogger("ibsim").info("sim_order_cancelled")
    log.info("after_decision")

    first, second, third = lines(out)
    assert (first["decision_id"], first["account"]) == (17, "DU000001")
    assert (second["decision_id"], second["logger"]) == (17, "ibsim")
    assert "decision_id" not in third


def test_plain_bind_then_keys_stay_for_the_context() -> None:
    out = io.StringIO()
    configure_logging("json", "info", stream=out)

    bind_decision("d-9", "DU2")
    get_logger("guardd.runtime.guard").info("kill_latched")

    (record,) = lines(out)
    assert record["decision_id"] == "d-9"


def test_stdlib_record_with_args_then_rendered_as_json_line() -> None:
    out = io.StringIO()
    configure_logging("json", "info", stream=out)

    logging.getLogger("aiohttp.server").error("bad request from %s", "10.0.0.1")

    (record,) = lines(out)
    assert record["event"] == "bad request from 10.0.0.1"
    assert record["level"] == "error"
    assert record["logger"] == "aiohttp.server"


def test_level_warning_then_info_dropped() -> None:
    out = io.StringIO()
    configure_logging("json", "warning", stream=out)

    get_logger("guardd.runtime.guard").info("quiet")
    logging.getLogger("ibsim").info("quiet_too")
    get_logger("guardd.runtime.guard").warning("loud")

    assert [r["event"] for r in lines(out)] == ["loud"]


def test_exception_logged_then_json_carries_the_traceback() -> None:
    out = io.StringIO()
    configure_logging("json", "info", stream=out)

    try:
        raise RuntimeError("socket gone")
    except RuntimeError:
        get_logger("guardd.broker").exception("broker_read_failed")

    (record,) = lines(out)
    assert "RuntimeError: socket gone" in record["exception"]


def test_auto_on_a_terminal_then_console_not_json() -> None:
    out = FakeTerminal()
    configure_logging("auto", "info", stream=out)

    get_logger("guardd.runtime.guard").info("guard_started", account="DU1")

    text = out.getvalue()
    assert "guard_started" in text and "account" in text
    with pytest.raises(json.JSONDecodeError):
        json.loads(text)


def test_exception_on_the_console_then_plain_python_traceback() -> None:
    # The same lines with or without rich installed (production has none; rich draws boxes).
    out = FakeTerminal()
    configure_logging("console", "info", stream=out)

    try:
        raise RuntimeError("socket gone")
    except RuntimeError:
        get_logger("guardd.broker").exception("broker_read_failed")

    text = out.getvalue()
    assert "Traceback (most recent call last):" in text
    assert "RuntimeError: socket gone" in text
    assert "╭" not in text


def test_guardd_run_imports_then_no_rich_mqtt_or_simulator_wire() -> None:
    # What `guardd run` imports before it starts (guardd.cli._run), in a fresh interpreter.
    code = (
        "import sys, guardd.cli; guardd.cli.import_structlog(); import guardd.runtime.guard; "
        "print(sorted(m for m in ('rich', 'aiomqtt', 'paho', 'ibsim.messages', 'apprise') "
        "if m in sys.modules))"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)

    assert run.stdout.strip() == "[]"


def test_auto_on_a_pipe_then_json() -> None:
    out = io.StringIO()
    configure_logging("auto", "info", stream=out)

    get_logger("guardd.runtime.guard").info("guard_started")

    assert lines(out)[0]["event"] == "guard_started"


def test_configured_twice_then_one_line_per_event() -> None:
    first, second = io.StringIO(), io.StringIO()
    configure_logging("json", "info", stream=first)
    configure_logging("json", "info", stream=second)

    get_logger("guardd.runtime.guard").info("once")

    assert first.getvalue() == ""
    assert len(lines(second)) == 1


def test_unknown_level_then_refused() -> None:
    with pytest.raises(ValueError, match="unknown log level"):
        configure_logging("json", "verbose", stream=io.StringIO())


def _ibapi_position_at_226() -> None:
    """ibapi's own decoder and default EWrapper taking one protobuf position message, as on the
    wire a current TWS speaks: its `*ProtoBuf` hook logs the message at INFO."""
    from ibapi.decoder import Decoder
    from ibapi.wrapper import EWrapper

    from ibsim import messages
    from ibsim.types import Instrument, PositionView

    aapl = Instrument(265598, "AAPL", "STK", "SMART", "NASDAQ", "USD")
    frame = messages.position(PositionView("DU1", aapl, 5.0, 1.0, 1.0, 5.0, 0.0, 0.0)).encode(226)
    Decoder(EWrapper(), 226).processProtoBuf(frame[8:], 61)


@pytest.fixture
def _restore_ibapi_logger() -> Iterator[None]:
    logger = logging.getLogger("ibapi")
    level = logger.level
    yield
    logger.setLevel(level)


@pytest.mark.usefixtures("_restore_ibapi_logger")
def test_info_level_then_ibapi_wire_lines_kept_out_and_its_warnings_kept() -> None:
    out = io.StringIO()
    configure_logging("json", "info", stream=out)

    _ibapi_position_at_226()
    logging.getLogger("ibapi.client").warning("socket_gone")

    assert [r["event"] for r in lines(out)] == ["socket_gone"]


@pytest.mark.usefixtures("_restore_ibapi_logger")
def test_wire_logs_asked_for_then_ibapi_protobuf_lines_logged() -> None:
    out = io.StringIO()
    configure_logging("json", "warning", stream=out, wire=True)

    _ibapi_position_at_226()
    get_logger("guardd.runtime.guard").info("not_at_warning")

    events = [r["event"] for r in lines(out)]
    assert any("positionProtoBuf" in e for e in events)
    assert any(e.startswith("ANSWER position ") for e in events)
    assert "not_at_warning" not in events


def journal_stream_of(path: Path) -> str:
    st = os.stat(path)
    return f"{st.st_dev}:{st.st_ino}"


def test_stream_is_the_journal_then_each_line_starts_with_its_syslog_priority(
    tmp_path: Path,
) -> None:
    path = tmp_path / "stderr"
    with path.open("w") as out:
        configure_logging("json", "debug", stream=out, journal_stream=journal_stream_of(path))
        log = get_logger("guardd.test")
        log.debug("d")
        log.info("i")
        log.warning("w")
        log.error("e")
        log.critical("c")

    written = path.read_text().splitlines()
    assert [line[:3] for line in written] == ["<7>", "<6>", "<4>", "<3>", "<2>"]
    assert [json.loads(line[3:])["event"] for line in written] == ["d", "i", "w", "e", "c"]


def test_multi_line_record_to_the_journal_then_every_line_prefixed(tmp_path: Path) -> None:
    path = tmp_path / "stderr"
    with path.open("w") as out:
        configure_logging("console", "info", stream=out, journal_stream=journal_stream_of(path))
        try:
            raise RuntimeError("boom")
        except RuntimeError:
            get_logger("guardd.test").exception("failed")

    written = path.read_text().splitlines()
    assert len(written) > 3
    assert all(line.startswith("<3>") for line in written)


def test_journal_stream_names_another_file_then_no_prefix(tmp_path: Path) -> None:
    other = tmp_path / "other"
    other.write_text("")
    path = tmp_path / "stderr"
    with path.open("w") as out:
        configure_logging("json", "info", stream=out, journal_stream=journal_stream_of(other))
        get_logger("guardd.test").warning("w")

    assert json.loads(path.read_text())["event"] == "w"


@pytest.mark.slow
@pytest.mark.integration
async def test_guardd_run_under_systemd_journal_then_warnings_carry_priority_4(
    tmp_path: Path,
) -> None:
    # Arrange: a real `guardd run` whose stderr is the "journal" $JOURNAL_STREAM names, with
    # no gateway listening, so it logs warnings while it retries
    config, _, _ = write_run_config(tmp_path / "state", free_port())
    stderr = tmp_path / "stderr"
    with stderr.open("w") as err:
        env = {**os.environ, "JOURNAL_STREAM": journal_stream_of(stderr)}
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "guardd", "run", "-c", str(config), "--fresh-start",
            stdout=asyncio.subprocess.DEVNULL, stderr=err, env=env,
        )  # fmt: skip
        try:
            await eventually(
                lambda: '"level": "warning"' in stderr.read_text(),
                "a warning logged",
                timeout_s=20,
                interval_s=0.05,
            )
        finally:
            proc.send_signal(signal.SIGTERM)
            await asyncio.wait_for(proc.wait(), 20)

    warnings = [line for line in stderr.read_text().splitlines() if '"level": "warning"' in line]
    assert warnings and all(line.startswith("<4>{") for line in warnings)


async def test_kill_carried_out_then_each_of_its_log_lines_carries_its_decision_id(
    tmp_path: Path,
) -> None:
    # Arrange: a guard not connected to IB (the cancel is deferred, the latch written)
    guard = Guard.open(
        demo_config(load_config(DEMO_CONFIG), ib_port=free_port(), state_dir=tmp_path),
        fresh_start=True,
    )
    out = io.StringIO()
    configure_logging("json", "info", stream=out)
    kill = ControlCommand("kill", "alice", "http", "runaway bot", mode="cancel")

    # Act: a kill, then the re-arm (a second decision), then a line of no decision
    killed = await guard.handle(kill)
    armed = await guard.handle(ControlCommand("arm", "bob", "http", "bot stopped", force=True))
    get_logger("test").info("after_the_decisions")
    guard.journal.close()
    guard.executor.close()

    # Assert
    logged = lines(out)
    kill_lines = [r for r in logged if r.get("decision_id") == int(killed.decision_id or 0)]
    arm_lines = [r for r in logged if r.get("decision_id") == int(armed.decision_id or 0)]
    assert {"global_cancel_deferred", "state_changed"} <= {r["event"] for r in kill_lines}
    assert "state_changed" in {r["event"] for r in arm_lines}
    assert len(kill_lines) + len(arm_lines) == len(logged) - 1
    assert all(r["account"] == guard.cfg.account for r in kill_lines + arm_lines)
    assert "decision_id" not in logged[-1]
