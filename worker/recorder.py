"""A batch's metrics: what it scored, flagged and refused, its scores and drift, its latencies, and
the shadow model's agreement. No Redis: the runner calls these around each commit."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping

import numpy as np

from contract.codec import DTYPES, DecodedBatch
from worker.commit import ShadowBatch
from worker.drift import ScoreDrift
from worker.metrics import DetectionWindow, WorkerMetrics
from worker.scoring import Decisions
from worker.stream import entry_timestamps_ms

log = logging.getLogger("worker.runner")
KNOWN_DTYPES = frozenset(d.encode() for d in DTYPES)
SHADOW_FAILURE_LOG_SECONDS = 60.0


def declared_dtype(fields: Mapping[bytes, bytes]) -> str:
    """The entry's dtype for metric labels: a known name, else 'unknown' (keeps the label set bounded)."""
    raw = fields.get(b"dtype", b"uint8")
    return raw.decode() if raw in KNOWN_DTYPES else "unknown"


class BatchRecorder:
    """Records batches on `metrics`, with the detection and shadow-agreement windows."""

    def __init__(
        self,
        metrics: WorkerMetrics,
        window_seconds: float,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.metrics = metrics
        self.clock = clock
        self.monotonic = monotonic
        self.window = DetectionWindow(window_seconds, monotonic)
        self.shadow_window = DetectionWindow(window_seconds, monotonic)
        self._shadow_failures = 0
        self._next_shadow_failure_log = 0.0

    def scored(
        self, decoded: DecodedBatch, scores: np.ndarray, decisions: Decisions, drift: ScoreDrift | None
    ) -> np.ndarray:
        """The batch's counts and score metrics; returns when its entries were sent (ms), for
        `committed`."""
        m = self.metrics
        flagged = int(np.count_nonzero(decisions.flagged))
        scored = len(decoded.ids)
        m.scored.inc(scored)
        m.flagged.inc(flagged)
        for rejected in decoded.rejected:
            m.invalid.labels(rejected.code).inc()
            m.messages.labels(declared_dtype(rejected.fields), "dead_letter").inc()
        if scored:
            kinds = set(decoded.dtypes)
            if len(kinds) == 1:  # the usual batch: one dtype, no masks
                (dtype,) = kinds
                m.messages.labels(dtype, "flagged").inc(flagged)
                m.messages.labels(dtype, "normal").inc(scored - flagged)
            else:
                dtypes = np.asarray(decoded.dtypes)
                for dtype in kinds:
                    mask = dtypes == dtype
                    n_flag = int(np.count_nonzero(decisions.flagged[mask]))
                    m.messages.labels(dtype, "flagged").inc(n_flag)
                    m.messages.labels(dtype, "normal").inc(int(mask.sum()) - n_flag)
            m.observe_scores(scores)
            if drift is not None:
                m.score_drift.set(drift.add(scores))
        rate = self.window.add(scored, flagged)
        if not math.isnan(rate):
            m.detection_rate.set(rate)
        return entry_timestamps_ms(decoded.ids) if scored else np.empty(0)

    def committed(self, sent_ms: np.ndarray, n: int, started: float) -> None:
        """What the commit ends: the batch's duration, the time of the last batch, and each
        entry's latency from XADD to its commit."""
        m = self.metrics
        m.batch_size.observe(n)
        now = self.clock()
        m.batch_duration.observe(self.monotonic() - started)
        m.last_batch.set(now)
        if sent_ms.size:
            m.observe_latencies(np.maximum(0.0, (now * 1000.0 - sent_ms) / 1000.0))

    def shadow(self, decisions: Decisions, shadow: ShadowBatch) -> None:
        """The shadow model's verdicts on the batch the served model decided."""
        n = len(shadow.scores)
        agreed = int(np.count_nonzero(shadow.decisions.flagged == decisions.flagged))
        self.metrics.shadow_scored.inc(n)
        self.metrics.shadow_flagged.inc(int(np.count_nonzero(shadow.decisions.flagged)))
        ratio = self.shadow_window.add(n, agreed)
        if not math.isnan(ratio):
            self.metrics.shadow_agreement.set(ratio)

    def shadow_failed(self, error: str, shadow_version: str) -> None:
        """The shadow model raised on a batch: counted, logged at most once a minute."""
        self.metrics.shadow_errors.inc()
        self._shadow_failures += 1
        now = self.monotonic()
        if now >= self._next_shadow_failure_log:  # at most one line a minute, with the count
            self._next_shadow_failure_log = now + SHADOW_FAILURE_LOG_SECONDS
            log.error(
                "shadow model failed to score; its results are skipped, serving goes on "
                "shadow_version=%s failed_batches=%d error=%s",
                shadow_version,
                self._shadow_failures,
                error,
            )
