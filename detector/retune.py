"""Re-tuning a threshold from operators' labels of alerts, with the held-out normal errors. Pure numpy.

The labels say, for alerts the model raised, whether each was an anomaly or a false positive;
the held-out normal errors (`calibration_errors.npy`) say how normal images score. From them:

- precision at a threshold t: among labelled alerts with score > t, the share labelled `anomaly`;
- recall at t: among the alerts labelled `anomaly`, the share still above t. It is relative to the
  anomalies the labelled alerts caught: anomalies never alerted on were never labelled;
- FPR at t: the share of normal images above t, the normal images being the held-out errors plus
  the alerts labelled `normal` (false positives seen in production, so the tail is not only the
  training distribution's).

`--target-precision P` picks the lowest threshold among the current one and the labelled scores
whose estimated precision is at least P; `--target-fpr F` the lowest whose estimated FPR is at
most F. Intervals are Wilson score intervals (95%). Too few labels for the target is refused
(`TooFewLabels`), naming the rule.

Whatever the labels say, a new threshold must stay within bounds (`bound_violations`): finite,
inside the range of the held-out errors and the labelled alerts' scores, and flagging some of the
held-out normal images, within MAX_FLAG_RATE_FACTOR times the current threshold's share either way.
Past them the labels are more likely wrong (or forged) than the model; `retune --force` overrides.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np

from detector.errors import AnomalyScorerError
from detector.thresholds import MIN_EXCEEDANCES_FOR_FPR

# Below this many labelled alerts an estimate of precision is noise.
MIN_LABELS = 10
Z_95 = 1.959964
# A re-tune may change the share of held-out normal images flagged by at most this factor.
MAX_FLAG_RATE_FACTOR = 10
BOUND_FINITE = "finite"
BOUND_RANGE = "range"
BOUND_FLAG_RATE = "flag rate"


class TooFewLabels(AnomalyScorerError, ValueError):
    """Not enough labels (of this model, with scores) for the target asked for."""


class TargetUnreachable(AnomalyScorerError, ValueError):
    """No threshold the labels and held-out errors support meets the target."""


@dataclass(frozen=True)
class BoundViolation:
    """One bound a new threshold breaks: its name (BOUND_*) and what was expected and found."""

    bound: str
    message: str


class ThresholdOutOfBounds(AnomalyScorerError, ValueError):
    """A new threshold breaks one or more bounds (`bound_violations`); one line per bound."""

    def __init__(self, violations: tuple[BoundViolation, ...]) -> None:
        super().__init__("\n".join(v.message for v in violations))
        self.violations = violations


@dataclass(frozen=True)
class Interval:
    """A proportion `successes / trials` with its 95% Wilson score interval (NaN without trials)."""

    successes: int
    trials: int
    value: float
    low: float
    high: float

    def text(self) -> str:
        """`0.900 [0.732, 0.965] (27/30)`."""
        if not self.trials:
            return "n/a (0 labelled)"
        return f"{self.value:.3f} [{self.low:.3f}, {self.high:.3f}] ({self.successes}/{self.trials})"


def wilson(successes: int, trials: int, z: float = Z_95) -> Interval:
    """The Wilson score interval of a binomial proportion: sane at 0, 1 and small counts."""
    if trials <= 0:
        nan = float("nan")
        return Interval(successes, 0, nan, nan, nan)
    p = successes / trials
    denominator = 1.0 + z * z / trials
    centre = (p + z * z / (2 * trials)) / denominator
    half = z * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials)) / denominator
    return Interval(successes, trials, p, max(0.0, centre - half), min(1.0, centre + half))


@dataclass(frozen=True)
class Target:
    """What the operator asks for: `precision` at least value, or `fpr` at most value."""

    kind: Literal["precision", "fpr"]
    value: float

    def __post_init__(self) -> None:
        if not 0.0 < self.value < 1.0:
            raise ValueError(f"target {self.kind} must be between 0 and 1 (exclusive), found {self.value}")

    @property
    def text(self) -> str:
        """`precision>=0.9` or `fpr<=0.01`."""
        return f"precision>={self.value:g}" if self.kind == "precision" else f"fpr<={self.value:g}"

    def labels_needed(self) -> int:
        """Labelled alerts the target needs: MIN_LABELS, and for precision P at least 1/(1-P), the
        count among which one false positive is the whole allowance."""
        if self.kind == "precision":
            return max(MIN_LABELS, math.ceil(1.0 / (1.0 - self.value) - 1e-9))
        return MIN_LABELS


@dataclass(frozen=True)
class Estimate:
    """How alerts at one threshold do, by the labels and the held-out normal errors."""

    threshold: float
    precision: Interval
    recall: Interval
    fpr: Interval  # on the held-out errors plus the scores labelled normal


@dataclass(frozen=True)
class Retuned:
    """The chosen threshold and the estimates before (current threshold) and after."""

    target: Target
    threshold: float
    before: Estimate
    after: Estimate
    labels: int  # labelled alerts used
    anomalies: int
    normals: int
    heldout_flag_rate: float  # share of the held-out errors above the new threshold


def estimate(threshold: float, scores: np.ndarray, is_anomaly: np.ndarray, heldout: np.ndarray) -> Estimate:
    """Precision, recall and FPR of alerts at `threshold` (flag when score > threshold)."""
    above = scores > threshold
    true_alerts = int(np.count_nonzero(above & is_anomaly))
    alerts = int(np.count_nonzero(above))
    normal_scores = np.concatenate([heldout, scores[~is_anomaly]])
    false_alerts = int(np.count_nonzero(normal_scores > threshold))
    return Estimate(
        threshold=float(threshold),
        precision=wilson(true_alerts, alerts),
        recall=wilson(true_alerts, int(np.count_nonzero(is_anomaly))),
        fpr=wilson(false_alerts, int(normal_scores.size)),
    )


def retune(
    scores: np.ndarray, is_anomaly: np.ndarray, heldout: np.ndarray, current: float, target: Target
) -> Retuned:
    """The lowest threshold among the current one and the labelled scores that meets `target`.

    `scores`/`is_anomaly`: the labelled alerts of this model; `heldout`: its held-out normal errors.
    """
    scores = np.asarray(scores, np.float64).ravel()
    is_anomaly = np.asarray(is_anomaly, bool).ravel()
    heldout = np.asarray(heldout, np.float64).ravel()
    if scores.shape != is_anomaly.shape:
        raise ValueError(f"{scores.size} labelled scores but {is_anomaly.size} labels")
    needed = target.labels_needed()
    if scores.size < needed:
        rule = (
            f"at least max({MIN_LABELS}, 1/(1-P)) = {needed} for precision {target.value:g}"
            if target.kind == "precision"
            else f"at least {MIN_LABELS}"
        )
        raise TooFewLabels(
            f"target {target.text} needs labelled alerts of this model, {rule}; found "
            f"{scores.size} ({int(is_anomaly.sum())} anomaly, {int((~is_anomaly).sum())} normal). "
            "Label more alerts in anomaly-viewer, or ask for a lower target"
        )
    if target.kind == "fpr":
        lowest = estimate(_fpr_threshold(scores, is_anomaly, heldout, target), scores, is_anomaly, heldout)
        return _retuned(target, lowest, current, scores, is_anomaly, heldout)
    candidates = np.unique(np.concatenate([[current], scores]))  # ascending
    chosen: Estimate | None = None
    for t in candidates:
        e = estimate(float(t), scores, is_anomaly, heldout)
        if e.precision.trials > 0 and e.precision.value >= target.value:
            chosen = e
            break
    if chosen is None:
        best = max(
            (estimate(float(t), scores, is_anomaly, heldout) for t in candidates),
            key=lambda e: e.precision.value if e.precision.trials else -1.0,
        )
        raise TargetUnreachable(
            f"no threshold among the current one and the labelled scores meets {target.text}: the "
            f"best the labels support is precision {best.precision.text()} at {best.threshold:.6g}; "
            "label more alerts or ask for a lower target"
        )
    return _retuned(target, chosen, current, scores, is_anomaly, heldout)


def _fpr_threshold(scores: np.ndarray, is_anomaly: np.ndarray, heldout: np.ndarray, target: Target) -> float:
    """The lowest threshold above which at most `target.value` of the normal images fall."""
    normal = np.sort(np.concatenate([heldout, scores[~is_anomaly]]))
    needed = math.ceil(MIN_EXCEEDANCES_FOR_FPR / target.value - 1e-9)
    if normal.size < needed:
        raise TargetUnreachable(
            f"target {target.text} needs at least {needed} normal scores ({MIN_EXCEEDANCES_FOR_FPR} "
            f"expected above the threshold), found {normal.size} (held-out errors plus alerts "
            "labelled normal); ask for a larger rate"
        )
    allowed = math.floor(target.value * normal.size + 1e-9)
    return float(normal[normal.size - allowed - 1])


def _retuned(
    target: Target,
    chosen: Estimate,
    current: float,
    scores: np.ndarray,
    is_anomaly: np.ndarray,
    heldout: np.ndarray,
) -> Retuned:
    before = estimate(current, scores, is_anomaly, heldout)
    flag = float(np.count_nonzero(heldout > chosen.threshold) / heldout.size) if heldout.size else 0.0
    return Retuned(
        target=target,
        threshold=chosen.threshold,
        before=before,
        after=chosen,
        labels=int(scores.size),
        anomalies=int(is_anomaly.sum()),
        normals=int((~is_anomaly).sum()),
        heldout_flag_rate=flag,
    )


@dataclass(frozen=True)
class Change:
    """A threshold's change and the share of the held-out normal images flagged before and after."""

    old_threshold: float
    new_threshold: float
    old_flagged: int  # held-out errors above the old threshold
    new_flagged: int
    heldout: int  # held-out errors in all

    @property
    def old_rate(self) -> float:
        """Share of the held-out errors above the old threshold (0 without held-out errors)."""
        return self.old_flagged / self.heldout if self.heldout else 0.0

    @property
    def new_rate(self) -> float:
        """Share of the held-out errors above the new threshold (0 without held-out errors)."""
        return self.new_flagged / self.heldout if self.heldout else 0.0

    def text(self) -> str:
        """`threshold 0.152 (flags 1.00% of held-out normal images, 10/1000) -> 0.16 (0.30%, 3/1000)`."""
        return (
            f"threshold {self.old_threshold:.6g} (flags {self.old_rate:.2%} of held-out normal images, "
            f"{self.old_flagged}/{self.heldout}) -> {self.new_threshold:.6g} "
            f"({self.new_rate:.2%}, {self.new_flagged}/{self.heldout})"
        )


def threshold_change(old: float, new: float, heldout: np.ndarray) -> Change:
    """How many held-out normal errors each threshold flags (score > threshold, as the worker)."""
    errors = np.asarray(heldout, np.float64).ravel()
    return Change(
        old_threshold=float(old),
        new_threshold=float(new),
        old_flagged=int(np.count_nonzero(errors > old)),
        new_flagged=int(np.count_nonzero(errors > new)),
        heldout=int(errors.size),
    )


def bound_violations(
    change: Change, scores: np.ndarray, heldout: np.ndarray, max_factor: float = MAX_FLAG_RATE_FACTOR
) -> tuple[BoundViolation, ...]:
    """The bounds `change.new_threshold` breaks, none when it may be written.

    - finite: inf flags nothing, -inf everything, NaN nothing (every comparison is false);
    - range: within [min, max] of the held-out errors and `scores` (the verified alerts' scores),
      the only values the labels and the artifact say anything about;
    - flag rate: it flags at least one held-out normal image (a threshold that flags none silences
      the detector and its rate alerts), and between 1/max_factor and max_factor times as many as
      the old threshold (counts, so no rounding decides).
    """
    new = change.new_threshold
    if not math.isfinite(new):
        return (
            BoundViolation(
                BOUND_FINITE, f"bound {BOUND_FINITE}: the new threshold is {new}, expected a finite number"
            ),
        )
    violations = []
    values = np.concatenate([np.asarray(heldout, np.float64).ravel(), np.asarray(scores, np.float64).ravel()])
    where = f"the {np.size(heldout)} held-out errors and the {np.size(scores)} labelled alerts' scores"
    if not values.size:
        violations.append(
            BoundViolation(BOUND_RANGE, f"bound {BOUND_RANGE}: no held-out errors nor alert scores bound it")
        )
    elif not float(values.min()) <= new <= float(values.max()):
        violations.append(
            BoundViolation(
                BOUND_RANGE,
                f"bound {BOUND_RANGE}: the new threshold {new:.6g} lies outside "
                f"[{values.min():.6g}, {values.max():.6g}], expected within the range of {where}",
            )
        )
    old_n, new_n, n = change.old_flagged, change.new_flagged, change.heldout
    found = f"found {change.new_rate:.2%} ({new_n}/{n})"
    if new_n == 0:
        violations.append(
            BoundViolation(
                BOUND_FLAG_RATE,
                f"bound {BOUND_FLAG_RATE}: the new threshold {new:.6g} flags none of the {n} held-out normal "
                f"images, expected at least one (a threshold that flags nothing silences the detector); "
                f"{found}",
            )
        )
    elif old_n == 0:
        violations.append(
            BoundViolation(
                BOUND_FLAG_RATE,
                f"bound {BOUND_FLAG_RATE}: the new threshold {new:.6g} changes the share of held-out normal "
                f"images flagged more than {max_factor:g}x: expected within {max_factor:g}x of the current "
                f"threshold's, which flags none of them (0/{n}), {found}",
            )
        )
    elif new_n > max_factor * old_n or new_n * max_factor < old_n:
        violations.append(
            BoundViolation(
                BOUND_FLAG_RATE,
                f"bound {BOUND_FLAG_RATE}: the new threshold {new:.6g} changes the share of held-out normal "
                f"images flagged more than {max_factor:g}x: expected {change.old_rate / max_factor:.2%} to "
                f"{min(1.0, change.old_rate * max_factor):.2%} (the current {change.old_rate:.2%}, "
                f"{old_n}/{n}, within {max_factor:g}x), {found}",
            )
        )
    return tuple(violations)
