"""What both engines share: the batch width check and the artifact's input scaling."""

from __future__ import annotations

import numpy as np

from detector.artifact import LoadedArtifact
from detector.errors import ArtifactError


def feature_scaling(artifact: LoadedArtifact) -> tuple[np.ndarray, np.ndarray] | None:
    """(feature mean, 1/std) when the artifact standardises its input, else None (unit scaling)."""
    pre = artifact.baseline.preprocessing
    if pre.kind != "standardize":
        return None
    if pre.feature_mean is None or pre.feature_std is None:
        raise ArtifactError("preprocessing 'standardize' needs feature_mean and feature_std")
    mean = np.asarray(pre.feature_mean, np.float32)
    inv_std = (1.0 / np.maximum(np.asarray(pre.feature_std, np.float32), 1e-6)).astype(np.float32)
    return mean, inv_std


def check_width(images: np.ndarray, input_dim: int) -> None:
    """ValueError unless the batch has `input_dim` features."""
    if images.shape[1] != input_dim:
        raise ValueError(f"batch has {images.shape[1]} features, expected {input_dim}")
