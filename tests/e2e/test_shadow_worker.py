"""A worker process with a shadow model: it scores every image, publishes nothing of it to the output
stream, writes its decisions to the shadow stream, and SIGHUP swaps in a new candidate."""

from __future__ import annotations

import shutil
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from producer.client import ImageProducer
from tests.conftest import RedisServer, free_port, mnist_sample, wait_until
from tests.support import metric_sum, metric_value, metrics_text, start_worker, wait_for_metrics

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def retrain(out: Path, seed: int) -> str:
    """A different tiny dense model written over `out` (atomically, as the trainer does)."""
    from detector.datasets import Dataset, Split
    from trainer.config import DetectorConfig
    from trainer.train import train

    x, y = mnist_sample(1500, seed=seed)
    dataset = Dataset("mnist-sample", Split(x, y), Split(x[:100], y[:100]), "test")
    config = DetectorConfig(architecture="dense-32", epochs=1, seed=seed)
    return train(config, dataset, out, report=False, progress=False).baseline.model_version


def digits(n: int, seed: int) -> np.ndarray:
    return (mnist_sample(n, seed=seed)[0] * 255).round().astype(np.uint8)


@pytest.fixture
def shadowed_worker(
    tiny_artifact: Path, redis_server: RedisServer, tmp_path: Path
) -> Iterator[tuple[subprocess.Popen[bytes], int, Path]]:
    """A worker serving the tiny artifact with a copy of it as shadow; yields (process, port, shadow)."""
    redis_server.client().flushdb()
    shadow = tmp_path / "candidate"
    shutil.copytree(tiny_artifact, shadow)
    port = free_port()
    env = dict(
        ANOMALY_REDIS_URL=redis_server.url,
        ANOMALY_ARTIFACT=str(tiny_artifact),
        ANOMALY_SHADOW_ARTIFACT=str(shadow),
        ANOMALY_SHADOW_SCORES_STREAM="shadow",
        ANOMALY_SCORES_STREAM="scores",
        ANOMALY_METRICS_PORT=str(port),
        ANOMALY_METRICS_HOST="127.0.0.1",
        ANOMALY_BLOCK_MS="200",
        ANOMALY_RELOAD_POLL_SECONDS="0",  # only SIGHUP reloads: the test decides when
    )
    process = start_worker(env, tmp_path / "worker.log", ready_timeout=90)
    try:
        yield process, port, shadow
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)


def test_the_shadow_scores_every_image_publishes_nothing_and_sighup_swaps_it(
    shadowed_worker: tuple[subprocess.Popen[bytes], int, Path], redis_server: RedisServer
) -> None:
    process, port, shadow = shadowed_worker
    client = redis_server.client()
    producer = ImageProducer(client, "images")
    producer.push_many(digits(300, seed=1), [f"first-{i}" for i in range(300)])
    wait_until(lambda: client.xlen("shadow") == 300, 60, what="300 shadow decisions")
    text = wait_for_metrics(port, {"anomaly_shadow_messages_scored_total": 300})
    # The same model as shadow: the same decision on every image.
    assert metric_value(text, "anomaly_shadow_agreement_ratio") == 1.0
    assert metric_sum(text, "anomaly_shadow_messages_flagged_total") == client.xlen("anomalies")
    served_version = client.xrange("scores", count=1)[0][1][b"model_version"].decode()

    candidate_version = retrain(shadow, seed=21)
    assert candidate_version != served_version
    process.send_signal(signal.SIGHUP)
    info = f'{{engine="numpy",model_version="{candidate_version}"'
    wait_until(
        lambda: any(
            line.startswith(f"anomaly_shadow_model_info{info}") for line in metrics_text(port).splitlines()
        ),
        60,
        what="the new candidate in anomaly_shadow_model_info",
    )
    producer.push_many(digits(200, seed=2), [f"second-{i}" for i in range(200)])
    wait_until(lambda: client.xlen("shadow") == 500, 60, what="500 shadow decisions")

    rows = {f[b"id"].decode(): f for _, f in client.xrange("shadow")}
    assert {rows[f"second-{i}"][b"model_version"].decode() for i in range(200)} == {candidate_version}
    assert {rows[f"first-{i}"][b"model_version"].decode() for i in range(300)} == {served_version}
    # The served model alone publishes: every output entry is one of its flags, of its version.
    outputs = [f for _, f in client.xrange("anomalies")]
    assert {f[b"model_version"].decode() for f in outputs} <= {served_version}
    flagged = {f[b"source_id"] for _, f in client.xrange("scores") if f[b"flagged"] == b"1"}
    assert {f[b"source_id"] for f in outputs} == flagged
    # primary_flagged in the shadow stream is the served model's decision.
    served = {f[b"id"].decode(): f[b"flagged"] for _, f in client.xrange("scores")}
    assert all(rows[pid][b"primary_flagged"] == served[pid] for pid in rows)
    assert process.poll() is None
