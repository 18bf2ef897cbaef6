"""The numpy engine: a dense autoencoder from the artifact's dense_stack.npz, a few matrix products.

It never imports TensorFlow, which saves about 600 MB and most of the start time, and it has no
per-call framework overhead, which dominates at the small batches a live stream has.
"""

from __future__ import annotations

import numpy as np

from detector.artifact import LoadedArtifact
from detector.components.base import ForwardPass
from detector.engines.common import Explanation, check_width
from detector.errors import ArtifactError
from detector.preprocessing import scaling_of


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
        self.score = artifact.score
        self.scaling = scaling_of(artifact.baseline.preprocessing)

    def warm_up(self, up_to: int) -> None:
        """Touch every weight once (page it in) so the first real batch is not slower."""
        self.score_batch(np.zeros((min(up_to, 8), self.input_dim), np.float32))

    def score_batch(self, images: np.ndarray) -> np.ndarray:
        """Per-row score of a (n, D) float32 batch."""
        x = self._model_space(images)
        if self.score.name != "mse":
            return self.score(self._forward(x))
        residual = self.stack.reconstruct(x)  # mse in place: no temporaries of batch x D
        np.subtract(x, residual, out=residual)
        per_row = np.einsum("ij,ij->i", residual, residual)
        return per_row.astype(np.float64) / self.input_dim

    def score_with_squared_error(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Per-row scores and per-pixel squared reconstruction errors (model space) from one forward
        pass: what locating every row's error (the scores stream's `region`) needs."""
        x = self._model_space(images)
        batch = self._forward(x)
        scores = self.score(batch)
        residual = np.subtract(x, batch.reconstructions, out=batch.reconstructions)  # scored: free now
        return scores, np.square(residual, out=residual)

    def squared_error(self, images: np.ndarray) -> np.ndarray:
        """Per-pixel squared reconstruction error of a (n, D) batch, in model space (what mse averages)."""
        x = self._model_space(images)
        residual = self.stack.reconstruct(x)
        np.subtract(x, residual, out=residual)
        return np.square(residual, out=residual)

    def explain(self, images: np.ndarray) -> Explanation:
        """Each score component's contribution per row (rows summing to the score:
        `Score.contributions`) and the squared reconstruction error, from one forward pass of a
        (n, D) batch: why a flagged image scored high, and where."""
        batch = self._forward(self._model_space(images))
        contributions = self.score.contributions(self.score.parts(batch))
        residual = np.subtract(batch.images, batch.reconstructions)
        names = tuple(c.name for c in self.score.components)
        return Explanation(names, contributions, np.square(residual, out=residual))

    def forward(self, x: np.ndarray) -> ForwardPass:
        """The forward pass of a model-space batch with every encoder layer's output: what
        computing several scores from one pass needs (the evaluation)."""
        recon, encoder = self.stack.reconstruct_keeping_encoder(np.asarray(x, np.float32))
        return ForwardPass(x, recon, encoder)

    def _model_space(self, images: np.ndarray) -> np.ndarray:
        check_width(images, self.input_dim)
        return self.scaling(images)

    def _forward(self, x: np.ndarray) -> ForwardPass:
        if self.score.needs_encoder:  # one pass: the encoder's outputs are kept on the way
            recon, encoder = self.stack.reconstruct_keeping_encoder(x)
            return ForwardPass(x, recon, encoder)
        return ForwardPass(x, self.stack.reconstruct(x))
