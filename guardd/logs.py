"""Logging: structlog key-value events, JSON lines in production, a console view on a terminal.

`configure_logging` is called once by the entry point. It sends structlog's events and the
standard library's records (the simulator's ``ibsim``, aiohttp, aiomqtt) through one handler
on the root logger with one renderer, so every line has the same shape::

    {"event": "orders_cancelled", "count": 3, "decision_id": 17, "account": "DU1",
     "level": "info", "logger": "guardd.runtime.executor", "timestamp": "2025-01-02T03:04:05.678Z"}

Events are snake_case facts with key-values (``log.info("orders_cancelled", count=3)``), never
formatted strings. `bind_decision` puts the decision id and account on every line logged while a
decision is carried out, through contextvars, so it follows the asyncio task that set it.

The official ``ibapi`` client logs every message it sends and receives at INFO (on the protobuf
wire through its default ``*ProtoBuf`` EWrapper hooks, most of a live session's lines): its loggers
are kept at WARNING unless wire logs are asked for (``[log] wire = true``, ``guardd run
--wire-logs``).

Under systemd (stderr connected to the journal: ``$JOURNAL_STREAM`` names the stream's device
and inode) every line starts with its syslog priority, ``<4>`` for a warning, ``<3>`` for an
error, which journald takes as the entry's priority and strips: ``journalctl -u guardd -p
warning`` shows the warnings and worse.

The audit journal is not a log: it is separate, fsynced, and the record of what the guard did.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager
from contextvars import Token
from typing import Any, Literal, TextIO

import structlog
from structlog.types import Processor

__all__ = ["LogFormat", "bind_decision", "configure_logging", "get_logger", "writes_to_journal"]

LogFormat = Literal["json", "console", "auto"]

_HANDLER_MARK = "_guardd_handler"
IBAPI_LOGGER = "ibapi"  # the parent of every logger of the official client

_LEVELS: Mapping[str, int] = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
    "critical": logging.CRITICAL,
}


_SYSLOG_PRIORITY: Mapping[int, int] = {
    logging.DEBUG: 7,
    logging.INFO: 6,
    logging.WARNING: 4,
    logging.ERROR: 3,
    logging.CRITICAL: 2,
}
"""Python's levels as syslog priorities (debug 7, info 6, warning 4, err 3, crit 2)."""


def _syslog_priority(levelno: int) -> int:
    for threshold in sorted(_SYSLOG_PRIORITY, reverse=True):
        if levelno >= threshold:
            return _SYSLOG_PRIORITY[threshold]
    return 7


class _PriorityPrefix(logging.Formatter):
    """Puts ``<N>`` (the record's syslog priority) before every line `inner` renders."""

    def __init__(self, inner: logging.Formatter) -> None:
        super().__init__()
        self._inner = inner

    def format(self, record: logging.LogRecord) -> str:
        prefix = f"<{_syslog_priority(record.levelno)}>"
        return "\n".join(prefix + line for line in self._inner.format(record).split("\n"))


def writes_to_journal(stream: TextIO, journal_stream: str | None) -> bool:
    """Whether `stream` is the journal stream systemd named in ``$JOURNAL_STREAM``
    (``"<device>:<inode>"``): a log redirected elsewhere by the operator gets no prefixes."""
    if not journal_stream:
        return False
    try:
        device, inode = (int(part) for part in journal_stream.split(":"))
        st = os.fstat(stream.fileno())
    except (ValueError, OSError, AttributeError):  # no fd (a StringIO), or a bad variable
        return False
    return (st.st_dev, st.st_ino) == (device, inode)


def _is_terminal(stream: TextIO) -> bool:
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty()) if callable(isatty) else False
    except (OSError, ValueError):  # a closed or detached stream is not a terminal
        return False


def configure_logging(
    format: LogFormat = "auto",
    level: str = "info",
    stream: TextIO | None = None,
    *,
    wire: bool = False,
    journal_stream: str | None = None,
) -> None:
    """Route structlog and stdlib logging to `stream` (default stderr) as JSON or console lines.

    "auto" renders for the console when `stream` is a terminal and JSON otherwise (under
    systemd stderr goes to the journal, not a terminal). Timestamps are ISO 8601 UTC. When
    `journal_stream` (the entry point passes ``$JOURNAL_STREAM``) names `stream`, every line
    starts with its syslog priority for journald. Calling it again replaces the previous
    configuration (its handler), leaving other handlers alone.
    `wire` lets the ``ibapi`` client's own per-message lines through (at INFO, or DEBUG when
    `level` is debug); otherwise its loggers log warnings and errors only.
    """
    out = sys.stderr if stream is None else stream
    try:
        threshold = _LEVELS[level.lower()]
    except KeyError:
        raise ValueError(
            f"unknown log level {level!r}; expected one of {', '.join(_LEVELS)}"
        ) from None
    if format not in ("json", "console", "auto"):
        raise ValueError(f"unknown log format {format!r}; expected json, console or auto")
    console = format == "console" or (format == "auto" and _is_terminal(out))

    shared: list[Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.stdlib.ExtraAdder(),
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.StackInfoRenderer(),
    ]
    renderer: Processor
    if console:
        # Plain tracebacks: the same with or without rich installed (production has none).
        renderer = structlog.dev.ConsoleRenderer(
            colors=_is_terminal(out), exception_formatter=structlog.dev.plain_traceback
        )
        final: list[Processor] = [renderer]
    else:
        renderer = structlog.processors.JSONRenderer()
        final = [structlog.processors.format_exc_info, renderer]

    structlog.configure(
        processors=[
            structlog.stdlib.filter_by_level,
            *shared,
            structlog.stdlib.PositionalArgumentsFormatter(),
            structlog.processors.UnicodeDecoder(),
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        # Not cached: a second configure_logging (tests, a config reload) takes effect everywhere.
        cache_logger_on_first_use=False,
    )

    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, *final],
    )
    handler = logging.StreamHandler(out)
    if writes_to_journal(out, journal_stream):
        handler.setFormatter(_PriorityPrefix(formatter))
    else:
        handler.setFormatter(formatter)
    setattr(handler, _HANDLER_MARK, True)

    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, _HANDLER_MARK, False)]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(threshold)
    # aiohttp's access log is one line per scrape of /metrics: keep it for debugging only.
    logging.getLogger("aiohttp.access").setLevel(max(threshold, logging.WARNING))
    # ibapi's wire lines (every message, both ways) only when asked for.
    wire_level = min(threshold, logging.INFO) if wire else max(threshold, logging.WARNING)
    logging.getLogger(IBAPI_LOGGER).setLevel(wire_level)


def get_logger(name: str) -> Any:
    """A structlog logger named `name` (the module's ``__name__``)."""
    return structlog.stdlib.get_logger(name)


def bind_decision(decision_id: int | str, account: str) -> AbstractContextManager[None]:
    """Put `decision_id` and `account` on every log line of the current context.

    Binds at once (for the rest of the current task when used as a plain call) and returns a
    context manager that restores the previous values on exit::

        with bind_decision(decision.id, config.account):
            log.info("orders_cancelled", count=3)
    """
    tokens = structlog.contextvars.bind_contextvars(decision_id=decision_id, account=account)
    return _restoring(tokens)


@contextmanager
def _restoring(tokens: Mapping[str, Token[Any]]) -> Iterator[None]:
    try:
        yield
    finally:
        structlog.contextvars.reset_contextvars(**tokens)
