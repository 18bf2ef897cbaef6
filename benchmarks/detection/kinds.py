"""Anomaly kinds built from normal test images: pure numpy, seeded, one function per kind.

Each takes (n, side*side) images in [0, 1] and returns as many anomalous ones. `SEEN` are the kinds
looked at while the default detector was chosen (rotations are what its head learns; Fashion-MNIST
items were measured in that comparison); `UNSEEN` were added afterwards and never tuned on.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

Kind = Callable[[np.ndarray, np.random.Generator], np.ndarray]


def _square(images: np.ndarray) -> tuple[np.ndarray, int]:
    side = math.isqrt(images.shape[1])
    if side * side != images.shape[1]:
        raise ValueError(f"anomaly kinds need square images, found D={images.shape[1]}")
    return images.reshape(-1, side, side), side


def rotated_90(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Each image rotated by 90 degrees (the reference notebooks' anomaly)."""
    square, side = _square(images)
    return np.rot90(square, 1, axes=(1, 2)).reshape(-1, side * side).copy()


def inverted(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """White ink on black becomes black on white: 1 - x."""
    return (1.0 - images).astype(np.float32)


def heavy_noise(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Gaussian noise of standard deviation 0.5 added to every pixel, clipped to [0, 1]."""
    return np.clip(images + rng.normal(0.0, 0.5, images.shape), 0.0, 1.0).astype(np.float32)


def shifted(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The digit moved 8 pixels right and 8 down (a crop that missed its centre)."""
    square, side = _square(images)
    out = np.zeros_like(square)
    out[:, 8:, 8:] = square[:, : side - 8, : side - 8]
    return out.reshape(-1, side * side)


def occluded(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The bottom half blanked (a torn or partly scanned digit)."""
    square, side = _square(images)
    out = square.copy()
    out[:, side // 2 :, :] = 0.0
    return out.reshape(-1, side * side)


def uniform_noise(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Images of uniform random pixels (a broken camera), as many as given."""
    return rng.random(images.shape).astype(np.float32)


SEEN: dict[str, Kind] = {"rotated 90°": rotated_90}
UNSEEN: dict[str, Kind] = {
    "inverted": inverted,
    "heavy noise (sd 0.5)": heavy_noise,
    "shifted 8 px": shifted,
    "bottom half blanked": occluded,
    "uniform noise": uniform_noise,
}
FASHION = "Fashion-MNIST items"  # seen: measured while the default was chosen
