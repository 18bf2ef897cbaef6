"""The one training pipeline: a detector configuration and a dataset in, a fitted detector out.

`anomaly-trainer train` (which then calibrates the threshold and writes the artifact) and the
one-class benchmark (which scores the test set) both fit a detector here: the normal images drawn
and cut into fit, validation and calibration (`trainer.splits`), every component checked before
anything trains (`Score.check`: a dense architecture, square images, enough rows), the
preprocessing fitted (`detector.preprocessing`), the autoencoder fitted within its epoch budget
with the networks its components asked for (`Component.network`: the orientation head with it,
`trainer.multitask`; the transformation classifier after it, `trainer.transforms`), and the score
fitted on the normal data (`Score.fit`).
"""

from __future__ import annotations

import logging
from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from detector.artifact import Preprocessing
from detector.components import REGISTRY
from detector.components.base import ForwardPass, NormalData, Setup
from detector.components.orientation import OrientationHeadSpec
from detector.components.transforms import TransformClassifierSpec
from detector.datasets import Dataset
from detector.networks import TransformClassifier
from detector.preprocessing import InputScaling, fit_preprocessing, scaling_of
from detector.score import Score, ScoreOptions, components_of
from detector.thresholds import check_policy_fits_score, parse_policy
from trainer.budget import EpochBudget, epoch_budget
from trainer.compared import ComparedScores
from trainer.config import DetectorConfig
from trainer.fitting import fit_autoencoder
from trainer.models import DENSE_ARCHITECTURES, build_model, forward_of
from trainer.splits import Splits, select_normal, split_normal
from trainer.transforms import train_transform_classifier

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FittedDetector:
    """A detector fitted on normal images: its networks, its score, and what they were fitted on."""

    config: DetectorConfig
    splits: Splits  # raw pixels
    preprocessing: Preprocessing
    scaling: InputScaling  # raw pixels -> model space, as `preprocessing` says
    setup: Setup
    model: Any  # the Keras autoencoder
    normal: NormalData  # model space, with the networks trained for the components
    score: Score
    budget: EpochBudget
    losses: dict[str, list[float]]

    def forward(self, x: np.ndarray) -> ForwardPass:
        """The autoencoder's forward pass of model-space images, every encoder layer included."""
        return self.normal.forward(x)

    def compared(self) -> ComparedScores:
        """Its own score and every other compared score its networks allow, fitted as it was."""
        return ComparedScores.fitted(self.score, self.normal, self.scaling, self.setup, self.config.options)


def networks_of(components: Iterable[str], options: ScoreOptions) -> tuple[Hashable, ...]:
    """The specs of the networks `components` ask the trainer for, in the registry's order."""
    wanted = set(components)
    specs = (kind.network(options.of(name)) for name, kind in REGISTRY.items() if name in wanted)
    return tuple(dict.fromkeys(spec for spec in specs if spec is not None))


def fit_detector(
    config: DetectorConfig, dataset: Dataset, also_fit: Sequence[str] = (), verbose: int = 0
) -> FittedDetector:
    """Fit `config` on the normal images of `dataset`; `also_fit` names components fitted besides
    the score's (the benchmark compares them too), whose networks are trained as well."""
    import keras
    import tensorflow as tf

    keras.utils.set_random_seed(config.seed)
    tf.config.experimental.enable_op_determinism()
    normal = select_normal(dataset, config.classes)
    if config.max_samples is not None and normal.shape[0] > config.max_samples:
        pick = np.random.default_rng(config.seed).choice(normal.shape[0], config.max_samples, replace=False)
        normal = normal[np.sort(pick)]
    splits = split_normal(normal, config.holdout_fraction, config.seed)
    check_policy_fits_score(parse_policy(config.threshold), config.score)  # fail before any training
    setup = Setup(normal.shape[1], splits.fit.shape[0], config.architecture, DENSE_ARCHITECTURES)
    Score.check(config.score, setup, config.options)  # what each component needs, before any training
    for name in also_fit:
        if name not in REGISTRY:
            raise ValueError(f"unknown component {name!r}; expected one of {', '.join(REGISTRY)}")
        REGISTRY[name].check(setup, config.options.of(name))
    components = list(dict.fromkeys([*components_of(config.score), *also_fit]))

    preprocessing = fit_preprocessing(config.preprocessing, splits.fit)
    scaling = scaling_of(preprocessing)
    fit_x, val_x = scaling(splits.fit), scaling(splits.validation)
    model = build_model(config.architecture, fit_x.shape[1], linear_output=not scaling.is_unit)
    budget = epoch_budget(config.epochs, config.min_steps, fit_x.shape[0], config.batch_size)
    specs = networks_of(components, config.options)
    log.info(
        "training architecture=%s score=%s fit=%d validation=%d calibration=%d epochs=%d "
        "early_stopping_from_epoch=%s networks=%s",
        config.architecture,
        config.score,
        fit_x.shape[0],
        val_x.shape[0],
        splits.calibration.shape[0],
        budget.epochs,
        budget.stop_from + 1 if budget.stop_from < budget.epochs else "never",
        ",".join(map(str, specs)) or "none",
    )
    networks, losses = _fit_networks(model, fit_x, val_x, budget, config, specs, verbose)
    normal_data = NormalData(fit_x, val_x, forward_of(model), config.seed, networks)
    score = Score.fit(config.score, normal_data, config.options)
    return FittedDetector(
        config, splits, preprocessing, scaling, setup, model, normal_data, score, budget, losses
    )


def _fit_networks(
    model: Any,
    fit_x: np.ndarray,
    val_x: np.ndarray,
    budget: EpochBudget,
    config: DetectorConfig,
    specs: tuple[Hashable, ...],
    verbose: int,
) -> tuple[dict[Hashable, TransformClassifier], dict[str, list[float]]]:
    """The autoencoder (with the orientation head when one is asked for), then the other networks."""
    heads = [s for s in specs if isinstance(s, OrientationHeadSpec)]
    if len(heads) > 1:
        raise ValueError(
            f"one autoencoder trains one orientation head, asked for {', '.join(map(str, heads))}"
        )
    head, losses = fit_autoencoder(
        model,
        fit_x,
        val_x,
        budget,
        batch_size=config.batch_size,
        learning_rate=config.learning_rate,
        patience=config.patience,
        seed=config.seed,
        verbose=verbose,
        orientation=heads[0].transforms if heads else None,
    )
    networks: dict[Hashable, TransformClassifier] = {}
    if heads and head is not None:
        networks[heads[0]] = head
    for spec in specs:
        if isinstance(spec, OrientationHeadSpec):
            continue
        if not isinstance(spec, TransformClassifierSpec):
            raise ValueError(f"the trainer cannot train {spec}")
        classifier, classifier_losses = train_transform_classifier(
            fit_x, val_x, spec.transforms, spec.epochs, seed=config.seed, verbose=verbose
        )
        networks[spec] = classifier
        losses |= {f"transforms_{k}": v for k, v in classifier_losses.items()}
    return networks, losses
