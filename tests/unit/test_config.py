"""Tests for guardd.config: the shipped files load, bad values name their key, garbage never escapes
as anything but ConfigError."""

from __future__ import annotations

import copy
import datetime as dt
import json
import math
import tomllib
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from guardd.config import (
    Config,
    changed_keys,
    load_config,
    parse_config,
    reload_refusals,
)
from guardd.core.notices import NOTICE_KINDS
from guardd.core.planner import OrderType
from guardd.core.pricing import Market, RepricePolicy, Widen
from guardd.errors import EX_CONFIG, ConfigError, GuarddError
from guardd.runtime.rulebook import build_close_policy

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
EXAMPLE = CONFIGS / "guardd.example.toml"
DEMO = CONFIGS / "demo.toml"

MINIMAL = """
account = "DU1"
state_dir = "state"
[ib]
client_id = 7
"""


# --- the shipped files ------------------------------------------------------------------------


def test_example_file_then_loads_with_its_documented_values() -> None:
    cfg = load_config(EXAMPLE)

    assert cfg.account == "U1234567"
    assert (cfg.limits.leverage.warn, cfg.limits.leverage.reduce) == (1.5, 2.0)
    assert cfg.limits.leverage.kill == 3.0
    assert cfg.limits.margin_cushion.kill == 0.08
    assert cfg.limits.heartbeats.bots == {}  # commented out: heartbeats need MQTT
    assert cfg.limits.positions.max_quantity["ES"] == 4
    assert cfg.control.mqtt.operator_key_files["alice"].name == "mqtt-key-alice"
    assert cfg.control.http_token_people == {"kill": "alice", "arm": "alice"}
    assert cfg.control.allow_insecure_permissions is False
    policy = cfg.flatten.policy_for("OPT")
    assert policy is not None and policy.collar == 0.10
    assert cfg.notify.webhooks["ops"].kinds == NOTICE_KINDS  # every kind by default
    assert "warn" not in cfg.notify.apprise["phone"].kinds
    assert cfg.notify.disconnect_after_s == 60.0


def test_demo_file_then_guards_the_simulated_gateway() -> None:
    cfg = load_config(DEMO)

    assert cfg.account == "DU000001"
    assert (cfg.ib.port, cfg.ib.client_id) == (7497, 0)
    assert cfg.kill.mode == "flatten"
    assert cfg.state_dir == Path("./state/demo")
    assert cfg.limits.order_rate.per_client_1s.kill == 5
    leverage = cfg.limits.leverage
    assert (leverage.warn, leverage.reduce, leverage.kill) == (1.5, 2.0, 3.0)
    assert cfg.limits.daily_loss.kill == 0.05
    assert cfg.latch_path == Path("state/demo/latch.json")


def test_minimal_file_then_safe_defaults() -> None:
    cfg = parse_config(MINIMAL)

    assert (cfg.ib.host, cfg.ib.port, cfg.ib.connect_timeout_s) == ("127.0.0.1", 4002, 5.0)
    assert cfg.budget.messages_per_second == 40
    assert cfg.kill.mode == "cancel"
    assert cfg.dry_run is False
    assert not cfg.limits.leverage.enabled
    assert not cfg.limits.per_order.enabled
    assert cfg.control.mqtt.topic_prefix == "guardd"
    assert cfg.control.mqtt.window_s == 30.0
    assert cfg.journal_path == Path("state/journal.jsonl")


def test_wire_logs_then_off_unless_asked_for() -> None:
    assert parse_config(MINIMAL).log.wire is False
    assert load_config(EXAMPLE).log.wire is False
    assert parse_config(MINIMAL + "[log]\nwire = true\n").log.wire is True


def test_config_then_frozen() -> None:
    cfg = parse_config(MINIMAL)

    with pytest.raises(ValidationError):
        cfg.account = "U2"


def test_order_policy_for_one_class_then_defaults_for_others_kept() -> None:
    text = MINIMAL + '[flatten.order_policy.OPT]\nregular_hours = "LMT"\noutside_hours = "LMT"\n'

    cfg = parse_config(text)

    stk, fut, opt = (cfg.flatten.policy_for(sec) for sec in ("STK", "FUT", "OPT"))
    assert stk is not None and stk.outside_hours == "LMT"
    assert fut is not None and fut.regular_hours == "MKT"
    assert opt is not None and opt.regular_hours == "LMT"
    assert cfg.flatten.policy_for("BOND") is None


def test_default_config_then_fx_closes_at_market_whole_not_in_odd_lots() -> None:
    # Arrange / Act
    policy = build_close_policy(parse_config(MINIMAL))

    # Assert: FX at market in every session, up to 10 M of the pair's base currency per child
    cash = policy.rule_for("CASH")
    assert cash.order_type is OrderType.MKT and not cash.limit_outside_rth
    assert cash.max_child_quantity == Decimal(10_000_000)
    assert policy.rule_for("STK").max_child_quantity is None


def test_default_config_then_options_close_by_limit_never_market() -> None:
    # Arrange / Act
    cfg = parse_config(MINIMAL)
    policy = build_close_policy(cfg)

    # Assert: a limit in every session, re-priced wider by the escalation but never at market
    opt = policy.rule_for("OPT")
    assert opt.order_type is OrderType.LMT and opt.limit_outside_rth
    assert not opt.market_allowed
    assert opt.collar == 0.05
    assert any(isinstance(step, Market) for step in policy.reprice.escalation)
    opt_policy = cfg.flatten.policy_for("OPT")
    assert opt_policy is not None and not opt_policy.market_allowed
    # a table of one's own for another class keeps the options default
    other = parse_config(MINIMAL + '[flatten.order_policy.FUT]\nregular_hours = "MKT"\n')
    assert not build_close_policy(other).rule_for("OPT").market_allowed


def test_repricing_config_then_close_policy_with_those_steps() -> None:
    text = MINIMAL + (
        "[flatten]\nmax_price_age_s = 3.0\nreprice_after_s = 7.5\n"
        "escalation = [{ widen = 0.03 }, { widen = 0.1 }, { market = true }]\n"
        '[flatten.order_policy.OPT]\nregular_hours = "LMT"\noutside_hours = "LMT"\n'
        '[flatten.order_policy.CASH]\nregular_hours = "LMT"\nallow_market = true\n'
    )
    policy = build_close_policy(parse_config(text))
    assert policy.reprice == RepricePolicy(
        max_price_age_s=3.0,
        reprice_after_s=7.5,
        escalation=(Widen(0.03), Widen(0.1), Market()),
    )
    allowed = {sec: policy.rule_for(sec).market_allowed for sec in ("STK", "FUT", "OPT", "CASH")}
    assert allowed == {"STK": True, "FUT": True, "OPT": False, "CASH": True}


def test_minimal_file_then_repricing_on_by_default() -> None:
    reprice = build_close_policy(parse_config(MINIMAL)).reprice
    assert reprice.max_price_age_s == 10.0 and reprice.reprice_after_s == 10.0
    assert reprice.escalation == (Widen(0.05), Market())


def test_lower_is_worse_levels_in_reverse_order_then_accepted() -> None:
    cfg = parse_config(MINIMAL + "[limits.margin_cushion]\nwarn = 0.3\nreduce = 0.2\nkill = 0.1\n")

    assert cfg.limits.margin_cushion.thresholds() == (
        ("warn", 0.3),
        ("reduce", 0.2),
        ("kill", 0.1),
    )


# --- bad values name their key ----------------------------------------------------------------

BAD = [
    # (what, toml appended to / replacing MINIMAL, key path, words in the rule)
    ("unknown top-level key", 'acount = "x"\n', "acount", "unknown key"),
    ("unknown rule", "[limits.leveraeg]\nkill = 3.0\n", "limits.leveraeg", "unknown key"),
    ("unknown nested key", "[limits.leverage]\nkil = 3.0\n", "limits.leverage.kil", "unknown"),
    ("string for a number", '[budget]\nmessages_per_second = "40"\n', "budget.messages_per_second",
     "valid integer"),
    ("int for a bool", "dry_run = 1\n", "dry_run", "valid boolean"),
    ("out-of-order levels", "[limits.leverage]\nwarn = 1.5\nreduce = 2.0\nkill = 1.8\n",
     "limits.leverage.kill", "greater than or equal to limits.leverage.reduce (2.0)"),
    ("cushion levels the wrong way", "[limits.margin_cushion]\nwarn = 0.1\nkill = 0.2\n",
     "limits.margin_cushion.kill", "less than or equal to limits.margin_cushion.warn"),
    ("budget at IB's limit", "[budget]\nmessages_per_second = 50\n",
     "budget.messages_per_second", "less than 50"),
    ("reserve eats the budget", "[budget]\nmessages_per_second = 10\nkill_reserve = 10\n",
     "budget.kill_reserve", "less than budget.messages_per_second"),
    ("NaN level", "[limits.leverage]\nkill = nan\n", "limits.leverage.kill", "finite"),
    ("notify back-off cap below its start",
     "[notify]\nretry_backoff_s = 5\nretry_backoff_max_s = 1\n",
     "notify.retry_backoff_max_s", "greater than or equal to notify.retry_backoff_s (5.0)"),
    ("loss above 100 %", "[limits.daily_loss]\nkill = 1.5\n", "limits.daily_loss.kill",
     "less than or equal to 1"),
    ("vol reduce without target", "[limits.volatility]\nreduce = 0.5\n",
     "limits.volatility.target_leverage", "required when limits.volatility.reduce"),
    ("unknown kill mode", '[kill]\nmode = "nuke"\n', "kill.mode", "'cancel' or 'flatten'"),
    ("unknown sec type", '[limits.per_order]\nforbidden_sec_types = ["STK", "XYZ"]\n',
     "limits.per_order.forbidden_sec_types[1]", "'STK'"),
    ("market stock close outside hours", '[flatten.order_policy.STK]\noutside_hours = "MKT"\n',
     "flatten.order_policy.STK.outside_hours", "outside regular hours"),
    ("escalation step of two kinds", "[flatten]\nescalation = [{ widen = 0.05, market = true }]\n",
     "flatten.escalation[0]", "exactly one of widen"),
    ("escalation step of no kind", "[flatten]\nescalation = [{}]\n",
     "flatten.escalation[0]", "exactly one of widen"),
    ("escalation market false", "[flatten]\nescalation = [{ market = false }]\n",
     "flatten.escalation[0].market", "must be true"),
    ("escalation unknown key", "[flatten]\nescalation = [{ widden = 0.05 }]\n",
     "flatten.escalation[0].widden", "unknown key"),
    ("escalation widen too wide", "[flatten]\nescalation = [{ widen = 0.9 }]\n",
     "flatten.escalation[0].widen", "less than or equal to 0.5"),
    ("price age zero", "[flatten]\nmax_price_age_s = 0\n", "flatten.max_price_age_s",
     "greater than 0"),
    ("reprice never", "[flatten]\nreprice_after_s = -1.0\n", "flatten.reprice_after_s",
     "greater than 0"),
    ("half a TLS pair", '[control.http]\ntls_cert_file = "c.pem"\n',
     "control.http.tls_key_file", "required when control.http.tls_cert_file"),
    ("metrics with no server", "[control.http]\nenabled = false\n", "metrics.listen", "separate"),
    ("bad bot name", "[limits.heartbeats.bots.'a/b']\ntimeout_s = 5.0\n",
     "limits.heartbeats.bots.a/b (key)", "pattern"),
    ("heartbeats without MQTT", "[limits.heartbeats.bots.momentum]\ntimeout_s = 15.0\n",
     "limits.heartbeats.bots", "control.mqtt.enabled is false"),
    ("port out of range", "[control.mqtt]\nport = 70000\n", "control.mqtt.port", "65535"),
    ("wildcard topic", '[control.mqtt]\ntopic_prefix = "guardd/#"\n', "control.mqtt.topic_prefix",
     "pattern"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("text", "key_path", "words"), [b[1:] for b in BAD], ids=[b[0] for b in BAD]
)
def test_bad_value_then_config_error_names_key(text: str, key_path: str, words: str) -> None:
    # Tables appended after MINIMAL's [ib] would land inside it; top-level keys go first.
    source = text + MINIMAL if not text.startswith("[") else MINIMAL + text

    with pytest.raises(ConfigError) as caught:
        parse_config(source)

    assert caught.value.key_path == key_path
    assert words in caught.value.rule
    assert str(caught.value).startswith(f"{key_path}: ")


# --- people: who holds which credential, and the two-person re-arm ----------------------------

CREDENTIALS = """
[control.http.token_files]
kill = "/run/credentials/guardd.service/token-kill"
arm = "/run/credentials/guardd.service/token-arm"
[control.mqtt]
enabled = true
operator_key_files = { alice = "/k/alice", bob = "/k/bob", carol = "/k/carol" }
operator_key_roles = { alice = ["kill", "arm"], bob = ["kill", "arm"] }
"""

PEOPLE_BAD = [
    # (what, [control] table text, key path, words in the rule)
    ("unknown key id", 'people.alice = { mqtt_keys = ["alicia"] }',
     "control.people.alice.mqtt_keys", "'alicia', which has no entry in control.mqtt.operator"),
    ("token role without a file", 'people.alice = { http_tokens = ["read"] }',
     "control.people.alice.http_tokens", "control.http.token_files.read"),
    ("one key, two people",
     'people.alice = { mqtt_keys = ["alice"] }\npeople.bob = { mqtt_keys = ["alice", "bob"] }',
     "control.people.bob.mqtt_keys", "already belongs to alice"),
    ("one token, two people",
     'people.alice = { http_tokens = ["arm"] }\npeople.bob = { http_tokens = ["arm"] }',
     "control.people.bob.http_tokens", "already belongs to alice"),
    ("two-person with an arm key of nobody",
     'two_person_rearm = true\npeople.alice = { http_tokens = ["arm"], mqtt_keys = ["alice"] }',
     "control.people", "operator_key_files.bob can re-arm but belongs to no person"),
    ("two-person with one person",
     'two_person_rearm = true\npeople.alice = { http_tokens = ["arm"], mqtt_keys = ["alice", '
     '"bob"] }', "control.two_person_rearm", "at least two people who can re-arm, but only alice"),
    ("unknown person key", "people.alice = { keys = [] }", "control.people.alice.keys",
     "unknown key"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("control", "key_path", "words"), [b[1:] for b in PEOPLE_BAD], ids=[b[0] for b in PEOPLE_BAD]
)
def test_people_that_do_not_add_up_then_config_error_names_key(
    control: str, key_path: str, words: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(MINIMAL + "[control]\n" + control + "\n" + CREDENTIALS)

    assert caught.value.key_path == key_path
    assert words in caught.value.rule


def test_two_person_with_each_arm_credential_named_then_people_by_credential() -> None:
    control = """[control]
two_person_rearm = true
allow_insecure_permissions = true
people.alice = { http_tokens = ["arm", "kill"], mqtt_keys = ["alice"] }
people.bob = { mqtt_keys = ["bob"] }
"""

    cfg = parse_config(MINIMAL + control + CREDENTIALS).control

    assert cfg.http_token_people == {"arm": "alice", "kill": "alice"}
    assert cfg.mqtt_key_people == {"alice": "alice", "bob": "bob"}
    assert cfg.person_of_mqtt_key("carol") is None  # kill only: needs no person
    assert cfg.allow_insecure_permissions is True


def test_two_person_with_a_token_of_each_person_then_both_may_rearm_over_http() -> None:
    control = """[control]
two_person_rearm = true
people.alice = { http_tokens = ["arm"], http_token_file = "/t/alice", http_token_roles = ["arm"] }
people.bob = { http_token_file = "/t/bob", http_token_roles = ["kill", "arm"] }
people.carol = { http_token_file = "/t/carol" }
[control.http.token_files]
arm = "/t/arm"
"""

    cfg = parse_config(MINIMAL + control).control

    assert cfg.people["bob"].http_token_roles == ("kill", "arm")
    assert cfg.people["carol"].http_token_roles == ("read",)  # a personal token reads by default


def test_two_person_with_one_persons_token_only_then_config_error() -> None:
    control = """[control]
two_person_rearm = true
people.alice = { http_token_file = "/t/alice", http_token_roles = ["arm"] }
people.bob = { http_token_file = "/t/bob", http_token_roles = ["kill"] }
"""

    with pytest.raises(ConfigError) as caught:
        parse_config(MINIMAL + control)

    assert caught.value.key_path == "control.two_person_rearm"
    assert "only alice can" in caught.value.rule


def test_minimal_file_then_secret_files_must_be_private() -> None:
    assert parse_config(MINIMAL).control.allow_insecure_permissions is False


def test_heartbeats_with_mqtt_enabled_then_config_loads() -> None:
    text = MINIMAL + "[limits.heartbeats.bots.momentum]\ntimeout_s = 15.0\n"
    text += "[control.mqtt]\nenabled = true\n"

    cfg = parse_config(text)

    assert cfg.limits.heartbeats.bots["momentum"].timeout_s == 15.0


def test_missing_account_then_config_error_names_account() -> None:
    text = MINIMAL.replace('account = "DU1"\n', "")

    with pytest.raises(ConfigError) as caught:
        parse_config(text)

    assert caught.value.key_path == "account"
    assert caught.value.rule == "required key is missing"


def test_missing_client_id_then_config_error_names_it() -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config('account = "DU1"\nstate_dir = "s"\n[ib]\nport = 4001\n')

    assert caught.value.key_path == "ib.client_id"


def test_several_problems_then_all_reported() -> None:
    text = 'bogus = 1\n[ib]\nport = "x"\nclient_id = 0\n'

    with pytest.raises(ConfigError) as caught:
        parse_config(text)

    message = str(caught.value)
    for key in ("account", "state_dir", "bogus", "ib.port"):
        assert f"{key}: " in message
    assert len(caught.value.more) == 3


def test_missing_file_then_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.toml")


def test_toml_syntax_error_then_config_error_names_file(tmp_path: Path) -> None:
    path = tmp_path / "broken.toml"
    path.write_text("account = \n")

    with pytest.raises(ConfigError) as caught:
        load_config(path)

    assert str(path) in str(caught.value)
    assert "TOML syntax error" in caught.value.rule


def test_binary_file_then_config_error(tmp_path: Path) -> None:
    path = tmp_path / "binary.toml"
    path.write_bytes(b"\xff\xfe\x00account")

    with pytest.raises(ConfigError, match="UTF-8"):
        load_config(path)


def test_directory_as_file_then_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path)


def test_config_error_then_exit_code_ex_config() -> None:
    err = ConfigError("a.b", "is wrong")

    assert err.exit_code == EX_CONFIG == 78
    assert isinstance(err, GuarddError)


# --- garbage never escapes as anything but ConfigError -----------------------------------------


def _toml_value(value: Any) -> str:
    """A minimal TOML writer for the values hypothesis makes (inline tables and arrays only)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, dt.date | dt.time):
        return value.isoformat()
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(item) for item in value) + "]"
    if isinstance(value, dict):
        return (
            "{" + ", ".join(f"{json.dumps(k)} = {_toml_value(v)}" for k, v in value.items()) + "}"
        )
    raise TypeError(value)


def _toml_document(data: dict[str, Any]) -> str:
    return "".join(f"{json.dumps(key)} = {_toml_value(value)}\n" for key, value in data.items())


def _key_paths(data: dict[str, Any], prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    paths: list[tuple[str, ...]] = []
    for key, value in data.items():
        paths.append((*prefix, key))
        if isinstance(value, dict):
            paths.extend(_key_paths(value, (*prefix, key)))
    return paths


EXAMPLE_DATA = tomllib.loads(EXAMPLE.read_text())
EXAMPLE_PATHS = _key_paths(EXAMPLE_DATA)
# Tables whose keys are the operator's names (symbols, bots, operators): any new name is allowed.
OPEN_TABLES = {
    ("limits", "positions", "max_quantity"),
    ("limits", "positions", "max_notional"),
    ("limits", "heartbeats", "bots"),
    ("control", "mqtt", "operator_key_files"),
    ("control", "people"),
}

text_values = st.text(alphabet=st.characters(codec="utf-8"), max_size=12)
scalars = (
    st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**63 - 1)
    | st.floats()
    | text_values
    | st.dates()
    | st.datetimes()
    | st.times()
)
garbage = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(text_values, inner, max_size=3),
    max_leaves=6,
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(path=st.sampled_from(EXAMPLE_PATHS), value=garbage, extra_key=st.booleans())
def test_garbage_value_anywhere_then_config_error_or_config(
    path: tuple[str, ...], value: Any, extra_key: bool
) -> None:
    data = copy.deepcopy(EXAMPLE_DATA)
    parent = data
    for key in path[:-1]:
        parent = parent[key]
    parent[path[-1] + "_x" if extra_key else path[-1]] = value

    try:
        cfg = parse_config(_toml_document(data))
    except ConfigError as err:
        assert err.rule  # every error says what is wrong
        return
    assert isinstance(cfg, Config)
    assert not extra_key or path[:-1] in OPEN_TABLES  # an unknown key is never accepted


@settings(max_examples=100, deadline=None)
@given(st.text(max_size=80))
def test_random_text_then_only_config_error(text: str) -> None:
    try:
        parse_config(text)
    except ConfigError as err:
        assert str(err)
    else:  # pragma: no cover - random text is never a complete config
        pytest.fail("random text was accepted as a config")


# --- reloading (SIGHUP) -----------------------------------------------------------------------


def test_reload_changing_only_limits_then_no_refusal_and_changes_named() -> None:
    old = parse_config(MINIMAL + "[limits.leverage]\nkill = 3.0\n")
    new = parse_config(MINIMAL + "[limits.leverage]\nkill = 2.5\n[limits.drawdown]\nwarn = 0.1\n")

    assert reload_refusals(old, new) == ()
    assert changed_keys(old, new) == ("limits.drawdown.warn", "limits.leverage.kill")


def test_reload_changing_keys_outside_limits_then_each_refused_by_name() -> None:
    old = parse_config(MINIMAL)
    new = parse_config(
        MINIMAL.replace('state_dir = "state"', 'state_dir = "elsewhere"')
        + '[kill]\nmode = "flatten"\n[control.http]\nport = 9999\n'
    )

    assert reload_refusals(old, new) == (
        ("control.http.port", "needs a restart"),
        ("kill.mode", "needs a restart"),
        ("state_dir", "needs a restart"),
    )


def test_reload_adding_heartbeats_where_none_were_then_refused() -> None:
    mqtt = MINIMAL + "[control.mqtt]\nenabled = true\n"
    bots = "[limits.heartbeats.bots.alpha]\ntimeout_s = 10.0\n"
    old, new = parse_config(mqtt), parse_config(mqtt + bots)

    assert [key for key, _ in reload_refusals(old, new)] == ["limits.heartbeats.bots"]
    assert reload_refusals(new, parse_config(mqtt + bots.replace("alpha", "beta"))) == ()
