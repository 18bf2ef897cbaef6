"""`hidden-knn`: cosine distance to the nearest normal prototypes in the encoder's first layer.

What the autoencoder blurs away (an 8 from a 3, a sandal from a sneaker), a nearest neighbour
still sees; the pixel-space `knn` sees it too, at about 80 times the autoencoder's cost. Here the
neighbours live in the encoder's first layer, which the default trains both to reconstruct and to
tell which way up an image is (`trainer.multitask`), and they are prototypes: the centres of a
k-means of normal images' layer outputs (cosine, 256 centres by default), fitted by the trainer.
Scoring one image costs one 64 x 256 matrix product on a layer the autoencoder computes anyway
(about a sixth of dense-64-16's multiply-adds) and the k largest of 256 similarities.

The prototypes are kept in the artifact as `hidden_knn_prototypes.npy` (unit rows, float32). Pure
numpy at serving time; the fit uses scikit-learn's KMeans (a training dependency).
"""

from __future__ import annotations

import io
from collections.abc import Mapping
from typing import Any, ClassVar

import numpy as np
from pydantic import Field

from detector.components.base import Component, ComponentOptions, ForwardPass, NormalData, Setup
from detector.components.knn import mean_of_largest, read_rows, unit_rows

HIDDEN_KNN_FILE = "hidden_knn_prototypes.npy"
DEFAULT_HIDDEN_KNN_K = 3
DEFAULT_HIDDEN_KNN_PROTOTYPES = 256
# Normal images whose layer outputs the k-means sees: enough for 256 centres, fast to fit.
HIDDEN_KNN_FIT_ROWS = 20_000


def fit_prototypes(layer: np.ndarray, prototypes: int, seed: int) -> np.ndarray:
    """Unit-length centres of a k-means of the unit rows of `layer` (spherical k-means, one run).

    With fewer rows than `prototypes`, the rows themselves are the prototypes."""
    # scikit-learn is a training dependency (the `train` extra): the worker never fits.
    from sklearn.cluster import KMeans

    rows = unit_rows(layer)
    if rows.ndim != 2 or rows.shape[0] == 0:
        raise ValueError(f"need N x D layer outputs to fit prototypes, found shape {rows.shape}")
    if prototypes < 1:
        raise ValueError(f"prototypes must be at least 1, found {prototypes}")
    if rows.shape[0] <= prototypes:
        return rows
    centres = KMeans(prototypes, n_init=1, random_state=seed).fit(rows).cluster_centers_
    return unit_rows(np.asarray(centres, np.float32))


class HiddenKnnOptions(ComponentOptions):
    """How many prototypes `hidden-knn` keeps and averages."""

    hidden_knn_k: int = Field(
        DEFAULT_HIDDEN_KNN_K,
        ge=1,
        description="hidden-knn: how many nearest normal prototypes are averaged; 1 takes one argmax "
        f"pass per image instead of {DEFAULT_HIDDEN_KNN_K}",
    )
    hidden_knn_prototypes: int = Field(
        DEFAULT_HIDDEN_KNN_PROTOTYPES,
        ge=1,
        description="hidden-knn: k-means centres of the first encoder layer kept in the artifact; each "
        "costs the worker one multiply-add per layer value per scored image",
    )


class HiddenKnn(Component):
    """`hidden-knn`: how far an image's first encoder layer is from the nearest normal prototypes."""

    name = "hidden-knn"
    description = (
        "cosine distance to the nearest normal prototypes of the encoder's first layer; dense architectures"
    )
    options = HiddenKnnOptions
    needs_encoder = True
    needs_dense = True
    parameter_fields: ClassVar[dict[str, tuple[Any, Any]]] = {
        "hidden_knn_k": (
            int | None,
            Field(None, ge=1, description="hidden-knn: nearest prototypes averaged"),
        ),
        "hidden_knn_layer": (
            int | None,
            Field(None, ge=0, description="hidden-knn: the encoder layer compared (0: the first)"),
        ),
    }
    required_parameters = ("hidden_knn_k", "hidden_knn_layer")
    file = HIDDEN_KNN_FILE
    file_holds = "the normal prototypes of the encoder's first layer"

    def __init__(self, prototypes: np.ndarray, k: int = DEFAULT_HIDDEN_KNN_K, layer: int = 0) -> None:
        if not 1 <= k <= prototypes.shape[0]:
            raise ValueError(f"hidden_knn_k must be in 1..{prototypes.shape[0]} (prototypes), found {k}")
        self.prototypes = unit_rows(prototypes)
        self.k = k
        self.layer = layer

    @classmethod
    def check(cls, setup: Setup, options: HiddenKnnOptions) -> None:
        """A dense architecture, and k prototypes at least."""
        super().check(setup, options)
        if options.hidden_knn_k > options.hidden_knn_prototypes:
            raise ValueError(
                f"--hidden-knn-k {options.hidden_knn_k} needs at least as many prototypes, found "
                f"--hidden-knn-prototypes {options.hidden_knn_prototypes}"
            )

    @classmethod
    def fit(cls, normal: NormalData, options: HiddenKnnOptions) -> HiddenKnn:
        """Prototypes of the fit split's first-layer outputs (a seeded draw of at most 20,000):
        `hidden_knn_prototypes` of them, scored by the mean of the `hidden_knn_k` nearest. k is
        capped by the prototypes found (a tiny fit split)."""
        layer = normal.forward(normal.fit_sample(HIDDEN_KNN_FIT_ROWS)).encoder_layer(0)
        prototypes = fit_prototypes(layer, options.hidden_knn_prototypes, normal.seed)
        return cls(prototypes, min(options.hidden_knn_k, prototypes.shape[0]), 0)

    @classmethod
    def from_parameters(
        cls, parameters: Mapping[str, Any], data: bytes | None, input_dim: int, where: str
    ) -> HiddenKnn:
        """The prototypes: (n, width) finite floats, n >= k."""
        if data is None:
            raise ValueError(f"the hidden-knn score needs {cls.file_holds}")
        k = int(parameters.get("hidden_knn_k") or DEFAULT_HIDDEN_KNN_K)
        prototypes = read_rows(data, where, k, f"hidden_knn_k {k}")
        return cls(prototypes, k, int(parameters.get("hidden_knn_layer") or 0))

    def parameters(self) -> dict[str, Any]:
        """k and the layer compared."""
        return {"hidden_knn_k": self.k, "hidden_knn_layer": self.layer}

    def file_bytes(self) -> bytes:
        """hidden_knn_prototypes.npy."""
        buffer = io.BytesIO()
        np.save(buffer, self.prototypes, allow_pickle=False)
        return buffer.getvalue()

    def score(self, batch: ForwardPass) -> np.ndarray:
        """Per-row cosine distance to the k nearest prototypes.

        The rows are not scaled to unit length first: a row's length scales all its similarities
        alike, so the k nearest are the same, and dividing their mean by it afterwards costs n
        divisions instead of n x width (an all-zero row is at distance 1, as in `knn_distances`)."""
        layer = np.asarray(batch.encoder_layer(self.layer), np.float32)
        if layer.shape[1] != self.prototypes.shape[1]:
            raise ValueError(
                f"the hidden-knn prototypes have {self.prototypes.shape[1]} values, encoder layer "
                f"{self.layer} gives {layer.shape[1]}"
            )
        lengths = np.sqrt(np.einsum("ij,ij->i", layer, layer, dtype=np.float64))
        nearest = mean_of_largest(layer @ self.prototypes.T, self.k)
        return np.asarray(1.0 - nearest / np.maximum(lengths, 1e-12))
