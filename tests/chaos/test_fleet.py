"""Worker processes under damage: kill -9 in a fleet, SIGTERM mid-load, hot reload under load."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import redis

from contract.codec import encode_image
from tests.chaos.fleet import Fleet
from tests.conftest import RedisServer, mnist_sample, wait_until
from tests.support import logged, metric_sum, metrics_text

pytestmark = [pytest.mark.chaos, pytest.mark.slow]


@pytest.fixture
def fleet(redis_server: RedisServer, tiny_artifact: Path, tmp_path: Path) -> Iterator[Fleet]:
    redis_server.client().flushdb()
    f = Fleet(redis_server.url, tiny_artifact, tmp_path)
    yield f
    f.stop_all()


def mixed_entries(n: int, seed: int = 0) -> list[dict[str, bytes | str]]:
    """uint8, float32 and json images (some rotated) plus about 5% malformed entries."""
    from detector.datasets import rotate90

    x, _ = mnist_sample(1000, seed=seed)
    rng = np.random.default_rng(seed)
    entries: list[dict[str, bytes | str]] = []
    for i in range(n):
        img = x[i % len(x)]
        if rng.random() < 0.3:
            img = rotate90(img[None])[0]
        kind = rng.random()
        if kind < 0.05:
            fields: dict[str, bytes | str] = random.Random(i).choice(
                [
                    {"image": b"\x00" * 5},
                    {"image": "[1, 2", "dtype": "json"},
                    {"dtype": "uint8"},
                    {"image": b"\x00" * 784, "dtype": "png"},
                ]
            )
        else:
            dtype = "uint8" if kind < 0.85 else "float32" if kind < 0.95 else "json"
            fields = dict(encode_image(img, dtype))
        fields["id"] = f"p-{i}"
        entries.append(dict(fields))
    return entries


def push_all(client: redis.Redis, entries: list[dict[str, bytes | str]], per_second: float) -> list[bytes]:
    ids: list[bytes] = []
    chunk = max(1, int(per_second / 10))
    started = time.monotonic()
    for start in range(0, len(entries), chunk):
        pipe = client.pipeline(transaction=False)
        for fields in entries[start : start + chunk]:
            pipe.xadd("images", fields)  # type: ignore[arg-type]
        ids.extend(pipe.execute())
        time.sleep(max(0.0, started + (start + chunk) / per_second - time.monotonic()))
    return ids


def assert_each_entry_accounted_once(client: redis.Redis, ids: list[bytes]) -> None:
    scored = Counter(f[b"source_id"] for _, f in client.xrange("scores"))
    dead = Counter(f[b"source_id"] for _, f in client.xrange("images:dead-letter"))
    assert [k for k, v in scored.items() if v > 1] == [], "scored twice"
    assert [k for k, v in dead.items() if v > 1] == [], "dead-lettered twice"
    assert set(scored) & set(dead) == set(), "both scored and dead-lettered"
    assert set(scored) | set(dead) == set(ids), "lost entries"
    flagged = {f[b"source_id"] for _, f in client.xrange("scores") if f[b"flagged"] == b"1"}
    output = Counter(f[b"source_id"] for _, f in client.xrange("anomalies"))
    assert set(output) == flagged and all(v == 1 for v in output.values())
    assert int(client.xpending("images", "anomaly-scorer")["pending"]) == 0


def test_kill_9_of_workers_loses_and_doubles_nothing(fleet: Fleet, redis_server: RedisServer) -> None:
    fleet.extra_env.update(
        ANOMALY_CLAIM_IDLE_MS="1500",
        ANOMALY_BATCH_SIZE="64",
        ANOMALY_MAX_DELIVERIES="50",
        ANOMALY_LOG_LEVEL="WARNING",
    )
    client = redis_server.client()
    names = [fleet.start(wait_ready=False) for _ in range(3)]
    for name in names:
        fleet.wait_ready(name)
    entries = mixed_entries(20_000)
    ids: list[bytes] = []
    producer = threading.Thread(target=lambda: ids.extend(push_all(client, entries, per_second=1000)))
    producer.start()
    rng = random.Random(1)
    kills = 0
    while producer.is_alive() or kills < 4:
        time.sleep(2.5)
        victims = rng.sample(sorted(fleet.workers), k=rng.choice([1, 1, 2]))
        for victim in victims:
            fleet.kill(victim)
            kills += 1
        for _ in victims:
            fleet.start(wait_ready=False)
    producer.join()
    for name in list(fleet.workers):
        fleet.wait_ready(name)
    total = len(entries)
    wait_until(
        lambda: (
            client.xlen("scores") + client.xlen("images:dead-letter") >= total
            and int(client.xpending("images", "anomaly-scorer")["pending"]) == 0
        ),
        240,
        interval=0.5,
        what="every entry scored or dead-lettered",
    )
    assert kills >= 4
    assert_each_entry_accounted_once(client, ids)


def test_sigterm_mid_load_finishes_the_batch_and_exits_zero(fleet: Fleet, redis_server: RedisServer) -> None:
    fleet.extra_env.update(ANOMALY_BATCH_SIZE="256", ANOMALY_GRACE_SECONDS="10")
    client = redis_server.client()
    name = fleet.start()
    process, port = fleet.workers[name]
    ids = push_all(client, mixed_entries(6000, seed=2), per_second=1e9)
    wait_until(
        lambda: metric_sum(metrics_text(port), "anomaly_messages_scored_total") > 0,
        30,
        what="scoring started",
    )
    stopped_at = time.monotonic()
    process.send_signal(signal.SIGTERM)
    assert process.wait(15) == 0
    assert time.monotonic() - stopped_at < 10
    own = client.xpending_range("images", "anomaly-scorer", "-", "+", 10, consumername=name)
    assert own == []  # the batch in hand was committed before exit
    log = (fleet.log_dir / f"{name}.log").read_text()
    assert logged(log, "stop requested", signal="SIGTERM") and logged(
        log, "stopped", level="info", logger="worker"
    )
    # Another worker takes over the rest: still exactly once.
    fleet.start()
    wait_until(
        lambda: client.xlen("scores") + client.xlen("images:dead-letter") >= len(ids),
        60,
        what="rest handled by a second worker",
    )
    assert_each_entry_accounted_once(client, ids)


def _retrain(path: Path, seed: int) -> str:
    from detector.datasets import Dataset, Split
    from trainer.config import DetectorConfig
    from trainer.train import train

    x, y = mnist_sample(1500, seed=seed)
    ds = Dataset("mnist-sample", Split(x, y), Split(x[:100], y[:100]), "test")
    config = DetectorConfig(architecture="dense-32", epochs=1, seed=seed)
    result = train(config, ds, path, report=False, progress=False)
    return result.baseline.model_version


def test_hot_reload_under_load_swaps_models_and_refuses_a_broken_one(
    fleet: Fleet, redis_server: RedisServer, tmp_path: Path
) -> None:
    artifact = tmp_path / "served"
    shutil.copytree(fleet.artifact, artifact)
    first_version = json.loads((artifact / "baseline.json").read_text())["model_version"]
    fleet.artifact = artifact
    fleet.extra_env.update(ANOMALY_RELOAD_POLL_SECONDS="1", ANOMALY_BATCH_SIZE="32")
    client = redis_server.client()
    name = fleet.start()
    _, port = fleet.workers[name]
    entries = mixed_entries(9000, seed=3)
    ids: list[bytes] = []
    producer = threading.Thread(target=lambda: ids.extend(push_all(client, entries, per_second=600)))
    producer.start()
    # The first model must have scored part of the stream before the swap, or the test shows nothing.
    wait_until(lambda: client.xlen("scores") >= 500, 60, what="500 scored by the first model")
    second_version = _retrain(artifact, seed=11)  # written beside, then moved into place
    wait_until(
        lambda: metric_sum(metrics_text(port), "anomaly_model_reloads_total", '{result="success"}') == 1,
        30,
        what="reload picked up by polling",
    )
    broken = tmp_path / "broken"
    shutil.copytree(artifact, broken)
    (broken / "calibration_errors.npy").write_bytes(b"garbage")
    staging = tmp_path / "staging"
    os.replace(artifact, staging)
    os.replace(broken, artifact)
    process, _ = fleet.workers[name]
    process.send_signal(signal.SIGHUP)
    log_path = fleet.log_dir / f"{name}.log"
    # The failure is counted, then logged: wait for the log line the test reads.
    wait_until(
        lambda: logged(log_path.read_text(), "reload refused", kept_model_version=second_version),
        30,
        what="broken artifact refused and logged",
    )
    assert metric_sum(metrics_text(port), "anomaly_model_reloads_total", '{result="failure"}') >= 1
    producer.join()
    wait_until(
        lambda: client.xlen("scores") + client.xlen("images:dead-letter") >= len(entries),
        60,
        what="all handled",
    )
    assert_each_entry_accounted_once(client, ids)
    versions = [f[b"model_version"].decode() for _, f in client.xrange("scores")]
    switch = versions.index(second_version)
    assert switch >= 500, "the first model scored too little for the swap to show"
    assert versions[:switch] == [first_version] * switch and set(versions[switch:]) == {second_version}
    assert process.poll() is None  # still serving with the second model
