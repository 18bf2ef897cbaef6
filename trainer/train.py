"""Fit the autoencoder, measure held-out errors, compute the baseline, write the artifact."""

from __future__ import annotations

import logging
import sys
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from trainer.data import Dataset
from trainer.export import verified_dense_stack
from trainer.models import DEFAULT_ARCHITECTURE, build_model
from trainer.transforms import DEFAULT_TRANSFORM_EPOCHS
from worker.artifact import (
    ERRORS_FILE,
    KNN_REFERENCE_FILE,
    MODEL_FILE,
    Baseline,
    Preprocessing,
    ScoreParameters,
    Statistics,
    Threshold,
    Training,
    model_version_of,
    save_errors,
    score_function_of,
    write_artifact,
)
from worker.dense_stack import DENSE_STACK_FILE
from worker.scores import DEFAULT_KNN_K, ScoreFunction, ScoreName, components_of, standardisation
from worker.thresholds import check_policy_fits_score, flag_rate, parse_policy
from worker.transforms import (
    TRANSFORM_CLASSIFIER_FILE,
    TransformClassifier,
    TransformSet,
    TransformSetName,
)

log = logging.getLogger(__name__)

# Normal images a knn score keeps: 10,000 x 784 float32 is 31 MB in the artifact and in memory,
# and about 8M multiply-adds per scored image.
DEFAULT_KNN_REFERENCE_ROWS = 10_000


@dataclass(frozen=True)
class TrainConfig:
    """Everything `anomaly-trainer train` can set."""

    out: Path
    dataset: str = "mnist"
    data_dir: str | None = None
    classes: list[int] | None = None
    architecture: str = DEFAULT_ARCHITECTURE
    epochs: int = 10
    batch_size: int = 256
    learning_rate: float = 1e-3
    threshold: str = "mean+3std"
    score: ScoreName = "mse"
    transforms: TransformSetName = "geometric"  # the classifier's set, for the transformation scores
    transform_epochs: int = DEFAULT_TRANSFORM_EPOCHS
    knn_k: int = DEFAULT_KNN_K
    knn_reference_rows: int = DEFAULT_KNN_REFERENCE_ROWS
    seed: int = 0
    holdout_fraction: float = 0.2
    max_samples: int | None = None
    patience: int = 3
    preprocessing: str = "unit"
    report: bool = True
    progress: bool | None = None  # None: show a progress bar only on a terminal


@dataclass
class TrainResult:
    """What training produced."""

    artifact: Path
    baseline: Baseline
    history: dict[str, list[float]] = field(default_factory=dict)
    duration_seconds: float = 0.0


@dataclass(frozen=True)
class Splits:
    """Normal training data cut three ways: fit, validation (early stopping), calibration."""

    fit: np.ndarray
    validation: np.ndarray
    calibration: np.ndarray


def split_normal(x: np.ndarray, holdout_fraction: float, seed: int) -> Splits:
    """Shuffle with `seed`; the held-out part is halved into validation and calibration."""
    if not 0 < holdout_fraction < 1:
        raise ValueError(f"holdout_fraction must be in (0, 1), found {holdout_fraction}")
    order = np.random.default_rng(seed).permutation(x.shape[0])
    n_hold = max(2, round(x.shape[0] * holdout_fraction))
    if x.shape[0] - n_hold < 1:
        raise ValueError(f"{x.shape[0]} samples are too few to hold out {n_hold}")
    n_val = n_hold // 2
    return Splits(
        fit=x[order[n_hold:]],
        validation=x[order[:n_val]],
        calibration=x[order[n_val:n_hold]],
    )


def select_normal(dataset: Dataset, classes: list[int] | None) -> np.ndarray:
    """Training images of the normal classes (all when `classes` is None)."""
    x, y = dataset.train.x, dataset.train.y
    if classes is None:
        return x
    if y is None:
        raise ValueError(f"dataset {dataset.name} has no labels, so --classes cannot be used")
    mask = np.isin(y, classes)
    if not mask.any():
        raise ValueError(f"no training images of classes {classes} in {dataset.name}")
    return x[mask]


def reconstruction_errors(
    model: Any, x: np.ndarray, score: ScoreFunction | None = None, batch_size: int = 1024
) -> np.ndarray:
    """Per-row score (MSE unless `score` says otherwise) of `x`, already in model space."""
    score = score or ScoreFunction()
    recon = model.predict(x, batch_size=batch_size, verbose=0)
    codes = None
    if score.needs_codes:
        codes = model.get_layer("encoder").predict(x, batch_size=batch_size, verbose=0)
    return score(x, recon, codes)


def score_parameters_for(
    name: ScoreName,
    model: Any,
    validation: np.ndarray,
    classifier: TransformClassifier | None = None,
    transforms: TransformSetName | None = None,
    knn_reference: np.ndarray | None = None,
    knn_k: int = DEFAULT_KNN_K,
) -> ScoreParameters | None:
    """What the score needs besides the model, fitted on the validation split: the Gaussian of
    normal codes (mahalanobis), each component's mean and std (combined scores such as mse+knn)."""
    components = components_of(name)
    if name == "mse":
        return None
    if "transforms" in components and (classifier is None or transforms is None):
        raise ValueError(f"score {name!r} needs the transformation classifier")
    if "knn" in components and knn_reference is None:
        raise ValueError(f"score {name!r} needs the normal reference images")
    params = ScoreParameters(
        transforms=transforms if "transforms" in components else None,
        knn_k=knn_k if "knn" in components else None,
    )
    codes = None
    if "mahalanobis" in components:
        from trainer.evaluate import LatentGaussian  # evaluate imports this module: import when needed

        codes = model.get_layer("encoder").predict(validation, batch_size=1024, verbose=0)
        gaussian = LatentGaussian.fit(codes)  # the same fit the evaluation makes on the same split
        params = params.model_copy(
            update={"latent_mean": gaussian.mean.tolist(), "latent_precision": gaussian.precision.tolist()}
        )
    if len(components) == 1:
        return params
    recon = model.predict(validation, batch_size=1024, verbose=0)
    unscaled = params.model_copy(  # each component as is: the standardisation is what is measured
        update={"combine_mean": [0.0] * len(components), "combine_std": [1.0] * len(components)}
    )
    score = score_function_of(name, unscaled, classifier, validation.shape[1], knn_reference)
    mean, std = standardisation(score.parts(validation, recon, codes))
    return params.model_copy(update={"combine_mean": list(mean), "combine_std": list(std)})


def knn_reference_of(fit: np.ndarray, rows: int, seed: int) -> np.ndarray:
    """At most `rows` of the fit split (a seeded draw, in order): the knn score's normal images."""
    if fit.shape[0] <= rows:
        return np.asarray(fit, np.float32)
    pick = np.sort(np.random.default_rng(seed).choice(fit.shape[0], rows, replace=False))
    return np.asarray(fit[pick], np.float32)


# A feature that barely varies in training (an image border) would turn any later deviation
# into a huge z-score; its std is floored at this share of the mean feature std.
STD_FLOOR_SHARE = 0.1


class _Standardizer:
    """Per-feature z-scores; the floored std is what the artifact stores and the worker applies."""

    def __init__(self, x: np.ndarray) -> None:
        self.mean = x.mean(axis=0).astype(np.float32)
        std = x.std(axis=0)
        floor = max(1e-3, STD_FLOOR_SHARE * float(std.mean()))
        self.std = np.maximum(std, floor).astype(np.float32)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return ((x - self.mean) / self.std).astype(np.float32)


def train(config: TrainConfig, dataset: Dataset) -> TrainResult:
    """Train, calibrate and write the artifact to `config.out`."""
    import keras
    import tensorflow as tf

    started = time.monotonic()
    keras.utils.set_random_seed(config.seed)
    tf.config.experimental.enable_op_determinism()

    normal = select_normal(dataset, config.classes)
    if config.max_samples is not None and normal.shape[0] > config.max_samples:
        pick = np.random.default_rng(config.seed).choice(normal.shape[0], config.max_samples, replace=False)
        normal = normal[np.sort(pick)]
    splits = split_normal(normal, config.holdout_fraction, config.seed)
    policy = parse_policy(config.threshold)  # fail before training on a bad policy or score
    components = components_of(config.score)
    check_policy_fits_score(policy, config.score)
    if "transforms" in components:
        TransformSet.named(config.transforms, normal.shape[1])  # square images only
    if "knn" in components and config.knn_k > min(config.knn_reference_rows, splits.fit.shape[0]):
        raise ValueError(
            f"--knn-k {config.knn_k} needs at least as many reference images, found "
            f"min(--knn-reference {config.knn_reference_rows}, fit split {splits.fit.shape[0]})"
        )

    preprocessing = Preprocessing()
    transform: Any = lambda a: a  # noqa: E731
    if config.preprocessing == "standardize":
        standardizer = _Standardizer(splits.fit)
        transform = standardizer
        preprocessing = Preprocessing(
            kind="standardize",
            feature_mean=standardizer.mean.tolist(),
            feature_std=standardizer.std.tolist(),
        )
    elif config.preprocessing != "unit":
        raise ValueError(f"preprocessing must be unit or standardize, found {config.preprocessing!r}")

    fit_x, val_x, cal_x = (
        transform(splits.fit),
        transform(splits.validation),
        transform(splits.calibration),
    )
    input_dim = fit_x.shape[1]
    model = build_model(config.architecture, input_dim, linear_output=preprocessing.kind == "standardize")
    model.compile(optimizer=keras.optimizers.Adam(config.learning_rate), loss="mse")
    show_progress = sys.stdout.isatty() if config.progress is None else config.progress
    log.info(
        "training architecture=%s fit=%d validation=%d calibration=%d epochs=%d",
        config.architecture,
        fit_x.shape[0],
        val_x.shape[0],
        cal_x.shape[0],
        config.epochs,
    )
    history = model.fit(
        fit_x,
        fit_x,
        validation_data=(val_x, val_x),
        epochs=config.epochs,
        batch_size=config.batch_size,
        shuffle=True,
        verbose=1 if show_progress else 0,
        callbacks=[
            keras.callbacks.EarlyStopping(
                monitor="val_loss", patience=config.patience, restore_best_weights=True
            )
        ],
    )
    losses = {k: [float(v) for v in vals] for k, vals in history.history.items()}

    classifier = None
    if "transforms" in components:
        from trainer.transforms import train_transform_classifier

        classifier, classifier_losses = train_transform_classifier(
            fit_x,
            val_x,
            config.transforms,
            config.transform_epochs,
            seed=config.seed,
            verbose=1 if show_progress else 0,
        )
        losses |= {f"transforms_{k}": v for k, v in classifier_losses.items()}
    latent_dim = int(model.get_layer("encoder").output.shape[-1])
    knn_reference = None
    if "knn" in components:
        knn_reference = knn_reference_of(fit_x, config.knn_reference_rows, config.seed)
    score_parameters = score_parameters_for(
        config.score, model, val_x, classifier, config.transforms, knn_reference, config.knn_k
    )
    score = score_function_of(config.score, score_parameters, classifier, input_dim, knn_reference)
    cal_errors = reconstruction_errors(model, cal_x, score)
    threshold_value = policy.threshold(cal_errors)
    training = Training(
        dataset=dataset.name,
        classes=config.classes,
        architecture=config.architecture,
        epochs_requested=config.epochs,
        epochs_run=len(losses.get("loss", [])),
        batch_size=config.batch_size,
        learning_rate=config.learning_rate,
        seed=config.seed,
        train_count=int(fit_x.shape[0]),
        validation_count=int(val_x.shape[0]),
        calibration_count=int(cal_x.shape[0]),
        history=losses,
        duration_seconds=round(time.monotonic() - started, 3),
        created_at=datetime.now(UTC).isoformat(timespec="seconds"),
        keras_version=keras.__version__,
        tensorflow_version=tf.__version__,
    )
    baseline = Baseline(
        model_version="pending",
        input_dim=input_dim,
        latent_dim=latent_dim,
        score=config.score,
        score_parameters=score_parameters,
        preprocessing=preprocessing,
        statistics=Statistics.of(cal_errors),
        threshold=Threshold(
            policy=policy.text,
            value=threshold_value,
            expected_flag_rate=flag_rate(cal_errors, threshold_value),
        ),
        training=training,
    )

    dense_stack = verified_dense_stack(model, cal_x[:2048])

    def stage(tmp: Path) -> Baseline:
        model.save(tmp / MODEL_FILE)
        if dense_stack is not None:
            (tmp / DENSE_STACK_FILE).write_bytes(dense_stack.to_bytes())
        if classifier is not None:
            (tmp / TRANSFORM_CLASSIFIER_FILE).write_bytes(classifier.to_bytes())
        if knn_reference is not None:
            np.save(tmp / KNN_REFERENCE_FILE, knn_reference, allow_pickle=False)
        save_errors(tmp / ERRORS_FILE, cal_errors)
        # The report names the model, so the version is known before it is drawn.
        versioned = baseline.model_copy(
            update={"model_version": model_version_of((tmp / MODEL_FILE).read_bytes())}
        )
        if config.report:
            from trainer.report import write_report

            write_report(
                tmp,
                model,
                versioned,
                dataset,
                splits,
                transform,
                transform_scorer=score.transform_scorer,
                knn_reference=knn_reference,
            )
        return versioned

    path = write_artifact(config.out, stage)
    from worker.artifact import load_artifact

    final = load_artifact(path).baseline
    return TrainResult(path, final, losses, time.monotonic() - started)
