"""The labels contract: what an operator (the viewer, or any other tool) says about an alert.

A label is one entry of the labels stream (ANOMALY_LABELS_STREAM, default `anomaly-labels`):

  source_id       the input entry id the worker scored (the output entry's `source_id`)
  label           `anomaly` (the alert was right) or `normal` (a false positive)
  model_version   the model that raised the alert (the output entry's `model_version`)
  score           the alert's score, when known (empty or absent otherwise)
  labelled_at_ms  Unix time in ms
  by              who labelled it (free text: an operator's name, a tool's)
  shard           with ANOMALY_SHARDS above 1: the shard of the alert (its output stream
                  `anomalies:{shard}`), since entry ids of different shards may coincide
                  (optional; absent: the one shard whose alert has that source_id)

The latest label of a (shard, source_id) wins (an operator may correct a click). Pure: no Redis here.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

LabelValue = Literal["anomaly", "normal"]
LABEL_VALUES: tuple[LabelValue, ...] = ("anomaly", "normal")
MAX_FIELD_BYTES = 256
MAX_SHARDS = 1024  # ANOMALY_SHARDS' upper bound


class InvalidLabel(ValueError):
    """A labels-stream entry that does not follow the contract; the message says which field."""


@dataclass(frozen=True)
class Label:
    """One operator judgement of one alert."""

    source_id: str
    label: LabelValue
    model_version: str
    score: float | None
    labelled_at_ms: int
    by: str
    shard: int | None = None

    def fields(self) -> dict[str, str]:
        """The stream entry's fields (every value a string, as Redis stores them)."""
        fields = {
            "source_id": self.source_id,
            "label": self.label,
            "model_version": self.model_version,
            "score": "" if self.score is None else repr(float(self.score)),
            "labelled_at_ms": str(int(self.labelled_at_ms)),
            "by": self.by,
        }
        if self.shard is not None:
            fields["shard"] = str(self.shard)
        return fields


def _text(fields: Mapping[bytes | str, bytes | str], name: str, required: bool = True) -> str:
    raw = fields.get(name, fields.get(name.encode()))
    if raw is None:
        if required:
            raise InvalidLabel(f"label entry has no field {name!r}; expected {name} (see contract.labels)")
        return ""
    text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else str(raw)
    if len(text.encode()) > MAX_FIELD_BYTES:
        raise InvalidLabel(
            f"label field {name} has {len(text.encode())} bytes, expected at most {MAX_FIELD_BYTES}"
        )
    return text


def parse_label(fields: Mapping[bytes | str, bytes | str]) -> Label:
    """A labels-stream entry as a `Label`; InvalidLabel names the field, the expected and the found."""
    source_id = _text(fields, "source_id")
    if not source_id:
        raise InvalidLabel("label field source_id is empty; expected the scored input entry id")
    value = _text(fields, "label")
    if value not in LABEL_VALUES:
        raise InvalidLabel(f"label field label is {value!r}, expected 'anomaly' or 'normal'")
    score_text = _text(fields, "score", required=False)
    score: float | None = None
    if score_text:
        try:
            score = float(score_text)
        except ValueError:
            raise InvalidLabel(f"label field score is {score_text!r}, expected a number or empty") from None
        if not math.isfinite(score):
            raise InvalidLabel(f"label field score is {score_text!r}, expected a finite number")
    at_text = _text(fields, "labelled_at_ms")
    try:
        labelled_at_ms = int(at_text)
    except ValueError:
        raise InvalidLabel(f"label field labelled_at_ms is {at_text!r}, expected Unix time in ms") from None
    shard_text = _text(fields, "shard", required=False)
    shard: int | None = None
    if shard_text:
        if not shard_text.isdigit() or int(shard_text) >= MAX_SHARDS:
            raise InvalidLabel(
                f"label field shard is {shard_text!r}, expected a shard number 0-{MAX_SHARDS - 1}"
            )
        shard = int(shard_text)
    return Label(
        source_id=source_id,
        label=value,  # checked against LABEL_VALUES above
        model_version=_text(fields, "model_version"),
        score=score,
        labelled_at_ms=labelled_at_ms,
        by=_text(fields, "by", required=False),
        shard=shard,
    )


@dataclass(frozen=True)
class LabelSet:
    """The labels read from a stream: the latest per source_id, what was skipped and why."""

    labels: tuple[Label, ...]
    read: int  # entries read
    last_id: str  # the stream id of the last entry read ("" when none)
    invalid: tuple[str, ...]  # one message per entry skipped, with its stream id


def latest_labels(entries: Iterable[tuple[Any, Mapping[Any, Any]]]) -> LabelSet:
    """Parse stream entries in order; the latest label per (shard, source_id) wins; the invalid are listed."""
    latest: dict[tuple[int | None, str], Label] = {}
    invalid: list[str] = []
    read = 0
    last_id = ""
    for entry_id, fields in entries:
        read += 1
        last_id = entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)
        try:
            label = parse_label(fields)
        except InvalidLabel as exc:
            invalid.append(f"{last_id}: {exc}")
            continue
        key = (label.shard, label.source_id)
        latest.pop(key, None)  # re-insert: dict order follows the latest label
        latest[key] = label
    return LabelSet(tuple(latest.values()), read, last_id, tuple(invalid))
