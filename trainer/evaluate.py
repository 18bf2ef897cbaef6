"""How well a model separates normal from anomalous images: AUROC, average precision, flag rates.

The per-image scores of the detector's components (detector.components) are compared: every
component and the combinations of `detector.score.COMPARED` (the artifact's own one,
`baseline.score`, is what the worker computes). The Gaussian of normal codes and the
standardisation of the combined scores are fitted on the validation split of the normal training
images, and the other scores' thresholds come from the calibration split, so no statistic ever
sees the test set.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypedDict

import numpy as np

from detector.artifact import Baseline, LoadedArtifact, load_artifact
from detector.components.base import ComponentOptions, NormalData
from detector.components.hidden_knn import HiddenKnn, HiddenKnnOptions
from detector.components.hidden_mahalanobis import HiddenMahalanobis
from detector.components.knn import (
    DEFAULT_KNN_K,
    DEFAULT_KNN_REFERENCE_ROWS,
    Knn,
    knn_distances,
    knn_reference_of,
    unit_rows,
)
from detector.components.mahalanobis import LatentGaussian
from detector.components.orientation import Orientation
from detector.components.reconstruction import DEFAULT_TOP_K_PERCENT, mse_scores, nmse_scores, top_k_scores
from detector.components.transforms import Transforms, TransformScorer
from detector.datasets import Dataset, rotate90
from detector.engines.keras_engine import encoder_layers_model, load_model_bytes
from detector.errors import ThresholdPolicyError
from detector.preprocessing import scaling_of
from detector.score import COMPARED, Score, combine, components_of, standardisation
from detector.thresholds import check_policy_fits_score, flag_rate, parse_policy
from trainer.models import forward_pass, reconstruction_errors
from trainer.splits import Splits, recover_splits

log = logging.getLogger(__name__)

UNSEEN_CLASSES = "unseen classes"
ROTATED_90 = "rotated 90°"

Transform = Callable[[np.ndarray], np.ndarray]


def auroc(normal_scores: np.ndarray, anomaly_scores: np.ndarray) -> float:
    """Area under the ROC curve, anomalies as positives (0.5 = chance, 1 = perfect)."""
    from sklearn.metrics import roc_auc_score

    labels, scores = _labelled(normal_scores, anomaly_scores)
    return float(roc_auc_score(labels, scores))


def average_precision(normal_scores: np.ndarray, anomaly_scores: np.ndarray) -> float:
    """Average precision, anomalies as positives (chance = share of anomalies)."""
    from sklearn.metrics import average_precision_score

    labels, scores = _labelled(normal_scores, anomaly_scores)
    return float(average_precision_score(labels, scores))


def _labelled(normal_scores: np.ndarray, anomaly_scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    normal = np.asarray(normal_scores, np.float64).ravel()
    anomaly = np.asarray(anomaly_scores, np.float64).ravel()
    if normal.size == 0 or anomaly.size == 0:
        raise ValueError(f"need normal and anomalous scores, found {normal.size} and {anomaly.size}")
    labels = np.concatenate([np.zeros(normal.size, np.int64), np.ones(anomaly.size, np.int64)])
    return labels, np.concatenate([normal, anomaly])


class ScoreModel:
    """An autoencoder plus what the other scores need: the normal code Gaussian (mahalanobis), the
    transformation classifier (transforms), normal reference images (knn), normal prototypes and
    the Gaussian of the first encoder layer (hidden-knn, hidden-mahalanobis), and each component's
    mean and std on normal images (combined scores)."""

    def __init__(
        self,
        model: Any,
        transform: Transform,
        latent: LatentGaussian | None = None,
        top_k_percent: float = DEFAULT_TOP_K_PERCENT,
        transform_scorer: TransformScorer | None = None,
        knn_reference: np.ndarray | None = None,
        knn_k: int = DEFAULT_KNN_K,
        also: tuple[str, ...] = (),
        orientation: Orientation | None = None,
        hidden_knn: HiddenKnn | None = None,
        hidden_mahalanobis: HiddenMahalanobis | None = None,
    ) -> None:
        self.model = model
        self.encoder = model.get_layer("encoder")
        self.transform = transform
        self.latent = latent
        self.top_k_percent = top_k_percent
        self.transform_scorer = transform_scorer
        self.knn_reference = None if knn_reference is None else unit_rows(knn_reference)
        self.knn_k = knn_k
        self.orientation = orientation
        self.hidden_knn = hidden_knn
        self.hidden_mahalanobis = hidden_mahalanobis
        self.encoder_layers = encoder_layers_model(model)
        self.names = COMPARED + tuple(n for n in also if n not in COMPARED)
        # Per combined score: each component's (means, stds) on normal images.
        self.combination: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {}

    @classmethod
    def fitted(
        cls,
        model: Any,
        baseline: Baseline,
        splits: Splits,
        transform: Transform,
        top_k_percent: float = DEFAULT_TOP_K_PERCENT,
        transform_scorer: TransformScorer | None = None,
        knn_reference: np.ndarray | None = None,
        orientation: Orientation | None = None,
        hidden_knn: HiddenKnn | None = None,
        hidden_mahalanobis: HiddenMahalanobis | None = None,
    ) -> ScoreModel:
        """Every score of an artifact's model, fitted on its held-out splits as the trainer fits
        them; `knn_reference` (model space) defaults to the trainer's draw from the fit split, and
        `hidden_knn` and `hidden_mahalanobis` to prototypes and a Gaussian fitted as the trainer
        fits them."""
        if knn_reference is None:
            knn_reference = knn_reference_of(
                transform(splits.fit), DEFAULT_KNN_REFERENCE_ROWS, baseline.training.seed
            )
        params = baseline.score_parameters
        scorer = cls(
            model,
            transform,
            top_k_percent=top_k_percent,
            transform_scorer=transform_scorer,
            knn_reference=knn_reference,
            knn_k=(params.knn_k if params is not None else None) or DEFAULT_KNN_K,
            also=(baseline.score,),
            orientation=orientation,
            hidden_knn=hidden_knn,
            hidden_mahalanobis=hidden_mahalanobis,
        )
        if hidden_knn is None:
            scorer.fit_hidden_knn(splits.fit, baseline.training.seed)
        if hidden_mahalanobis is None:
            scorer.fit_hidden_mahalanobis(splits.fit, baseline.training.seed)
        scorer.fit_latent(splits.validation)
        scorer.fit_combination(splits.validation)
        return scorer

    def codes(self, x: np.ndarray) -> np.ndarray:
        """Encoder output for raw images in [0, 1]."""
        return np.asarray(self.encoder.predict(self.transform(x), batch_size=1024, verbose=0))

    def fit_latent(self, normal: np.ndarray) -> None:
        """Fit the code-space Gaussian on normal (held-out) images."""
        self.latent = LatentGaussian.fit(self.codes(normal))

    def fit_hidden_knn(self, fit: np.ndarray, seed: int) -> None:
        """Fit the first encoder layer's normal prototypes on the fit split, as the trainer does."""
        self.hidden_knn = HiddenKnn.fit(self._normal_fit(fit, seed), HiddenKnnOptions())

    def fit_hidden_mahalanobis(self, fit: np.ndarray, seed: int) -> None:
        """Fit the first encoder layer's normal Gaussian on the fit split, as the trainer does."""
        self.hidden_mahalanobis = HiddenMahalanobis.fit(self._normal_fit(fit, seed), ComponentOptions())

    def _normal_fit(self, fit: np.ndarray, seed: int) -> NormalData:
        z = self.transform(fit)
        return NormalData(
            fit=z,
            validation=z[:0],
            forward=lambda x: forward_pass(self.model, x, self.encoder_layers),
            seed=seed,
        )

    def fit_combination(self, normal: np.ndarray) -> None:
        """Measure each component's mean and std on normal (held-out) images, for the combined scores."""
        scores = self.scores(normal)
        for name in self.names:
            components = components_of(name)
            if len(components) > 1 and all(c in scores for c in components):
                self.combination[name] = standardisation([scores[c] for c in components])

    def scores(self, x: np.ndarray) -> dict[str, np.ndarray]:
        """Every score of every row of raw images `x`; errors in model space, as the worker does."""
        z = self.transform(x)
        needs_encoder = any(
            s is not None for s in (self.latent, self.orientation, self.hidden_knn, self.hidden_mahalanobis)
        )
        batch = forward_pass(self.model, z, self.encoder_layers if needs_encoder else None)
        recon = batch.reconstructions
        out = {
            "mse": mse_scores(z, recon),
            "nmse": nmse_scores(z, recon),
            "top-k": top_k_scores(z, recon, self.top_k_percent),
        }
        if self.latent is not None:
            out["mahalanobis"] = self.latent.distance(batch.codes)
        if self.orientation is not None:
            out["orientation"] = self.orientation.score(batch)
        if self.transform_scorer is not None:
            out["transforms"] = self.transform_scorer(z)
        if self.knn_reference is not None:
            out["knn"] = knn_distances(z, self.knn_reference, self.knn_k)
        if self.hidden_knn is not None:
            out["hidden-knn"] = self.hidden_knn.score(batch)
        if self.hidden_mahalanobis is not None:
            out["hidden-mahalanobis"] = self.hidden_mahalanobis.score(batch)
        for name, (mean, std) in self.combination.items():
            out[name] = combine([out[c] for c in components_of(name)], mean, std)
        return out


@dataclass(frozen=True)
class Row:
    """One anomaly set scored one way."""

    anomaly_set: str
    score: str
    auroc: float
    average_precision: float
    threshold: float | None
    flagged_normal: float | None
    flagged_anomaly: float | None
    normal_count: int
    anomaly_count: int


@dataclass
class Evaluation:
    """Everything `anomaly-trainer evaluate` prints and writes."""

    model_version: str
    dataset: str
    classes: list[int] | None
    architecture: str
    threshold_policy: str
    top_k_percent: float
    latent_fit: str
    rows: list[Row] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return asdict(self)

    def write_json(self, path: Path) -> None:
        """Write the evaluation as indented JSON."""
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    def table(self) -> str:
        """A fixed-width table, one row per anomaly set and score."""
        w = max([12, *(len(r.score) for r in self.rows)])
        head = (
            f"{'anomaly set':<16} {'score':<{w}} {'AUROC':>6} {'AP':>6} {'threshold':>10} "
            f"{'flag normal':>12} {'flag anomaly':>13} {'n normal':>9} {'n anomaly':>10}"
        )
        lines = [head, "-" * len(head)]
        for r in self.rows:
            lines.append(
                f"{r.anomaly_set:<16} {r.score:<{w}} {r.auroc:>6.4f} {r.average_precision:>6.4f} "
                f"{_fmt(r.threshold, '.5g'):>10} {_fmt(r.flagged_normal, '.2%'):>12} "
                f"{_fmt(r.flagged_anomaly, '.2%'):>13} {r.normal_count:>9} {r.anomaly_count:>10}"
            )
        return "\n".join(lines)


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def preprocessing_of(baseline: Baseline) -> Transform:
    """The artifact's preprocessing as a function of raw [0, 1] images (as the worker applies it)."""
    return scaling_of(baseline.preprocessing)


def anomaly_sets(dataset: Dataset, classes: list[int] | None) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Normal test images and the anomaly sets: unseen classes (if any) and normal images rotated 90°."""
    x, y = dataset.test.x, dataset.test.y
    sets: dict[str, np.ndarray] = {}
    if classes is not None and y is not None:
        normal_mask = np.isin(y, classes)
        normal = x[normal_mask]
        if (~normal_mask).any():
            sets[UNSEEN_CLASSES] = x[~normal_mask]
    else:
        normal = x
    side = math.isqrt(x.shape[1])
    if side * side == x.shape[1]:
        sets[ROTATED_90] = rotate90(normal, side)
    return normal, sets


def thresholds_for(
    policy_text: str,
    calibration_scores: dict[str, np.ndarray],
    own_threshold: float,
    own_score: str = "mse",
) -> dict[str, float | None]:
    """The artifact's threshold for its own score; the same policy on calibration scores for the others."""
    out: dict[str, float | None] = {own_score: own_threshold}
    try:
        policy = parse_policy(policy_text)
    except ThresholdPolicyError:  # a re-tuned threshold (`retune`) is a value, not a policy
        log.warning("no threshold for the other scores: policy %r is not a rule", policy_text)
        return out | {name: None for name in calibration_scores if name != own_score}
    for name, values in calibration_scores.items():
        if name == own_score:
            continue
        try:
            check_policy_fits_score(policy, name)
            out[name] = policy.threshold(values)
        except ThresholdPolicyError as exc:
            log.warning("no threshold for score=%s reason=%s", name, exc)
            out[name] = None
    return out


def score_sets(
    normal: dict[str, np.ndarray],
    anomalies: dict[str, dict[str, np.ndarray]],
    thresholds: dict[str, float | None],
) -> list[Row]:
    """AUROC, AP and flag rates of every anomaly set under every score."""
    rows = []
    for set_name, anomaly in anomalies.items():
        for score in dict.fromkeys([*COMPARED, *normal]):
            if score not in normal or score not in anomaly:
                continue
            t = thresholds.get(score)
            rows.append(
                Row(
                    anomaly_set=set_name,
                    score=score,
                    auroc=auroc(normal[score], anomaly[score]),
                    average_precision=average_precision(normal[score], anomaly[score]),
                    threshold=t,
                    flagged_normal=None if t is None else flag_rate(normal[score], t),
                    flagged_anomaly=None if t is None else flag_rate(anomaly[score], t),
                    normal_count=int(normal[score].size),
                    anomaly_count=int(anomaly[score].size),
                )
            )
    return rows


def evaluate_model(
    model: Any,
    baseline: Baseline,
    dataset: Dataset,
    splits: Splits,
    transform: Transform,
    top_k_percent: float = DEFAULT_TOP_K_PERCENT,
    latent_fit: str = "validation split of the normal training images",
    transform_scorer: TransformScorer | None = None,
    knn_reference: np.ndarray | None = None,
    orientation: Orientation | None = None,
    hidden_knn: HiddenKnn | None = None,
    hidden_mahalanobis: HiddenMahalanobis | None = None,
) -> tuple[Evaluation, ScoreModel, dict[str, dict[str, np.ndarray]]]:
    """Evaluate a trained model on `dataset`'s test split; also returns the scores for the report."""
    scorer = ScoreModel.fitted(
        model,
        baseline,
        splits,
        transform,
        top_k_percent,
        transform_scorer,
        knn_reference,
        orientation,
        hidden_knn,
        hidden_mahalanobis,
    )
    calibration = scorer.scores(splits.calibration)
    thresholds = thresholds_for(
        baseline.threshold.policy, calibration, baseline.threshold.value, baseline.score
    )
    normal_x, sets_x = anomaly_sets(dataset, baseline.training.classes)
    scores = {"normal": scorer.scores(normal_x)} | {name: scorer.scores(x) for name, x in sets_x.items()}
    evaluation = Evaluation(
        model_version=baseline.model_version,
        dataset=dataset.name,
        classes=baseline.training.classes,
        architecture=baseline.training.architecture,
        threshold_policy=baseline.threshold.policy,
        top_k_percent=top_k_percent,
        latent_fit=latent_fit,
        rows=score_sets(scores["normal"], {k: v for k, v in scores.items() if k != "normal"}, thresholds),
    )
    return evaluation, scorer, scores


def held_out_splits(artifact: LoadedArtifact, dataset: Dataset, model: Any, transform: Transform) -> Splits:
    """The artifact's own validation/calibration split, checked against its stored calibration errors.

    Raises ValueError when the split cannot be reproduced (other data, other preprocessing).
    """
    splits = recover_splits(artifact.baseline, dataset)
    if splits is None:
        raise ValueError(
            f"cannot reproduce the held-out split of {artifact.path}: it was trained on "
            f"{artifact.baseline.training.dataset!r} classes {artifact.baseline.training.classes}, "
            f"and the counts do not fit dataset {dataset.name!r}"
        )
    score = artifact.score
    recomputed = np.sort(reconstruction_errors(model, transform(splits.calibration), score))
    # A combined score is a sum of z-scores: values near 0 carry float32 noise of about 1e-6, so
    # the absolute tolerance follows the scores' spread (a wrong dataset moves them by far more).
    atol = 1e-7 + 1e-4 * float(np.std(artifact.calibration_errors))
    if not np.allclose(recomputed, artifact.calibration_errors, rtol=1e-3, atol=atol):
        worst = float(np.max(np.abs(recomputed - artifact.calibration_errors)))
        raise ValueError(
            f"recomputed calibration errors differ from {artifact.path}'s stored ones "
            f"(largest difference {worst:.3g}); the dataset is not the one the model was trained on"
        )
    return splits


def evaluate_artifact(
    path: Path, dataset: Dataset, top_k_percent: float = DEFAULT_TOP_K_PERCENT
) -> tuple[Evaluation, ScoreModel, dict[str, dict[str, np.ndarray]], Splits]:
    """Load and verify an artifact, then evaluate it on `dataset`'s test split."""
    artifact = load_artifact(path)
    model = load_model_bytes(artifact.model_bytes, artifact)
    transform = preprocessing_of(artifact.baseline)
    splits = held_out_splits(artifact, dataset, model, transform)
    evaluation, scorer, scores = evaluate_model(
        model,
        artifact.baseline,
        dataset,
        splits,
        transform,
        top_k_percent,
        **fitted_networks(artifact.score),
    )
    return evaluation, scorer, scores, splits


class _Fitted(TypedDict):
    transform_scorer: TransformScorer | None
    knn_reference: np.ndarray | None
    orientation: Orientation | None
    hidden_knn: HiddenKnn | None
    hidden_mahalanobis: HiddenMahalanobis | None


def fitted_networks(score: Score) -> _Fitted:
    """What a stored score brings that the evaluation would otherwise refit: its classifier,
    orientation head, reference images, prototypes and first-layer Gaussian."""
    transforms, knn = score.component("transforms"), score.component("knn")
    orientation, hidden_knn = score.component("orientation"), score.component("hidden-knn")
    hidden_mahalanobis = score.component("hidden-mahalanobis")
    return {
        "transform_scorer": transforms.scorer if isinstance(transforms, Transforms) else None,
        "knn_reference": knn.reference if isinstance(knn, Knn) else None,
        "orientation": orientation if isinstance(orientation, Orientation) else None,
        "hidden_knn": hidden_knn if isinstance(hidden_knn, HiddenKnn) else None,
        "hidden_mahalanobis": hidden_mahalanobis
        if isinstance(hidden_mahalanobis, HiddenMahalanobis)
        else None,
    }
