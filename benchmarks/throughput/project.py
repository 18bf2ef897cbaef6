"""The project code the benchmark measures: the one module that imports `detector`, `trainer` and
`worker` (re-point it here when those modules move)."""

from __future__ import annotations

import numpy as np

from contract.codec import encode_image
from detector.artifact import load_artifact
from detector.engines.keras_engine import KerasScorer
from detector.engines.numpy_engine import NumpyScorer
from detector.region import square_side
from trainer.models import reconstruction_errors
from worker.loaded_model import LoadedModel
from worker.scoring import DecisionRule

__all__ = [
    "DecisionRule",
    "KerasScorer",
    "LoadedModel",
    "NumpyScorer",
    "load_artifact",
    "payloads",
    "reconstruction_errors",
    "square_side",
]


def payloads(images: np.ndarray, dtype: str) -> list[bytes]:
    """Encoded `image` fields, as producers send them (contract.codec.encode_image)."""
    return [encode_image(image, dtype)["image"] for image in images]
