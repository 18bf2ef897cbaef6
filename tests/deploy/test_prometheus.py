"""deploy/prometheus/: config and rules pass promtool, every alert is unit-tested both ways,
and every expression names only series the worker exports."""

from __future__ import annotations

import re

import pytest

from .conftest import (
    PROMETHEUS,
    WORKER_JOB,
    alerting_rules,
    groupings_that_drop,
    load_yaml,
    promql_groupings,
    promql_metric_names,
    recording_rule_names,
    require_tool,
    run,
)

PROMTOOL_HINT = "apt-get install prometheus (Debian ships promtool in it)"


@pytest.mark.deploy
def test_promtool_accepts_the_alert_rules() -> None:
    promtool = require_tool("promtool", PROMTOOL_HINT)
    result = run([promtool, "check", "rules", str(PROMETHEUS / "rules.yml")])
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.deploy
def test_promtool_accepts_the_scrape_config_and_finds_its_rule_files() -> None:
    promtool = require_tool("promtool", PROMTOOL_HINT)
    result = run([promtool, "check", "config", str(PROMETHEUS / "prometheus.yml")])
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.deploy
def test_alert_rule_unit_tests_pass() -> None:
    promtool = require_tool("promtool", PROMTOOL_HINT)
    result = run([promtool, "test", "rules", "rules_test.yml"], cwd=PROMETHEUS)
    assert result.returncode == 0, result.stdout + result.stderr


def _alert_cases() -> list[tuple[str, bool]]:
    """(alertname, fires) for every alert_rule_test case of rules_test.yml."""
    tests = load_yaml(PROMETHEUS / "rules_test.yml")
    return [
        (case["alertname"], bool(case.get("exp_alerts")))
        for test in tests["tests"]
        for case in test.get("alert_rule_test", [])
    ]


def test_every_alert_has_a_firing_and_a_quiet_unit_test() -> None:
    alerts = {rule["alert"] for rule in alerting_rules()}
    cases = _alert_cases()
    fired = {name for name, fires in cases if fires}
    quiet = {name for name, fires in cases if not fires}
    assert not alerts - fired, f"alerts never shown to fire: {sorted(alerts - fired)}"
    assert not alerts - quiet, f"alerts never shown to stay quiet: {sorted(alerts - quiet)}"
    unknown = {name for name, _ in cases} - alerts
    assert not unknown, f"tests for alerts that do not exist: {sorted(unknown)}"


def test_the_alerts_the_issue_asks_for_exist() -> None:
    alerts = {rule["alert"] for rule in alerting_rules()}
    required = {
        "AnomalyWorkerDown",
        "AnomalyWorkersAbsent",
        "AnomalyConsumerLagGrowing",
        "AnomalyDeadLetterRateHigh",
        "AnomalyDetectionRateAboveBaseline",
        "AnomalyDetectionRateCollapsed",
        "AnomalyEndToEndLatencyHigh",
        "AnomalyModelReloadFailing",
        "AnomalyRedisErrors",
    }
    assert required <= alerts, f"missing: {sorted(required - alerts)}"


def test_every_alert_says_how_bad_and_what_happened() -> None:
    for rule in alerting_rules():
        assert rule["labels"]["severity"] in {"critical", "warning", "info"}, rule["alert"]
        assert rule["annotations"].get("summary"), rule["alert"]
        assert rule["annotations"].get("description"), rule["alert"]


def test_rules_name_only_metrics_the_worker_exports(exported_metric_names: set[str]) -> None:
    known = exported_metric_names | recording_rule_names()
    rules = load_yaml(PROMETHEUS / "rules.yml")
    for group in rules["groups"]:
        for rule in group["rules"]:
            unknown = promql_metric_names(rule["expr"]) - known
            assert not unknown, (
                f"{rule.get('alert') or rule.get('record')} uses unknown series {sorted(unknown)}"
            )


def test_rules_select_the_job_that_prometheus_scrapes() -> None:
    config = load_yaml(PROMETHEUS / "prometheus.yml")
    assert WORKER_JOB in [job["job_name"] for job in config["scrape_configs"]]
    for rule in alerting_rules():
        jobs = set(re.findall(r'job\s*=~?\s*"([^"]*)"', rule["expr"]))
        assert jobs == {WORKER_JOB}, f"{rule['alert']} selects job {jobs or 'none'}"


def test_rule_unit_tests_name_only_metrics_the_worker_exports(exported_metric_names: set[str]) -> None:
    """Input series in rules_test.yml use real names, so the tests exercise what workers send."""
    tests = load_yaml(PROMETHEUS / "rules_test.yml")
    for test in tests["tests"]:
        for series in test["input_series"]:
            name = series["series"].split("{", 1)[0]
            assert name in exported_metric_names, f"rules_test.yml feeds unknown series {name}"


def test_grouping_finder_sees_every_aggregation_and_vector_match() -> None:
    expr = (
        "sum by (namespace, job) (rate(a[5m])) > on (namespace, job) group_left (instance)"
        " max(b) and ignoring (pod) quantile without (instance) (0.5, c) unless count(d) by (job)"
        ' or on () absent(e{job="x", on="y"} == 1)'
    )
    assert promql_groupings(expr) == [
        ("sum", "by", ("namespace", "job")),
        (">", "on", ("namespace", "job")),
        ("max", "", ()),
        ("and", "ignoring", ("pod",)),
        ("quantile", "without", ("instance",)),
        ("count", "by", ("job",)),
        ("or", "on", ()),
    ]
    assert groupings_that_drop("namespace", expr) == ["max ()", "count by (job)"]


def test_every_aggregation_and_match_keeps_the_namespace() -> None:
    """Two deployments (namespaces) never merge: a healthy one cannot hide a broken one."""
    rules = load_yaml(PROMETHEUS / "rules.yml")
    for group in rules["groups"]:
        for rule in group["rules"]:
            dropped = groupings_that_drop("namespace", rule["expr"])
            assert not dropped, f"{rule.get('alert') or rule.get('record')} merges namespaces: {dropped}"


def test_compose_scrapes_give_the_workers_a_namespace() -> None:
    """The rules aggregate by namespace; compose has none of its own, so prometheus.yml sets one."""
    config = load_yaml(PROMETHEUS / "prometheus.yml")
    (job,) = [job for job in config["scrape_configs"] if job["job_name"] == WORKER_JOB]
    relabel = [r for r in job.get("relabel_configs", []) if r.get("target_label") == "namespace"]
    assert relabel == [{"target_label": "namespace", "replacement": "compose"}]
