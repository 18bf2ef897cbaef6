"""How long a network trains: the default's epochs-or-steps rule, and early stopping held back."""

from __future__ import annotations

import numpy as np
import pytest

from tests.conftest import mnist_sample
from trainer.budget import DEFAULT_EPOCHS, DEFAULT_MIN_STEPS, EpochBudget, epoch_budget


def test_the_default_trains_20_epochs_on_all_of_mnist_and_looks_for_a_stop_after_2000_steps() -> None:
    # 48,000 fit images at batch 256: 188 steps an epoch, so 2,000 steps end in epoch 11 and
    # early stopping looks from the 12th (index 11) on.
    assert (DEFAULT_EPOCHS, DEFAULT_MIN_STEPS) == (20, 2000)
    assert epoch_budget(None, None, 48_000, 256) == EpochBudget(epochs=20, stop_from=11)


def test_the_default_trains_one_mnist_class_2000_steps_instead_of_20_epochs() -> None:
    # 4,681 fit images of class 8 at batch 256: 19 steps an epoch, 106 epochs for 2,000 steps, all
    # of which run (early stopping would look only after the last: the last weights stand).
    assert epoch_budget(None, None, 4_681, 256) == EpochBudget(epochs=106, stop_from=106)


def test_an_explicit_epoch_count_trains_as_before_unless_a_floor_is_asked_for_as_well() -> None:
    assert epoch_budget(3, None, 4_681, 256) == EpochBudget(epochs=3, stop_from=0)
    assert epoch_budget(10, None, 48_000, 256) == EpochBudget(epochs=10, stop_from=0)
    assert epoch_budget(3, 2000, 4_681, 256) == EpochBudget(epochs=3, stop_from=3)  # a hard limit
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


def test_the_cli_takes_auto_or_a_count_of_epochs_and_a_step_floor_of_zero_or_more(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from trainer.cli import build_parser, train_config

    def config(*flags: str) -> tuple[int | None, int | None]:
        chosen = train_config(build_parser().parse_args(["train", "--out", "/tmp/never", *flags]))
        return chosen.epochs, chosen.min_steps

    assert config() == (None, None)  # auto epochs, and so the default floor of 2,000 steps
    assert config("--epochs", "AUTO", "--min-steps", "0") == (None, 0)
    assert config("--epochs", "7", "--min-steps", "500") == (7, 500)
    for bad in ("0", "many"):
        with pytest.raises(SystemExit):
            build_parser().parse_args(["train", "--out", "/tmp/never", "--epochs", bad])
        assert f"expected a positive integer or auto, found {bad}" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--out", "/tmp/never", "--min-steps", "-1"])


def test_the_notebook_presets_train_without_the_step_floor_and_flags_win_over_them() -> None:
    from trainer.cli import build_parser, train_config
    from trainer.presets import PRESETS

    def config(*flags: str) -> tuple[int | None, int | None]:
        chosen = train_config(build_parser().parse_args(["train", "--out", "/tmp/never", *flags]))
        return chosen.epochs, chosen.min_steps

    for name in PRESETS:
        assert config("--preset", name)[1] == 0, name
    assert config("--preset", "notebook-2mean") == (50, 0)
    assert config("--preset", "notebook-2mean", "--epochs", "auto") == (None, 0)
    assert config("--preset", "notebook-3std", "--min-steps", "2000") == (20, 2000)


def test_the_one_class_benchmark_trains_the_default_detector_unless_told_otherwise() -> None:
    from detector.components.orientation import OrientationHeadSpec
    from detector.components.transforms import TransformClassifierSpec
    from trainer.cli import benchmark_run, build_parser, train_config

    default = train_config(build_parser().parse_args(["train", "--out", "/tmp/never"]))
    run = benchmark_run(build_parser().parse_args(["benchmark", "--one-class"]))
    assert run.detector == default  # every field: architecture, budget, batch, seed, options, score
    # The default detector's networks: the geometric orientation head, no transformation classifier.
    assert run.networks() == (OrientationHeadSpec("geometric"),) and run.also_fit == ()
    assert run.classes == tuple(range(10))

    other = benchmark_run(
        build_parser().parse_args(
            [
                "benchmark",
                "--one-class",
                "--architecture",
                "dense-512-128-32",
                "--epochs",
                "30",
                "--transforms",
                "geometric",
                "--orientation",
                "none",
                "--batch-size",
                "128",
            ]
        )
    )
    detector = other.detector
    assert (detector.architecture, detector.epochs, detector.batch_size) == ("dense-512-128-32", 30, 128)
    assert other.networks() == (TransformClassifierSpec("geometric", 3),)  # no orientation head
    assert other.also_fit == ("transforms",)


def test_the_hidden_knn_flags_reach_the_trainer_and_default_to_the_components_defaults() -> None:
    from detector.components.hidden_knn import DEFAULT_HIDDEN_KNN_K, DEFAULT_HIDDEN_KNN_PROTOTYPES
    from trainer.cli import build_parser, train_config

    def config(*flags: str) -> tuple[int, int]:
        chosen = train_config(build_parser().parse_args(["train", "--out", "/tmp/never", *flags]))
        options = chosen.options.hidden_knn
        return options.hidden_knn_k, options.hidden_knn_prototypes

    assert config() == (DEFAULT_HIDDEN_KNN_K, DEFAULT_HIDDEN_KNN_PROTOTYPES) == (3, 256)
    assert config("--hidden-knn-k", "1", "--hidden-knn-prototypes", "128") == (1, 128)
