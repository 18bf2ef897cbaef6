"""Per-image anomaly scores from an image, its reconstruction and its latent code. Pure numpy.

A score is one component or several joined by "+":
  mse          mean squared reconstruction error (the default)
  nmse         mse divided by the image's mean squared intensity (plus epsilon): a thin digit such
               as a 1 has little ink and so a small absolute error even when badly reconstructed
  top-k        mean of the k% largest squared pixel errors (localised defects)
  mahalanobis  distance of the encoder's code to a Gaussian fitted on held-out normal codes
  transforms   how unsure a self-supervised classifier is of which rotation/flip/shift was
               applied (worker.transforms): catches rotated digits that reconstruct well
  knn          cosine distance to the k nearest normal training images: what the autoencoder
               blurs away (an 8 from a 3), a nearest neighbour still sees
  a+b[+c]      e.g. mse+transforms+knn: each component standardised by its mean and std on
               held-out normal images, then summed: views of "not normal" that fail on
               different images
The trainer calibrates the threshold with the score it was asked for (`--score`) and the worker
computes the same one (`baseline.json` names it); the evaluation compares them (`COMPARED`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal, cast

import numpy as np

from worker.transforms import TransformScorer

Component = Literal["mse", "nmse", "top-k", "mahalanobis", "transforms", "knn"]
COMPONENTS: tuple[Component, ...] = ("mse", "nmse", "top-k", "mahalanobis", "transforms", "knn")
ScoreName = str  # a component, or components joined by "+" (components_of checks it)
# What `evaluate` and `benchmark` compare: every component, then the combinations that help.
COMPARED: tuple[str, ...] = (
    *COMPONENTS,
    "mse+transforms",
    "nmse+transforms",
    "mse+knn",
    "mse+transforms+knn",
    "nmse+transforms+knn",
)
MAX_COMPONENTS = 4
NMSE_EPSILON = 1e-3
DEFAULT_TOP_K_PERCENT = 5.0
DEFAULT_KNN_K = 5


def components_of(name: str) -> tuple[Component, ...]:
    """The components of a score name; ValueError naming what is wrong."""
    parts = tuple(name.split("+"))
    unknown = [p for p in parts if p not in COMPONENTS]
    if unknown:
        raise ValueError(
            f"score {name!r}: unknown component(s) {', '.join(map(repr, unknown))}; expected one of "
            f"{', '.join(COMPONENTS)}, or several joined by '+'"
        )
    if len(set(parts)) != len(parts) or len(parts) > MAX_COMPONENTS:
        raise ValueError(f"score {name!r}: at most {MAX_COMPONENTS} components, each at most once")
    return cast(tuple[Component, ...], parts)


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


def knn_distances(x: np.ndarray, reference: np.ndarray, k: int = DEFAULT_KNN_K) -> np.ndarray:
    """1 - mean cosine similarity of each row to its k most similar rows of `reference`.

    `reference` rows must already have unit length (`unit_rows`)."""
    if not 1 <= k <= reference.shape[0]:
        raise ValueError(f"k must be in 1..{reference.shape[0]} (reference rows), found {k}")
    rows = unit_rows(x)
    out = np.empty(rows.shape[0], np.float64)
    step = max(1, 2**22 // max(1, reference.shape[0]))  # similarity blocks of at most 4M floats
    for start in range(0, rows.shape[0], step):
        similarity = rows[start : start + step] @ reference.T
        nearest = np.partition(similarity, similarity.shape[1] - k, axis=1)[:, -k:]
        out[start : start + step] = 1.0 - nearest.mean(axis=1, dtype=np.float64)
    return out


def unit_rows(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (float32); an all-zero row stays zero."""
    x = np.asarray(x, np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    if np.allclose(norms[norms > 0], 1.0, atol=1e-5):
        return x  # already unit rows (a loaded reference): no second copy
    return np.asarray(x / np.maximum(norms, 1e-12), np.float32)


def combine(parts: Sequence[np.ndarray], mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """The sum of scores, each standardised by its held-out normal mean and std."""
    if not len(parts) == len(mean) == len(std):
        raise ValueError(f"{len(parts)} scores to combine, but {len(mean)} means and {len(std)} stds")
    total = np.zeros(np.shape(parts[0]), np.float64)
    for values, m, s in zip(parts, mean, std, strict=True):
        total += (np.asarray(values, np.float64) - m) / s
    return total


def standardisation(parts: Sequence[np.ndarray]) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(means, stds) of each score on normal images: what `combine` needs."""
    means = tuple(float(np.mean(p)) for p in parts)
    stds = tuple(max(float(np.std(p)), 1e-12) for p in parts)
    return means, stds


@dataclass(frozen=True)
class ScoreFunction:
    """One score with its parameters: what a scorer applies to (images, reconstructions, codes)."""

    name: ScoreName = "mse"
    top_k_percent: float = DEFAULT_TOP_K_PERCENT
    nmse_epsilon: float = NMSE_EPSILON
    latent_mean: np.ndarray | None = None
    latent_precision: np.ndarray | None = None
    transform_scorer: TransformScorer | None = None
    knn_reference: np.ndarray | None = None  # unit-length rows of normal training images
    knn_k: int = DEFAULT_KNN_K
    # Combined scores: each component's mean and std on held-out normal images, in order.
    combine_mean: tuple[float, ...] = ()
    combine_std: tuple[float, ...] = ()
    components: tuple[Component, ...] = field(init=False)

    def __post_init__(self) -> None:
        components = components_of(self.name)
        object.__setattr__(self, "components", components)
        if "mahalanobis" in components and (self.latent_mean is None or self.latent_precision is None):
            raise ValueError("the mahalanobis score needs the latent mean and precision of normal codes")
        if "transforms" in components and self.transform_scorer is None:
            raise ValueError(f"the {self.name} score needs the transformation classifier")
        if "knn" in components and self.knn_reference is None:
            raise ValueError(f"the {self.name} score needs the normal reference images")
        if len(components) > 1:
            if not len(self.combine_mean) == len(self.combine_std) == len(components):
                raise ValueError(
                    f"the {self.name} score needs a mean and a std per component ({len(components)}), "
                    f"found {len(self.combine_mean)} and {len(self.combine_std)}"
                )
            if min(self.combine_std) <= 0:
                raise ValueError(f"combine_std must be positive, found {self.combine_std}")

    @property
    def needs_codes(self) -> bool:
        """Whether the latent code is an input (only mahalanobis)."""
        return "mahalanobis" in self.components

    def component(
        self, name: Component, x: np.ndarray, recon: np.ndarray, codes: np.ndarray | None = None
    ) -> np.ndarray:
        """One component's per-row scores (float64)."""
        if name == "mse":
            return mse_scores(x, recon)
        if name == "nmse":
            return nmse_scores(x, recon, self.nmse_epsilon)
        if name == "top-k":
            return top_k_scores(x, recon, self.top_k_percent)
        if name == "transforms":
            return cast(TransformScorer, self.transform_scorer)(x)
        if name == "knn":
            return knn_distances(x, cast(np.ndarray, self.knn_reference), self.knn_k)
        if codes is None:
            raise ValueError("the mahalanobis score needs the latent codes")
        return mahalanobis_distances(
            codes, cast(np.ndarray, self.latent_mean), cast(np.ndarray, self.latent_precision)
        )

    def parts(self, x: np.ndarray, recon: np.ndarray, codes: np.ndarray | None = None) -> list[np.ndarray]:
        """Every component's per-row scores, in order (what the standardisation is fitted on)."""
        return [self.component(c, x, recon, codes) for c in self.components]

    def __call__(self, x: np.ndarray, recon: np.ndarray, codes: np.ndarray | None = None) -> np.ndarray:
        """Per-row scores (float64)."""
        parts = self.parts(x, recon, codes)
        if len(parts) == 1:
            return parts[0]
        return combine(parts, self.combine_mean, self.combine_std)
