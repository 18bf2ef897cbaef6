"""Step 4: the real worker draining pre-filled entries, each drain paired with a bare-loop pass."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from benchmarks.throughput.ceilings import bare_consumer
from benchmarks.throughput.helpers import buckets, cpu_seconds, delta, histogram_quantile, log, median, rss_mb
from benchmarks.throughput.processes import WorkerProcess
from benchmarks.throughput.session import Bench

# The engine label of a drain whose worker also runs a shadow model: not the deployed default, so
# it is neither the reference of the ratios nor checked against the targets.
SHADOW_ENGINE = "numpy+shadow"


@dataclass
class Drain:
    """One configuration drained by the real worker(s), paired with bare-loop passes."""

    dtype: str
    batch_size: int
    workers: int
    entries: int
    engine: str = "numpy"
    detector: str = "default"  # the default detector (the main artifact), or another one's label
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


def drain(bench: Bench, workers: Sequence[WorkerProcess], result: Drain) -> None:
    """Rewind the group over `result.entries` entries; time the workers until all are acknowledged."""
    before = [w.scrape() for w in workers]
    cpu0 = [cpu_seconds(w.pid) for w in workers]
    redis_cpu0 = cpu_seconds(bench.redis.process.pid)
    started = time.perf_counter()
    group = workers[0].group
    stream, wake, expected = bench.rewind(result.dtype, result.entries, group)
    next_rss = 0.0
    deadline = started + 60 + expected / 200.0
    while True:
        info = bench.group(stream, group)
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
    result.redis_cpu.append((cpu_seconds(bench.redis.process.pid) - redis_cpu0) / elapsed)
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


def measure(bench: Bench, workers: Sequence[WorkerProcess], result: Drain) -> Drain:
    """Alternate bare-loop passes and worker drains over the same entries."""
    for _ in range(bench.plan.repeats):
        result.bare_rates.append(bare_consumer(bench, result.dtype, result.batch_size, result.entries))
        drain(bench, workers, result)
    log(
        f"{result.workers} worker(s) {result.engine} {result.dtype} batch {result.batch_size}: "
        f"{result.rate:,.0f} msg/s, bare loop {result.bare:,.0f} msg/s, ratio {result.ratio:.2f}, "
        f"worker cpu {median(result.worker_cpu):.2f} redis cpu {median(result.redis_cpu):.2f}"
    )
    return result
