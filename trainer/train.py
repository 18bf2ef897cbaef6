"""A training run, start to artifact: fit the detector, calibrate its threshold, write the artifact."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from detector.artifact import (
    ERRORS_FILE,
    MODEL_FILE,
    Baseline,
    InputLayout,
    ScoreParameters,
    Training,
    load_artifact,
    model_version_of,
    save_errors,
    write_artifact,
)
from detector.datasets import Dataset
from detector.networks import DENSE_STACK_FILE
from detector.thresholds import calibrate, parse_policy, score_buckets
from trainer.config import DetectorConfig
from trainer.export import verified_dense_stack
from trainer.pipeline import fit_detector
from trainer.report import write_report


@dataclass
class TrainResult:
    """What training produced."""

    artifact: Path
    baseline: Baseline
    history: dict[str, list[float]] = field(default_factory=dict)
    duration_seconds: float = 0.0


def input_layout(dataset: Dataset, input_dim: int) -> InputLayout | None:
    """The layout of the images trained on: the source's image shape, else square grey when
    input_dim is a square (N x D rows of MNIST-like images), else unknown."""
    if dataset.image_shape is not None:
        height, width, channels = dataset.image_shape
        if height * width * channels == input_dim:
            return InputLayout(width=width, height=height, channels=channels)
    return InputLayout.square_grey(input_dim)


def train(
    config: DetectorConfig, dataset: Dataset, out: Path, report: bool = True, progress: bool | None = None
) -> TrainResult:
    """Train `config` on `dataset`, calibrate the threshold and write the artifact to `out`
    (replaced atomically); `progress` None shows Keras' progress bars only on a terminal."""
    import keras
    import tensorflow as tf

    started = time.monotonic()
    show_progress = sys.stdout.isatty() if progress is None else progress
    fitted = fit_detector(config, dataset, verbose=1 if show_progress else 0)
    calibration = fitted.scaling(fitted.splits.calibration)
    cal_errors = fitted.score(fitted.forward(calibration))
    statistics, threshold = calibrate(cal_errors, parse_policy(config.threshold))
    model, params = fitted.model, fitted.score.parameters()
    training = Training(
        dataset=dataset.name,
        classes=config.classes,
        architecture=config.architecture,
        epochs_requested=fitted.budget.epochs,
        epochs_run=len(fitted.losses.get("loss", [])),
        batch_size=config.batch_size,
        learning_rate=config.learning_rate,
        seed=config.seed,
        train_count=int(fitted.normal.fit.shape[0]),
        validation_count=int(fitted.normal.validation.shape[0]),
        calibration_count=int(calibration.shape[0]),
        history=fitted.losses,
        duration_seconds=round(time.monotonic() - started, 3),
        created_at=datetime.now(UTC).isoformat(timespec="seconds"),
        keras_version=keras.__version__,
        tensorflow_version=tf.__version__,
    )
    baseline = Baseline(
        model_version="pending",
        input_dim=fitted.setup.input_dim,
        input=input_layout(dataset, fitted.setup.input_dim),
        latent_dim=int(model.get_layer("encoder").output.shape[-1]),
        score=config.score,
        score_parameters=None if params is None else ScoreParameters(**params),
        preprocessing=fitted.preprocessing,
        statistics=statistics,
        threshold=threshold,
        score_buckets=list(score_buckets(cal_errors, threshold.value)),
        training=training,
    )
    dense_stack = verified_dense_stack(model, calibration[:2048])

    def stage(tmp: Path) -> Baseline:
        model.save(tmp / MODEL_FILE)
        if dense_stack is not None:
            (tmp / DENSE_STACK_FILE).write_bytes(dense_stack.to_bytes())
        for name, content in fitted.score.files().items():
            (tmp / name).write_bytes(content)
        save_errors(tmp / ERRORS_FILE, cal_errors)
        # The report names the model, so the version is known before it is drawn.
        versioned = baseline.model_copy(
            update={"model_version": model_version_of((tmp / MODEL_FILE).read_bytes())}
        )
        if report:
            write_report(tmp, versioned, dataset, fitted.splits, fitted.compared())
        return versioned

    path = write_artifact(out, stage)
    return TrainResult(path, load_artifact(path).baseline, fitted.losses, time.monotonic() - started)
