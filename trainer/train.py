"""Fit the autoencoder, measure held-out errors, compute the baseline, write the artifact."""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Hashable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from detector.artifact import (
    ERRORS_FILE,
    MODEL_FILE,
    Baseline,
    ScoreParameters,
    Training,
    load_artifact,
    model_version_of,
    save_errors,
    write_artifact,
)
from detector.components.base import NormalData, Setup
from detector.components.hidden_knn import DEFAULT_HIDDEN_KNN_K, DEFAULT_HIDDEN_KNN_PROTOTYPES
from detector.components.knn import DEFAULT_KNN_K, DEFAULT_KNN_REFERENCE_ROWS
from detector.components.orientation import DEFAULT_ORIENTATION_TRANSFORMS, OrientationHeadSpec
from detector.components.transforms import TransformClassifierSpec, TransformSetName
from detector.datasets import Dataset
from detector.engines.keras_engine import encoder_layers_model
from detector.networks import DENSE_STACK_FILE, TransformClassifier
from detector.preprocessing import fit_preprocessing, scaling_of
from detector.score import DEFAULT_SCORE, Score, ScoreName, ScoreOptions, components_of
from detector.thresholds import calibrate, check_policy_fits_score, parse_policy, score_buckets
from trainer.budget import DEFAULT_BATCH_SIZE, epoch_budget
from trainer.evaluate import fitted_networks
from trainer.export import verified_dense_stack
from trainer.fitting import fit_autoencoder
from trainer.models import (
    DEFAULT_ARCHITECTURE,
    DENSE_ARCHITECTURES,
    build_model,
    forward_pass,
    reconstruction_errors,
)
from trainer.presets import DEFAULT_THRESHOLD
from trainer.report import write_report
from trainer.splits import select_normal, split_normal
from trainer.transforms import DEFAULT_TRANSFORM_EPOCHS, train_transform_classifier

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainConfig:
    """Everything `anomaly-trainer train` can set."""

    out: Path
    dataset: str = "mnist"
    data_dir: str | None = None
    classes: list[int] | None = None
    architecture: str = DEFAULT_ARCHITECTURE
    epochs: int | None = None  # None: auto, DEFAULT_EPOCHS or min_steps, whichever is longer
    # Early stopping looks only at the epochs after these steps; None: DEFAULT_MIN_STEPS with auto
    # epochs, 0 with an explicit count (trainer.budget).
    min_steps: int | None = None
    batch_size: int = DEFAULT_BATCH_SIZE
    learning_rate: float = 1e-3
    threshold: str = DEFAULT_THRESHOLD
    score: ScoreName = DEFAULT_SCORE
    transforms: TransformSetName = "geometric"  # the classifier's set, for the transformation scores
    transform_epochs: int = DEFAULT_TRANSFORM_EPOCHS
    orientation_transforms: TransformSetName = DEFAULT_ORIENTATION_TRANSFORMS  # the head's set
    knn_k: int = DEFAULT_KNN_K
    knn_reference_rows: int = DEFAULT_KNN_REFERENCE_ROWS
    hidden_knn_k: int = DEFAULT_HIDDEN_KNN_K
    hidden_knn_prototypes: int = DEFAULT_HIDDEN_KNN_PROTOTYPES
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
    options = ScoreOptions().updated(
        {
            "knn_k": config.knn_k,
            "knn_reference": config.knn_reference_rows,
            "hidden_knn_k": config.hidden_knn_k,
            "hidden_knn_prototypes": config.hidden_knn_prototypes,
            "transforms": config.transforms,
            "transform_epochs": config.transform_epochs,
            "orientation_transforms": config.orientation_transforms,
        }
    )
    setup = Setup(normal.shape[1], splits.fit.shape[0], config.architecture, DENSE_ARCHITECTURES)
    Score.check(config.score, setup, options)  # what each component needs: dense, square, enough rows

    preprocessing = fit_preprocessing(config.preprocessing, splits.fit)
    transform = scaling_of(preprocessing)

    fit_x, val_x, cal_x = (
        transform(splits.fit),
        transform(splits.validation),
        transform(splits.calibration),
    )
    input_dim = fit_x.shape[1]
    model = build_model(config.architecture, input_dim, linear_output=preprocessing.kind == "standardize")
    show_progress = sys.stdout.isatty() if config.progress is None else config.progress
    budget = epoch_budget(config.epochs, config.min_steps, fit_x.shape[0], config.batch_size)
    log.info(
        "training architecture=%s score=%s fit=%d validation=%d calibration=%d epochs=%d "
        "early_stopping_from_epoch=%s",
        config.architecture,
        config.score,
        fit_x.shape[0],
        val_x.shape[0],
        cal_x.shape[0],
        budget.epochs,
        budget.stop_from + 1 if budget.stop_from < budget.epochs else "never",
    )
    orientation_head, losses = fit_autoencoder(
        model,
        fit_x,
        val_x,
        budget,
        batch_size=config.batch_size,
        learning_rate=config.learning_rate,
        patience=config.patience,
        seed=config.seed,
        verbose=1 if show_progress else 0,
        orientation=config.orientation_transforms if "orientation" in components else None,
    )

    classifier = None
    if "transforms" in components:  # a network of its own, trained here; the component scores with it
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
    encoder_layers = encoder_layers_model(model)
    networks: dict[Hashable, TransformClassifier] = {}
    if classifier is not None:
        networks[TransformClassifierSpec(config.transforms, config.transform_epochs)] = classifier
    if orientation_head is not None:
        networks[OrientationHeadSpec(config.orientation_transforms)] = orientation_head
    normal_data = NormalData(
        fit=fit_x,
        validation=val_x,
        forward=lambda x: forward_pass(model, x, encoder_layers),
        seed=config.seed,
        networks=networks,
    )
    score = Score.fit(config.score, normal_data, options)
    params = score.parameters()
    cal_errors = reconstruction_errors(model, cal_x, score)
    statistics, threshold = calibrate(cal_errors, policy)
    training = Training(
        dataset=dataset.name,
        classes=config.classes,
        architecture=config.architecture,
        epochs_requested=budget.epochs,
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
        score_parameters=None if params is None else ScoreParameters(**params),
        preprocessing=preprocessing,
        statistics=statistics,
        threshold=threshold,
        score_buckets=list(score_buckets(cal_errors, threshold.value)),
        training=training,
    )

    dense_stack = verified_dense_stack(model, cal_x[:2048])

    def stage(tmp: Path) -> Baseline:
        model.save(tmp / MODEL_FILE)
        if dense_stack is not None:
            (tmp / DENSE_STACK_FILE).write_bytes(dense_stack.to_bytes())
        for name, content in score.files().items():
            (tmp / name).write_bytes(content)
        save_errors(tmp / ERRORS_FILE, cal_errors)
        # The report names the model, so the version is known before it is drawn.
        versioned = baseline.model_copy(
            update={"model_version": model_version_of((tmp / MODEL_FILE).read_bytes())}
        )
        if config.report:
            write_report(tmp, model, versioned, dataset, splits, transform, **fitted_networks(score))
        return versioned

    path = write_artifact(config.out, stage)
    final = load_artifact(path).baseline
    return TrainResult(path, final, losses, time.monotonic() - started)
