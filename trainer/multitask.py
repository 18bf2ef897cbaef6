"""Train the autoencoder and the `orientation` head together: one multi-task network.

The head is a linear layer on the encoder's first Dense layer; it learns which of a set of
transformations (the default's: the 72 `geometric` ones, 4 rotations x {no flip, mirror} x 9
shifts) was applied to a normal image. Each batch holds
normal images, which the autoencoder reconstructs (mean squared error), and one random
transformation of each, which the head classifies (cross-entropy); the loss is their sum. The
shared layer so serves both: what reconstruction needs, and which way up and which way round a
normal image is. The autoencoder alone is saved as `model.keras` (the engines load it as any
other); the head is exported to numpy (`orientation_head.npz`) and scored by
`detector.components.orientation`.

Every epoch visits every image once, under a transformation drawn afresh for each image and epoch
(`random_pairs`). The epochs are separate `fit` calls on arrays: a Python or tf.data pipeline that
drew the transformations per batch trained 1.5 to 2 times slower on 2 cores.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any

import numpy as np

from detector.components.transforms import TransformSet, TransformSetName
from detector.networks import TransformClassifier
from trainer.budget import EpochBudget
from trainer.progress import log_epoch

log = logging.getLogger(__name__)

HEAD_LAYER = "orientation_logits"


def trunk_layer(model: Any) -> Any:
    """The encoder's first Dense layer: what the head reads (dense architectures only)."""
    import keras

    encoder = model.get_layer("encoder")
    dense = [layer for layer in encoder.layers if isinstance(layer, keras.layers.Dense)]
    convolutional = [layer.name for layer in encoder.layers if "conv" in type(layer).__name__.lower()]
    if not dense or convolutional:
        raise ValueError(
            f"the orientation score needs a dense architecture (dense-32, dense-64-16, "
            f"dense-512-128-32), found {model.name}"
        )
    return dense[0]


def build_multitask(autoencoder: Any, classes: int) -> tuple[Any, Any]:
    """(the joint model: [image, transformed image] -> [reconstruction, logits], the head layer).

    The joint model shares the autoencoder's layers: training it trains the autoencoder."""
    import keras
    from keras import layers

    input_dim = int(autoencoder.input_shape[-1])
    encoder = autoencoder.get_layer("encoder")
    trunk = keras.Model(encoder.inputs, trunk_layer(autoencoder).output, name="trunk")
    head = layers.Dense(classes, name=HEAD_LAYER)
    images = keras.Input((input_dim,), name="image")
    transformed = keras.Input((input_dim,), name="transformed")
    joint = keras.Model(
        [images, transformed], [autoencoder(images), head(trunk(transformed))], name="multitask"
    )
    return joint, head


def random_pairs(x: np.ndarray, transforms: TransformSet, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """One seeded random transformation of every row, and its label."""
    labels = np.asarray(np.random.default_rng(seed).integers(0, len(transforms), x.shape[0]))
    return transforms.pad(x)[np.arange(x.shape[0])[:, None], transforms.sources[labels]], labels


def train_multitask(
    autoencoder: Any,
    fit_x: np.ndarray,
    validation_x: np.ndarray,
    budget: EpochBudget,
    batch_size: int,
    learning_rate: float,
    patience: int,
    transforms_name: TransformSetName,
    seed: int = 0,
    verbose: int = 0,
) -> tuple[TransformClassifier, dict[str, list[float]]]:
    """Fit the autoencoder with the orientation head within `budget`: early stopping on the held-out
    joint loss from the budget's `stop_from` epoch, as Keras' EarlyStopping(start_from_epoch) does
    (the epochs before it are neither the best nor counted against patience).

    Returns the head in numpy and the losses (`loss`/`val_loss` are the joint ones)."""
    import keras

    transforms = TransformSet.named(transforms_name, fit_x.shape[1])
    joint, head = build_multitask(autoencoder, len(transforms))
    joint.compile(
        optimizer=keras.optimizers.Adam(learning_rate),
        loss=["mse", keras.losses.SparseCategoricalCrossentropy(from_logits=True)],
        steps_per_execution=16,  # fewer Python round trips per epoch: about 30% faster on 2 cores
    )
    fit_x = np.asarray(fit_x, np.float32)
    val_x = np.asarray(validation_x, np.float32)
    val_transformed, val_labels = random_pairs(val_x, transforms, seed + 1)
    log.info(
        "training autoencoder with orientation head transformations=%d fit=%d epochs=%d",
        len(transforms),
        fit_x.shape[0],
        budget.epochs,
    )
    losses: dict[str, list[float]] = {}
    best, best_weights, waited = math.inf, None, 0
    started = time.monotonic()
    for epoch in range(budget.epochs):  # early stopping on the held-out joint loss, best weights kept
        transformed, labels = random_pairs(fit_x, transforms, seed + 2 + epoch)
        history = joint.fit(
            [fit_x, transformed],
            [fit_x, labels],
            validation_data=([val_x, val_transformed], [val_x, val_labels]),
            batch_size=batch_size,
            epochs=1,
            shuffle=True,
            verbose=verbose,
        )
        for name, values in history.history.items():
            losses.setdefault(name, []).extend(float(v) for v in values)
        if not verbose:  # Keras draws nothing: say how far the run is, a line an epoch
            log_epoch(
                "autoencoder+orientation",
                epoch + 1,
                budget.epochs,
                {k: v[-1] for k, v in losses.items()},
                started,
            )
        held_out = losses["val_loss"][-1]
        if epoch < budget.stop_from:
            continue
        if best_weights is None or held_out < best:  # the first epoch looked at is the best so far
            best, best_weights, waited = held_out, joint.get_weights(), 0
        else:
            waited += 1
            if waited >= patience:
                break
    if best_weights is not None:  # None: every epoch ran before stop_from, the last weights stand
        joint.set_weights(best_weights)
    kernel, bias = (np.asarray(w, np.float32) for w in head.get_weights())
    return TransformClassifier((kernel,), (bias,), ("linear",)), losses
