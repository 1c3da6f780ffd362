"""Metrics: what the app's calls turn into, and the /metrics listener."""

from __future__ import annotations

import math
import time

import aiohttp
import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from guardd.config import LeverageLimit
from guardd.core.rules import Thresholds
from guardd.metrics import Metrics, MetricsServer, kill_usage

ACCOUNT = "DU000001"


class FakeClock:
    """A settable epoch clock."""

    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def value(registry: CollectorRegistry, name: str, **labels: str) -> float | None:
    """One sample's value, with the account label implied."""
    return registry.get_sample_value(name, {"account": ACCOUNT, **labels})


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(1_700_000_000.0)


@pytest.fixture
def metrics(registry: CollectorRegistry, clock: FakeClock) -> Metrics:
    return Metrics(registry, account=ACCOUNT, version="1.2.3", clock=clock)


def test_new_metrics_then_build_info_and_zeroed_counters_exist(registry: CollectorRegistry) -> None:
    Metrics(registry, account=ACCOUNT, version="1.2.3")

    assert value(registry, "guardd_build_info", version="1.2.3") == 1
    assert value(registry, "guardd_kills_total", source="restored") == 0
    assert value(registry, "guardd_orders_cancelled_total") == 0
    assert value(registry, "guardd_state", state="ARMED") == 0
    assert value(registry, "guardd_mqtt_connected") is None


def test_set_state_halted_then_only_halted_is_one(
    metrics: Metrics, registry: CollectorRegistry
) -> None:
    metrics.set_state("ARMED")
    metrics.set_state("HALTED")

    states = {s: value(registry, "guardd_state", state=s) for s in ("ARMED", "WARNING", "HALTED")}
    assert states == {"ARMED": 0, "WARNING": 0, "HALTED": 1}


def test_unknown_state_then_refused(metrics: Metrics) -> None:
    with pytest.raises(ValueError, match="unknown state"):
        metrics.set_state("PANIC")


def test_observe_rule_then_value_limits_and_kill_usage_exported(
    metrics: Metrics, registry: CollectorRegistry
) -> None:
    metrics.observe_rule("leverage", "", 2.4, Thresholds(warn=1.5, reduce=2.0, kill=3.0))

    assert value(registry, "guardd_rule_value", rule="leverage", subject="") == 2.4
    assert value(registry, "guardd_rule_limit", rule="leverage", level="kill") == 3.0
    assert value(registry, "guardd_rule_limit", rule="leverage", level="warn") == 1.5
    usage = value(registry, "guardd_rule_kill_usage_ratio", rule="leverage", subject="")
    assert usage == pytest.approx(0.8)


def test_rule_without_data_and_unset_level_then_nan_and_no_limit(
    metrics: Metrics, registry: CollectorRegistry
) -> None:
    metrics.observe_rule("daily_loss", "", 0.01, {"warn": 0.02, "kill": 0.05})
    metrics.observe_rule("daily_loss", "", None, {"kill": 0.05})

    figure = value(registry, "guardd_rule_value", rule="daily_loss", subject="")
    assert figure is not None and math.isnan(figure)
    assert value(registry, "guardd_rule_limit", rule="daily_loss", level="warn") is None
    assert value(registry, "guardd_rule_limit", rule="daily_loss", level="kill") == 0.05


def test_lower_is_worse_rule_then_usage_rises_as_value_falls() -> None:
    far = kill_usage(0.5, 0.05, higher_is_worse=False)
    near = kill_usage(0.0625, 0.05, higher_is_worse=False)
    gone = kill_usage(0.0, 0.05, higher_is_worse=False)

    assert far == pytest.approx(0.1)
    assert near == pytest.approx(0.8)
    assert gone == math.inf


def test_config_level_limit_then_its_levels_exported(
    metrics: Metrics, registry: CollectorRegistry
) -> None:
    metrics.observe_rule("leverage", "", 1.0, LeverageLimit(warn=1.5, kill=3.0))

    assert value(registry, "guardd_rule_limit", rule="leverage", level="warn") == 1.5
    assert value(registry, "guardd_rule_limit", rule="leverage", level="reduce") is None


def test_forget_subject_then_its_series_disappear(
    metrics: Metrics, registry: CollectorRegistry
) -> None:
    metrics.observe_rule("positions", "AAPL", 900, Thresholds(kill=1000))
    metrics.forget_subject("positions", "AAPL")

    assert value(registry, "guardd_rule_value", rule="positions", subject="AAPL") is None


def test_counts_then_counters_add_up(metrics: Metrics, registry: CollectorRegistry) -> None:
    metrics.count_breach("leverage", "warn")
    metrics.count_breach("leverage", "warn")
    metrics.count_kill("http")
    metrics.count_cancelled(3)
    metrics.count_cancelled(2)
    metrics.count_flatten_child()

    assert value(registry, "guardd_breaches_total", rule="leverage", level="warn") == 2
    assert value(registry, "guardd_kills_total", source="http") == 1
    assert value(registry, "guardd_kills_total", source="mqtt") == 0
    assert value(registry, "guardd_orders_cancelled_total") == 5
    assert value(registry, "guardd_flatten_child_orders_total") == 1


def test_base_currency_learned_then_money_shown_once_under_it(
    metrics: Metrics, registry: CollectorRegistry
) -> None:
    # Arrange: no base currency yet (IB has not named it): no money series at all
    metrics.set_exposure(gross=None, net_liq=None, leverage=None, cushion=None, currency=None)
    assert value(registry, "guardd_net_liquidation", currency="USD") is None
    # Act: IB names EUR, then (a different account behind the same login) GBP
    metrics.set_exposure(gross=2.0, net_liq=1.0, leverage=2.0, cushion=None, currency="EUR")
    metrics.set_exposure(gross=4.0, net_liq=2.0, leverage=2.0, cushion=None, currency="GBP")
    # Assert: one series, under the currency the figures are in
    assert value(registry, "guardd_net_liquidation", currency="EUR") is None
    assert value(registry, "guardd_gross_position_value", currency="EUR") is None
    assert value(registry, "guardd_net_liquidation", currency="GBP") == 2.0


def test_exposure_rates_and_connectivity_then_gauges_follow(
    metrics: Metrics, registry: CollectorRegistry
) -> None:
    metrics.set_exposure(
        gross=2_000_000, net_liq=1_000_000, leverage=2.0, cushion=None, currency="EUR"
    )
    metrics.set_order_rate(7, "1s", 12.5)
    metrics.set_ib_connected(True)
    metrics.set_mqtt_connected(False)
    metrics.set_flatten(pending=2, overdue=True)

    assert value(registry, "guardd_gross_position_value", currency="EUR") == 2_000_000
    assert value(registry, "guardd_net_liquidation", currency="EUR") == 1_000_000
    assert value(registry, "guardd_leverage_ratio") == 2.0
    cushion = value(registry, "guardd_cushion_ratio")
    assert cushion is not None and math.isnan(cushion)
    assert value(registry, "guardd_order_rate", client_id="7", window="1s") == 12.5
    assert value(registry, "guardd_ib_connected") == 1
    assert value(registry, "guardd_mqtt_connected") == 0
    assert value(registry, "guardd_flatten_pending") == 2
    assert value(registry, "guardd_flatten_overdue") == 1


def test_no_event_yet_then_age_counts_from_start(
    metrics: Metrics, registry: CollectorRegistry, clock: FakeClock
) -> None:
    clock.now += 42.0

    assert value(registry, "guardd_last_event_age_seconds") == 42.0


def test_event_marked_then_age_computed_at_scrape(
    metrics: Metrics, registry: CollectorRegistry, clock: FakeClock
) -> None:
    metrics.mark_event(clock.now + 10.0)
    metrics.mark_event(clock.now + 5.0)  # an older event never makes the data look older
    clock.now += 12.5

    assert value(registry, "guardd_last_event_age_seconds") == 2.5


def test_latencies_observed_then_histogram_buckets_span_the_range(
    metrics: Metrics, registry: CollectorRegistry
) -> None:
    metrics.observe_trigger_to_cancel(0.0003)
    metrics.observe_event_processing(0.000002)

    assert value(registry, "guardd_trigger_to_cancel_seconds_bucket", le="0.0001") == 0
    assert value(registry, "guardd_trigger_to_cancel_seconds_bucket", le="0.0005") == 1
    assert value(registry, "guardd_trigger_to_cancel_seconds_bucket", le="1.0") == 1
    assert value(registry, "guardd_event_processing_seconds_bucket", le="1e-06") == 0
    assert value(registry, "guardd_event_processing_seconds_bucket", le="2.5e-06") == 1
    assert value(registry, "guardd_event_processing_seconds_bucket", le="0.01") == 1


async def test_metrics_server_then_scrape_parses_as_prometheus_text(
    metrics: Metrics, registry: CollectorRegistry
) -> None:
    metrics.set_state("WARNING")

    async with MetricsServer(registry, "127.0.0.1", 0) as server:
        assert server.port != 0
        async with aiohttp.ClientSession() as session, session.get(server.url) as response:
            status = response.status
            content_type = response.headers["Content-Type"]
            body = await response.text()

    assert status == 200
    assert content_type.startswith("text/plain")
    families = {f.name: f for f in text_string_to_metric_families(body)}
    warning = [s for s in families["guardd_state"].samples if s.labels["state"] == "WARNING"]
    assert warning[0].value == 1
    assert "guardd_last_event_age_seconds" in families


async def test_scrape_asking_for_openmetrics_then_served_openmetrics(
    registry: CollectorRegistry,
) -> None:
    Metrics(registry, account=ACCOUNT, version="1.2.3")
    accept = "application/openmetrics-text; version=1.0.0"

    async with (
        MetricsServer(registry, "127.0.0.1", 0) as server,
        aiohttp.ClientSession() as session,
        session.get(server.url, headers={"Accept": accept}) as response,
    ):
        content_type = response.headers["Content-Type"]
        body = await response.text()

    assert content_type.startswith("application/openmetrics-text")
    assert body.rstrip().endswith("# EOF")


async def scrape(registry: CollectorRegistry, accept: str = "") -> str:
    async with (
        MetricsServer(registry, "127.0.0.1", 0) as server,
        aiohttp.ClientSession() as session,
        session.get(server.url, headers={"Accept": accept}) as response,
    ):
        return await response.text()


@pytest.mark.parametrize("accept", ["", "application/openmetrics-text; version=1.0.0"])
async def test_scrape_then_no_created_series_in_either_format(
    metrics: Metrics, registry: CollectorRegistry, accept: str
) -> None:
    metrics.count_kill("http")
    metrics.observe_trigger_to_cancel(0.001)

    body = await scrape(registry, accept)

    assert "guardd_kills_total" in body and "guardd_trigger_to_cancel_seconds_bucket" in body
    assert "_created" not in body


async def test_scrape_then_the_guard_process_metrics(
    metrics: Metrics, registry: CollectorRegistry
) -> None:
    families = {f.name: f for f in text_string_to_metric_families(await scrape(registry))}

    rss = families["process_resident_memory_bytes"].samples[0].value
    started = families["process_start_time_seconds"].samples[0].value
    assert rss > 0
    assert 0 < started <= time.time()
    assert families["process_open_fds"].samples[0].value > 0
    assert "process_cpu_seconds" in families  # the text parser drops the _total


def test_ratios_and_money_then_named_by_the_conventions(
    metrics: Metrics, registry: CollectorRegistry
) -> None:
    metrics.set_exposure(1.0, 1.0, 1.0, 1.0, currency="USD")
    metrics.observe_rule("leverage", "", 1.0, Thresholds(kill=3))

    names = {s.name for f in registry.collect() for s in f.samples if s.name.startswith("guardd")}

    assert {"guardd_leverage_ratio", "guardd_cushion_ratio"} <= names
    assert "guardd_rule_kill_usage_ratio" in names
    assert names.isdisjoint({"guardd_leverage", "guardd_cushion", "guardd_rule_kill_usage"})
    money = {"guardd_gross_position_value", "guardd_net_liquidation"}
    assert {
        s.labels["currency"] for f in registry.collect() for s in f.samples if s.name in money
    } == {"USD"}
