"""The swappable unit of a worker: a verified artifact's scorer with its decision rule, for the served
model and for a shadow (candidate) one. Loading goes through `detector.loading.load_scorer`, so a
broken artifact is an `ArtifactError` and a reload can keep the old model."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from detector.engines.common import Explanation
from detector.errors import AnomalyScorerError, ArtifactError
from detector.loading import load_scorer
from detector.region import locate_regions, square_side
from detector.thresholds import score_buckets
from runtime.settings import WorkerSettings
from worker.scoring import DecisionRule


class BatchScorer(Protocol):
    """What the runner needs of a scorer (detector.loading.Scorer, or a fake in tests)."""

    model_version: str
    input_dim: int
    engine: str

    def score_batch(self, images: np.ndarray) -> np.ndarray:
        """Per-row score of a (n, D) float32 batch."""
        ...

    def score_with_squared_error(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """score_batch and the per-pixel squared reconstruction error of the same batch (one
        forward pass where the engine can): every row's region, for the scores stream."""
        ...

    def explain(self, images: np.ndarray) -> Explanation:
        """Each score component's (n, k) contribution (rows sum to the score) and the (n, D)
        squared reconstruction error, from one forward pass: the flagged rows' why and where."""
        ...


@dataclass(frozen=True)
class Explained:
    """The flagged rows of a batch, explained: batch row -> (`region`, `region_share`), and
    batch row -> score component -> its contribution (None: not a finite number)."""

    regions: dict[int, tuple[str, float]]
    components: dict[int, dict[str, float | None]]


@dataclass(frozen=True)
class LoadedModel:
    """The swappable unit: a scorer, its decision rule, and the artifact it came from."""

    scorer: BatchScorer
    rule: DecisionRule
    uint8_scale: float
    manifest_digest: str
    # The anomaly_score histogram's bounds: the artifact's, or derived from its held-out scores.
    score_buckets: tuple[float, ...] | None = None
    region_side: int | None = None  # square images only: where the error is (detector.region)

    def explain(self, images: np.ndarray, flagged: np.ndarray) -> Explained:
        """For the flagged rows of a batch, from one more forward pass of those rows only (a few
        percent of a batch, so the pass over the whole batch stays the cheap one): each one's
        (`region`, `region_share`), none for images that are not square, and what each score
        component added to its score (the output entry's `score_components`: which view of
        "not normal" flagged it)."""
        rows = np.flatnonzero(flagged)
        if not rows.size:
            return Explained({}, {})
        why = self.scorer.explain(images[rows])
        regions = {} if self.region_side is None else regions_of(rows, why.squared_error, self.region_side)
        components = {
            int(row): dict(zip(why.names, map(_shown, contribution.tolist()), strict=True))
            for row, contribution in zip(rows.tolist(), why.contributions, strict=True)
        }
        return Explained(regions, components)

    def score_and_locate(self, images: np.ndarray) -> tuple[np.ndarray, dict[int, tuple[str, float]]]:
        """Scores and every row's region (the scores stream carries them) from the scoring pass's
        own reconstruction error; no regions for images that are not square."""
        if self.region_side is None or not len(images):
            return self.scorer.score_batch(images), {}
        scores, squared_error = self.scorer.score_with_squared_error(images)
        return scores, regions_of(np.arange(len(images)), squared_error, self.region_side)


def _shown(value: float) -> float | None:
    """A contribution as published: 4 decimals; None (JSON null) when it is not a finite number."""
    return round(value, 4) if math.isfinite(value) else None


def regions_of(rows: np.ndarray, squared_error: np.ndarray, side: int) -> dict[int, tuple[str, float]]:
    """Batch row -> (`region`, `region_share`), from those rows' squared errors (in that order)."""
    regions = locate_regions(squared_error, side)
    return dict(zip(rows.tolist(), zip(regions.fields(), regions.shares.tolist(), strict=True), strict=True))


ModelLoader = Callable[[], LoadedModel]


def check_shadow_fits(served: LoadedModel, shadow: LoadedModel) -> None:
    """A shadow model scores the images decoded for the served one: same width and pixel scale."""
    if shadow.scorer.input_dim != served.scorer.input_dim or shadow.uint8_scale != served.uint8_scale:
        raise ArtifactError(
            f"shadow model {shadow.scorer.model_version} takes {shadow.scorer.input_dim} features "
            f"(uint8 scale {shadow.uint8_scale:g}), expected {served.scorer.input_dim} "
            f"(uint8 scale {served.uint8_scale:g}) like the served model {served.scorer.model_version}"
        )


def load_model(settings: WorkerSettings, shadow: bool = False) -> LoadedModel:
    """Verify the artifact (or the shadow artifact), load and warm up its scorer, build the
    decision rule. ANOMALY_THRESHOLD applies to the served model only: a shadow keeps its own."""
    path = settings.shadow_artifact if shadow else settings.artifact
    if path is None:
        name = "ANOMALY_SHADOW_ARTIFACT" if shadow else "ANOMALY_ARTIFACT"
        raise AnomalyScorerError(f"{name} is not set; expected the artifact directory")
    settings.check_artifact_path()  # again at every reload: a symlink may have been swapped
    artifact, scorer = load_scorer(path, settings.engine, settings.batch_size, settings.jit)
    rule = DecisionRule.from_artifact(artifact, None if shadow else settings.threshold or None)
    recorded = artifact.baseline.score_buckets
    if recorded and rule.threshold == artifact.baseline.threshold.value:
        buckets = tuple(recorded)
    else:  # an artifact before schema 1.3, or ANOMALY_THRESHOLD moved the threshold
        buckets = score_buckets(artifact.calibration_errors, rule.threshold)
    return LoadedModel(
        scorer,
        rule,
        artifact.baseline.preprocessing.uint8_scale,
        artifact.manifest_digest,  # of the manifest that was verified, not of the one on disk now
        buckets,
        region_side=square_side(scorer.input_dim),
    )
