"""`knn`: cosine distance to the k nearest normal training images. Pure numpy.

What the autoencoder blurs away (an 8 from a 3), a nearest neighbour still sees. The reference
images are kept in the artifact as `knn_reference.npy` (model space, float32).
"""

from __future__ import annotations

import io
import zipfile
from collections.abc import Mapping
from typing import Any, ClassVar

import numpy as np
from pydantic import Field

from detector.components.base import Component, ComponentOptions, ForwardPass, NormalData, Setup

KNN_REFERENCE_FILE = "knn_reference.npy"
DEFAULT_KNN_K = 5
# Normal images a knn score keeps: 10,000 x 784 float32 is 31 MB in the artifact and in memory,
# and about 8M multiply-adds per scored image.
DEFAULT_KNN_REFERENCE_ROWS = 10_000


def knn_distances(x: np.ndarray, reference: np.ndarray, k: int = DEFAULT_KNN_K) -> np.ndarray:
    """1 - mean cosine similarity of each row to its k most similar rows of `reference`.

    `reference` rows must already have unit length (`unit_rows`)."""
    if not 1 <= k <= reference.shape[0]:
        raise ValueError(f"k must be in 1..{reference.shape[0]} (reference rows), found {k}")
    rows = unit_rows(x)
    out = np.empty(rows.shape[0], np.float64)
    step = max(1, 2**22 // max(1, reference.shape[0]))  # similarity blocks of at most 4M floats
    for start in range(0, rows.shape[0], step):
        out[start : start + step] = 1.0 - mean_of_largest(rows[start : start + step] @ reference.T, k)
    return out


def mean_of_largest(values: np.ndarray, k: int) -> np.ndarray:
    """Per row, the mean of the `k` largest values (float64); `values` may be overwritten.

    For k up to 4, k passes of argmax: 3.5 times faster than np.partition at 256 x 512 (69 against
    242 us on one core), which the hidden-knn score pays on every batch."""
    if k > 4:
        nearest = np.partition(values, values.shape[1] - k, axis=1)[:, -k:]
        return np.asarray(nearest.sum(axis=1, dtype=np.float64) / k)
    rows = np.arange(values.shape[0])
    total = np.zeros(values.shape[0], np.float64)
    for _ in range(k):
        best = values.argmax(axis=1)
        total += values[rows, best]
        values[rows, best] = -np.inf
    return total / k


def read_rows(data: bytes, where: str, min_rows: int, why: str, width: int | None = None) -> np.ndarray:
    """One .npy array of (n >= min_rows, width) finite floats (`width` None: any); ValueError
    names the file `where`, what it holds and what was expected (`why` says why min_rows)."""
    try:
        rows = np.load(io.BytesIO(data), allow_pickle=False)
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as exc:
        raise ValueError(f"{where} is unreadable: {exc}") from exc
    if not isinstance(rows, np.ndarray):
        raise ValueError(f"{where} must be one .npy array, found {type(rows).__name__}")
    if rows.ndim != 2 or (width is not None and rows.shape[1] != width) or rows.shape[0] < min_rows:
        raise ValueError(
            f"{where} holds an array of shape {rows.shape}, expected (n, {width or 'width'}) with n >= {why}"
        )
    if rows.dtype.kind != "f" or not np.isfinite(rows).all():
        raise ValueError(f"{where} must hold finite floats, found dtype {rows.dtype} or non-finite values")
    return rows


def unit_rows(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (float32); an all-zero row stays zero."""
    x = np.asarray(x, np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    if np.allclose(norms[norms > 0], 1.0, atol=1e-5):
        return x  # already unit rows (a loaded reference): no second copy
    return np.asarray(x / np.maximum(norms, 1e-12), np.float32)


def knn_reference_of(fit: np.ndarray, rows: int, seed: int) -> np.ndarray:
    """At most `rows` of the fit split (a seeded draw, in order): the knn score's normal images."""
    if fit.shape[0] <= rows:
        return np.asarray(fit, np.float32)
    pick = np.sort(np.random.default_rng(seed).choice(fit.shape[0], rows, replace=False))
    return np.asarray(fit[pick], np.float32)


class KnnOptions(ComponentOptions):
    """How many normal images `knn` keeps and averages."""

    knn_k: int = Field(DEFAULT_KNN_K, ge=1, description="knn: how many nearest normal images are averaged")
    knn_reference: int = Field(
        DEFAULT_KNN_REFERENCE_ROWS,
        ge=1,
        description="knn: at most this many normal training images are kept in the artifact; each costs "
        "the worker D multiply-adds per scored image of D pixels",
    )


class Knn(Component):
    """`knn`: distance to the nearest normal images."""

    name = "knn"
    description = "cosine distance to the nearest normal training images"
    options = KnnOptions
    parameter_fields: ClassVar[dict[str, tuple[Any, Any]]] = {
        "knn_k": (
            int | None,
            Field(None, ge=1, description="knn: nearest normal images averaged"),
        ),
    }
    required_parameters = ("knn_k",)
    file = KNN_REFERENCE_FILE
    file_holds = "the normal reference images"

    def __init__(self, reference: np.ndarray, k: int = DEFAULT_KNN_K) -> None:
        self.reference = reference  # as stored (model space); its unit rows are what is scored
        self.unit_reference = unit_rows(reference)
        self.k = k

    @classmethod
    def check(cls, setup: Setup, options: KnnOptions) -> None:
        """k reference images at least."""
        super().check(setup, options)
        if options.knn_k > min(options.knn_reference, setup.fit_rows):
            raise ValueError(
                f"--knn-k {options.knn_k} needs at least as many reference images, found "
                f"min(--knn-reference {options.knn_reference}, fit split {setup.fit_rows})"
            )

    @classmethod
    def fit(cls, normal: NormalData, options: KnnOptions) -> Knn:
        """A seeded draw of the fit split."""
        return cls(knn_reference_of(normal.fit, options.knn_reference, normal.seed), options.knn_k)

    @classmethod
    def from_parameters(
        cls, parameters: Mapping[str, Any], data: bytes | None, input_dim: int, where: str
    ) -> Knn:
        """The reference images: (n, input_dim) finite floats, n >= k."""
        if data is None:
            raise ValueError("the knn score needs the normal reference images")
        k = parameters.get("knn_k")
        reference = read_rows(data, where, k or 1, f"knn_k {k}", input_dim)
        # Cosine distance needs only the directions: one copy in memory.
        return cls(unit_rows(reference), int(k or DEFAULT_KNN_K))

    def parameters(self) -> dict[str, Any]:
        """k."""
        return {"knn_k": self.k}

    def file_bytes(self) -> bytes:
        """knn_reference.npy."""
        buffer = io.BytesIO()
        np.save(buffer, self.reference, allow_pickle=False)
        return buffer.getvalue()

    def score(self, batch: ForwardPass) -> np.ndarray:
        """Per-row cosine distance to the k nearest reference images."""
        return knn_distances(batch.images, self.unit_reference, self.k)
