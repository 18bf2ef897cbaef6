"""How long a network trains: the default's epochs-or-steps rule, and early stopping held back."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.conftest import mnist_sample
from trainer.budget import DEFAULT_EPOCHS, DEFAULT_MIN_STEPS, EpochBudget, epoch_budget


def test_the_default_trains_20_epochs_on_all_of_mnist_and_may_stop_after_2000_steps() -> None:
    # 48,000 fit images at batch 256: 188 steps an epoch, so 2,000 steps end in epoch 11.
    assert (DEFAULT_EPOCHS, DEFAULT_MIN_STEPS) == (20, 2000)
    assert epoch_budget(None, 2000, 48_000, 256) == EpochBudget(epochs=20, stop_from=11)


def test_the_default_trains_one_mnist_class_2000_steps_instead_of_20_epochs() -> None:
    # 4,681 fit images of one class at batch 256: 19 steps an epoch, 106 epochs for 2,000 steps,
    # all of which run (early stopping would start after the last).
    assert epoch_budget(None, 2000, 4_681, 256) == EpochBudget(epochs=106, stop_from=106)


def test_an_explicit_epoch_count_is_a_hard_limit_and_the_floor_only_holds_early_stopping_back() -> None:
    assert epoch_budget(3, 2000, 4_681, 256) == EpochBudget(epochs=3, stop_from=3)
    assert epoch_budget(50, 2000, 48_000, 256) == EpochBudget(epochs=50, stop_from=11)


def test_no_step_floor_lets_early_stopping_act_from_the_first_epoch() -> None:
    assert epoch_budget(None, 0, 4_681, 256) == EpochBudget(epochs=DEFAULT_EPOCHS, stop_from=0)
    assert epoch_budget(7, 0, 100, 256) == EpochBudget(epochs=7, stop_from=0)


@pytest.mark.parametrize(
    ("epochs", "min_steps", "rows", "batch", "message"),
    [
        (0, 0, 10, 2, "epochs must be a positive number or auto, found 0"),
        (None, -1, 10, 2, "min_steps must be 0 or more, found -1"),
        (None, 0, 0, 2, "a training run needs images and a batch size, found 0 rows, batch 2"),
        (None, 0, 10, 0, "a training run needs images and a batch size, found 10 rows, batch 0"),
    ],
)
def test_a_budget_that_cannot_train_is_refused_naming_what_was_found(
    epochs: int | None, min_steps: int, rows: int, batch: int, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        epoch_budget(epochs, min_steps, rows, batch)


@pytest.mark.parametrize("orientation", [None, "dihedral"])
def test_early_stopping_does_not_end_training_before_the_floor_and_does_after_it(
    orientation: str | None,
) -> None:
    """Held-out images that score NaN never improve on the first held-out loss looked at: with
    patience 1 early stopping ends training one epoch after the first it may look at, not before."""
    import keras

    from trainer.fitting import fit_autoencoder
    from trainer.models import build_model

    x, _ = mnist_sample(256, seed=3)
    x = np.asarray(x, np.float32)
    never_better = np.full((64, x.shape[1]), np.nan, np.float32)

    def epochs_run(budget: EpochBudget) -> int:
        keras.utils.set_random_seed(0)
        model = build_model("dense-32", x.shape[1])
        _, losses = fit_autoencoder(
            model, x, never_better, budget, batch_size=64, learning_rate=1e-3, patience=1,
            orientation=orientation,  # type: ignore[arg-type]
        )  # fmt: skip
        return len(losses["loss"])

    assert epochs_run(EpochBudget(epochs=6, stop_from=6)) == 6
    assert epochs_run(EpochBudget(epochs=8, stop_from=4)) == 6
    assert epochs_run(EpochBudget(epochs=6, stop_from=0)) == 2


def test_the_cli_takes_auto_or_a_count_of_epochs_and_a_step_floor_of_zero_or_more() -> None:
    from trainer.cli import build_parser

    def parse(*flags: str) -> tuple[int | None, int | None]:
        args = build_parser().parse_args(["train", "--out", "/tmp/never", *flags])
        return args.epochs, args.min_steps

    assert parse() == (None, None)  # the config's defaults: auto, DEFAULT_MIN_STEPS
    assert parse("--epochs", "auto", "--min-steps", "0") == (None, 0)
    assert parse("--epochs", "7", "--min-steps", "500") == (7, 500)
    for bad in (("--epochs", "0"), ("--epochs", "many"), ("--min-steps", "-1")):
        with pytest.raises(SystemExit):
            build_parser().parse_args(["train", "--out", "/tmp/never", *bad])


def test_the_default_has_the_step_floor_and_the_notebook_presets_train_without_it() -> None:
    from trainer.presets import PRESETS, resolve
    from trainer.train import TrainConfig

    default = TrainConfig(**resolve(None, {"epochs": None, "min_steps": None}, TrainConfig), out=Path("x"))
    assert (default.epochs, default.min_steps) == (None, DEFAULT_MIN_STEPS)
    for name in PRESETS:
        chosen = TrainConfig(**resolve(name, {"min_steps": None}, TrainConfig), out=Path("x"))
        assert chosen.min_steps == 0, name
    assert resolve("notebook-3std", {"min_steps": 2000}, TrainConfig)["min_steps"] == 2000  # flags win
