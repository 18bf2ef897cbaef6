"""A batch's scores with the images its model cannot score set apart: one image the model raises
on, or scores NaN, is that entry's dead letter (reason_code score_error), never its batch's; a model
that scores nothing of a batch is at fault itself (ScoringFailed: nothing is committed)."""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np
import redis

from contract.codec import DecodedBatch
from detector.errors import AnomalyScorerError
from worker.batch import Scored, concatenate, score_batch, select_rows
from worker.loaded_model import LoadedModel
from worker.scoring_process import ScoringProcessError

log = logging.getLogger("worker.runner")


class ScoringFailed(AnomalyScorerError):
    """The model could not score any image of a batch: nothing was committed, the entries stay
    pending and are read again (one at a time, so MAX_DELIVERIES ends each)."""


def score_isolating(
    compute: Callable[[], Scored],
    model: LoadedModel,
    shadow: LoadedModel | None,
    decoded: DecodedBatch,
    every_region: bool,
) -> tuple[Scored, DecodedBatch]:
    """The batch's scores, and the batch without the images its model could not score: those
    raised (when the whole batch raised, each image is scored alone to find which) or got a
    score that is not finite; they go to the dead-letter stream (reason_code score_error).
    When no image of the batch can be scored, the model is at fault, not its input:
    ScoringFailed, nothing is committed and the entries stay pending."""
    try:
        scored = compute()
    except (redis.RedisError, ScoringProcessError):
        raise
    except Exception as exc:  # the model raised on this batch: which of its images?
        scored, failures = _score_rows_alone(model, shadow, decoded, exc, every_region)
    else:
        failures = {}
    finite = np.isfinite(scored.scores)
    if not finite.all():
        if not finite.any() and not failures:
            raise ScoringFailed(
                f"model {model.scorer.model_version} scored none of the {len(finite)} images of "
                f"the batch finitely (scores like {float(scored.scores[0])!r}); its entries stay pending"
            )
        kept = np.flatnonzero(finite)
        bad = {
            int(row): f"the model's score is {float(scored.scores[row])!r}, expected a finite number"
            for row in np.flatnonzero(~finite)
        }
        rows_left = [row for row in range(len(decoded.ids)) if row not in failures]
        failures.update({rows_left[row]: reason for row, reason in bad.items()})
        scored = select_rows(scored, kept)
    if failures:  # counted with the other rejects: anomaly_messages_invalid_total{reason="score_error"}
        log.warning(
            "images the model could not score go to the dead-letter stream count=%d first=%s",
            len(failures),
            next(iter(failures.values())),
        )
    return scored, decoded.reject_rows(failures, "score_error")


def _score_rows_alone(
    model: LoadedModel,
    shadow: LoadedModel | None,
    decoded: DecodedBatch,
    error: Exception,
    every_region: bool,
) -> tuple[Scored, dict[int, str]]:
    """Score each image of a batch whose scoring raised `error` on its own, on this thread."""
    if len(decoded.ids) <= 1:
        raise ScoringFailed(
            f"model {model.scorer.model_version} failed to score the batch: "
            f"{type(error).__name__}: {error}; its entries stay pending"
        ) from error
    images = decoded.images
    parts: list[Scored] = []
    failures: dict[int, str] = {}
    for row in range(len(decoded.ids)):
        try:
            parts.append(score_batch(model, shadow, images[row : row + 1], every_region))
        except Exception as exc:
            failures[row] = f"the model failed to score this image: {type(exc).__name__}: {str(exc)[:300]}"
    if not parts:
        raise ScoringFailed(
            f"model {model.scorer.model_version} failed to score every image of the batch alone "
            f"({len(failures)}): {type(error).__name__}: {error}; its entries stay pending"
        ) from error
    return concatenate(parts), failures
