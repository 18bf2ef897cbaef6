"""Threshold policies: a policy string + held-out normal errors -> a threshold value.

Policies (general forms in brackets):
  mean+3std  [mean+Kstd]   the 3-sigma rule
  2mean      [Kmean]       twice the mean held-out error
  p95        [pNN, pNN.N]  the NN-th percentile of held-out errors
  fpr=0.01   [fpr=F]       the (1-F) quantile: about F of normal images are flagged
Pure numpy: the worker recomputes a threshold from the artifact's stored errors without retraining.
`calibrate` is the trainer's side: held-out normal scores -> the statistics, threshold and
`anomaly_score` histogram buckets (`score_buckets`) the artifact stores.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np

from detector.artifact import Statistics, Threshold
from detector.errors import ThresholdPolicyError

# A target FPR needs enough held-out errors above its quantile to be estimated at all.
MIN_EXCEEDANCES_FOR_FPR = 10

_MEAN_STD = re.compile(r"^mean\+(\d+(?:\.\d+)?)std$")
_K_MEAN = re.compile(r"^(\d+(?:\.\d+)?)mean$")
_PERCENTILE = re.compile(r"^p(\d+(?:\.\d+)?)$")
_FPR = re.compile(r"^fpr=(0?\.\d+|\d+(?:\.\d+)?e-\d+)$")


@dataclass(frozen=True)
class ThresholdPolicy:
    """A parsed policy: `kind` is mean_std | k_mean | percentile | fpr, `k` its number."""

    kind: str
    k: float
    text: str

    def threshold(self, errors: np.ndarray) -> float:
        """The threshold this policy gives for held-out normal `errors` (1-D)."""
        values = np.asarray(errors, dtype=np.float64).ravel()
        if values.size == 0:
            raise ThresholdPolicyError(f"policy {self.text!r} needs held-out errors, found none")
        if self.kind == "mean_std":
            return float(values.mean() + self.k * values.std())
        if self.kind == "k_mean":
            return float(self.k * values.mean())
        if self.kind == "percentile":
            return float(np.percentile(values, self.k))
        # fpr
        needed = math.ceil(MIN_EXCEEDANCES_FOR_FPR / self.k)
        if values.size < needed:
            raise ThresholdPolicyError(
                f"policy {self.text!r} needs at least {needed} held-out errors "
                f"({MIN_EXCEEDANCES_FOR_FPR} expected above the threshold), found {values.size}; "
                "use a larger held-out split or a larger rate"
            )
        return float(np.quantile(values, 1.0 - self.k, method="higher"))


def parse_policy(text: str) -> ThresholdPolicy:
    """Parse `mean+3std`, `2mean`, `p95`, `fpr=0.01` (and their general forms)."""
    raw = text.strip().lower().replace(" ", "")
    if m := _MEAN_STD.match(raw):
        return ThresholdPolicy("mean_std", float(m.group(1)), raw)
    if m := _K_MEAN.match(raw):
        k = float(m.group(1))
        if k <= 0:
            raise ThresholdPolicyError(f"policy {text!r}: K in Kmean must be > 0, found {k}")
        return ThresholdPolicy("k_mean", k, raw)
    if m := _PERCENTILE.match(raw):
        q = float(m.group(1))
        if not 0 < q < 100:
            raise ThresholdPolicyError(f"policy {text!r}: percentile must be in (0, 100), found {q}")
        return ThresholdPolicy("percentile", q, raw)
    if m := _FPR.match(raw):
        rate = float(m.group(1))
        if not 0 < rate < 1:
            raise ThresholdPolicyError(f"policy {text!r}: rate must be in (0, 1), found {rate}")
        return ThresholdPolicy("fpr", rate, raw)
    raise ThresholdPolicyError(
        f"unknown threshold policy {text!r}; expected one of mean+Kstd (e.g. mean+3std), "
        "Kmean (e.g. 2mean), pNN (e.g. p95), fpr=F (e.g. fpr=0.01)"
    )


def check_policy_fits_score(policy: ThresholdPolicy, score: str) -> None:
    """Refuse Kmean for a combined score (a+b): a sum of z-scores is centred on 0, so K times its
    mean is a threshold near 0 that flags about half of normal images."""
    if policy.kind == "k_mean" and "+" in score:
        raise ThresholdPolicyError(
            f"policy {policy.text!r} scales the mean held-out score, but score {score!r} is a sum "
            "of standardised scores with mean about 0; expected mean+Kstd, pNN or fpr=F"
        )


def flag_rate(errors: np.ndarray, threshold: float) -> float:
    """Share of `errors` strictly above `threshold` (the worker flags score > threshold)."""
    values = np.asarray(errors).ravel()
    return float((values > threshold).mean()) if values.size else 0.0


def p_values(sorted_errors: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """Conformal p-value of each score: (1 + #held-out errors >= score) / (n + 1)."""
    n = sorted_errors.size
    at_least = n - np.searchsorted(sorted_errors, scores, side="left")
    return (at_least + 1.0) / (n + 1.0)


def calibrate(scores: np.ndarray, policy: ThresholdPolicy) -> tuple[Statistics, Threshold]:
    """The statistics of held-out normal `scores` and the threshold `policy` gives them."""
    value = policy.threshold(scores)
    threshold = Threshold(policy=policy.text, value=value, expected_flag_rate=flag_rate(scores, value))
    return Statistics.of(scores), threshold


# Where the anomaly_score histogram's buckets end: quantiles of held-out normal scores, the
# threshold, then the threshold plus multiples of its distance above the median (the anomalies).
BUCKET_QUANTILES = (0.01, 0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99, 0.999)
BUCKET_BEYOND_THRESHOLD = (0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0)


def score_buckets(scores: np.ndarray, threshold: float) -> tuple[float, ...]:
    """Upper bounds for the anomaly_score histogram that fit this score, negative values included.

    Fixed buckets (0.001 x 1.5^i) put every negative value of a combined score in the first one
    and most of an mse's range in three; these follow the held-out normal scores instead. Bounds
    are rounded to 4 significant digits, so `le` labels stay readable."""
    values = np.asarray(scores, np.float64).ravel()
    values = values[np.isfinite(values)]
    if not values.size or not math.isfinite(threshold):
        raise ValueError(
            f"score buckets need finite scores and threshold, found {values.size} and {threshold}"
        )
    median = float(np.median(values))
    spread = threshold - median if threshold > median else max(float(np.std(values)), 1e-9)
    bounds = [
        *np.quantile(values, BUCKET_QUANTILES).tolist(),
        threshold,
        *(threshold + k * spread for k in BUCKET_BEYOND_THRESHOLD),
    ]
    return tuple(sorted({float(f"{b:.4g}") for b in bounds}))
