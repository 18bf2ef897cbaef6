"""Scoring: both engines match Keras, padding changes nothing, decisions are right."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from detector.artifact import MANIFEST_FILE, load_artifact
from detector.engines.keras_engine import KerasScorer
from detector.engines.numpy_engine import NumpyScorer
from detector.errors import ArtifactError
from detector.loading import Scorer, make_scorer
from detector.networks import DENSE_STACK_FILE
from tests.conftest import mnist_sample
from worker.scoring import DecisionRule

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def keras_scorer(tiny_artifact: Path) -> KerasScorer:
    return KerasScorer(load_artifact(tiny_artifact), max_batch=64)


@pytest.fixture(scope="module", params=["numpy", "tensorflow"])
def scorer(request: pytest.FixtureRequest, tiny_artifact: Path, keras_scorer: KerasScorer) -> Scorer:
    if request.param == "tensorflow":
        return keras_scorer
    return NumpyScorer(load_artifact(tiny_artifact))


def without_dense_stack(artifact: Path, out: Path) -> Path:
    """A copy of the artifact as a trainer before schema 1.1 (or a conv model) would write it."""
    shutil.copytree(artifact, out)
    (out / DENSE_STACK_FILE).unlink()
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    del manifest["files"][DENSE_STACK_FILE]
    (out / MANIFEST_FILE).write_text(json.dumps(manifest))
    return out


def test_scores_match_keras_predict(scorer: Scorer, keras_scorer: KerasScorer) -> None:
    x, _ = mnist_sample(300, seed=9)
    expected = np.mean(np.square(x - keras_scorer.model.predict(x, verbose=0)), axis=1)
    np.testing.assert_allclose(scorer.score_batch(x), expected, rtol=1e-4, atol=1e-7)


def test_trained_dense_models_ship_a_dense_stack_and_auto_uses_numpy(tiny_artifact: Path) -> None:
    artifact = load_artifact(tiny_artifact)
    assert artifact.dense_stack is not None
    assert artifact.dense_stack.input_dim == 784 and artifact.dense_stack.latent_dim == 32
    assert make_scorer(artifact).engine == "numpy"
    assert make_scorer(artifact, "tensorflow", max_batch=8).engine == "tensorflow"


def test_an_artifact_without_dense_stack_is_scored_by_tensorflow(tiny_artifact: Path, tmp_path: Path) -> None:
    artifact = load_artifact(without_dense_stack(tiny_artifact, tmp_path / "old"))
    assert artifact.dense_stack is None
    assert make_scorer(artifact, "auto", max_batch=8).engine == "tensorflow"
    with pytest.raises(ArtifactError, match=r"has no dense_stack\.npz.*ANOMALY_ENGINE=tensorflow"):
        make_scorer(artifact, "numpy")


def test_the_numpy_engine_never_imports_tensorflow(tiny_artifact: Path) -> None:
    code = (
        "import sys\n"
        "from worker.loaded_model import load_model\n"
        "from runtime.settings import WorkerSettings\n"
        f"model = load_model(WorkerSettings(artifact={str(tiny_artifact)!r}, engine='numpy'))\n"
        "import numpy as np\n"
        "print(model.scorer.engine, model.scorer.score_batch(np.zeros((3, 784), np.float32)).shape)\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('tensorflow', 'keras', 'jax')))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60, check=True
    )
    assert done.stdout.splitlines() == ["numpy (3,)", "[]"]


def test_a_row_scores_the_same_alone_padded_or_in_a_large_batch(scorer: Scorer) -> None:
    x, _ = mnist_sample(200, seed=4)
    alone = scorer.score_batch(x[:1])[0]
    np.testing.assert_allclose(scorer.score_batch(x[:3])[0], alone, rtol=1e-5)
    np.testing.assert_allclose(scorer.score_batch(x)[0], alone, rtol=1e-5)  # 200 > max bucket 64: chunks


def test_empty_batch_gives_no_scores(scorer: Scorer) -> None:
    assert scorer.score_batch(np.empty((0, 784), np.float32)).shape == (0,)


def test_wrong_feature_count_is_refused(scorer: Scorer) -> None:
    with pytest.raises(ValueError, match="batch has 10 features, expected 784"):
        scorer.score_batch(np.zeros((2, 10), np.float32))


def test_rotated_digits_score_higher_than_upright_ones(scorer: Scorer) -> None:
    from detector.datasets import rotate90

    x, _ = mnist_sample(500, seed=2)
    assert np.median(scorer.score_batch(rotate90(x))) > np.median(scorer.score_batch(x))


def test_decision_flags_strictly_above_threshold_with_z_and_p_value(tiny_artifact: Path) -> None:
    artifact = load_artifact(tiny_artifact)
    rule = DecisionRule.from_artifact(artifact)
    stats = artifact.baseline.statistics
    t = rule.threshold
    d = rule.decide(np.array([t * 0.5, t, t * 1.5]))
    assert d.flagged.tolist() == [False, False, True]
    np.testing.assert_allclose(d.z, (np.array([t * 0.5, t, t * 1.5]) - stats.mean) / stats.std)
    assert d.p_value[0] > d.p_value[2] and 0 < d.p_value[2] <= 1


def test_threshold_policy_can_be_switched_without_retraining(tiny_artifact: Path) -> None:
    artifact = load_artifact(tiny_artifact)
    own = DecisionRule.from_artifact(artifact)
    p99 = DecisionRule.from_artifact(artifact, "p99")
    assert own.policy == "mean+3std" and p99.policy == "p99"
    assert p99.threshold == pytest.approx(np.percentile(artifact.calibration_errors, 99))
    assert p99.expected_flag_rate == pytest.approx(0.01, abs=0.005)


def test_anomaly_threshold_setting_reaches_the_workers_decision_rule(
    tiny_artifact: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from runtime.settings import WorkerSettings
    from worker.loaded_model import load_model

    monkeypatch.setenv("ANOMALY_ARTIFACT", str(tiny_artifact))
    monkeypatch.setenv("ANOMALY_THRESHOLD", "p50")
    rule = load_model(WorkerSettings()).rule  # type: ignore[call-arg]
    errors = load_artifact(tiny_artifact).calibration_errors
    assert rule.policy == "p50"
    assert rule.threshold == pytest.approx(np.percentile(errors, 50))
    own = DecisionRule.from_artifact(load_artifact(tiny_artifact))  # the artifact's mean+3std
    between = (own.threshold + rule.threshold) / 2
    assert rule.decide(np.array([between])).flagged.tolist() == [True]
    assert own.decide(np.array([between])).flagged.tolist() == [False]


def test_standardized_model_stays_finite_on_pixels_constant_in_training(tmp_path: Path) -> None:
    from detector.datasets import Dataset, Split
    from trainer.config import DetectorConfig
    from trainer.train import train

    x, y = mnist_sample(1500, seed=5)
    ones = x[y == 1]
    result = train(
        DetectorConfig(
            architecture="dense-32",
            epochs=2,
            seed=0,
            preprocessing="standardize",
            score="mse",  # the engines' parity on the default score: tests/unit/test_orientation.py
        ),
        Dataset("ones", Split(ones, y[y == 1]), Split(x[:10], y[:10]), "test"),
        tmp_path / "std",
        report=False,
        progress=False,
    )
    assert result.baseline.preprocessing.kind == "standardize"
    assert result.history["val_loss"][-1] < 10  # borders constant in training do not explode
    artifact = load_artifact(result.artifact)
    scores = KerasScorer(artifact, max_batch=64).score_batch(x[:200])
    assert np.isfinite(scores).all() and scores.max() < 1e4
    assert np.median(scores[y[:200] != 1]) > np.median(scores[y[:200] == 1])
    np.testing.assert_allclose(NumpyScorer(artifact).score_batch(x[:200]), scores, rtol=1e-4, atol=1e-6)


def test_the_same_seed_trains_the_same_model(tmp_path: Path) -> None:
    from detector.datasets import Dataset, Split
    from trainer.config import DetectorConfig
    from trainer.train import train

    x, y = mnist_sample(800, seed=6)
    dataset = Dataset("sample", Split(x, y), Split(x[:10], y[:10]), "test")
    runs = [
        train(
            DetectorConfig(architecture="dense-32", epochs=1, seed=seed),
            dataset,
            tmp_path / name,
            report=False,
            progress=False,
        )
        for name, seed in (("a", 4), ("b", 4), ("c", 5))
    ]
    errors = [load_artifact(r.artifact).calibration_errors for r in runs]
    np.testing.assert_array_equal(errors[0], errors[1])
    assert runs[0].baseline.threshold.value == runs[1].baseline.threshold.value
    assert not np.array_equal(errors[0], errors[2])
