"""deploy/k8s/keda_scaledobject.py: the committed ScaledObject is its output, one trigger pair per shard,
lagCount derived from the measured rate and the drain goal."""

from __future__ import annotations

import subprocess
import sys

import yaml

from .conftest import K8S
from .conftest import keda_generator as generator


def test_committed_scaled_object_is_the_generators_output() -> None:
    done = subprocess.run(
        [sys.executable, str(K8S / "keda_scaledobject.py")], capture_output=True, text=True, check=True
    )
    assert (K8S / "keda-scaledobject.yaml").read_text() == done.stdout


def test_one_lag_and_one_pending_trigger_per_shard_with_the_shard_streams() -> None:
    doc = yaml.safe_load(generator().scaled_object(shards=6, cluster=True, rate=60_000, drain_seconds=10))
    triggers = doc["spec"]["triggers"]
    assert len(triggers) == 12 and {t["type"] for t in triggers} == {"redis-cluster-streams"}
    lag = [t for t in triggers if "lagCount" in t["metadata"]]
    assert [t["metadata"]["stream"] for t in lag] == [f"images:{{{i}}}" for i in range(6)]
    assert {t["metadata"]["lagCount"] for t in lag} == {"100000"}  # 60k msg/s x 10 s / 6 shards
    assert len({t["name"] for t in triggers}) == 12
    assert {t["authenticationRef"]["name"] for t in triggers} == {generator().AUTHENTICATION}


def test_lag_count_follows_rate_drain_goal_and_shards() -> None:
    lag_count = generator().lag_count
    assert lag_count(60_000, 10, 1) == 600_000
    assert lag_count(5_000, 10, 4) == 12_500  # mse+transforms+knn: 12x fewer entries per replica
