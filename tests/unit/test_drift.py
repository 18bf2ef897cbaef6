"""Score drift (PSI of recent scores against the artifact's held-out normal scores): low on normal
traffic, high when the input changes, on synthetic samples and on real digits."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from detector.artifact import load_artifact
from detector.engines.numpy_engine import NumpyScorer
from tests.conftest import SHARED_DATASETS
from worker.drift import ScoreDrift, population_stability_index

LOW, HIGH = 0.1, 0.25  # the usual reading of a PSI; the alert fires above HIGH


def baseline(n: int = 5000, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).lognormal(-4, 0.5, n)


def test_scores_from_the_baseline_distribution_show_no_drift() -> None:
    assert population_stability_index(baseline(), baseline(seed=1)[:2000]) < 0.02


def test_scores_shifted_upwards_show_large_drift() -> None:
    assert population_stability_index(baseline(), 1.5 * baseline(seed=1)[:2000]) > HIGH


def test_a_narrower_distribution_with_the_same_median_is_drift_too() -> None:
    base = baseline()
    narrow = np.median(base) * np.random.default_rng(1).lognormal(0, 0.1, 2000)
    assert population_stability_index(base, narrow) > HIGH


def test_drift_is_nan_until_the_window_is_full_then_a_number() -> None:
    drift = ScoreDrift(baseline(), window=100)
    assert math.isnan(drift.add(baseline(seed=1)[:60]))
    assert not math.isnan(drift.add(baseline(seed=2)[:40]))


def test_the_window_forgets_old_scores() -> None:
    drift = ScoreDrift(baseline(), window=500)
    assert drift.add(3 * baseline(seed=1)[:500]) > HIGH
    assert drift.add(baseline(seed=2)[:500]) < LOW  # the shifted ones have left the window


def test_nan_scores_are_skipped_and_a_discrete_baseline_still_works() -> None:
    drift = ScoreDrift(np.repeat([0.0, 1.0, 2.0], 100), window=30)
    value = drift.add(np.r_[np.repeat([0.0, 1.0, 2.0], 10), np.nan])
    assert value == pytest.approx(0.0, abs=1e-9)


def test_too_small_a_baseline_or_window_is_refused_naming_the_numbers() -> None:
    with pytest.raises(ValueError, match="at least 10 baseline scores, found 3"):
        ScoreDrift(np.ones(3), window=100)
    with pytest.raises(ValueError, match="at least 10 scores, found 5"):
        ScoreDrift(baseline(), window=5)


@settings(max_examples=60, deadline=None)
@given(
    window=st.integers(10, 200),
    batches=st.lists(st.integers(0, 300), min_size=1, max_size=12),
    seed=st.integers(0, 1000),
)
def test_the_running_window_equals_a_fresh_count_of_the_last_scores(
    window: int, batches: list[int], seed: int
) -> None:
    rng = np.random.default_rng(seed)
    base = baseline()
    drift = ScoreDrift(base, window=window)
    seen: list[float] = []
    value = math.nan
    for size in batches:
        batch = rng.lognormal(-4, rng.uniform(0.3, 1.0), size)
        value = drift.add(batch)
        seen.extend(batch.tolist())
    if len(seen) < window:
        assert math.isnan(value)
    else:
        fresh = ScoreDrift(base, window=window)
        assert value == pytest.approx(fresh.add(np.asarray(seen[-window:])), abs=1e-12)


# ---- real digits: the tiny artifact's scores of MNIST test digits and of changed inputs


@pytest.fixture(scope="module")
def scored(tiny_artifact: Path) -> tuple[np.ndarray, NumpyScorer]:
    artifact = load_artifact(tiny_artifact)
    return artifact.calibration_errors, NumpyScorer(artifact)


@pytest.fixture(scope="module")
def digits() -> np.ndarray:
    from detector.datasets import load_dataset

    return load_dataset("mnist").test.x[:2000]


def test_normal_test_digits_show_low_drift(scored, digits: np.ndarray) -> None:
    calibration, scorer = scored
    assert population_stability_index(calibration, scorer.score_batch(digits)) < LOW


@pytest.mark.parametrize("change", ["rotated 90 degrees", "heavy noise", "inverted"])
def test_changed_digits_show_high_drift(scored, digits: np.ndarray, change: str) -> None:
    from detector.datasets import rotate90

    calibration, scorer = scored
    noise = np.random.default_rng(0).normal(0, 0.3, digits.shape)
    changed = {
        "rotated 90 degrees": rotate90(digits),
        "heavy noise": np.clip(digits + noise, 0, 1).astype(np.float32),
        "inverted": 1 - digits,
    }[change]
    assert population_stability_index(calibration, scorer.score_batch(changed)) > HIGH


@pytest.mark.skipif(
    not (SHARED_DATASETS / "fashion-mnist").is_dir(), reason="../shared/datasets is not beside the repo"
)
def test_another_dataset_shows_high_drift(scored) -> None:
    from detector.datasets import load_dataset

    calibration, scorer = scored
    items = load_dataset("fashion-mnist", SHARED_DATASETS).test.x[:2000]
    assert population_stability_index(calibration, scorer.score_batch(items)) > HIGH
