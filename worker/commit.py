"""The writes of one batch, built without I/O: outputs for flagged images, the scores and shadow
streams, dead letters with their reasons. `StreamClient.commit_batch` sends them in one script call."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from contract.codec import DecodedBatch, Rejected
from contract.dead_letters import kept_name
from contract.score_components import FIELD as SCORE_COMPONENTS
from contract.score_components import format_components
from worker.scoring import Decisions
from worker.stream import DEAD_LETTER, OUTPUT, SCORES, SHADOW_SCORES, Commit, flat_fields

DELETED_REASON = "entry was trimmed from the input stream before it was scored; its data is lost"


@dataclass(frozen=True)
class ShadowBatch:
    """A candidate model's scores and decisions on the batch the served model just scored."""

    scores: np.ndarray
    decisions: Decisions
    model_version: str
    threshold: float


def dead_letter_fields(rejected: Rejected, now_ms: int, model_version: str) -> list[bytes | str]:
    """source_id, reason, reason_code, failed_at_ms, model_version, then the original fields
    (contract.dead_letters: a clashing name is kept as original:<name>)."""
    fields: dict[str | bytes, bytes | str | int | float] = {
        "source_id": rejected.entry_id,
        "reason": rejected.reason,
        "reason_code": rejected.code,
        "failed_at_ms": now_ms,
        "model_version": model_version,
    }
    for key, value in rejected.fields.items():
        name = key.decode("utf-8", "replace") if isinstance(key, bytes) else str(key)
        kept = kept_name(name)
        fields[kept if kept != name else key] = value
    return flat_fields(fields)  # type: ignore[arg-type]


def build_commit(
    decoded: DecodedBatch,
    scores: np.ndarray,
    decisions: Decisions,
    *,
    model_version: str,
    threshold: float,
    now_ms: int,
    with_scores_stream: bool,
    shadow: ShadowBatch | None = None,
    regions: Mapping[int, tuple[str, float]] | None = None,
    components: Mapping[int, Mapping[str, float | None]] | None = None,
) -> Commit:
    """Pure: the writes of one batch (outputs for flagged rows, dead letters, optional scores, and
    with a `shadow` batch the candidate's decision on every scored row to the shadow stream; a row
    in `regions` gets its `region` and `region_share`; a flagged row in `components` gets its
    output entry's `score_components`, a JSON object of component name -> contribution)."""
    commit = Commit()
    threshold_text = repr(float(threshold))
    for i, entry_id in enumerate(decoded.ids):
        flagged = bool(decisions.flagged[i])
        if not flagged and not with_scores_stream and shadow is None:
            commit.plain_ids.append(entry_id)
            continue
        fields: dict[str, bytes | str | int | float] = {
            "id": decoded.fields[i].get(b"id") or entry_id,
            "source_id": entry_id,
            "score": float(scores[i]),
            "threshold": threshold_text,
            "z": float(decisions.z[i]),
            "p_value": float(decisions.p_value[i]),
            "model_version": model_version,
            "scored_at_ms": now_ms,
        }
        if regions and (region := regions.get(i)) is not None:
            fields["region"], fields["region_share"] = region
        adds: list[tuple[int, list[bytes | str]]] = []
        if flagged:
            output = fields
            if components and (parts := components.get(i)) is not None:
                output = {**fields, SCORE_COMPONENTS: format_components(parts)}
            adds.append((OUTPUT, flat_fields(output)))
        if with_scores_stream:
            fields["flagged"] = int(flagged)
            adds.append((SCORES, flat_fields(fields)))
        if shadow is not None:
            shadow_fields: dict[str, bytes | str | int | float] = {
                "id": fields["id"],
                "source_id": entry_id,
                "score": float(shadow.scores[i]),
                "threshold": repr(float(shadow.threshold)),
                "flagged": int(bool(shadow.decisions.flagged[i])),
                "primary_flagged": int(flagged),
                "model_version": shadow.model_version,
                "scored_at_ms": now_ms,
            }
            adds.append((SHADOW_SCORES, flat_fields(shadow_fields)))
        commit.records.append((entry_id, adds))
    for rejected in decoded.rejected:
        commit.records.append(
            (
                rejected.entry_id,
                [(DEAD_LETTER, dead_letter_fields(rejected, now_ms, model_version))],
            )
        )
    return commit
