"""One batch's images scored by the served model (and the shadow, when one runs): no Redis, no
metrics, so the runner can have it computed in its scoring process (or on its scoring thread) while
it reads or commits."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from worker.commit import ShadowBatch
from worker.loaded_model import LoadedModel
from worker.scoring import Decisions


@dataclass(frozen=True)
class Scored:
    """What the commit of a batch needs from the models: scores, decisions, where the error of
    the flagged rows lies (every row's with the scores stream on), what each score component
    added to the flagged rows' scores, and the shadow's verdicts (or why the shadow had none: a
    candidate's failure never fails the served batch)."""

    scores: np.ndarray
    decisions: Decisions
    regions: dict[int, tuple[str, float]]
    shadow: ShadowBatch | None = None
    shadow_error: str | None = None
    # flagged row -> score component -> its contribution (None: not finite)
    components: dict[int, dict[str, float | None]] = field(default_factory=dict)


def score_batch(
    model: LoadedModel, shadow: LoadedModel | None, images: np.ndarray, with_every_region: bool
) -> Scored:
    """Score and decide a batch's (n, D) float32 images with `model` (and `shadow`, if any). The
    served model's errors are the batch's; the shadow's are only reported in `Scored.shadow_error`."""
    if with_every_region:
        scores, regions = model.score_and_locate(images)
        decisions = model.rule.decide(scores)
        components = model.explain(images, decisions.flagged).components
    else:
        scores = model.scorer.score_batch(images)
        decisions = model.rule.decide(scores)
        explained = model.explain(images, decisions.flagged)
        regions, components = explained.regions, explained.components
    if shadow is None or not len(images):
        return Scored(scores, decisions, regions, components=components)
    try:
        shadow_scores = shadow.scorer.score_batch(images)
        shadow_batch = ShadowBatch(
            shadow_scores,
            shadow.rule.decide(shadow_scores),
            shadow.scorer.model_version,
            shadow.rule.threshold,
        )
    except Exception as exc:  # a candidate under evaluation: whatever it raises, serving goes on
        error = f"{type(exc).__name__}: {exc}"
        return Scored(scores, decisions, regions, shadow_error=error, components=components)
    return Scored(scores, decisions, regions, shadow_batch, components=components)


def select_rows(scored: Scored, rows: np.ndarray) -> Scored:
    """The part of `scored` for these row indices (ascending), renumbered from 0."""
    renumber = {int(old): new for new, old in enumerate(rows.tolist())}
    shadow = scored.shadow
    if shadow is not None:
        shadow = ShadowBatch(
            shadow.scores[rows],
            _decisions_rows(shadow.decisions, rows),
            shadow.model_version,
            shadow.threshold,
        )
    return Scored(
        scored.scores[rows],
        _decisions_rows(scored.decisions, rows),
        {renumber[row]: region for row, region in scored.regions.items() if row in renumber},
        shadow,
        scored.shadow_error,
        {renumber[row]: parts for row, parts in scored.components.items() if row in renumber},
    )


def concatenate(parts: list[Scored]) -> Scored:
    """Scored batches one after the other, as one (rows renumbered in order)."""
    if len(parts) == 1:
        return parts[0]
    regions: dict[int, tuple[str, float]] = {}
    components: dict[int, dict[str, float | None]] = {}
    offset = 0
    for part in parts:
        regions.update({offset + row: region for row, region in part.regions.items()})
        components.update({offset + row: values for row, values in part.components.items()})
        offset += len(part.scores)
    shadows = [part.shadow for part in parts]
    shadow = None
    if parts and all(s is not None for s in shadows):
        first = shadows[0]
        assert first is not None
        shadow = ShadowBatch(
            np.concatenate([s.scores for s in shadows if s is not None]),
            _concatenate_decisions([s.decisions for s in shadows if s is not None]),
            first.model_version,
            first.threshold,
        )
    errors = [part.shadow_error for part in parts if part.shadow_error is not None]
    return Scored(
        np.concatenate([part.scores for part in parts]),
        _concatenate_decisions([part.decisions for part in parts]),
        regions,
        shadow,
        errors[0] if errors and shadow is None else None,
        components,
    )


def _decisions_rows(decisions: Decisions, rows: np.ndarray) -> Decisions:
    return Decisions(decisions.flagged[rows], decisions.z[rows], decisions.p_value[rows])


def _concatenate_decisions(parts: list[Decisions]) -> Decisions:
    return Decisions(
        np.concatenate([d.flagged for d in parts]),
        np.concatenate([d.z for d in parts]),
        np.concatenate([d.p_value for d in parts]),
    )
