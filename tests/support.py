"""Helpers shared by the runner tests: a fake scorer, a runner factory, stream readers."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
from prometheus_client import CollectorRegistry

from contract.codec import encode_image
from detector.engines.common import Explanation
from runtime.http import Health
from runtime.settings import WorkerSettings
from worker.loaded_model import LoadedModel
from worker.metrics import WorkerMetrics
from worker.runner import Runner
from worker.scoring import DecisionRule
from worker.shards import ShardSet

D = 16  # tiny images: the fake scorer does not care about 28x28


class MeanPixelScorer:
    """Score = mean pixel value: bright images are anomalies. Counts forward passes."""

    input_dim = D
    engine = "fake"

    def __init__(self, version: str = "fake-v1") -> None:
        self.model_version = version
        self.calls: list[int] = []

    def score_batch(self, images: np.ndarray) -> np.ndarray:
        self.calls.append(images.shape[0])
        return images.mean(axis=1).astype(np.float64)

    def explain(self, images: np.ndarray) -> Explanation:
        """One component, the score itself (not counted as a forward pass); no reconstruction."""
        scores = images.mean(axis=1).astype(np.float64)
        return Explanation(("mean-pixel",), scores.reshape(-1, 1), np.zeros_like(images))


class ChildScorer(MeanPixelScorer):
    """The mean-pixel scorer as the numpy engine, so the runner sends it to a scoring process
    (which imports this module to unpickle it). With `gate`: each call first creates
    `gate`.entered, then waits (up to a minute) for the file `gate` to exist. With `fail`: raises
    ValueError(fail)."""

    engine = "numpy"

    def __init__(self, version: str = "fake-v1", gate: Path | None = None, fail: str | None = None) -> None:
        super().__init__(version)
        self.gate = gate
        self.fail = fail

    def score_batch(self, images: np.ndarray) -> np.ndarray:
        if self.gate is not None:
            self.gate.with_suffix(".entered").touch()
            deadline = time.monotonic() + 60
            while not self.gate.exists() and time.monotonic() < deadline:
                time.sleep(0.01)
        if self.fail is not None:
            raise ValueError(self.fail)
        return super().score_batch(images)


def _only_in(pid: int) -> MeanPixelScorer:
    if os.getpid() != pid:
        raise ModuleNotFoundError("simulated: this process cannot import the model's module")
    return MeanPixelScorer()


class ParentOnlyScorer(MeanPixelScorer):
    """A numpy-engine scorer that unpickles only in the process that made it (a model whose module
    a scoring process could not import)."""

    engine = "numpy"

    def __reduce__(self) -> tuple[Any, tuple[int]]:
        return _only_in, (os.getpid(),)


def make_model(version: str = "fake-v1", threshold: float = 0.5, scorer: Any = None) -> LoadedModel:
    """A fake model: threshold 0.5 on the mean pixel; baseline mean 0.25, std 0.1."""
    rule = DecisionRule(threshold, "p95", 0.25, 0.1, 0.05, np.linspace(0, 0.6, 101))
    return LoadedModel(scorer or MeanPixelScorer(version), rule, 1 / 255, version)


def build_runner(
    client: Any,
    settings: WorkerSettings | None = None,
    *,
    model: LoadedModel | None = None,
    loader: Any = None,
    registry: CollectorRegistry | None = None,
    shadow: LoadedModel | None = None,
    shadow_loader: Any = None,
    scoring_process: Any = None,
    **overrides: Any,
) -> Runner:
    """A runner on `client` with the fake model; settings default to consumer w1, no reload polling."""
    settings = settings or WorkerSettings(**{"consumer": "w1", "reload_poll_seconds": 0, **overrides})
    metrics = WorkerMetrics(registry or CollectorRegistry(), with_process=False)
    stream = ShardSet.from_settings(client, settings)
    return Runner(
        settings,
        stream,
        model or make_model(),
        metrics,
        Health(),
        loader=loader,
        shadow=shadow,
        shadow_loader=shadow_loader,
        scoring_process=scoring_process,
    )


def push(r: Any, brightness: float, pid: str | None = None, dtype: str = "uint8", **extra: Any) -> bytes:
    """XADD one flat image of the given brightness to `images`."""
    fields: dict[str, Any] = dict(encode_image(np.full(D, brightness), dtype))
    if pid:
        fields["id"] = pid
    fields.update(extra)
    return r.xadd("images", fields)  # type: ignore[no-any-return]


def stream(r: Any, name: str) -> list[dict[str, str]]:
    """A stream's entries as str dicts."""
    return [{k.decode(): v.decode("utf-8", "replace") for k, v in f.items()} for _, f in r.xrange(name)]


def pending(r: Any) -> int:
    """Entries pending in the default group."""
    return int(r.xpending("images", "anomaly-scorer")["pending"])


def http_status(port: int, path: str) -> int:
    """The HTTP status of GET http://127.0.0.1:<port><path>; 0 when nothing answers."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2) as response:
            return int(response.status)
    except OSError as exc:
        return int(getattr(exc, "code", 0) or 0)


def metrics_text(port: int) -> str:
    """A worker's /metrics exposition."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        return str(response.read().decode())


def metric_sum(text: str, name: str, labels: str | None = None) -> float:
    """Sum of the samples of `name` in an exposition; only the label set `labels` ('{a="b"}') if given."""
    prefixes = (f"{name}{labels} ",) if labels is not None else (name + " ", name + "{")
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(prefixes))


def metric_value(text: str, name: str, labels: str = "") -> float | None:
    """The value of one sample (`name` with exactly the label set `labels`, '{a="b"}'); None if absent."""
    prefix = f"{name}{labels} "
    values = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(prefix)]
    return values[0] if values else None


def wait_for_metrics(port: int, expected: dict[str, float], timeout: float = 30.0) -> str:
    """Poll a worker's /metrics until every named sum equals its expected value; return that exposition.

    Counters are written after the commit they count (on the scoring thread when prefetching),
    so a test that saw the results in Redis waits here before reading them."""
    from tests.conftest import wait_until

    seen: dict[str, float] = {}

    def matches() -> str | None:
        text = metrics_text(port)
        seen.update({name: metric_sum(text, name) for name in expected})
        return text if seen == expected else None

    try:
        return str(wait_until(matches, timeout, 0.1, what=f"metrics {expected}"))
    except AssertionError as exc:
        raise AssertionError(f"{exc}; last seen {seen}") from None


def start_worker(env: dict[str, str], log: Path, ready_timeout: float = 120.0) -> subprocess.Popen[bytes]:
    """Start `python -m worker` with `env` (its metrics port in ANOMALY_METRICS_PORT), logging to a
    file, and wait for /readyz; fail with the log if it dies first."""
    from tests.conftest import ROOT, wait_until

    port = int(env["ANOMALY_METRICS_PORT"])
    full_env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONUNBUFFERED="1", **env)
    with log.open("w") as log_file:  # a file, not a pipe: a full pipe would block the worker
        process = subprocess.Popen([sys.executable, "-m", "worker"], env=full_env, cwd=ROOT, stderr=log_file)
    try:
        wait_until(
            lambda: http_status(port, "/readyz") == 200 or process.poll() is not None,
            ready_timeout,
            0.2,
            what=f"worker /readyz on port {port}",
        )
    except AssertionError:
        process.kill()
        process.wait(10)
        raise
    if process.poll() is not None:
        raise AssertionError(f"the worker exited with {process.returncode}:\n{log.read_text()}")
    return process


def write_test_certificates(directory: Path) -> Path:
    """A throwaway CA (ca.crt) and a server certificate for 127.0.0.1 signed by it (server.crt,
    server.key) in `directory`, made by openssl; returns the CA's path. Skips without openssl."""
    import shutil

    import pytest

    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed, so no test certificates can be made")

    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=directory, check=True, capture_output=True)

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.crt",
        "-days", "1", "-subj", "/CN=test-ca")  # fmt: skip
    run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key", "-out", "server.csr",
        "-subj", "/CN=127.0.0.1")  # fmt: skip
    (directory / "ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    run("x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
        "-out", "server.crt", "-days", "1", "-extfile", "ext")  # fmt: skip
    return directory / "ca.crt"


def push_alert(
    r: Any,
    model_version: str,
    pid: str,
    *,
    shard: int | None = None,
    score: float = 0.5,
    image: dict[str, bytes] | None = None,
    source_id: str = "*",
    **extra: str,
) -> tuple[str, str]:
    """An input entry (a real digit, or the fields `image`) and the output entry a worker would
    write for it, in the streams of `shard` (`images:{i}`, `anomalies:{i}`; None: unsharded names);
    returns (source_id, the alert's entry id)."""
    from contract.shards import shard_key
    from tests.conftest import mnist_sample

    inputs = "images" if shard is None else shard_key("images", shard)
    outputs = "anomalies" if shard is None else shard_key("anomalies", shard)
    if image is None:
        digit = mnist_sample(1, seed=int(r.xlen(inputs)) + 100 * (shard or 0))[0][0]
        image = {"image": (digit * 255).round().astype(np.uint8).tobytes()}
    source = r.xadd(inputs, {**image, "id": pid}, id=source_id).decode()
    fields = {
        "id": pid,
        "source_id": source,
        "score": repr(score),
        "threshold": "0.1",
        "z": "4.2",
        "p_value": "0.001",
        "model_version": model_version,
        "scored_at_ms": "1700000000000",
        "region": "7,7,14,14",
        "region_share": "0.4",
    } | extra
    alert = r.xadd(outputs, fields).decode()
    return source, alert


# -- retune: an artifact it can re-tune, and alerts as the worker writes them ----------------------
def write_retunable_artifact(out: Path, errors: np.ndarray, threshold: float, policy: str = "p90") -> Path:
    """An artifact with these held-out errors and threshold, and fake model bytes: `retune` copies
    the model without running it, so no training is needed."""
    from detector.artifact import (
        ERRORS_FILE,
        MODEL_FILE,
        Baseline,
        Statistics,
        Threshold,
        Training,
        save_errors,
        write_artifact,
    )
    from detector.thresholds import flag_rate

    def stage(tmp: Path) -> Baseline:
        (tmp / MODEL_FILE).write_bytes(b"fake model weights of " + out.name.encode())
        save_errors(tmp / ERRORS_FILE, errors)
        return Baseline(
            model_version="pending",  # write_artifact sets the hash of model.keras
            input_dim=D,
            statistics=Statistics.of(errors),
            threshold=Threshold(
                policy=policy, value=threshold, expected_flag_rate=flag_rate(errors, threshold)
            ),
            training=Training(
                dataset="synthetic",
                architecture="dense-32",
                epochs_requested=1,
                epochs_run=1,
                batch_size=8,
                learning_rate=1e-3,
                seed=0,
                train_count=10,
                validation_count=2,
                calibration_count=int(errors.size),
                duration_seconds=1.0,
                created_at="2026-01-01T00:00:00+00:00",
                keras_version="3",
                tensorflow_version="2",
            ),
        )

    return write_artifact(out, stage)


def publish_alert(
    client: Any, stream: str, source_id: str, score: float, model_version: str, flagged: bool | None = None
) -> None:
    """An output entry with the fields worker.commit.build_commit writes; with `flagged`, a scores
    stream entry (which also carries `flagged`)."""
    fields: dict[str, str | int] = {
        "id": f"camera-{source_id}",
        "source_id": source_id,
        "score": repr(float(score)),
        "threshold": "0.5",
        "z": "3.0",
        "p_value": "0.001",
        "model_version": model_version,
        "scored_at_ms": 1,
    }
    if flagged is not None:
        fields["flagged"] = int(flagged)
    client.xadd(stream, fields)


LOGFMT_PAIR = re.compile(r'([\w.]+)=("(?:[^"\\]|\\.)*"|\S*)')


def log_records(text: str) -> list[dict[str, str]]:
    """The logfmt lines of a program's stderr, each as its fields (quoted values unescaped)."""
    import json

    records = []
    for line in text.splitlines():
        pairs = LOGFMT_PAIR.findall(line)
        if pairs and pairs[0][0] == "ts":
            records.append({key: json.loads(raw) if raw.startswith('"') else raw for key, raw in pairs})
    return records


def logged(text: str, msg: str, **fields: str) -> bool:
    """A log line with this message and (at least) these fields is in `text`."""
    return any(
        r.get("msg") == msg and all(r.get(key) == value for key, value in fields.items())
        for r in log_records(text)
    )


def acl_arguments(line: str) -> list[str]:
    """An ACL SETUSER line of the docs as arguments for execute_command: a (selector) stays one."""
    words: list[str] = []
    selector: list[str] | None = None
    for word in line.split():
        if selector is not None:
            selector.append(word)
            if word.endswith(")"):
                words.append(" ".join(selector))
                selector = None
        elif word.startswith("(") and not word.endswith(")"):
            selector = [word]
        else:
            words.append(word)
    return words
