"""The served model and its shadow, and how they are swapped: reload on request (SIGHUP) or when the
artifact's manifest changes on disk, verified first, both kept when either new one fails. The loop
reads `model` and `shadow` once per batch, so a swap lands between batches."""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from pathlib import Path

from detector.artifact import manifest_digest
from detector.errors import AnomalyScorerError
from worker.drift import ScoreDrift
from worker.loaded_model import LoadedModel, ModelLoader, check_shadow_fits
from worker.metrics import WorkerMetrics

log = logging.getLogger("worker.runner")


class ModelSlot:
    """The served model (and shadow), their loaders, the score-drift window of the served one."""

    def __init__(
        self,
        model: LoadedModel,
        metrics: WorkerMetrics,
        *,
        shadow: LoadedModel | None = None,
        loader: ModelLoader | None = None,
        shadow_loader: ModelLoader | None = None,
        artifact: Path | None = None,
        shadow_artifact: Path | None = None,
        poll_seconds: float = 0.0,
        drift_window_scores: int = 0,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        if shadow is not None:
            check_shadow_fits(model, shadow)
        self.model = model
        self.shadow = shadow
        self.metrics = metrics
        self.loader = loader
        self.shadow_loader = shadow_loader
        self.artifact = artifact
        self.shadow_artifact = shadow_artifact
        self.poll_seconds = poll_seconds
        self.drift_window_scores = drift_window_scores
        self.monotonic = monotonic
        self.reload_event = threading.Event()  # SIGHUP sets it; the loop reloads between batches
        self.drift = self._new_drift(model)
        self._next_check = monotonic() + poll_seconds
        self.publish()

    def maybe_reload(self) -> None:
        """Reload when asked to, or when a poll finds the artifact's manifest changed on disk."""
        if self.loader is None:
            return
        if not self.reload_event.is_set():
            if not self.poll_seconds or self.monotonic() < self._next_check:
                return
            self._next_check = self.monotonic() + self.poll_seconds
            if self.artifact is None:
                return
            try:
                # The digests are those of the manifests that were verified at load: an update
                # that landed while one loaded differs from it, and is loaded now.
                changed = manifest_digest(self.artifact) != self.model.manifest_digest
                if self.shadow is not None and self.shadow_artifact is not None:
                    changed |= manifest_digest(self.shadow_artifact) != self.shadow.manifest_digest
            except (OSError, AnomalyScorerError) as exc:
                log.debug("artifact check failed error=%s", exc)
                return
            if not changed:
                return
        self.reload_event.clear()
        self.reload()

    def reload(self) -> bool:
        """Load, verify and swap in a new model (and shadow); keep both old ones when either fails."""
        if self.loader is None:
            return False
        try:
            new = self.loader()
            new_shadow = self.shadow_loader() if self.shadow_loader is not None else None
            if new_shadow is not None:
                check_shadow_fits(new, new_shadow)
        except (AnomalyScorerError, OSError, ValueError) as exc:
            self.metrics.reloads.labels("failure").inc()
            log.error("reload refused kept_model_version=%s error=%s", self.model.scorer.model_version, exc)
            return False
        old = self.model.scorer.model_version
        if new.manifest_digest != self.model.manifest_digest:
            self.drift = self._new_drift(new)  # a new baseline: start the window afresh
            self.metrics.score_drift.set(math.nan)
        self.model = new
        if new_shadow is not None:
            if self.shadow is None or new_shadow.manifest_digest != self.shadow.manifest_digest:
                log.info("shadow model loaded model_version=%s", new_shadow.scorer.model_version)
            self.shadow = new_shadow
        self.publish()
        self.metrics.reloads.labels("success").inc()
        log.info(
            "reloaded old_model_version=%s model_version=%s threshold=%.6g",
            old,
            new.scorer.model_version,
            new.rule.threshold,
        )
        return True

    def publish(self) -> None:
        """The models' versions, thresholds and expected rate on the metrics."""
        rule = self.model.rule
        self.metrics.set_model(
            self.model.scorer.model_version,
            rule.policy,
            rule.threshold,
            rule.expected_flag_rate,
            engine=self.model.scorer.engine,
            score_buckets=self.model.score_buckets,
        )
        if self.shadow is not None:
            shadow_rule = self.shadow.rule
            self.metrics.set_shadow_model(
                self.shadow.scorer.model_version,
                shadow_rule.policy,
                shadow_rule.threshold,
                self.shadow.scorer.engine,
            )

    def _new_drift(self, model: LoadedModel) -> ScoreDrift | None:
        if not self.drift_window_scores:
            return None
        return ScoreDrift(model.rule.sorted_errors, self.drift_window_scores)
