"""Book folding: positions, orders by permId, sync barriers, duplicates, running totals."""

from __future__ import annotations

import math
from dataclasses import replace

from hypothesis import given, settings
from hypothesis import strategies as st

from guardd.core.book import PORTFOLIO_MAX_AGE_S, Book, RateWindow, value_fresh
from guardd.core.engine import Evaluation
from guardd.core.events import (
    AccountValue,
    ApiReadOnly,
    BrokerEvent,
    ClientId,
    ConId,
    Connected,
    Disconnected,
    Execution,
    OpenOrder,
    OpenOrdersEnd,
    OrderId,
    OrderStatus,
    PermId,
    PnLUpdate,
    PortfolioValue,
    PositionsEnd,
    PositionUpdate,
    PositionValue,
    PriceTick,
    SizeTick,
)
from guardd.core.pricing import ClosePrices, PricePoint

ACC = "DU111"


def connected(ts: float = 0.0) -> Connected:
    return Connected(server_version=178, managed_accounts=(ACC,), next_order_id=1, ts=ts)


def pos(
    con_id: int,
    qty: float,
    ts: float = 1.0,
    currency: str = "USD",
    account: str = ACC,
    mult: float = 1.0,
) -> PositionUpdate:
    return PositionUpdate(
        account=account,
        con_id=ConId(con_id),
        symbol=f"S{con_id}",
        sec_type="STK",
        currency=currency,
        multiplier=mult,
        exchange="SMART",
        quantity=qty,
        avg_cost=10.0,
        ts=ts,
    )


def open_order(
    perm: int, order_id: int = 0, client: int = 0, status: str = "Submitted", ts: float = 1.0
) -> OpenOrder:
    return OpenOrder(
        perm_id=PermId(perm),
        order_id=OrderId(order_id),
        client_id=ClientId(client),
        account=ACC,
        con_id=ConId(1),
        symbol="S1",
        sec_type="STK",
        action="BUY",
        quantity=10,
        order_type="LMT",
        lmt_price=100.0,
        order_ref="",
        status=status,
        currency="USD",
        multiplier=1.0,
        ts=ts,
    )


def order_status(
    perm: int, status: str = "Submitted", order_id: int = 0, client: int = 0, ts: float = 1.0
) -> OrderStatus:
    return OrderStatus(
        perm_id=PermId(perm),
        order_id=OrderId(order_id),
        client_id=ClientId(client),
        status=status,
        filled=0.0,
        remaining=10.0,
        avg_fill_price=0.0,
        ts=ts,
    )


def tick(con_id: int, price: float, ts: float = 1.0) -> PriceTick:
    return PriceTick(con_id=ConId(con_id), field="last", price=price, ts=ts)


def synced_book(*events: BrokerEvent) -> Book:
    book = Book(ACC, "USD", created_at=0.0)
    for e in (connected(), PositionsEnd(ts=0.0), OpenOrdersEnd(ts=0.0), *events):
        book.fold(e)
    return book


def test_new_book_then_unsynced_and_disconnected() -> None:
    book = Book(ACC, created_at=5.0)
    assert not book.synced
    assert book.disconnected_since == 5.0


def test_connected_without_both_barriers_then_unsynced() -> None:
    book = Book(ACC, created_at=0.0)
    book.fold(connected())
    book.fold(PositionsEnd(ts=1.0))
    assert not book.synced
    book.fold(OpenOrdersEnd(ts=2.0))
    assert book.synced


def test_reconnect_then_unsynced_until_barriers_and_unreported_swept() -> None:
    book = synced_book(pos(1, 100), pos(2, 50), open_order(11), open_order(12))
    book.fold(Disconnected(reason="eof", ts=5.0))
    assert not book.synced
    book.fold(connected(ts=6.0))
    book.fold(pos(1, 100, ts=6.1))
    book.fold(open_order(11, ts=6.2))
    assert not book.synced
    assert book.position_count == 2  # nothing swept before the barrier
    book.fold(PositionsEnd(ts=6.3))
    book.fold(OpenOrdersEnd(ts=6.4))
    assert book.synced
    assert book.position(ConId(2)) is None
    assert book.position_count == 1
    assert {o.perm_id for o in book.working_orders()} == {PermId(11)}


def test_position_then_valued_from_price_and_totalled() -> None:
    book = synced_book(pos(1, 100, mult=1.0), tick(1, 20.0), pos(2, -5, mult=50.0), tick(2, 4.0))
    assert book.exposure().gross == 100 * 20.0 + 5 * 50 * 4.0
    assert book.position(ConId(2)) is not None


def test_price_ticks_then_each_field_keeps_its_own_time() -> None:
    book = synced_book(
        PriceTick(con_id=ConId(1), field="bid", price=99.0, ts=1.0),
        PriceTick(con_id=ConId(1), field="ask", price=101.0, ts=2.0),
        PriceTick(con_id=ConId(1), field="last", price=100.0, ts=3.0),
    )
    prices = book.quote(ConId(1)).close_prices()
    assert prices == ClosePrices(
        bid=PricePoint(99.0, 1.0), ask=PricePoint(101.0, 2.0), last=PricePoint(100.0, 3.0)
    )
    assert book.quote(ConId(1)).ts == 3.0  # any field: when the contract last ticked


def test_size_tick_at_an_unchanged_price_then_that_price_is_current_again() -> None:
    book = synced_book(
        PriceTick(con_id=ConId(1), field="bid", price=99.0, ts=1.0),
        SizeTick(con_id=ConId(1), field="bid", ts=7.0),
        SizeTick(con_id=ConId(1), field="ask", ts=7.0),  # no ask price yet: nothing to confirm
        SizeTick(con_id=ConId(2), field="bid", ts=7.0),  # no quote at all
    )
    prices = book.quote(ConId(1)).close_prices()
    assert prices.bid == PricePoint(99.0, 7.0)
    assert prices.ask is None
    assert book.quote(ConId(2)).close_prices() == ClosePrices()


def test_delayed_tick_then_marked_delayed_until_a_live_tick() -> None:
    book = synced_book(PriceTick(con_id=ConId(1), field="last", price=100.0, ts=1.0, delayed=True))
    assert book.quote(ConId(1)).close_prices().last == PricePoint(100.0, 1.0, delayed=True)
    book.fold(SizeTick(con_id=ConId(1), field="last", ts=2.0, delayed=True))
    assert book.quote(ConId(1)).close_prices().last == PricePoint(100.0, 2.0, delayed=True)
    book.fold(PriceTick(con_id=ConId(1), field="last", price=100.5, ts=3.0))
    assert book.quote(ConId(1)).close_prices().last == PricePoint(100.5, 3.0)


def test_position_without_price_then_exposure_untrusted() -> None:
    book = synced_book(pos(1, 100))
    exp = book.exposure()
    assert exp.gross is None
    assert exp.unvalued == 1


def test_foreign_currency_without_rate_then_missing_rate_not_zero() -> None:
    book = synced_book(pos(1, 10, currency="EUR"), tick(1, 100.0))
    assert book.exposure().gross is None
    assert book.exposure().missing_rates == ("EUR",)
    book.fold(AccountValue(account=ACC, key="ExchangeRate", value="1.1", currency="EUR", ts=2))
    assert book.exposure().gross == 10 * 100.0 * 1.1


def base_value(key: str, value: str, currency: str, ts: float = 2.0) -> AccountValue:
    return AccountValue(account=ACC, key=key, value=value, currency=currency, ts=ts)


def unassuming_book(*events: BrokerEvent) -> Book:
    """A synced Book told nothing about the base currency (as the guard builds it)."""
    book = Book(ACC, created_at=0.0)
    for e in (connected(), PositionsEnd(ts=0.0), OpenOrdersEnd(ts=0.0), *events):
        book.fold(e)
    return book


def test_base_currency_unknown_then_no_currency_converts() -> None:
    # Arrange: a USD position and a USD price, but nothing yet names the base currency
    book = unassuming_book(pos(1, 10, currency="USD"), tick(1, 100.0))
    # Act / Assert: USD is not assumed to be the base (that read 1:1 for a EUR account)
    assert book.base_currency is None
    assert book.exchange_rate("USD") is None
    assert book.exchange_rate("BASE") == 1.0
    assert book.exposure().gross is None
    assert book.exposure().missing_rates == ("USD",)


def test_eur_base_account_then_usd_positions_converted_with_exchange_rate() -> None:
    # Arrange: TWS's rows for a EUR account: base-only values in EUR, a rate per currency
    book = unassuming_book(
        base_value("Currency", "BASE", "BASE"),
        base_value("Currency", "USD", "USD"),
        base_value("ExchangeRate", "1.00", "BASE"),
        base_value("ExchangeRate", "1.00", "EUR"),
        base_value("ExchangeRate", "0.92", "USD"),
        base_value("MaintMarginReq", "5000", "EUR"),
        base_value("NetLiquidation", "100000", "EUR"),
        pos(1, 10, currency="USD"),
        tick(1, 100.0),
        pos(2, -5, currency="EUR"),
        tick(2, 200.0),
    )
    # Act
    exposure = book.exposure()
    # Assert: the base currency as IB named it; USD at 0.92, EUR at 1
    assert book.base_currency == "EUR"
    assert book.exchange_rate("USD") == 0.92
    assert book.exchange_rate("EUR") == 1.0
    assert exposure.gross is not None
    assert math.isclose(exposure.gross, 10 * 100.0 * 0.92 + 5 * 200.0)
    assert book.net_liquidation is not None and book.net_liquidation.value == 100000.0
    assert book.margin_change is not None and book.margin_change.current == 5000.0


def test_eur_base_account_without_usd_rate_then_missing_rate_not_one() -> None:
    # Arrange: the old default read any USD figure 1:1 whatever the base currency
    book = unassuming_book(
        base_value("NetLiquidation", "100000", "EUR"), pos(1, 10, currency="USD"), tick(1, 100.0)
    )
    # Assert
    assert book.exchange_rate("USD") is None
    assert book.exposure().gross is None
    assert book.exposure().missing_rates == ("USD",)


def test_base_currency_assumed_then_ib_word_wins() -> None:
    book = Book(ACC, "USD", created_at=0.0)
    book.fold(base_value("NetLiquidation", "100000", "GBP"))
    assert book.base_currency == "GBP"
    assert book.exchange_rate("USD") is None


def test_per_currency_rows_then_base_currency_not_learned_from_them() -> None:
    book = unassuming_book(
        base_value("CashBalance", "10", "USD"),
        base_value("NetLiquidationByCurrency", "10", "USD"),
        base_value("Cushion", "0.5", ""),
        base_value("TotalCashValue", "10", "BASE"),
    )
    assert book.base_currency is None


@given(
    rates=st.dictionaries(
        st.sampled_from(["USD", "JPY", "GBP", "CHF"]),
        st.floats(min_value=1e-4, max_value=1e3, allow_nan=False),
        max_size=4,
    ),
    held=st.lists(
        st.tuples(
            st.sampled_from(["USD", "JPY", "GBP", "CHF", "EUR"]),
            # quantities as IB reports them (no subnormal floats: 5e-324 x 1.5 rounds to 1e-323)
            st.floats(min_value=-1e5, max_value=1e5, allow_nan=False).filter(
                lambda q: abs(q) >= 1e-4
            ),
            st.floats(min_value=0.01, max_value=1e4, allow_nan=False),
        ),
        min_size=1,
        max_size=6,
    ),
)
@settings(max_examples=100, deadline=None)
def test_exposure_in_eur_base_then_sum_of_converted_values_or_missing(
    rates: dict[str, float], held: list[tuple[str, float, float]]
) -> None:
    # Arrange: a EUR account holding positions in several currencies, some without a rate
    events: list[BrokerEvent] = [base_value("NetLiquidation", "1000000", "EUR")]
    events += [base_value("ExchangeRate", repr(r), c) for c, r in rates.items()]
    for n, (ccy, qty, price) in enumerate(held, start=1):
        events += [pos(n, qty, currency=ccy), tick(n, price)]
    book = unassuming_book(*events)
    # Act
    exposure = book.exposure()
    # Assert: every currency converts with its own rate, never 0 or 1 in place of a missing one
    missing = sorted({c for c, _, _ in held if c != "EUR" and c not in rates})
    assert list(exposure.missing_rates) == missing
    if missing:
        assert exposure.gross is None
    else:
        expected = sum(abs(q * p) * (1.0 if c == "EUR" else rates[c]) for c, q, p in held)
        assert exposure.gross is not None
        assert math.isclose(exposure.gross, expected, rel_tol=1e-9)


def test_position_value_then_used_and_quantity_change_scales_it() -> None:
    book = synced_book(pos(1, 100))
    book.fold(
        PositionValue(
            account=ACC,
            con_id=ConId(1),
            position=100,
            daily=0,
            unrealized=0,
            realized=0,
            value=5000.0,
            ts=2.0,
        )
    )
    assert book.exposure().gross == 5000.0
    book.fold(pos(1, 50, ts=3.0))
    assert book.exposure().gross == 2500.0


def portfolio(
    con_id: int, qty: float, value: float, ts: float, account: str = ACC
) -> PortfolioValue:
    price = value / qty if qty else 0.0
    return PortfolioValue(
        account=account,
        con_id=ConId(con_id),
        position=qty,
        market_price=price,
        market_value=value,
        ts=ts,
    )


def test_portfolio_value_then_every_position_valued_without_a_price() -> None:
    book = synced_book(pos(1, 100), pos(2, -50))
    assert book.exposure().unvalued == 2
    book.fold(portfolio(1, 100, 5000.0, ts=2.0))
    book.fold(portfolio(2, -50, -1000.0, ts=2.0))
    exposure = book.exposure()
    assert exposure.unvalued == 0
    assert exposure.gross == 6000.0
    p = book.position(ConId(1))
    assert p is not None
    assert (p.value, p.value_ts, p.portfolio_ts) == (5000.0, 2.0, 2.0)


def test_price_after_portfolio_value_then_latest_received_wins() -> None:
    book = synced_book(pos(1, 100))
    book.fold(portfolio(1, 100, 5000.0, ts=2.0))
    book.fold(tick(1, 51.0, ts=3.0))
    p = book.position(ConId(1))
    assert p is not None
    assert (p.value, p.value_ts, p.portfolio_ts) == (5100.0, 3.0, 2.0)
    book.fold(portfolio(1, 100, 5200.0, ts=4.0))
    p = book.position(ConId(1))
    assert p is not None
    assert (p.value, p.value_ts) == (5200.0, 4.0)


def test_portfolio_value_older_than_a_price_then_price_kept() -> None:
    book = synced_book(pos(1, 100), tick(1, 51.0, ts=5.0))
    book.fold(portfolio(1, 100, 5000.0, ts=4.0))
    p = book.position(ConId(1))
    assert p is not None
    assert (p.value, p.value_ts) == (5100.0, 5.0)


def test_portfolio_quantity_disagrees_then_scaled_to_the_book_quantity() -> None:
    book = synced_book(pos(1, 100))
    book.fold(portfolio(1, 200, 10000.0, ts=2.0))  # a fill the positions stream has not sent yet
    assert book.exposure().gross == 5000.0


def test_portfolio_value_of_unknown_quantity_or_other_account_then_not_folded() -> None:
    book = synced_book(pos(1, math.nan), pos(2, 100, account="DU999"))
    book.fold(portfolio(1, 100, 5000.0, ts=2.0))
    book.fold(portfolio(2, 100, 5000.0, ts=2.0, account="DU999"))
    p = book.position(ConId(1))
    assert p is not None and p.value is None
    assert book.exposure().unvalued == 1


def test_portfolio_valued_position_then_fresh_within_ibs_refresh_then_stale() -> None:
    book = synced_book(pos(1, 100))
    book.fold(portfolio(1, 100, 5000.0, ts=100.0))
    p = book.position(ConId(1))
    assert p is not None
    assert value_fresh(p, 100.0 + 30, max_age_s=30)
    assert value_fresh(p, 100.0 + PORTFOLIO_MAX_AGE_S, max_age_s=30)
    assert not value_fresh(p, 100.0 + PORTFOLIO_MAX_AGE_S + 1, max_age_s=30)


def test_price_valued_position_without_portfolio_then_stale_after_max_age() -> None:
    book = synced_book(pos(1, 100), tick(1, 50.0, ts=100.0))
    p = book.position(ConId(1))
    assert p is not None
    assert value_fresh(p, 130.0, max_age_s=30)
    assert not value_fresh(p, 131.0, max_age_s=30)


def test_other_account_position_then_kept_but_not_totalled() -> None:
    book = synced_book(pos(1, 100, account="DU999"), tick(1, 10.0))
    assert book.position(ConId(1), account="DU999") is not None
    assert book.position_count == 0
    assert book.exposure().gross == 0.0


def test_order_status_before_open_order_then_one_order_with_terms() -> None:
    book = synced_book(order_status(77, status="PreSubmitted"), open_order(77, status="Submitted"))
    order = book.order(PermId(77))
    assert order is not None
    assert order.has_terms
    assert order.status == "Submitted"
    assert book.working_order_count == 1
    assert book.order_seq == 1


def test_tws_orders_with_order_id_zero_then_keyed_by_perm_id() -> None:
    book = synced_book(open_order(1, order_id=0), open_order(2, order_id=0))
    assert book.working_order_count == 2


def test_perm_id_zero_then_provisional_and_rekeyed_when_known() -> None:
    book = synced_book(order_status(0, order_id=5, client=3))
    assert book.working_order_count == 1
    book.fold(open_order(900, order_id=5, client=3))
    assert book.order(PermId(900)) is not None
    assert book.working_order_count == 1
    assert all(k > 0 for k in book.orders)


def test_filled_order_then_not_working_and_stays_terminal() -> None:
    book = synced_book(open_order(5), order_status(5, status="Filled"))
    assert book.working_order_count == 0
    book.fold(open_order(5, status="Submitted", ts=2.0))  # late duplicate
    assert book.working_order_count == 0


def test_duplicate_execution_then_kept_once() -> None:
    ex = Execution(
        exec_id="0001.01",
        perm_id=PermId(1),
        order_id=OrderId(1),
        client_id=ClientId(1),
        account=ACC,
        con_id=ConId(1),
        symbol="S1",
        side="BOT",
        shares=10,
        price=1.0,
        time="20250101 10:00:00",
        order_ref="",
        ts=1.0,
    )
    book = synced_book(ex, ex)
    assert len(book.executions) == 1


def test_new_orders_then_counted_per_client_in_windows() -> None:
    book = synced_book(
        *(open_order(100 + i, order_id=i + 1, client=7, ts=10.0 + i * 0.1) for i in range(5))
    )
    assert book.new_orders(ClientId(7), 1.0, now=10.45) == 5
    assert book.new_orders(ClientId(7), 1.0, now=11.25) == 2
    assert book.new_orders(ClientId(7), 60.0, now=11.25) == 5
    assert book.new_orders(None, 60.0, now=80.0) == 0


def test_orders_downloaded_before_barrier_then_not_counted_as_new() -> None:
    book = Book(ACC, created_at=0.0)
    book.fold(connected())
    for i in range(10):
        book.fold(open_order(i + 1, client=1, ts=1.0))
    book.fold(OpenOrdersEnd(ts=1.0))
    assert book.new_orders(None, 1.0, now=1.0) == 0
    assert book.working_order_count == 10


def test_pnl_and_net_liq_then_start_of_day_and_peak() -> None:
    book = synced_book(
        AccountValue(account=ACC, key="NetLiquidation", value="100000", currency="USD", ts=1),
        PnLUpdate(account=ACC, daily=500.0, unrealized=0.0, realized=0.0, ts=2),
        PnLUpdate(account=ACC, daily=-1000.0, unrealized=0.0, realized=0.0, ts=3),
    )
    assert book.start_of_day == 99500.0
    assert book.peak_equity == 100000.0
    assert book.equity == 98500.0


def test_rate_window_then_expires_old_events() -> None:
    w = RateWindow(1.0)
    for t in (0.0, 0.5, 0.9):
        w.add(t)
    assert w.count(1.0) == 2
    assert w.count(2.0) == 0


# -- property: running totals equal a from-scratch recomputation --------------------------------

_con = st.integers(min_value=1, max_value=4)
_events = st.one_of(
    st.builds(
        lambda c, q, ccy, acc, t: pos(c, q, ts=t, currency=ccy, account=acc),
        _con,
        st.sampled_from([0.0, 1.0, -3.0, 100.0, 2.5]),
        st.sampled_from(["USD", "EUR"]),
        st.sampled_from([ACC, "DU999"]),
        st.floats(0, 100),
    ),
    st.builds(tick, _con, st.sampled_from([1.0, 10.0, 33.3, math.nan, -1.0]), st.floats(0, 100)),
    st.builds(
        lambda c, v, t: PositionValue(
            account=ACC,
            con_id=ConId(c),
            position=1.0,
            daily=0.0,
            unrealized=0.0,
            realized=0.0,
            value=v,
            ts=t,
        ),
        _con,
        st.sampled_from([0.0, 123.0, -77.0, math.nan]),
        st.floats(0, 100),
    ),
    st.builds(
        lambda p, o, s: order_status(p, order_id=o, status=s),
        st.integers(0, 5),
        st.integers(0, 3),
        st.sampled_from(["Submitted", "Filled", "Cancelled", "PreSubmitted"]),
    ),
    st.builds(
        lambda p, o, s: open_order(p, order_id=o, status=s),
        st.integers(0, 5),
        st.integers(0, 3),
        st.sampled_from(["Submitted", "Filled", "Cancelled"]),
    ),
    st.just(connected(0.0)),
    st.just(Disconnected(reason="x", ts=0.0)),
    st.just(PositionsEnd(ts=0.0)),
    st.just(OpenOrdersEnd(ts=0.0)),
)


@settings(max_examples=150, deadline=None)
@given(st.lists(_events, max_size=40))
def test_any_event_sequence_then_running_totals_match_recomputation(
    events: list[BrokerEvent],
) -> None:
    book = Book(ACC, "USD", created_at=0.0)
    for e in events:
        book.fold(e)
    gross: dict[str, float] = {}
    unvalued = 0
    nonzero = 0
    for p in book.positions.values():
        if p.account != ACC:
            continue
        nonzero += p.quantity != 0
        if p.value is None:
            unvalued += p.quantity != 0
        else:
            gross[p.currency] = gross.get(p.currency, 0.0) + abs(p.value)
    assert book.position_count == nonzero
    assert book.exposure().unvalued == unvalued
    running = book.gross_local()
    assert set(running) == set(gross)
    for ccy, total in gross.items():
        assert math.isclose(running[ccy], total, rel_tol=1e-9, abs_tol=1e-6)
    assert book.working_order_count == sum(1 for o in book.orders.values() if o.working)


GUARD = 0  # the guard's own API client id in these tests
BOT = 7
LABEL = "guardd:flatten:3:1"


def guard_book(*events: BrokerEvent, claimed: tuple[int, ...] = ()) -> Book:
    """A synced Book that knows the guard's client id and the order ids it allocated."""
    book = Book(ACC, "USD", created_at=0.0, own_client_id=ClientId(GUARD))
    for e in (connected(), PositionsEnd(ts=0.0), OpenOrdersEnd(ts=0.0)):
        book.fold(e)
    for order_id in claimed:
        book.claim_order_id(OrderId(order_id))
    for e in events:
        book.fold(e)
    return book


def labelled(event: OpenOrder, ref: str = LABEL) -> OpenOrder:
    return replace(event, order_ref=ref)


def fill(perm: int, order_id: int, client: int, exec_id: str = "e1") -> Execution:
    return Execution(
        exec_id=exec_id,
        perm_id=PermId(perm),
        order_id=OrderId(order_id),
        client_id=ClientId(client),
        account=ACC,
        con_id=ConId(1),
        symbol="S1",
        side="BOT",
        shares=10,
        price=1.0,
        time="20250101 10:00:00",
        order_ref=LABEL,
        ts=1.0,
    )


def test_own_close_orders_then_not_counted_for_the_sweep() -> None:
    bot = open_order(1, order_id=5, client=BOT)
    child = labelled(open_order(2, order_id=9, client=GUARD))
    book = guard_book(bot, child, claimed=(9, 10))
    assert book.working_order_count == 2
    assert book.foreign_working_count == 1
    seq = book.foreign_order_seq
    book.fold(replace(child, perm_id=PermId(3), order_id=OrderId(10)))  # another child
    assert book.foreign_order_seq == seq
    book.fold(order_status(1, "Cancelled", order_id=5, client=BOT))
    assert book.foreign_working_count == 0


def test_bot_order_labelled_guardd_then_foreign_swept_and_reported_once() -> None:
    # Arrange: the guard has a child (id 9); a bot labels its own order like a guard child
    book = guard_book(labelled(open_order(2, order_id=9, client=GUARD)), claimed=(9,))
    seq = book.foreign_order_seq

    # Act
    book.fold(labelled(open_order(1, order_id=9, client=BOT)))
    book.fold(order_status(1, "Submitted", order_id=9, client=BOT))
    book.fold(labelled(open_order(1, order_id=9, client=BOT, ts=2.0)))

    # Assert
    impostor = book.order(PermId(1))
    assert impostor is not None and not book.is_own(impostor)
    assert book.foreign_working_count == 1
    assert book.foreign_order_seq == seq + 1
    assert book.new_orders(ClientId(BOT), 60.0, now=1.0) == 1
    reported = book.take_impersonations()
    assert [(r.client_id, r.order_id, r.perm_id, r.order_ref) for r in reported] == [
        (BOT, 9, 1, LABEL)
    ]
    assert book.take_impersonations() == ()
    assert book.impersonations_seen == 1 and book.impersonating_working_count == 1


def test_guard_client_id_with_unclaimed_order_id_then_foreign() -> None:
    book = guard_book(labelled(open_order(4, order_id=11, client=GUARD)), claimed=(9,))
    assert book.foreign_working_count == 1
    assert book.impersonations_seen == 1


def test_claimed_order_id_without_label_then_own_and_not_a_new_order() -> None:
    book = guard_book(open_order(2, order_id=9, client=GUARD), claimed=(9,))
    child = book.order(PermId(2))
    assert child is not None and book.is_own(child)
    assert book.foreign_working_count == 0 and book.foreign_order_seq == 0
    assert book.new_orders(None, 60.0, now=1.0) == 0
    assert book.is_own_execution(fill(2, 9, GUARD))
    assert not book.is_own_execution(fill(8, 9, BOT))
    assert book.take_impersonations() == ()


def test_claimed_id_seen_with_another_perm_id_than_learned_then_foreign() -> None:
    # Arrange: child 9 acknowledged as permId 2
    book = guard_book(open_order(2, order_id=9, client=GUARD), claimed=(9,))

    # Act: a different order under the same (client, order id): ids rolled back elsewhere
    book.fold(labelled(open_order(3, order_id=9, client=GUARD)))

    # Assert: the learned permId decides; its fills follow the permId too
    other = book.order(PermId(3))
    assert other is not None and not book.is_own(other)
    assert book.foreign_working_count == 1
    assert book.is_own_execution(fill(2, 0, BOT))  # the learned permId alone is enough
    assert not book.is_own_execution(fill(3, 9, GUARD, exec_id="e2"))


def test_claimed_order_first_seen_without_perm_id_then_own_before_and_after_rekey() -> None:
    book = guard_book(order_status(0, order_id=9, client=GUARD), claimed=(9,))
    book.fold(open_order(0, order_id=9, client=GUARD))
    assert book.foreign_working_count == 0
    book.fold(open_order(5, order_id=9, client=GUARD))
    child = book.order(PermId(5))
    assert child is not None and book.is_own(child)
    assert book.foreign_working_count == 0 and book.foreign_order_seq == 0


def test_claim_after_order_reported_then_reclassified_own() -> None:
    book = guard_book(open_order(2, order_id=9, client=GUARD))
    assert book.foreign_working_count == 1
    book.claim_order_id(OrderId(9))
    child = book.order(PermId(2))
    assert child is not None and book.is_own(child)
    assert book.foreign_working_count == 0


def test_restored_claim_with_perm_id_then_that_order_own_and_another_under_its_id_not() -> None:
    # Arrange: a restarted guard claims child 9 with the permId its journal recorded (2)
    book = guard_book()
    book.claim_order_id(OrderId(9), PermId(2))

    # Act: another order is reported first under (guard, 9) (ids rolled back), then the child
    book.fold(labelled(open_order(3, order_id=9, client=GUARD)))
    book.fold(open_order(2, order_id=9, client=GUARD))

    # Assert: the permId decides, not which came first (claimed by id alone, 3 would be "ours"
    # and the real child swept as foreign)
    other, child = book.order(PermId(3)), book.order(PermId(2))
    assert other is not None and not book.is_own(other)
    assert child is not None and book.is_own(child)
    assert book.foreign_working_count == 1 and book.impersonations_seen == 1
    assert book.is_own_execution(fill(2, 0, BOT))
    assert not book.is_own_execution(fill(3, 9, GUARD, exec_id="e2"))


def test_claim_with_perm_id_after_the_order_was_reported_then_reclassified_own() -> None:
    book = guard_book(open_order(2, order_id=0, client=BOT))  # reported under no id of ours
    assert book.foreign_working_count == 1
    book.claim_order_id(OrderId(9), PermId(2))
    child = book.order(PermId(2))
    assert child is not None and book.is_own(child)
    assert book.foreign_working_count == 0


def test_book_without_own_client_id_then_nothing_is_own() -> None:
    book = synced_book(labelled(open_order(2, order_id=9, client=GUARD)))
    book.claim_order_id(OrderId(9))
    assert book.foreign_working_count == 1


_orders_spec = st.lists(
    st.tuples(
        st.sampled_from([GUARD, BOT, 3]),  # client id
        st.integers(1, 6),  # order id
        st.sampled_from(["", LABEL, "guardd:reduce:1:2", "bot"]),  # orderRef
        st.sampled_from(["Submitted", "PreSubmitted", "Filled", "Cancelled"]),
    ),
    max_size=25,
    unique_by=lambda t: (t[0], t[1]),
)


@settings(max_examples=200, deadline=None)
@given(_orders_spec, st.sets(st.integers(1, 6)))
def test_any_orders_then_own_exactly_the_guards_claimed_ids_whatever_the_label(
    specs: list[tuple[int, int, str, str]], claimed: set[int]
) -> None:
    # Arrange / Act: each (client, order id) is one order with its own permId
    events = [
        replace(open_order(100 + i, order_id=oid, client=client, status=status), order_ref=ref)
        for i, (client, oid, ref, status) in enumerate(specs)
    ]
    book = guard_book(*events, claimed=tuple(sorted(claimed)))

    # Assert
    def own(client: int, oid: int) -> bool:
        return client == GUARD and oid in claimed

    for i, (client, oid, _ref, _status) in enumerate(specs):
        order = book.order(PermId(100 + i))
        assert order is not None and book.is_own(order) == own(client, oid)
    working_foreign = [
        s for s in specs if not own(s[0], s[1]) and s[3] in ("Submitted", "PreSubmitted")
    ]
    assert book.foreign_working_count == len(working_foreign)
    impostors = [s for s in specs if not own(s[0], s[1]) and s[2].startswith("guardd:")]
    assert len(book.take_impersonations()) == book.impersonations_seen == len(impostors)
    new_foreign = sum(1 for s in specs if not own(s[0], s[1]))
    assert book.new_orders(None, 60.0, now=1.0) == new_foreign


def test_status_without_terms_then_not_swept_until_terms_known() -> None:
    book = synced_book(order_status(4, order_id=3, client=7))
    assert book.working_order_count == 1
    assert book.foreign_working_count == 0
    book.fold(open_order(4, order_id=3, client=7))
    assert book.foreign_working_count == 1


def test_read_only_api_then_cannot_act_and_engine_not_synced_until_lifted() -> None:
    # Arrange: a synced Book
    book = Book(ACC, created_at=0.0)
    book.fold(connected())
    book.fold(PositionsEnd(ts=1.0))
    book.fold(OpenOrdersEnd(ts=1.0))
    assert book.can_act and Evaluation.of(book, []).synced

    # Act: TWS says Read-Only (321), twice
    book.fold(ApiReadOnly(read_only=True, ts=2.0))
    book.fold(ApiReadOnly(read_only=True, ts=3.0))

    # Assert: cannot act since the first; the engine does not count it as synced
    assert book.read_only and book.read_only_since == 2.0 and not book.can_act
    assert book.synced and not Evaluation.of(book, []).synced

    # Act: lifted
    book.fold(ApiReadOnly(read_only=False, ts=4.0))
    assert book.can_act and book.read_only_since is None
    assert Evaluation.of(book, []).synced
