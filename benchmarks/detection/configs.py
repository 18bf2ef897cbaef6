"""The detectors compared: the reference notebooks' presets, the previous defaults, the default and
the most accurate, each as `anomaly-trainer train` flags and as its one-class benchmark settings."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from trainer.budget import DEFAULT_MIN_STEPS


@dataclass(frozen=True)
class Detector:
    """One row of the Pareto table."""

    label: str
    train_flags: tuple[str, ...]  # for `anomaly-trainer train`
    score: str  # the column of the one-class benchmark that is this detector's own score
    # BenchmarkConfig fields, every training choice spelled out (the benchmark's defaults are the
    # default detector's, which change with it); {} = not measured.
    one_class: dict[str, Any] = field(default_factory=dict)


# The default's one-class settings: `anomaly-trainer train`'s budget (20 epochs or 2,000 steps,
# whichever is longer) and its orientation head.
_DEFAULT_TRAINING: dict[str, Any] = {
    "architecture": "dense-64-16",
    "epochs": None,
    "min_steps": DEFAULT_MIN_STEPS,
    "transforms": None,
    "orientation": "geometric",
}

DETECTORS: tuple[Detector, ...] = (
    Detector(
        "notebook-standardized (dense-32, standardised pixels, p95)",
        ("--preset", "notebook-standardized"),
        "mse",
        {},  # the one-class benchmark trains on unit pixels only: not measured
    ),
    Detector(
        "notebook-2mean (dense-32, 50 epochs, 2mean)",
        ("--preset", "notebook-2mean"),
        "mse",
        {"architecture": "dense-32", "epochs": 50, "transforms": None, "orientation": None},
    ),
    Detector(
        "notebook-3std (dense-64-16, 20 epochs, mean+3std)",
        ("--preset", "notebook-3std"),
        "mse",
        {"architecture": "dense-64-16", "epochs": 20, "transforms": None, "orientation": None},
    ),
    Detector(
        "previous default (dense-64-16, mse, 10 epochs, mean+3std)",
        ("--score", "mse", "--threshold", "mean+3std", "--epochs", "10", "--min-steps", "0"),
        "mse",
        {},  # the notebook-3std row with fewer epochs
    ),
    Detector(
        "default until 2026-11-30 (dense-64-16 + dihedral head, mse+nmse+orientation, p99)",
        ("--score", "mse+nmse+orientation", "--orientation-transforms", "dihedral"),
        "mse+nmse+orientation",
        {
            "architecture": "dense-64-16",
            "epochs": None,
            "min_steps": DEFAULT_MIN_STEPS,
            "transforms": None,
            "orientation": "dihedral",
        },
    ),
    Detector(
        "**default** (dense-64-16 + orientation head, mse+orientation+hidden-knn+hidden-mahalanobis, p99)",
        (),
        "mse+orientation+hidden-knn+hidden-mahalanobis",
        _DEFAULT_TRAINING,
    ),
    Detector(
        "default of 2026-11-30 without hidden-mahalanobis (mse+orientation+hidden-knn, p99)",
        ("--score", "mse+orientation+hidden-knn"),
        "mse+orientation+hidden-knn",
        _DEFAULT_TRAINING,  # the same networks: the one-class run is shared with the default's
    ),
    Detector(
        "most accurate (dense-512-128-32, mse+transforms, rotations)",
        ("--architecture", "dense-512-128-32", "--score", "mse+transforms", "--transforms", "rotations"),
        "mse+transforms",
        {"architecture": "dense-512-128-32", "epochs": 20, "transforms": "rotations", "orientation": None},
    ),
)
DEFAULT = DETECTORS[5]
