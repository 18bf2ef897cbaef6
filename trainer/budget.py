"""How long a network trains: the epoch limit, and the first epoch early stopping may end.

`--epochs` left to its default ("auto") trains DEFAULT_EPOCHS epochs or DEFAULT_MIN_STEPS
optimizer steps, whichever is longer, and early stopping may not end training before those
steps. On all of MNIST (48,000 images, batch 256: 188 steps an epoch) that is the 20 epochs it
always was; on one class (about 4,800 images: 19 steps an epoch) it is 106 epochs instead of 20,
which the one-class benchmark showed the multi-task network needs (docs/detection.md: MNIST mean
AUROC 0.967 -> 0.976). An explicit epoch count is a hard limit; the step floor then only holds
early stopping back. Pure arithmetic, no Keras.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

DEFAULT_EPOCHS = 20
DEFAULT_MIN_STEPS = 2000


@dataclass(frozen=True)
class EpochBudget:
    """At most `epochs` epochs; early stopping looks only at epochs from `stop_from` (0-based)."""

    epochs: int
    stop_from: int


def epoch_budget(epochs: int | None, min_steps: int, rows: int, batch_size: int) -> EpochBudget:
    """The budget of a training run on `rows` images in batches of `batch_size`.

    `epochs` None is the default: DEFAULT_EPOCHS, raised so that `min_steps` steps fit. Early
    stopping may end training only once `min_steps` steps have run (0: from the first epoch)."""
    if epochs is not None and epochs <= 0:
        raise ValueError(f"epochs must be a positive number or auto, found {epochs}")
    if min_steps < 0:
        raise ValueError(f"min_steps must be 0 or more, found {min_steps}")
    if rows <= 0 or batch_size <= 0:
        raise ValueError(
            f"a training run needs images and a batch size, found {rows} rows, batch {batch_size}"
        )
    steps_per_epoch = math.ceil(rows / batch_size)
    floor = math.ceil(min_steps / steps_per_epoch)
    limit = max(DEFAULT_EPOCHS, floor) if epochs is None else epochs
    return EpochBudget(limit, min(floor, limit))
