"""Batch -> scores -> decisions. No Redis, no globals.

Two engines compute the same per-image score (the artifact's: reconstruction MSE by default, or
any other score or combination worker.scores defines; the transformation classifier and the knn
distances run in numpy in both):
- `NumpyScorer` runs a dense autoencoder from the artifact's dense_stack.npz with a few matrix
  products. It never imports TensorFlow, which saves about 600 MB and most of the start time,
  and it has no per-call framework overhead.
- `KerasScorer` runs any Keras model (conv included) as one XLA-compiled function per padded
  batch size (powers of two), so a stream of odd-sized batches never retraces.
`make_scorer` picks one (ANOMALY_ENGINE); `decide` turns scores into the output fields' numbers
(flagged, z, p-value) with plain numpy.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import tempfile
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from worker.artifact import LoadedArtifact
from worker.errors import ArtifactError, MissingExtra
from worker.tensorflow_import import import_keras_quietly
from worker.thresholds import check_policy_fits_score, flag_rate, p_values, parse_policy

log = logging.getLogger(__name__)

MIN_BUCKET = 8
Engine = Literal["auto", "numpy", "tensorflow"]


@dataclass(frozen=True)
class Decisions:
    """Per-row outcome of a scored batch."""

    flagged: np.ndarray  # bool
    z: np.ndarray
    p_value: np.ndarray


@dataclass(frozen=True)
class DecisionRule:
    """Threshold and the baseline numbers that turn a score into z and a p-value."""

    threshold: float
    policy: str
    mean: float
    std: float
    expected_flag_rate: float
    sorted_errors: np.ndarray

    @classmethod
    def from_artifact(cls, artifact: LoadedArtifact, policy: str | None = None) -> DecisionRule:
        """The artifact's own rule, or `policy` recomputed from its held-out errors."""
        stats = artifact.baseline.statistics
        errors = artifact.calibration_errors
        if policy:
            parsed = parse_policy(policy)
            check_policy_fits_score(parsed, artifact.baseline.score)
            value = parsed.threshold(errors)
            return cls(value, parsed.text, stats.mean, stats.std, flag_rate(errors, value), errors)
        t = artifact.baseline.threshold
        return cls(t.value, t.policy, stats.mean, stats.std, t.expected_flag_rate, errors)

    def decide(self, scores: np.ndarray) -> Decisions:
        """Flag score > threshold; z against the baseline; conformal p-value."""
        scores = np.asarray(scores, dtype=np.float64)
        std = self.std if self.std > 0 else 1e-12
        return Decisions(
            flagged=scores > self.threshold,
            z=(scores - self.mean) / std,
            p_value=p_values(self.sorted_errors, scores),
        )


def _bucket(n: int) -> int:
    size = MIN_BUCKET
    while size < n:
        size *= 2
    return size


def _standardization(artifact: LoadedArtifact) -> tuple[np.ndarray, np.ndarray] | None:
    """(feature mean, 1/std) when the artifact standardises its input, else None (unit scaling)."""
    pre = artifact.baseline.preprocessing
    if pre.kind != "standardize":
        return None
    if pre.feature_mean is None or pre.feature_std is None:
        raise ArtifactError("preprocessing 'standardize' needs feature_mean and feature_std")
    mean = np.asarray(pre.feature_mean, np.float32)
    inv_std = (1.0 / np.maximum(np.asarray(pre.feature_std, np.float32), 1e-6)).astype(np.float32)
    return mean, inv_std


def _check_width(images: np.ndarray, input_dim: int) -> None:
    if images.shape[1] != input_dim:
        raise ValueError(f"batch has {images.shape[1]} features, expected {input_dim}")


class NumpyScorer:
    """Per-image scores from the artifact's dense stack, in numpy (no TensorFlow)."""

    engine = "numpy"

    def __init__(self, artifact: LoadedArtifact) -> None:
        if artifact.dense_stack is None:
            raise ArtifactError(
                f"{artifact.path} has no dense_stack.npz (its model is not a chain of Dense layers, "
                "or an older trainer wrote it); use ANOMALY_ENGINE=tensorflow or auto"
            )
        self.artifact = artifact
        self.stack = artifact.dense_stack
        self.model_version = artifact.baseline.model_version
        self.input_dim = artifact.baseline.input_dim
        self.score = artifact.score_function()
        self._standardization = _standardization(artifact)

    def warm_up(self, up_to: int) -> None:
        """Touch every weight once (page it in) so the first real batch is not slower."""
        self.score_batch(np.zeros((min(up_to, 8), self.input_dim), np.float32))

    def score_batch(self, images: np.ndarray) -> np.ndarray:
        """Per-row score of a (n, D) float32 batch."""
        _check_width(images, self.input_dim)
        x = np.asarray(images, np.float32)
        if self._standardization is not None:
            mean, inv_std = self._standardization
            x = (x - mean) * inv_std
        if self.score.name != "mse":
            codes = self.stack.encode(x) if self.score.needs_codes else None
            return self.score(x, self.stack.reconstruct(x), codes)
        residual = self.stack.reconstruct(x)  # mse in place: no temporaries of batch x D
        np.subtract(x, residual, out=residual)
        per_row = np.einsum("ij,ij->i", residual, residual)
        return per_row.astype(np.float64) / self.input_dim


class KerasScorer:
    """Per-image scores from the artifact's Keras model, XLA-compiled per batch size."""

    engine = "tensorflow"

    def __init__(self, artifact: LoadedArtifact, max_batch: int = 1024, jit: bool = True) -> None:
        import_keras_quietly()
        import tensorflow as tf

        self.artifact = artifact
        self.model_version = artifact.baseline.model_version
        self.input_dim = artifact.baseline.input_dim
        self.max_bucket = _bucket(max_batch)
        self.model = load_model_bytes(artifact.model_bytes, artifact)
        if self.model.input_shape[-1] != self.input_dim:
            raise ArtifactError(
                f"model input has {self.model.input_shape[-1]} features, "
                f"baseline.json says input_dim {self.input_dim}"
            )
        standardization = _standardization(artifact)
        mean, inv_std = standardization or (
            np.zeros(self.input_dim, np.float32),
            np.ones(self.input_dim, np.float32),
        )
        model = self.model
        mean_t = tf.constant(mean)
        inv_std_t = tf.constant(inv_std)
        self.score = score = artifact.score_function()
        encoder = model.get_layer("encoder") if score.needs_codes else None

        def forward(x: Any) -> tuple[Any, ...]:
            z = (x - mean_t) * inv_std_t
            recon = model(z, training=False)
            if score.name == "mse":  # reduced in the graph: only n numbers leave it
                return (tf.reduce_mean(tf.square(z - recon), axis=1),)
            if encoder is None:
                return (z, recon)
            return (z, recon, encoder(z, training=False))

        # One concrete function per padded size: no retracing, and each compiled once by XLA.
        self._function = tf.function(forward, jit_compile=jit)
        self._by_size: dict[int, Any] = {}
        self._tf = tf

    def warm_up(self, up_to: int) -> None:
        """Trace the compiled function for every bucket a batch of `up_to` rows may use."""
        size = MIN_BUCKET
        while True:
            self._run(np.zeros((size, self.input_dim), np.float32))
            if size >= min(_bucket(up_to), self.max_bucket):
                break
            size *= 2

    def _run(self, padded: np.ndarray) -> list[np.ndarray]:
        size = padded.shape[0]
        fn = self._by_size.get(size)
        if fn is None:
            spec = self._tf.TensorSpec((size, self.input_dim), self._tf.float32)
            fn = self._by_size[size] = self._function.get_concrete_function(spec)
        return [np.asarray(t) for t in fn(self._tf.constant(padded))]

    def score_batch(self, images: np.ndarray) -> np.ndarray:
        """Per-row score of a (n, D) float32 batch; one forward pass per <= max_batch rows."""
        n = images.shape[0]
        _check_width(images, self.input_dim)
        if n == 0:
            return np.empty(0, np.float64)
        out = np.empty(n, np.float64)
        for start in range(0, n, self.max_bucket):
            chunk = images[start : start + self.max_bucket]
            size = _bucket(chunk.shape[0])
            padded = np.zeros((size, self.input_dim), np.float32)
            padded[: chunk.shape[0]] = chunk
            rows = chunk.shape[0]
            outputs = [t[:rows] for t in self._run(padded)]
            out[start : start + rows] = outputs[0] if self.score.name == "mse" else self.score(*outputs)
        return out


Scorer = NumpyScorer | KerasScorer


def make_scorer(
    artifact: LoadedArtifact, engine: Engine = "auto", max_batch: int = 1024, jit: bool = True
) -> Scorer:
    """The scorer for `engine`; auto takes numpy when the artifact has a dense stack."""
    if engine == "numpy" or (engine == "auto" and artifact.dense_stack is not None):
        return NumpyScorer(artifact)
    if engine in ("auto", "tensorflow"):
        require_tensorflow(artifact, engine)
        return KerasScorer(artifact, max_batch=max_batch, jit=jit)
    raise ValueError(f"engine must be auto, numpy or tensorflow, found {engine!r}")


def require_tensorflow(artifact: LoadedArtifact, engine: Engine) -> None:
    """Refuse at start, naming the extra to install, when the TensorFlow engine is needed but absent."""
    missing = [name for name in ("tensorflow", "keras") if importlib.util.find_spec(name) is None]
    if not missing:
        return
    why = (
        "ANOMALY_ENGINE=tensorflow asks for the TensorFlow engine"
        if engine == "tensorflow"
        else f"{artifact.path} has no dense_stack.npz (a conv model, or an artifact of schema 1.0), "
        "so only the TensorFlow engine can score it"
    )
    raise MissingExtra(
        f"{why}, but {' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} not installed; "
        "install the extra: pip install 'anomaly-scorer[tensorflow]'"
    )


def load_model_bytes(model_bytes: bytes, artifact: LoadedArtifact) -> Any:
    """Load the verified model bytes with Keras' safe mode (no Lambda-layer code execution)."""
    keras = import_keras_quietly()

    fd, tmp = tempfile.mkstemp(suffix=".keras")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(model_bytes)
        return keras.saving.load_model(tmp, compile=False, safe_mode=True)
    except (ValueError, OSError, TypeError) as exc:
        raise ArtifactError(f"{artifact.path / 'model.keras'} cannot be loaded: {exc}") from exc
    finally:
        os.unlink(tmp)
