"""Throughput and latency of the real worker against its ceilings, measured in one run (issue 6).

    python -m benchmarks.throughput           # make bench: the full run, about 20 minutes on 2 cores
    python -m benchmarks.throughput --quick   # make bench-quick: a smoke run under a minute (CI)

Everything talks to a redis-server this script starts on a free port (never anyone's data) and
kills at the end. The steps:

1. an artifact: `anomaly-trainer train` (dense-64-16, 2 epochs on 5000 digits), cached under
   benchmarks/.cache/, or --artifact; it has dense_stack.npz, so workers use the numpy engine;
2. pre-filled input streams of MNIST test digits, one per payload dtype (uint8, float32, json);
3. ceilings: a bare consumer loop (XREADGROUP + decode to a float32 array + XACK, no scoring) and
   the forward pass alone (score_batch of the numpy engine and of the XLA-compiled TensorFlow
   engine), with the eager model call, model.predict and one model.predict per message for
   reference;
4. the real worker (`python -m worker`, as deployed) draining the same entries: it is started once
   per configuration and waits on an idle group; the benchmark rewinds the group (XGROUP SETID),
   adds one entry to wake the blocked read and polls XINFO GROUPS until every entry is delivered and
   acknowledged. Each drain is paired with a bare-loop pass over the same entries just before it,
   so the ratio compares two numbers taken under the same machine load;
5. paced runs: a producer at half the worker's maximum rate, and at 5,000 msg/s, with the worker
   as deployed (no scores stream); the producer writes pre-encoded XADDs on a raw socket, so it
   takes little of the cores the worker and Redis share with it. Latency of each flagged message
   (a few percent of MNIST digits are flagged, a sample of every batch) is (id of its output
   entry, stamped by Redis at commit) - (id of its input entry, stamped by Redis at XADD), both in
   Redis' milliseconds; the worker's own anomaly_end_to_end_latency_seconds histogram covers every
   message;
6. two workers on one group; the TensorFlow engine on the same drain for reference; start-to-ready
   time; resident memory, and in the full run its trend over a 10-minute paced run.

Results: one table on stdout, and benchmarks/results/{throughput.json, throughput.md, throughput.png}.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import redis

ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / "benchmarks" / ".cache"
RESULTS = ROOT / "benchmarks" / "results"
MNIST_TEST = ROOT / "data" / "mnist" / "t10k-images-idx3-ubyte.gz"
DIM = 784
GROUP = "bench"  # the workers' group; the bare loop and the naive baseline read through their own
BARE_GROUP, NAIVE_GROUP = "bare", "naive"
OUTPUT = "bench:anomalies"
STREAMS = {"uint8": "bench:uint8", "float32": "bench:float32", "json": "bench:json"}
# Targets of issue 6.
TARGET_RATIO = {"uint8": 0.6, "float32": 0.5}
TARGET_P50_MS, TARGET_P99_MS = 5.0, 25.0
TARGET_READY_S, TARGET_RSS_MB = 10.0, 700.0


@dataclass(frozen=True)
class Plan:
    """How much of everything a run does."""

    name: str
    entries: dict[str, int]  # pre-filled entries per payload dtype
    drains: tuple[tuple[str, int, int], ...]  # (dtype, batch size, entries drained)
    repeats: int  # drains (and bare passes) per configuration; the median is reported
    ceiling_seconds: float
    naive_messages: int
    paced_seconds: float
    fixed_rate: float
    flat_seconds: float  # long paced run for the memory trend (0: skipped)
    two_workers: bool
    tensorflow_drain: bool  # also drain uint8 batch 256 with ANOMALY_ENGINE=tensorflow
    train_args: tuple[str, ...]


FULL = Plan(
    name="full",
    entries={"uint8": 200_000, "float32": 60_000, "json": 20_000},
    drains=(
        ("uint8", 256, 200_000),
        ("uint8", 1024, 200_000),
        ("uint8", 32, 100_000),
        ("uint8", 1, 10_000),
        ("float32", 256, 60_000),
        ("json", 256, 20_000),
    ),
    repeats=3,
    ceiling_seconds=3.0,
    naive_messages=300,
    paced_seconds=20.0,
    fixed_rate=5000.0,
    flat_seconds=600.0,
    two_workers=True,
    tensorflow_drain=True,
    train_args=("--epochs", "2", "--max-samples", "5000"),
)
QUICK = Plan(
    name="quick",
    entries={"uint8": 20_000, "float32": 4_000, "json": 1_000},
    drains=(("uint8", 256, 20_000), ("json", 256, 1_000)),
    repeats=1,
    ceiling_seconds=0.5,
    naive_messages=30,
    paced_seconds=3.0,
    fixed_rate=5000.0,
    flat_seconds=0.0,
    two_workers=False,
    tensorflow_drain=False,
    train_args=("--epochs", "1", "--max-samples", "2000"),
)


# -- small helpers --------------------------------------------------------------------------------
def log(message: str) -> None:
    """Progress for the person running the benchmark (stderr; the table goes to stdout)."""
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(condition: Callable[[], bool], timeout: float, what: str, interval: float = 0.02) -> None:
    """Poll `condition` until true; raise after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(interval)


CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (all its threads), from /proc."""
    with open(f"/proc/{pid}/stat") as handle:
        fields = handle.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def rss_mb(pid: int, field: str = "VmRSS") -> float:
    """Resident memory (VmRSS, or RssAnon: the private part) of a process in MB."""
    with open(f"/proc/{pid}/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


def id_ms(entry_id: bytes | str) -> int:
    """Milliseconds part of a stream entry id."""
    text = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
    return int(text.split("-", 1)[0])


def load_mnist_uint8() -> np.ndarray:
    """The 10,000 MNIST test digits the project ships, as (N, 784) uint8."""
    with gzip.open(MNIST_TEST, "rb") as handle:
        raw = handle.read()
    return np.frombuffer(raw, np.uint8, offset=16).reshape(-1, DIM)


def payloads(images: np.ndarray, dtype: str) -> list[bytes]:
    """Encoded `image` fields, as producers send them (worker.codec.encode_image)."""
    from worker.codec import encode_image

    return [encode_image(image, dtype)["image"] for image in images]


def median(values: Sequence[float]) -> float:
    """Median, NaN for nothing."""
    return float(np.median(values)) if len(values) else float("nan")


# -- Prometheus text -> histograms ------------------------------------------------------------------
Scrape = dict[str, float]


def scrape(port: int) -> Scrape:
    """Every sample of a worker's /metrics, keyed 'name{label=value,...}'."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    out: Scrape = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
            out[f"{sample.name}{{{labels}}}"] = float(sample.value)
    return out


def delta(after: Scrape, before: Scrape) -> Scrape:
    """after - before for every counter-like sample (histograms are cumulative)."""
    return {k: v - before.get(k, 0.0) for k, v in after.items()}


def buckets(samples: Scrape, name: str) -> list[tuple[float, float]]:
    """[(upper bound, cumulative count)] of histogram `name`, sorted by bound."""
    prefix = f"{name}_bucket{{le="
    rows = [(float(k[len(prefix) : -1]), v) for k, v in samples.items() if k.startswith(prefix)]
    return sorted(rows)


def histogram_quantile(rows: list[tuple[float, float]], q: float) -> float:
    """Prometheus' histogram_quantile: linear interpolation inside the bucket holding rank q."""
    if not rows or rows[-1][1] <= 0:
        return float("nan")
    rank = q * rows[-1][1]
    lower, below = 0.0, 0.0
    for bound, cumulative in rows:
        if cumulative >= rank:
            if bound == float("inf"):
                return lower
            inside = cumulative - below
            return lower + (bound - lower) * ((rank - below) / inside if inside else 0.0)
        lower, below = bound, cumulative
    return lower


def bucket_counts(rows: list[tuple[float, float]]) -> dict[str, int]:
    """Non-cumulative counts per bucket label, for people to read."""
    out: dict[str, int] = {}
    below = 0.0
    for bound, cumulative in rows:
        if cumulative - below > 0:
            out[f"<={bound:g}"] = int(cumulative - below)
        below = cumulative
    return out


# -- processes --------------------------------------------------------------------------------------
class RedisProcess:
    """A private redis-server on a free port, without persistence."""

    def __init__(self, directory: Path) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise SystemExit("redis-server is not on the PATH (apt-get install redis-server)")
        self.port = free_port()
        self.process = subprocess.Popen(
            [
                binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(directory),
                "--logfile",
                str(directory / "redis.log"),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.client = redis.Redis(port=self.port, socket_connect_timeout=1.0)

        def answers() -> bool:
            try:
                return bool(self.client.ping())
            except redis.RedisError:
                return False

        wait_for(answers, 10, f"redis-server on port {self.port}")
        self.version = str(self.client.info("server")["redis_version"])

    def stop(self) -> None:
        """Kill our server (its data is throwaway)."""
        self.client.close()
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)


class RawProducer:
    """The paced load: pre-encoded XADD commands written to a socket, replies skimmed.

    A producer in the benchmark process shares the 2 cores with the worker and Redis; through
    redis-py's pipeline it took about 0.6 of a core at 60k msg/s and so starved the worker it
    measures. Producers run elsewhere in production, so this one does as little as it can.
    """

    def __init__(self, port: int, stream: str, images: list[bytes], maxlen: int = 200_000) -> None:
        def resp(*args: bytes) -> bytes:
            return b"*%d\r\n" % len(args) + b"".join(b"$%d\r\n%s\r\n" % (len(a), a) for a in args)

        head = (b"XADD", stream.encode(), b"MAXLEN", b"~", str(maxlen).encode(), b"*", b"image")
        self.commands = [resp(*head, image) for image in images]
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.sock.setblocking(False)
        self.replies = 0
        self._tail = b""

    def send(self, start: int, count: int) -> None:
        """XADD entries start..start+count-1 (images cycle); read whatever replies have come."""
        n = len(self.commands)
        data = b"".join(self.commands[i % n] for i in range(start, start + count))
        self.sock.setblocking(True)
        self.sock.sendall(data)
        self.sock.setblocking(False)
        self._skim()

    def _skim(self) -> None:
        while True:
            try:
                chunk = self.sock.recv(1 << 20)
            except BlockingIOError:
                return
            if not chunk:
                raise ConnectionError("redis closed the producer's connection")
            self.replies += chunk.count(b"$")  # one bulk string (the new id) per XADD; ids have no $
            self._tail = (self._tail + chunk)[-200:]

    def finish(self, sent: int, timeout: float = 30.0) -> None:
        """Wait for every reply, then close."""
        deadline = time.monotonic() + timeout
        while self.replies < sent:
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"{self.replies} of {sent} XADD replies after {timeout:g}s; last bytes {self._tail!r}"
                )
            self._skim()
            time.sleep(0.001)
        self.sock.close()


class WorkerProcess:
    """One `python -m worker` process, as deployed, with its metrics endpoint."""

    def __init__(
        self,
        bench: Bench,
        name: str,
        stream: str,
        batch_size: int,
        scores_stream: str = "",
        group: str = GROUP,
        engine: str = "auto",
    ) -> None:
        self.name = name
        self.stream = stream
        self.group = group
        self.port = free_port()
        self.log_path = bench.tmp / f"worker-{name}.log"
        argv = [sys.executable, "-m", "worker", "--artifact", str(bench.artifact)]
        argv += ["--redis-url", bench.redis.url, "--input-stream", stream, "--group", group]
        argv += ["--output-stream", OUTPUT, "--dead-letter-stream", "bench:dead-letter"]
        argv += ["--consumer", name, "--batch-size", str(batch_size), "--metrics-host", "127.0.0.1"]
        argv += ["--metrics-port", str(self.port), "--engine", engine]
        if scores_stream:
            argv += ["--scores-stream", scores_stream]
        env = {k: v for k, v in os.environ.items() if not k.startswith("ANOMALY_")}
        env["TF_CPP_MIN_LOG_LEVEL"] = "3"
        self.started = time.perf_counter()
        with open(self.log_path, "wb") as log_file:
            self.process = subprocess.Popen(argv, env=env, stdout=log_file, stderr=subprocess.STDOUT)
        self.pid = self.process.pid
        self.ready_seconds = float("nan")

    def wait_ready(self, timeout: float = 180.0) -> float:
        """Seconds from process start to /readyz answering 200."""

        def ready() -> bool:
            if self.process.poll() is not None:
                tail = self.log_path.read_text(errors="replace")[-3000:]
                raise RuntimeError(f"worker {self.name} exited with {self.process.returncode}:\n{tail}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/readyz", timeout=1) as r:
                    return bool(r.status == 200)
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                return False

        wait_for(ready, timeout, f"worker {self.name} /readyz", interval=0.02)
        self.ready_seconds = time.perf_counter() - self.started
        return self.ready_seconds

    def scrape(self) -> Scrape:
        """Its /metrics."""
        return scrape(self.port)

    def stop(self) -> None:
        """SIGTERM (warm stop: finish the batch in hand), then wait."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)


# -- results ----------------------------------------------------------------------------------------
@dataclass
class Drain:
    """One configuration drained by the real worker(s), paired with bare-loop passes."""

    dtype: str
    batch_size: int
    workers: int
    entries: int
    engine: str = "numpy"
    rates: list[float] = field(default_factory=list)  # worker msg/s per repeat
    bare_rates: list[float] = field(default_factory=list)  # bare loop msg/s per repeat
    rss_peak_mb: float = 0.0
    rss_anon_peak_mb: float = 0.0
    worker_cpu: list[float] = field(default_factory=list)  # cores used by the worker(s), per repeat
    redis_cpu: list[float] = field(default_factory=list)  # cores used by redis-server, per repeat
    scored: float = 0.0
    batch_duration_p50_ms: float = float("nan")

    @property
    def rate(self) -> float:
        return median(self.rates)

    @property
    def bare(self) -> float:
        return median(self.bare_rates)

    @property
    def ratio(self) -> float:
        return median([w / b for w, b in zip(self.rates, self.bare_rates, strict=True)])


@dataclass
class Paced:
    """A producer at a fixed rate, a worker keeping up: latency of every message."""

    label: str
    target_rate: float
    seconds: float
    sent: int = 0
    flagged: int = 0
    achieved_rate: float = 0.0
    latencies_ms: list[int] = field(default_factory=list)
    p50_ms: float = float("nan")
    p99_ms: float = float("nan")
    max_ms: float = float("nan")
    histogram_p50_ms: float = float("nan")
    histogram_p99_ms: float = float("nan")
    latency_buckets: dict[str, int] = field(default_factory=dict)
    batch_size_buckets: dict[str, int] = field(default_factory=dict)
    mean_batch: float = float("nan")
    rss_mb: list[tuple[float, float]] = field(default_factory=list)  # (seconds, MB)
    worker_cpu: float = float("nan")
    redis_cpu: float = float("nan")


class Bench:
    """The run: owns the Redis server, the streams and the worker processes."""

    def __init__(self, plan: Plan, artifact: Path, tmp: Path) -> None:
        self.plan = plan
        self.artifact = artifact
        self.tmp = tmp
        self.redis = RedisProcess(tmp)
        self.r = redis.Redis(port=self.redis.port)
        self.images = load_mnist_uint8()
        self.ids: dict[str, list[bytes]] = {}
        self.wakes: dict[str, int] = {dtype: 0 for dtype in STREAMS}
        self.wake_fields = {d: {"image": payloads(self.images[:1], d)[0], "dtype": d} for d in STREAMS}
        self.workers: list[WorkerProcess] = []

    def close(self) -> None:
        """Stop every worker we started, then our redis-server."""
        for worker in self.workers:
            worker.stop()
        self.r.close()
        self.redis.stop()

    # -- setup
    def prefill(self) -> None:
        """XADD the plan's entries per dtype (pipelined), and an idle group on each stream."""
        for dtype, count in self.plan.entries.items():
            stream = STREAMS[dtype]
            encoded = payloads(self.images[: min(count, len(self.images))], dtype)
            ids: list[bytes] = []
            for start in range(0, count, 1000):
                pipe = self.r.pipeline(transaction=False)
                for i in range(start, min(start + 1000, count)):
                    pipe.execute_command(
                        "XADD", stream, "*", "image", encoded[i % len(encoded)], "dtype", dtype
                    )
                ids.extend(pipe.execute())
            self.ids[dtype] = ids
            for group in (BARE_GROUP, NAIVE_GROUP):
                self.r.xgroup_create(stream, group, id="$", mkstream=True)
        used = self.r.info("memory")["used_memory"] / 2**20
        log(f"pre-filled {self.plan.entries} redis used_memory={used:.0f}MB")

    def rewind(self, dtype: str, entries: int, group: str = GROUP) -> tuple[str, bytes, int]:
        """Rewind `group` to just before the last `entries` pre-filled entries; add a wake-up entry.

        Returns (stream, id of the wake-up entry, entries now undelivered to `group`).
        """
        stream, ids = STREAMS[dtype], self.ids[dtype]
        start = ids[-entries - 1] if entries < len(ids) else b"0"
        self.r.xgroup_setid(stream, group, start)
        self.wakes[dtype] += 1
        # A blocked XREADGROUP is not woken by SETID; a new entry wakes it.
        wake = self.r.xadd(stream, self.wake_fields[dtype])  # type: ignore[arg-type]
        return stream, wake, entries + self.wakes[dtype]

    def group(self, stream: str, group: str = GROUP) -> dict[str, Any]:
        """XINFO GROUPS row of `group`."""
        for info in self.r.xinfo_groups(stream):
            if info["name"] in (group, group.encode()):
                return dict(info)
        raise KeyError(f"group {group} missing on {stream}")

    # -- ceilings
    def bare_consumer(self, dtype: str, batch_size: int, entries: int) -> float:
        """XREADGROUP COUNT batch + decode to a float32 (n, 784) array + XACK, no scoring: msg/s."""
        stream, _, expected = self.rewind(dtype, entries, BARE_GROUP)
        scale = np.float32(1.0 / 255.0)
        done = 0
        started = time.perf_counter()
        while True:
            reply = self.r.xreadgroup(BARE_GROUP, "bare", {stream: ">"}, count=batch_size)
            if not reply:
                break
            items = reply[0][1]  # type: ignore[index]
            ids = [entry_id for entry_id, _ in items]
            raw = [fields[b"image"] for _, fields in items]
            if dtype == "uint8":
                images = np.frombuffer(b"".join(raw), np.uint8).reshape(len(raw), DIM) * scale
            elif dtype == "float32":
                images = np.frombuffer(b"".join(raw), "<f4").reshape(len(raw), DIM).astype(np.float32)
            else:
                images = np.asarray([json.loads(p) for p in raw], np.float32)
            assert images.shape == (len(ids), DIM)
            self.r.xack(stream, BARE_GROUP, *ids)
            done += len(ids)
        elapsed = time.perf_counter() - started
        if done != expected:
            log(f"warning: bare loop read {done} entries, expected {expected}")
        return done / elapsed

    def scoring_ceiling(self) -> dict[str, float]:
        """Forward pass + per-row MSE alone, images/s: both engines per batch size, eager, predict."""
        import tensorflow as tf
        from worker.artifact import load_artifact

        from worker.scoring import KerasScorer, NumpyScorer

        artifact = load_artifact(self.artifact)
        compiled = KerasScorer(artifact, max_batch=1024, jit=True)
        compiled.warm_up(1024)
        engines = {"numpy": NumpyScorer(artifact), "compiled": compiled}
        x = self.images[:1024].astype(np.float32) / 255.0
        seconds = self.plan.ceiling_seconds

        def timed(rows: int, fn: Callable[[], Any]) -> float:
            fn()
            count, started = 0, time.perf_counter()
            while (elapsed := time.perf_counter() - started) < seconds:
                fn()
                count += rows
            return count / elapsed

        out: dict[str, float] = {}
        for name, scorer in engines.items():
            for b in (1, 32, 256, 1024):
                out[f"{name} b{b}"] = timed(b, lambda b=b, s=scorer: s.score_batch(x[:b]))  # type: ignore[misc]
        model = compiled.model
        x256 = x[:256]

        def eager() -> np.ndarray:
            z = tf.constant(x256)
            return np.asarray(tf.reduce_mean(tf.square(z - model(z, training=False)), axis=1))

        def predict() -> np.ndarray:
            return np.mean(np.square(x256 - model.predict(x256, batch_size=256, verbose=0)), axis=1)

        out["eager b256"] = timed(256, eager)
        out["model.predict b256"] = timed(256, predict)
        # The parity the worker relies on, checked on the benchmark's own artifact too.
        for scorer in engines.values():
            np.testing.assert_allclose(scorer.score_batch(x256), predict(), rtol=1e-4, atol=1e-7)
        self._model = model
        return out

    def naive_per_message(self) -> float:
        """One XREADGROUP COUNT 1, decode, model.predict, XADD result and XACK per message: msg/s."""
        stream, _, _ = self.rewind("uint8", self.plan.naive_messages, NAIVE_GROUP)
        model = self._model
        done, started = 0, time.perf_counter()
        while done < self.plan.naive_messages:
            reply = self.r.xreadgroup(NAIVE_GROUP, "naive", {stream: ">"}, count=1)
            if not reply:
                break
            [(entry_id, fields)] = reply[0][1]  # type: ignore[index]
            x = np.frombuffer(fields[b"image"], np.uint8).reshape(1, DIM) / np.float32(255.0)
            score = float(np.mean(np.square(x - model.predict(x, verbose=0))))
            self.r.xadd("bench:naive-scores", {"source_id": entry_id, "score": repr(score)})
            self.r.xack(stream, NAIVE_GROUP, entry_id)
            done += 1
        return done / (time.perf_counter() - started)

    # -- the real worker
    def start_worker(
        self, name: str, stream: str, batch_size: int, group: str, engine: str = "auto"
    ) -> WorkerProcess:
        """Start a worker on `group` (created idle, at the stream's end) and wait for /readyz."""
        if not any(info["name"] in (group, group.encode()) for info in self.r.xinfo_groups(stream)):
            self.r.xgroup_create(stream, group, id="$")
        worker = WorkerProcess(self, name, stream, batch_size, group=group, engine=engine)
        self.workers.append(worker)
        seconds = worker.wait_ready()
        log(f"worker {name} ready in {seconds:.2f}s rss={rss_mb(worker.pid):.0f}MB")
        return worker

    def stop_worker(self, worker: WorkerProcess) -> None:
        """Stop it and forget it."""
        worker.stop()
        self.workers.remove(worker)

    def drain(self, workers: Sequence[WorkerProcess], result: Drain) -> None:
        """Rewind the group over `result.entries` entries; time the workers until all are acknowledged."""
        before = [w.scrape() for w in workers]
        cpu0 = [cpu_seconds(w.pid) for w in workers]
        redis_cpu0 = cpu_seconds(self.redis.process.pid)
        started = time.perf_counter()
        group = workers[0].group
        stream, wake, expected = self.rewind(result.dtype, result.entries, group)
        next_rss = 0.0
        deadline = started + 60 + expected / 200.0
        while True:
            info = self.group(stream, group)
            if info["last-delivered-id"] == wake and info["pending"] == 0:
                break
            now = time.perf_counter()
            if now >= next_rss:
                result.rss_peak_mb = max([result.rss_peak_mb] + [rss_mb(w.pid) for w in workers])
                anon = [rss_mb(w.pid, "RssAnon") for w in workers]
                result.rss_anon_peak_mb = max([result.rss_anon_peak_mb, *anon])
                next_rss = now + 0.1
            if now > deadline:
                raise TimeoutError(f"drain of {expected} {result.dtype} entries did not finish: {info}")
            time.sleep(0.002)
        elapsed = time.perf_counter() - started
        result.rates.append(expected / elapsed)
        result.worker_cpu.append(
            sum(cpu_seconds(w.pid) - c for w, c in zip(workers, cpu0, strict=True)) / elapsed
        )
        result.redis_cpu.append((cpu_seconds(self.redis.process.pid) - redis_cpu0) / elapsed)
        result.rss_peak_mb = max([result.rss_peak_mb] + [rss_mb(w.pid) for w in workers])
        # The last batch's metrics are recorded just after its commit: give them a moment.
        settle = time.monotonic() + 2.0
        while True:
            deltas = [delta(w.scrape(), b) for w, b in zip(workers, before, strict=True)]
            scored = sum(d.get("anomaly_messages_scored_total{}", 0.0) for d in deltas)
            if int(scored) >= expected or time.monotonic() > settle:
                break
            time.sleep(0.01)
        result.scored = scored
        if int(scored) != expected:
            log(f"warning: workers scored {scored:.0f} entries, expected {expected}")
        rows = buckets(deltas[0], "anomaly_batch_duration_seconds")
        result.batch_duration_p50_ms = histogram_quantile(rows, 0.5) * 1000

    def measure(self, workers: Sequence[WorkerProcess], result: Drain) -> Drain:
        """Alternate bare-loop passes and worker drains over the same entries."""
        for _ in range(self.plan.repeats):
            result.bare_rates.append(self.bare_consumer(result.dtype, result.batch_size, result.entries))
            self.drain(workers, result)
        log(
            f"{result.workers} worker(s) {result.engine} {result.dtype} batch {result.batch_size}: "
            f"{result.rate:,.0f} msg/s, bare loop {result.bare:,.0f} msg/s, ratio {result.ratio:.2f}, "
            f"worker cpu {median(result.worker_cpu):.2f} redis cpu {median(result.redis_cpu):.2f}"
        )
        return result

    # -- paced runs
    def paced(
        self,
        worker: WorkerProcess,
        label: str,
        rate: float,
        seconds: float,
        rss_every: float = 0.5,
    ) -> Paced:
        """Produce to the worker's stream at `rate` for `seconds`, then wait for it to finish."""
        result = Paced(label, rate, seconds)
        stream = worker.stream
        producer = RawProducer(self.redis.port, stream, payloads(self.images, "uint8"))
        before = worker.scrape()
        last = self.r.xrevrange(OUTPUT, count=1)
        output_from = last[0][0] if last else b"0-0"  # type: ignore[index]
        cpu0, redis_cpu0 = cpu_seconds(worker.pid), cpu_seconds(self.redis.process.pid)
        sent = 0
        started = time.perf_counter()
        next_rss = 0.0
        while (elapsed := time.perf_counter() - started) < seconds:
            due = min(int(rate * elapsed) - sent, 2000)
            if due > 0:
                producer.send(sent, due)
                sent += due
            else:
                time.sleep(0.0005)
            if elapsed >= next_rss:
                result.rss_mb.append((round(elapsed, 1), rss_mb(worker.pid)))
                next_rss = elapsed + rss_every
        produced = time.perf_counter() - started
        producer.finish(sent)
        last_id = self.r.xinfo_stream(stream)["last-generated-id"]
        result.sent, result.achieved_rate = sent, sent / produced

        def caught_up() -> bool:
            info = self.group(stream, worker.group)
            return bool(info["last-delivered-id"] == last_id and info["pending"] == 0)

        wait_for(caught_up, 120, f"worker to catch up after the {label} paced run", interval=0.01)
        total = time.perf_counter() - started
        result.worker_cpu = (cpu_seconds(worker.pid) - cpu0) / total
        result.redis_cpu = (cpu_seconds(self.redis.process.pid) - redis_cpu0) / total
        result.rss_mb.append((round(total, 1), rss_mb(worker.pid)))
        d = delta(worker.scrape(), before)
        latency_rows = buckets(d, "anomaly_end_to_end_latency_seconds")
        result.histogram_p50_ms = histogram_quantile(latency_rows, 0.5) * 1000
        result.histogram_p99_ms = histogram_quantile(latency_rows, 0.99) * 1000
        result.latency_buckets = bucket_counts(latency_rows)
        size_rows = buckets(d, "anomaly_batch_size")
        result.batch_size_buckets = bucket_counts(size_rows)
        batches = d.get("anomaly_batch_size_count{}", 0.0)
        result.mean_batch = d.get("anomaly_batch_size_sum{}", 0.0) / batches if batches else float("nan")
        result.flagged = int(d.get("anomaly_messages_flagged_total{}", 0.0))
        result.latencies_ms = self.output_latencies(output_from)
        if result.latencies_ms:
            lat = np.asarray(result.latencies_ms)
            result.p50_ms, result.p99_ms = (float(v) for v in np.percentile(lat, [50, 99]))
            result.max_ms = float(lat.max())
        if len(result.latencies_ms) != result.flagged:
            log(
                f"note: {len(result.latencies_ms)} output entries for {result.flagged} flagged (MAXLEN trims)"
            )
        log(
            f"paced {label}: {result.achieved_rate:,.0f} msg/s for {seconds:g}s, latency of "
            f"{len(result.latencies_ms)} flagged p50 {result.p50_ms:.1f} ms p99 {result.p99_ms:.1f} ms, "
            f"histogram p50 {result.histogram_p50_ms:.1f} ms p99 {result.histogram_p99_ms:.1f} ms, "
            f"mean batch {result.mean_batch:.1f}, rss {result.rss_mb[-1][1]:.0f}MB"
        )
        return result

    def output_latencies(self, after: bytes) -> list[int]:
        """(output entry id ms) - (source entry id ms) for every output entry after `after`."""
        out: list[int] = []
        cursor = b"(" + after
        while True:
            rows = self.r.xrange(OUTPUT, min=cursor, count=10_000)
            if not rows:
                return out
            for entry_id, fields in rows:  # type: ignore[union-attr]
                out.append(id_ms(entry_id) - id_ms(fields[b"source_id"]))
            cursor = b"(" + rows[-1][0]  # type: ignore[index]


# -- the run ----------------------------------------------------------------------------------------
def ensure_artifact(plan: Plan, given: Path | None) -> Path:
    """--artifact, else the cached one for this plan (full's if present), else train it."""
    if given is not None:
        return given
    candidates = [CACHE / "dense-64-16-full", CACHE / f"dense-64-16-{plan.name}"]
    for path in candidates:
        # An artifact cached before schema 1.1 has no dense stack: retrain rather than measure TF.
        if (path / "manifest.json").is_file() and (path / "dense_stack.npz").is_file():
            log(f"artifact cached at {path}")
            return path
    out = candidates[-1] if plan is QUICK else candidates[0]
    out.parent.mkdir(parents=True, exist_ok=True)
    log(f"training the benchmark artifact into {out}")
    argv = [sys.executable, "-m", "trainer", "train", "--architecture", "dense-64-16", *plan.train_args]
    argv += ["--seed", "0", "--no-report", "--out", str(out)]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    done = subprocess.run(argv, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"training failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    return out


def machine() -> dict[str, Any]:
    """Where the numbers come from."""
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import tensorflow as tf

    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "load_average_at_start": [round(v, 2) for v in os.getloadavg()],
        "python": platform.python_version(),
        "tensorflow": tf.__version__,
        "numpy": np.__version__,
        "redis_py": redis.__version__,
        "kernel": platform.release(),
    }


@contextmanager
def bench_session(plan: Plan, artifact: Path) -> Iterator[Bench]:
    """A Bench whose workers and redis-server are stopped whatever happens."""
    with tempfile.TemporaryDirectory(prefix="anomaly-bench-") as tmp:
        bench = Bench(plan, artifact, Path(tmp))
        try:
            yield bench
        finally:
            bench.close()


def run(plan: Plan, artifact: Path, flat_seconds: float) -> dict[str, Any]:
    """Every measurement of the plan; returns the JSON-able results."""
    results: dict[str, Any] = {"plan": asdict(plan), "artifact": str(artifact)}
    results["machine"] = machine()
    with bench_session(plan, artifact) as bench:
        results["redis_version"] = bench.redis.version
        bench.prefill()
        log("scoring ceiling (compiled forward pass + MSE alone), eager call, model.predict")
        results["scoring_images_per_s"] = bench.scoring_ceiling()
        log("scoring: " + ", ".join(f"{k} {v:,.0f}/s" for k, v in results["scoring_images_per_s"].items()))
        results["naive_msgs_per_s"] = bench.naive_per_message()
        log(f"naive model.predict per message: {results['naive_msgs_per_s']:.1f} msg/s")

        drains: list[Drain] = []
        ready: dict[str, float] = {}
        main: WorkerProcess | None = None  # uint8, batch 256: kept for the paced runs
        for dtype, batch_size, entries in plan.drains:
            name = f"{dtype}-b{batch_size}"
            # One group per configuration: an idle worker never takes another one's entries.
            worker = bench.start_worker(name, STREAMS[dtype], batch_size, group=f"{GROUP}-{name}")
            ready[name] = worker.ready_seconds
            drains.append(bench.measure([worker], Drain(dtype, batch_size, 1, entries)))
            if plan.two_workers and (dtype, batch_size) == ("uint8", 256):
                other = bench.start_worker(f"{name}-second", STREAMS[dtype], batch_size, group=worker.group)
                ready[other.name] = other.ready_seconds
                drains.append(bench.measure([worker, other], Drain(dtype, batch_size, 2, entries)))
                bench.stop_worker(other)
            if plan.tensorflow_drain and (dtype, batch_size) == ("uint8", 256):
                tf_name = f"{name}-tensorflow"
                reference = bench.start_worker(
                    tf_name, STREAMS[dtype], batch_size, group=f"{GROUP}-{tf_name}", engine="tensorflow"
                )
                ready[tf_name] = reference.ready_seconds
                drains.append(bench.measure([reference], Drain(dtype, batch_size, 1, entries, "tensorflow")))
                bench.stop_worker(reference)
            if (dtype, batch_size) == ("uint8", 256):
                main = worker
            else:
                bench.stop_worker(worker)
        results["drains"] = [{**asdict(d), "rate": d.rate, "bare": d.bare, "ratio": d.ratio} for d in drains]
        results["ready_seconds"] = ready

        single = next(
            d for d in drains if (d.dtype, d.batch_size, d.workers, d.engine) == ("uint8", 256, 1, "numpy")
        )
        half = single.rate / 2
        if main is None:
            raise ValueError("the plan needs a uint8 batch-256 drain: the paced runs reuse its worker")
        worker = main
        paced = [
            bench.paced(worker, "half of max", half, plan.paced_seconds),
            bench.paced(worker, f"{plan.fixed_rate:,.0f} msg/s", plan.fixed_rate, plan.paced_seconds),
        ]
        if flat_seconds > 0:
            log(f"memory trend: {flat_seconds:g}s at {half:,.0f} msg/s")
            paced.append(bench.paced(worker, "memory trend", half, flat_seconds, rss_every=5.0))
        bench.stop_worker(worker)
        results["paced"] = [asdict(p) | {"latencies_ms": None} for p in paced]
        results["latency_samples_ms"] = {p.label: p.latencies_ms for p in paced if p.latencies_ms}
    results["load_average_at_end"] = [round(v, 2) for v in os.getloadavg()]
    return results


# -- report -----------------------------------------------------------------------------------------
def main_drain(results: dict[str, Any]) -> dict[str, Any]:
    """The one worker, uint8, batch 256, default engine drain: the reference of every ratio."""
    return next(
        d
        for d in results["drains"]
        if (d["dtype"], d["batch_size"], d["workers"], d.get("engine", "numpy")) == ("uint8", 256, 1, "numpy")
    )


def table_rows(results: dict[str, Any]) -> list[list[str]]:
    """The one table: scenario, msg/s, ratio to its ceiling, latency, RSS, CPU."""
    drains = results["drains"]
    ceiling = main_drain(results)
    rows: list[list[str]] = []

    def add(
        name: str, rate: float, ratio: str = "", p50: str = "", p99: str = "", rss: str = "", cpu: str = ""
    ) -> None:
        rows.append([name, f"{rate:,.0f}" if rate >= 100 else f"{rate:.1f}", ratio, p50, p99, rss, cpu])

    add("bare consumer loop, uint8, batch 256 (the ceiling)", ceiling["bare"], "1.00")
    for name, rate in results["scoring_images_per_s"].items():
        add(f"forward pass + MSE alone, {name}", rate, f"{rate / ceiling['bare']:.2f}")
    for d in drains:
        who = "2 workers" if d["workers"] == 2 else "worker"
        if d.get("engine", "numpy") != "numpy":
            who += f" ({d['engine']} engine)"
        cpu = f"{median(d['worker_cpu']):.2f} + {median(d['redis_cpu']):.2f}"
        add(
            f"bare loop, {d['dtype']}, batch {d['batch_size']}",
            d["bare"],
            f"{d['bare'] / ceiling['bare']:.2f}",
        )
        add(
            f"{who}, {d['dtype']}, batch {d['batch_size']} (vs bare loop above)",
            d["rate"],
            f"{d['ratio']:.2f}",
            rss=f"{d['rss_peak_mb']:.0f}",
            cpu=cpu,
        )
    add(
        "naive: model.predict per message",
        results["naive_msgs_per_s"],
        f"{results['naive_msgs_per_s'] / ceiling['bare']:.4f}",
    )
    for p in results["paced"]:
        rss = max(v for _, v in p["rss_mb"])
        add(
            f"paced, {p['label']} (target {p['target_rate']:,.0f}), mean batch {p['mean_batch']:.1f}",
            p["achieved_rate"],
            p50=f"{p['p50_ms']:.1f}",
            p99=f"{p['p99_ms']:.1f}",
            rss=f"{rss:.0f}",
            cpu=f"{p['worker_cpu']:.2f} + {p['redis_cpu']:.2f}",
        )
    return rows


HEADER = ["scenario", "msg/s", "ratio", "p50 ms", "p99 ms", "RSS MB", "CPU worker+redis"]


def format_table(rows: list[list[str]]) -> str:
    """Fixed-width text table."""
    widths = [max(len(r[i]) for r in [HEADER, *rows]) for i in range(len(HEADER))]
    lines = [
        "  ".join(
            h.ljust(w) if i == 0 else h.rjust(w) for i, (h, w) in enumerate(zip(HEADER, widths, strict=True))
        )
    ]
    lines.append("  ".join("-" * w for w in widths))
    for r in rows:
        lines.append(
            "  ".join(
                c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True))
            )
        )
    return "\n".join(lines)


def targets(results: dict[str, Any]) -> list[tuple[str, str, bool]]:
    """(target, measured, met) for every target of issue 6."""
    out: list[tuple[str, str, bool]] = []
    # The targets hold for the worker as deployed: the default engine (numpy for dense models).
    default = [d for d in results["drains"] if d.get("engine", "numpy") == "numpy"]
    drains = [d for d in default if d["workers"] == 1 and d["batch_size"] == 256]
    for d in drains:
        if d["dtype"] in TARGET_RATIO:
            goal = TARGET_RATIO[d["dtype"]]
            out.append(
                (f"worker/bare loop, {d['dtype']}, >= {goal}", f"{d['ratio']:.2f}", d["ratio"] >= goal)
            )
    half = results["paced"][0]
    out.append(
        (
            f"p50 at half of max rate < {TARGET_P50_MS:g} ms",
            f"{half['p50_ms']:.1f} ms",
            half["p50_ms"] < TARGET_P50_MS,
        )
    )
    out.append(
        (
            f"p99 at half of max rate < {TARGET_P99_MS:g} ms",
            f"{half['p99_ms']:.1f} ms",
            half["p99_ms"] < TARGET_P99_MS,
        )
    )
    fixed = results["paced"][1]
    full_batch_ms = 256 / fixed["target_rate"] * 1000
    out.append(
        (
            f"at {fixed['target_rate']:,.0f} msg/s no wait for a full batch ({full_batch_ms:.0f} ms)",
            f"mean batch {fixed['mean_batch']:.1f}, p99 {fixed['p99_ms']:.1f} ms",
            fixed["mean_batch"] < 128 and fixed["p99_ms"] < full_batch_ms,
        )
    )
    ready = max(v for k, v in results["ready_seconds"].items() if not k.endswith("-tensorflow"))
    out.append(
        (f"start to ready < {TARGET_READY_S:g} s", f"{ready:.1f} s (slowest start)", ready < TARGET_READY_S)
    )
    rss = max([d["rss_peak_mb"] for d in default] + [v for p in results["paced"] for _, v in p["rss_mb"]])
    out.append((f"RSS under load < {TARGET_RSS_MB:g} MB", f"{rss:.0f} MB (peak)", rss < TARGET_RSS_MB))
    trend = next((p for p in results["paced"] if p["label"] == "memory trend"), None)
    if trend:
        series = [(t, v) for t, v in trend["rss_mb"] if t >= 30]
        if len(series) >= 3:
            t, v = np.asarray(series).T
            slope = float(np.polyfit(t / 60, v, 1)[0])
            growth = v[-1] - v[0]
            flat = growth < 0.05 * v[0]
            out.append(
                (
                    f"RSS flat over {trend['seconds'] / 60:.0f} min",
                    f"{v[0]:.0f} -> {v[-1]:.0f} MB after the first 30 s, slope {slope:+.2f} MB/min",
                    flat,
                )
            )
    two = next((d for d in results["drains"] if d["workers"] == 2), None)
    if two:
        one = main_drain(results)
        out.append(
            ("two workers on one group (report)", f"{two['rate'] / one['rate']:.2f}x one worker", True)
        )
    return out


def write_results(
    results: dict[str, Any], out_dir: Path, table: str, goals: list[tuple[str, str, bool]]
) -> None:
    """throughput.json, throughput.md and throughput.png in `out_dir`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "throughput.json").write_text(json.dumps(results, indent=1, default=str) + "\n")
    m = results["machine"]
    lines = [
        f"# Benchmark results ({results['plan']['name']} run, {results['finished']})",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores (shared; load average "
        f"{m['load_average_at_start']} at start, {results['load_average_at_end']} at end), "
        f"Python {m['python']}, TensorFlow {m['tensorflow']}, "
        f"redis-py {m['redis_py']} with hiredis, Redis {results['redis_version']}.",
        "",
        "Ratio: the worker's rate over the bare consumer loop's on the same entries, measured just "
        "before it; for the ceilings, over the uint8 batch-256 bare loop. CPU: cores used by the "
        "worker(s) + by redis-server. RSS: peak VmRSS (rss_anon_peak_mb in the JSON is the private "
        "part). Workers use the numpy engine unless the row says tensorflow engine; targets are "
        "checked on the numpy-engine workers, as deployed.",
        "",
        "| " + " | ".join(HEADER) + " |",
        "|" + "---|" * len(HEADER),
    ]
    lines += ["| " + " | ".join(r) + " |" for r in table_rows(results)]
    lines += ["", "| target | measured | met |", "|---|---|---|"]
    lines += [f"| {g} | {v} | {'yes' if ok else 'NO'} |" for g, v, ok in goals]
    lines += [
        "",
        "Start to ready (s): " + ", ".join(f"{k} {v:.1f}" for k, v in results["ready_seconds"].items()),
    ]
    for p in results["paced"]:
        lines += [
            "",
            f"Paced {p['label']}: batch sizes {p['batch_size_buckets']}; "
            f"worker latency histogram {p['latency_buckets']} "
            f"(histogram p50 {p['histogram_p50_ms']:.1f} ms, p99 {p['histogram_p99_ms']:.1f} ms)",
        ]
    (out_dir / "throughput.md").write_text("\n".join(lines) + "\n")
    plot(results, out_dir / "throughput.png")


def plot(results: dict[str, Any], path: Path) -> None:
    """Throughput bars (log scale) and the latency distribution of the paced runs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names, rates, colors = [], [], []
    for d in results["drains"]:
        label = f"{d['dtype']} b{d['batch_size']}" + (" x2" if d["workers"] == 2 else "")
        label += " tf" if d.get("engine", "numpy") != "numpy" else ""
        names += [f"bare {label}", f"worker {label}"]
        rates += [d["bare"], d["rate"]]
        colors += ["#9ecae1", "#3182bd"]
    for name, rate in results["scoring_images_per_s"].items():
        names.append(f"score {name}")
        rates.append(rate)
        colors.append("#a1d99b")
    names.append("naive predict/msg")
    rates.append(results["naive_msgs_per_s"])
    colors.append("#fc9272")
    fig, (left, right) = plt.subplots(1, 2, figsize=(14, 0.32 * len(names) + 2))
    left.barh(names[::-1], rates[::-1], color=colors[::-1])
    left.set_xscale("log")
    left.set_xlabel("messages (images) per second, log scale")
    left.set_title("throughput: ceilings (light) vs the worker (dark)")
    for label, samples in results["latency_samples_ms"].items():
        values = np.sort(np.asarray(samples))
        right.plot(values, np.arange(1, len(values) + 1) / len(values), label=label)
    right.axvline(TARGET_P50_MS, color="grey", linestyle=":", label=f"p50 target {TARGET_P50_MS:g} ms")
    right.axvline(TARGET_P99_MS, color="grey", linestyle="--", label=f"p99 target {TARGET_P99_MS:g} ms")
    right.set_xscale("symlog", linthresh=1)
    right.set_xlim(left=0)
    right.set_xlabel("end-to-end latency, ms (XADD to committed result)")
    right.set_ylabel("share of messages")
    right.set_title("paced runs: latency CDF")
    right.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    """Entry point: python -m benchmarks.throughput [--quick]."""
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.throughput", description=__doc__.split("\n")[0]
    )
    parser.add_argument(
        "--quick", action="store_true", help="smoke run (under a minute): small streams, no long runs"
    )
    parser.add_argument("--artifact", type=Path, help="use this artifact instead of the cached/trained one")
    parser.add_argument("--out", type=Path, default=RESULTS, help=f"results directory (default: {RESULTS})")
    parser.add_argument(
        "--flat-seconds",
        type=float,
        default=None,
        help="length of the memory-trend run (full: 600, quick: 0)",
    )
    args = parser.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    plan = QUICK if args.quick else FULL
    started = time.perf_counter()
    artifact = ensure_artifact(plan, args.artifact)
    flat = plan.flat_seconds if args.flat_seconds is None else args.flat_seconds
    results = run(plan, artifact, flat)
    results["finished"] = time.strftime("%Y-%m-%d %H:%M")
    results["wall_seconds"] = round(time.perf_counter() - started, 1)
    table = format_table(table_rows(results))
    goals = targets(results)
    write_results(results, args.out, table, goals)
    print(table)
    print()
    for goal, value, ok in goals:
        print(f"{'met ' if ok else 'MISS'}  {goal}: {value}")
    print(f"\nwall time {results['wall_seconds']:.0f}s; results in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
