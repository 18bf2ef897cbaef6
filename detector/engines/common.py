"""What both engines share: the batch width check."""

from __future__ import annotations

import numpy as np


def check_width(images: np.ndarray, input_dim: int) -> None:
    """ValueError unless the batch has `input_dim` features."""
    if images.shape[1] != input_dim:
        raise ValueError(f"batch has {images.shape[1]} features, expected {input_dim}")
