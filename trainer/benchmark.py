"""The standard one-class benchmark: train on one class, score the whole test set, the rest are anomalies.

Detectors are fitted in-process (no artifacts) by the pipeline `anomaly-trainer train` uses
(`trainer.pipeline`): for each normal class the same splits, checks, networks and score, and the
whole test set is scored with every compared score (`trainer.compared`), the detector's own
`Score` among them.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import time
from collections.abc import Callable, Hashable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from detector.datasets import Dataset
from detector.score import components_of
from trainer.budget import DEFAULT_EPOCHS, step_floor
from trainer.config import DetectorConfig
from trainer.evaluate import auroc
from trainer.pipeline import fit_detector, networks_of

log = logging.getLogger(__name__)

RESULTS_DIR = Path(__file__).resolve().parent.parent / "benchmarks" / "results"
# Published mean AUROC (%) of the one-class protocol, for the table in docs/detection.md.
PUBLISHED = {
    "mnist": {"Deep SVDD (Ruff et al. 2018)": 94.8, "GEOM (Golan & El-Yaniv 2018)": 98.0},
    "fashion-mnist": {"GEOM (Golan & El-Yaniv 2018)": 93.5},
}


@dataclass(frozen=True)
class BenchmarkRun:
    """What `anomaly-trainer benchmark --one-class` runs: `detector` fitted on each normal class of
    `dataset` in turn; `also_fit` names components fitted besides its score's, with the networks
    they need, to be compared too."""

    detector: DetectorConfig = field(default_factory=DetectorConfig)
    dataset: str = "mnist"
    classes: tuple[int, ...] = tuple(range(10))
    also_fit: tuple[str, ...] = ()

    def networks(self) -> tuple[Hashable, ...]:
        """The specs of the networks trained besides each autoencoder."""
        return networks_of([*components_of(self.detector.score), *self.also_fit], self.detector.options)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form: the detector's configuration under `config`."""
        return {
            "config": self.detector.model_dump(mode="json"),
            "dataset": self.dataset,
            "classes": list(self.classes),
            "also_fit": list(self.also_fit),
            "networks": [str(spec) for spec in self.networks()],
        }


@dataclass(frozen=True)
class ClassResult:
    """AUROC of one normal class against the other classes, per score."""

    normal_class: int
    auroc: dict[str, float]
    epochs_run: int
    train_count: int
    seconds: float


@dataclass
class BenchmarkResult:
    """A whole benchmark run, as written to benchmarks/results/."""

    run: BenchmarkRun
    results: list[ClassResult]
    wall_seconds: float
    created_at: str
    machine: dict[str, Any]

    def mean(self, score: str) -> float:
        """Mean AUROC over the classes run."""
        return float(np.mean([r.auroc[score] for r in self.results]))

    def scores(self) -> list[str]:
        """The scores measured: those of `COMPARED` its networks allowed, then the detector's own."""
        return list(self.results[0].auroc) if self.results else []

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form, with the means."""
        return self.run.to_dict() | {
            "results": [asdict(r) for r in self.results],
            "wall_seconds": self.wall_seconds,
            "created_at": self.created_at,
            "machine": self.machine,
            "mean_auroc": {s: self.mean(s) for s in self.scores()},
        }

    def table(self) -> str:
        """Markdown table: one row per normal class, one column per score, the mean last."""
        scores = self.scores()
        lines = [
            "| normal class | " + " | ".join(f"AUROC {s}" for s in scores) + " | epochs | seconds |",
            "|---:|" + "---:|" * len(scores) + "---:|---:|",
        ]
        for r in self.results:
            cells = " | ".join(f"{r.auroc[s]:.4f}" for s in scores)
            lines.append(f"| {r.normal_class} | {cells} | {r.epochs_run} | {r.seconds:.0f} |")
        means = " | ".join(f"**{self.mean(s):.4f}**" for s in scores)
        lines.append(f"| **mean** | {means} | | {self.wall_seconds:.0f} |")
        return "\n".join(lines)

    def file_stem(self) -> str:
        """benchmarks/results/ name: dataset, architecture, epochs, and any subset used."""
        run, c = self.run, self.run.detector
        stem = f"one-class-{run.dataset}-{c.architecture}-e{c.epochs or 'auto'}"
        if floor := step_floor(c.epochs, c.min_steps):
            stem += f"-s{floor}"
        for spec in run.networks():
            stem += f"-{getattr(spec, 'slug', spec)}"
        if sorted(run.classes) != list(range(10)):
            stem += "-c" + "".join(str(k) for k in run.classes)
        if c.max_samples is not None:
            stem += f"-n{c.max_samples}"
        return stem

    def markdown(self) -> str:
        """The table with its settings, as written next to the JSON."""
        run, c = self.run, self.run.detector
        published = PUBLISHED.get(run.dataset, {})
        networks = ", ".join(map(str, run.networks())) or "none"
        flags = " ".join(c.flags())
        lines = [
            f"# One-class {run.dataset}: {c.architecture}",
            "",
            f"Train on one class's training images, score the whole test set, the other classes are "
            f"anomalies. {epochs_text(c.epochs, c.min_steps)} (patience {c.patience}), "
            f"batch {c.batch_size}, Adam {c.learning_rate:g}, seed {c.seed}, "
            f"max samples {c.max_samples or 'all'}. Each class trains `anomaly-trainer train "
            f"{flags + ' ' if flags else ''}--classes CLASS`"
            + (f" and also fits {', '.join(run.also_fit)}" if run.also_fit else "")
            + f". Networks besides the autoencoder: {networks}.",
            f"Wall time {self.wall_seconds:.0f} s on {self.machine.get('cpu_count')} CPU cores "
            f"(TensorFlow {self.machine.get('tensorflow')}), {self.created_at}.",
            "",
            self.table(),
        ]
        if published:
            lines += ["", "Published mean AUROC: " + "; ".join(f"{k} {v:.1f}" for k, v in published.items())]
        return "\n".join(lines) + "\n"


def epochs_text(epochs: int | None, min_steps: int | None) -> str:
    """How long each class trains, in words (trainer.budget's rule)."""
    min_steps = step_floor(epochs, min_steps)
    if epochs is None and min_steps:
        limit = f"Up to {DEFAULT_EPOCHS} epochs or {min_steps:,} steps, whichever is longer"
    else:
        limit = f"Up to {DEFAULT_EPOCHS if epochs is None else epochs} epochs"
    floor = f", looking only at the epochs after {min_steps:,} steps" if min_steps else ""
    return f"{limit}; early stopping on held-out loss{floor}"


def run_one_class(dataset: Dataset, normal_class: int, run: BenchmarkRun) -> ClassResult:
    """Fit the run's detector on `normal_class`, score the whole test set, AUROC per score."""
    started = time.monotonic()
    y_train, y_test = dataset.train.y, dataset.test.y
    if y_train is None or y_test is None:
        raise ValueError(f"dataset {dataset.name} has no labels; the one-class benchmark needs them")
    fitted = fit_detector(run.detector.updated(classes=[normal_class]), dataset, run.also_fit)
    scores = fitted.compared()(dataset.test.x)
    is_normal = y_test == normal_class
    result = ClassResult(
        normal_class=normal_class,
        auroc={name: auroc(values[is_normal], values[~is_normal]) for name, values in scores.items()},
        epochs_run=len(fitted.losses.get("loss", [])),
        train_count=int(fitted.normal.fit.shape[0]),
        seconds=round(time.monotonic() - started, 1),
    )
    log.info(
        "one-class done class=%d auroc_mse=%.4f epochs=%d seconds=%.1f",
        normal_class,
        result.auroc["mse"],
        result.epochs_run,
        result.seconds,
    )
    return result


def run_benchmark(
    run: BenchmarkRun,
    dataset: Dataset,
    on_class: Callable[[ClassResult], None] | None = None,
) -> BenchmarkResult:
    """Run the one-class protocol for every class in `run.classes` (each checked before it trains)."""
    import keras
    import tensorflow as tf

    started = time.monotonic()
    results = []
    for normal_class in run.classes:
        result = run_one_class(dataset, normal_class, run)
        results.append(result)
        if on_class is not None:
            on_class(result)
        keras.backend.clear_session()  # free the previous class's graph
    return BenchmarkResult(
        run=run,
        results=results,
        wall_seconds=round(time.monotonic() - started, 1),
        created_at=datetime.now(UTC).isoformat(timespec="seconds"),
        machine={
            "cpu_count": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "tensorflow": tf.__version__,
            "keras": keras.__version__,
            "tf_num_interop_threads": os.environ.get("TF_NUM_INTEROP_THREADS"),
        },
    )


def write_results(result: BenchmarkResult, out_dir: Path = RESULTS_DIR) -> tuple[Path, Path]:
    """Write `<stem>.json` and `<stem>.md` into `out_dir`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / f"{result.file_stem()}.json"
    md_path = out_dir / f"{result.file_stem()}.md"
    json_path.write_text(json.dumps(result.to_dict(), indent=2) + "\n")
    md_path.write_text(result.markdown())
    return json_path, md_path
