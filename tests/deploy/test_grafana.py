"""deploy/grafana/: the dashboard shows what operators need, with metrics the worker really exports."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from .conftest import (
    DASHBOARD,
    GRAFANA,
    WORKER_JOB,
    dashboard_panels,
    dashboard_queries,
    generated_configmaps,
    groupings_that_drop,
    load_yaml,
    promql_groupings,
    promql_metric_names,
    recording_rule_names,
    require_tool,
    run,
)


def test_promql_name_extractor_ignores_functions_labels_and_keywords() -> None:
    expr = (
        'histogram_quantile(0.99, sum by (job, le) (rate(a_bucket{job="x", le=~"1e-3|+Inf"}[5m])))'
        " > on (job) group_left (instance) clamp_min(3 * avg without (pod) (b_gauge offset 1h), 5e-2)"
        " and ignoring (reason) c_total unless sum(d_total) by (outcome) or time() - e:recorded"
    )
    assert promql_metric_names(expr) == {"a_bucket", "b_gauge", "c_total", "d_total", "e:recorded"}


def test_dashboard_queries_name_only_metrics_the_worker_exports(
    dashboard: dict[str, Any], exported_metric_names: set[str]
) -> None:
    known = exported_metric_names | recording_rule_names()
    queries = dashboard_queries(dashboard)
    assert len(queries) > 10
    for where, expr in queries:
        names = promql_metric_names(expr)
        assert names, f"{where}: no metric in {expr!r}"
        assert not names - known, f"{where} uses unknown series {sorted(names - known)}"


@pytest.mark.deploy
def test_dashboard_queries_are_valid_promql(dashboard: dict[str, Any], tmp_path: Path) -> None:
    """promtool parses every query, wrapped as recording rules (Grafana variables substituted)."""
    promtool = require_tool("promtool", "apt-get install prometheus")
    rules = [
        {"record": f"dashboard:query_{i}", "expr": expr}
        for i, (_, expr) in enumerate(dashboard_queries(dashboard))
    ]
    rule_file = tmp_path / "dashboard_queries.yml"
    rule_file.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = run([promtool, "check", "rules", str(rule_file)])
    assert result.returncode == 0, result.stdout + result.stderr


def test_dashboard_queries_select_the_worker_job(dashboard: dict[str, Any]) -> None:
    for where, expr in dashboard_queries(dashboard):
        assert f'job="{WORKER_JOB}"' in expr, f"{where} does not select job={WORKER_JOB}: {expr}"


def _raw_queries(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    """(where, query) as Grafana holds them, variables unresolved."""
    queries = [
        (f"panel {panel.get('title')!r}", target["expr"])
        for panel in dashboard_panels(dashboard)
        for target in panel.get("targets", [])
        if target.get("expr")
    ]
    for variable in dashboard["templating"]["list"]:
        if variable.get("type") == "query":
            queries.append((f"variable {variable['name']!r}", variable["query"]["query"]))
    return queries


def test_namespace_variable_picks_one_deployment_and_every_query_filters_on_it(
    dashboard: dict[str, Any],
) -> None:
    variables = [v["name"] for v in dashboard["templating"]["list"]]
    assert variables.index("namespace") < variables.index("instance"), "the workers of the chosen namespace"
    namespace = next(v for v in dashboard["templating"]["list"] if v["name"] == "namespace")
    assert namespace["query"]["query"] == f'label_values(up{{job="{WORKER_JOB}"}}, namespace)'
    assert namespace["multi"] is False and namespace["includeAll"] is False, "one deployment at a time"
    for where, query in _raw_queries(dashboard):
        if where != "variable 'namespace'":
            assert 'namespace="$namespace"' in query, f"{where} does not filter on $namespace: {query}"


def test_dashboard_aggregations_keep_the_namespace(dashboard: dict[str, Any]) -> None:
    for where, expr in dashboard_queries(dashboard):
        dropped = groupings_that_drop("namespace", expr)
        assert not dropped, f"{where} merges namespaces: {dropped}"


def test_dashboard_shows_every_view_operators_need(dashboard: dict[str, Any]) -> None:
    used = set().union(*(promql_metric_names(expr) for _, expr in dashboard_queries(dashboard)))
    views = {
        "throughput": {"anomaly_messages_total", "anomaly_messages_scored_total"},
        "detection rate": {"anomaly_messages_flagged_total"},
        "expected detection rate": {"anomaly_expected_detection_rate"},
        "score heatmap": {"anomaly_score_bucket"},
        "threshold": {"anomaly_threshold"},
        "latency": {"anomaly_end_to_end_latency_seconds_bucket", "anomaly_batch_duration_seconds_bucket"},
        "lag and pending": {"anomaly_consumer_group_lag", "anomaly_consumer_group_pending"},
        "dead letters by reason": {"anomaly_messages_invalid_total"},
        "redis": {"anomaly_redis_up", "anomaly_redis_errors_total"},
        "reloads": {"anomaly_model_reloads_total"},
        "memory": {"process_resident_memory_bytes"},
        "workers up": {"up"},
        "score drift": {"anomaly_score_drift"},
        "shadow model": {
            "anomaly_shadow_agreement_ratio",
            "anomaly_shadow_messages_flagged_total",
            "anomaly_shadow_messages_scored_total",
        },
    }
    missing = {view: sorted(names - used) for view, names in views.items() if names - used}
    assert not missing, f"dashboard lacks: {missing}"


def test_score_heatmap_reads_the_score_histogram_buckets(dashboard: dict[str, Any]) -> None:
    heatmaps = [p for p in dashboard_panels(dashboard) if p["type"] == "heatmap"]
    assert heatmaps
    target = heatmaps[0]["targets"][0]
    assert "anomaly_score_bucket" in target["expr"]
    assert [labels for op, clause, labels in promql_groupings(target["expr"])] == [("namespace", "le")]
    assert target.get("format") == "heatmap"


def test_score_panels_show_negative_scores_of_combined_scores(dashboard: dict[str, Any]) -> None:
    """The default score is a sum of z-scores: an axis clamped at 0 would hide its median."""
    score_panels = [
        p
        for p in dashboard_panels(dashboard)
        if any("anomaly_score_bucket" in t.get("expr", "") for t in p.get("targets", []))
    ]
    assert score_panels
    for panel in score_panels:
        low = panel.get("fieldConfig", {}).get("defaults", {}).get("min")
        assert low is None or low < 0, f"panel {panel['title']!r} clamps scores at {low}"


def test_dashboard_repeats_a_row_per_worker(dashboard: dict[str, Any]) -> None:
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["instance"]["multi"] and variables["instance"]["includeAll"]
    rows = [p for p in dashboard["panels"] if p["type"] == "row" and p.get("repeat") == "instance"]
    assert len(rows) == 1, "one row repeated for each selected worker"
    index = dashboard["panels"].index(rows[0])
    inside = dashboard["panels"][index + 1 :] if not rows[0]["collapsed"] else rows[0]["panels"]
    assert inside, "the per-worker row is empty"
    for panel in inside:
        assert panel["type"] != "row", "the per-worker row must be the last one"
        for target in panel["targets"]:
            assert 'instance=~"$instance"' in target["expr"], f"{panel['title']} is not per worker"


def test_panels_have_unique_ids_and_use_the_datasource_variable(dashboard: dict[str, Any]) -> None:
    panels = list(dashboard_panels(dashboard))
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "duplicate panel ids"
    for panel in panels:
        assert panel["gridPos"]["x"] >= 0 and panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24, panel[
            "title"
        ]
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
            assert panel.get("description"), f"{panel['title']} has no description"


def test_provisioned_datasource_is_prometheus_and_the_default() -> None:
    datasources = [
        d
        for f in sorted((GRAFANA / "provisioning" / "datasources").glob("*.yaml"))
        for d in load_yaml(f)["datasources"]
    ]
    assert [d["type"] for d in datasources] == ["prometheus"]
    assert datasources[0]["isDefault"] is True


# kubectl apply (client-side) keeps the whole object in its last-applied-configuration annotation,
# and a Kubernetes object's annotations may hold 256 KiB in all.
LAST_APPLIED_LIMIT_BYTES = 262_144


def test_kustomize_ships_the_dashboard_as_a_configmap_for_grafanas_sidecar() -> None:
    (kustomization, configmap), *others = [
        (path, doc) for path, doc in generated_configmaps() if path.parent == GRAFANA
    ]
    assert not others
    assert configmap["metadata"]["labels"] == {"grafana_dashboard": "1"}
    (key,) = configmap["data"]
    assert key == "anomaly-scorer.json", "a key the sidecar's shared folder cannot confuse with another's"
    assert configmap["data"][key] == DASHBOARD.read_text(encoding="utf-8"), "the file itself, not a copy"
    (generator,) = load_yaml(kustomization)["configMapGenerator"]
    assert generator["options"]["disableNameSuffixHash"] is True, "one stable name, replaced on change"


def test_dashboard_fits_a_client_side_kubectl_apply() -> None:
    size = len(DASHBOARD.read_bytes())
    assert size < LAST_APPLIED_LIMIT_BYTES // 2, (
        f"dashboard.json has {size} bytes; kubectl apply stores it again in an annotation limited to "
        f"{LAST_APPLIED_LIMIT_BYTES} bytes (use server-side apply, or split the dashboard)"
    )
