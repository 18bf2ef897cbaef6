"""Which labels name a real alert: the alerts, looked up in the output (and scores) stream of every
shard, and each label checked against them. `retune` uses a label only with its alert's own score.

Anyone who may write the labels stream can write any `source_id`, `score` and `model_version`;
what the workers wrote is the source of truth. So a label counts only when its `source_id` is an
alert of the artifact's model version: an output entry (`anomalies`, or `anomalies:{i}` with
ANOMALY_SHARDS=N) with that `source_id` and `model_version`, whose `score` is the one used (the
label's own `score` is ignored, so labels without one work). When ANOMALY_SCORES_STREAM is set,
labels not found in the output streams are looked up there too (it may keep alerts the output
stream's MAXLEN has trimmed), but only its entries with `flagged=1` count: a label of an image the
model scored normal is skipped (`scored normal`). The estimates of `detector.retune` (precision
among the labelled alerts above a threshold, recall relative to them) assume the labelled images
are the alerts the viewer showed; images scored normal are labelled only when someone chose them,
so using them would let whoever picks them move the threshold down with a sample of their choice.

Reads are read-only (XREVRANGE, newest first, in pages of PAGE entries) and keep only the alerts
that labels name; a stream is read until every label's alert was found in it, so at most its
MAXLEN entries. Entry ids of different shards may coincide: a label names its alert's shard (the
viewer writes it); one without a shard whose id is an alert in several shards cannot say which
image it meant, and is skipped (`in several shards`).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from contract.labels import Label, LabelSet
from runtime.settings import StreamSettings

PAGE = 1000

# Why a label was not used (VerifiedLabels.skipped), in the order the summary lists them.
NOT_AN_ALERT = "not an alert"
SCORED_NORMAL = "scored normal"
OTHER_MODEL = "of another model version"
SEVERAL_SHARDS = "in several shards"
INVALID = "invalid"
REASONS = (NOT_AN_ALERT, SCORED_NORMAL, OTHER_MODEL, SEVERAL_SHARDS, INVALID)


@dataclass(frozen=True)
class ShardStreams:
    """The streams of one shard where its alerts are: the output stream, and the scores stream if set."""

    shard: int
    output: str
    scores: str | None


def alert_streams(settings: StreamSettings) -> list[ShardStreams]:
    """The output (and scores) stream of every shard, shard 0 first."""
    return [
        ShardStreams(
            shard,
            settings.in_shard(settings.output_stream, shard),
            settings.in_shard(settings.scores_stream, shard) if settings.scores_stream else None,
        )
        for shard in range(settings.shards)
    ]


@dataclass(frozen=True)
class Alert:
    """What a worker wrote about one scored entry: an output entry, or a scores-stream entry."""

    source_id: str
    model_version: str
    score: float
    flagged: bool  # always in the output stream; the `flagged` field in the scores stream
    stream: str
    shard: int


def _text(fields: Mapping[Any, Any], name: str) -> str | None:
    raw = fields.get(name.encode(), fields.get(name))
    if raw is None:
        return None
    return raw.decode("utf-8", "replace") if isinstance(raw, bytes) else str(raw)


def alert_of(fields: Mapping[Any, Any], stream: str, shard: int, scores_stream: bool) -> Alert | None:
    """An output or scores entry as an Alert; None when it is off the output contract (no source_id
    or model_version, a score that is not a finite number): nothing to verify a label with."""
    source_id, version, score_text = (_text(fields, n) for n in ("source_id", "model_version", "score"))
    if not source_id or version is None or score_text is None:
        return None
    try:
        score = float(score_text)
    except ValueError:
        return None
    if not math.isfinite(score):
        return None
    flagged = _text(fields, "flagged") == "1" if scores_stream else True
    return Alert(source_id, version, score, flagged, stream, shard)


@dataclass
class AlertLookup:
    """The alerts found for the labels' source_ids (the newest per stream and model version), and
    how many entries of each stream were read."""

    found: dict[str, list[Alert]] = field(default_factory=dict)
    entries_read: dict[str, int] = field(default_factory=dict)

    def add(self, alert: Alert) -> None:
        """Keep `alert` unless a newer one of the same stream and model version is kept already."""
        kept = self.found.setdefault(alert.source_id, [])
        if not any(a.stream == alert.stream and a.model_version == alert.model_version for a in kept):
            kept.append(alert)

    def has(self, source_id: str, model_version: str, stream: str | None = None) -> bool:
        """Whether an entry of `source_id` by `model_version` was found (in `stream`, if given)."""
        return any(
            a.model_version == model_version and (stream is None or a.stream == stream)
            for a in self.found.get(source_id, ())
        )


def newest_first(client: Any, stream: str, page: int = PAGE) -> Iterator[tuple[Any, Mapping[Any, Any]]]:
    """The entries of `stream`, newest first, `page` at a time (XREVRANGE: read-only, bounded)."""
    cursor = "+"
    while True:
        entries = client.xrevrange(stream, max=cursor, min="-", count=page)
        yield from entries
        if len(entries) < page:
            return
        last = entries[-1][0]
        cursor = "(" + (last.decode() if isinstance(last, bytes) else str(last))


def find_alerts(
    client: Any,
    shards: Sequence[ShardStreams],
    source_ids: Collection[str],
    model_version: str,
    page: int = PAGE,
) -> AlertLookup:
    """The alerts of `source_ids` in every shard's output stream, then, for those not found there
    by `model_version`, in the scores streams. A stream is read until each id it is searched for was
    found in it by `model_version`, or to its end."""
    lookup = AlertLookup()
    wanted = set(source_ids)

    def scan(stream: str, shard: int, ids: set[str], scores_stream: bool) -> None:
        if not ids:
            return
        remaining = set(ids)
        read = 0
        for _, fields in newest_first(client, stream, page):
            read += 1
            if _text(fields, "source_id") not in ids:
                continue
            alert = alert_of(fields, stream, shard, scores_stream)
            if alert is None:
                continue
            lookup.add(alert)
            if alert.model_version == model_version:
                remaining.discard(alert.source_id)
                if not remaining:
                    break
        lookup.entries_read[stream] = read

    for streams in shards:
        scan(streams.output, streams.shard, wanted, scores_stream=False)
    missing = {i for i in wanted if not lookup.has(i, model_version)}
    for streams in shards:
        if streams.scores is not None:
            scan(streams.scores, streams.shard, missing, scores_stream=True)
    return lookup


@dataclass(frozen=True)
class VerifiedLabels:
    """The labels `retune` may use, each with its alert's score, and how many were skipped, by reason."""

    labels: tuple[Label, ...]
    scores: np.ndarray  # the alerts' scores, as the workers wrote them
    is_anomaly: np.ndarray
    skipped: Mapping[str, int]  # every reason of REASONS, 0 included

    @property
    def anomalies(self) -> int:
        """Used labels that say `anomaly`."""
        return int(self.is_anomaly.sum())

    def skipped_text(self) -> str:
        """`12 not an alert, 2 of another model version` (the reasons that occurred), or ``."""
        return ", ".join(f"{n} {reason}" for reason, n in self.skipped.items() if n)


def verify_labels(labels: LabelSet, lookup: AlertLookup, model_version: str) -> VerifiedLabels:
    """Pure: the labels whose source_id is an alert of `model_version` in exactly one shard, with
    that alert's score (an output entry's before a scores-stream entry's); the others counted."""
    used: list[Label] = []
    scores: list[float] = []
    skipped: Counter[str] = Counter({reason: 0 for reason in REASONS})
    skipped[INVALID] = len(labels.invalid)
    for label in labels.labels:
        found = lookup.found.get(label.source_id, [])
        if label.shard is not None:  # the label names its alert's shard: only that one counts
            found = [a for a in found if a.shard == label.shard]
        mine = [a for a in found if a.model_version == model_version]
        alerts = [a for a in mine if a.flagged]
        if label.model_version != model_version or (found and not mine):
            skipped[OTHER_MODEL] += 1
        elif not mine:
            skipped[NOT_AN_ALERT] += 1
        elif not alerts:
            skipped[SCORED_NORMAL] += 1
        elif len({a.shard for a in alerts}) > 1:
            skipped[SEVERAL_SHARDS] += 1
        else:
            used.append(label)
            scores.append(alerts[0].score)
    return VerifiedLabels(
        labels=tuple(used),
        scores=np.array(scores, np.float64),
        is_anomaly=np.array([label.label == "anomaly" for label in used], bool),
        skipped={reason: skipped[reason] for reason in REASONS},
    )


def source_ids_to_verify(labels: LabelSet, model_version: str) -> set[str]:
    """The source_ids of the labels that claim `model_version` (the others are skipped unread)."""
    return {label.source_id for label in labels.labels if label.model_version == model_version}
