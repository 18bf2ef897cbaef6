"""One batch's images scored by the served model (and the shadow, when one runs): no Redis, no
metrics, so the runner can have it computed in its scoring process (or on its scoring thread) while
it reads or commits."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from worker.commit import ShadowBatch
from worker.loaded_model import LoadedModel
from worker.scoring import Decisions


@dataclass(frozen=True)
class Scored:
    """What the commit of a batch needs from the models: scores, decisions, where the error of
    the flagged rows lies (every row's with the scores stream on), and the shadow's verdicts (or
    why the shadow had none: a candidate's failure never fails the served batch)."""

    scores: np.ndarray
    decisions: Decisions
    regions: dict[int, tuple[str, float]]
    shadow: ShadowBatch | None = None
    shadow_error: str | None = None


def score_batch(
    model: LoadedModel, shadow: LoadedModel | None, images: np.ndarray, with_every_region: bool
) -> Scored:
    """Score and decide a batch's (n, D) float32 images with `model` (and `shadow`, if any). The
    served model's errors are the batch's; the shadow's are only reported in `Scored.shadow_error`."""
    if with_every_region:
        scores, regions = model.score_and_locate(images)
        decisions = model.rule.decide(scores)
    else:
        scores = model.scorer.score_batch(images)
        decisions = model.rule.decide(scores)
        regions = model.locate(images, decisions.flagged)
    if shadow is None or not len(images):
        return Scored(scores, decisions, regions)
    try:
        shadow_scores = shadow.scorer.score_batch(images)
        shadow_batch = ShadowBatch(
            shadow_scores,
            shadow.rule.decide(shadow_scores),
            shadow.scorer.model_version,
            shadow.rule.threshold,
        )
    except Exception as exc:  # a candidate under evaluation: whatever it raises, serving goes on
        return Scored(scores, decisions, regions, shadow_error=f"{type(exc).__name__}: {exc}")
    return Scored(scores, decisions, regions, shadow_batch)
