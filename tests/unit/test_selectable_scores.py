"""A score chosen at training (--score) is calibrated, stored and computed by the worker alike."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from detector.artifact import BASELINE_FILE, load_artifact
from detector.components.knn import Knn
from detector.components.transforms import Transforms
from detector.engines.keras_engine import KerasScorer
from detector.engines.numpy_engine import NumpyScorer
from tests.conftest import mnist_sample

ALTERNATIVES = [
    "nmse",
    "top-k",
    "mahalanobis",
    "transforms",
    "knn",
    "hidden-knn",
    "nmse+transforms",
    "mse+transforms+knn",
]


def _sample_dataset():  # type: ignore[no-untyped-def]
    from detector.datasets import Dataset, Split

    x, y = mnist_sample(2500, seed=11)
    return Dataset("mnist-sample", Split(x[:2000], y[:2000]), Split(x[2000:], y[2000:]), "test")


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One tiny artifact per alternative score, same data and seed."""
    from trainer.config import DetectorConfig
    from trainer.train import train

    dataset = _sample_dataset()
    out: dict[str, Path] = {}
    for score in ALTERNATIVES:
        path = tmp_path_factory.mktemp("scores") / score
        config = DetectorConfig.of(
            architecture="dense-32",
            epochs=2,
            batch_size=128,
            seed=3,
            score=score,  # type: ignore[arg-type]
            transforms="rotations",  # the 4-transformation set: quick to train and to score
            transform_epochs=2,
            hidden_knn_k=2,  # not the defaults (3 of 256): the flags reach the artifact
            hidden_knn_prototypes=64,
        )
        out[score] = train(config, dataset, path, report=False, progress=False).artifact
    return out


def test_the_hidden_knn_artifact_keeps_the_prototypes_and_k_it_was_trained_with(
    trained: dict[str, Path],
) -> None:
    hidden = [score for score in ALTERNATIVES if "hidden-knn" in score]
    assert hidden
    for score in hidden:
        artifact = load_artifact(trained[score])
        assert artifact.baseline.score_parameters is not None
        assert artifact.baseline.score_parameters.hidden_knn_k == 2
        component = artifact.score.component("hidden-knn")
        assert component is not None and component.prototypes.shape == (64, 32)  # dense-32's first layer


@pytest.mark.parametrize("score", ALTERNATIVES)
def test_both_engines_compute_the_score_the_threshold_was_calibrated_on(
    trained: dict[str, Path], score: str
) -> None:
    from trainer.splits import recover_splits

    artifact = load_artifact(trained[score])
    assert artifact.baseline.score == score
    splits = recover_splits(artifact.baseline, _sample_dataset())
    assert splits is not None
    for scorer in (NumpyScorer(artifact), KerasScorer(artifact, max_batch=64)):
        recomputed = np.sort(scorer.score_batch(splits.calibration))
        np.testing.assert_allclose(recomputed, artifact.calibration_errors, rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize("score", ALTERNATIVES)
def test_alternative_scores_rank_rotated_digits_above_upright_ones(
    trained: dict[str, Path], score: str
) -> None:
    from detector.datasets import rotate90

    x, _ = mnist_sample(400, seed=12)
    scorer = NumpyScorer(load_artifact(trained[score]))
    assert np.median(scorer.score_batch(rotate90(x))) > np.median(scorer.score_batch(x))


def test_mahalanobis_stores_the_normal_code_gaussian(trained: dict[str, Path]) -> None:
    baseline = load_artifact(trained["mahalanobis"]).baseline
    params = baseline.score_parameters
    assert params is not None and params.latent_mean is not None and params.latent_precision is not None
    assert len(params.latent_mean) == baseline.latent_dim == 32
    precision = np.asarray(params.latent_precision)
    np.testing.assert_allclose(precision, precision.T, atol=1e-8)  # a valid inverse covariance
    assert np.linalg.eigvalsh(precision).min() > 0


def test_an_mse_artifact_stays_readable_by_a_1_0_worker(tiny_artifact: Path) -> None:
    raw = json.loads((tiny_artifact / BASELINE_FILE).read_text())
    assert raw["score"] == "mse" and "score_parameters" not in raw


def test_mahalanobis_without_its_gaussian_is_refused(trained: dict[str, Path], tmp_path: Path) -> None:
    import shutil

    from detector.errors import ArtifactError
    from tests.unit.test_artifact import _rewrite

    path = tmp_path / "broken"
    shutil.copytree(trained["mahalanobis"], path)
    _rewrite(path, BASELINE_FILE, lambda d: d.pop("score_parameters"))
    with pytest.raises(ArtifactError, match=r"needs score_parameters\.latent_mean and latent_precision"):
        load_artifact(path)


def test_an_nmse_artifact_stays_readable_by_a_1_1_worker(trained: dict[str, Path]) -> None:
    raw = json.loads((trained["nmse"] / BASELINE_FILE).read_text())
    assert set(raw["score_parameters"]) == {"top_k_percent", "nmse_epsilon"}


def test_a_combined_score_is_standardised_on_the_validation_split(trained: dict[str, Path]) -> None:
    from detector.components.knn import knn_distances, unit_rows
    from detector.components.reconstruction import mse_scores
    from trainer.splits import recover_splits

    artifact = load_artifact(trained["mse+transforms+knn"])
    params = artifact.baseline.score_parameters
    assert params is not None and params.transforms == "rotations" and params.knn_k == 5
    assert params.combine_mean is not None and params.combine_std is not None
    splits = recover_splits(artifact.baseline, _sample_dataset())
    assert splits is not None
    transforms, knn = artifact.score.component("transforms"), artifact.score.component("knn")
    assert isinstance(transforms, Transforms) and isinstance(knn, Knn) and artifact.dense_stack is not None
    knn_reference = knn.reference
    # Fewer than 10,000 fit images: all of them, kept as unit rows (cosine needs only directions).
    np.testing.assert_allclose(knn_reference, unit_rows(splits.fit), atol=1e-6)
    v = splits.validation
    parts = (
        mse_scores(v, artifact.dense_stack.reconstruct(v)),
        transforms.scorer(v),
        knn_distances(v, knn_reference, 5),
    )
    np.testing.assert_allclose(params.combine_mean, [p.mean() for p in parts], rtol=1e-3)
    np.testing.assert_allclose(params.combine_std, [p.std() for p in parts], rtol=1e-3)


@pytest.mark.parametrize(
    ("score", "file", "change", "expected"),
    [
        (  # the reference images left out
            "knn",
            "manifest.json",
            lambda d: d["files"].pop("knn_reference.npy"),
            r"score 'knn' needs knn_reference\.npy",
        ),
        (  # the classifier left out
            "transforms",
            "manifest.json",
            lambda d: d["files"].pop("transform_classifier.npz"),
            r"score 'transforms' needs transform_classifier\.npz",
        ),
        (  # a classifier of 4 rotations said to tell apart the 72 geometric transformations
            "transforms",
            BASELINE_FILE,
            lambda d: d["score_parameters"].update(transforms="geometric"),
            r"to 4 transformations, expected 784 to 72 \(geometric\)",
        ),
        (  # the prototypes left out
            "hidden-knn",
            "manifest.json",
            lambda d: d["files"].pop("hidden_knn_prototypes.npy"),
            r"score 'hidden-knn' needs hidden_knn_prototypes\.npy",
        ),
        (  # one std short
            "mse+transforms+knn",
            BASELINE_FILE,
            lambda d: d["score_parameters"]["combine_std"].pop(),
            r"has 3 components, found 3 combine_mean and 2 combine_std",
        ),
    ],
    ids=[
        "knn-without-reference",
        "transforms-without-classifier",
        "classifier-of-another-set",
        "hidden-knn-without-prototypes",
        "std-short",
    ],
)
def test_an_artifact_missing_what_its_score_needs_is_refused(
    trained: dict[str, Path], tmp_path: Path, score: str, file: str, change: Any, expected: str
) -> None:
    import shutil

    from detector.errors import ArtifactError
    from tests.unit.test_artifact import _rewrite

    path = tmp_path / "broken"
    shutil.copytree(trained[score], path)
    _rewrite(path, file, change)
    with pytest.raises(ArtifactError, match=expected):
        load_artifact(path)


def test_a_worker_refuses_kmean_for_a_combined_score_but_switches_to_a_quantile(
    trained: dict[str, Path],
) -> None:
    from detector.errors import ThresholdPolicyError
    from worker.scoring import DecisionRule

    artifact = load_artifact(trained["mse+transforms+knn"])
    with pytest.raises(ThresholdPolicyError, match=r"expected mean\+Kstd, pNN or fpr=F"):
        DecisionRule.from_artifact(artifact, "2mean")
    rule = DecisionRule.from_artifact(artifact, "p95")
    assert rule.expected_flag_rate == pytest.approx(0.05, abs=0.01)


def _replace_signed(path: Path, name: str, data: bytes) -> None:
    """Overwrite an artifact file and re-sign the manifest, as a careless tool would."""
    import hashlib

    (path / name).write_bytes(data)
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["files"][name] = hashlib.sha256(data).hexdigest()
    (path / "manifest.json").write_text(json.dumps(manifest))


def _npy(array: np.ndarray) -> bytes:
    import io

    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("array", "expected"),
    [
        (np.zeros((10, 783), np.float32), r"shape \(10, 783\), expected \(n, 784\) with n >= knn_k 5"),
        (np.zeros((3, 784), np.float32), r"shape \(3, 784\), expected \(n, 784\) with n >= knn_k 5"),
        (np.zeros((10, 784), np.int64), r"must hold finite floats, found dtype int64"),
        (np.full((10, 784), np.nan, np.float32), r"must hold finite floats"),
    ],
)
def test_a_bad_knn_reference_is_refused_naming_the_file(
    trained: dict[str, Path], tmp_path: Path, array: np.ndarray, expected: str
) -> None:
    import shutil

    from detector.errors import ArtifactError

    path = tmp_path / "bad-reference"
    shutil.copytree(trained["knn"], path)
    _replace_signed(path, "knn_reference.npy", _npy(array))
    with pytest.raises(ArtifactError, match=expected) as refused:
        load_artifact(path)
    assert str(path / "knn_reference.npy") in str(refused.value)


def test_a_corrupt_transformation_classifier_is_refused_naming_the_file(
    trained: dict[str, Path], tmp_path: Path
) -> None:
    import shutil

    from detector.errors import ArtifactError

    path = tmp_path / "bad-classifier"
    shutil.copytree(trained["transforms"], path)
    _replace_signed(path, "transform_classifier.npz", b"PK\x03\x04 not really a zip")
    with pytest.raises(ArtifactError, match=r"transform_classifier\.npz is not a readable \.npz file"):
        load_artifact(path)


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"score": "transforms"}, r"need square images .* found D=780"),
        ({"score": "mse+knn", "knn_k": 50, "knn_reference": 20}, r"--knn-k 50 needs at least"),
        (
            {"score": "mse+hidden-knn", "hidden_knn_k": 9, "hidden_knn_prototypes": 8},
            r"--hidden-knn-k 9 needs at least as many prototypes, found --hidden-knn-prototypes 8",
        ),
        ({"score": "mse+knn", "threshold": "2mean"}, r"'2mean' scales the mean held-out score"),
        (
            {"score": "mse+hidden-knn", "architecture": "conv"},
            r"the hidden-knn score needs a dense architecture \(dense-32, .*\), found conv",
        ),
        (
            {"score": "mse+orientation", "architecture": "conv"},
            r"the orientation score needs a dense architecture \(dense-32, .*\), found conv",
        ),
        (  # it reads the encoder's first layer too: on a conv encoder that would be the latent code
            {"score": "mse+hidden-mahalanobis", "architecture": "conv"},
            r"the hidden-mahalanobis score needs a dense architecture \(dense-32, .*\), found conv",
        ),
    ],
)
def test_settings_a_score_cannot_use_fail_before_any_training(
    tmp_path: Path, changes: dict[str, object], expected: str
) -> None:
    from unittest import mock

    from detector.datasets import Dataset, Split
    from trainer.config import DetectorConfig
    from trainer.train import train

    x = np.random.default_rng(0).random((300, 780 if changes["score"] == "transforms" else 784), np.float32)
    dataset = Dataset("random", Split(x[:250], None), Split(x[250:], None), "test")
    config = DetectorConfig.of(**changes)
    trained_anyway = AssertionError("trained anyway")
    with (
        mock.patch("trainer.pipeline.build_model", side_effect=trained_anyway),
        pytest.raises(ValueError, match=expected),
    ):
        train(config, dataset, tmp_path / "never", report=False, progress=False)
