"""`anomaly-trainer retune`: a new artifact version with the same model and a threshold chosen from
operators' labels (the labels stream) and the held-out normal errors.

I/O at the edges: the labels and the alerts they name are read from Redis (`read_labels`,
`trainer.alerts.find_alerts`), the artifact is read and written with `detector.artifact`; the
checks and the choice are pure (`trainer.alerts.verify_labels`, `detector.retune.retune` and
`bound_violations`). `plan_retune` decides, `write_retuned` writes: the CLI prints the change and
refuses a threshold out of bounds in between.
"""

from __future__ import annotations

import datetime as dt
import math
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from contract.labels import LabelSet, latest_labels
from detector.artifact import (
    BASELINE_FILE,
    MANIFEST_FILE,
    AlertEstimate,
    Baseline,
    LoadedArtifact,
    RateEstimate,
    Retune,
    Threshold,
    write_artifact,
)
from detector.errors import AnomalyScorerError
from detector.retune import (
    BoundViolation,
    Change,
    Estimate,
    Interval,
    Retuned,
    Target,
    bound_violations,
    retune,
    threshold_change,
)
from runtime.connection import make_redis
from runtime.redact import redact_url
from runtime.settings import StreamSettings
from trainer.alerts import (
    PAGE,
    AlertLookup,
    VerifiedLabels,
    alert_streams,
    find_alerts,
    source_ids_to_verify,
    verify_labels,
)


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
class LabelsRead:
    """The labels as read, the alerts they name, and the labels verified against those alerts."""

    labels: LabelSet
    lookup: AlertLookup
    verified: VerifiedLabels


class LabelsUnreadable(AnomalyScorerError):
    """Redis refused or failed a read of the labels or the alerts; the message names the URL
    (without secrets) and the error."""


def connect_and_verify_labels(settings: StreamSettings, model_version: str) -> LabelsRead:
    """`read_verified_labels` through the client every program uses (runtime.connection: one node,
    Cluster or Sentinel, password files); a Redis error becomes LabelsUnreadable."""
    import redis
    from redis.exceptions import RedisClusterException

    where = f"{settings.labels_stream} and the alerts it names from {settings.redacted_redis_url()}"
    try:
        client = make_redis(settings, "anomaly-trainer-retune")
        try:
            return read_verified_labels(client, settings, model_version)
        finally:
            client.close()
    except (redis.RedisError, RedisClusterException, OSError) as exc:
        raise LabelsUnreadable(f"cannot read {where}: {exc}") from exc


def read_verified_labels(client: Any, settings: StreamSettings, model_version: str) -> LabelsRead:
    """Read the labels stream and look up the alert each label of `model_version` names, in every
    shard's output stream (and scores stream); the labels that check out, with their alerts' scores."""
    labels = read_labels(client, settings.labels_stream)
    lookup = find_alerts(
        client, alert_streams(settings), source_ids_to_verify(labels, model_version), model_version
    )
    return LabelsRead(labels, lookup, verify_labels(labels, lookup, model_version))


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


@dataclass(frozen=True)
class RetunePlan:
    """What `retune` would write: the chosen threshold, its change, and the bounds it breaks."""

    artifact: LoadedArtifact
    target: Target
    retuned: Retuned
    change: Change
    violations: tuple[BoundViolation, ...]

    @property
    def model_version(self) -> str:
        """The model whose alerts were labelled (the artifact's)."""
        return self.artifact.baseline.model_version


def plan_retune(artifact: LoadedArtifact, verified: VerifiedLabels, target: Target) -> RetunePlan:
    """Pure: the threshold that meets `target` on the verified labels and the held-out errors, and
    the bounds it breaks. Raises TooFewLabels or TargetUnreachable (detector.retune)."""
    heldout = artifact.calibration_errors
    current = artifact.baseline.threshold.value
    result = retune(verified.scores, verified.is_anomaly, heldout, current, target)
    change = threshold_change(current, result.threshold, heldout)
    return RetunePlan(artifact, target, result, change, bound_violations(change, verified.scores, heldout))


def write_retuned(
    plan: RetunePlan,
    out: Path,
    read: LabelsRead,
    *,
    labels_stream: str,
    redis_url: str,
    now: dt.datetime | None = None,
) -> Path:
    """Write the artifact of `plan` to `out` (may be the source artifact's directory: it is replaced
    atomically, and workers serving it reload it); `redis_url` is recorded without its secrets."""
    baseline = plan.artifact.baseline
    result = plan.retuned
    record = Retune(
        labels_stream=labels_stream,
        labels_redis=redact_url(redis_url),
        labels_read=read.labels.read,
        labels_last_id=read.labels.last_id,
        labels_used=result.labels,
        target=plan.target.text,
        previous_threshold=baseline.threshold,
        before=_alert_estimate(result.before),
        after=_alert_estimate(result.after),
        retuned_at=(now or dt.datetime.now(dt.UTC)).isoformat(timespec="seconds"),
    )
    threshold = Threshold(
        policy=f"retuned {plan.target.text}",
        value=result.threshold,
        expected_flag_rate=plan.change.new_rate,
    )
    source = plan.artifact.path

    def stage(tmp: Path) -> Baseline:
        # The same files, byte for byte, but baseline.json (rewritten) and the manifest (recomputed).
        for path in sorted(source.iterdir()):
            if path.is_file() and path.name not in (BASELINE_FILE, MANIFEST_FILE):
                shutil.copy2(path, tmp / path.name)
        return baseline.model_copy(update={"threshold": threshold, "retune": record})

    return write_artifact(out, stage)


def labels_summary(read: LabelsRead, model_version: str, labels_stream: str) -> list[str]:
    """What was read and checked: printed before the choice, so a refusal shows it too."""
    v = read.verified
    lines = [
        f"labels: {read.labels.read} entries read from {labels_stream} (last id "
        f"{read.labels.last_id or '-'}), {len(v.labels)} labels of alerts of model {model_version} "
        f"verified and used ({v.anomalies} anomaly, {len(v.labels) - v.anomalies} normal)",
    ]
    if skipped := v.skipped_text():
        lines.append(f"  skipped (never used): {skipped}")
    if read.lookup.entries_read:
        streams = ", ".join(f"{name} ({n} entries read)" for name, n in read.lookup.entries_read.items())
        lines.append(f"  alerts looked up in: {streams}")
    return lines


def plan_summary(plan: RetunePlan) -> list[str]:
    """The estimates before and after, and the change: printed before anything is written."""
    r = plan.retuned
    lines = [f"target: {r.target.text}"]
    for name, e in (("before", r.before), ("after", r.after)):
        lines.append(
            f"{name:<6}  threshold {e.threshold:.6g}: precision {e.precision.text()}, "
            f"recall {e.recall.text()}, FPR {e.fpr.text()}"
        )
    lines.append("  (recall is relative to the alerts labelled anomaly; intervals are 95% Wilson)")
    policy = plan.artifact.baseline.threshold.policy
    lines.append(f"change ({policy} -> retuned {r.target.text}): {plan.change.text()}")
    return lines
