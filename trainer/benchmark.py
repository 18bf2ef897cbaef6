"""The standard one-class benchmark: train on one class, score the whole test set, the rest are anomalies.

Models are trained in-process (no artifacts). For each normal class the same split as
`anomaly-trainer train` is used (fit / validation for early stopping and the latent Gaussian /
calibration), and the whole test set is scored with every score of trainer.evaluate.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from detector.components.knn import DEFAULT_KNN_REFERENCE_ROWS, knn_reference_of
from detector.components.orientation import DEFAULT_ORIENTATION_TRANSFORMS, Orientation
from detector.components.reconstruction import DEFAULT_TOP_K_PERCENT
from detector.components.transforms import TransformScorer, TransformSet, TransformSetName
from detector.datasets import Dataset
from detector.score import COMPARED
from trainer.budget import DEFAULT_BATCH_SIZE, DEFAULT_EPOCHS, epoch_budget, step_floor
from trainer.evaluate import ScoreModel, auroc
from trainer.fitting import fit_autoencoder
from trainer.models import DEFAULT_ARCHITECTURE, build_model
from trainer.splits import Splits, split_normal
from trainer.transforms import DEFAULT_TRANSFORM_EPOCHS, train_transform_classifier

log = logging.getLogger(__name__)

RESULTS_DIR = Path(__file__).resolve().parent.parent / "benchmarks" / "results"
# Published mean AUROC (%) of the one-class protocol, for the table in docs/detection.md.
PUBLISHED = {
    "mnist": {"Deep SVDD (Ruff et al. 2018)": 94.8, "GEOM (Golan & El-Yaniv 2018)": 98.0},
    "fashion-mnist": {"GEOM (Golan & El-Yaniv 2018)": 93.5},
}


@dataclass(frozen=True)
class BenchmarkConfig:
    """Everything `anomaly-trainer benchmark` can set; the defaults train the default detector, as
    `anomaly-trainer train` does (its architecture, budget, batch size and orientation head)."""

    dataset: str = "mnist"
    architecture: str = DEFAULT_ARCHITECTURE
    classes: list[int] = field(default_factory=lambda: list(range(10)))
    epochs: int | None = None  # None: `anomaly-trainer train`'s default (trainer.budget)
    min_steps: int | None = None  # steps before early stopping looks; None: as `train` (trainer.budget)
    batch_size: int = DEFAULT_BATCH_SIZE
    learning_rate: float = 1e-3
    patience: int = 3
    seed: int = 0
    holdout_fraction: float = 0.2
    max_samples: int | None = None
    top_k_percent: float = DEFAULT_TOP_K_PERCENT
    # Also train the transformation classifier on this set and compare its scores; None: none (the
    # default detector has none).
    transforms: str | None = None
    transform_epochs: int = DEFAULT_TRANSFORM_EPOCHS
    # Train the autoencoder with the orientation head on this set and compare the orientation
    # scores; None: the autoencoder alone.
    orientation: TransformSetName | None = DEFAULT_ORIENTATION_TRANSFORMS


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

    config: BenchmarkConfig
    results: list[ClassResult]
    wall_seconds: float
    created_at: str
    machine: dict[str, Any]

    def mean(self, score: str) -> float:
        """Mean AUROC over the classes run."""
        return float(np.mean([r.auroc[score] for r in self.results]))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form, with the means."""
        out = asdict(self)
        out["mean_auroc"] = {s: self.mean(s) for s in COMPARED if self.results and s in self.results[0].auroc}
        return out

    def table(self) -> str:
        """Markdown table: one row per normal class, one column per score, the mean last."""
        scores = [s for s in COMPARED if self.results and s in self.results[0].auroc]
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
        c = self.config
        stem = f"one-class-{c.dataset}-{c.architecture}-e{c.epochs or 'auto'}"
        if floor := step_floor(c.epochs, c.min_steps):
            stem += f"-s{floor}"
        if c.transforms is not None:
            stem += f"-{c.transforms}"
        if c.orientation is not None:
            stem += f"-orientation-{c.orientation}"
        if sorted(c.classes) != list(range(10)):
            stem += "-c" + "".join(str(k) for k in c.classes)
        if c.max_samples is not None:
            stem += f"-n{c.max_samples}"
        return stem

    def markdown(self) -> str:
        """The table with its settings, as written next to the JSON."""
        c = self.config
        published = PUBLISHED.get(c.dataset, {})
        lines = [
            f"# One-class {c.dataset}: {c.architecture}",
            "",
            f"Train on one class's training images, score the whole test set, the other classes are "
            f"anomalies. {epochs_text(c.epochs, c.min_steps)} (patience {c.patience}), "
            f"batch {c.batch_size}, Adam {c.learning_rate:g}, seed {c.seed}, "
            f"max samples {c.max_samples or 'all'}, top-k {c.top_k_percent:g}%. "
            + (
                f"Transformation classifier: {c.transforms} set, up to {c.transform_epochs} epochs."
                if c.transforms
                else "No transformation classifier."
            )
            + (f" Trained with the orientation head ({c.orientation} set)." if c.orientation else ""),
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


def fit_on_normal(
    normal: np.ndarray, config: BenchmarkConfig, verbose: int = 0
) -> tuple[Any, Splits, dict[str, list[float]], Orientation | None]:
    """Split normal images as the trainer does and fit them as it does (`trainer.fitting`): early
    stopping on the validation loss, with the orientation head when the config asks for it."""
    import keras

    keras.utils.set_random_seed(config.seed)
    if config.max_samples is not None and normal.shape[0] > config.max_samples:
        pick = np.random.default_rng(config.seed).choice(normal.shape[0], config.max_samples, replace=False)
        normal = normal[np.sort(pick)]
    splits = split_normal(normal, config.holdout_fraction, config.seed)
    model = build_model(config.architecture, normal.shape[1])
    head, losses = fit_autoencoder(
        model,
        splits.fit,
        splits.validation,
        epoch_budget(config.epochs, config.min_steps, splits.fit.shape[0], config.batch_size),
        batch_size=config.batch_size,
        learning_rate=config.learning_rate,
        patience=config.patience,
        seed=config.seed,
        verbose=verbose,
        orientation=config.orientation,
    )
    if head is None or config.orientation is None:
        return model, splits, losses, None
    return model, splits, losses, Orientation(head, config.orientation, 0)


def run_one_class(dataset: Dataset, normal_class: int, config: BenchmarkConfig) -> ClassResult:
    """Train on `normal_class`, score the whole test set, AUROC per score."""
    started = time.monotonic()
    y_train, y_test = dataset.train.y, dataset.test.y
    if y_train is None or y_test is None:
        raise ValueError(f"dataset {dataset.name} has no labels; the one-class benchmark needs them")
    normal = dataset.train.x[y_train == normal_class]
    if normal.shape[0] == 0:
        raise ValueError(f"no training images of class {normal_class} in {dataset.name}")
    model, splits, history, orientation = fit_on_normal(normal, config)
    transform_scorer = None
    if config.transforms is not None:
        classifier, _ = train_transform_classifier(
            splits.fit, splits.validation, config.transforms, config.transform_epochs, seed=config.seed
        )
        transform_scorer = TransformScorer(TransformSet.named(config.transforms, normal.shape[1]), classifier)
    scorer = ScoreModel(
        model,
        lambda x: x,
        top_k_percent=config.top_k_percent,
        transform_scorer=transform_scorer,
        knn_reference=knn_reference_of(splits.fit, DEFAULT_KNN_REFERENCE_ROWS, config.seed),
        orientation=orientation,
    )
    scorer.fit_hidden_knn(splits.fit, config.seed)
    scorer.fit_hidden_mahalanobis(splits.fit, config.seed)
    scorer.fit_latent(splits.validation)
    scorer.fit_combination(splits.validation)
    scores = scorer.scores(dataset.test.x)
    is_normal = y_test == normal_class
    result = ClassResult(
        normal_class=normal_class,
        auroc={name: auroc(values[is_normal], values[~is_normal]) for name, values in scores.items()},
        epochs_run=len(history.get("loss", [])),
        train_count=int(splits.fit.shape[0]),
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
    config: BenchmarkConfig,
    dataset: Dataset,
    on_class: Callable[[ClassResult], None] | None = None,
) -> BenchmarkResult:
    """Run the one-class protocol for every class in `config.classes`."""
    import keras
    import tensorflow as tf

    started = time.monotonic()
    for name in (config.transforms, config.orientation):  # square images only: say so up front
        if name is not None:
            TransformSet.named(name, dataset.train.x.shape[1])
    results = []
    for normal_class in config.classes:
        result = run_one_class(dataset, normal_class, config)
        results.append(result)
        if on_class is not None:
            on_class(result)
        keras.backend.clear_session()  # free the previous class's graph
    return BenchmarkResult(
        config=config,
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
