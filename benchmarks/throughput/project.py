"""The project code the benchmark measures: the one module that imports `worker` (re-point it here
when those modules move)."""

from __future__ import annotations

import numpy as np

from worker.artifact import load_artifact
from worker.codec import encode_image
from worker.scoring import KerasScorer, NumpyScorer

__all__ = ["KerasScorer", "NumpyScorer", "load_artifact", "payloads"]


def payloads(images: np.ndarray, dtype: str) -> list[bytes]:
    """Encoded `image` fields, as producers send them (worker.codec.encode_image)."""
    return [encode_image(image, dtype)["image"] for image in images]
