"""`mahalanobis`: distance of the encoder's code to a Gaussian fitted on held-out normal codes."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
from pydantic import Field

from detector.components.base import Component, ComponentOptions, ForwardPass, NormalData


def mahalanobis_distances(codes: np.ndarray, mean: np.ndarray, precision: np.ndarray) -> np.ndarray:
    """Mahalanobis distance of each code to `mean` under the inverse covariance `precision`."""
    centred = np.asarray(codes, np.float64) - mean
    # Two steps, a matrix product then a row-wise dot: the three-operand einsum ("ij,jk,ik->i")
    # took 4 times longer (172 us against 39 us for 256 codes of 16 values on 2 cores).
    squared = np.einsum("ij,ij->i", centred @ precision, centred)
    return np.asarray(np.sqrt(np.maximum(squared, 0.0)))


@dataclass(frozen=True)
class LatentGaussian:
    """Mean and (shrunk) inverse covariance of normal codes; scores are Mahalanobis distances."""

    mean: np.ndarray
    precision: np.ndarray

    @classmethod
    def fit(cls, codes: np.ndarray) -> LatentGaussian:
        """Ledoit-Wolf shrinkage: a few hundred codes are enough for a stable inverse."""
        # scikit-learn is a training dependency (the `train` extra): the worker never fits.
        from sklearn.covariance import LedoitWolf

        codes = np.asarray(codes, np.float64)
        if codes.ndim != 2 or codes.shape[0] < 2:
            raise ValueError(f"need at least 2 codes of shape N x L to fit, found {codes.shape}")
        estimator = LedoitWolf().fit(codes)
        return cls(np.asarray(estimator.location_), np.asarray(estimator.precision_))

    def distance(self, codes: np.ndarray) -> np.ndarray:
        """Mahalanobis distance of each code to the mean."""
        return mahalanobis_distances(codes, self.mean, self.precision)


class Mahalanobis(Component):
    """`mahalanobis`: how far the latent code is from normal codes."""

    name = "mahalanobis"
    description = "distance of the latent code to a Gaussian of held-out normal codes"
    needs_encoder = True
    parameter_fields: ClassVar[dict[str, tuple[Any, Any]]] = {
        "latent_mean": (list[float] | None, Field(None, description="mahalanobis: mean of normal codes")),
        "latent_precision": (
            list[list[float]] | None,
            Field(None, description="mahalanobis: inverse covariance of normal codes (Ledoit-Wolf)"),
        ),
    }
    required_parameters = ("latent_mean", "latent_precision")

    def __init__(self, gaussian: LatentGaussian) -> None:
        self.gaussian = gaussian

    @classmethod
    def fit(cls, normal: NormalData, options: ComponentOptions) -> Mahalanobis:
        """The Gaussian of the validation split's codes."""
        return cls(LatentGaussian.fit(normal.forward(normal.validation).codes))

    @classmethod
    def from_parameters(
        cls, parameters: Mapping[str, Any], data: bytes | None, input_dim: int, where: str
    ) -> Mahalanobis:
        """The stored mean and precision."""
        mean, precision = parameters.get("latent_mean"), parameters.get("latent_precision")
        if mean is None or precision is None:
            raise ValueError("the mahalanobis score needs the latent mean and precision of normal codes")
        return cls(LatentGaussian(np.asarray(mean, np.float64), np.asarray(precision, np.float64)))

    @classmethod
    def check_parameters(cls, parameters: Mapping[str, Any], latent_dim: int | None) -> None:
        """The mean has latent_dim values and the precision is square of that size."""
        mean, precision = parameters.get("latent_mean"), parameters.get("latent_precision")
        if not mean or not precision:
            return
        size = len(mean)
        if latent_dim is not None and size != latent_dim:
            raise ValueError(f"latent_mean has {size} values, expected latent_dim {latent_dim}")
        if len(precision) != size or any(len(row) != size for row in precision):
            raise ValueError(f"latent_precision must be {size} x {size}")

    def parameters(self) -> dict[str, Any]:
        """Mean and precision as lists."""
        return {
            "latent_mean": self.gaussian.mean.tolist(),
            "latent_precision": self.gaussian.precision.tolist(),
        }

    def score(self, batch: ForwardPass) -> np.ndarray:
        """Per-row distance of the codes."""
        return self.gaussian.distance(batch.codes)
