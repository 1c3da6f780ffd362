"""Deployment files: systemd units verify and are hardened, alert rules pass their promtool tests,
the Grafana dashboard is valid PromQL over metrics that guardd exports.

Needs `systemd-analyze` (systemd), `promtool` and `prometheus` (Debian package `prometheus`) on
PATH; a missing tool fails the test with the package to install. The end-to-end test runs its own
Prometheus server on a free loopback port.
"""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
from pathlib import Path

import aiohttp
import pytest
from prometheus_client import CollectorRegistry

from guardd.core.rules import Thresholds
from guardd.errors import ConfigError, StartupError
from guardd.metrics import Metrics, MetricsServer
from tests.conftest import eventually, free_port
from tests.deploy_files import (
    ALERTS,
    DEPLOY,
    ROOT,
    UNITS,
    dashboard,
    directives,
    firing_alert,
    panel_exprs,
    tool,
)

ALERTS_TEST = DEPLOY / "prometheus" / "alerts_test.yml"
INSTALLED_BINARY = "/usr/local/bin/guardd"

# Grafana's variables, replaced by plain PromQL before checking an expression.
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$__range": "1h", "$account": ".*"}
METRIC_NAME = re.compile(r"\b(guardd_[a-z0-9_]+)\b")


def run(*argv: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, cwd=cwd, check=False)


def exported_metric_names() -> set[str]:
    """Every sample name guardd's Metrics exports, with every labelled family populated."""
    registry = CollectorRegistry()
    metrics = Metrics(registry, account="DU1", version="test")
    metrics.observe_rule("leverage", "", 1.0, Thresholds(warn=1, reduce=2, kill=3))
    metrics.count_breach("leverage", "warn")
    metrics.set_exposure(1.0, 1.0, 1.0, 1.0, currency="USD")
    metrics.set_order_rate(1, "1s", 1.0)
    metrics.set_stress({"down 10%": 0.1})
    metrics.set_mqtt_connected(True)
    metrics.init_notifications([("ops", ["kill"])])
    return {sample.name for family in registry.collect() for sample in family.samples}


def installable_copy(unit: Path, name: str, directory: Path) -> Path:
    """`unit` written as `name` into `directory` with ExecStart on a binary that exists here."""
    text = unit.read_text()
    assert INSTALLED_BINARY in text
    copy = directory / name
    copy.write_text(text.replace(INSTALLED_BINARY, tool("true", "coreutils")))
    return copy


# ---------------------------------------------------------------------------------- systemd


@pytest.mark.parametrize("name", UNITS)
def test_unit_verified_then_clean(name: str, tmp_path: Path) -> None:
    systemd_analyze = tool("systemd-analyze", "systemd")
    copy = installable_copy(UNITS[name], name, tmp_path)

    result = run(systemd_analyze, "verify", str(copy), cwd=tmp_path)

    ours = [line for line in (result.stdout + result.stderr).splitlines() if "guardd" in line]
    assert result.returncode == 0, result.stderr
    assert ours == []


@pytest.mark.parametrize("name", UNITS)
def test_unit_security_analysed_then_exposure_at_most_2(name: str, tmp_path: Path) -> None:
    systemd_analyze = tool("systemd-analyze", "systemd")
    copy = installable_copy(UNITS[name], name, tmp_path)

    result = run(systemd_analyze, "security", "--offline=true", "--no-pager", str(copy))

    match = re.search(r"Overall exposure level for \S+: (\d+(?:\.\d+)?)", result.stdout)
    assert match is not None, result.stdout + result.stderr
    assert float(match.group(1)) <= 2.0, result.stdout


@pytest.mark.parametrize("name", UNITS)
def test_unit_read_then_notify_watchdog_restart_and_latch_dir_set(name: str) -> None:
    found = directives(UNITS[name])

    assert found["Type"] == ["notify"]
    assert found["NotifyAccess"] == ["main"]
    assert found["WatchdogSec"] == ["10"]
    assert found["Restart"] == ["always"]
    # Every code that needs a person (a config or credential error, a start-up error) is not
    # restarted in a loop.
    prevented = set(" ".join(found["RestartPreventExitStatus"]).split())
    assert prevented == {str(ConfigError.exit_code), str(StartupError.exit_code)}
    assert found["StateDirectory"][0].startswith("guardd")
    assert found["ProtectSystem"] == ["strict"]
    assert found["CapabilityBoundingSet"] == [""]
    assert found["LimitNOFILE"] == [
        "4096"
    ]  # what tests/integration/control/test_control_exhaustion.py runs at
    assert found["ExecReload"] == ["/bin/kill -HUP $MAINPID"]  # reloads the limits (test_reload)
    assert any(c.startswith("token-kill:") for c in found["LoadCredential"])
    assert "HALTED" in UNITS[name].read_text()  # the comment on why Restart=always is safe


FAILURE_UNIT = DEPLOY / "systemd" / "guardd-failure@.service"


@pytest.mark.parametrize("name", UNITS)
def test_guard_unit_fails_then_its_failure_unit_is_started(name: str) -> None:
    found = directives(UNITS[name])

    assert found["OnFailure"] == ["guardd-failure@%N.service"]
    assert FAILURE_UNIT.exists()


def test_failure_unit_verified_then_clean_and_hardened(tmp_path: Path) -> None:
    systemd_analyze = tool("systemd-analyze", "systemd")
    copy = tmp_path / FAILURE_UNIT.name
    copy.write_text(FAILURE_UNIT.read_text())
    instance = "guardd-failure@guardd.service"

    verified = run(systemd_analyze, "verify", instance, cwd=tmp_path)
    security = run(
        systemd_analyze, "security", "--offline=true", "--no-pager", instance, cwd=tmp_path
    )

    assert verified.returncode == 0, verified.stderr
    assert [line for line in verified.stderr.splitlines() if "guardd" in line] == []
    match = re.search(r"Overall exposure level for \S+: (\d+(?:\.\d+)?)", security.stdout)
    assert match is not None and float(match.group(1)) <= 2.0, security.stdout + security.stderr
    assert directives(FAILURE_UNIT)["Type"] == ["oneshot"]


def test_template_instance_then_config_state_and_credentials_per_account() -> None:
    found = directives(UNITS["guardd@DU1234567.service"])

    assert found["ExecStart"] == [f"{INSTALLED_BINARY} run -c /etc/guardd/%i.toml"]
    assert found["StateDirectory"] == ["guardd/%i"]
    assert all("/%i/" in c for c in found["LoadCredential"])


# ---------------------------------------------------------------------------------- Prometheus


def test_alert_rules_checked_then_valid() -> None:
    promtool = tool("promtool", "prometheus")

    result = run(promtool, "check", "rules", str(ALERTS))

    assert result.returncode == 0, result.stdout + result.stderr


def test_alert_rule_unit_tests_run_then_pass() -> None:
    promtool = tool("promtool", "prometheus")

    result = run(promtool, "test", "rules", ALERTS_TEST.name, cwd=ALERTS_TEST.parent)

    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_alert_rules_read_then_every_alert_named_and_metrics_exported() -> None:
    text = ALERTS.read_text()
    exported = exported_metric_names()

    names = set(re.findall(r"^\s*- alert: (\w+)\s*$", text, flags=re.MULTILINE))
    used = set(METRIC_NAME.findall(text))
    assert names == {
        "GuarddDown",
        "GuarddHalted",
        "IbDisconnected",
        "LimitNearKill",
        "DataStale",
        "FlattenOverdue",
        "LatchNotDurable",
        "IbReadOnlyApi",
        "CloseWaitingForOpen",
        "MqttDisconnected",
        "GuarddImpersonated",
        "NotificationsFailing",
        "GuarddRestarted",
        "GuarddCrashLooping",
        "KillLatencyHigh",
        "WatchdogWithheld",
    }
    assert used - exported == set()


def github_anchor(heading: str) -> str:
    """The anchor GitHub gives a Markdown heading: lower case, punctuation dropped, - for spaces."""
    kept = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return kept.replace(" ", "-")


def test_alert_rules_read_then_each_critical_or_warning_with_a_runbook_section() -> None:
    text = ALERTS.read_text()
    runbook = (ROOT / "docs" / "runbook.md").read_text()
    anchors = {
        github_anchor(line.lstrip("#")) for line in runbook.splitlines() if line.startswith("#")
    }
    alerts = re.split(r"^\s*- alert: ", text, flags=re.MULTILINE)[1:]

    assert len(alerts) >= 14
    for alert in alerts:
        name = alert.split()[0]
        [severity] = re.findall(r"^\s*severity: (\S+)\s*$", alert, flags=re.MULTILINE)
        [url] = re.findall(r'^\s*runbook_url: "([^"]+)"\s*$', alert, flags=re.MULTILINE)
        assert severity in ("critical", "warning"), name
        page, _, anchor = url.partition("#")
        assert page == "docs/runbook.md", name
        assert anchor in anchors, f"{name}: docs/runbook.md has no section #{anchor}"


# ---------------------------------------------------------------------------------- Grafana


def plain_promql(expr: str) -> str:
    for variable, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(variable, value)
    return expr


def test_dashboard_parsed_then_importable_with_datasource_and_account_variables() -> None:
    board = dashboard()

    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert board["schemaVersion"] >= 36
    assert board["uid"] == "guardd" and board["id"] is None
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    assert variables["account"]["datasource"]["uid"] == "${datasource}"
    assert "guardd_build_info" in variables["account"]["query"]["query"]
    for panel in board["panels"]:
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "${datasource}", panel["title"]


def test_dashboard_parsed_then_has_the_promised_panels() -> None:
    titles = " | ".join(title for title, _ in panel_exprs(dashboard())).lower()

    for wanted in (
        "state",
        "kill limit usage",
        "gross position value",
        "leverage",
        "margin cushion",
        "stress loss",
        "order rate per client",
        "trigger to first cancel",
        "event processing",
        "ib and mqtt",
        "last broker event age",
    ):
        assert wanted in titles, wanted


def test_dashboard_exprs_then_valid_promql(tmp_path: Path) -> None:
    promtool = tool("promtool", "prometheus")
    exprs = panel_exprs(dashboard())
    rules = [
        {"record": f"dashboard:expr_{i}", "expr": plain_promql(expr)}
        for i, (_, expr) in enumerate(exprs)
    ]
    rule_file = tmp_path / "dashboard_rules.yml"
    # JSON is YAML: no YAML library needed to write a rule file.
    rule_file.write_text(json.dumps({"groups": [{"name": "dashboard", "rules": rules}]}))

    result = run(promtool, "check", "rules", str(rule_file))

    assert len(exprs) >= 15
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"{len(rules)} rules found" in result.stdout


def test_dashboard_exprs_then_use_only_exported_metrics() -> None:
    exported = exported_metric_names()
    board = dashboard()
    annotation_exprs = [a["expr"] for a in board["annotations"]["list"] if "expr" in a]

    used = {m for _, expr in panel_exprs(board) for m in METRIC_NAME.findall(expr)}
    used |= {m for expr in annotation_exprs for m in METRIC_NAME.findall(expr)}
    assert used - exported == set()
    assert "guardd_rule_kill_usage_ratio" in used


def test_dashboard_scrape_panel_when_the_guard_is_down_then_0_for_its_account(
    tmp_path: Path,
) -> None:
    promtool = tool("promtool", "prometheus")
    [expr] = [expr for _, expr in panel_exprs(dashboard()) if "up{" in expr]
    rules = tmp_path / "scrape_panel.yml"
    rules.write_text(
        json.dumps(
            {"groups": [{"name": "d", "rules": [{"record": "panel", "expr": plain_promql(expr)}]}]}
        )
    )
    target = 'job="guardd", instance="g:8787"'
    down_for_20m = {
        "interval": "1m",
        "input_series": [
            {"series": f"up{{{target}}}", "values": "1 1 0x30"},
            # a guard that is down exports nothing: its series end when it stops
            {
                "series": f'guardd_build_info{{{target}, account="DU1", version="t"}}',
                "values": "1 1",
            },
        ],
        "promql_expr_test": [
            {
                "expr": "panel",
                "eval_time": "20m",
                "exp_samples": [{"labels": f'panel{{{target}, account="DU1"}}', "value": 0}],
            }
        ],
    }
    test_file = tmp_path / "scrape_panel_test.yml"
    test_file.write_text(json.dumps({"rule_files": [rules.name], "tests": [down_for_20m]}))

    result = run(promtool, "test", "rules", test_file.name, cwd=tmp_path)

    assert result.returncode == 0, result.stdout + result.stderr


# ---------------------------------------------------------------------------------- end to end


@pytest.mark.slow
@pytest.mark.integration
async def test_real_prometheus_scrapes_a_halted_guard_then_guardd_halted_fires(
    tmp_path: Path,
) -> None:
    binary = tool("prometheus", "prometheus")
    registry = CollectorRegistry()
    metrics = Metrics(registry, account="DU1", version="test")
    metrics.set_ib_connected(True)
    metrics.set_state("HALTED")
    web_port = free_port()

    async with MetricsServer(registry, "127.0.0.1", 0) as server:
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(ALERTS)],
            "scrape_configs": [
                {
                    "job_name": "guardd",
                    "static_configs": [{"targets": [f"127.0.0.1:{server.port}"]}],
                }
            ],
        }
        (tmp_path / "prometheus.yml").write_text(json.dumps(config))
        process = await asyncio.create_subprocess_exec(
            binary,
            f"--config.file={tmp_path / 'prometheus.yml'}",
            f"--storage.tsdb.path={tmp_path / 'data'}",
            f"--web.listen-address=127.0.0.1:{web_port}",
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )
        try:
            async with aiohttp.ClientSession() as session:
                firing = await eventually(
                    lambda: firing_alert(session, f"http://127.0.0.1:{web_port}", "GuarddHalted"),
                    "GuarddHalted firing",
                    timeout_s=30,
                    interval_s=0.25,
                )
        finally:
            process.terminate()
            _, stderr = await process.communicate()
            print("prometheus:", stderr.decode()[-2000:])  # shown when the test fails

    assert firing["labels"]["account"] == "DU1"
    assert firing["labels"]["job"] == "guardd"
