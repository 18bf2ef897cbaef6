"""The worker's Prometheus metrics, all registered on an injected registry.

Names are a contract with dashboards and alert rules (deploy/grafana, deploy/prometheus).
"""

from __future__ import annotations

import collections
import math
import platform
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    PlatformCollector,
    ProcessCollector,
)

from runtime.version import package_version

# The anomaly_score histogram's bounds until a model is loaded, and for a model that brings none
# (a test's fake scorer): 0.001 to about 128. A loaded artifact's come from its held-out scores
# (detector.thresholds.score_buckets), negative values of combined scores included.
SCORE_BUCKETS = tuple(round(0.001 * 1.5**i, 6) for i in range(30))
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)
DURATION_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)


class DetectionWindow:
    """flagged / scored over the last `seconds`, from per-batch counts."""

    def __init__(self, seconds: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.seconds = seconds
        self.clock = clock
        self._batches: collections.deque[tuple[float, int, int]] = collections.deque()
        self._scored = 0
        self._flagged = 0

    def add(self, scored: int, flagged: int) -> float:
        """Record a batch; return the current rate (NaN before anything was scored)."""
        now = self.clock()
        self._batches.append((now, scored, flagged))
        self._scored += scored
        self._flagged += flagged
        while self._batches and self._batches[0][0] < now - self.seconds:
            _, s, f = self._batches.popleft()
            self._scored -= s
            self._flagged -= f
        return self._flagged / self._scored if self._scored else math.nan


CGROUP_LIMIT_FILES = (
    Path("/sys/fs/cgroup/memory.max"),  # cgroup v2 (the container's own, as mounted in it)
    Path("/sys/fs/cgroup/memory/memory.limit_in_bytes"),  # cgroup v1
)
UNLIMITED_V1 = 1 << 60  # v1 reports "no limit" as a page-rounded 2**63 - 1


def cgroup_memory_limit(files: Iterable[Path] = CGROUP_LIMIT_FILES) -> float:
    """The memory limit of this process's container in bytes, NaN when there is none."""
    for path in files:
        try:
            text = path.read_text().strip()
        except OSError:
            continue
        if text == "max" or not text.isdigit() or int(text) >= UNLIMITED_V1:
            return math.nan
        return float(int(text))
    return math.nan


class WorkerMetrics:
    """Every metric the worker exports."""

    def __init__(self, registry: CollectorRegistry, with_process: bool = True) -> None:
        self.registry = registry
        r = registry
        self._scoring_pid: Callable[[], int | None] = lambda: None
        if with_process:
            ProcessCollector(registry=r)
            PlatformCollector(registry=r)
            # anomaly_scoring_process_{resident_memory_bytes,cpu_seconds_total,...}: the child the
            # worker scores in (worker.scoring_process), read at scrape time; none without one.
            ProcessCollector(namespace="anomaly_scoring", pid=lambda: str(self._scoring_pid()), registry=r)
        self.memory_limit = Gauge(
            "anomaly_memory_limit_bytes",
            "The container's memory limit (its cgroup's memory.max; NaN without one): the memory alert "
            "compares the worker's and its scoring process's resident memory with it.",
            registry=r,
        )
        self.memory_limit.set(cgroup_memory_limit())
        self.scored = Counter("anomaly_messages_scored", "Images scored.", registry=r)
        self.flagged = Counter("anomaly_messages_flagged", "Images flagged as anomalies.", registry=r)
        self.invalid = Counter(
            "anomaly_messages_invalid",
            "Entries dead-lettered, by reason code.",
            ["reason"],
            registry=r,
        )
        self.messages = Counter(
            "anomaly_messages",
            "Entries handled, by payload dtype and outcome (normal, flagged, dead_letter).",
            ["dtype", "outcome"],
            registry=r,
        )
        self.reclaimed = Counter(
            "anomaly_messages_reclaimed",
            "Entries reclaimed from idle consumers (XAUTOCLAIM).",
            registry=r,
        )
        self.redis_errors = Counter("anomaly_redis_errors", "Failed Redis operations.", registry=r)
        self.reloads = Counter(
            "anomaly_model_reloads", "Artifact reload attempts, by result.", ["result"], registry=r
        )
        self.detection_rate = Gauge(
            "anomaly_detection_rate", "Flagged / scored over the recent window.", registry=r
        )
        self.expected_detection_rate = Gauge(
            "anomaly_expected_detection_rate",
            "Flag rate of the threshold on held-out normal data (from the artifact).",
            registry=r,
        )
        self.threshold = Gauge("anomaly_threshold", "Score threshold in use.", registry=r)
        self.redis_up = Gauge("anomaly_redis_up", "1 when the last Redis operation succeeded.", registry=r)
        self.group_lag = Gauge(
            "anomaly_consumer_group_lag",
            "Entries of the shard's input stream not yet delivered to the group (Redis >= 7).",
            ["shard"],
            registry=r,
        )
        self.group_pending = Gauge(
            "anomaly_consumer_group_pending",
            "Entries of the shard's input stream delivered but not acknowledged.",
            ["shard"],
            registry=r,
        )
        self.output_trimmed_unread = Gauge(
            "anomaly_output_trimmed_unread",
            "Anomalies of the shard's output stream that OUTPUT_MAXLEN trimmed before this consumer "
            "group of it read them (while the group is behind the stream's first entry; 0 once it "
            "caught up, NaN on Redis < 7).",
            ["shard", "group"],
            registry=r,
        )
        self.fenced = Counter(
            "anomaly_messages_fenced",
            "Entries this worker scored but did not publish: at commit time another consumer owned "
            "them (it reclaimed them while this one was slow), so that one publishes.",
            registry=r,
        )
        self.unreplicated = Counter(
            "anomaly_commits_unreplicated",
            "Commits that WAIT_REPLICAS replicas did not confirm within WAIT_TIMEOUT_MS.",
            registry=r,
        )
        self.last_batch = Gauge(
            "anomaly_last_batch_timestamp_seconds",
            "Unix time the last batch was committed.",
            registry=r,
        )
        self.batch_size = Histogram(
            "anomaly_batch_size", "Entries per batch read.", buckets=BATCH_SIZE_BUCKETS, registry=r
        )
        self.batch_duration = Histogram(
            "anomaly_batch_duration_seconds",
            "Time to decode, score and commit one batch.",
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.score = self._score_histogram(SCORE_BUCKETS)
        self.latency = Histogram(
            "anomaly_end_to_end_latency_seconds",
            "From the input entry's id timestamp to its result being committed.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.model = Info("anomaly_model", "Model version and threshold in use.", registry=r)
        self.score_drift = Gauge(
            "anomaly_score_drift",
            "Population stability index of the most recent DRIFT_WINDOW_SCORES scores against the "
            "artifact's held-out normal scores (NaN until that many were scored).",
            registry=r,
        )
        self.score_drift.set(math.nan)
        self.shadow_scored = Counter(
            "anomaly_shadow_messages_scored", "Images scored by the shadow (candidate) model.", registry=r
        )
        self.shadow_flagged = Counter(
            "anomaly_shadow_messages_flagged",
            "Images the shadow model would have flagged (nothing of it is published).",
            registry=r,
        )
        self.shadow_agreement = Gauge(
            "anomaly_shadow_agreement_ratio",
            "Share of images on which the shadow model's decision equals the served model's, over "
            "the last DETECTION_WINDOW_SECONDS (NaN before any).",
            registry=r,
        )
        self.shadow_agreement.set(math.nan)
        self.scoring_process_failures = Counter(
            "anomaly_scoring_process_failures",
            "Scoring process deaths, hangs and failed starts; the batches in hand were read again "
            "(after 3 in a row the worker scores on its thread).",
            registry=r,
        )
        self.unscored_batches = Counter(
            "anomaly_batches_unscored",
            "Batches the model could not score at all (every image raised, or none scored finitely): "
            "nothing was committed, their entries are read again one at a time until MAX_DELIVERIES.",
            registry=r,
        )
        self.shadow_errors = Counter(
            "anomaly_shadow_errors",
            "Batches the shadow model failed to score; the served model's results were committed "
            "without the shadow's.",
            registry=r,
        )
        self.shadow_model = Info(
            "anomaly_shadow_model", "Shadow model version and threshold (empty: no shadow).", registry=r
        )
        self.build = Info("anomaly_build", "The running program's package and Python versions.", registry=r)
        self.build.info({"version": package_version(), "python": platform.python_version()})
        self.window: DetectionWindow | None = None

    def _score_histogram(self, buckets: tuple[float, ...]) -> Histogram:
        return Histogram(
            "anomaly_score",
            "Score of every scored image (the artifact's score; buckets from its held-out normal scores).",
            buckets=buckets,
            registry=self.registry,
        )

    def set_model(
        self,
        model_version: str,
        policy: str,
        threshold: float,
        expected_rate: float,
        engine: str = "",
        score_buckets: tuple[float, ...] | None = None,
    ) -> None:
        """Publish the model in use; its score buckets replace the histogram's when they differ."""
        self.model.info(model_labels(model_version, policy, threshold, engine))
        self.threshold.set(threshold)
        self.expected_detection_rate.set(expected_rate)
        if score_buckets and tuple(score_buckets) != self.score_buckets:
            # Prometheus sees the old `le` series stop and the new ones start from 0: rate() and
            # the heatmap follow the new model after one scrape interval.
            self.registry.unregister(self.score)
            self.score = self._score_histogram(tuple(score_buckets))

    @property
    def score_buckets(self) -> tuple[float, ...]:
        """The anomaly_score histogram's finite upper bounds."""
        return tuple(float(b) for b in self.score._upper_bounds[:-1])

    def set_shadow_model(self, model_version: str, policy: str, threshold: float, engine: str) -> None:
        """Publish the shadow model in use."""
        self.shadow_model.info(model_labels(model_version, policy, threshold, engine))

    def watch_scoring_process(self, pid: Callable[[], int | None]) -> None:
        """Export the process metrics of the scoring process whose pid `pid()` gives (None: none)."""
        self._scoring_pid = pid

    def observe_scores(self, scores: Iterable[float] | np.ndarray) -> None:
        """Add scores to the histogram (one call per batch)."""
        observe_many(self.score, scores)

    def observe_latencies(self, seconds: Iterable[float] | np.ndarray) -> None:
        """Add end-to-end latencies to the histogram (one call per batch)."""
        observe_many(self.latency, seconds)


def model_labels(model_version: str, policy: str, threshold: float, engine: str) -> dict[str, str]:
    """The labels of anomaly_model_info and anomaly_shadow_model_info."""
    return {
        "model_version": model_version,
        "threshold_policy": policy,
        "threshold": f"{threshold:.6g}",
        "engine": engine,
    }


def observe_many(histogram: Histogram, values: Iterable[float] | np.ndarray) -> None:
    """Same result as `histogram.observe(v)` for each value, with one increment per bucket.

    Per-value observe() took a lock twice per message and was the worker's largest Python cost
    after Redis and TensorFlow. prometheus-client has no batch observe, so this increments the
    same bucket and sum values observe() does; tests/unit/test_metrics_batch.py checks that the
    exposition matches per-value observe().
    """
    array = np.fromiter(values, np.float64) if not isinstance(values, np.ndarray) else values
    array = np.asarray(array, np.float64).ravel()
    histogram._raise_if_not_observable()
    if not array.size:
        return
    bounds = histogram._upper_bounds
    # observe() counts v in the first bucket with v <= bound; NaN lands past the end (in none).
    counts = np.bincount(np.searchsorted(bounds, array, side="left"), minlength=len(bounds) + 1)
    for bucket, count in zip(histogram._buckets, counts[: len(bounds)].tolist(), strict=True):
        if count:
            bucket.inc(count)
    histogram._sum.inc(float(array.sum()))
