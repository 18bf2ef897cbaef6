"""Train the self-supervised transformation classifier behind the `transforms` scores.

The classifier learns, from normal images only, which transformation of a set
(detector.components.transforms: `rotations` or GEOM's 72 `geometric` ones) was applied. Batches are built on
the fly (a random image, a random transformation), so the N x T training set is never held in
memory (all of MNIST times 72 would be 13 GB). The trained Keras model is exported to numpy
(`TransformClassifier`) and checked against Keras on real rows, as the autoencoder's dense stack is.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import numpy as np

from detector.components.transforms import TransformSet
from detector.errors import ArtifactError
from detector.networks import TransformClassifier
from trainer.export import dense_chain_of
from trainer.progress import epoch_callbacks

log = logging.getLogger(__name__)

HIDDEN_UNITS = (512, 256)
VALIDATION_PAIRS = 20_000  # (image, transformation) pairs the early stopping watches
PARITY_TOLERANCE = 1e-3  # largest |numpy - keras| logit difference accepted, relative to the logits' scale


class _RandomTransforms:
    """Keras batches of (T_t(x_i), t) for random i and t; `len` batches make one pass over N x T."""

    def __init__(self, x: np.ndarray, transforms: TransformSet, batch_size: int, seed: int) -> None:
        self.padded = transforms.pad(x)
        self.transforms = transforms
        self.batch_size = batch_size
        self.rng = np.random.default_rng(seed)
        self.batches = math.ceil(x.shape[0] * len(transforms) / batch_size)

    def batch(self) -> tuple[np.ndarray, np.ndarray]:
        rows = self.rng.integers(0, self.padded.shape[0], self.batch_size)
        labels = self.rng.integers(0, len(self.transforms), self.batch_size)
        images = self.padded[rows[:, None], self.transforms.sources[labels]]
        return images, labels


def _pairs(x: np.ndarray, transforms: TransformSet, count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A fixed sample of (transformed image, label) pairs: every pair when there are few."""
    total = x.shape[0] * len(transforms)
    if total <= count:
        return transforms.training_set(x)
    pick = np.random.default_rng(seed).choice(total, count, replace=False)
    labels, rows = np.divmod(pick, x.shape[0])
    return transforms.pad(x)[rows[:, None], transforms.sources[labels]], labels


def build_classifier(input_dim: int, classes: int) -> Any:
    """An MLP from image to one logit per transformation."""
    import keras
    from keras import layers

    inputs = keras.Input((input_dim,), name="image")
    h = inputs
    for i, units in enumerate(HIDDEN_UNITS):
        h = layers.Dense(units, activation="relu", name=f"hidden_{i}")(h)
    logits = layers.Dense(classes, name="logits")(h)
    return keras.Model(inputs, logits, name="transform_classifier")


def export_classifier(model: Any) -> TransformClassifier:
    """The Keras classifier's Dense layers as numpy arrays (the walk the autoencoder's export uses)."""
    chain, why = dense_chain_of(model)
    if chain is None:
        raise ArtifactError(f"the transformation classifier cannot be exported to numpy: {why}")
    return TransformClassifier(*chain)


def train_transform_classifier(
    fit_x: np.ndarray,
    validation_x: np.ndarray,
    set_name: str,
    epochs: int,
    batch_size: int = 256,
    learning_rate: float = 1e-3,
    seed: int = 0,
    verbose: int = 0,
) -> tuple[TransformClassifier, dict[str, list[float]]]:
    """Fit the classifier on `fit_x` (early stopping on `validation_x`); its numpy export and losses."""
    import keras

    transforms = TransformSet.named(set_name, fit_x.shape[1])
    source = _RandomTransforms(np.asarray(fit_x, np.float32), transforms, batch_size, seed)

    class Batches(keras.utils.PyDataset):
        def __init__(self) -> None:
            super().__init__()  # one worker, no multiprocessing: batches come from one generator

        def __len__(self) -> int:
            return source.batches

        def __getitem__(self, index: int) -> tuple[np.ndarray, np.ndarray]:
            return source.batch()

    val_images, val_labels = _pairs(np.asarray(validation_x, np.float32), transforms, VALIDATION_PAIRS, seed)
    model = build_classifier(fit_x.shape[1], len(transforms))
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    log.info(
        "training transformation classifier set=%s transformations=%d images=%d epochs=%d",
        set_name,
        len(transforms),
        fit_x.shape[0],
        epochs,
    )
    history = model.fit(
        Batches(),
        validation_data=(val_images, val_labels),
        epochs=epochs,
        verbose=verbose,
        callbacks=[
            keras.callbacks.EarlyStopping(monitor="val_loss", patience=1, restore_best_weights=True),
            *epoch_callbacks("transform-classifier", epochs, verbose),
        ],
    )
    classifier = export_classifier(model)
    sample = val_images[:1024]
    expected = np.asarray(model.predict(sample, batch_size=1024, verbose=0))
    difference = float(np.max(np.abs(classifier.logits(sample) - expected))) if sample.size else 0.0
    scale = max(1.0, float(np.max(np.abs(expected)))) if sample.size else 1.0
    tolerance = PARITY_TOLERANCE * scale
    if difference > tolerance:
        raise ArtifactError(
            f"the numpy export of the transformation classifier differs from Keras by {difference:.3g}, "
            f"expected at most {tolerance:.3g}; the worker would not score what was trained"
        )
    losses = {k: [float(v) for v in vals] for k, vals in history.history.items()}
    return classifier, losses
