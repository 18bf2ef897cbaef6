"""The CLIs as a user runs them: train, start a worker, push traffic, read the streams and metrics."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from detector.score import DEFAULT_SCORE, components_of
from producer.client import ImageProducer
from tests.conftest import ROOT, RedisServer, free_port, wait_until
from tests.support import log_records, logged, metric_value, metrics_text, start_worker, wait_for_metrics

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
ENV = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONUNBUFFERED="1")


@pytest.fixture(scope="module")
def cli_artifact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("e2e") / "artifact"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "trainer",
            "train",
            "--dataset",
            "mnist",
            "--out",
            str(out),
            "--epochs",
            "4",
            "--max-samples",
            "8000",
            "--seed",
            "3",
            "--threshold",
            "p99",
        ],
        env=ENV,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert "threshold:       p99 =" in done.stdout and f"artifact:        {out}" in done.stdout
    assert {p.name for p in out.iterdir()} >= {
        "model.keras",
        "baseline.json",
        "manifest.json",
        "report.png",
        "calibration_errors.npy",
    }
    return out


@pytest.fixture
def worker(
    cli_artifact: Path, redis_server: RedisServer, tmp_path: Path
) -> Iterator[tuple[subprocess.Popen[str], int, Path]]:
    redis_server.client().flushdb()
    port = free_port()
    env = dict(
        ANOMALY_REDIS_URL=redis_server.url,
        ANOMALY_ARTIFACT=str(cli_artifact),
        ANOMALY_METRICS_PORT=str(port),
        ANOMALY_METRICS_HOST="127.0.0.1",
        ANOMALY_SCORES_STREAM="scores",
        ANOMALY_BATCH_SIZE="128",
        ANOMALY_BLOCK_MS="200",
    )
    log = tmp_path / "worker.log"
    process = start_worker(env, log, ready_timeout=90)
    try:
        yield process, port, log
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)


def test_worker_scores_flags_dead_letters_and_stops_cleanly(worker, redis_server: RedisServer) -> None:
    from detector.datasets import load_dataset, rotate90

    process, port, log_path = worker
    client = redis_server.client()
    test = load_dataset("mnist").test.x
    rng = np.random.default_rng(0)
    normal = test[rng.choice(len(test), 400, replace=False)]
    rotated = rotate90(test[rng.choice(len(test), 400, replace=False)])
    producer = ImageProducer(client, "images")
    producer.push_many(normal, [f"normal-{i}" for i in range(400)])
    ImageProducer(client, "images", dtype="float32").push_many(
        rotated[:200], [f"rotated-{i}" for i in range(200)]
    )
    ImageProducer(client, "images", dtype="json").push_many(
        rotated[200:], [f"rotated-{i}" for i in range(200, 400)]
    )
    malformed = [
        {"image": b"\x01" * 10, "id": "bad-length"},
        {"image": b"[1,2", "dtype": "json", "id": "bad-json"},
        {"image": b"\x00" * 784, "dtype": "bmp", "id": "bad-dtype"},
        {"id": "no-image"},
        {"image": np.full(784, 2.0, "<f4").tobytes(), "dtype": "float32", "id": "out-of-range"},
    ]
    for fields in malformed:
        client.xadd("images", fields)  # type: ignore[arg-type]

    wait_until(
        lambda: client.xlen("scores") + client.xlen("images:dead-letter") >= 805, 60, what="all handled"
    )

    scores = {f[b"id"].decode(): f for _, f in client.xrange("scores")}
    assert len(scores) == 800
    threshold = float(next(iter(scores.values()))[b"threshold"])
    expected_flagged = {pid for pid, f in scores.items() if float(f[b"score"]) > threshold}
    flagged = [f[b"id"].decode() for _, f in client.xrange("anomalies")]
    assert sorted(flagged) == sorted(expected_flagged)  # exactly the flagged ones, once each
    for _, fields in client.xrange("anomalies"):  # the default: what each component added, summing to it
        parts = json.loads(fields[b"score_components"])
        assert tuple(parts) == components_of(DEFAULT_SCORE)
        assert sum(parts.values()) == pytest.approx(float(fields[b"score"]), abs=1e-3)
    assert sum(p.startswith("normal") for p in flagged) / 400 < 0.05  # p99 on held-out normal data
    normal_scores = [float(f[b"score"]) for pid, f in scores.items() if pid.startswith("normal")]
    rotated_scores = [float(f[b"score"]) for pid, f in scores.items() if pid.startswith("rotated")]
    # Share of (rotated, normal) pairs ranked the right way round: the AUROC. A small quick model.
    auroc = np.mean(np.asarray(rotated_scores)[:, None] > np.asarray(normal_scores)[None, :])
    assert auroc > 0.75, auroc

    dead = {f[b"id"].decode(): f[b"reason"].decode() for _, f in client.xrange("images:dead-letter")}
    assert dead.keys() == {"bad-length", "bad-json", "bad-dtype", "no-image", "out-of-range"}
    assert dead["bad-length"] == "image has 10 bytes, expected 784 for dtype uint8"
    assert "not supported" in dead["bad-dtype"] and "[0, 1]" in dead["out-of-range"]
    assert int(client.xpending("images", "anomaly-scorer")["pending"]) == 0

    wait_for_metrics(
        port,
        {
            "anomaly_messages_scored_total": 800,
            "anomaly_messages_flagged_total": len(flagged),
            "anomaly_messages_invalid_total": 5,
        },
    )
    # Sampled every ANOMALY_LAG_SAMPLE_SECONDS (5 s): everything was delivered, so it comes to 0.
    wait_until(
        lambda: metric_value(metrics_text(port), "anomaly_consumer_group_lag", '{shard="0"}') == 0,
        30,
        what="lag 0",
    )

    text = metrics_text(port)
    assert (metric_value(text, "anomaly_scoring_process_resident_memory_bytes") or 0) > 0  # scored there
    assert metric_value(text, "anomaly_scoring_process_failures_total") == 0

    process.send_signal(signal.SIGTERM)
    assert process.wait(30) == 0
    log = log_path.read_text()
    assert logged(log, "stop requested", signal="SIGTERM") and logged(log, "stopped")
    assert any(r["msg"] == "model loaded" and r.get("model_version") for r in log_records(log))
    [started] = [r for r in log_records(log) if r["msg"] == "scoring process started"]
    child = Path(f"/proc/{started['pid']}/stat")
    wait_until(lambda: exited(child), 10, what="the scoring process to exit with the worker")


def exited(stat: Path) -> bool:
    """The process of /proc/PID/stat has exited (a zombie nobody reaped yet counts as exited)."""
    try:
        return stat.read_text().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True


def test_invalid_setting_stops_the_worker_at_start_naming_it(cli_artifact: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "worker", "--batch-size", "0", "--artifact", str(cli_artifact)],
        env=ENV,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert "invalid setting ANOMALY_BATCH_SIZE" in done.stderr


def test_tampered_artifact_is_refused_at_start(cli_artifact: Path, tmp_path: Path) -> None:
    import shutil

    copy = tmp_path / "artifact"
    shutil.copytree(cli_artifact, copy)
    with open(copy / "model.keras", "r+b") as handle:
        handle.seek(100)
        handle.write(b"\x00\x01\x02")
    done = subprocess.run(
        [sys.executable, "-m", "worker", "--artifact", str(copy), "--metrics-port", "0"],
        env=ENV,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    assert "checksum mismatch for" in done.stderr and "model.keras" in done.stderr


def test_producer_cli_pushes_normal_and_rotated_digits(redis_server: RedisServer) -> None:
    client = redis_server.client()
    client.delete("prod-test")
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "producer.cli",
            "--redis-url",
            redis_server.url,
            "--stream",
            "prod-test",
            "--count",
            "50",
            "--rotated-fraction",
            "0.5",
        ],
        env=ENV,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    ids = [f[b"id"].decode() for _, f in client.xrange("prod-test")]
    assert (
        len(ids) == 50
        and any(i.startswith("rotated") for i in ids)
        and any(i.startswith("normal") for i in ids)
    )
    assert all(len(f[b"image"]) == 784 for _, f in client.xrange("prod-test"))


def test_a_worker_serves_a_combined_score_with_its_classifier_and_neighbours(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    """mse+transforms+knn: trained by the CLI, loaded by the worker, scored as calibrated."""
    from detector.artifact import load_artifact
    from detector.datasets import load_dataset, rotate90

    artifact = tmp_path / "combined"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "trainer",
            "train",
            *("--out", str(artifact), "--epochs", "3", "--max-samples", "4000", "--no-report"),
            *("--score", "mse+transforms+knn", "--transforms", "rotations", "--transform-epochs", "2"),
        ],
        env=ENV,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    threshold = load_artifact(artifact).baseline.threshold.value
    redis_server.client().flushdb()
    port = free_port()
    env = dict(
        ANOMALY_REDIS_URL=redis_server.url,
        ANOMALY_ARTIFACT=str(artifact),
        ANOMALY_METRICS_PORT=str(port),
        ANOMALY_METRICS_HOST="127.0.0.1",
        ANOMALY_SCORES_STREAM="scores",
    )
    process = start_worker(env, tmp_path / "worker.log", ready_timeout=90)
    try:
        client = redis_server.client()
        test = load_dataset("mnist").test.x[:200]
        producer = ImageProducer(client, "images")
        producer.push_many(test, [f"normal-{i}" for i in range(200)])
        producer.push_many(rotate90(test), [f"rotated-{i}" for i in range(200)])
        wait_until(lambda: client.xlen("scores") >= 400, 60, what="all scored")
        scores = {f[b"id"].decode(): float(f[b"score"]) for _, f in client.xrange("scores")}
        flagged = {f[b"id"].decode() for _, f in client.xrange("anomalies")}
        assert flagged == {pid for pid, s in scores.items() if s > threshold}
        assert sum(pid.startswith("rotated") for pid in flagged) > 150  # mse alone flags about half
        assert sum(pid.startswith("normal") for pid in flagged) < 20
        normal = np.array([s for pid, s in scores.items() if pid.startswith("normal")])
        rotated = np.array([s for pid, s in scores.items() if pid.startswith("rotated")])
        assert np.mean(rotated[:, None] > normal[None, :]) > 0.95  # the AUROC: turned digits stand out
        wait_for_metrics(port, {"anomaly_messages_scored_total": 400})
        process.send_signal(signal.SIGTERM)
        assert process.wait(30) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)


def test_producer_cli_reads_the_connection_and_shards_from_the_environment_like_every_program(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    client = redis_server.client()
    client.config_set("requirepass", "pr0ducer-pw")
    try:
        password = tmp_path / "password"
        password.write_text("pr0ducer-pw\n")
        env = dict(
            ENV,
            ANOMALY_REDIS_URL=redis_server.url,
            ANOMALY_REDIS_PASSWORD_FILE=str(password),
            ANOMALY_INPUT_STREAM="envstream",
            ANOMALY_SHARDS="2",
        )
        done = subprocess.run(
            [sys.executable, "-m", "producer.cli", "--count", "40"],
            env=env, cwd=ROOT, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        authed = redis_server.client(password="pr0ducer-pw")
        lengths = [authed.xlen(f"envstream:{{{i}}}") for i in (0, 1)]
        assert sum(lengths) == 40 and min(lengths) > 0, lengths  # sharded by id, both shards used
        typo = subprocess.run(
            [sys.executable, "-m", "producer.cli", "--count", "1"],
            env={**env, "ANOMALY_SHARD": "2"}, cwd=ROOT, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert (
            typo.returncode == 2
            and "unknown setting ANOMALY_SHARD; did you mean ANOMALY_SHARDS?" in typo.stderr
        )
    finally:
        redis_server.client(password="pr0ducer-pw").config_set("requirepass", "")
