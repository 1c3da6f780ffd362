"""Scenario files for the simulated gateway: accounts, instruments, starting positions and a
schedule of faults, in TOML. `load_scenario` validates the whole file and names the offending
key on error; `run_faults` plays the schedule against a running `SimGateway`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import logging
import tomllib
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Literal, assert_never, get_args

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from ibsim.exchange import Exchange
from ibsim.gateway import FieldOmission, GatewayConfig, SimGateway
from ibsim.hours import BUILT_IN, Calendar
from ibsim.messages import MAX_SERVER_VERSION, MIN_SERVER_VERSION
from ibsim.types import Instrument, OrderRequest

log = logging.getLogger("ibsim")


class ScenarioError(ValueError):
    """A scenario file that cannot be used; the message names the key and the problem."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class GatewaySection(_Strict):
    seed: int = 1
    master_client_id: int | None = 0
    pacing_limit: Annotated[int, Field(gt=0)] = 50
    pacing_window_s: Annotated[float, Field(gt=0)] = 1.0
    pacing_disconnect: bool = True
    pnl_interval_s: Annotated[float, Field(gt=0)] = 1.0
    portfolio_interval_s: Annotated[float, Field(gt=0)] = 180.0
    market_interval_s: Annotated[float, Field(gt=0)] = 0.1
    fill_latency_s: Annotated[float, Field(ge=0)] = 0.0
    cancel_latency_s: Annotated[float, Field(ge=0)] = 0.0
    partial_fill_quantity: Annotated[float, Field(gt=0)] | None = None
    first_order_id: Annotated[int, Field(ge=1)] = 1
    # The simulated wall clock starts here (ISO 8601 with an offset; default: the real time).
    start_time: dt.datetime | None = None
    # Orders that add to a position are refused (201) when initial margin would exceed equity.
    check_margin: bool = True
    # An FX order below the IDEALPRO minimum is an odd lot: IB routes it so and it fills ("fill");
    # "reject" refuses it (201), to rehearse a gateway that does.
    fx_odd_lots: Literal["fill", "reject"] = "fill"
    max_tickers: Annotated[int, Field(gt=0)] | None = None  # market data lines; more: 101
    # The highest server version offered (default 226); a client gets min(its max, this).
    server_version: Annotated[int, Field(ge=MIN_SERVER_VERSION, le=MAX_SERVER_VERSION)] | None = (
        None
    )


_WEEKDAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")


class CalendarSection(_Strict):
    """Trading hours in the exchange's zone: sessions "HH:MM-HH:MM" on the trading `days`
    (an end not after the start: the session began the evening before), minus `holidays`."""

    timezone: str = "America/New_York"
    regular: list[str] = ["09:30-16:00"]
    extended: list[str] = []
    days: list[Literal["mon", "tue", "wed", "thu", "fri", "sat", "sun"]] = [
        "mon",
        "tue",
        "wed",
        "thu",
        "fri",
    ]
    holidays: list[dt.date] = []

    def to_calendar(self) -> Calendar:
        return Calendar(
            timezone=self.timezone,
            regular=tuple(self.regular),
            extended=tuple(self.extended),
            days=tuple(sorted({_WEEKDAYS.index(d) for d in self.days})),
            holidays=tuple(d.isoformat() for d in self.holidays),
        )

    @model_validator(mode="after")
    def _valid(self) -> CalendarSection:
        try:
            self.to_calendar()
        except Exception as exc:  # zoneinfo raises several kinds for a bad zone name
            raise ValueError(str(exc) or type(exc).__name__) from exc
        return self


class AccountSection(_Strict):
    id: Annotated[str, Field(min_length=1)]
    cash: Annotated[float, Field(ge=0)] = 1_000_000.0


class CurrenciesSection(_Strict):
    """The accounts' base currency and the exchange rates the simulated TWS reports
    (`ExchangeRate`: base units per unit of each other currency); fixed for the run."""

    base: Annotated[str, Field(pattern=r"^[A-Z]{3}$")] = "USD"
    rates: dict[Annotated[str, Field(pattern=r"^[A-Z]{3}$")], Annotated[float, Field(gt=0)]] = {}


class InstrumentSection(_Strict):
    symbol: Annotated[str, Field(min_length=1)]
    # CASH: an FX pair on IDEALPRO, `symbol` its base currency and `currency` its quote currency
    # (EUR.USD: symbol "EUR", currency "USD"); positions and faults name it "EUR.USD".
    # OPT: an option on `underlying` (another instrument's symbol), with `strike`, `right` and
    # `last_trade_date` (its expiry, YYYYMMDD), priced by Black-Scholes at `implied_vol`;
    # positions and faults name it "AAPL 20261218 200C".
    sec_type: Literal["STK", "FUT", "CASH", "OPT"] = "STK"
    con_id: Annotated[int, Field(gt=0)]
    exchange: str = ""
    primary_exchange: str = ""
    currency: str = "USD"
    multiplier: Annotated[float, Field(gt=0)] = 1.0
    last_trade_date: str = ""
    local_symbol: str = ""
    trading_class: str = ""
    price: Annotated[float, Field(gt=0)] = 100.0
    volatility: Annotated[float, Field(ge=0)] = 0.02
    spread: Annotated[float, Field(ge=0)] = 0.02
    min_tick: Annotated[float, Field(gt=0)] = 0.01
    initial_margin_rate: Annotated[float, Field(ge=0, le=1)] = 0.25
    maint_margin_rate: Annotated[float, Field(ge=0, le=1)] = 0.25
    initial_margin_per_contract: Annotated[float, Field(ge=0)] = 0.0
    maint_margin_per_contract: Annotated[float, Field(ge=0)] = 0.0
    # A calendar of [calendars] or a built-in one: always (default), us_equity,
    # cme_equity_futures.
    hours: str = "always"
    underlying: str = ""  # OPT only
    strike: Annotated[float, Field(ge=0)] = 0.0
    right: Literal["", "C", "P"] = ""
    implied_vol: Annotated[float, Field(ge=0, le=10)] = 0.25  # annualised

    @model_validator(mode="after")
    def _option(self) -> InstrumentSection:
        if self.sec_type != "OPT":
            if self.underlying or self.strike or self.right:
                raise ValueError("underlying, strike and right are for options (sec_type OPT)")
            return self
        if not self.underlying:
            raise ValueError("underlying: an option names its underlying's symbol")
        if not self.strike > 0:
            raise ValueError("strike: an option needs a strike > 0")
        if not self.right:
            raise ValueError('right: an option is a call ("C") or a put ("P")')
        if not (len(self.last_trade_date) == 8 and self.last_trade_date.isdigit()):
            raise ValueError("last_trade_date: an option's expiry, YYYYMMDD")
        return self

    @model_validator(mode="after")
    def _fx_pair(self) -> InstrumentSection:
        if self.sec_type != "CASH":
            return self
        if not (len(self.symbol) == 3 and self.symbol.isalpha() and self.symbol.isupper()):
            raise ValueError(
                f"symbol: an FX pair's symbol is its base currency, not {self.symbol!r}"
            )
        if self.symbol == self.currency:
            raise ValueError("currency: an FX pair needs two currencies")
        if self.multiplier != 1.0:
            raise ValueError("multiplier: an FX pair has none (1)")
        return self

    @property
    def name(self) -> str:
        """How positions and faults name it: the symbol, an FX pair as "EUR.USD", an option as
        "AAPL 20261218 200C"."""
        if self.sec_type == "OPT":
            return f"{self.symbol} {self.last_trade_date} {self.strike:g}{self.right}"
        return f"{self.symbol}.{self.currency}" if self.sec_type == "CASH" else self.symbol

    @property
    def occ_symbol(self) -> str:
        """An option's localSymbol as IB shows US options (OCC): "AAPL  261218C00200000"."""
        return (
            f"{self.symbol:<6}{self.last_trade_date[2:]}{self.right}{round(self.strike * 1000):08d}"
        )

    def _option_default(self, key: str, default: float) -> float:
        """A field's value, or for an option where the scenario leaves it out, its default."""
        value: float = getattr(self, key)
        if self.sec_type == "OPT" and key not in self.model_fields_set:
            return default
        return value

    def _unless_set(self, key: str, fx_default: float) -> float:
        """A field's value, or for an FX pair where the scenario leaves it out, an FX default."""
        value: float = getattr(self, key)
        if self.sec_type == "CASH" and key not in self.model_fields_set:
            return fx_default
        return value

    def to_instrument(self, underlying_con_id: int = 0) -> Instrument:
        is_future = self.sec_type == "FUT"
        is_fx = self.sec_type == "CASH"
        is_option = self.sec_type == "OPT"
        exchange = "IDEALPRO" if is_fx else "CME" if is_future else "SMART"
        primary = "" if is_fx or is_option else "CME" if is_future else "NASDAQ"
        if is_option:
            # IB's: 100 shares a contract, a nickel wide, short margin 20 % of the underlying
            return Instrument(
                con_id=self.con_id,
                symbol=self.symbol,
                sec_type="OPT",
                exchange=self.exchange or exchange,
                primary_exchange=self.primary_exchange,
                currency=self.currency,
                multiplier=self._option_default("multiplier", 100.0),
                last_trade_date=self.last_trade_date,
                local_symbol=self.local_symbol or self.occ_symbol,
                trading_class=self.trading_class or self.symbol,
                initial_price=self.price,
                spread=self._option_default("spread", 0.05),
                min_tick=self.min_tick,
                initial_margin_rate=self._option_default("initial_margin_rate", 0.20),
                maint_margin_rate=self._option_default("maint_margin_rate", 0.20),
                right=self.right,
                strike=self.strike,
                underlying_con_id=underlying_con_id,
                implied_vol=self.implied_vol,
            )
        # FX defaults: a pip tick (0.00005 under 20, else 0.005: USD.JPY), two ticks of spread,
        # 3 % margin (IB's for major pairs)
        tick = self._unless_set("min_tick", 0.00005 if self.price < 20 else 0.005)
        return Instrument(
            con_id=self.con_id,
            symbol=self.symbol,
            sec_type=self.sec_type,
            exchange=self.exchange or exchange,
            primary_exchange=self.primary_exchange or primary,
            currency=self.currency,
            multiplier=self.multiplier,
            last_trade_date=self.last_trade_date,
            local_symbol=self.local_symbol or self.name,
            trading_class=self.trading_class or self.name,
            initial_price=self.price,
            volatility=self._unless_set("volatility", 0.005),
            spread=self._unless_set("spread", 2 * tick),
            min_tick=tick,
            initial_margin_rate=self._unless_set("initial_margin_rate", 0.03),
            maint_margin_rate=self._unless_set("maint_margin_rate", 0.03),
            initial_margin_per_contract=self.initial_margin_per_contract,
            maint_margin_per_contract=self.maint_margin_per_contract,
        )


class PositionSection(_Strict):
    account: str = ""  # default: the first account
    symbol: Annotated[str, Field(min_length=1)]
    quantity: float
    avg_price: Annotated[float, Field(gt=0)] | None = None  # default: the instrument's price


class _Fault(_Strict):
    at_s: Annotated[float, Field(ge=0)]  # seconds after the gateway starts


class DropClients(_Fault):
    kind: Literal["drop_clients"]
    seconds: Annotated[float, Field(gt=0)]


class ConnectivityLost(_Fault):
    kind: Literal["connectivity_lost"]
    seconds: Annotated[float, Field(gt=0)]
    data_lost: bool = False  # restored with 1101 (True) or 1102 (False)


class RejectOrders(_Fault):
    kind: Literal["reject_orders"]
    symbol: str = ""  # empty: every symbol
    action: Literal["", "BUY", "SELL"] = ""
    reason: str = "Order rejected by the simulated gateway"
    seconds: Annotated[float, Field(gt=0)] | None = None  # None: for the rest of the run


class DelayPositions(_Fault):
    kind: Literal["delay_positions"]
    delay_s: Annotated[float, Field(ge=0)]


class DuplicatePositions(_Fault):
    kind: Literal["duplicate_positions"]
    copies: Annotated[int, Field(ge=0)] = 1


class PriceJump(_Fault):
    kind: Literal["price_jump"]
    symbol: str
    fraction: Annotated[float, Field(gt=-1)]


class Volatility(_Fault):
    kind: Literal["volatility"]
    symbol: str
    daily_vol: Annotated[float, Field(ge=0)]


class MarginChange(_Fault):
    kind: Literal["margin_change"]
    multiplier: Annotated[float, Field(gt=0)]


class Restart(_Fault):
    kind: Literal["restart"]
    down_s: Annotated[float, Field(gt=0)]
    next_order_id: Annotated[int, Field(ge=1)] | None = None


class Freeze(_Fault):
    kind: Literal["freeze"]
    seconds: Annotated[float, Field(gt=0)]


class DailyReset(_Fault):
    kind: Literal["daily_reset"]
    seconds: Annotated[float, Field(gt=0)]


class SplitModifies(_Fault):
    kind: Literal["split_modifies"]
    seconds: Annotated[float, Field(gt=0)] | None = None  # None: for the rest of the run


class MarketData(_Fault):
    """Market data of some contracts frozen (no ticks) or lagging `lag_s` behind the market."""

    kind: Literal["market_data"]
    symbols: list[str] = []  # empty: every instrument
    mode: Literal["freeze", "lag"] = "freeze"
    lag_s: Annotated[float, Field(gt=0, le=120)] | None = None  # mode = "lag" only
    delayed_ticks: bool = False  # mode = "lag": as IB's delayed-data tick types (66-71)
    seconds: Annotated[float, Field(gt=0)] | None = None  # None: for the rest of the run

    @model_validator(mode="after")
    def _mode_fits(self) -> MarketData:
        if self.mode == "lag" and self.lag_s is None:
            raise ValueError('lag_s: required when mode = "lag"')
        if self.mode == "freeze" and (self.lag_s is not None or self.delayed_ticks):
            raise ValueError('lag_s, delayed_ticks: only with mode = "lag"')
        return self


class ReadOnly(_Fault):
    kind: Literal["read_only"]
    seconds: Annotated[float, Field(gt=0)] | None = None  # None: for the rest of the run


class Liquidate(_Fault):
    kind: Literal["liquidate"]
    account: str = ""  # default: the first account
    symbol: str
    quantity: Annotated[float, Field(gt=0)]


class CancelOrdersWhileDropped(_Fault):
    kind: Literal["cancel_orders_while_dropped"]
    seconds: Annotated[float, Field(gt=0)]
    client_id: int | None = None  # None: every client's orders


class Session(_Fault):
    kind: Literal["session"]
    event: Literal["opening_auction", "closing_auction", "expire_day_orders"]


class OmitFields(_Fault):
    """Fields left out of messages about some contracts (empty `symbols`: every one), e.g. the
    quantity of position updates: ibapi then gives its unset value (see docs/simulator.md)."""

    kind: Literal["omit_fields"]
    symbols: list[str] = []  # empty: every instrument
    position: list[Literal["position"]] = []
    portfolio: list[Literal["position"]] = []
    pnl_single: list[Literal["position", "value"]] = []
    order_status: list[Literal["order_id", "client_id", "perm_id", "filled", "remaining"]] = []
    seconds: Annotated[float, Field(gt=0)] | None = None  # None: for the rest of the run

    @model_validator(mode="after")
    def _omits_something(self) -> OmitFields:
        if not self.omitted():
            raise ValueError("position, portfolio, pnl_single, order_status: name a field to omit")
        return self

    def omitted(self) -> dict[str, frozenset[str]]:
        """Message kind -> the fields left out of it."""
        kinds: dict[str, Sequence[str]] = {
            "position": self.position,
            "portfolio": self.portfolio,
            "pnl_single": self.pnl_single,
            "order_status": self.order_status,
        }
        return {kind: frozenset(names) for kind, names in kinds.items() if names}


class Clock(_Fault):
    """Move the simulated wall clock: to `set_to`, or `advance_s` forward."""

    kind: Literal["clock"]
    set_to: dt.datetime | None = None
    advance_s: Annotated[float, Field(gt=0)] | None = None

    @model_validator(mode="after")
    def _one(self) -> Clock:
        if (self.set_to is None) == (self.advance_s is None):
            raise ValueError("give exactly one of set_to or advance_s")
        if self.set_to is not None and self.set_to.tzinfo is None:
            raise ValueError("set_to: needs a UTC offset, e.g. 2026-12-01T03:00:00-05:00")
        return self


class MarketDataError(_Fault):
    """reqMktData of these contracts answered with an error instead of ticks: 354 (not
    subscribed), 10167 (not subscribed, delayed data shown) or 10197 (a competing live
    session); for `seconds` or the rest of the run."""

    kind: Literal["market_data_error"]
    code: Literal[354, 10167, 10197]
    symbols: list[str] = []  # empty: every instrument
    seconds: Annotated[float, Field(gt=0)] | None = None


class FarmBroken(_Fault):
    """Error 2110 to every client (TWS lost its server connection; it restores itself)."""

    kind: Literal["farm_broken"]


Fault = Annotated[
    DropClients
    | ConnectivityLost
    | RejectOrders
    | DelayPositions
    | DuplicatePositions
    | PriceJump
    | Volatility
    | MarginChange
    | Restart
    | Freeze
    | DailyReset
    | SplitModifies
    | MarketData
    | ReadOnly
    | Liquidate
    | CancelOrdersWhileDropped
    | Session
    | OmitFields
    | Clock
    | MarketDataError
    | FarmBroken,
    Field(discriminator="kind"),
]
# Every fault's `kind`, read off the union so that a new fault needs no second list.
_FAULT_KINDS = frozenset(
    kind
    for cls in get_args(get_args(Fault)[0])
    for kind in get_args(cls.model_fields["kind"].annotation)
)


class Scenario(_Strict):
    """A whole scenario file."""

    gateway: GatewaySection = GatewaySection()
    currencies: CurrenciesSection = CurrenciesSection()
    accounts: Annotated[list[AccountSection], Field(min_length=1)] = [AccountSection(id="DU000001")]
    instruments: Annotated[list[InstrumentSection], Field(min_length=1)] = [
        InstrumentSection(symbol="AAPL", con_id=265598, primary_exchange="NASDAQ", price=190.0),
        InstrumentSection(symbol="MSFT", con_id=272093, primary_exchange="NASDAQ", price=420.0),
        InstrumentSection(symbol="SPY", con_id=756733, primary_exchange="ARCA", price=560.0),
        InstrumentSection(
            symbol="ES",
            sec_type="FUT",
            con_id=620731015,
            exchange="CME",
            multiplier=50,
            last_trade_date="20261218",
            local_symbol="ESZ6",
            price=6000.0,
            volatility=0.012,
            spread=0.25,
            min_tick=0.25,
            initial_margin_per_contract=16_000,
            maint_margin_per_contract=14_500,
        ),
    ]
    calendars: dict[str, CalendarSection] = {}
    positions: list[PositionSection] = []
    faults: list[Fault] = []

    @model_validator(mode="after")
    def _references_resolve(self) -> Scenario:
        accounts = [a.id for a in self.accounts]
        if len(set(accounts)) != len(accounts):
            raise ValueError("accounts: duplicate account id")
        con_ids = [i.con_id for i in self.instruments]
        if len(set(con_ids)) != len(con_ids):
            raise ValueError("instruments: duplicate con_id")
        symbols = {i.name for i in self.instruments}
        base = self.currencies.base
        if base in self.currencies.rates:
            raise ValueError("currencies.rates: the base currency's rate is 1 by definition")
        priced = {base, *self.currencies.rates}
        for inst in self.instruments:
            if inst.sec_type == "CASH" and base in (inst.symbol, inst.currency):
                other = inst.currency if inst.symbol == base else inst.symbol
                if other in self.currencies.rates:
                    raise ValueError(
                        f"currencies.rates.{other}: {inst.name}'s price is {other}'s rate"
                    )
                priced.add(other)
        for n, inst in enumerate(self.instruments):
            needed = (inst.currency, inst.symbol) if inst.sec_type == "CASH" else (inst.currency,)
            for currency in needed:
                if currency not in priced:
                    raise ValueError(
                        f"instruments[{n}].currency: no rate for {currency!r} in currencies.rates"
                    )
        for n, inst in enumerate(self.instruments):
            if inst.sec_type == "OPT" and not any(
                u.name == inst.underlying and u.sec_type in ("STK", "FUT") for u in self.instruments
            ):
                raise ValueError(
                    f"instruments[{n}].underlying: no stock or future {inst.underlying!r}"
                )
        for n, inst in enumerate(self.instruments):
            if inst.hours not in self.calendars and inst.hours not in BUILT_IN:
                raise ValueError(f"instruments[{n}].hours: unknown calendar {inst.hours!r}")
        if self.gateway.start_time is not None and self.gateway.start_time.tzinfo is None:
            raise ValueError("gateway.start_time: needs a UTC offset")
        for n, pos in enumerate(self.positions):
            if pos.account and pos.account not in accounts:
                raise ValueError(f"positions[{n}].account: unknown account {pos.account!r}")
            if pos.symbol not in symbols:
                raise ValueError(f"positions[{n}].symbol: unknown symbol {pos.symbol!r}")
        for n, fault in enumerate(self.faults):
            symbol = getattr(fault, "symbol", "")
            if symbol and symbol not in symbols:
                raise ValueError(f"faults[{n}].symbol: unknown symbol {symbol!r}")
            for name in getattr(fault, "symbols", ()):
                if name not in symbols:
                    raise ValueError(f"faults[{n}].symbols: unknown symbol {name!r}")
            account = getattr(fault, "account", "")
            if account and account not in accounts:
                raise ValueError(f"faults[{n}].account: unknown account {account!r}")
        return self

    def gateway_config(self, *, host: str = "127.0.0.1", port: int = 0) -> GatewayConfig:
        g = self.gateway
        config = GatewayConfig(
            host=host,
            port=port,
            master_client_id=g.master_client_id,
            pacing_limit=g.pacing_limit,
            pacing_window_s=g.pacing_window_s,
            pacing_disconnect=g.pacing_disconnect,
            pnl_interval_s=g.pnl_interval_s,
            portfolio_interval_s=g.portfolio_interval_s,
            market_interval_s=g.market_interval_s,
            fill_latency_s=g.fill_latency_s,
            cancel_latency_s=g.cancel_latency_s,
            first_order_id=g.first_order_id,
            max_tickers=g.max_tickers,
        )
        if g.server_version is None:
            return config
        return dataclasses.replace(config, server_version=g.server_version)

    def build_exchange(self, *, now: float) -> Exchange:
        """The exchange model with this scenario's accounts, instruments and starting positions."""
        instruments = [
            i.to_instrument(self.con_id(i.underlying) if i.underlying else 0)
            for i in self.instruments
        ]
        exchange = Exchange(
            instruments,
            {a.id: a.cash for a in self.accounts},
            seed=self.gateway.seed,
            base_currency=self.currencies.base,
            exchange_rates=self.currencies.rates,
            partial_fill_quantity=self.gateway.partial_fill_quantity,
            now=now,
        )
        exchange.check_margin = self.gateway.check_margin
        exchange.reject_fx_odd_lots = self.gateway.fx_odd_lots == "reject"
        for section, instrument in zip(self.instruments, instruments, strict=True):
            exchange.set_calendar(instrument.con_id, self.calendar(section.hours))
        by_symbol = {
            section.name: i for section, i in zip(self.instruments, instruments, strict=True)
        }
        for pos in self.positions:
            instrument = by_symbol[pos.symbol]
            exchange.set_position(
                pos.account or self.accounts[0].id,
                instrument.con_id,
                pos.quantity,
                pos.avg_price
                if pos.avg_price is not None
                # an option's price is its model's, not a scenario figure
                else exchange.quote(instrument.con_id).last
                if instrument.is_option
                else instrument.initial_price,
            )
        return exchange

    def calendar(self, name: str) -> Calendar:
        """A calendar of [calendars] by name, else a built-in one."""
        if name in self.calendars:
            return self.calendars[name].to_calendar()
        return BUILT_IN[name]

    def start_time(self) -> float | None:
        """Where the simulated clock starts (epoch seconds), None for the real time."""
        start = self.gateway.start_time
        return None if start is None else start.timestamp()

    def con_id(self, symbol: str) -> int:
        return next(i.con_id for i in self.instruments if i.name == symbol)


def parse_scenario(data: dict[str, object], *, source: str = "scenario") -> Scenario:
    """Validate scenario data; a ScenarioError names the key and the problem."""
    try:
        return Scenario.model_validate(data)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            where = ".".join(str(p) for p in err["loc"] if not _is_union_tag(p))
            problems.append(f"{where or '(top level)'}: {err['msg']}")
        raise ScenarioError(f"{source}: " + "; ".join(problems)) from exc


def _is_union_tag(part: object) -> bool:
    return isinstance(part, str) and part in _FAULT_KINDS


def load_scenario(path: Path) -> Scenario:
    """Read and validate a scenario TOML file."""
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ScenarioError(f"{path}: cannot read: {exc.strerror or exc}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ScenarioError(f"{path}: not valid TOML: {exc}") from exc
    return parse_scenario(data, source=str(path))


async def run_faults(
    gateway: SimGateway, scenario: Scenario, faults: Sequence[Fault] | None = None
) -> None:
    """Play the fault schedule against a running gateway (times relative to this call)."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    pending: set[asyncio.Task[None]] = set()
    for fault in sorted(faults if faults is not None else scenario.faults, key=lambda f: f.at_s):
        delay = start + fault.at_s - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        task = asyncio.ensure_future(_apply(gateway, scenario, fault))
        pending.add(task)
        task.add_done_callback(pending.discard)
    if pending:
        await asyncio.gather(*pending)


async def _apply(gateway: SimGateway, scenario: Scenario, fault: Fault) -> None:
    match fault:
        case DropClients(seconds=seconds):
            await gateway.drop_all_clients(seconds)
        case ConnectivityLost(seconds=seconds, data_lost=data_lost):
            gateway.connectivity_lost()
            await asyncio.sleep(seconds)
            gateway.connectivity_restored(data_lost=data_lost)
        case RejectOrders(symbol=symbol, action=action, reason=reason, seconds=seconds):

            def rejects(req: OrderRequest, instrument: Instrument) -> str | None:
                if symbol and symbol not in (instrument.symbol, instrument.local_symbol):
                    return None
                if action and req.action != action:
                    return None
                return reason

            gateway.reject_orders(rejects)
            if seconds is not None:
                await asyncio.sleep(seconds)
                gateway.reject_orders(None)
        case DelayPositions(delay_s=delay_s):
            gateway.delay_positions(delay_s)
        case DuplicatePositions(copies=copies):
            gateway.duplicate_positions(copies)
        case PriceJump(symbol=symbol, fraction=fraction):
            gateway.jump_price(scenario.con_id(symbol), fraction)
        case Volatility(symbol=symbol, daily_vol=daily_vol):
            gateway.set_volatility(scenario.con_id(symbol), daily_vol)
        case MarginChange(multiplier=multiplier):
            gateway.change_margin(multiplier)
        case Restart(down_s=down_s, next_order_id=next_order_id):
            await gateway.restart(down_s, next_order_id=next_order_id)
        case Freeze(seconds=seconds):
            await gateway.freeze(seconds)
        case DailyReset(seconds=seconds):
            await gateway.daily_reset(seconds)
        case SplitModifies(seconds=seconds):
            gateway.split_modifies(True)
            if seconds is not None:
                await asyncio.sleep(seconds)
                gateway.split_modifies(False)
        case MarketData(symbols=names, mode=mode, lag_s=lag_s, delayed_ticks=delayed, seconds=sec):
            con_ids = [scenario.con_id(name) for name in names] or [
                i.con_id for i in scenario.instruments
            ]
            gateway.fault_market_data(
                con_ids, lag_s=lag_s if mode == "lag" else None, delayed_ticks=delayed
            )
            if sec is not None:
                await asyncio.sleep(sec)
                gateway.clear_market_data_fault(con_ids)
        case ReadOnly(seconds=seconds):
            gateway.set_read_only(True)
            if seconds is not None:
                await asyncio.sleep(seconds)
                gateway.set_read_only(False)
        case Liquidate(account=account, symbol=symbol, quantity=quantity):
            gateway.liquidate(account or scenario.accounts[0].id, scenario.con_id(symbol), quantity)
        case CancelOrdersWhileDropped(seconds=seconds, client_id=client_id):
            await gateway.cancel_orders_while_dropped(seconds, client_id=client_id)
        case Clock(set_to=set_to, advance_s=advance_s):
            if set_to is not None:
                gateway.set_clock(set_to.timestamp())
            elif advance_s is not None:
                gateway.advance_clock(advance_s)
        case MarketDataError(code=code, symbols=symbols, seconds=sec):
            con_ids = [scenario.con_id(s) for s in symbols] or [
                i.con_id for i in scenario.instruments
            ]
            gateway.fault_market_data_error(con_ids, code)
            if sec is not None:
                await asyncio.sleep(sec)
                gateway.fault_market_data_error(con_ids, None)
        case FarmBroken():
            gateway.broadcast_error(
                2110,
                "Connectivity between Trader Workstation and server is broken. "
                "It will be restored automatically.",
            )
        case Session(event=event):
            {
                "opening_auction": gateway.opening_auction,
                "closing_auction": gateway.closing_auction,
                "expire_day_orders": gateway.expire_day_orders,
            }[event]()
        case OmitFields(symbols=names, seconds=seconds):
            omission = FieldOmission(
                fault.omitted(), frozenset(scenario.con_id(name) for name in names)
            )
            gateway.omit_fields(omission)
            if seconds is not None:
                await asyncio.sleep(seconds)
                gateway.restore_fields(omission)
        case _:
            assert_never(fault)
