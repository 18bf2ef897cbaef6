"""Scores -> decisions: the numbers of the worker's output fields (flagged, z, p-value). No Redis.

The scores come from the detector core's engines (`detector.loading.load_scorer`); this module
turns them into what the worker publishes, with the artifact's threshold or the one
ANOMALY_THRESHOLD asks for (recomputed from the artifact's held-out errors).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from detector.artifact import LoadedArtifact
from detector.thresholds import check_policy_fits_score, flag_rate, p_values, parse_policy


@dataclass(frozen=True)
class Decisions:
    """Per-row outcome of a scored batch."""

    flagged: np.ndarray  # bool
    z: np.ndarray
    p_value: np.ndarray


@dataclass(frozen=True)
class DecisionRule:
    """Threshold and the baseline numbers that turn a score into z and a p-value."""

    threshold: float
    policy: str
    mean: float
    std: float
    expected_flag_rate: float
    sorted_errors: np.ndarray

    @classmethod
    def from_artifact(cls, artifact: LoadedArtifact, policy: str | None = None) -> DecisionRule:
        """The artifact's own rule, or `policy` recomputed from its held-out errors."""
        stats = artifact.baseline.statistics
        errors = artifact.calibration_errors
        if policy:
            parsed = parse_policy(policy)
            check_policy_fits_score(parsed, artifact.baseline.score)
            value = parsed.threshold(errors)
            return cls(value, parsed.text, stats.mean, stats.std, flag_rate(errors, value), errors)
        t = artifact.baseline.threshold
        return cls(t.value, t.policy, stats.mean, stats.std, t.expected_flag_rate, errors)

    def decide(self, scores: np.ndarray) -> Decisions:
        """Flag score > threshold; z against the baseline; conformal p-value."""
        scores = np.asarray(scores, dtype=np.float64)
        std = self.std if self.std > 0 else 1e-12
        return Decisions(
            flagged=scores > self.threshold,
            z=(scores - self.mean) / std,
            p_value=p_values(self.sorted_errors, scores),
        )
