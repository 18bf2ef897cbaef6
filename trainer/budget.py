"""How long a network trains: the epoch limit, and the first epoch early stopping may look at.

`--epochs` left to its default ("auto") trains DEFAULT_EPOCHS epochs or DEFAULT_MIN_STEPS
optimizer steps, whichever is longer, and early stopping (with its choice of the best epoch's
weights) looks only at the epochs after those steps, as Keras' EarlyStopping(start_from_epoch)
does. On all of MNIST (48,000 fit images, batch 256: 188 steps an epoch) that is the 20 epochs it
always was, early stopping looking from the 12th; on one MNIST class (4,300-5,400 fit images:
17-22 steps an epoch) it is a fixed run of 91-118 epochs that keeps the last weights, where 20
epochs left the multi-task network undertrained (docs/detection.md: the default's one-class mean
on MNIST rose from 0.9674 to 0.9754). An explicit epoch count trains as before: a hard limit, early
stopping from the first epoch, unless a step floor is asked for as well. Pure arithmetic, no Keras.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

DEFAULT_EPOCHS = 20
DEFAULT_MIN_STEPS = 2000
DEFAULT_BATCH_SIZE = 256  # `train`'s and the one-class benchmark's: the steps above count these


@dataclass(frozen=True)
class EpochBudget:
    """At most `epochs` epochs; early stopping looks only at epochs from `stop_from` (0-based)."""

    epochs: int
    stop_from: int


def step_floor(epochs: int | None, min_steps: int | None) -> int:
    """The steps before early stopping looks: `min_steps`, or by default DEFAULT_MIN_STEPS with
    auto epochs (None) and 0 with an explicit count."""
    if min_steps is not None:
        return min_steps
    return DEFAULT_MIN_STEPS if epochs is None else 0


def epoch_budget(epochs: int | None, min_steps: int | None, rows: int, batch_size: int) -> EpochBudget:
    """The budget of a training run on `rows` images in batches of `batch_size`.

    `epochs` None is auto: DEFAULT_EPOCHS, raised so that `min_steps` steps fit. Early stopping
    looks only at the epochs that start after `min_steps` steps (0: from the first epoch); when
    that is past the limit, every epoch runs and the last weights stand. `min_steps` None is the
    default: DEFAULT_MIN_STEPS with auto epochs, 0 with an explicit count."""
    if epochs is not None and epochs <= 0:
        raise ValueError(f"epochs must be a positive number or auto, found {epochs}")
    min_steps = step_floor(epochs, min_steps)
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
