"""Hostile input and signals against a real worker process: one bad entry never stops it, and a
signal at any moment of its start-up is handled."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from producer.client import ImageProducer
from tests.conftest import ROOT, RedisServer, free_port, wait_until
from tests.support import http_status, log_records, logged, start_worker

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
D = 784
ZEROS = ",".join(["0"] * (D - 1))
# Every kind of poison an entry can carry, each with the reason code it must end with.
POISON: dict[str, tuple[dict[str, bytes], str]] = {
    "deep-nesting": ({b"image": b"[" * 5000, b"dtype": b"json"}, "bad_json"),
    "huge-integer": ({b"image": f"[{ZEROS},{'9' * 4400}]".encode(), b"dtype": b"json"}, "bad_json"),
    "1e999": ({b"image": f"[{ZEROS},1e999]".encode(), b"dtype": b"json"}, "bad_json"),
    "object": ({b"image": b'{"a": [1, 2]}', b"dtype": b"json"}, "bad_json"),
    "not-utf8": ({b"image": b"[\xff\xfe" + b",0" * (D - 1) + b"]", b"dtype": b"json"}, "bad_json"),
    "strings": ({b"image": json.dumps(["x"] * D).encode(), b"dtype": b"json"}, "not_numeric"),
    "nan-float32": ({b"image": np.full(D, np.nan, "<f4").tobytes(), b"dtype": b"float32"}, "non_finite"),
    "short": ({b"image": b"\x01" * 10}, "bad_length"),
    "unknown-dtype": ({b"image": b"\x00" * D, b"dtype": b"\xff\xfe"}, "unknown_dtype"),
    "no-image": ({b"id": b"x"}, "missing_image"),
    "long-id": ({b"image": b"\x00" * D, b"id": b"i" * 1000}, "bad_id"),
    "oversize": ({b"image": b"0" * (24 * D + 65), b"dtype": b"json"}, "oversize"),
}


@pytest.fixture
def worker_env(tiny_artifact: Path, redis_server: RedisServer) -> dict[str, str]:
    redis_server.client().flushdb()
    return dict(
        ANOMALY_REDIS_URL=redis_server.url,
        ANOMALY_ARTIFACT=str(tiny_artifact),
        ANOMALY_METRICS_PORT=str(free_port()),
        ANOMALY_METRICS_HOST="127.0.0.1",
        ANOMALY_SCORES_STREAM="scores",
        ANOMALY_BATCH_SIZE="64",
        ANOMALY_BLOCK_MS="100",
        ANOMALY_RELOAD_POLL_SECONDS="0",
    )


@pytest.fixture
def worker(worker_env: dict[str, str], tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], Path, int]]:
    log = tmp_path / "worker.log"
    process = start_worker(worker_env, log, ready_timeout=90)
    try:
        yield process, log, int(worker_env["ANOMALY_METRICS_PORT"])
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)


def test_every_poison_kind_between_good_entries_is_dead_lettered_alone_and_the_worker_keeps_serving(
    worker, redis_server: RedisServer
) -> None:
    from tests.conftest import mnist_sample

    process, log, port = worker
    client = redis_server.client()
    digits, _ = mnist_sample(len(POISON) * 3 + 3, seed=5)
    producer = ImageProducer(client, "images")
    good_ids: list[str] = []
    poison_ids: dict[str, str] = {}
    for n, (kind, (fields, _)) in enumerate(POISON.items()):
        for k in range(3):  # three good digits, then a poison entry, so each batch holds both
            good_ids.append(producer.push(digits[3 * n + k], f"good-{n}-{k}").decode())
        poison_ids[client.xadd("images", fields).decode()] = kind  # type: ignore[arg-type]

    def handled() -> bool:
        return client.xlen("scores") + client.xlen("images:dead-letter") >= len(good_ids) + len(POISON)

    wait_until(handled, 60, what="every entry scored or dead-lettered")
    assert process.poll() is None, log.read_text()
    scored = [f[b"source_id"].decode() for _, f in client.xrange("scores")]
    assert sorted(scored) == sorted(good_ids)  # each good entry scored exactly once
    dead = {
        f[b"source_id"].decode(): f[b"reason_code"].decode() for _, f in client.xrange("images:dead-letter")
    }
    assert dead == {entry_id: POISON[kind][1] for entry_id, kind in poison_ids.items()}
    assert client.xpending("images", "anomaly-scorer")["pending"] == 0
    assert http_status(port, "/healthz") == 200
    assert "Traceback" not in log.read_text()


def spawn_worker(env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    """`python -m worker` with `env`, not waiting for anything."""
    import os

    full_env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONUNBUFFERED="1", **env)
    with log.open("w") as log_file:
        return subprocess.Popen([sys.executable, "-m", "worker"], env=full_env, cwd=ROOT, stderr=log_file)


def test_sighup_as_soon_as_metrics_answer_then_corrupted_artifacts_the_worker_stays_up(
    worker_env: dict[str, str], tiny_artifact: Path, tmp_path: Path, redis_server: RedisServer
) -> None:
    artifact = tmp_path / "artifact"
    shutil.copytree(tiny_artifact, artifact)
    port = int(worker_env["ANOMALY_METRICS_PORT"])
    log = tmp_path / "worker.log"
    process = spawn_worker({**worker_env, "ANOMALY_ARTIFACT": str(artifact)}, log)
    try:
        wait_until(lambda: http_status(port, "/metrics") == 200 or process.poll() is not None, 60, 0.01)
        process.send_signal(signal.SIGHUP)  # the model may still be loading: remembered, not fatal
        wait_until(lambda: http_status(port, "/readyz") == 200 or process.poll() is not None, 60, 0.05)
        assert process.poll() is None, log.read_text()
        wait_until(lambda: "reload" in log.read_text(), 10, what="the early SIGHUP handled")
        (artifact / "baseline.json").write_text("{ not json")  # the manifest no longer matches
        for attempt in range(1, 8):
            process.send_signal(signal.SIGHUP)
            wait_until(
                lambda n=attempt: (
                    sum(r["msg"] == "reload refused" for r in log_records(log.read_text())) >= n
                    or process.poll() is not None
                ),
                20,
                what=f"refused reload {attempt}",
            )
            assert process.poll() is None, log.read_text()
        ImageProducer(redis_server.client(), "images").push(np.zeros(D, np.uint8), "after")
        wait_until(lambda: redis_server.client().xlen("scores") == 1, 20, what="the old model still scoring")
    finally:
        process.kill()
        process.wait(10)


def test_sigterm_during_start_up_exits_0(worker_env: dict[str, str], tmp_path: Path) -> None:
    port = int(worker_env["ANOMALY_METRICS_PORT"])
    log = tmp_path / "worker.log"
    process = spawn_worker(worker_env, log)
    try:
        wait_until(lambda: http_status(port, "/metrics") == 200 or process.poll() is not None, 60, 0.01)
        process.send_signal(signal.SIGTERM)
        assert process.wait(30) == 0, log.read_text()
        text = log.read_text()
        assert logged(text, "stop requested", signal="SIGTERM") and "Traceback" not in text
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)
