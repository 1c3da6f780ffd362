"""IB's vocabulary in one place: the error and notice codes the guard acts on, their classes, and
the order-status strings.

IB reports everything that is not data through one callback, ``error(reqId, code, message)``:
refusals of an order, answers to a cancel, connectivity, pacing and plain notices alike. The
broker adapter (`guardd.broker.ib`) and the close episode (`guardd.core.close`, through the
executor) decide by the class a code falls into (`ib_class`), or, where a class holds codes that
call for different acts (1100 lost vs 1101 restored), by the named `IbCode`; never by a literal
number. The meanings follow IB's "TWS API error codes" page and ibapi's own ``errors.py``
(504 "Not connected" is the one ibapi raises itself, e.g. for a placeOrder while disconnected).

Unknown codes: a code in IB's warning range 2100-2199 is informational (IB documents that range as
warnings that need no action); any other unknown code is a ``REJECT``. Why that is the fail-closed
side: IB refuses an order only by an error naming its id, with codes added over the years; a
refusal taken for a notice would leave a close child counted as working that never will be, and
its position would never be closed. Counted as a reject, the quantity is planned again, the
episode's ``max_rejects`` bounds the tries and then escalates to an operator; the adapter logs it
as a warning.
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import IntEnum, StrEnum
from typing import Final

__all__ = [
    "CLASSES",
    "TERMINAL_STATUSES",
    "IbClass",
    "IbCode",
    "OrderStatus",
    "ib_class",
]


class IbCode(IntEnum):
    """The IB error and notice codes the guard names (IB's wording in the comments)."""

    PACING_VIOLATION = 100  # "Max rate of messages per second has been exceeded."
    MAX_TICKERS = 101  # "Max number of tickers has been reached."
    DUPLICATE_ORDER_ID = 103  # "Duplicate order id" (not above every id seen: Master client rule)
    NOT_CANCELLABLE = 161  # "Cancel attempted when order is not in a cancellable state."
    NO_SECURITY_DEFINITION = 200  # "No security definition has been found for the request."
    ORDER_REJECTED = 201  # "Order rejected - reason: ..."
    ORDER_CANCELLED = 202  # "Order cancelled - reason: ..." (a notice about the order)
    READ_ONLY = 321  # "... The API interface is currently in Read-Only mode." (and others)
    CLIENT_ID_IN_USE = 326  # "Unable to connect as the client id is already in use."
    ORDER_MESSAGE = 399  # "Order message: ..." (a warning about a working order)
    LOCATING_SHARES = 404  # order held while shares to sell short are located
    NOT_CONNECTED = 504  # "Not connected" (ibapi's own, for a request without a socket)
    CONNECTIVITY_LOST = 1100  # "Connectivity between IB and TWS has been lost."
    RESTORED_DATA_LOST = 1101  # "... restored - data lost." (subscriptions must be renewed)
    RESTORED_DATA_KEPT = 1102  # "... restored - data maintained."
    MARKET_DATA_FARM_OK = 2104  # "Market data farm connection is OK"
    HMDS_FARM_OK = 2106  # "HMDS data farm connection is OK"
    HMDS_FARM_INACTIVE = 2107  # "HMDS data farm connection is inactive but should be available"
    MARKET_DATA_FARM_INACTIVE = 2108  # "Market data farm connection is inactive but ..."
    OUTSIDE_RTH_IGNORED = 2109  # "Order Event Warning: Attribute 'Outside Regular Trading Hours'
    # is ignored based on the order type and destination. PlaceOrder is now being processed."
    SERVER_CONNECTIVITY_BROKEN = 2110  # "Connectivity between TWS and server is broken."
    SEC_DEF_FARM_OK = 2158  # "Sec-def data farm connection is OK"
    CANCEL_NOT_FOUND = 10147  # "OrderId ... that needs to be cancelled is not found."
    CANCEL_REFUSED = 10148  # "OrderId ... that needs to be cancelled cannot be cancelled, state:"


class IbClass(StrEnum):
    """What a code means to the guard."""

    REJECT = "reject"  # the order (or request) is refused; unknown codes outside 2100-2199
    ID_REFUSED = "id_refused"  # the order id is refused, not the order: send again, new id
    READ_ONLY = "read_only"  # TWS's Read-Only API refuses every order and cancel
    CANCEL_NOT_FOUND = "cancel_not_found"  # a cancel found no such order
    CANCEL_REFUSED = "cancel_refused"  # a cancel found the order done (filled / cancelled)
    ORDER_NOTICE = "order_notice"  # about a working order, which keeps working
    PACING = "pacing"  # too many messages: IB refused one (and may disconnect)
    CONNECTIVITY = "connectivity"  # the session or IB's servers: lost, restored, in use
    MARKET_DATA = "market_data"  # a market-data request refused (no order concerned)
    INFORMATIONAL = "informational"  # farm status and other warnings: nothing to do


CLASSES: Final[Mapping[IbCode, IbClass]] = {
    IbCode.PACING_VIOLATION: IbClass.PACING,
    IbCode.MAX_TICKERS: IbClass.MARKET_DATA,
    IbCode.DUPLICATE_ORDER_ID: IbClass.ID_REFUSED,
    IbCode.NOT_CANCELLABLE: IbClass.CANCEL_REFUSED,
    IbCode.NO_SECURITY_DEFINITION: IbClass.REJECT,
    IbCode.ORDER_REJECTED: IbClass.REJECT,
    IbCode.ORDER_CANCELLED: IbClass.ORDER_NOTICE,
    IbCode.READ_ONLY: IbClass.READ_ONLY,
    IbCode.CLIENT_ID_IN_USE: IbClass.CONNECTIVITY,
    IbCode.ORDER_MESSAGE: IbClass.ORDER_NOTICE,
    IbCode.LOCATING_SHARES: IbClass.ORDER_NOTICE,
    IbCode.NOT_CONNECTED: IbClass.CONNECTIVITY,
    IbCode.CONNECTIVITY_LOST: IbClass.CONNECTIVITY,
    IbCode.RESTORED_DATA_LOST: IbClass.CONNECTIVITY,
    IbCode.RESTORED_DATA_KEPT: IbClass.CONNECTIVITY,
    IbCode.MARKET_DATA_FARM_OK: IbClass.INFORMATIONAL,
    IbCode.HMDS_FARM_OK: IbClass.INFORMATIONAL,
    IbCode.HMDS_FARM_INACTIVE: IbClass.INFORMATIONAL,
    IbCode.MARKET_DATA_FARM_INACTIVE: IbClass.INFORMATIONAL,
    IbCode.OUTSIDE_RTH_IGNORED: IbClass.ORDER_NOTICE,
    IbCode.SERVER_CONNECTIVITY_BROKEN: IbClass.CONNECTIVITY,
    IbCode.SEC_DEF_FARM_OK: IbClass.INFORMATIONAL,
    IbCode.CANCEL_NOT_FOUND: IbClass.CANCEL_NOT_FOUND,
    IbCode.CANCEL_REFUSED: IbClass.CANCEL_REFUSED,
}
"""Every named code's class: the one table the adapter and the close episode decide by."""

_WARNINGS: Final = range(2100, 2200)  # IB's warning range: informational unless named above


def ib_class(code: int) -> IbClass:
    """The class of IB error `code`; an unknown code is informational in the warning range
    2100-2199 and a ``REJECT`` otherwise (the fail-closed side: see the module doc)."""
    try:
        return CLASSES[IbCode(code)]
    except ValueError:
        return IbClass.INFORMATIONAL if code in _WARNINGS else IbClass.REJECT


class OrderStatus(StrEnum):
    """IB's order-status strings (orderStatus and openOrder's OrderState), as ibapi's
    ``order_status.OrderStatus`` lists them."""

    API_PENDING = "ApiPending"
    PENDING_SUBMIT = "PendingSubmit"
    PRE_SUBMITTED = "PreSubmitted"
    SUBMITTED = "Submitted"
    PENDING_CANCEL = "PendingCancel"  # may still fill until Cancelled arrives
    API_CANCELLED = "ApiCancelled"
    CANCELLED = "Cancelled"
    FILLED = "Filled"
    INACTIVE = "Inactive"  # refused or held by IB (e.g. rejected, outside its hours)


TERMINAL_STATUSES: Final = frozenset(
    {OrderStatus.FILLED, OrderStatus.CANCELLED, OrderStatus.API_CANCELLED, OrderStatus.INACTIVE}
)
"""The statuses after which an order neither fills nor changes again."""
