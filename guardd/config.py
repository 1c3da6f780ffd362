"""guardd's configuration: one TOML file read into typed, frozen models and checked at start.

Every model is frozen, strict (a TOML string is never silently read as a number) and forbids unknown
keys, so a typo fails the start instead of switching a limit off. ``load_config`` is the boundary:
a missing file, a TOML syntax error or a broken rule all become one ``ConfigError`` that names the
key path and the rule, e.g. ``limits.leverage.kill: must be greater than or equal to
limits.leverage.reduce (2.0)``; the daemon exits 78 (EX_CONFIG) on it.

``configs/guardd.example.toml`` documents every key. Limits read naturally:
``cfg.limits.leverage.kill`` is the leverage that halts the account, or None when not set (the
core's rules grade a value against the levels: ``guardd.core.rules.grade``).
"""

from __future__ import annotations

import itertools
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, Self, cast

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from guardd.control.commands import Role
from guardd.core.engine import KillMode
from guardd.core.notices import NOTICE_KINDS, NoticeKind
from guardd.core.rules import BREACH_LEVELS, BreachLevel
from guardd.errors import ConfigError

__all__ = [
    "AppriseTarget",
    "BotHeartbeat",
    "BudgetConfig",
    "Config",
    "ConnectivityLimits",
    "ControlConfig",
    "DailyLossLimit",
    "DrawdownLimit",
    "EscalationStep",
    "FlattenConfig",
    "HeartbeatLimits",
    "HttpControlConfig",
    "IbConfig",
    "KillConfig",
    "LevelLimit",
    "LeverageLimit",
    "Limits",
    "LogConfig",
    "MaintMarginRatioLimit",
    "MarginCushionLimit",
    "MarginSpikeLimit",
    "MetricsConfig",
    "MqttControlConfig",
    "NotifyConfig",
    "OperatorRole",
    "OrderPolicy",
    "OrderRateLimits",
    "PerOrderLimits",
    "Person",
    "PositionLimits",
    "RateLimit",
    "ReloadRefusal",
    "SecType",
    "TokenFiles",
    "VolatilityLimit",
    "WebhookTarget",
    "changed_keys",
    "load_config",
    "parse_config",
    "reload_refusals",
]

SecType = Literal[
    "STK",
    "OPT",
    "FUT",
    "FOP",
    "CASH",
    "CFD",
    "BOND",
    "WAR",
    "IOPT",
    "FUND",
    "CMDTY",
    "CRYPTO",
    "BAG",
]
OrderKind = Literal["MKT", "LMT"]
OperatorRole = Literal["kill", "arm"]

# ---------------------------------------------------------------------------------------------
# Building blocks


def _broken(key: str, rule: str) -> PydanticCustomError:
    """A rule broken by ``key`` of the model being validated.

    ``@name`` in ``rule`` refers to another key by its path relative to the same model; the
    translation in ``_config_error`` turns both into full key paths (``limits.leverage.reduce``).
    """
    return PydanticCustomError("guardd_rule", "{key}: {rule}", {"key": key, "rule": rule})


def _non_empty_path(value: object) -> object:
    # Path("") is Path("."): an empty string would quietly mean "the working directory".
    if isinstance(value, str) and not value.strip():
        raise PydanticCustomError("guardd_empty_path", "must not be empty")
    return value


# Paths and lists arrive from TOML as str and list: read them laxly, everything else strictly.
FilePath = Annotated[Path, BeforeValidator(_non_empty_path), Field(strict=False)]


def _in_credentials_directory(value: Path, info: ValidationInfo) -> Path:
    # systemd's LoadCredential= puts the files in $CREDENTIALS_DIRECTORY (/run/credentials/<unit>/):
    # a relative credential path is looked up there, so one config serves every unit name.
    directory = (info.context or {}).get("credentials_directory")
    if directory and not value.is_absolute():
        return Path(directory) / value
    return value


CredentialPath = Annotated[
    Path,
    BeforeValidator(_non_empty_path),
    AfterValidator(_in_credentials_directory),
    Field(strict=False),
]
"""A credential file: relative to ``$CREDENTIALS_DIRECTORY`` when systemd set it (else as given)."""
Fraction = Annotated[float, Field(gt=0, le=1)]
Port = Annotated[int, Field(ge=1, le=65535)]
Seconds = Annotated[float, Field(gt=0)]
Name = Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")]
Host = Annotated[str, Field(min_length=1, pattern=r"^\S+$")]


class _Model(BaseModel):
    model_config = ConfigDict(
        frozen=True, extra="forbid", strict=True, allow_inf_nan=False, validate_default=False
    )


# ---------------------------------------------------------------------------------------------
# Limits


class LevelLimit(_Model):
    """A rule's thresholds: each of warn / reduce / kill is optional; unset levels never fire.

    For a "higher is worse" rule a value breaches a level when ``value >= level`` and the levels
    must be ordered warn <= reduce <= kill; for a "lower is worse" rule (margin cushion) a value
    breaches when ``value <= level`` and the order is reversed. A rule breaks only after
    ``debounce`` consecutive breaching evaluations on data no older than ``max_data_age_s``.
    """

    higher_is_worse: ClassVar[bool] = True

    warn: Annotated[float, Field(ge=0)] | None = None
    reduce: Annotated[float, Field(ge=0)] | None = None
    kill: Annotated[float, Field(ge=0)] | None = None
    debounce: Annotated[int, Field(ge=1)] = 1
    max_data_age_s: Seconds = 30.0

    @model_validator(mode="after")
    def _levels_in_order(self) -> Self:
        set_levels = self.thresholds()
        for (lower_name, lower), (name, value) in itertools.pairwise(set_levels):
            if self.higher_is_worse and value < lower:
                raise _broken(name, f"must be greater than or equal to @{lower_name} ({lower})")
            if not self.higher_is_worse and value > lower:
                raise _broken(name, f"must be less than or equal to @{lower_name} ({lower})")
        return self

    @property
    def enabled(self) -> bool:
        """True when at least one level is set."""
        return bool(self.thresholds())

    def thresholds(self) -> tuple[tuple[BreachLevel, float], ...]:
        """The levels that are set, least severe first: ``(("warn", 1.5), ("kill", 3.0))``."""
        return tuple(
            (level, value)
            for level in BREACH_LEVELS
            if (value := getattr(self, level)) is not None  # getattr: the levels name the fields
        )


class _FractionLimit(LevelLimit):
    warn: Fraction | None = None
    reduce: Fraction | None = None
    kill: Fraction | None = None


class LeverageLimit(LevelLimit):
    """Leverage = gross position value / net liquidation, both in base currency (x, e.g. 3.0).

    ``options``: how an option counts in the gross: "notional" (default) its market value (price x
    multiplier x quantity), "delta" its delta-adjusted exposure (delta x underlying price x
    multiplier x quantity, from IB's option computation; none known is a data finding).
    """

    options: Literal["notional", "delta"] = "notional"


class MarginCushionLimit(_FractionLimit):
    """Cushion = excess liquidity / net liquidation (fraction); lower is worse, kill <= warn."""

    higher_is_worse: ClassVar[bool] = False

    # 0 is a real level here: no excess liquidity left is the margin call itself.
    warn: Annotated[float, Field(ge=0, le=1)] | None = None
    reduce: Annotated[float, Field(ge=0, le=1)] | None = None
    kill: Annotated[float, Field(ge=0, le=1)] | None = None


class MaintMarginRatioLimit(LevelLimit):
    """Maintenance margin requirement / net liquidation (fraction; 1.0 means margin call)."""


class MarginSpikeLimit(LevelLimit):
    """Fractional jump of the maintenance requirement while positions are unchanged.

    value = maint_now / lowest maint seen within ``window_s`` with the same positions - 1.
    """

    window_s: Seconds = 300.0


class DailyLossLimit(_FractionLimit):
    """Loss today as a fraction of start-of-day net liquidation; positive = loss (0.05 = 5 %)."""


class DrawdownLimit(_FractionLimit):
    """Fall of net liquidation from today's intraday peak, as a fraction of the peak."""


class VolatilityLimit(LevelLimit):
    """Realised volatility of returns over ``window_s`` (fraction, 0.40 = 40 %).

    ``horizon`` says whether levels are annualised or daily figures. A reduce breach brings the
    account down to ``target_leverage`` (required when ``reduce`` is set).
    """

    horizon: Literal["annualised", "daily"] = "annualised"
    window_s: Seconds = 3600.0
    target_leverage: Annotated[float, Field(gt=0)] | None = None

    @model_validator(mode="after")
    def _reduce_needs_target(self) -> Self:
        if self.reduce is not None and self.target_leverage is None:
            raise _broken("target_leverage", "is required when @reduce is set")
        return self


class StressScenario(_Model):
    """One stress scenario: moves as fractions (-0.10 = 10 % down). ``underlying_move`` moves
    every underlying, ``vol_move`` every option's implied volatility by a fraction of itself
    (+0.5 = half as much again), ``fx_moves`` each named currency against the base currency."""

    name: Annotated[str, Field(min_length=1)]
    underlying_move: Annotated[float, Field(ge=-1)] = 0.0
    vol_move: Annotated[float, Field(ge=-1)] = 0.0
    fx_moves: dict[str, Annotated[float, Field(gt=-1)]] = Field(default_factory=dict)


class StressLimit(_FractionLimit):
    """Stress loss = the worst scenario's projected loss of the whole book / net liquidation
    (fraction; formulas in docs/rules.md). A reduce breach brings the account down to
    ``target_leverage`` (required when ``reduce`` is set). Scenario names are unique."""

    scenarios: list[StressScenario] = Field(default_factory=list)
    target_leverage: Annotated[float, Field(gt=0)] | None = None

    @model_validator(mode="after")
    def _scenarios_fit(self) -> Self:
        if self.reduce is not None and self.target_leverage is None:
            raise _broken("target_leverage", "is required when @reduce is set")
        if self.enabled and not self.scenarios:
            raise _broken("scenarios", "are required when a level is set")
        names = [s.name for s in self.scenarios]
        if len(set(names)) != len(names):
            raise _broken("scenarios", "need unique names")
        return self


class RateLimit(LevelLimit):
    """New orders counted in one window (orders per window)."""


class OrderRateLimits(_Model):
    """New-order rates per API client id and over all clients, in 1 s and 60 s windows."""

    per_client_1s: RateLimit = Field(default_factory=RateLimit)
    per_client_60s: RateLimit = Field(default_factory=RateLimit)
    total_1s: RateLimit = Field(default_factory=RateLimit)
    total_60s: RateLimit = Field(default_factory=RateLimit)


class PerOrderLimits(_Model):
    """Checks on each order seen; a breach triggers ``action`` ("kill" = global cancel + halt).

    A foreign order cannot be cancelled alone, so there is no "cancel this order" action.
    """

    max_quantity: Annotated[float, Field(gt=0)] | None = None
    max_notional: Annotated[float, Field(gt=0)] | None = None  # base currency
    price_collar: Fraction | None = None  # |limit price / last - 1|
    forbidden_order_types: Annotated[tuple[str, ...], Field(strict=False)] = ()
    forbidden_sec_types: Annotated[tuple[SecType, ...], Field(strict=False)] = ()
    action: Literal["kill", "warn"] = "kill"

    @field_validator("forbidden_order_types")
    @classmethod
    def _order_types_upper(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        # IB order type codes are upper case ("STP LMT"); compare them that way.
        return tuple(order_type.strip().upper() for order_type in value)

    @property
    def enabled(self) -> bool:
        """True when any check is configured."""
        return bool(
            self.max_quantity is not None
            or self.max_notional is not None
            or self.price_collar is not None
            or self.forbidden_order_types
            or self.forbidden_sec_types
        )


class PositionLimits(_Model):
    """Position checks: per-symbol absolute quantity and notional, count, allowed asset classes."""

    max_quantity: dict[str, Annotated[float, Field(gt=0)]] = Field(default_factory=dict)
    max_notional: dict[str, Annotated[float, Field(gt=0)]] = Field(default_factory=dict)
    max_count: Annotated[int, Field(ge=0)] | None = None
    allowed_sec_types: Annotated[tuple[SecType, ...], Field(strict=False)] | None = None
    action: BreachLevel = "kill"
    debounce: Annotated[int, Field(ge=1)] = 1


class BotHeartbeat(_Model):
    """One bot's heartbeat: silence longer than ``timeout_s`` triggers ``action``."""

    timeout_s: Seconds
    action: BreachLevel = "warn"


class HeartbeatLimits(_Model):
    """Bots that publish heartbeats, by name (the name used in the heartbeat topic)."""

    bots: dict[Name, BotHeartbeat] = Field(default_factory=dict)


class ConnectivityLimits(_Model):
    """Alerts (and optionally a kill) when IB is disconnected or events stop arriving.

    A kill decided while disconnected stays latched and is carried out on reconnect.
    """

    disconnected_warn_after_s: Annotated[float, Field(ge=0)] | None = 5.0
    disconnected_kill_after_s: Seconds | None = None
    max_event_age_s: Seconds = 30.0

    @model_validator(mode="after")
    def _warn_before_kill(self) -> Self:
        warn, kill = self.disconnected_warn_after_s, self.disconnected_kill_after_s
        if warn is not None and kill is not None and kill < warn:
            raise _broken(
                "disconnected_kill_after_s",
                f"must be greater than or equal to @disconnected_warn_after_s ({warn})",
            )
        return self


class Limits(_Model):
    """Every rule's limits; a rule with no level set is off."""

    leverage: LeverageLimit = Field(default_factory=LeverageLimit)
    margin_cushion: MarginCushionLimit = Field(default_factory=MarginCushionLimit)
    maint_margin_ratio: MaintMarginRatioLimit = Field(default_factory=MaintMarginRatioLimit)
    margin_spike: MarginSpikeLimit = Field(default_factory=MarginSpikeLimit)
    daily_loss: DailyLossLimit = Field(default_factory=DailyLossLimit)
    drawdown: DrawdownLimit = Field(default_factory=DrawdownLimit)
    volatility: VolatilityLimit = Field(default_factory=VolatilityLimit)
    stress: StressLimit = Field(default_factory=StressLimit)
    order_rate: OrderRateLimits = Field(default_factory=OrderRateLimits)
    per_order: PerOrderLimits = Field(default_factory=PerOrderLimits)
    positions: PositionLimits = Field(default_factory=PositionLimits)
    heartbeats: HeartbeatLimits = Field(default_factory=HeartbeatLimits)
    connectivity: ConnectivityLimits = Field(default_factory=ConnectivityLimits)

    @model_validator(mode="after")
    def _volatility_target_below_leverage_kill(self) -> Self:
        # Reducing "to" a leverage that is itself a kill would turn every volatility breach
        # into a halt.
        target, kill = self.volatility.target_leverage, self.leverage.kill
        if target is not None and kill is not None and target >= kill:
            raise _broken(
                "volatility.target_leverage", f"must be less than @leverage.kill ({kill})"
            )
        target = self.stress.target_leverage
        if target is not None and kill is not None and target >= kill:
            raise _broken("stress.target_leverage", f"must be less than @leverage.kill ({kill})")
        return self


# ---------------------------------------------------------------------------------------------
# Actions, pacing


class KillConfig(_Model):
    """What a kill does: "cancel" cancels every order; "flatten" also closes every position."""

    mode: KillMode = "cancel"
    cancel_verify_timeout_s: Seconds = 5.0


class OrderPolicy(_Model):
    """How guardd closes positions of one asset class.

    "LMT" is a marketable limit: a fresh bid (sell) / ask (buy), else last, else mark, -/+
    ``collar`` (fraction). ``allow_market``: a market order may stand in for a limit when no price
    is fresh, or when the re-pricing escalation reaches ``market``; unset, it is allowed when
    the class closes with "MKT" in some session.
    """

    regular_hours: OrderKind = "MKT"
    outside_hours: OrderKind = "LMT"
    collar: Annotated[float, Field(gt=0, le=0.5)] = 0.01
    allow_market: bool | None = None
    # This class's cap on one close order (for FX in the pair's base currency), instead of
    # flatten.max_child_qty; CASH defaults to 10,000,000 so FX is not cut into odd lots.
    max_child_qty: Annotated[float, Field(ge=1)] | None = None

    @property
    def market_allowed(self) -> bool:
        """Whether a market order may replace a limit for this class (see ``allow_market``)."""
        if self.allow_market is not None:
            return self.allow_market
        return "MKT" in (self.regular_hours, self.outside_hours)


class EscalationStep(_Model):
    """One re-pricing step: ``{ widen = 0.05 }`` widens the collar by that fraction over the step
    before; ``{ market = true }`` sends a market order where the class allows one."""

    widen: Annotated[float, Field(gt=0, le=0.5)] | None = None
    market: bool | None = None

    @model_validator(mode="after")
    def _one_kind(self) -> Self:
        if self.market is False:
            raise _broken("market", "must be true (leave the step out instead)")
        if (self.widen is None) == (self.market is None):
            raise PydanticCustomError(
                "guardd_step", "give exactly one of widen = <fraction> or market = true"
            )
        return self


def _default_escalation() -> tuple[EscalationStep, ...]:
    return (EscalationStep(widen=0.05), EscalationStep(market=True))


_DEFAULT_ORDER_POLICY: dict[SecType, dict[str, Any]] = {
    "STK": {"regular_hours": "MKT", "outside_hours": "LMT", "collar": 0.01},
    "FUT": {"regular_hours": "MKT", "outside_hours": "MKT"},
    # FX trades round the clock on IDEALPRO (market orders too); a position is closed whole, up
    # to 10 M of the pair's base currency per order, so it is not cut below the IDEALPRO minimum.
    "CASH": {
        "regular_hours": "MKT",
        "outside_hours": "MKT",
        "collar": 0.005,
        "max_child_qty": 10_000_000,
    },
    # Options: a limit at the fresh bid (sell) / ask (buy) in every session, re-priced wider as
    # it stalls, never a market order (a wide option market can fill a market order far off).
    "OPT": {
        "regular_hours": "LMT",
        "outside_hours": "LMT",
        "collar": 0.05,
        "allow_market": False,
    },
}


def _default_policies() -> dict[SecType, OrderPolicy]:
    return {
        sec_type: OrderPolicy.model_validate(policy)
        for sec_type, policy in _DEFAULT_ORDER_POLICY.items()
    }


class FlattenConfig(_Model):
    """Flatten orders: policy per asset class, child order size, how long to wait for "flat",
    how fresh a price a close limit needs and how a close that does not fill is re-priced."""

    verify_timeout_s: Seconds = 30.0
    max_child_qty: Annotated[float, Field(gt=0)] | None = None
    # While HALTED in flatten mode (or REDUCING) a position further than this from its target
    # (absolute quantity, per asset class; default 0) starts a new close round.
    tolerance: dict[SecType, Annotated[float, Field(ge=0)]] = Field(default_factory=dict)
    # How long the position stream may lag the guard's own fills: a broker figure that disagrees
    # with the fills is adopted only after this long with nothing new on that position.
    position_settle_s: Seconds = 10.0
    # After a re-sync, how long a child the broker no longer reports may still turn up.
    lost_order_grace_s: Seconds = 2.0
    order_policy: dict[SecType, OrderPolicy] = Field(default_factory=_default_policies)
    max_price_age_s: Seconds = 10.0
    reprice_after_s: Seconds = 10.0
    escalation: Annotated[tuple[EscalationStep, ...], Field(strict=False, max_length=20)] = Field(
        default_factory=_default_escalation
    )

    @field_validator("order_policy", mode="before")
    @classmethod
    def _over_defaults(cls, value: object) -> object:
        # A table for OPT must not silently drop the STK and FUT defaults.
        if isinstance(value, Mapping):
            return {**_DEFAULT_ORDER_POLICY, **value}
        return value

    @field_validator("order_policy")
    @classmethod
    def _stocks_never_market_outside_hours(
        cls, value: dict[SecType, OrderPolicy]
    ) -> dict[SecType, OrderPolicy]:
        stk = value.get("STK")
        if stk is not None and stk.outside_hours == "MKT":
            raise _broken(
                "STK.outside_hours",
                'must be "LMT": IB rejects market orders for stocks outside regular hours',
            )
        return value

    def policy_for(self, sec_type: str) -> OrderPolicy | None:
        """The policy for an asset class, or None: guardd does not close that class itself."""
        return self.order_policy.get(cast(SecType, sec_type))


class BudgetConfig(_Model):
    """guardd's own message pacing towards IB, which disconnects a client above 50 msg/s."""

    messages_per_second: Annotated[int, Field(gt=0, lt=50)] = 40
    kill_reserve: Annotated[int, Field(ge=0)] = 10

    @model_validator(mode="after")
    def _reserve_below_budget(self) -> Self:
        if self.kill_reserve >= self.messages_per_second:
            raise _broken(
                "kill_reserve",
                f"must be less than @messages_per_second ({self.messages_per_second})",
            )
        return self


# ---------------------------------------------------------------------------------------------
# Connections, control, observability


class IbConfig(_Model):
    """The TWS / IB Gateway socket guardd connects to as the Master API client."""

    host: Host = "127.0.0.1"
    port: Port = 4002
    client_id: Annotated[int, Field(ge=0)]
    connect_timeout_s: Seconds = 5.0
    reconnect_backoff_min_s: Seconds = 1.0
    reconnect_backoff_max_s: Seconds = 30.0
    # Market-data lines guardd may hold (IB: 100 a login by default, shared with TWS and every
    # other API client): live prices for what moves, chosen by guardd.core.lines (a contract a
    # close works on first, then the largest exposures); every other position is valued by
    # the account-updates stream.
    market_data_lines: Annotated[int, Field(ge=1, le=10_000)] = 90

    @model_validator(mode="after")
    def _backoff_in_order(self) -> Self:
        _backoff_in_order(self, "reconnect_backoff_min_s", "reconnect_backoff_max_s")
        return self


def _backoff_in_order(model: _Model, first: str, cap: str) -> None:
    """A back-off's cap (the key `cap`) is not below its first delay (the key `first`)."""
    if getattr(model, cap) < getattr(model, first):
        raise _broken(cap, f"must be greater than or equal to @{first} ({getattr(model, first)})")


class TokenFiles(_Model):
    """Files holding each role's bearer-token credential; a role without a file is refused."""

    read: CredentialPath | None = None
    kill: CredentialPath | None = None
    arm: CredentialPath | None = None


class HttpControlConfig(_Model):
    """The HTTP control server (kill, arm, status, health, and /metrics by default)."""

    enabled: bool = True
    host: Host = "127.0.0.1"
    port: Port = 8787
    token_files: TokenFiles = Field(default_factory=TokenFiles)
    tls_cert_file: CredentialPath | None = None
    tls_key_file: CredentialPath | None = None
    max_body_bytes: Annotated[int, Field(gt=0, le=1_048_576)] = 16_384
    console: bool = True  # the web console at /console (docs/console.md)
    # A connection must send its request headers within header_timeout_s of opening (or of its
    # last answer), and the body within body_timeout_s of the headers.
    header_timeout_s: Seconds = 10.0
    body_timeout_s: Seconds = 10.0
    # Open connections beyond this close the oldest idle ones first, so a kill always gets in;
    # capped further by the open-file limit (RLIMIT_NOFILE) less a reserve.
    max_connections: Annotated[int, Field(ge=16, le=1_000_000)] = 1024

    @model_validator(mode="after")
    def _tls_pair(self) -> Self:
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            missing = "tls_key_file" if self.tls_key_file is None else "tls_cert_file"
            other = "tls_cert_file" if missing == "tls_key_file" else "tls_key_file"
            raise _broken(missing, f"is required when @{other} is set")
        return self


class MqttControlConfig(_Model):
    """MQTT: signed kill / arm commands in, retained state and events out."""

    enabled: bool = False
    host: Host = "127.0.0.1"
    port: Port = 1883
    topic_prefix: Annotated[str, Field(pattern=r"^[^/+#\s]+(/[^/+#\s]+)*$")] = "guardd"
    username: str | None = None
    password_file: CredentialPath | None = None
    tls: bool = False
    tls_ca_file: CredentialPath | None = None
    operator_key_files: dict[Name, CredentialPath] = Field(default_factory=dict)
    # key id -> roles; a key not listed may kill only (a re-arm needs a key granted "arm").
    operator_key_roles: dict[
        Name, Annotated[tuple[OperatorRole, ...], Field(strict=False, min_length=1)]
    ] = Field(default_factory=dict)
    window_s: Seconds = 30.0

    @model_validator(mode="after")
    def _password_needs_username(self) -> Self:
        if self.password_file is not None and self.username is None:
            raise _broken("username", "is required when @password_file is set")
        return self

    @model_validator(mode="after")
    def _roles_for_known_keys(self) -> Self:
        for key_id in self.operator_key_roles:
            if key_id not in self.operator_key_files:
                raise _broken(
                    f"operator_key_roles.{key_id}",
                    f"names key id {key_id!r}, which has no entry in @operator_key_files",
                )
        return self


class Person(_Model):
    """The credentials one person holds: HTTP role tokens (by role, as in
    ``control.http.token_files``), MQTT operator keys (by key id), and a bearer token of their own
    (``http_token_file``, holding ``http_token_roles``; read only unless given more), so that two
    people can each log in to the console and re-arm with a token that names them."""

    http_tokens: Annotated[tuple[Role, ...], Field(strict=False)] = ()
    mqtt_keys: Annotated[tuple[Name, ...], Field(strict=False)] = ()
    http_token_file: CredentialPath | None = None
    http_token_roles: Annotated[tuple[Role, ...], Field(strict=False, min_length=1)] = ("read",)


class ControlConfig(_Model):
    """Where kill / arm / status commands come in, who holds which credential, and who must agree
    to a re-arm.

    ``people`` maps each person to the credentials they hold; the journal records the person of
    every command. With ``two_person_rearm`` a re-arm needs arms from two different PEOPLE (over
    HTTP and MQTT alike) within ``rearm_window_s`` seconds: every credential that can re-arm must
    then belong to a person, and at least two people must be able to re-arm.

    ``allow_insecure_permissions`` lets guardd read secret files (tokens, keys, the MQTT
    password) that group or others may access; by default such a file is a config error.
    """

    http: HttpControlConfig = Field(default_factory=HttpControlConfig)
    mqtt: MqttControlConfig = Field(default_factory=MqttControlConfig)
    people: dict[Name, Person] = Field(default_factory=dict)
    two_person_rearm: bool = False
    rearm_window_s: Seconds = 300.0
    allow_insecure_permissions: bool = False
    # Refused commands: the first of each kind per interval is journaled in full, the rest counted
    # in one command_refusals_aggregated record per interval (guardd.control.refusals).
    refusal_interval_s: Seconds = 10.0

    @model_validator(mode="after")
    def _people_hold_known_credentials_once(self) -> Self:
        tokens = self.http.token_files
        owner: dict[str, str] = {}
        for person, held in self.people.items():
            for role in held.http_tokens:
                if getattr(tokens, role) is None:  # getattr: the role names the field
                    raise _broken(
                        f"people.{person}.http_tokens",
                        f'names the "{role}" token, which has no file in @http.token_files.{role}',
                    )
                credential = f"control.http.token_files.{role}"
                if credential in owner and owner[credential] != person:
                    raise _broken(
                        f"people.{person}.http_tokens",
                        f"{credential} already belongs to {owner[credential]}: a credential "
                        "belongs to one person",
                    )
                owner[credential] = person
            for key_id in held.mqtt_keys:
                if key_id not in self.mqtt.operator_key_files:
                    raise _broken(
                        f"people.{person}.mqtt_keys",
                        f"names key id {key_id!r}, which has no entry in @mqtt.operator_key_files",
                    )
                credential = f"control.mqtt.operator_key_files.{key_id}"
                if credential in owner and owner[credential] != person:
                    raise _broken(
                        f"people.{person}.mqtt_keys",
                        f"{credential} already belongs to {owner[credential]}: a credential "
                        "belongs to one person",
                    )
                owner[credential] = person
        return self

    @model_validator(mode="after")
    def _two_people_can_rearm(self) -> Self:
        if not self.two_person_rearm:
            return self
        arm_credentials: dict[str, str | None] = {}  # credential -> its person
        if self.http.enabled and self.http.token_files.arm is not None:
            arm_credentials["control.http.token_files.arm"] = self.person_of_http_token("arm")
        if self.http.enabled:
            for name, own in self.people.items():
                if own.http_token_file is not None and "arm" in own.http_token_roles:
                    arm_credentials[f"control.people.{name}.http_token_file"] = name
        if self.mqtt.enabled:
            for key_id in self.mqtt.operator_key_files:
                if "arm" in self.mqtt.operator_key_roles.get(key_id, ()):
                    credential = f"control.mqtt.operator_key_files.{key_id}"
                    arm_credentials[credential] = self.person_of_mqtt_key(key_id)
        for credential, person in arm_credentials.items():
            if person is None:
                raise _broken(
                    "people",
                    f"{credential} can re-arm but belongs to no person: with "
                    "@two_person_rearm every credential that can re-arm names its person "
                    "(e.g. people.alice = { mqtt_keys = [...], http_tokens = [...] })",
                )
        people = sorted({p for p in arm_credentials.values() if p is not None})
        if len(people) < 2:
            held = ", ".join(people) or "nobody"
            raise _broken(
                "two_person_rearm",
                f"needs at least two people who can re-arm, but only {held} can "
                "(@people, @http.token_files.arm, @mqtt.operator_key_roles)",
            )
        return self

    def person_of_http_token(self, role: Role) -> str | None:
        """The person holding the HTTP token of ``role``, or None."""
        return next((p for p, held in self.people.items() if role in held.http_tokens), None)

    def person_of_mqtt_key(self, key_id: str) -> str | None:
        """The person holding the MQTT operator key ``key_id``, or None."""
        return next((p for p, held in self.people.items() if key_id in held.mqtt_keys), None)

    @property
    def http_token_people(self) -> dict[Role, str]:
        """HTTP token role -> person, for the tokens that name one."""
        return {role: p for p, held in self.people.items() for role in held.http_tokens}

    @property
    def mqtt_key_people(self) -> dict[str, str]:
        """MQTT key id -> person, for the keys that name one."""
        return {key_id: p for p, held in self.people.items() for key_id in held.mqtt_keys}


class MetricsConfig(_Model):
    """Prometheus metrics: on the control HTTP server, or on a listener of their own."""

    enabled: bool = True
    listen: Literal["control", "separate"] = "control"
    host: Host = "127.0.0.1"  # used when listen = "separate"
    port: Port = 9464  # used when listen = "separate"


class LogConfig(_Model):
    """structlog output: "auto" is console on a terminal and JSON otherwise."""

    format: Literal["json", "console", "auto"] = "auto"
    level: Literal["debug", "info", "warning", "error"] = "info"
    # The ibapi client's own line per message sent and received (protocol debugging only).
    wire: bool = False


class JournalConfig(_Model):
    """The audit journal's rotation (guardd.state.journal): "never" (default), "size" (a new segment
    once the live file would pass ``max_bytes``) or "day" (a new segment each UTC day). Rotated
    segments are kept (guardd deletes none) and all read at start."""

    rotate: Literal["never", "size", "day"] = "never"
    max_bytes: Annotated[int, Field(ge=1024)] = 100 * 1024 * 1024


_HTTP_URL = r"^https?://\S+$"


class _NotifyTarget(_Model):
    """Where one target's notifications go: ``url`` in the config, or ``url_file`` (a private
    file holding the URL, for a URL that carries a token); exactly one. ``kinds``: which kinds
    of notice it gets (every kind by default)."""

    url: str | None = None
    url_file: FilePath | None = None
    kinds: Annotated[tuple[NoticeKind, ...], Field(strict=False, min_length=1)] = NOTICE_KINDS

    @model_validator(mode="after")
    def _one_url(self) -> Self:
        if (self.url is None) == (self.url_file is None):
            which = "both are set" if self.url is not None else "neither is set"
            raise _broken("url", f"exactly one of url and @url_file is required ({which})")
        return self


class WebhookTarget(_NotifyTarget):
    """A plain JSON webhook: an HTTP POST of the notice, signed with HMAC-SHA256 under the key
    in ``key_file`` (docs/notifications.md says how a receiver checks it)."""

    url: Annotated[str, Field(pattern=_HTTP_URL)] | None = None
    key_file: FilePath


class AppriseTarget(_NotifyTarget):
    """A notification service through apprise (Slack, Telegram, email, ntfy, generic JSON...):
    ``url`` / ``url_file`` hold one apprise URL (``tgram://bottoken/chatid``)."""


class NotifyConfig(_Model):
    """Notifications of kills, warnings, reductions, flat confirmed, re-arms and conditions
    (docs/notifications.md). They are sent after the actions they report, from a queue of
    ``queue_size`` per target (when full, the oldest is dropped and counted), each tried
    ``attempts`` times under the retry policy (`guardd.retry`), ``timeout_s`` per try; at most
    ``rate_limit_count`` notices of one kind go per ``rate_limit_window_s`` seconds. A
    disconnect from IB is notified once it has lasted ``disconnect_after_s`` seconds."""

    webhooks: dict[Name, WebhookTarget] = Field(default_factory=dict)
    apprise: dict[Name, AppriseTarget] = Field(default_factory=dict)
    disconnect_after_s: Annotated[float, Field(ge=0)] = 60.0
    queue_size: Annotated[int, Field(ge=1, le=10_000)] = 100
    attempts: Annotated[int, Field(ge=1, le=20)] = 4
    timeout_s: Seconds = 10.0
    retry_backoff_s: Seconds = 1.0
    retry_backoff_max_s: Seconds = 30.0
    rate_limit_count: Annotated[int, Field(ge=1)] = 10
    rate_limit_window_s: Seconds = 300.0

    @model_validator(mode="after")
    def _backoff_in_order(self) -> Self:
        _backoff_in_order(self, "retry_backoff_s", "retry_backoff_max_s")
        return self

    @model_validator(mode="after")
    def _names_unique(self) -> Self:
        for name in self.webhooks:
            if name in self.apprise:
                raise _broken(
                    f"apprise.{name}", f"is also the name of @webhooks.{name}: names must differ"
                )
        return self

    @property
    def enabled(self) -> bool:
        """Whether any target is configured."""
        return bool(self.webhooks or self.apprise)


class Config(_Model):
    """The whole configuration of one guardd, which guards one IB login and one account."""

    account: Name
    ib: IbConfig
    state_dir: FilePath
    dry_run: bool = False
    limits: Limits = Field(default_factory=Limits)
    kill: KillConfig = Field(default_factory=KillConfig)
    flatten: FlattenConfig = Field(default_factory=FlattenConfig)
    budget: BudgetConfig = Field(default_factory=BudgetConfig)
    control: ControlConfig = Field(default_factory=ControlConfig)
    metrics: MetricsConfig = Field(default_factory=MetricsConfig)
    log: LogConfig = Field(default_factory=LogConfig)
    journal: JournalConfig = Field(default_factory=JournalConfig)
    notify: NotifyConfig = Field(default_factory=NotifyConfig)

    @model_validator(mode="after")
    def _metrics_have_a_server(self) -> Self:
        metrics = self.metrics
        if metrics.enabled and metrics.listen == "control" and not self.control.http.enabled:
            raise _broken(
                "metrics.listen", 'is "control" but @control.http.enabled is false; use "separate"'
            )
        return self

    @model_validator(mode="after")
    def _heartbeats_need_mqtt(self) -> Self:
        # Heartbeats arrive over MQTT only: without it every bot is silent from the first
        # second, and its timeout is a certain alert, reduce or kill rather than a dead-man.
        if self.limits.heartbeats.bots and not self.control.mqtt.enabled:
            raise _broken(
                "limits.heartbeats.bots",
                "bots publish heartbeats over MQTT, but @control.mqtt.enabled is false: "
                "enable MQTT or remove the bots",
            )
        return self

    @property
    def latch_path(self) -> Path:
        """The kill latch state file."""
        return self.state_dir / "latch.json"

    @property
    def journal_path(self) -> Path:
        """The append-only audit journal (its live file; rotated segments beside it)."""
        return self.state_dir / "journal.jsonl"

    @property
    def nonces_path(self) -> Path:
        """The used nonces of signed MQTT commands (guardd.control.nonces)."""
        return self.state_dir / "nonces.jsonl"


# ---------------------------------------------------------------------------------------------
# Reloading (SIGHUP)

RELOADABLE = "limits"
"""The one section a reload (SIGHUP) changes in a running guard; every other key needs a restart."""

ReloadRefusal = tuple[str, str]
"""A key a reload cannot change, and why: ``("ib.port", "needs a restart")``."""


def changed_keys(old: Config, new: Config) -> tuple[str, ...]:
    """The key paths whose values differ between two configs, sorted: ``limits.leverage.kill``,
    ``control.http.port``; a table added or removed is named as a whole."""
    return tuple(sorted(_differences(old.model_dump(), new.model_dump(), "")))


def reload_refusals(old: Config, new: Config) -> tuple[ReloadRefusal, ...]:
    """What keeps a running guard from taking `new` by a reload: every changed key outside
    ``[limits]``, and heartbeats watched where none were while MQTT is on (the heartbeat
    subscription is made when MQTT connects). Empty: the reload can go ahead."""
    refusals: list[ReloadRefusal] = [
        (key, "needs a restart")
        for key in changed_keys(old, new)
        if key != RELOADABLE and not key.startswith(f"{RELOADABLE}.")
    ]
    if new.limits.heartbeats.bots and not old.limits.heartbeats.bots:
        refusals.append(
            (
                "limits.heartbeats.bots",
                "watching heartbeats where none were watched needs a restart "
                "(the MQTT heartbeat subscription is made at start)",
            )
        )
    return tuple(refusals)


def _differences(old: object, new: object, prefix: str) -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        found: list[str] = []
        for key in old.keys() | new.keys():
            path = f"{prefix}.{key}" if prefix else str(key)
            if key not in old or key not in new:
                found.append(path)
            else:
                found.extend(_differences(old[key], new[key], path))
        return found
    return [] if old == new else [prefix]


# ---------------------------------------------------------------------------------------------
# Loading


def load_config(path: Path, *, credentials_directory: str | None = None) -> Config:
    """Read and check a TOML config file; any problem raises ``ConfigError`` naming the key.

    `credentials_directory` (the entry point passes ``$CREDENTIALS_DIRECTORY``) is where a
    relative credential path (token, key, password, TLS files) is looked up."""
    try:
        text = path.read_bytes().decode("utf-8")
    except FileNotFoundError as exc:
        raise ConfigError("", f"{path}: config file not found") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError("", f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
    except OSError as exc:
        raise ConfigError("", f"{path}: cannot read config file ({exc.strerror})") from exc
    return parse_config(text, source=str(path), credentials_directory=credentials_directory)


def parse_config(
    text: str, *, source: str = "<config>", credentials_directory: str | None = None
) -> Config:
    """Check TOML text as a config; ``source`` names it in a syntax error."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError("", f"{source}: TOML syntax error: {exc}") from exc
    except RecursionError as exc:  # tomllib parses nested arrays and tables recursively
        raise ConfigError("", f"{source}: TOML nested too deeply") from exc
    try:
        context = {"credentials_directory": credentials_directory}
        return Config.model_validate(data, context=context)
    except ValidationError as exc:
        raise _config_error(exc) from exc


def _config_error(exc: ValidationError) -> ConfigError:
    problems = [_problem(error) for error in exc.errors(include_url=False)]
    (key_path, rule), rest = problems[0], problems[1:]
    return ConfigError(key_path, rule, more=tuple(f"{key}: {why}" for key, why in rest))


_SIBLING = re.compile(r"@([A-Za-z0-9_.]+)")


def _problem(error: Mapping[str, Any]) -> tuple[str, str]:
    """One pydantic error as (key path, rule) in the operator's terms."""
    loc = tuple(error["loc"])
    kind = error["type"]
    if kind == "guardd_rule":
        ctx = error["ctx"]
        prefix = _key_path(loc)

        def full(key: str) -> str:
            return f"{prefix}.{key}" if prefix else key

        rule = _SIBLING.sub(lambda match: full(match[1]), str(ctx["rule"]))
        return full(str(ctx["key"])), rule
    key_path = _key_path(loc)
    if kind == "missing":
        return key_path, "required key is missing"
    if kind == "extra_forbidden":
        return key_path, "unknown key"
    message = str(error["msg"])
    rule = message[:1].lower() + message[1:]
    return key_path, f"{rule} (got {_short_repr(error.get('input'))})"


def _key_path(loc: tuple[int | str, ...]) -> str:
    path = ""
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        elif part == "[key]":
            path += " (key)"
        else:
            path += f".{part}" if path else part
    return path


def _short_repr(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
