"""The output entry's `score_components`: what each component of the score added to it.

The worker writes a JSON object of component name -> contribution (4 decimals; null where a value
is not finite), e.g. {"mse":1.2,"orientation":0.4,"hidden-knn":6.1,"hidden-mahalanobis":3.0}; a
score of several components standardises each by its held-out normal mean and std and sums them,
so the values add up to the entry's `score`. Readers (the viewer, anomaly-notify) parse it with
`parse`, which is total: whatever another writer put in the field gives at most MAX_COMPONENTS
finite numbers, never an exception.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping

FIELD = "score_components"
MAX_COMPONENTS = 16  # a score has at most 4 (detector.score.MAX_COMPONENTS); more is not ours
MAX_BYTES = 4096
MAX_NAME = 64


def format_components(contributions: Mapping[str, float | None]) -> str:
    """The field's text for one flagged image (compact JSON)."""
    return json.dumps(dict(contributions), separators=(",", ":"), allow_nan=False)


def parse(text: str | bytes | None) -> dict[str, float]:
    """The finite contributions of a `score_components` field, by component, in the writer's
    order; {} for a missing field or anything that is not a JSON object (an older worker, or a
    hostile writer). Names are cut to MAX_NAME characters; non-numbers and non-finite values dropped."""
    if not text or len(text) > MAX_BYTES:
        return {}
    try:
        parsed = json.loads(text)
    except (ValueError, RecursionError):
        return {}
    if not isinstance(parsed, dict):
        return {}
    out: dict[str, float] = {}
    for name, value in parsed.items():
        if isinstance(value, bool) or not isinstance(value, int | float):
            continue
        number = float(value)
        if math.isfinite(number) and len(out) < MAX_COMPONENTS:
            out[str(name)[:MAX_NAME]] = number
    return out


def ranked(text: str | bytes | None) -> list[tuple[str, float]]:
    """`parse`'s contributions, largest first: which view of "not normal" flagged the image."""
    return sorted(parse(text).items(), key=lambda item: -item[1])
