"""The orientation score, the default detector it is part of, its presets and its score buckets."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import generate_latest

from detector.artifact import SCHEMA_VERSION, load_artifact
from detector.components.base import ForwardPass
from detector.components.hidden_knn import HIDDEN_KNN_FILE
from detector.components.hidden_mahalanobis import HIDDEN_GAUSSIAN_FILE
from detector.components.orientation import (
    DEFAULT_ORIENTATION_TRANSFORMS,
    ORIENTATION_HEAD_FILE,
    Orientation,
)
from detector.components.transforms import TRANSFORM_SET_SIZES, TRANSFORM_SETS, TransformSet, log_softmax
from detector.networks import DenseStack, TransformClassifier
from detector.score import DEFAULT_SCORE, Score
from detector.thresholds import score_buckets
from tests.conftest import mnist_sample
from trainer.config import DetectorConfig
from trainer.presets import PRESETS, resolve
from worker.metrics import SCORE_BUCKETS, WorkerMetrics


def _head(inputs: int, classes: int, seed: int = 0) -> TransformClassifier:
    rng = np.random.default_rng(seed)
    kernel = rng.normal(size=(inputs, classes)).astype(np.float32)
    return TransformClassifier((kernel,), (rng.normal(size=classes).astype(np.float32),), ("linear",))


def test_the_dihedral_set_is_every_rotation_and_its_mirror_image_identity_first() -> None:
    image = np.arange(16, dtype=np.float32).reshape(1, 16)  # no symmetry: all 8 differ
    dihedral = TransformSet.named("dihedral", 16)
    outputs = [dihedral.apply(image, t).ravel().tolist() for t in range(len(dihedral))]
    assert len(dihedral) == 8 and outputs[0] == image.ravel().tolist()
    assert len({tuple(o) for o in outputs}) == 8
    expected = {
        tuple(np.rot90(m, k).ravel())
        for m in (image.reshape(4, 4), image.reshape(4, 4)[:, ::-1])
        for k in range(4)
    }
    assert {tuple(o) for o in outputs} == expected


@pytest.mark.parametrize("name", TRANSFORM_SETS)
def test_the_set_sizes_known_without_an_image_are_the_sets_lengths(name: str) -> None:
    assert TRANSFORM_SET_SIZES[name] == len(TransformSet.named(name, 784))


def test_orientation_scores_minus_log_p_identity_of_the_first_encoder_layer() -> None:
    head = _head(6, 8)
    layer = np.random.default_rng(1).normal(size=(5, 6)).astype(np.float32)
    batch = ForwardPass(np.zeros((5, 16)), np.zeros((5, 16)), (layer, np.zeros((5, 2))))
    expected = -log_softmax(head.logits(layer))[:, 0]
    np.testing.assert_allclose(Orientation(head, "dihedral", 0).score(batch), expected)


def test_orientation_stays_finite_and_exact_for_logits_far_beyond_float32_exp() -> None:
    kernel = np.array([[400.0, -300.0, 0.0, 100.0]], np.float32)  # logits of +-400 for a layer of 1
    head = TransformClassifier((kernel,), (np.zeros(4, np.float32),), ("linear",))
    layer = np.array([[1.0], [-1.0], [0.0]], np.float32)
    batch = ForwardPass(np.zeros((3, 4)), np.zeros((3, 4)), (layer,))
    # -log p(identity): 0 when identity dominates, its gap to the largest logit when it does not.
    expected = [0.0, 300.0 + 400.0, np.log(4.0)]
    np.testing.assert_allclose(Orientation(head, "rotations", 0).score(batch), expected, rtol=1e-6, atol=1e-6)


def test_orientation_round_trips_through_its_parameters_and_file() -> None:
    component = Orientation(_head(6, 8), "dihedral", 0)
    rebuilt = Orientation.from_parameters(component.parameters(), component.file_bytes(), 16, "x.npz")
    assert rebuilt.parameters() == {"orientation_transforms": "dihedral", "orientation_layer": 0}
    np.testing.assert_array_equal(rebuilt.head.kernels[0], component.head.kernels[0])


def test_the_trainers_head_learns_the_geometric_set_by_default() -> None:
    assert DEFAULT_ORIENTATION_TRANSFORMS == "geometric" in TRANSFORM_SETS
    assert DetectorConfig().options.orientation.orientation_transforms == "geometric"


def test_stored_parameters_without_a_set_are_read_as_the_first_heads_dihedral_set() -> None:
    """What schema 1.3 artifacts meant before the set was required: the default changing since
    must not change how such a head is read."""
    rebuilt = Orientation.from_parameters({}, _head(6, 8).to_bytes(), 16, "h.npz")
    assert (rebuilt.transforms, rebuilt.layer) == ("dihedral", 0)


def test_a_head_with_the_wrong_number_of_logits_is_refused_naming_the_set() -> None:
    with pytest.raises(ValueError, match=r"gives 4 logits, expected 8 \(dihedral\)"):
        Orientation.from_parameters(
            {"orientation_transforms": "dihedral", "orientation_layer": 0},
            _head(6, 4).to_bytes(),
            16,
            "h.npz",
        )


def test_a_head_that_does_not_fit_the_layer_is_refused_naming_both_widths() -> None:
    batch = ForwardPass(np.zeros((2, 16)), np.zeros((2, 16)), (np.zeros((2, 5), np.float32),))
    with pytest.raises(ValueError, match="reads 6 values, encoder layer 0 gives 5"):
        Orientation(_head(6, 8), "dihedral", 0).score(batch)


def test_a_forward_pass_without_encoder_outputs_says_what_it_lacks() -> None:
    with pytest.raises(ValueError, match="needs the encoder's outputs"):
        _ = ForwardPass(np.zeros((1, 4)), np.zeros((1, 4))).codes


def test_one_pass_keeps_every_encoder_layer_and_reconstructs_as_the_plain_pass() -> None:
    rng = np.random.default_rng(2)
    sizes = [(16, 8), (8, 3), (3, 8), (8, 16)]
    stack = DenseStack(
        tuple(rng.normal(size=s).astype(np.float32) for s in sizes),
        tuple(rng.normal(size=s[1]).astype(np.float32) for s in sizes),
        ("relu", "relu", "relu", "sigmoid"),
        code_layer=1,
    )
    x = rng.random((7, 16)).astype(np.float32)
    recon, encoder = stack.reconstruct_keeping_encoder(x)
    np.testing.assert_array_equal(recon, stack.reconstruct(x))
    assert [e.shape for e in encoder] == [(7, 8), (7, 3)]
    np.testing.assert_array_equal(encoder[-1], stack.encode(x))


def test_score_buckets_spread_a_combined_scores_negative_values_and_include_the_threshold() -> None:
    scores = np.random.default_rng(3).normal(0.0, 2.0, 6000)  # a sum of z-scores: half negative
    threshold = float(np.quantile(scores, 0.99))
    buckets = score_buckets(scores, threshold)
    assert list(buckets) == sorted(set(buckets))
    assert sum(b < 0 for b in buckets) >= 4  # fixed 0.001 x 1.5^i buckets put them all in one
    assert float(f"{threshold:.4g}") in buckets
    assert buckets[0] < np.quantile(scores, 0.02) and buckets[-1] > threshold * 5


def test_score_buckets_of_an_mse_stay_positive_and_fine_near_its_small_values() -> None:
    mse = np.random.default_rng(4).gamma(4.0, 0.005, 5000)
    buckets = score_buckets(mse, float(np.mean(mse) + 3 * np.std(mse)))
    assert buckets[0] > 0 and sum(b < np.median(mse) for b in buckets) >= 4


def test_score_buckets_refuse_what_they_cannot_place() -> None:
    with pytest.raises(ValueError, match="finite scores and threshold"):
        score_buckets(np.array([np.nan]), 1.0)


def test_the_worker_histogram_takes_a_models_buckets_and_drops_the_old_ones() -> None:
    registry = CollectorRegistry()
    metrics = WorkerMetrics(registry, with_process=False)
    assert metrics.score_buckets == SCORE_BUCKETS
    metrics.set_model("v2", "p99", 3.0, 0.01, "numpy", score_buckets=(-2.5, -1.0, 0.0, 3.0, 9.0))
    metrics.observe_scores(np.array([-3.0, -2.0, -0.5, 4.0]))
    text = generate_latest(registry).decode()
    assert 'anomaly_score_bucket{le="-2.5"} 1.0' in text and 'anomaly_score_bucket{le="-1.0"} 2.0' in text
    assert 'anomaly_score_bucket{le="0.001"}' not in text  # the default buckets are gone, not kept
    metrics.set_model("v2", "p99", 3.0, 0.01, "numpy", score_buckets=(-2.5, -1.0, 0.0, 3.0, 9.0))
    assert registry.get_sample_value("anomaly_score_count") == 4.0  # the same buckets: kept


def test_flags_given_win_over_a_preset_and_the_rest_keeps_the_defaults() -> None:
    chosen = resolve("notebook-2mean", {"epochs": 3, "score": None})
    preset = {"architecture": "dense-32", "threshold": "2mean", "score": "mse", "min_steps": 0}
    assert chosen == DetectorConfig(**preset, epochs=3)
    assert resolve(None, {"epochs": None}) == DetectorConfig()
    with pytest.raises(
        ValueError, match="unknown preset 'notebook-9'; expected one of notebook-standardized"
    ):
        resolve("notebook-9", {})


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_is_a_detector_configuration_that_its_flags_give_back(name: str) -> None:
    from trainer.cli import build_parser, train_config

    def parsed(*flags: str) -> DetectorConfig:
        return train_config(build_parser().parse_args(["train", "--out", "/tmp/never", *flags]))

    assert parsed("--preset", name) == PRESETS[name] == parsed(*PRESETS[name].flags())


@pytest.mark.slow
def test_the_default_detector_is_the_orientation_score_with_its_buckets_recorded(
    default_artifact: Path,
) -> None:
    artifact = load_artifact(default_artifact)
    baseline = artifact.baseline
    assert baseline.schema_version == SCHEMA_VERSION == "1.7"
    assert (baseline.score, baseline.threshold.policy, baseline.training.architecture) == (
        DEFAULT_SCORE,
        "p99",
        "dense-64-16",
    )
    assert {ORIENTATION_HEAD_FILE, HIDDEN_KNN_FILE, HIDDEN_GAUSSIAN_FILE} <= set(artifact.manifest.files)
    params = baseline.score_parameters
    assert params is not None and params.orientation_transforms == "geometric"
    assert params.hidden_knn_k == 3 and params.hidden_knn_layer == 0
    assert params.hidden_mahalanobis_layer == 0
    assert baseline.score_buckets == list(
        score_buckets(artifact.calibration_errors, baseline.threshold.value)
    )


@pytest.mark.slow
def test_both_engines_score_the_default_detector_alike_and_as_calibrated(default_artifact: Path) -> None:
    from detector.engines.keras_engine import KerasScorer
    from detector.engines.numpy_engine import NumpyScorer
    from detector.loading import load_scorer

    artifact = load_artifact(default_artifact)
    x, _ = mnist_sample(300, seed=8)
    numpy_scores = NumpyScorer(artifact).score_batch(x)
    np.testing.assert_allclose(
        KerasScorer(artifact, max_batch=64, jit=False).score_batch(x), numpy_scores, rtol=1e-4, atol=1e-4
    )
    assert isinstance(artifact.score, Score) and artifact.score.needs_encoder
    # The stored held-out scores are what the served engine computes (the threshold means what it says).
    _, scorer = load_scorer(default_artifact, "numpy")
    assert scorer.score_batch(x[:8]).shape == (8,)


@pytest.mark.slow
def test_one_pass_gives_the_scores_and_the_squared_errors_of_two(default_artifact: Path) -> None:
    from detector.engines.keras_engine import KerasScorer
    from detector.engines.numpy_engine import NumpyScorer

    artifact = load_artifact(default_artifact)
    x, _ = mnist_sample(64, seed=9)
    for scorer in (NumpyScorer(artifact), KerasScorer(artifact, max_batch=64, jit=False)):
        scores, squared = scorer.score_with_squared_error(x)
        np.testing.assert_allclose(scores, scorer.score_batch(x), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(squared, scorer.squared_error(x), rtol=1e-5, atol=1e-7)
    assert x.min() >= 0.0  # the caller's images are left as they were
