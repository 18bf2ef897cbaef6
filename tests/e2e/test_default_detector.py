"""The default detector and the reference notebooks' presets, trained by the CLI and served by a worker."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from detector.artifact import load_artifact
from detector.datasets import load_dataset, rotate90
from producer.client import ImageProducer
from tests.conftest import ROOT, RedisServer, free_port, wait_until
from tests.e2e.test_end_to_end import ENV
from tests.support import metrics_text, start_worker

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def train(out: Path, *flags: str) -> None:
    """`anomaly-trainer train` as a user runs it, with `flags` and a short run."""
    done = subprocess.run(
        [sys.executable, "-m", "trainer", "train", "--out", str(out), "--no-report", *flags],
        env=ENV,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr


def serve(
    artifact: Path, redis_server: RedisServer, log: Path, images: dict[str, np.ndarray]
) -> tuple[dict[str, float], set[str], str]:
    """Serve `artifact` with a real worker; push `images` by id prefix; return the scores by id,
    the flagged ids and the worker's /metrics text once every image is scored."""
    redis_server.client().flushdb()
    port = free_port()
    env = dict(
        ANOMALY_REDIS_URL=redis_server.url,
        ANOMALY_ARTIFACT=str(artifact),
        ANOMALY_METRICS_PORT=str(port),
        ANOMALY_METRICS_HOST="127.0.0.1",
        ANOMALY_SCORES_STREAM="scores",
    )
    process = start_worker(env, log, ready_timeout=90)
    try:
        client = redis_server.client()
        producer = ImageProducer(client, "images")
        total = 0
        for prefix, batch in images.items():
            producer.push_many(batch, [f"{prefix}-{i}" for i in range(len(batch))])
            total += len(batch)
        wait_until(lambda: client.xlen("scores") >= total, 60, what="every image scored")
        scores = {f[b"id"].decode(): float(f[b"score"]) for _, f in client.xrange("scores")}
        flagged = {f[b"id"].decode() for _, f in client.xrange("anomalies")}
        wait_until(
            lambda: f"anomaly_messages_scored_total {total}.0" in metrics_text(port), 30, what="metrics"
        )
        text = metrics_text(port)
        process.send_signal(signal.SIGTERM)
        assert process.wait(30) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)
    return scores, flagged, text


def test_the_default_detector_catches_rotated_digits_when_served(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    """No score, threshold or architecture flag: the CLI trains the default detector, and a worker
    serving it flags rotated digits and few normal ones, with histogram buckets that fit its score."""
    artifact = tmp_path / "default"
    train(artifact, "--epochs", "6", "--max-samples", "10000")
    baseline = load_artifact(artifact).baseline
    assert baseline.score == "mse+orientation+hidden-knn+hidden-mahalanobis"
    assert baseline.threshold.policy == "p99"
    test = load_dataset("mnist").test.x[:200]
    scores, flagged, text = serve(
        artifact, redis_server, tmp_path / "worker.log", {"normal": test, "rotated": rotate90(test)}
    )
    assert flagged == {pid for pid, s in scores.items() if s > baseline.threshold.value}
    normal = np.array([s for pid, s in scores.items() if pid.startswith("normal")])
    rotated = np.array([s for pid, s in scores.items() if pid.startswith("rotated")])
    assert np.mean(rotated[:, None] > normal[None, :]) > 0.97  # the AUROC
    assert np.mean(rotated > baseline.threshold.value) > 0.75  # 6 epochs on 10,000 digits; mse: 0.2
    assert np.mean(normal > baseline.threshold.value) < 0.06
    # The anomaly_score histogram's bounds are the artifact's, negative ones included.
    exported = [float(v) for v in re.findall(r'anomaly_score_bucket\{le="([^"+]+)"\}', text)]
    assert exported == baseline.score_buckets and min(exported) < 0


@pytest.mark.parametrize(
    ("preset", "architecture", "preprocessing", "policy"),
    [
        ("notebook-standardized", "dense-32", "standardize", "p95"),
        ("notebook-2mean", "dense-32", "unit", "2mean"),
        ("notebook-3std", "dense-64-16", "unit", "mean+3std"),
    ],
)
def test_each_reference_notebook_is_one_flag_away_and_served(
    preset: str, architecture: str, preprocessing: str, policy: str, redis_server: RedisServer, tmp_path: Path
) -> None:
    artifact = tmp_path / preset
    train(artifact, "--preset", preset, "--epochs", "1", "--max-samples", "1500")  # --epochs wins
    baseline = load_artifact(artifact).baseline
    assert (baseline.training.architecture, baseline.preprocessing.kind, baseline.threshold.policy) == (
        architecture,
        preprocessing,
        policy,
    )
    assert baseline.score == "mse" and baseline.training.epochs_requested == 1
    test = load_dataset("mnist").test.x[:60]
    scores, flagged, _ = serve(artifact, redis_server, tmp_path / "worker.log", {"normal": test})
    assert len(scores) == 60
    assert flagged == {pid for pid, s in scores.items() if s > baseline.threshold.value}
