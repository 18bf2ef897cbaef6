"""The TensorFlow engine: any Keras model (conv included), XLA-compiled per padded batch size.

One concrete function per batch size rounded up to a power of two, so a stream of odd-sized
batches never retraces. TensorFlow and Keras are imported only when a scorer is built or a model
loaded, so importing this module costs nothing.
"""

from __future__ import annotations

import os
import tempfile
from typing import Any

import numpy as np

from detector.artifact import MODEL_FILE, LoadedArtifact
from detector.components.base import ForwardPass
from detector.engines.common import Explanation, check_width
from detector.engines.tensorflow_import import import_keras_quietly
from detector.errors import ArtifactError
from detector.preprocessing import scaling_of

MIN_BUCKET = 8


def bucket(n: int) -> int:
    """The padded batch size for n rows: a power of two, at least MIN_BUCKET."""
    size = MIN_BUCKET
    while size < n:
        size *= 2
    return size


class KerasScorer:
    """Per-image scores from the artifact's Keras model, XLA-compiled per batch size."""

    engine = "tensorflow"

    def __init__(self, artifact: LoadedArtifact, max_batch: int = 1024, jit: bool = True) -> None:
        # Imported here, never at module level: a worker without TensorFlow imports this package fine.
        import_keras_quietly()
        import tensorflow as tf

        self.artifact = artifact
        self.model_version = artifact.baseline.model_version
        self.input_dim = artifact.baseline.input_dim
        self.max_bucket = bucket(max_batch)
        self.model = load_model_bytes(artifact.model_bytes, artifact)
        if self.model.input_shape[-1] != self.input_dim:
            raise ArtifactError(
                f"model input has {self.model.input_shape[-1]} features, "
                f"baseline.json says input_dim {self.input_dim}"
            )
        self.scaling = scaling = scaling_of(artifact.baseline.preprocessing)
        model = self.model
        mean_t = tf.constant(np.zeros(self.input_dim, np.float32) if scaling.mean is None else scaling.mean)
        inv_std_t = tf.constant(
            np.ones(self.input_dim, np.float32) if scaling.inv_std is None else scaling.inv_std
        )
        self.score = score = artifact.score
        encoder_layers = encoder_layers_model(model) if score.needs_encoder else None
        decoder = model.get_layer("decoder") if score.needs_encoder else None

        def forward(x: Any) -> tuple[Any, ...]:
            z = (x - mean_t) * inv_std_t
            if encoder_layers is None or decoder is None:
                recon = model(z, training=False)
                if score.name == "mse":  # reduced in the graph: only n numbers leave it
                    return (tf.reduce_mean(tf.square(z - recon), axis=1),)
                return (z, recon)
            layers = encoder_layers(z, training=False)
            outputs = list(layers) if isinstance(layers, list | tuple) else [layers]
            return (z, decoder(outputs[-1], training=False), *outputs)

        # One concrete function per padded size: no retracing, and each compiled once by XLA.
        self._function = tf.function(forward, jit_compile=jit)
        self._by_size: dict[int, Any] = {}
        self._tf = tf
        self._encoder_layers: Any = None  # built by `forward`, the first time it is asked for

    def warm_up(self, up_to: int) -> None:
        """Trace the compiled function for every bucket a batch of `up_to` rows may use."""
        size = MIN_BUCKET
        while True:
            self._run(np.zeros((size, self.input_dim), np.float32))
            if size >= min(bucket(up_to), self.max_bucket):
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
        check_width(images, self.input_dim)
        if n == 0:
            return np.empty(0, np.float64)
        out = np.empty(n, np.float64)
        for start in range(0, n, self.max_bucket):
            chunk = images[start : start + self.max_bucket]
            size = bucket(chunk.shape[0])
            padded = np.zeros((size, self.input_dim), np.float32)
            padded[: chunk.shape[0]] = chunk
            rows = chunk.shape[0]
            outputs = [t[:rows] for t in self._run(padded)]
            if self.score.name == "mse":
                out[start : start + rows] = outputs[0]
            else:
                out[start : start + rows] = self.score(
                    ForwardPass(outputs[0], outputs[1], tuple(outputs[2:]))
                )
        return out

    def score_with_squared_error(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """score_batch and squared_error: two passes here (the compiled one gives scores only)."""
        return self.score_batch(images), self.squared_error(images)

    def squared_error(self, images: np.ndarray) -> np.ndarray:
        """Per-pixel squared reconstruction error of a (n, D) batch, in model space (an eager call:
        the worker asks for the few flagged rows only)."""
        check_width(images, self.input_dim)
        z = self.scaling(images)
        recon = np.asarray(self.model(self._tf.constant(z), training=False))
        return np.square(z - recon)

    def explain(self, images: np.ndarray) -> Explanation:
        """Each score component's contribution per row (rows summing to the score:
        `Score.contributions`) and the squared reconstruction error, from one eager forward pass
        of a (n, D) batch (the worker asks for the few flagged rows only)."""
        check_width(images, self.input_dim)
        batch = self.forward(self.scaling(images))
        contributions = self.score.contributions(self.score.parts(batch))
        names = tuple(c.name for c in self.score.components)
        return Explanation(names, contributions, np.square(batch.images - batch.reconstructions))

    def forward(self, x: np.ndarray, chunk: int = 1024) -> ForwardPass:
        """The forward pass of a model-space batch with every encoder layer's output (eager, in
        chunks): what computing several scores from one pass needs (the evaluation)."""
        if self._encoder_layers is None:
            self._encoder_layers = encoder_layers_model(self.model)
        x = np.asarray(x, np.float32)
        recon, layers = [], []
        for start in range(0, x.shape[0], chunk):
            z = self._tf.constant(x[start : start + chunk])
            recon.append(np.asarray(self.model(z, training=False)))
            outputs = self._encoder_layers(z, training=False)
            layers.append(
                [np.asarray(o) for o in (outputs if isinstance(outputs, list | tuple) else [outputs])]
            )
        if not recon:
            return ForwardPass(x, np.empty_like(x))
        return ForwardPass(
            x, np.concatenate(recon), tuple(np.concatenate(group) for group in zip(*layers, strict=True))
        )


def encoder_layers_model(model: Any) -> Any:
    """A Keras model of the autoencoder's encoder whose outputs are its Dense layers' (code last).

    It shares the encoder's layers (and weights): what `ForwardPass.encoder_layers` holds."""
    keras = import_keras_quietly()
    encoder = model.get_layer("encoder")
    dense = [layer for layer in encoder.layers if isinstance(layer, keras.layers.Dense)]
    return keras.Model(encoder.inputs, [layer.output for layer in dense], name="encoder_layers")


def load_model_bytes(model_bytes: bytes, artifact: LoadedArtifact) -> Any:
    """Load the verified model bytes with Keras' safe mode (no Lambda-layer code execution)."""
    keras = import_keras_quietly()

    fd, tmp = tempfile.mkstemp(suffix=".keras")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(model_bytes)
        return keras.saving.load_model(tmp, compile=False, safe_mode=True)
    except (ValueError, OSError, TypeError) as exc:
        raise ArtifactError(f"{artifact.path / MODEL_FILE} cannot be loaded: {exc}") from exc
    finally:
        os.unlink(tmp)
