"""`anomaly-trainer retune`: a new artifact version with the same model and a threshold chosen from
operators' labels (the labels stream) and the held-out normal errors.

I/O at the edges: the labels are read from Redis (`read_labels`), the artifact is read and written
with `detector.artifact`; the choice itself is `detector.retune.retune` (pure).
"""

from __future__ import annotations

import datetime as dt
import math
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import numpy as np

from contract.labels import LabelSet, latest_labels
from detector.artifact import (
    BASELINE_FILE,
    MANIFEST_FILE,
    AlertEstimate,
    Baseline,
    RateEstimate,
    Retune,
    Threshold,
    load_artifact,
    write_artifact,
)
from detector.retune import Estimate, Interval, Retuned, Target, retune

PAGE = 1000


def redacted(url: str) -> str:
    """The URL without its password (it goes into baseline.json and onto the terminal)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"{parts.username or ''}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


def stream_entries(client: Any, stream: str) -> Iterator[tuple[bytes, dict[bytes, bytes]]]:
    """Every entry of `stream`, oldest first, in pages (XRANGE, read-only)."""
    start = "-"
    while True:
        page = client.xrange(stream, min=start, max="+", count=PAGE)
        yield from page
        if len(page) < PAGE:
            return
        last = page[-1][0].decode() if isinstance(page[-1][0], bytes) else str(page[-1][0])
        start = "(" + last


def read_labels(client: Any, stream: str) -> LabelSet:
    """The labels stream, parsed: the latest label per source_id (see contract.labels)."""
    return latest_labels(stream_entries(client, stream))


@dataclass(frozen=True)
class RetuneResult:
    """What `retune_artifact` did: the new artifact and the numbers people look at."""

    artifact: Path
    retuned: Retuned
    model_version: str
    previous: Threshold
    labels: LabelSet
    other_model: int  # labels of another model version (not comparable scores)
    without_score: int


def _rate(interval: Interval) -> RateEstimate:
    def finite(v: float) -> float | None:
        return None if math.isnan(v) else v

    return RateEstimate(
        value=finite(interval.value),
        low=finite(interval.low),
        high=finite(interval.high),
        successes=interval.successes,
        trials=interval.trials,
    )


def _alert_estimate(e: Estimate) -> AlertEstimate:
    return AlertEstimate(
        threshold=e.threshold, precision=_rate(e.precision), recall=_rate(e.recall), fpr=_rate(e.fpr)
    )


def retune_artifact(
    artifact_dir: Path,
    out: Path,
    labels: LabelSet,
    target: Target,
    *,
    labels_stream: str,
    labels_url: str,
    now: dt.datetime | None = None,
) -> RetuneResult:
    """Choose the threshold from `labels` and write the new artifact to `out` (may be `artifact_dir`:
    it is replaced atomically, and workers serving it reload it)."""
    artifact = load_artifact(artifact_dir)
    baseline = artifact.baseline
    version = baseline.model_version
    mine = [label for label in labels.labels if label.model_version == version]
    usable = [label for label in mine if label.score is not None]
    scores = np.array([label.score for label in usable], np.float64)
    is_anomaly = np.array([label.label == "anomaly" for label in usable], bool)
    result = retune(scores, is_anomaly, artifact.calibration_errors, baseline.threshold.value, target)
    record = Retune(
        labels_stream=labels_stream,
        labels_redis=redacted(labels_url),
        labels_read=labels.read,
        labels_last_id=labels.last_id,
        labels_used=result.labels,
        target=target.text,
        previous_threshold=baseline.threshold,
        before=_alert_estimate(result.before),
        after=_alert_estimate(result.after),
        retuned_at=(now or dt.datetime.now(dt.UTC)).isoformat(timespec="seconds"),
    )
    threshold = Threshold(
        policy=f"retuned {target.text}",
        value=result.threshold,
        expected_flag_rate=result.heldout_flag_rate,
    )
    source = artifact.path

    def stage(tmp: Path) -> Baseline:
        # The same files, byte for byte, but baseline.json (rewritten) and the manifest (recomputed).
        for path in sorted(source.iterdir()):
            if path.is_file() and path.name not in (BASELINE_FILE, MANIFEST_FILE):
                shutil.copy2(path, tmp / path.name)
        return baseline.model_copy(update={"threshold": threshold, "retune": record})

    written = write_artifact(out, stage)
    return RetuneResult(
        artifact=written,
        retuned=result,
        model_version=version,
        previous=baseline.threshold,
        labels=labels,
        other_model=len(labels.labels) - len(mine),
        without_score=len(mine) - len(usable),
    )


def summary(result: RetuneResult, labels_stream: str) -> list[str]:
    """The lines the CLI prints."""
    r = result.retuned
    lines = [
        f"labels: {result.labels.read} entries read from {labels_stream} (last id "
        f"{result.labels.last_id or '-'}), {r.labels} labelled alerts of model {result.model_version} "
        f"used ({r.anomalies} anomaly, {r.normals} normal)",
    ]
    if result.other_model or result.without_score or result.labels.invalid:
        lines.append(
            f"  skipped: {result.other_model} of other model versions, {result.without_score} without "
            f"a score, {len(result.labels.invalid)} invalid"
        )
    lines.append(f"target: {r.target.text}")
    for name, e in (("before", r.before), ("after", r.after)):
        lines.append(
            f"{name:<6}  threshold {e.threshold:.6g}: precision {e.precision.text()}, "
            f"recall {e.recall.text()}, FPR {e.fpr.text()}"
        )
    lines.append(
        f"  previous threshold {result.previous.policy} = {result.previous.value:.6g}; new one flags "
        f"{r.heldout_flag_rate:.2%} of held-out normal images"
    )
    lines.append("  (recall is relative to the alerts labelled anomaly; intervals are 95% Wilson)")
    lines.append(f"artifact: {result.artifact}")
    return lines
