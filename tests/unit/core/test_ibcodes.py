"""Tests for guardd.core.ibcodes: every named IB code's class, the fail-closed default for codes
the table does not name, and the order statuses against ibapi's own list."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from ibapi import errors as ibapi_errors
from ibapi.order_status import OrderStatus as IbapiOrderStatus

from guardd.core.ibcodes import (
    CLASSES,
    TERMINAL_STATUSES,
    IbClass,
    IbCode,
    OrderStatus,
    ib_class,
)

EXPECTED = {
    100: IbClass.PACING,
    101: IbClass.MARKET_DATA,
    103: IbClass.ID_REFUSED,
    161: IbClass.CANCEL_REFUSED,
    200: IbClass.REJECT,
    201: IbClass.REJECT,
    202: IbClass.ORDER_NOTICE,
    321: IbClass.READ_ONLY,
    326: IbClass.CONNECTIVITY,
    399: IbClass.ORDER_NOTICE,
    404: IbClass.ORDER_NOTICE,
    504: IbClass.CONNECTIVITY,
    1100: IbClass.CONNECTIVITY,
    1101: IbClass.CONNECTIVITY,
    1102: IbClass.CONNECTIVITY,
    2104: IbClass.INFORMATIONAL,
    2106: IbClass.INFORMATIONAL,
    2107: IbClass.INFORMATIONAL,
    2108: IbClass.INFORMATIONAL,
    2109: IbClass.ORDER_NOTICE,
    2110: IbClass.CONNECTIVITY,
    2158: IbClass.INFORMATIONAL,
    10147: IbClass.CANCEL_NOT_FOUND,
    10148: IbClass.CANCEL_REFUSED,
}


@pytest.mark.parametrize(("code", "expected"), EXPECTED.items(), ids=[str(c) for c in EXPECTED])
def test_named_code_then_its_class(code: int, expected: IbClass) -> None:
    assert ib_class(code) is expected


def test_every_named_code_then_in_the_table_and_tested() -> None:
    assert set(CLASSES) == set(IbCode)
    assert {int(code) for code in IbCode} == set(EXPECTED)


@pytest.mark.parametrize("code", [0, -1, 102, 203, 10_311, 99_999])
def test_unknown_code_outside_the_warning_range_then_reject(code: int) -> None:
    assert ib_class(code) is IbClass.REJECT


@pytest.mark.parametrize("code", [2100, 2119, 2137, 2199])
def test_unknown_code_in_the_warning_range_then_informational(code: int) -> None:
    assert ib_class(code) is IbClass.INFORMATIONAL


@given(code=st.integers())
def test_any_code_then_a_class_and_only_warnings_are_silently_informational(code: int) -> None:
    kind = ib_class(code)

    assert isinstance(kind, IbClass)
    if kind is IbClass.INFORMATIONAL:
        assert 2100 <= code < 2200


def test_not_connected_then_the_code_ibapi_itself_raises() -> None:
    assert ibapi_errors.NOT_CONNECTED.code() == IbCode.NOT_CONNECTED


def test_order_statuses_then_ibapi_s_list_and_terminal_set() -> None:
    named = {s.value for s in IbapiOrderStatus} - {"Unknown"}
    terminal = {s.value for s in IbapiOrderStatus if s.is_terminal()}

    assert {s.value for s in OrderStatus} == named
    assert {s.value for s in TERMINAL_STATUSES} == terminal
    assert "Filled" in TERMINAL_STATUSES  # a plain string from the wire finds its member
