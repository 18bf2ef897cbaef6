"""The steps in order: the artifact, the machine, then every measurement of a plan in one session."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import redis

from benchmarks.throughput.ceilings import naive_per_message, region_cost, scoring_ceiling
from benchmarks.throughput.drains import Drain, measure
from benchmarks.throughput.helpers import log
from benchmarks.throughput.paced import paced_run
from benchmarks.throughput.plan import CACHE, GROUP, STREAMS, Plan
from benchmarks.throughput.processes import WorkerProcess
from benchmarks.throughput.session import bench_session
from benchmarks.throughput.variants import (
    memory_trend,
    other_detector,
    tensorflow_engine,
    two_workers,
    with_shadow,
)


def ensure_artifact(
    plan: Plan, given: Path | None, flags: tuple[str, ...] = (), slug: str = "default"
) -> Path:
    """--artifact, else the cached one trained with these `train` flags, else train it.

    The default detector without flags; `flags` for the plan's other detectors. A cached artifact
    is reused only when it was trained with the same command (recorded next to it)."""
    if given is not None:
        return given
    out = CACHE / f"{slug}-{plan.name}"
    return trained(out, ["train", *flags, *plan.train_args, "--seed", "0", "--no-report", "--out", str(out)])


def trained(out: Path, argv: list[str]) -> Path:
    """`anomaly-trainer ARGV` writing `out`, unless `out` holds an artifact the same command wrote
    (recorded next to it as OUT.argv.json)."""
    recorded = out.with_suffix(".argv.json")
    if (out / "manifest.json").is_file() and recorded.is_file() and json.loads(recorded.read_text()) == argv:
        log(f"artifact cached at {out}")
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    log(f"training into {out}: anomaly-trainer {' '.join(argv)}")
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    done = subprocess.run(
        [sys.executable, "-m", "trainer", *argv], env=env, capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        raise SystemExit(f"training failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    recorded.write_text(json.dumps(argv))
    return out


def detector_artifacts(plan: Plan) -> dict[str, Path]:
    """The plan's other detectors, each trained (or found cached) by its label."""
    return {
        label: ensure_artifact(plan, None, flags, slug=f"detector-{index}")
        for index, (label, flags) in enumerate(plan.detectors)
    }


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


def run(
    plan: Plan, artifact: Path, flat_seconds: float, detectors: dict[str, Path] | None = None
) -> dict[str, Any]:
    """Every measurement of the plan; returns the JSON-able results."""
    results: dict[str, Any] = {"plan": asdict(plan), "artifact": str(artifact)}
    results["machine"] = machine()
    with bench_session(plan, artifact) as bench:
        results["redis_version"] = bench.redis.version
        bench.prefill()
        log("scoring ceiling (both engines, the artifact's score), eager call and model.predict (mse)")
        results["scoring_images_per_s"], model = scoring_ceiling(bench)
        log("scoring: " + ", ".join(f"{k} {v:,.0f}/s" for k, v in results["scoring_images_per_s"].items()))
        results["naive_msgs_per_s"] = naive_per_message(bench, model)
        log(f"naive model.predict per message: {results['naive_msgs_per_s']:.1f} msg/s")

        drains: list[Drain] = []
        ready: dict[str, float] = {}
        main: WorkerProcess | None = None  # uint8, batch 256: kept for the paced runs
        for dtype, batch_size, entries in plan.drains:
            name = f"{dtype}-b{batch_size}"
            # One group per configuration: an idle worker never takes another one's entries.
            worker = bench.start_worker(name, STREAMS[dtype], batch_size, group=f"{GROUP}-{name}")
            ready[name] = worker.ready_seconds
            drains.append(measure(bench, [worker], Drain(dtype, batch_size, 1, entries)))
            if plan.two_workers and (dtype, batch_size) == ("uint8", 256):
                drains.append(two_workers(bench, worker, dtype, batch_size, entries, ready))
            if plan.tensorflow_drain and (dtype, batch_size) == ("uint8", 256):
                drains.append(tensorflow_engine(bench, name, dtype, batch_size, entries, ready))
            if plan.shadow_drain and (dtype, batch_size) == ("uint8", 256):
                drains.append(with_shadow(bench, name, dtype, batch_size, entries, ready))
            if (dtype, batch_size) == ("uint8", 256):
                for label, path in (detectors or {}).items():
                    drains.append(other_detector(bench, label, path, dtype, batch_size, entries, ready))
            if (dtype, batch_size) == ("uint8", 256):
                main = worker
            else:
                bench.stop_worker(worker)
        results["drains"] = [{**asdict(d), "rate": d.rate, "bare": d.bare, "ratio": d.ratio} for d in drains]
        results["region_cost"] = region = region_cost(
            bench.artifact, bench.images, bench.plan.ceiling_seconds
        )
        results["ready_seconds"] = ready

        single = next(
            d for d in drains if (d.dtype, d.batch_size, d.workers, d.engine) == ("uint8", 256, 1, "numpy")
        )
        # The worker's time per batch of 256 in its drain: what the region adds to, on the same machine.
        batch_ms = 256 / single.rate * 1000.0
        region["worker_batch_ms"] = batch_ms
        region["share_of_worker_batch"] = region["explain_flagged_ms"] / batch_ms
        region["share_of_worker_batch_every_row"] = region["region_every_row_ms"] / batch_ms
        log(
            f"region and score components: {region['explain_flagged_ms']:.3f} ms per batch of 256 "
            f"({region['flagged_rows']:.0f} flagged) = {region['share_of_worker_batch']:.1%} "
            f"of the worker's {batch_ms:.2f} ms; "
            f"every row (scores stream on) {region['region_every_row_ms']:.3f} ms "
            f"= {region['share_of_worker_batch_every_row']:.1%}"
        )
        half = single.rate / 2
        if main is None:
            raise ValueError("the plan needs a uint8 batch-256 drain: the paced runs reuse its worker")
        worker = main
        paced = [
            paced_run(bench, worker, "half of max", half, plan.paced_seconds),
            paced_run(bench, worker, f"{plan.fixed_rate:,.0f} msg/s", plan.fixed_rate, plan.paced_seconds),
        ]
        if flat_seconds > 0:
            paced.append(memory_trend(bench, worker, half, flat_seconds))
        bench.stop_worker(worker)
        results["paced"] = [asdict(p) | {"latencies_ms": None} for p in paced]
        results["latency_samples_ms"] = {p.label: p.latencies_ms for p in paced if p.latencies_ms}
    results["load_average_at_end"] = [round(v, 2) for v in os.getloadavg()]
    return results
