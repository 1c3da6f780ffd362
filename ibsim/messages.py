"""Server -> client messages for any negotiated server version, and the one table of which the
simulated gateway sends as protobuf from which version.

Each function returns an `Outgoing`: the message id, its text layout at a given version
(`codec.py`) and its protobuf form (`protocodec.py`). `encode` picks one for a session's version:
protobuf from `PROTOBUF_FROM[msg_id]` on, text (with a 4-byte binary id from 201) below.

`PROTOBUF_FROM` is an assumption, written down in docs/simulator.md: which answers a real TWS sends
as protobuf at a given version lives inside TWS, not in client code. ibapi 10.50.2 decodes either
form of every message at every version from 201; it sends each request as protobuf from the
version `ibapi.common.getServerVersionForMessage` names. We assume TWS switches an answer to
protobuf with the request group it belongs to, and never before the ibapi release that added the
answer's protobuf decoder (IB added them in that order): errors and executions with reqExecutions
at 201, orders with placeOrder at 203, open/completed order lists with their requests at 204,
contract details at 205, market data at 206, accounts and positions at 207, PnL at 210,
commission reports at 211, nextValidId and currentTime at 213.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass

from ibsim import codec, protocodec
from ibsim.codec import Fields
from ibsim.protocodec import NO_OMISSIONS, Proto
from ibsim.types import ContractHours, Fill, Instrument, PositionView, SimOrder
from ibsim.wire import encode_proto_message, encode_text_message

MIN_SERVER_VERSION = codec.SERVER_VERSION  # 178: the oldest layouts the simulator writes
MAX_SERVER_VERSION = 226  # ibapi 10.50.2's UNIFIED_VERSION_COND_ORDER_WITH_OVERNIGHT_PARAM

# Message id -> the first server version at which the simulator sends it as protobuf.
PROTOBUF_FROM: dict[int, int] = {
    codec.ERR_MSG: 201,
    codec.EXECUTION_DATA: 201,
    codec.EXECUTION_DATA_END: 201,
    codec.OPEN_ORDER: 203,
    codec.ORDER_STATUS: 203,
    codec.OPEN_ORDER_END: 204,
    codec.COMPLETED_ORDER: 204,
    codec.COMPLETED_ORDERS_END: 204,
    codec.ORDER_BOUND: 204,
    codec.CONTRACT_DATA: 205,
    codec.CONTRACT_DATA_END: 205,
    codec.TICK_PRICE: 206,
    codec.TICK_SIZE: 206,
    codec.TICK_OPTION_COMPUTATION: 206,
    codec.TICK_SNAPSHOT_END: 206,
    codec.MARKET_DATA_TYPE: 206,
    codec.TICK_REQ_PARAMS: 206,
    codec.ACCT_VALUE: 207,
    codec.PORTFOLIO_VALUE: 207,
    codec.ACCT_UPDATE_TIME: 207,
    codec.ACCT_DOWNLOAD_END: 207,
    codec.MANAGED_ACCTS: 207,
    codec.POSITION_DATA: 207,
    codec.POSITION_END: 207,
    codec.ACCOUNT_SUMMARY: 207,
    codec.ACCOUNT_SUMMARY_END: 207,
    codec.ACCOUNT_UPDATE_MULTI: 207,
    codec.ACCOUNT_UPDATE_MULTI_END: 207,
    codec.PNL: 210,
    codec.PNL_SINGLE: 210,
    codec.COMMISSION_REPORT: 211,
    codec.NEXT_VALID_ID: 213,
    codec.CURRENT_TIME: 213,
}
_NEVER = 1 << 30


@dataclass(frozen=True, slots=True)
class Outgoing:
    """One server -> client message, encodable at any server version."""

    msg_id: int
    text: Callable[[int], Fields]  # the text fields at a server version, message id first
    proto: Callable[[], Proto]

    def is_protobuf(self, version: int) -> bool:
        return version >= PROTOBUF_FROM.get(self.msg_id, _NEVER)

    def encode(self, version: int) -> bytes:
        """The whole frame as a client that negotiated `version` reads it."""
        if self.is_protobuf(version):
            return encode_proto_message(self.msg_id, self.proto().SerializeToString())
        return encode_text_message(self.text(version), version)


# ---- session, errors, time -------------------------------------------------------------------


def next_valid_id(order_id: int) -> Outgoing:
    return Outgoing(
        codec.NEXT_VALID_ID,
        lambda v: codec.next_valid_id_fields(order_id),
        lambda: protocodec.next_valid_id(order_id),
    )


def managed_accounts(accounts: Sequence[str]) -> Outgoing:
    return Outgoing(
        codec.MANAGED_ACCTS,
        lambda v: codec.managed_accounts_fields(accounts),
        lambda: protocodec.managed_accounts(accounts),
    )


def current_time(epoch: int) -> Outgoing:
    return Outgoing(
        codec.CURRENT_TIME,
        lambda v: codec.current_time_fields(epoch),
        lambda: protocodec.current_time(epoch),
    )


def error(
    req_id: int, code: int, message: str, advanced_json: str = "", *, time_ms: int = 0
) -> Outgoing:
    """error (4); `time_ms` (epoch milliseconds) travels from version 194."""
    return Outgoing(
        codec.ERR_MSG,
        lambda v: codec.error_fields(
            req_id, code, message, advanced_json, version=v, error_time_ms=time_ms
        ),
        lambda: protocodec.error(req_id, code, message, advanced_json, time_ms),
    )


# ---- account and positions -------------------------------------------------------------------


def position(pos: PositionView, omit: Collection[str] = NO_OMISSIONS) -> Outgoing:
    return Outgoing(
        codec.POSITION_DATA,
        lambda v: codec.position_fields(pos, omit=omit),
        lambda: protocodec.position(pos, omit),
    )


def position_end() -> Outgoing:
    return Outgoing(
        codec.POSITION_END, lambda v: codec.position_end_fields(), protocodec.position_end
    )


def account_summary(req_id: int, account: str, tag: str, value: str, currency: str) -> Outgoing:
    return Outgoing(
        codec.ACCOUNT_SUMMARY,
        lambda v: codec.account_summary_fields(req_id, account, tag, value, currency),
        lambda: protocodec.account_summary(req_id, account, tag, value, currency),
    )


def account_summary_end(req_id: int) -> Outgoing:
    return Outgoing(
        codec.ACCOUNT_SUMMARY_END,
        lambda v: codec.account_summary_end_fields(req_id),
        lambda: protocodec.account_summary_end(req_id),
    )


def account_value(key: str, value: str, currency: str, account: str) -> Outgoing:
    return Outgoing(
        codec.ACCT_VALUE,
        lambda v: codec.account_value_fields(key, value, currency, account),
        lambda: protocodec.account_value(key, value, currency, account),
    )


def portfolio(pos: PositionView, omit: Collection[str] = NO_OMISSIONS) -> Outgoing:
    return Outgoing(
        codec.PORTFOLIO_VALUE,
        lambda v: codec.portfolio_fields(pos, omit=omit),
        lambda: protocodec.portfolio(pos, omit),
    )


def account_time(hhmm: str) -> Outgoing:
    return Outgoing(
        codec.ACCT_UPDATE_TIME,
        lambda v: codec.account_time_fields(hhmm),
        lambda: protocodec.account_time(hhmm),
    )


def account_download_end(account: str) -> Outgoing:
    return Outgoing(
        codec.ACCT_DOWNLOAD_END,
        lambda v: codec.account_download_end_fields(account),
        lambda: protocodec.account_download_end(account),
    )


def account_update_multi(
    req_id: int, account: str, model_code: str, key: str, value: str, currency: str
) -> Outgoing:
    return Outgoing(
        codec.ACCOUNT_UPDATE_MULTI,
        lambda v: codec.account_update_multi_fields(
            req_id, account, model_code, key, value, currency
        ),
        lambda: protocodec.account_update_multi(req_id, account, model_code, key, value, currency),
    )


def account_update_multi_end(req_id: int) -> Outgoing:
    return Outgoing(
        codec.ACCOUNT_UPDATE_MULTI_END,
        lambda v: codec.account_update_multi_end_fields(req_id),
        lambda: protocodec.account_update_multi_end(req_id),
    )


def pnl(req_id: int, daily: float, unrealized: float, realized: float) -> Outgoing:
    return Outgoing(
        codec.PNL,
        lambda v: codec.pnl_fields(req_id, daily, unrealized, realized),
        lambda: protocodec.pnl(req_id, daily, unrealized, realized),
    )


def pnl_single(
    req_id: int,
    pos: float,
    daily: float,
    unrealized: float,
    realized: float,
    value: float,
    omit: Collection[str] = NO_OMISSIONS,
) -> Outgoing:
    return Outgoing(
        codec.PNL_SINGLE,
        lambda v: codec.pnl_single_fields(
            req_id, pos, daily, unrealized, realized, value, omit=omit
        ),
        lambda: protocodec.pnl_single(req_id, pos, daily, unrealized, realized, value, omit),
    )


# ---- orders and executions -------------------------------------------------------------------


def open_order(order: SimOrder) -> Outgoing:
    return Outgoing(
        codec.OPEN_ORDER,
        lambda v: codec.open_order_fields(order, version=v),
        lambda: protocodec.open_order(order),
    )


def order_status(order: SimOrder, omit: Collection[str] = NO_OMISSIONS) -> Outgoing:
    return Outgoing(
        codec.ORDER_STATUS,
        lambda v: codec.order_status_fields(order, omit=omit),
        lambda: protocodec.order_status(order, omit=omit),
    )


def open_order_end() -> Outgoing:
    return Outgoing(
        codec.OPEN_ORDER_END, lambda v: codec.open_order_end_fields(), protocodec.open_order_end
    )


def completed_order(
    order: SimOrder, completed_time: str = "", completed_status: str = ""
) -> Outgoing:
    return Outgoing(
        codec.COMPLETED_ORDER,
        lambda v: codec.completed_order_fields(order, completed_time, completed_status, version=v),
        lambda: protocodec.completed_order(order, completed_time, completed_status),
    )


def completed_orders_end() -> Outgoing:
    return Outgoing(
        codec.COMPLETED_ORDERS_END,
        lambda v: codec.completed_orders_end_fields(),
        protocodec.completed_orders_end,
    )


def order_bound(perm_id: int, client_id: int, order_id: int) -> Outgoing:
    return Outgoing(
        codec.ORDER_BOUND,
        lambda v: codec.order_bound_fields(perm_id, client_id, order_id),
        lambda: protocodec.order_bound(perm_id, client_id, order_id),
    )


def exec_details(req_id: int, fill: Fill) -> Outgoing:
    return Outgoing(
        codec.EXECUTION_DATA,
        lambda v: codec.exec_details_fields(req_id, fill, version=v),
        lambda: protocodec.exec_details(req_id, fill),
    )


def exec_details_end(req_id: int) -> Outgoing:
    return Outgoing(
        codec.EXECUTION_DATA_END,
        lambda v: codec.exec_details_end_fields(req_id),
        lambda: protocodec.exec_details_end(req_id),
    )


def commission_report(fill: Fill) -> Outgoing:
    return Outgoing(
        codec.COMMISSION_REPORT,
        lambda v: codec.commission_report_fields(fill),
        lambda: protocodec.commission_report(fill),
    )


# ---- market data and contracts ---------------------------------------------------------------


def tick_price(
    req_id: int, tick_type: int, price: float, size: float, attr_mask: int = 0
) -> Outgoing:
    return Outgoing(
        codec.TICK_PRICE,
        lambda v: codec.tick_price_fields(req_id, tick_type, price, size, attr_mask),
        lambda: protocodec.tick_price(req_id, tick_type, price, size, attr_mask),
    )


def tick_option_computation(
    req_id: int,
    tick_type: int,
    implied_vol: float | None,
    delta: float,
    opt_price: float,
    gamma: float,
    vega: float,
    theta: float,
    und_price: float,
) -> Outgoing:
    """tickOptionComputation (21): tick type 10 bid, 11 ask, 12 last, 13 model (80-83 delayed);
    greeks per share, vega per volatility point, theta per day."""
    values = (req_id, tick_type, implied_vol, delta, opt_price, gamma, vega, theta, und_price)
    return Outgoing(
        codec.TICK_OPTION_COMPUTATION,
        lambda v: codec.tick_option_computation_fields(*values),
        lambda: protocodec.tick_option_computation(*values),
    )


def tick_size(req_id: int, tick_type: int, size: float) -> Outgoing:
    return Outgoing(
        codec.TICK_SIZE,
        lambda v: codec.tick_size_fields(req_id, tick_type, size),
        lambda: protocodec.tick_size(req_id, tick_type, size),
    )


def tick_req_params(
    req_id: int, min_tick: float, bbo_exchange: str = "", snapshot_permissions: int = 3
) -> Outgoing:
    return Outgoing(
        codec.TICK_REQ_PARAMS,
        lambda v: codec.tick_req_params_fields(
            req_id, min_tick, bbo_exchange, snapshot_permissions
        ),
        lambda: protocodec.tick_req_params(req_id, min_tick, bbo_exchange, snapshot_permissions),
    )


def tick_snapshot_end(req_id: int) -> Outgoing:
    return Outgoing(
        codec.TICK_SNAPSHOT_END,
        lambda v: codec.tick_snapshot_end_fields(req_id),
        lambda: protocodec.tick_snapshot_end(req_id),
    )


def market_data_type(req_id: int, market_data_type: int) -> Outgoing:
    return Outgoing(
        codec.MARKET_DATA_TYPE,
        lambda v: codec.market_data_type_fields(req_id, market_data_type),
        lambda: protocodec.market_data_type(req_id, market_data_type),
    )


def contract_details(
    req_id: int, instrument: Instrument, hours: ContractHours | None = None
) -> Outgoing:
    return Outgoing(
        codec.CONTRACT_DATA,
        lambda v: codec.contract_details_fields(req_id, instrument, version=v, hours=hours),
        lambda: protocodec.contract_details(req_id, instrument, hours),
    )


def contract_details_end(req_id: int) -> Outgoing:
    return Outgoing(
        codec.CONTRACT_DATA_END,
        lambda v: codec.contract_details_end_fields(req_id),
        lambda: protocodec.contract_details_end(req_id),
    )
