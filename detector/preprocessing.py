"""How raw pixels in [0, 1] become model input, and back: fitted by the trainer, applied by every reader.

An artifact's `baseline.json` `preprocessing` is `unit` (pixels as they are) or `standardize`
(per-feature z-scores with the mean and std of the fit split). `fit_preprocessing` chooses the
numbers at training; `scaling_of` turns them into the one `InputScaling` that the trainer, the
engines, the evaluation, the report and the viewer apply.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from detector.artifact import Preprocessing
from detector.errors import ArtifactError

PreprocessingKind = Literal["unit", "standardize"]
# A feature that barely varies in training (an image border) would turn any later deviation into
# a huge z-score: its std is floored at this share of the mean feature std (and at 1e-3).
STD_FLOOR_SHARE = 0.1


@dataclass(frozen=True)
class InputScaling:
    """Raw pixels -> model space: (x - mean) * inv_std per feature, or the pixels as they are."""

    mean: np.ndarray | None = None  # float32 (D,); None: unit scaling
    inv_std: np.ndarray | None = None

    @property
    def is_unit(self) -> bool:
        """Whether the model reads the pixels as they are."""
        return self.mean is None or self.inv_std is None

    def __call__(self, images: np.ndarray) -> np.ndarray:
        """The model's input (float32) for a (n, D) batch of raw pixels; the batch is never written."""
        x = np.asarray(images, np.float32)
        if self.mean is None or self.inv_std is None:
            return x
        return np.asarray((x - self.mean) * self.inv_std, np.float32)

    def undo(self, model_space: np.ndarray) -> np.ndarray:
        """Raw pixels of model-space values (a reconstruction, for display)."""
        z = np.asarray(model_space, np.float32)
        if self.mean is None or self.inv_std is None:
            return z
        return np.asarray(z / self.inv_std + self.mean, np.float32)


def scaling_of(preprocessing: Preprocessing) -> InputScaling:
    """The scaling `baseline.json` describes; ArtifactError when `standardize` lacks its numbers."""
    if preprocessing.kind != "standardize":
        return InputScaling()
    if preprocessing.feature_mean is None or preprocessing.feature_std is None:
        raise ArtifactError("preprocessing 'standardize' needs feature_mean and feature_std")
    mean = np.asarray(preprocessing.feature_mean, np.float32)
    inv_std = (1.0 / np.maximum(np.asarray(preprocessing.feature_std, np.float32), 1e-6)).astype(np.float32)
    return InputScaling(mean, inv_std)


def fit_preprocessing(kind: str, fit: np.ndarray) -> Preprocessing:
    """The preprocessing of `kind` for a model trained on the raw images `fit`."""
    if kind == "unit":
        return Preprocessing()
    if kind != "standardize":
        raise ValueError(f"preprocessing must be unit or standardize, found {kind!r}")
    std = fit.std(axis=0)
    floor = max(1e-3, STD_FLOOR_SHARE * float(std.mean()))
    return Preprocessing(
        kind="standardize",
        feature_mean=fit.mean(axis=0).astype(np.float32).tolist(),
        feature_std=np.maximum(std, floor).astype(np.float32).tolist(),
    )
