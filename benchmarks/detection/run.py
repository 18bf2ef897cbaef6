"""The measurements: train each detector, score the anomaly kinds, serve it, run the one-class protocol."""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.detection.kinds import FASHION, SEEN, UNSEEN
from benchmarks.throughput.drains import Drain, measure
from benchmarks.throughput.helpers import log
from benchmarks.throughput.plan import CACHE, GROUP, QUICK, STREAMS
from benchmarks.throughput.run import trained
from benchmarks.throughput.session import bench_session
from detector.datasets import Dataset, load_dataset
from detector.loading import load_scorer
from detector.thresholds import flag_rate
from trainer.benchmark import BenchmarkResult, BenchmarkRun
from trainer.config import DetectorConfig
from trainer.evaluate import auroc

SEED = 0


def train(detector: DetectorConfig, slug: str, extra: tuple[str, ...]) -> tuple[Path, float]:
    """The detector's artifact (cached when trained by the same command) and its training seconds."""
    out = CACHE / "detection" / slug
    trained(out, ["train", *detector.flags(), *extra, "--seed", str(SEED), "--no-report", "--out", str(out)])
    baseline = json.loads((out / "baseline.json").read_text())
    return out, float(baseline["training"]["duration_seconds"])


def score_kinds(artifact: Path, mnist: Dataset, fashion: Dataset | None) -> dict[str, Any]:
    """AUROC and flag rates of every anomaly kind against normal test digits, as the worker scores."""
    loaded, scorer = load_scorer(artifact, "numpy")
    threshold = loaded.baseline.threshold
    rng = np.random.default_rng(SEED)
    normal_x = mnist.test.x.astype(np.float32)
    normal = scorer.score_batch(normal_x)
    sets = {name: kind(normal_x, rng) for name, kind in {**SEEN, **UNSEEN}.items()}
    if fashion is not None:
        sets[FASHION] = fashion.test.x.astype(np.float32)
    kinds = {}
    for name, images in sets.items():
        scores = scorer.score_batch(images)
        kinds[name] = {
            "auroc": auroc(normal, scores),
            "flagged": flag_rate(scores, threshold.value),
            "seen": name in SEEN or name == FASHION,
        }
    return {
        "threshold_policy": threshold.policy,
        "promised_flag_rate": threshold.expected_flag_rate,
        "normal_flag_rate": flag_rate(normal, threshold.value),
        "kinds": kinds,
    }


def served(artifacts: dict[str, Path], entries: int, repeats: int) -> dict[str, dict[str, float]]:
    """Each detector drained by a real worker (uint8, batch 256) through a real Redis, each drain
    paired with bare consumer loop passes over the same entries: msg/s and the ratio."""
    plan = replace(
        QUICK, name="detection", entries={"uint8": entries, "float32": 1, "json": 1}, repeats=repeats
    )
    first = next(iter(artifacts.values()))
    out: dict[str, dict[str, float]] = {}
    with bench_session(plan, first) as bench:
        bench.prefill()
        for index, (label, path) in enumerate(artifacts.items()):
            name = f"detector-{index}"
            worker = bench.start_worker(name, STREAMS["uint8"], 256, group=f"{GROUP}-{name}", artifact=path)
            result = measure(bench, [worker], Drain("uint8", 256, 1, entries, detector=label))
            bench.stop_worker(worker)
            out[label] = {"msgs_per_s": result.rate, "bare_msgs_per_s": result.bare, "ratio": result.ratio}
    return out


def one_class(
    detector: DetectorConfig,
    dataset: Dataset,
    classes: list[int],
    max_samples: int | None,
    quick: bool = False,
) -> dict[str, Any]:
    """The one-class protocol with the detector's configuration: mean AUROC of its own score
    (`quick`: 2 epochs, whatever the detector's budget, as the quick run trains its artifacts)."""
    from trainer import benchmark

    settings = {"max_samples": max_samples} | ({"epochs": 2, "min_steps": 0} if quick else {})
    run = BenchmarkRun(detector.updated(**settings), dataset.name, tuple(classes))
    # Detectors trained alike (the same networks; only the score or threshold differ) share one
    # run: every score of their networks is in it.
    alike = run.detector.model_copy(update={"score": "", "threshold": ""})
    key = repr((alike, run.networks(), run.dataset, run.classes))
    found = _ONE_CLASS_RUNS.get(key)
    if found is None or detector.score not in found[0].scores():
        started = time.monotonic()
        found = _ONE_CLASS_RUNS[key] = (
            benchmark.run_benchmark(run, dataset),
            round(time.monotonic() - started, 1),
        )
    result, seconds = found
    per_class = {r.normal_class: r.auroc[detector.score] for r in result.results}
    log(f"one-class {dataset.name} {detector.score}: mean {np.mean(list(per_class.values())):.4f}")
    return {"mean": float(np.mean(list(per_class.values()))), "per_class": per_class, "seconds": seconds}


# The one-class runs of this process, by what they train: the result and its wall seconds.
_ONE_CLASS_RUNS: dict[str, tuple[BenchmarkResult, float]] = {}


def datasets(fashion_dir: Path | None) -> tuple[Dataset, Dataset | None]:
    """MNIST, and Fashion-MNIST when its files are found (its rows are then reported)."""
    mnist = load_dataset("mnist")
    if fashion_dir is None or not fashion_dir.is_dir():
        log(f"Fashion-MNIST not found at {fashion_dir}: its rows are skipped")
        return mnist, None
    return mnist, load_dataset("fashion-mnist", fashion_dir)
