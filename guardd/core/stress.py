"""The stress-loss limit: what the whole book would lose in each configured scenario.

A scenario moves every underlying by `underlying_move` (a fraction: -0.10 is 10 % down), every
option's implied volatility by `vol_move` (a fraction of itself: +0.5 turns 20 % into 30 %) and
each currency against the base currency by `fx_moves[currency]` (a fraction of its
`ExchangeRate`). The loss, in the base currency, is today's value minus the shocked value:

    option          q × m × (BS(S, σ) × r − BS(S × (1 + u), σ × (1 + v)) × r × (1 + f))
    anything else   V × r − V × (1 + u) × r × (1 + f)          (V = q × m × price, local)
    FX pair (CASH)  0: its value is in the cash balances already
    cash            C × r × (−f)                               (C = TotalCashBalance, local)

with q the quantity, m the multiplier, BS the Black-Scholes price of `guardd.core.options` (the
one the simulated gateway quotes with) at IB's underlying price S and implied volatility σ and the
time left to the option's expiry, r the currency's `ExchangeRate`, f its move, u and v the
scenario's moves. An option is revalued in full from the model at both ends, so a scenario of no
moves loses exactly 0. The rule's value is the worst scenario's loss / NetLiquidation (higher is
worse; negative when every scenario gains).

Missing data never reads as zero loss: a position without a value, an option without IB's
computation (implied vol, underlying price), strike, right or expiry, a currency without a rate,
a stale input or NetLiquidation missing is a data finding naming what is missing.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

from guardd.core.book import Book, Position, value_fresh
from guardd.core.options import Right, black_scholes, years_to_expiry
from guardd.core.rules import Finding, Thresholds, _fresh_number, _unsynced, data, grade


@dataclass(frozen=True, slots=True)
class Scenario:
    """One configured shock: moves as fractions (module docstring)."""

    name: str
    underlying_move: float = 0.0
    vol_move: float = 0.0
    fx_moves: Mapping[str, float] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class StressReport:
    """Every scenario's projected loss (base currency), or the data finding that stopped it."""

    losses: Mapping[str, float]
    missing: Finding | None


@dataclass(frozen=True, slots=True)
class StressLoss:
    """Worst scenario loss / NetLiquidation (fraction, e.g. warn 0.10, reduce 0.15, kill 0.25);
    a reduce breach asks for `target_leverage`. Data: see the module docstring."""

    limits: Thresholds
    scenarios: tuple[Scenario, ...]
    target_leverage: float | None = None
    max_value_age_s: float = 30.0
    max_account_age_s: float = 600.0
    name: str = "stress_loss"

    def losses(self, book: Book, now: float) -> StressReport:
        """Each scenario's loss in the base currency, or the first missing input."""
        try:
            return StressReport({s.name: self._loss(book, s, now) for s in self.scenarios}, None)
        except _Missing as missing:
            return StressReport({}, data(self.name, missing.what, missing.subject))

    def evaluate(self, book: Book, now: float) -> Finding:
        """Grade the worst scenario's loss / NetLiquidation."""
        if (f := _unsynced(book, self.name)) is not None:
            return f
        nl = _fresh_number(
            book.net_liquidation, now, self.max_account_age_s, self.name, "NetLiquidation", True
        )
        if isinstance(nl, Finding):
            return nl
        report = self.losses(book, now)
        if report.missing is not None:
            return report.missing
        if not report.losses:
            return Finding(self.name, "ok", 0.0, self.limits.warn, "no stress scenarios")
        scenario = max(report.losses, key=lambda s: report.losses[s])
        found = grade(
            self.name,
            report.losses[scenario] / nl,
            self.limits,
            what=f"stress loss in {scenario!r} / NetLiquidation",
            subject=scenario,
        )
        if found.level == "reduce":
            return Finding(
                found.rule,
                found.level,
                found.value,
                found.limit,
                found.message,
                found.subject,
                target_leverage=self.target_leverage,
            )
        return found

    def _loss(self, book: Book, scenario: Scenario, now: float) -> float:
        loss = 0.0
        for p in sorted(book.guarded_positions(), key=lambda p: p.con_id):
            if p.sec_type == "CASH":
                continue  # an FX pair's value is in the cash balances (revalued below)
            if not p.known:
                raise _Missing(f"quantity of {_named(p)} unknown", p.symbol)
            rate = self._rate(book, p.currency, p.symbol)
            fx = 1.0 + _fx_move(book, scenario, p.currency)
            if p.sec_type == "OPT":
                before, after = self._option_prices(book, p, scenario, now)
                loss += p.quantity * p.multiplier * (before - after * fx) * rate
                continue
            if p.value is None or not value_fresh(p, now, self.max_value_age_s):
                raise _Missing(f"no fresh value of {_named(p)}", p.symbol)
            loss += p.value * rate * (1.0 - (1.0 + scenario.underlying_move) * fx)
        for ccy, cash in sorted(book.cash_balances().items()):
            move = _fx_move(book, scenario, ccy)
            if move == 0.0:
                continue
            if not math.isfinite(cash.value) or now - cash.ts > self.max_account_age_s:
                raise _Missing(f"no fresh TotalCashBalance in {ccy}", ccy)
            loss -= cash.value * self._rate(book, ccy, ccy) * move
        return loss

    def _rate(self, book: Book, currency: str, subject: str) -> float:
        rate = book.exchange_rate(currency)
        if rate is None:
            raise _Missing(f"no ExchangeRate for {currency}", subject)
        return rate

    def _option_prices(
        self, book: Book, p: Position, scenario: Scenario, now: float
    ) -> tuple[float, float]:
        """The option's model price per share now and in the scenario."""
        greeks = book.option_greeks(p.con_id)
        if greeks is None or now - greeks.ts > self.max_value_age_s:
            raise _Missing(f"no fresh option computation for {_named(p)}", p.symbol)
        vol, spot = greeks.implied_vol, greeks.underlying_price
        if not (math.isfinite(vol) and vol > 0):
            raise _Missing(f"no implied volatility for {_named(p)}", p.symbol)
        if not (math.isfinite(spot) and spot > 0):
            raise _Missing(f"no underlying price for {_named(p)}", p.symbol)
        if not (math.isfinite(p.strike) and p.strike > 0):
            raise _Missing(f"no strike for {_named(p)}", p.symbol)
        if p.right not in ("C", "P"):
            raise _Missing(f"no right (call or put) for {_named(p)}", p.symbol)
        if not math.isfinite(p.expiry):
            raise _Missing(f"no expiry for {_named(p)}", p.symbol)
        years = years_to_expiry(p.expiry, now)
        right: Right = "C" if p.right == "C" else "P"
        before = black_scholes(right, spot, p.strike, years, vol).price
        shocked_spot = spot * max(0.0, 1.0 + scenario.underlying_move)
        shocked_vol = vol * max(0.0, 1.0 + scenario.vol_move)
        if shocked_spot <= 0:  # the underlying gone: a call is worthless, a put worth the strike
            after = p.strike if right == "P" else 0.0
        else:
            after = black_scholes(right, shocked_spot, p.strike, years, shocked_vol).price
        return before, after


def _fx_move(book: Book, scenario: Scenario, currency: str) -> float:
    """The scenario's move of `currency` against the base currency (none for the base itself)."""
    if currency == book.base_currency:
        return 0.0
    return scenario.fx_moves.get(currency, 0.0)


def _named(p: Position) -> str:
    """A position as the trader names it: an option with its strike and right."""
    if p.sec_type != "OPT":
        return p.symbol
    terms = f" {p.strike:g}{p.right}" if math.isfinite(p.strike) else ""
    return f"{p.symbol}{terms} option (conId {p.con_id})"


class _Missing(Exception):  # noqa: N818 - an internal signal, never raised out of the module
    """An input the stress loss needs is missing (what, and the subject it is about)."""

    def __init__(self, what: str, subject: str) -> None:
        super().__init__(what)
        self.what = what
        self.subject = subject
