"""What both engines share: the batch width check and what explaining a batch returns."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Explanation:
    """Why a batch's images scored as they did, from one forward pass: each score component's
    contribution ((n, k), rows summing to the score) and where the reconstruction error lies."""

    names: tuple[str, ...]  # the score's components, in the columns' order
    contributions: np.ndarray  # (n, k) float64: `Score.contributions`
    squared_error: np.ndarray  # (n, D) float32: per pixel, in model space (what mse averages)


def check_width(images: np.ndarray, input_dim: int) -> None:
    """ValueError unless the batch has `input_dim` features."""
    if images.shape[1] != input_dim:
        raise ValueError(f"batch has {images.shape[1]} features, expected {input_dim}")
