"""Step 5: a producer at a fixed rate into a worker's stream; the latency of every flagged message."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import cast

import numpy as np

from benchmarks.throughput.helpers import (
    StreamEntries,
    bucket_counts,
    buckets,
    cpu_seconds,
    delta,
    histogram_quantile,
    id_ms,
    log,
    rss_mb,
    wait_for,
)
from benchmarks.throughput.plan import OUTPUT
from benchmarks.throughput.processes import RawProducer, WorkerProcess
from benchmarks.throughput.project import payloads
from benchmarks.throughput.session import Bench


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


def paced_run(
    bench: Bench,
    worker: WorkerProcess,
    label: str,
    rate: float,
    seconds: float,
    rss_every: float = 0.5,
) -> Paced:
    """Produce to the worker's stream at `rate` for `seconds`, then wait for it to finish."""
    result = Paced(label, rate, seconds)
    stream = worker.stream
    producer = RawProducer(bench.redis.port, stream, payloads(bench.images, "uint8"))
    before = worker.scrape()
    last = cast(StreamEntries, bench.r.xrevrange(OUTPUT, count=1))
    output_from = last[0][0] if last else b"0-0"
    cpu0, redis_cpu0 = cpu_seconds(worker.pid), cpu_seconds(bench.redis.process.pid)
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
    last_id = bench.r.xinfo_stream(stream)["last-generated-id"]
    result.sent, result.achieved_rate = sent, sent / produced

    def caught_up() -> bool:
        info = bench.group(stream, worker.group)
        return bool(info["last-delivered-id"] == last_id and info["pending"] == 0)

    wait_for(caught_up, 120, f"worker to catch up after the {label} paced run", interval=0.01)
    total = time.perf_counter() - started
    result.worker_cpu = (cpu_seconds(worker.pid) - cpu0) / total
    result.redis_cpu = (cpu_seconds(bench.redis.process.pid) - redis_cpu0) / total
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
    result.latencies_ms = output_latencies(bench, output_from)
    if result.latencies_ms:
        lat = np.asarray(result.latencies_ms)
        result.p50_ms, result.p99_ms = (float(v) for v in np.percentile(lat, [50, 99]))
        result.max_ms = float(lat.max())
    if len(result.latencies_ms) != result.flagged:
        log(f"note: {len(result.latencies_ms)} output entries for {result.flagged} flagged (MAXLEN trims)")
    log(
        f"paced {label}: {result.achieved_rate:,.0f} msg/s for {seconds:g}s, latency of "
        f"{len(result.latencies_ms)} flagged p50 {result.p50_ms:.1f} ms p99 {result.p99_ms:.1f} ms, "
        f"histogram p50 {result.histogram_p50_ms:.1f} ms p99 {result.histogram_p99_ms:.1f} ms, "
        f"mean batch {result.mean_batch:.1f}, rss {result.rss_mb[-1][1]:.0f}MB"
    )
    return result


def output_latencies(bench: Bench, after: bytes) -> list[int]:
    """(output entry id ms) - (source entry id ms) for every output entry after `after`."""
    out: list[int] = []
    cursor = b"(" + after
    while True:
        rows = cast(StreamEntries, bench.r.xrange(OUTPUT, min=cursor, count=10_000))
        if not rows:
            return out
        for entry_id, fields in rows:
            out.append(id_ms(entry_id) - id_ms(fields[b"source_id"]))
        cursor = b"(" + rows[-1][0]
