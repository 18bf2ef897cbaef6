"""The built images run as a cluster runs them: the trainer image trains into a volume, the worker
image serves that artifact against a Redis the test starts, and stops cleanly on SIGTERM.

The images come from deploy/images.py (what `make images` runs): built when the tree changed,
reused without running buildah when their stamps say they are up to date. Containers run through
tests/deploy/containers.py (buildah run, read-only root, volumes, host network).
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import redis

from tests.conftest import RedisServer, free_port
from tests.support import http_status, log_records, logged, wait_for_metrics
from worker.client import ImageProducer

from .conftest import images_script
from .containers import (
    Volume,
    image_config,
    process_gone,
    remove_stale_containers,
    rss_bytes,
    run_to_completion,
    running_container,
    wait_until,
)

pytestmark = [
    pytest.mark.deploy,
    pytest.mark.slow,
    pytest.mark.skipif(
        shutil.which("buildah") is None,
        reason="buildah is not installed; .ci/run installs it (apt-get install buildah debootstrap)",
    ),
    pytest.mark.skipif(os.geteuid() != 0, reason="buildah builds and runs the images as root here"),
    # A cold build of the two images (the stand-in base first) takes about 4 minutes on 2 cores.
    pytest.mark.timeout(1200),
]

NORMAL, ROTATED = 200, 100


@pytest.fixture(scope="module")
def images() -> dict[str, str]:
    """stage -> image name of the worker and trainer images of the current tree."""
    remove_stale_containers()
    return {
        built.target.stage: built.image for built in images_script().build(["worker", "trainer"], say=False)
    }


@pytest.fixture(scope="module")
def artifact_volume(images: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A volume holding /artifacts/model, written by the trainer image as the training Job runs it
    (read-only root, /tmp an empty dir). Small on purpose (2,000 digits, 1 epoch): this checks the
    images' wiring; the documented default's quality is the detection benchmark's business."""
    volume = tmp_path_factory.mktemp("artifacts-volume")
    uid, gid = (int(part) for part in image_config(images["trainer"])["User"].split(":"))
    os.chown(volume, uid, gid)  # what fsGroup does for the Job's volume: the image's user may write
    args = [
        "train",
        "--dataset",
        "mnist",
        "--out",
        "/artifacts/model",
        "--max-samples",
        "2000",
        "--epochs",
        "1",
    ]
    done = run_to_completion(
        images["trainer"],
        args,
        volumes=[Volume(volume, "/artifacts")],
        read_only_root=True,
        log_dir=tmp_path_factory.mktemp("trainer-container"),
        timeout=600,
    )
    assert done.returncode == 0, done.output[-4000:]
    assert done.writes_to_root == [], "the trainer wrote outside /tmp and its volume"
    assert (volume / "model" / "manifest.json").is_file(), sorted(p.name for p in volume.rglob("*"))
    return volume


def test_worker_image_scores_entries_from_a_redis_started_by_the_test(
    images: dict[str, str],
    artifact_volume: Path,
    redis_client: redis.Redis,
    redis_server: RedisServer,
    tmp_path: Path,
) -> None:
    from detector.datasets import load_dataset, rotate90

    port = free_port()
    env = {
        "ANOMALY_REDIS_URL": redis_server.url,
        "ANOMALY_METRICS_HOST": "127.0.0.1",  # the host's network: a free port, not the default 9400
        "ANOMALY_METRICS_PORT": str(port),
        "ANOMALY_SCORES_STREAM": "scores",
        "ANOMALY_BLOCK_MS": "200",
    }
    test = load_dataset("mnist").test.x
    rng = np.random.default_rng(0)
    normal = test[rng.choice(len(test), NORMAL, replace=False)]
    rotated = rotate90(test[rng.choice(len(test), ROTATED, replace=False)])

    with running_container(
        images["worker"],
        env=env,
        volumes=[Volume(artifact_volume, "/artifacts", read_only=True)],
        read_only_root=True,
        log_dir=tmp_path,
    ) as worker:
        worker.wait_until(lambda: http_status(port, "/readyz") == 200, 60, "the worker's /readyz")
        ready_seconds = time.monotonic() - worker.started_at

        producer = ImageProducer(redis_client, "images")
        producer.push_many(normal, [f"normal-{i}" for i in range(NORMAL)])
        producer.push_many(rotated, [f"rotated-{i}" for i in range(ROTATED)])
        worker.wait_until(
            lambda: (
                redis_client.xlen("scores") == NORMAL + ROTATED
                and int(redis_client.xpending("images", "anomaly-scorer")["pending"]) == 0
            ),
            60,
            "every entry scored and acknowledged",
        )
        wait_for_metrics(port, {"anomaly_messages_scored_total": NORMAL + ROTATED})
        assert redis_client.xlen("images:dead-letter") == 0
        pushed = {f"normal-{i}" for i in range(NORMAL)} | {f"rotated-{i}" for i in range(ROTATED)}
        flagged = {fields[b"id"].decode() for _, fields in redis_client.xrange("anomalies")}
        assert flagged <= pushed

        started = [r for r in log_records(worker.log_text()) if r["msg"] == "scoring process started"]
        assert started, worker.log_text()
        scoring_pid = int(started[0]["pid"])
        # The figures deploy/README's sizing quotes (shown by pytest -rP).
        worker_mb, scoring_mb = rss_bytes(worker.main_pid()) / 1e6, rss_bytes(scoring_pid) / 1e6
        print(
            f"{images['worker']}: ready {ready_seconds:.2f} s after buildah run; RSS serving: worker"
            f" {worker_mb:.0f} MB, scoring process {scoring_mb:.0f} MB"
        )

        assert worker.terminate(30) == 0, worker.log_text()
        log = worker.log_text()
        assert logged(log, "stop requested", signal="SIGTERM") and logged(log, "stopped"), log
        wait_until(lambda: process_gone(scoring_pid), 10, "the scoring process to exit with the worker")
        assert worker.writes_to_root() == [], "the worker wrote outside /tmp"
