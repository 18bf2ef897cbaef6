"""Fit an autoencoder, alone or with its orientation head, within an epoch budget.

`anomaly-trainer train` and the one-class benchmark fit the same way: early stopping on the
held-out loss (patience in epochs, the best epoch's weights kept), looking only at the epochs from
the budget's `stop_from` on (`trainer.budget`); when that is past the last epoch, the last weights
stand.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from detector.components.transforms import TransformSetName
from detector.networks import TransformClassifier
from trainer.budget import EpochBudget
from trainer.multitask import train_multitask
from trainer.progress import epoch_callbacks


def fit_autoencoder(
    model: Any,
    fit_x: np.ndarray,
    validation_x: np.ndarray,
    budget: EpochBudget,
    batch_size: int,
    learning_rate: float,
    patience: int,
    seed: int = 0,
    verbose: int = 0,
    orientation: TransformSetName | None = None,
) -> tuple[TransformClassifier | None, dict[str, list[float]]]:
    """Train `model` on `fit_x`; with `orientation`, as one network with its head on that set.

    Returns the head (None without `orientation`) and the per-epoch losses."""
    if orientation is not None:
        return train_multitask(
            model,
            fit_x,
            validation_x,
            budget=budget,
            batch_size=batch_size,
            learning_rate=learning_rate,
            patience=patience,
            seed=seed,
            verbose=verbose,
            transforms_name=orientation,
        )
    import keras

    model.compile(optimizer=keras.optimizers.Adam(learning_rate), loss="mse")
    history = model.fit(
        fit_x,
        fit_x,
        validation_data=(validation_x, validation_x),
        epochs=budget.epochs,
        batch_size=batch_size,
        shuffle=True,
        verbose=verbose,
        callbacks=[
            keras.callbacks.EarlyStopping(
                monitor="val_loss",
                patience=patience,
                restore_best_weights=True,
                start_from_epoch=budget.stop_from,
            ),
            *epoch_callbacks("autoencoder", budget.epochs, verbose),
        ],
    )
    return None, {k: [float(v) for v in vals] for k, vals in history.history.items()}
