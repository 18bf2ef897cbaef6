"""A real Prometheus (Debian's package) scrapes a live worker on localhost.

PromQL through Prometheus' HTTP API sees the counts the worker reports, every rule of
deploy/prometheus/rules.yml evaluates without error on real series, and the detection-rate drift
alert stays quiet on normal digits and fires on mostly rotated ones.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis
import yaml

from producer.client import ImageProducer
from tests.conftest import ROOT, RedisServer, free_port, wait_until
from tests.support import metric_sum, metrics_text, start_worker

from .conftest import PROMETHEUS, WORKER_JOB, alerting_rules, load_yaml, require_tool

# Training the artifact (a fixture) and the test share one timeout: both together take about 3 min.
pytestmark = [pytest.mark.deploy, pytest.mark.slow, pytest.mark.e2e, pytest.mark.timeout(600)]

ENV = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONUNBUFFERED="1")
PROMETHEUS_HINT = "apt-get install prometheus (.ci/run installs Debian's package)"
DRIFT_ALERT = "AnomalyDetectionRateAboveBaseline"
SCORE_DRIFT_ALERT = "AnomalyScoreDrift"
DRIFT_WINDOW_SCORES = 500  # the worker's PSI window: a number (not NaN) after the normal phase
# The rules' `for:` durations (2-15 minutes) are replaced by this in the copy Prometheus loads, so
# an alert goes pending -> firing within seconds. The expressions and their [10m] windows are kept:
# on a worker younger than the window, rate() and increase() cover its whole life.
SHORT_FOR = "3s"
INPUT, OUTPUT, DEAD_LETTER = "prom-live:images", "prom-live:anomalies", "prom-live:dead-letter"
NORMAL_COUNT = 1000  # above the drift alert's ">= 500 scored in 10 m" guard, so the guard is active
MALFORMED = [
    {"image": b"\x01" * 10, "id": "bad-length"},
    {"image": b"[1,2", "dtype": "json", "id": "bad-json"},
    {"id": "no-image"},
]


# ---------------------------------------------------------------- helpers


def http_status(url: str) -> int:
    """The HTTP status of a GET, 0 when nothing answers."""
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return int(response.status)
    except OSError as exc:
        return int(getattr(exc, "code", 0) or 0)


def parse_rfc3339(text: str) -> float:
    """Unix time of Prometheus' RFC 3339 timestamps (nanoseconds cut to what Python parses)."""
    head, _, fraction = text.rstrip("Z").partition(".")
    micros = (fraction + "000000")[:6]
    return datetime.fromisoformat(f"{head}.{micros}+00:00").timestamp()


@dataclass
class PrometheusServer:
    """A prometheus process the test owns, and its HTTP API."""

    port: int
    process: subprocess.Popen[bytes]
    log: Path

    def api(self, path: str, **params: str) -> Any:
        """GET /api/v1/<path>; the `data` of a successful answer."""
        query = f"?{urllib.parse.urlencode(params)}" if params else ""
        url = f"http://127.0.0.1:{self.port}/api/v1/{path}{query}"
        with urllib.request.urlopen(url, timeout=10) as response:
            body = json.load(response)
        assert body["status"] == "success", body
        return body["data"]

    def value(self, promql: str) -> float | None:
        """The single value of an instant query, None when it returns no series."""
        data = self.api("query", query=promql)
        assert data["resultType"] == "vector", data
        assert len(data["result"]) <= 1, f"{promql} returned several series: {data['result']}"
        return float(data["result"][0]["value"][1]) if data["result"] else None

    def alerts(self, name: str) -> list[dict[str, Any]]:
        """Pending and firing instances of one alert."""
        return [a for a in self.api("alerts")["alerts"] if a["labels"]["alertname"] == name]

    def alerting_rules(self) -> dict[str, dict[str, Any]]:
        """Alert name -> its rule as /api/v1/rules reports it (state, health, lastEvaluation)."""
        groups = self.api("rules", type="alert")["groups"]
        return {rule["name"]: rule for group in groups for rule in group["rules"]}


def rules_with_short_for(target: Path) -> list[str]:
    """Write deploy/prometheus/rules.yml with every `for:` set to SHORT_FOR; return the alert names."""
    rules = load_yaml(PROMETHEUS / "rules.yml")
    names = []
    for group in rules["groups"]:
        for rule in group["rules"]:
            if "alert" in rule:
                names.append(rule["alert"])
                if "for" in rule:
                    rule["for"] = SHORT_FOR
    target.write_text(yaml.safe_dump(rules, sort_keys=False), encoding="utf-8")
    return names


def scrape_config(worker_port: int, rule_file: Path) -> dict[str, Any]:
    """deploy/prometheus/prometheus.yml's worker job, pointed at one worker on localhost, 1 s cadence."""
    shipped = load_yaml(PROMETHEUS / "prometheus.yml")
    (job,) = [job for job in shipped["scrape_configs"] if job["job_name"] == WORKER_JOB]
    job.pop("dns_sd_configs", None)  # compose's DNS discovery; here the one worker we started
    job["static_configs"] = [{"targets": [f"127.0.0.1:{worker_port}"]}]
    return {
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(rule_file)],
        "scrape_configs": [job],
    }


def push_mix(producer_client: redis.Redis, normal: np.ndarray, rotated: np.ndarray, tag: str) -> int:
    """Push normal and rotated digits (uint8, ids say which); return how many."""
    producer = ImageProducer(producer_client, INPUT)
    producer.push_many(normal, [f"{tag}-normal-{i}" for i in range(len(normal))])
    producer.push_many(rotated, [f"{tag}-rotated-{i}" for i in range(len(rotated))])
    return len(normal) + len(rotated)


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def prometheus_binary() -> str:
    """Debian's prometheus; checked before anything slow runs, the only reason to skip."""
    return require_tool("prometheus", PROMETHEUS_HINT)


@pytest.fixture(scope="module")
def trained_artifact(prometheus_binary: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An artifact trained with the CLI as a user would (p99 threshold: about 1% flagged)."""
    out = tmp_path_factory.mktemp("prom-live") / "artifact"
    args = ["--dataset", "mnist", "--out", str(out), "--epochs", "4", "--max-samples", "8000", "--seed", "3"]
    # Batch size 32 rather than the default 256: 8x the steps in about the same time. With 256 the
    # 4-epoch model barely learns (held-out MSE 0.06) and flags only ~8% of rotated digits at p99,
    # so 80% rotated traffic would hover at the alert's 6% bar; with 32 it flags ~30%.
    args += ["--batch-size", "32", "--threshold", "p99"]
    done = subprocess.run(
        [sys.executable, "-m", "trainer", "train", *args],
        env=ENV,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    return out


@pytest.fixture
def worker_port(trained_artifact: Path, redis_server: RedisServer, tmp_path: Path) -> Iterator[int]:
    """A `python -m worker` subprocess on its own streams; yields its metrics port once ready."""
    client = redis_server.client()
    client.delete(INPUT, OUTPUT, DEAD_LETTER)  # also drops the group: the worker creates it anew
    port = free_port()
    env = dict(
        ANOMALY_REDIS_URL=redis_server.url,
        ANOMALY_ARTIFACT=str(trained_artifact),
        ANOMALY_INPUT_STREAM=INPUT,
        ANOMALY_OUTPUT_STREAM=OUTPUT,
        ANOMALY_DEAD_LETTER_STREAM=DEAD_LETTER,
        ANOMALY_METRICS_HOST="127.0.0.1",
        ANOMALY_METRICS_PORT=str(port),
        ANOMALY_BATCH_SIZE="128",
        ANOMALY_BLOCK_MS="200",
        # Short windows so the detection-rate, lag and pending gauges follow the traffic quickly.
        ANOMALY_DETECTION_WINDOW_SECONDS="5",
        ANOMALY_LAG_SAMPLE_SECONDS="1",
        ANOMALY_DRIFT_WINDOW_SCORES=str(DRIFT_WINDOW_SCORES),
    )
    log = tmp_path / "worker.log"
    process = start_worker(env, log)
    try:
        yield port
        assert process.poll() is None, f"the worker died during the test:\n{log.read_text()}"
    finally:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(10)
        client.delete(INPUT, OUTPUT, DEAD_LETTER)
        client.close()


@pytest.fixture
def prometheus(prometheus_binary: str, worker_port: int, tmp_path: Path) -> Iterator[PrometheusServer]:
    """Our own prometheus process (not the system service): 1 s scrapes of the worker, rules loaded."""
    rule_file = tmp_path / "rules.yml"
    rules_with_short_for(rule_file)
    config = tmp_path / "prometheus.yml"
    config.write_text(yaml.safe_dump(scrape_config(worker_port, rule_file), sort_keys=False))
    port = free_port()
    log = tmp_path / "prometheus.log"
    with log.open("w") as log_file:
        process = subprocess.Popen(
            [
                prometheus_binary,
                f"--config.file={config}",
                f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{port}",
            ],
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
    server = PrometheusServer(port, process, log)
    try:
        wait_until(
            lambda: http_status(f"http://127.0.0.1:{port}/-/ready") == 200 or process.poll() is not None,
            60,
            0.2,
            what="prometheus /-/ready",
        )
        assert process.poll() is None, log.read_text()
        yield server
    finally:
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)


# ---------------------------------------------------------------- the test


def test_prometheus_sees_the_worker_counts_and_fires_the_drift_alert_only_on_rotated_digits(
    prometheus: PrometheusServer, worker_port: int, redis_server: RedisServer, trained_artifact: Path
) -> None:
    from detector.datasets import load_dataset, rotate90

    job = f'job="{WORKER_JOB}"'
    client = redis_server.client()
    test_x = load_dataset("mnist").test.x
    rng = np.random.default_rng(7)

    # Scraped before any traffic, so rate() and increase() start from the counters' zero.
    wait_until(lambda: prometheus.value(f"up{{{job}}}") == 1, 60, 0.5, what="Prometheus scraping the worker")
    baseline = json.loads((trained_artifact / "baseline.json").read_text())
    expected_rate = baseline["threshold"]["expected_flag_rate"]
    assert prometheus.value(f"anomaly_expected_detection_rate{{{job}}}") == pytest.approx(expected_rate)

    # ---- normal phase: counts through PromQL match the worker's /metrics and the streams.
    normal = test_x[rng.choice(len(test_x), NORMAL_COUNT, replace=False)]
    push_mix(client, normal, normal[:0], "phase1")
    for fields in MALFORMED:
        client.xadd(INPUT, fields)  # type: ignore[arg-type]

    wait_until(
        lambda: (
            prometheus.value(f"sum(anomaly_messages_scored_total{{{job}}})") == NORMAL_COUNT
            and prometheus.value(f"sum(anomaly_messages_invalid_total{{{job}}})") == len(MALFORMED)
        ),
        90,
        0.5,
        what=f"Prometheus to see {NORMAL_COUNT} scored and {len(MALFORMED)} invalid",
    )
    seen_at = time.time()
    text = metrics_text(worker_port)
    assert metric_sum(text, "anomaly_messages_scored_total") == NORMAL_COUNT
    assert metric_sum(text, "anomaly_messages_invalid_total") == len(MALFORMED)
    flagged = metric_sum(text, "anomaly_messages_flagged_total")
    assert flagged == client.xlen(OUTPUT)  # the counter counts exactly what was published
    assert client.xlen(DEAD_LETTER) == len(MALFORMED)
    assert flagged / NORMAL_COUNT < 0.05, f"{flagged} of {NORMAL_COUNT} normal digits flagged"
    # Traffic has stopped, so the worker's flagged count is final; the next scrape brings it over.
    wait_until(
        lambda: prometheus.value(f"sum(anomaly_messages_flagged_total{{{job}}})") == flagged,
        30,
        0.5,
        what=f"Prometheus to see {flagged} flagged",
    )
    by_outcome = prometheus.api("query", query=f"sum by (outcome) (anomaly_messages_total{{{job}}})")
    outcomes = {r["metric"]["outcome"]: float(r["value"][1]) for r in by_outcome["result"]}
    assert outcomes.get("flagged", 0) == flagged
    assert outcomes.get("normal", 0) == NORMAL_COUNT - flagged
    assert outcomes.get("dead_letter", 0) == len(MALFORMED)
    # The sampled gauges reach Prometheus too: everything delivered and acknowledged.
    wait_until(
        lambda: (
            prometheus.value(f"anomaly_consumer_group_lag{{{job}}}") == 0
            and prometheus.value(f"anomaly_consumer_group_pending{{{job}}}") == 0
        ),
        30,
        0.5,
        what="lag and pending at 0 in Prometheus",
    )

    # Every rule has been evaluated on these series since, without error; the drift alert is quiet
    # although its volume guard holds, so it is the rate, not the guard, that keeps it quiet.
    wait_until(
        lambda: all(
            parse_rfc3339(rule["lastEvaluation"]) > seen_at + 1
            for rule in prometheus.alerting_rules().values()
        ),
        30,
        0.5,
        what="a rule evaluation after the normal traffic",
    )
    rules = prometheus.alerting_rules()
    assert set(rules) == {rule["alert"] for rule in alerting_rules()}
    unhealthy = {name: rule.get("lastError") for name, rule in rules.items() if rule["health"] != "ok"}
    assert not unhealthy, unhealthy
    volume = prometheus.value(f"sum by (job) (increase(anomaly_messages_scored_total{{{job}}}[10m]))")
    assert volume is not None and volume >= 500
    assert rules[DRIFT_ALERT]["state"] == "inactive"
    assert prometheus.alerts(DRIFT_ALERT) == []
    assert prometheus.value(rules[DRIFT_ALERT]["query"]) is None
    # The score distribution of normal digits matches the baseline: low PSI, its alert quiet.
    psi = prometheus.value(f"anomaly_score_drift{{{job}}}")
    assert psi is not None and psi < 0.1, f"PSI on normal digits is {psi}"
    assert rules[SCORE_DRIFT_ALERT]["state"] == "inactive"

    # ---- drift phase: mostly rotated digits, pushed continuously until both alerts fire.
    def firing(name: str) -> list[dict[str, Any]]:
        return [a for a in prometheus.alerts(name) if a["state"] == "firing"]

    def pushed_chunk_then_both_fired() -> list[dict[str, Any]]:
        idx = rng.choice(len(test_x), 100, replace=False)
        push_mix(client, test_x[idx[:20]], rotate90(test_x[idx[20:]]), f"drift-{time.monotonic_ns()}")
        rate_alert, score_alert = firing(DRIFT_ALERT), firing(SCORE_DRIFT_ALERT)
        return rate_alert if rate_alert and score_alert else []

    try:
        fired = wait_until(
            pushed_chunk_then_both_fired, 120, 0.5, what=f"{DRIFT_ALERT} and {SCORE_DRIFT_ALERT} firing"
        )
    except AssertionError as exc:
        observed = prometheus.value(
            f"sum(rate(anomaly_messages_flagged_total{{{job}}}[10m]))"
            f" / sum(rate(anomaly_messages_scored_total{{{job}}}[10m]))"
        )
        rotated_flagged = sum(b"-rotated-" in f[b"id"] for _, f in client.xrange(OUTPUT))
        psi = prometheus.value(f"anomaly_score_drift{{{job}}}")
        raise AssertionError(
            f"{exc}: flagged/scored over 10m is {observed} (expected rate {expected_rate}); "
            f"{rotated_flagged} rotated digits flagged in all; PSI {psi}"
        ) from exc
    (alert,) = fired
    (score_alert,) = firing(SCORE_DRIFT_ALERT)
    assert score_alert["labels"] == {
        "alertname": SCORE_DRIFT_ALERT,
        "namespace": "compose",  # prometheus.yml's static namespace, kept by the rule's aggregation
        "job": WORKER_JOB,
        "severity": "warning",
    }
    assert float(score_alert["value"]) > 0.25
    assert alert["labels"]["job"] == WORKER_JOB and alert["labels"]["namespace"] == "compose"
    assert alert["labels"]["severity"] == "warning"
    # The alert's value is the excess of the observed rate over the expected one.
    assert float(alert["value"]) > max(3 * expected_rate, 0.05)
    assert "above the baseline" in alert["annotations"]["summary"]
    # The worker's own short-window gauge shows the drift as well.
    recent = prometheus.value(f"max_over_time(anomaly_detection_rate{{{job}}}[30s])")
    assert recent is not None and recent > 0.05 + expected_rate
