"""Evaluation: metric helpers on known answers, scores, held-out thresholds, and a small real run."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from detector.artifact import load_artifact
from detector.components.mahalanobis import LatentGaussian, mahalanobis_distances
from detector.components.reconstruction import mse_scores, nmse_scores, top_k_scores
from detector.datasets import Dataset, Split
from detector.thresholds import flag_rate, parse_policy
from tests.conftest import mnist_sample
from trainer.config import DetectorConfig
from trainer.evaluate import (
    ROTATED_90,
    UNSEEN_CLASSES,
    anomaly_sets,
    auroc,
    average_precision,
    evaluate_artifact,
)
from trainer.splits import recover_splits
from trainer.train import train

# --- metric helpers on synthetic scores with known answers -------------------------------------


def test_auroc_is_one_when_every_anomaly_scores_higher() -> None:
    assert auroc(np.array([0.1, 0.2, 0.3]), np.array([0.4, 0.9])) == 1.0


def test_auroc_is_zero_when_the_score_is_upside_down() -> None:
    assert auroc(np.array([0.4, 0.9]), np.array([0.1, 0.2, 0.3])) == 0.0


def test_auroc_counts_ties_as_half() -> None:
    assert auroc(np.array([0.5, 0.5]), np.array([0.5, 0.5])) == 0.5


def test_auroc_is_the_share_of_anomaly_normal_pairs_ranked_right() -> None:
    rng = np.random.default_rng(0)
    normal, anomaly = rng.normal(0, 1, 300), rng.normal(1, 1, 200)
    pairs = (anomaly[:, None] > normal[None, :]).mean()
    assert auroc(normal, anomaly) == pytest.approx(pairs, abs=1e-12)


def test_average_precision_of_a_hand_ranked_example() -> None:
    # Ranked: 0.3 anomaly (precision 1/1), 0.2 normal, 0.15 anomaly (precision 2/3).
    assert average_precision(np.array([0.1, 0.2]), np.array([0.3, 0.15])) == pytest.approx((1 + 2 / 3) / 2)


def test_average_precision_of_a_random_score_is_the_anomaly_share() -> None:
    rng = np.random.default_rng(1)
    scores = rng.random(20000)
    assert average_precision(scores[:15000], scores[15000:]) == pytest.approx(0.25, abs=0.02)


def test_metrics_refuse_an_empty_set() -> None:
    with pytest.raises(ValueError, match="found 3 and 0"):
        auroc(np.ones(3), np.array([]))


# --- scores ---------------------------------------------------------------------------------


def test_top_k_score_finds_a_small_defect_that_mse_dilutes() -> None:
    x = np.zeros((2, 100), np.float32)
    recon = np.zeros((2, 100), np.float32)
    recon[1, 7] = 1.0  # one wrong pixel out of 100
    np.testing.assert_allclose(mse_scores(x, recon), [0.0, 0.01])
    np.testing.assert_allclose(top_k_scores(x, recon, 5.0), [0.0, 0.2])  # 5 largest of 100 pixels
    np.testing.assert_allclose(top_k_scores(x, recon, 0.5), [0.0, 1.0])  # at least one pixel


def test_nmse_weighs_an_error_by_how_much_ink_the_image_has() -> None:
    thin, thick = np.zeros((1, 100)), np.zeros((1, 100))
    thin[0, :5], thick[0, :50] = 1.0, 1.0
    # The same 5 pixels missed: the whole of the thin image, a tenth of the thick one.
    thin_recon, thick_recon = thin.copy(), thick.copy()
    thin_recon[0, :5], thick_recon[0, :5] = 0.0, 0.0
    assert mse_scores(thin, thin_recon)[0] == mse_scores(thick, thick_recon)[0]
    np.testing.assert_allclose(nmse_scores(thin, thin_recon, epsilon=0.0), [1.0])
    np.testing.assert_allclose(nmse_scores(thick, thick_recon, epsilon=0.0), [0.1])
    assert np.isfinite(nmse_scores(np.zeros((1, 100)), np.zeros((1, 100)))).all()  # blank image


def test_mahalanobis_distance_uses_the_normal_covariance() -> None:
    rng = np.random.default_rng(2)
    codes = rng.normal([5.0, -1.0], [2.0, 0.5], size=(20000, 2))
    gaussian = LatentGaussian.fit(codes)
    d = gaussian.distance(np.array([[5.0, -1.0], [9.0, -1.0], [5.0, 0.0]]))
    # 4 along the wide axis (std 2) and 1 along the narrow one (std 0.5) are both 2 std away.
    np.testing.assert_allclose(d, [0.0, 2.0, 2.0], atol=0.06)


def test_mahalanobis_distance_of_each_row_is_the_quadratic_form_of_its_offset() -> None:
    rng = np.random.default_rng(4)
    half = rng.normal(size=(16, 16))
    precision = half @ half.T + np.eye(16)  # correlated, symmetric, positive definite
    mean, codes = rng.normal(size=16), rng.normal(size=(300, 16)).astype(np.float32)
    expected = [np.sqrt((c - mean) @ precision @ (c - mean)) for c in codes.astype(np.float64)]
    np.testing.assert_allclose(mahalanobis_distances(codes, mean, precision), expected, rtol=1e-12)


# --- thresholds keep their promise on held-out data ---------------------------------------------


def test_fpr_policy_flags_its_rate_of_fresh_normal_scores() -> None:
    rng = np.random.default_rng(3)
    calibration, fresh = rng.gamma(2.0, 0.01, 4000), rng.gamma(2.0, 0.01, 40000)
    threshold = parse_policy("fpr=0.05").threshold(calibration)
    assert 0.05 - 2 / 4000 <= flag_rate(calibration, threshold) <= 0.05  # "higher": never above the rate
    assert flag_rate(fresh, threshold) == pytest.approx(0.05, abs=0.01)


# --- a small real run: digit 1 is normal ----------------------------------------------------------


@pytest.fixture(scope="module")
def digit_one(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Dataset]:
    """A dense-32 model trained 4 epochs on 1000 ones, calibrated with fpr=0.05 on 500 held out."""
    x, y = mnist_sample(27000, seed=5)
    dataset = Dataset("mnist-part", Split(x[:25000], y[:25000]), Split(x[25000:], y[25000:]), "test")
    out = tmp_path_factory.mktemp("evaluate") / "ones"
    config = DetectorConfig(
        classes=[1],
        architecture="dense-32",
        epochs=4,
        batch_size=32,
        learning_rate=3e-3,
        threshold="fpr=0.05",
        score="mse",
        seed=3,
        max_samples=2000,
        holdout_fraction=0.5,
    )
    train(config, dataset, out, report=False, progress=False)
    return out, dataset


def test_held_out_split_is_reproduced_from_the_seed(digit_one: tuple[Path, Dataset]) -> None:
    path, dataset = digit_one
    baseline = load_artifact(path).baseline
    splits = recover_splits(baseline, dataset)
    assert splits is not None
    assert (splits.fit.shape[0], splits.validation.shape[0], splits.calibration.shape[0]) == (1000, 500, 500)


def test_a_model_of_ones_separates_other_digits_and_rotated_ones(digit_one: tuple[Path, Dataset]) -> None:
    path, dataset = digit_one
    evaluation, *_ = evaluate_artifact(path, dataset)
    by_key = {(r.anomaly_set, r.score): r for r in evaluation.rows}
    assert {s for s, _ in by_key} == {UNSEEN_CLASSES, ROTATED_90}
    # Without a transformation classifier or orientation head in the artifact: every score that
    # needs neither (hidden-knn and hidden-mahalanobis fit their prototypes and Gaussian on the
    # fit split, as the trainer does).
    assert {s for _, s in by_key} == {
        "mse",
        "nmse",
        "top-k",
        "mahalanobis",
        "knn",
        "hidden-knn",
        "hidden-mahalanobis",
        "mse+knn",
        "mse+hidden-knn",
    }
    unseen = by_key[(UNSEEN_CLASSES, "mse")]
    assert unseen.auroc > 0.9  # far above chance (0.5) after 4 short epochs
    assert unseen.average_precision > 0.9  # chance would be the anomaly share, about 0.89
    assert by_key[(ROTATED_90, "mse")].auroc > 0.9  # a lying 1 is a bar, not a 1
    assert unseen.flagged_anomaly is not None and unseen.flagged_anomaly > 0.5
    assert unseen.normal_count == int((dataset.test.y == 1).sum())  # type: ignore[operator]


def test_fpr_threshold_flags_its_rate_of_the_other_held_out_normal_half(
    digit_one: tuple[Path, Dataset],
) -> None:
    """Calibrated on one held-out half; the other half (never used for the threshold) checks it."""
    from detector.engines.keras_engine import load_model_bytes
    from detector.preprocessing import scaling_of
    from trainer.models import reconstruction_errors

    path, dataset = digit_one
    artifact = load_artifact(path)
    assert flag_rate(artifact.calibration_errors, artifact.baseline.threshold.value) <= 0.05
    model = load_model_bytes(artifact.model_bytes, artifact)
    splits = recover_splits(artifact.baseline, dataset)
    assert splits is not None
    other_half = reconstruction_errors(model, scaling_of(artifact.baseline.preprocessing)(splits.validation))
    # 500 images: the binomial standard deviation at 5% is 1 point; allow 3 of them.
    assert flag_rate(other_half, artifact.baseline.threshold.value) == pytest.approx(0.05, abs=0.03)


def test_evaluating_on_other_data_is_refused(digit_one: tuple[Path, Dataset]) -> None:
    path, dataset = digit_one
    other = Dataset("mnist-part", Split(dataset.train.x[::-1], dataset.train.y), dataset.test, "reversed")
    with pytest.raises(ValueError, match="recomputed calibration errors differ"):
        evaluate_artifact(path, other)


# --- one way to score: evaluate computes what the worker serves ----------------------------------


@pytest.fixture(scope="module")
def default_detector(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Dataset]:
    """The default detector (its head, prototypes and Gaussian), trained 2 short epochs on 1,500 digits."""
    x, y = mnist_sample(2200, seed=13)
    dataset = Dataset("mnist-part", Split(x[:1500], y[:1500]), Split(x[1500:], y[1500:]), "test")
    out = tmp_path_factory.mktemp("evaluate") / "default"
    train(DetectorConfig(epochs=2, min_steps=0), dataset, out, report=False, progress=False)
    return out, dataset


def test_evaluate_gives_the_scores_the_worker_serves_for_the_same_artifact_and_images(
    default_detector: tuple[Path, Dataset],
) -> None:
    from runtime.settings import WorkerSettings
    from worker.loaded_model import load_model

    path, dataset = default_detector
    evaluation, compared, scores, _ = evaluate_artifact(path, dataset)
    own = load_artifact(path).baseline.score
    assert own == "mse+orientation+hidden-knn+hidden-mahalanobis"
    assert {r.score for r in evaluation.rows} >= {own, "mse", "orientation", "hidden-knn", "knn"}
    served = load_model(WorkerSettings(artifact=path, engine="numpy"))  # type: ignore[call-arg]
    normal, anomalies = anomaly_sets(dataset, None)
    for images, evaluated in [(normal, scores["normal"][own])] + [
        (anomalies[name], scores[name][own]) for name in anomalies
    ]:
        np.testing.assert_allclose(evaluated, served.scorer.score_batch(images), rtol=1e-5, atol=1e-5)
    # Every other compared score is a Score as well: the worker would compute it alike.
    hidden = compared.scores["hidden-knn"]
    batch = compared.forward(compared.scaling(normal))
    np.testing.assert_array_equal(scores["normal"]["hidden-knn"], hidden(batch))
