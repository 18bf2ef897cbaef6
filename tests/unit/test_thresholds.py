"""Threshold policies: the reference notebooks' rules and a target false-positive rate."""

from __future__ import annotations

import numpy as np
import pytest

from detector.errors import ThresholdPolicyError
from detector.thresholds import flag_rate, p_values, parse_policy

ERRORS = np.random.default_rng(0).gamma(2.0, 0.01, 20_000)


def test_mean_plus_3std_is_the_three_sigma_rule() -> None:
    assert parse_policy("mean+3std").threshold(ERRORS) == pytest.approx(ERRORS.mean() + 3 * ERRORS.std())


def test_general_forms_parse() -> None:
    assert parse_policy("mean+2.5std").threshold(ERRORS) == pytest.approx(ERRORS.mean() + 2.5 * ERRORS.std())
    assert parse_policy("2mean").threshold(ERRORS) == pytest.approx(2 * ERRORS.mean())
    assert parse_policy("1.5mean").threshold(ERRORS) == pytest.approx(1.5 * ERRORS.mean())
    assert parse_policy("p95").threshold(ERRORS) == pytest.approx(np.percentile(ERRORS, 95))
    assert parse_policy("p99.9").threshold(ERRORS) == pytest.approx(np.percentile(ERRORS, 99.9))


@pytest.mark.parametrize("rate", [0.1, 0.05, 0.01])
def test_fpr_policy_flags_about_the_promised_share_of_normal_data(rate: float) -> None:
    rng = np.random.default_rng(1)
    calibration, fresh = rng.gamma(2.0, 0.01, 20_000), rng.gamma(2.0, 0.01, 200_000)
    threshold = parse_policy(f"fpr={rate}").threshold(calibration)
    assert flag_rate(calibration, threshold) <= rate
    assert flag_rate(fresh, threshold) == pytest.approx(rate, rel=0.15)


def test_fpr_policy_is_refused_when_held_out_set_is_too_small() -> None:
    with pytest.raises(ThresholdPolicyError, match=r"needs at least 1000 held-out errors .* found 500"):
        parse_policy("fpr=0.01").threshold(ERRORS[:500])


@pytest.mark.parametrize("text", ["mean+std", "p100", "p0", "fpr=1.5", "fpr=0", "0mean", "median", ""])
def test_unknown_or_impossible_policies_are_refused_with_the_forms_listed(text: str) -> None:
    with pytest.raises(ThresholdPolicyError) as info:
        parse_policy(text)
    assert repr(text) in str(info.value) or text.replace(" ", "") in str(info.value)


def test_policy_text_is_normalised() -> None:
    assert parse_policy(" Mean + 3std ").text == "mean+3std"


def test_p_value_is_share_of_held_out_errors_at_least_as_large() -> None:
    sorted_errors = np.array([1.0, 2.0, 3.0, 4.0])
    np.testing.assert_allclose(p_values(sorted_errors, np.array([0.5, 2.0, 4.5])), [5 / 5, 4 / 5, 1 / 5])


def test_p_values_of_normal_data_are_roughly_uniform() -> None:
    rng = np.random.default_rng(3)
    cal = np.sort(rng.normal(size=5000))
    p = p_values(cal, rng.normal(size=5000))
    assert abs((p <= 0.05).mean() - 0.05) < 0.015


def test_kmean_is_refused_for_a_combined_score_centred_on_zero() -> None:
    from detector.thresholds import check_policy_fits_score

    with pytest.raises(ThresholdPolicyError, match=r"'2mean' .* score 'mse\+knn' is a sum of standardised"):
        check_policy_fits_score(parse_policy("2mean"), "mse+knn")
    check_policy_fits_score(parse_policy("2mean"), "mse")  # a positive score: fine
    check_policy_fits_score(parse_policy("mean+3std"), "mse+knn")
