"""The gateway side of a drill as a table: what `guardd sim --show-every SECONDS` and SIGUSR1
print, so a trader rehearsing a kill can see "flat" from the gateway without writing a client.

Pure: it reads the exchange's positions and working orders and returns text; the server prints it.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime

from ibsim.exchange import Exchange
from ibsim.types import Instrument

FLAT_LINE = "FLAT: no position, no working order"

_POSITION_HEADER = ("account", "symbol", "type", "position", "avg cost")
_ORDER_HEADER = (
    "client",
    "order id",
    "permId",
    "account",
    "symbol",
    "action",
    "quantity",
    "filled",
    "type",
    "status",
)


def render_gateway_side(exchange: Exchange) -> str:
    """Every account's non-zero positions and the working orders by client id (then order id),
    under a header with the simulated time, ending with the FLAT line when no account holds a
    position and no order is working, else a NOT FLAT line that counts what is left."""
    positions = [p for account in exchange.accounts for p in exchange.positions(account)]
    orders = sorted(exchange.working_orders(), key=lambda o: (o.client_id, o.order_id, o.perm_id))
    at = datetime.fromtimestamp(exchange.now, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    lines = [f"--- gateway side at {at} ---"]
    if positions:
        lines.append("positions:")
        position_rows: list[tuple[str, ...]] = [
            (
                p.account,
                _symbol(p.instrument),
                p.instrument.sec_type,
                _number(p.position),
                _number(p.avg_cost),
            )
            for p in positions
        ]
        lines.extend(_table(_POSITION_HEADER, position_rows))
    else:
        lines.append("positions: none")
    if orders:
        lines.append("working orders:")
        order_rows: list[tuple[str, ...]] = [
            (
                str(o.client_id),
                str(o.order_id),
                str(o.perm_id),
                o.account,
                _symbol(o.instrument),
                o.action,
                _number(o.total_quantity),
                _number(o.filled),
                o.order_type,
                o.status,
            )
            for o in orders
        ]
        lines.extend(_table(_ORDER_HEADER, order_rows))
    else:
        lines.append("working orders: none")
    if not positions and not orders:
        lines.append(FLAT_LINE)
    else:
        lines.append(
            f"NOT FLAT: {_count(len(positions), 'position')}, "
            f"{_count(len(orders), 'working order')}"
        )
    return "\n".join(lines) + "\n"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    """Rows under a header, columns left-aligned to their widest cell, indented two spaces."""
    widths = [max(len(cell) for cell in column) for column in zip(header, *rows, strict=True)]
    return [
        "  "
        + "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in (header, *rows)
    ]


def _symbol(instrument: Instrument) -> str:
    """The local symbol when there is one (ESZ6 says which future), else the symbol."""
    return instrument.local_symbol or instrument.symbol


def _number(value: float) -> str:
    """100.0 -> "100", 0.5 -> "0.5", 190.015 -> "190.015": no trailing zeros, no exponent."""
    text = f"{value:.6f}".rstrip("0").rstrip(".")
    return "0" if text in ("", "-0") else text


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"
