"""An output entry as the notifier reads it: parsed once, at this boundary, into an `Anomaly` with
its idempotency key and its viewer links (pure, no I/O).

The idempotency key names the input entry the anomaly was scored from: `<input stream of its
shard>/<source_id>`, e.g. `images/1700000000000-0` or, with ANOMALY_SHARDS=2, `images:{1}/...`.
A `source_id` alone is not enough: it is a stream id of one shard's input stream, and two shards
can hand out the same id. Keyed on the input entry (not on the output entry), the two output
entries a worker failover may publish for one image share a key, so the receiver de-duplicates
those too; a dead letter redriven to the input stream is a new entry with a new key.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from urllib.parse import quote, urlencode

from contract.score_components import FIELD as SCORE_COMPONENTS
from contract.score_components import parse as parse_components
from detector.errors import AnomalyScorerError

# A full stream entry id: milliseconds and sequence.
_ENTRY_ID = re.compile(r"(0|[1-9][0-9]{0,19})-(0|[1-9][0-9]{0,19})")
MAX_TEXT_BYTES = 1024  # any one field of an output entry; the worker's are far shorter


class BadAnomaly(AnomalyScorerError):
    """An output entry the notifier cannot describe (a field missing or malformed); the message
    names the field, what was expected and what was found. It goes to the notifier's dead letters."""


@dataclass(frozen=True)
class Anomaly:
    """One output entry of one shard, with the fields every message format needs."""

    shard: int
    output_stream: str
    input_stream: str
    entry_id: str  # the output entry's own id (the viewer addresses the alert by it)
    source_id: str  # the input entry it was scored from
    id: str  # the producer's id, if it gave one
    score: float
    threshold: float
    z: float | None
    p_value: float | None
    model_version: str
    scored_at_ms: int | None
    region: str
    region_share: float | None
    # What each score component added (contract.score_components); {} from an older worker.
    score_components: Mapping[str, float] = field(default_factory=dict)

    @property
    def key(self) -> str:
        """The Idempotency-Key: the input entry's stream and id (see the module docstring)."""
        return f"{quote(self.input_stream, safe=':{}')}/{self.source_id}"

    @property
    def published_at_ms(self) -> int:
        """When the worker published it: the milliseconds of its output entry id."""
        return int(self.entry_id.split("-", 1)[0])

    @property
    def why(self) -> str:
        """The components of its score, largest first, e.g. "hidden-knn 6.1, mse 1.2"; "" if none."""
        ordered = sorted(self.score_components.items(), key=lambda item: -item[1])
        return ", ".join(f"{name} {value:.3g}" for name, value in ordered)

    @property
    def name(self) -> str:
        """What people call it: the producer's id, else the source id."""
        return self.id or self.source_id


def _text(fields: Mapping[bytes, bytes], name: str) -> str:
    raw = fields.get(name.encode())
    if raw is None:
        return ""
    if len(raw) > MAX_TEXT_BYTES:
        raise BadAnomaly(f"field {name} has {len(raw)} bytes, expected at most {MAX_TEXT_BYTES}")
    return raw.decode("utf-8", "replace")


def _number(fields: Mapping[bytes, bytes], name: str, required: bool) -> float | None:
    text = _text(fields, name)
    if not text:
        if required:
            raise BadAnomaly(f"field {name} is missing, expected a number")
        return None
    try:
        value = float(text)
    except ValueError:
        raise BadAnomaly(f"field {name} is {text[:40]!r}, expected a number") from None
    if not math.isfinite(value):
        if required:
            raise BadAnomaly(f"field {name} is {text[:40]!r}, expected a finite number")
        return None  # JSON has no NaN: an optional non-finite value is left out
    return value


def parse_anomaly(
    entry_id: bytes | str,
    fields: Mapping[bytes, bytes],
    *,
    shard: int,
    output_stream: str,
    input_stream: str,
) -> Anomaly:
    """The anomaly an output entry describes; BadAnomaly when it cannot be described."""
    own_id = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
    source_id = _text(fields, "source_id")
    if _ENTRY_ID.fullmatch(source_id) is None:
        raise BadAnomaly(f"field source_id is {source_id[:40]!r}, expected a stream id like 1700000000000-0")
    score = _number(fields, "score", required=True)
    threshold = _number(fields, "threshold", required=True)
    assert score is not None and threshold is not None
    scored_at = _text(fields, "scored_at_ms")
    return Anomaly(
        shard=shard,
        output_stream=output_stream,
        input_stream=input_stream,
        entry_id=own_id,
        source_id=source_id,
        id=_text(fields, "id"),
        score=score,
        threshold=threshold,
        z=_number(fields, "z", required=False),
        p_value=_number(fields, "p_value", required=False),
        model_version=_text(fields, "model_version"),
        scored_at_ms=int(scored_at) if scored_at.isdigit() and len(scored_at) <= 16 else None,
        region=_text(fields, "region"),
        region_share=_number(fields, "region_share", required=False),
        score_components=parse_components(fields.get(SCORE_COMPONENTS.encode())),
    )


@dataclass(frozen=True)
class ViewerLinks:
    """Where anomaly-viewer shows things (viewer/app.py's routes): the page, filtered by model
    version, and an alert's original picture, `/image/original/<shard>/<output entry id>.png`."""

    base: str  # ANOMALY_NOTIFY_VIEWER_URL without its trailing slash; empty: no links

    def page(self, model_version: str = "") -> str | None:
        """The page of the latest anomalies (of this model version, if given)."""
        if not self.base:
            return None
        query = f"?{urlencode({'model_version': model_version})}" if model_version else ""
        return f"{self.base}/{query}"

    def picture(self, anomaly: Anomaly) -> str | None:
        """The alert's original image, as the viewer draws it."""
        if not self.base:
            return None
        return f"{self.base}/image/original/{anomaly.shard}/{quote(anomaly.entry_id, safe='')}.png"
