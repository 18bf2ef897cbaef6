"""Scores of the reconstruction error: `mse`, `nmse` and `top-k`. Pure numpy.

mse    mean squared reconstruction error (the default)
nmse   mse divided by the image's mean squared intensity (plus epsilon): a thin digit such as a
       1 has little ink and so a small absolute error even when badly reconstructed
top-k  mean of the k% largest squared pixel errors (localised defects)
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, ClassVar

import numpy as np
from pydantic import Field

from detector.components.base import Component, ComponentOptions, ForwardPass, NormalData, row_mean_square

NMSE_EPSILON = 1e-3
DEFAULT_TOP_K_PERCENT = 5.0


def mse_scores(x: np.ndarray, recon: np.ndarray) -> np.ndarray:
    """Per-row mean squared error."""
    return row_mean_square(np.subtract(x, recon))


def nmse_scores(
    x: np.ndarray, recon: np.ndarray, epsilon: float = NMSE_EPSILON, mse: np.ndarray | None = None
) -> np.ndarray:
    """Per-row MSE relative to the row's mean squared value (epsilon keeps blank images finite);
    `mse`, when the caller has it, saves computing it again."""
    error = mse_scores(x, recon) if mse is None else mse
    return np.asarray(error / (row_mean_square(np.asarray(x)) + epsilon))


def top_k_scores(x: np.ndarray, recon: np.ndarray, k_percent: float = DEFAULT_TOP_K_PERCENT) -> np.ndarray:
    """Per-row mean of the k% largest squared pixel errors (at least one pixel)."""
    if not 0 < k_percent <= 100:
        raise ValueError(f"top-k percentage must be in (0, 100], found {k_percent}")
    squared = np.square(np.asarray(x, np.float64) - np.asarray(recon, np.float64))
    d = squared.shape[1]
    n = max(1, math.ceil(d * k_percent / 100.0))
    largest = np.partition(squared, d - n, axis=1)[:, d - n :]
    return np.asarray(largest.mean(axis=1))


class Mse(Component):
    """`mse`: mean squared reconstruction error."""

    name = "mse"
    description = "mean squared reconstruction error"

    @classmethod
    def from_parameters(
        cls, parameters: Mapping[str, Any], data: bytes | None, input_dim: int, where: str
    ) -> Mse:
        """Nothing to read."""
        return cls()

    def score(self, batch: ForwardPass) -> np.ndarray:
        """Per-row MSE."""
        return batch.row_mse


class Nmse(Component):
    """`nmse`: MSE relative to the image's ink."""

    name = "nmse"
    description = "mse relative to the image's ink, its mean squared intensity"
    parameter_fields: ClassVar[dict[str, tuple[Any, Any]]] = {
        "nmse_epsilon": (float, Field(NMSE_EPSILON, gt=0)),
    }

    def __init__(self, epsilon: float = NMSE_EPSILON) -> None:
        self.epsilon = epsilon

    @classmethod
    def from_parameters(
        cls, parameters: Mapping[str, Any], data: bytes | None, input_dim: int, where: str
    ) -> Nmse:
        """The stored epsilon."""
        return cls(float(parameters.get("nmse_epsilon", NMSE_EPSILON)))

    def parameters(self) -> dict[str, Any]:
        """The epsilon."""
        return {"nmse_epsilon": self.epsilon}

    def score(self, batch: ForwardPass) -> np.ndarray:
        """Per-row normalised MSE."""
        return nmse_scores(batch.images, batch.reconstructions, self.epsilon, batch.row_mse)


class TopKOptions(ComponentOptions):
    """How many pixel errors `top-k` averages."""

    top_k: float = Field(
        DEFAULT_TOP_K_PERCENT,
        gt=0,
        le=100,
        description="top-k: the percentage of largest pixel errors averaged",
    )


class TopK(Component):
    """`top-k`: mean of the largest squared pixel errors."""

    name = "top-k"
    description = "mean of the k% largest squared pixel errors, for localised defects"
    options = TopKOptions
    parameter_fields: ClassVar[dict[str, tuple[Any, Any]]] = {
        "top_k_percent": (float, Field(DEFAULT_TOP_K_PERCENT, gt=0, le=100)),
    }

    def __init__(self, k_percent: float = DEFAULT_TOP_K_PERCENT) -> None:
        self.k_percent = k_percent

    @classmethod
    def fit(cls, normal: NormalData, options: TopKOptions) -> TopK:
        """Nothing to learn: the percentage chosen."""
        return cls(options.top_k)

    @classmethod
    def from_parameters(
        cls, parameters: Mapping[str, Any], data: bytes | None, input_dim: int, where: str
    ) -> TopK:
        """The stored percentage."""
        return cls(float(parameters.get("top_k_percent", DEFAULT_TOP_K_PERCENT)))

    def parameters(self) -> dict[str, Any]:
        """The percentage."""
        return {"top_k_percent": self.k_percent}

    def score(self, batch: ForwardPass) -> np.ndarray:
        """Per-row top-k error."""
        return top_k_scores(batch.images, batch.reconstructions, self.k_percent)
