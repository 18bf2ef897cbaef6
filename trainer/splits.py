"""The normal training images cut three ways, and the same cut redone from an artifact's numbers.

fit (the autoencoder learns from it), validation (early stopping; the statistics of the scores
are fitted on it) and calibration (the held-out errors the threshold and p-values come from).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from detector.artifact import Baseline
from detector.datasets import Dataset


@dataclass(frozen=True)
class Splits:
    """Normal training data cut three ways: fit, validation (early stopping), calibration."""

    fit: np.ndarray
    validation: np.ndarray
    calibration: np.ndarray


def split_normal(x: np.ndarray, holdout_fraction: float, seed: int) -> Splits:
    """Shuffle with `seed`; the held-out part is halved into validation and calibration."""
    if not 0 < holdout_fraction < 1:
        raise ValueError(f"holdout_fraction must be in (0, 1), found {holdout_fraction}")
    order = np.random.default_rng(seed).permutation(x.shape[0])
    n_hold = max(2, round(x.shape[0] * holdout_fraction))
    if x.shape[0] - n_hold < 1:
        raise ValueError(f"{x.shape[0]} samples are too few to hold out {n_hold}")
    n_val = n_hold // 2
    return Splits(
        fit=x[order[n_hold:]],
        validation=x[order[:n_val]],
        calibration=x[order[n_val:n_hold]],
    )


def select_normal(dataset: Dataset, classes: list[int] | None) -> np.ndarray:
    """Training images of the normal classes (all when `classes` is None)."""
    x, y = dataset.train.x, dataset.train.y
    if classes is None:
        return x
    if y is None:
        raise ValueError(f"dataset {dataset.name} has no labels, so --classes cannot be used")
    mask = np.isin(y, classes)
    if not mask.any():
        raise ValueError(f"no training images of classes {classes} in {dataset.name}")
    return x[mask]


def recover_splits(baseline: Baseline, dataset: Dataset) -> Splits | None:
    """Redo the trainer's normal-data split from the seed and counts in baseline.training.

    Returns None when the artifact was trained on other data (counts do not fit).
    """
    t = baseline.training
    if t.dataset != dataset.name:
        return None
    try:
        normal = select_normal(dataset, t.classes)
    except ValueError:
        return None
    total = t.train_count + t.validation_count + t.calibration_count
    if total > normal.shape[0]:
        return None
    if total < normal.shape[0]:  # --max-samples: the same draw as trainer.train.train
        pick = np.random.default_rng(t.seed).choice(normal.shape[0], total, replace=False)
        normal = normal[np.sort(pick)]
    splits = split_normal(normal, (t.validation_count + t.calibration_count) / total, t.seed)
    counts = (splits.fit.shape[0], splits.validation.shape[0], splits.calibration.shape[0])
    if counts != (t.train_count, t.validation_count, t.calibration_count):
        return None
    return splits
