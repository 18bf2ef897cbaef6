"""Shared helpers: progress log, free ports, polling with a deadline, /proc CPU and RSS, MNIST
digits, and Prometheus text turned into histograms and quantiles."""

from __future__ import annotations

import gzip
import os
import socket
import sys
import time
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from benchmarks.throughput.plan import DIM, MNIST_TEST


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


def family(pid: int) -> list[int]:
    """The process and its living descendants (a worker's scoring process), from /proc."""
    out, todo = [], [pid]
    while todo:
        current = todo.pop()
        out.append(current)
        for children in Path(f"/proc/{current}/task").glob("*/children"):
            try:
                todo.extend(int(child) for child in children.read_text().split())
            except OSError:  # the thread or process ended meanwhile
                continue
    return out


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process and its living descendants (all threads), from /proc."""
    total = 0
    for member in family(pid):
        try:
            with open(f"/proc/{member}/stat") as handle:
                fields = handle.read().rsplit(")", 1)[1].split()
        except OSError:  # a descendant that ended meanwhile
            continue
        total += int(fields[11]) + int(fields[12])
    return total / CLOCK_TICKS


def rss_mb(pid: int, field: str = "VmRSS") -> float:
    """Resident memory (VmRSS, or RssAnon: the private part) of a process and its living
    descendants in MB."""
    total = 0.0
    for member in family(pid):
        try:
            with open(f"/proc/{member}/status") as handle:
                total += next((int(line.split()[1]) for line in handle if line.startswith(field + ":")), 0)
        except OSError:
            continue
    return total / 1024.0 if total else float("nan")


def id_ms(entry_id: bytes | str) -> int:
    """Milliseconds part of a stream entry id."""
    text = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
    return int(text.split("-", 1)[0])


def load_mnist_uint8() -> np.ndarray:
    """The 10,000 MNIST test digits the project ships, as (N, 784) uint8."""
    with gzip.open(MNIST_TEST, "rb") as handle:
        raw = handle.read()
    return np.frombuffer(raw, np.uint8, offset=16).reshape(-1, DIM)


def median(values: Sequence[float]) -> float:
    """Median, NaN for nothing."""
    return float(np.median(values)) if len(values) else float("nan")


# Stream entries as redis-py returns them to a client without decode_responses: ids and fields are
# bytes. Its type hints cover every reply type, so replies are cast to this where they arrive.
StreamEntries = list[tuple[bytes, dict[bytes, bytes]]]
StreamReply = list[tuple[bytes, StreamEntries]]  # XREADGROUP: (stream, entries) per stream


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
