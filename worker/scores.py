"""Per-image anomaly scores from an image, its reconstruction and its latent code. Pure numpy.

  mse          mean squared reconstruction error (the default)
  nmse         mse divided by the image's mean squared intensity (plus epsilon): a thin digit such
               as a 1 has little ink and so a small absolute error even when badly reconstructed
  top-k        mean of the k% largest squared pixel errors (localised defects)
  mahalanobis  distance of the encoder's code to a Gaussian fitted on held-out normal codes
  transforms   how unsure a self-supervised classifier is of which rotation/flip/shift was
               applied (worker.transforms): catches rotated digits that reconstruct well
  mse+transforms, nmse+transforms
               the sum of the two scores, each standardised by its mean and std on held-out
               normal images: two views of "not normal" that fail on different images
The trainer calibrates the threshold with the score it was asked for (`--score`) and the worker
computes the same one (`baseline.json` names it); the evaluation compares all four.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, cast

import numpy as np

from worker.transforms import TransformScorer

ScoreName = Literal["mse", "nmse", "top-k", "mahalanobis", "transforms", "mse+transforms", "nmse+transforms"]
SCORES: tuple[ScoreName, ...] = (
    "mse",
    "nmse",
    "top-k",
    "mahalanobis",
    "transforms",
    "mse+transforms",
    "nmse+transforms",
)
TRANSFORM_SCORES: tuple[ScoreName, ...] = ("transforms", "mse+transforms", "nmse+transforms")
NMSE_EPSILON = 1e-3
DEFAULT_TOP_K_PERCENT = 5.0


def mse_scores(x: np.ndarray, recon: np.ndarray) -> np.ndarray:
    """Per-row mean squared error."""
    return np.asarray(np.mean(np.square(x - recon), axis=1, dtype=np.float64))


def nmse_scores(x: np.ndarray, recon: np.ndarray, epsilon: float = NMSE_EPSILON) -> np.ndarray:
    """Per-row MSE relative to the row's mean squared value (epsilon keeps blank images finite)."""
    x64 = np.asarray(x, np.float64)
    energy = np.mean(np.square(x64), axis=1)
    return np.asarray(mse_scores(x64, np.asarray(recon, np.float64)) / (energy + epsilon))


def top_k_scores(x: np.ndarray, recon: np.ndarray, k_percent: float = DEFAULT_TOP_K_PERCENT) -> np.ndarray:
    """Per-row mean of the k% largest squared pixel errors (at least one pixel)."""
    if not 0 < k_percent <= 100:
        raise ValueError(f"top-k percentage must be in (0, 100], found {k_percent}")
    squared = np.square(np.asarray(x, np.float64) - np.asarray(recon, np.float64))
    d = squared.shape[1]
    n = max(1, math.ceil(d * k_percent / 100.0))
    largest = np.partition(squared, d - n, axis=1)[:, d - n :]
    return np.asarray(largest.mean(axis=1))


def mahalanobis_distances(codes: np.ndarray, mean: np.ndarray, precision: np.ndarray) -> np.ndarray:
    """Mahalanobis distance of each code to `mean` under the inverse covariance `precision`."""
    centred = np.asarray(codes, np.float64) - mean
    squared = np.einsum("ij,jk,ik->i", centred, precision, centred)
    return np.asarray(np.sqrt(np.maximum(squared, 0.0)))


@dataclass(frozen=True)
class ScoreFunction:
    """One score with its parameters: what a scorer applies to (images, reconstructions, codes)."""

    name: ScoreName = "mse"
    top_k_percent: float = DEFAULT_TOP_K_PERCENT
    nmse_epsilon: float = NMSE_EPSILON
    latent_mean: np.ndarray | None = None
    latent_precision: np.ndarray | None = None
    transform_scorer: TransformScorer | None = None
    # Combined scores: (reconstruction, transforms) mean and std on held-out normal images.
    combine_mean: tuple[float, float] = (0.0, 0.0)
    combine_std: tuple[float, float] = (1.0, 1.0)

    def __post_init__(self) -> None:
        if self.name not in SCORES:
            raise ValueError(f"score must be one of {', '.join(SCORES)}, found {self.name!r}")
        if self.name == "mahalanobis" and (self.latent_mean is None or self.latent_precision is None):
            raise ValueError("the mahalanobis score needs the latent mean and precision of normal codes")
        if self.name in TRANSFORM_SCORES and self.transform_scorer is None:
            raise ValueError(f"the {self.name} score needs the transformation classifier")
        if min(self.combine_std) <= 0:
            raise ValueError(f"combine_std must be positive, found {self.combine_std}")

    @property
    def needs_codes(self) -> bool:
        """Whether the latent code is an input (only mahalanobis)."""
        return self.name == "mahalanobis"

    def __call__(self, x: np.ndarray, recon: np.ndarray, codes: np.ndarray | None = None) -> np.ndarray:
        """Per-row scores (float64)."""
        if self.name == "mse":
            return mse_scores(x, recon)
        if self.name == "nmse":
            return nmse_scores(x, recon, self.nmse_epsilon)
        if self.name == "top-k":
            return top_k_scores(x, recon, self.top_k_percent)
        if self.name in TRANSFORM_SCORES:
            transforms = cast(TransformScorer, self.transform_scorer)(x)
            if self.name == "transforms":
                return transforms
            reconstruction = (
                mse_scores(x, recon)
                if self.name == "mse+transforms"
                else nmse_scores(x, recon, self.nmse_epsilon)
            )
            return combine(reconstruction, transforms, self.combine_mean, self.combine_std)
        if codes is None:
            raise ValueError("the mahalanobis score needs the latent codes")
        return mahalanobis_distances(
            codes, cast(np.ndarray, self.latent_mean), cast(np.ndarray, self.latent_precision)
        )


def combine(
    reconstruction: np.ndarray,
    transforms: np.ndarray,
    mean: tuple[float, float],
    std: tuple[float, float],
) -> np.ndarray:
    """The sum of two scores, each standardised by its held-out normal mean and std."""
    return np.asarray((reconstruction - mean[0]) / std[0] + (transforms - mean[1]) / std[1])
