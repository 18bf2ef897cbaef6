"""How well a detector separates normal from anomalous images: AUROC, average precision, flag rates.

Every score of `trainer.compared.ComparedScores` is compared: the detector's own one (the `Score`
the worker loads from the artifact) and the others of `detector.score.COMPARED` its networks
allow, their components fitted as the trainer fits them. Components and standardisations are
fitted on the fit and validation splits of the normal training images, and the other scores'
thresholds come from the calibration split, so no statistic ever sees the test set.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from detector.artifact import Baseline, LoadedArtifact, load_artifact
from detector.components.base import NormalData, Setup
from detector.datasets import Dataset, rotate90
from detector.errors import ThresholdPolicyError
from detector.loading import Scorer, make_scorer
from detector.score import COMPARED, ScoreOptions
from detector.thresholds import check_policy_fits_score, flag_rate, parse_policy
from trainer.compared import ComparedScores
from trainer.models import DENSE_ARCHITECTURES
from trainer.splits import Splits, recover_splits

log = logging.getLogger(__name__)

UNSEEN_CLASSES = "unseen classes"
ROTATED_90 = "rotated 90°"


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
    options: dict[str, Any]  # what the components the artifact lacks were fitted with
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


def evaluate(
    compared: ComparedScores, baseline: Baseline, dataset: Dataset, splits: Splits
) -> tuple[Evaluation, dict[str, dict[str, np.ndarray]]]:
    """Every compared score of `dataset`'s test split; also returns the scores, by set (the report)."""
    calibration = compared(splits.calibration)
    thresholds = thresholds_for(
        baseline.threshold.policy, calibration, baseline.threshold.value, baseline.score
    )
    normal_x, sets_x = anomaly_sets(dataset, baseline.training.classes)
    scores = {"normal": compared(normal_x)} | {name: compared(x) for name, x in sets_x.items()}
    evaluation = Evaluation(
        model_version=baseline.model_version,
        dataset=dataset.name,
        classes=baseline.training.classes,
        architecture=baseline.training.architecture,
        threshold_policy=baseline.threshold.policy,
        options=compared.options.model_dump(),
        rows=score_sets(scores["normal"], {k: v for k, v in scores.items() if k != "normal"}, thresholds),
    )
    return evaluation, scores


def held_out_splits(artifact: LoadedArtifact, dataset: Dataset, scorer: Scorer) -> Splits:
    """The artifact's own fit/validation/calibration split, checked against its stored calibration
    errors as the worker's scorer computes them.

    Raises ValueError when the split cannot be reproduced (other data, other preprocessing).
    """
    splits = recover_splits(artifact.baseline, dataset)
    if splits is None:
        raise ValueError(
            f"cannot reproduce the held-out split of {artifact.path}: it was trained on "
            f"{artifact.baseline.training.dataset!r} classes {artifact.baseline.training.classes}, "
            f"and the counts do not fit dataset {dataset.name!r}"
        )
    recomputed = np.sort(scorer.score_batch(splits.calibration))
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


def compared_of_artifact(
    artifact: LoadedArtifact, scorer: Scorer, splits: Splits, options: ScoreOptions | None = None
) -> ComparedScores:
    """The artifact's own score as the worker loads it, and the compared scores fitted on its
    splits as the trainer would fit them (with `options`, the components' defaults by default)."""
    scaling = scorer.scaling
    training = artifact.baseline.training
    normal = NormalData(
        fit=scaling(splits.fit),
        validation=scaling(splits.validation),
        forward=scorer.forward,
        seed=training.seed,
    )
    setup = Setup(
        artifact.baseline.input_dim, splits.fit.shape[0], training.architecture, DENSE_ARCHITECTURES
    )
    return ComparedScores.fitted(artifact.score, normal, scaling, setup, options or ScoreOptions())


def load_for_evaluation(
    path: Path, dataset: Dataset, options: ScoreOptions | None = None
) -> tuple[LoadedArtifact, Splits, ComparedScores]:
    """Load and verify an artifact, build the worker's scorer of it, recover and check its splits,
    and fit the compared scores."""
    artifact = load_artifact(path)
    scorer = make_scorer(artifact)
    splits = held_out_splits(artifact, dataset, scorer)
    return artifact, splits, compared_of_artifact(artifact, scorer, splits, options)


def evaluate_artifact(
    path: Path, dataset: Dataset, options: ScoreOptions | None = None
) -> tuple[Evaluation, ComparedScores, dict[str, dict[str, np.ndarray]], Splits]:
    """Load and verify an artifact, then evaluate it on `dataset`'s test split."""
    artifact, splits, compared = load_for_evaluation(path, dataset, options)
    evaluation, scores = evaluate(compared, artifact.baseline, dataset, splits)
    return evaluation, compared, scores, splits
