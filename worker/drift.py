"""Score drift: how far the distribution of recent scores has moved from the artifact's baseline.

The measure is the population stability index (PSI) of the most recent `window` scores against the
held-out normal scores the artifact was calibrated on (calibration_errors.npy):

    PSI = sum over bins of (recent share - baseline share) * ln(recent share / baseline share)

with `bins` bins cut at the baseline's quantiles (about equal baseline shares; tied quantiles of
a discrete score merge), both shares floored at 1e-4 so an empty bin stays finite. The usual
reading: below 0.1 no shift, 0.1 to 0.25 a moderate one, above 0.25 a large one. PSI was chosen
over a KS statistic because it is cheap per batch (a searchsorted and a bincount over a fixed
number of bins, kept as running counts) and sees a shift anywhere in the distribution, not only
where the two CDFs differ most. Pure numpy, no clock: the caller feeds each batch's scores.
"""

from __future__ import annotations

import math

import numpy as np

DEFAULT_BINS = 10
SHARE_FLOOR = 1e-4


class ScoreDrift:
    """PSI of the last `window` scores against a baseline sample; NaN until the window is full."""

    def __init__(self, baseline: np.ndarray, window: int, bins: int = DEFAULT_BINS) -> None:
        values = np.sort(np.asarray(baseline, np.float64).ravel())
        values = values[np.isfinite(values)]
        if values.size < bins:
            raise ValueError(f"score drift needs at least {bins} baseline scores, found {values.size}")
        if window < bins:
            raise ValueError(f"score drift window must hold at least {bins} scores, found {window}")
        inner = np.quantile(values, np.arange(1, bins) / bins)
        self.edges = np.unique(inner)  # bin i holds edges[i-1] < s <= edges[i]
        self.n_bins = self.edges.size + 1
        self.baseline_share = np.maximum(self._counts(values) / values.size, SHARE_FLOOR)
        self.window = window
        self._ring = np.zeros(window, np.intp)  # bin index of each of the last `window` scores
        self._seen = 0
        self._counts_now = np.zeros(self.n_bins, np.int64)

    def _bin_of(self, scores: np.ndarray) -> np.ndarray:
        return np.searchsorted(self.edges, scores, side="left")

    def _counts(self, scores: np.ndarray) -> np.ndarray:
        return np.bincount(self._bin_of(scores), minlength=self.n_bins)

    def add(self, scores: np.ndarray) -> float:
        """Take one batch's scores (NaN ones are skipped); return the PSI of the current window."""
        values = np.asarray(scores, np.float64).ravel()
        values = values[~np.isnan(values)][-self.window :]
        n = values.size
        if n:
            start = self._seen % self.window
            positions = (start + np.arange(n)) % self.window
            filled = min(self._seen, self.window)
            evicted = max(0, filled + n - self.window)  # the oldest ones these positions overwrite
            if evicted:
                self._counts_now -= np.bincount(self._ring[positions[-evicted:]], minlength=self.n_bins)
            new_bins = self._bin_of(values)
            self._ring[positions] = new_bins
            self._counts_now += np.bincount(new_bins, minlength=self.n_bins)
            self._seen += n
        return self.value()

    def value(self) -> float:
        """PSI of the last `window` scores, NaN while fewer have been seen."""
        if self._seen < self.window:
            return math.nan
        recent = np.maximum(self._counts_now / self.window, SHARE_FLOOR)
        return float(np.sum((recent - self.baseline_share) * np.log(recent / self.baseline_share)))


def population_stability_index(baseline: np.ndarray, recent: np.ndarray, bins: int = DEFAULT_BINS) -> float:
    """PSI of a whole sample against a baseline, the same measure the worker exports."""
    drift = ScoreDrift(baseline, window=max(bins, np.asarray(recent).size), bins=bins)
    return drift.add(recent)
