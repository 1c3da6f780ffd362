"""Logging: JSON lines that parse, bound decision keys, stdlib records in the same shape."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from datetime import datetime, timedelta
from typing import Any

import pytest
import structlog

from guardd.logs import bind_decision, configure_logging, get_logger


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

    get_logger("guardd.executor").info("orders_cancelled", count=3, perm_ids=[1, 2, 3])

    (record,) = lines(out)
    assert record["event"] == "orders_cancelled"
    assert record["count"] == 3
    assert record["perm_ids"] == [1, 2, 3]
    assert record["level"] == "info"
    assert record["logger"] == "guardd.executor"
    stamp = datetime.fromisoformat(record["timestamp"].replace("Z", "+00:00"))
    assert stamp.utcoffset() == timedelta(0)


def test_decision_bound_then_every_line_carries_it_until_exit() -> None:
    out = io.StringIO()
    configure_logging("json", "info", stream=out)
    log = get_logger("guardd.app")

    with bind_decision(17, "DU000001"):
        log.warning("leverage_breached", value=3.1, limit=3.0)
        logging.getLogger("guardd.sim").info("sim_order_cancelled")
    log.info("after_decision")

    first, second, third = lines(out)
    assert (first["decision_id"], first["account"]) == (17, "DU000001")
    assert (second["decision_id"], second["logger"]) == (17, "guardd.sim")
    assert "decision_id" not in third


def test_plain_bind_then_keys_stay_for_the_context() -> None:
    out = io.StringIO()
    configure_logging("json", "info", stream=out)

    bind_decision("d-9", "DU2")
    get_logger("guardd.app").info("kill_latched")

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

    get_logger("guardd.app").info("quiet")
    logging.getLogger("guardd.sim").info("quiet_too")
    get_logger("guardd.app").warning("loud")

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

    get_logger("guardd.app").info("guard_started", account="DU1")

    text = out.getvalue()
    assert "guard_started" in text and "account" in text
    with pytest.raises(json.JSONDecodeError):
        json.loads(text)


def test_auto_on_a_pipe_then_json() -> None:
    out = io.StringIO()
    configure_logging("auto", "info", stream=out)

    get_logger("guardd.app").info("guard_started")

    assert lines(out)[0]["event"] == "guard_started"


def test_configured_twice_then_one_line_per_event() -> None:
    first, second = io.StringIO(), io.StringIO()
    configure_logging("json", "info", stream=first)
    configure_logging("json", "info", stream=second)

    get_logger("guardd.app").info("once")

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

    from guardd.sim import messages
    from guardd.sim.types import Instrument, PositionView

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
    get_logger("guardd.app").info("not_at_warning")

    events = [r["event"] for r in lines(out)]
    assert any("positionProtoBuf" in e for e in events)
    assert any(e.startswith("ANSWER position ") for e in events)
    assert "not_at_warning" not in events
