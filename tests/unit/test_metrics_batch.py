"""Batch observation: a histogram fed a batch at once exports what per-value observe() exports."""

from __future__ import annotations

import math

import numpy as np
import pytest
from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.exposition import generate_latest

from worker.metrics import LATENCY_BUCKETS, SCORE_BUCKETS, WorkerMetrics, observe_many


def _exposition(registry: CollectorRegistry) -> list[str]:
    """Exposition lines without the _created timestamps (they differ between registries)."""
    return [line for line in generate_latest(registry).decode().splitlines() if "_created" not in line]


@pytest.mark.parametrize("buckets", [SCORE_BUCKETS, LATENCY_BUCKETS])
def test_batch_observe_exports_the_same_as_observing_each_value(buckets: tuple[float, ...]) -> None:
    rng = np.random.default_rng(3)
    # Values on the bucket bounds (le is inclusive), between them, below and above all of them.
    values = np.concatenate([np.asarray(buckets), rng.exponential(buckets[-1] / 4, 500), [0.0, 1e9]])
    one_by_one, batched = CollectorRegistry(), CollectorRegistry()
    each = Histogram("h", "doc", buckets=buckets, registry=one_by_one)
    for v in values.tolist():
        each.observe(v)
    observe_many(Histogram("h", "doc", buckets=buckets, registry=batched), values)
    # Every bucket and the count exactly; the sum up to summation order.
    assert [x for x in _exposition(batched) if "_sum" not in x] == [
        x for x in _exposition(one_by_one) if "_sum" not in x
    ]
    assert batched.get_sample_value("h_sum") == pytest.approx(one_by_one.get_sample_value("h_sum"))


def test_batch_observe_of_nothing_changes_nothing() -> None:
    registry = CollectorRegistry()
    observe_many(Histogram("h", "doc", registry=registry), np.empty(0))
    assert registry.get_sample_value("h_count") == 0.0


def test_a_nan_score_is_counted_in_no_bucket_like_observe_does() -> None:
    registry = CollectorRegistry()
    observe_many(Histogram("h", "doc", registry=registry), [0.1, math.nan])
    assert registry.get_sample_value("h_count") == 1.0
    assert math.isnan(registry.get_sample_value("h_sum") or 0.0)


def test_worker_metrics_take_scores_and_latencies_as_arrays_or_lists() -> None:
    registry = CollectorRegistry()
    metrics = WorkerMetrics(registry, with_process=False)
    metrics.observe_scores(np.array([0.002, 0.5]))
    metrics.observe_scores([0.01])
    metrics.observe_latencies(np.array([0.0005, 0.003, 0.02]))
    assert registry.get_sample_value("anomaly_score_count") == 3.0
    assert registry.get_sample_value("anomaly_score_sum") == pytest.approx(0.512)
    assert registry.get_sample_value("anomaly_end_to_end_latency_seconds_bucket", {"le": "0.005"}) == 2.0
    assert registry.get_sample_value("anomaly_end_to_end_latency_seconds_count") == 3.0
