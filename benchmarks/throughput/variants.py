"""Step 6: the uint8 batch-256 drain with two workers on one group, with the TensorFlow engine and
with a shadow model, and the memory trend of a long paced run. Start-to-ready time is taken for
every worker started (`WorkerProcess.wait_ready`); resident memory during every drain and paced run."""

from __future__ import annotations

from pathlib import Path

from benchmarks.throughput.drains import SHADOW_ENGINE, Drain, measure
from benchmarks.throughput.helpers import log
from benchmarks.throughput.paced import Paced, paced_run
from benchmarks.throughput.plan import GROUP, STREAMS
from benchmarks.throughput.processes import WorkerProcess
from benchmarks.throughput.session import Bench


def two_workers(
    bench: Bench, worker: WorkerProcess, dtype: str, batch_size: int, entries: int, ready: dict[str, float]
) -> Drain:
    """The same drain by `worker` and a second process on its group; records the second's start in `ready`."""
    other = bench.start_worker(f"{worker.name}-second", STREAMS[dtype], batch_size, group=worker.group)
    ready[other.name] = other.ready_seconds
    result = measure(bench, [worker, other], Drain(dtype, batch_size, 2, entries))
    bench.stop_worker(other)
    return result


def tensorflow_engine(
    bench: Bench, name: str, dtype: str, batch_size: int, entries: int, ready: dict[str, float]
) -> Drain:
    """The same drain by a worker with `--engine tensorflow`, for reference; records its start in `ready`."""
    tf_name = f"{name}-tensorflow"
    reference = bench.start_worker(
        tf_name, STREAMS[dtype], batch_size, group=f"{GROUP}-{tf_name}", engine="tensorflow"
    )
    ready[tf_name] = reference.ready_seconds
    result = measure(bench, [reference], Drain(dtype, batch_size, 1, entries, "tensorflow"))
    bench.stop_worker(reference)
    return result


def with_shadow(
    bench: Bench, name: str, dtype: str, batch_size: int, entries: int, ready: dict[str, float]
) -> Drain:
    """The same drain by a worker that also scores every batch with a shadow model (the same
    artifact: a second forward pass, the shadow metrics); records its start in `ready`."""
    shadow_name = f"{name}-shadow"
    worker = bench.start_worker(
        shadow_name, STREAMS[dtype], batch_size, group=f"{GROUP}-{shadow_name}", shadow=True
    )
    ready[shadow_name] = worker.ready_seconds
    result = measure(bench, [worker], Drain(dtype, batch_size, 1, entries, SHADOW_ENGINE))
    bench.stop_worker(worker)
    return result


def other_detector(
    bench: Bench,
    label: str,
    artifact: Path,
    dtype: str,
    batch_size: int,
    entries: int,
    ready: dict[str, float],
) -> Drain:
    """The same drain by a worker serving another detector (`label`); records its start in `ready`."""
    name = "detector-" + "".join(c if c.isalnum() else "-" for c in label.split(" (")[0])
    worker = bench.start_worker(name, STREAMS[dtype], batch_size, group=f"{GROUP}-{name}", artifact=artifact)
    ready[name] = worker.ready_seconds
    result = measure(bench, [worker], Drain(dtype, batch_size, 1, entries, detector=label))
    bench.stop_worker(worker)
    return result


def memory_trend(bench: Bench, worker: WorkerProcess, rate: float, seconds: float) -> Paced:
    """A long paced run sampling the worker's RSS every 5 s."""
    log(f"memory trend: {seconds:g}s at {rate:,.0f} msg/s")
    return paced_run(bench, worker, "memory trend", rate, seconds, rss_every=5.0)
