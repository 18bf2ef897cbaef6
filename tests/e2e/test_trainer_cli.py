"""anomaly-trainer as a user runs it: train, evaluate, report, benchmark (subprocesses, tiny runs)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from detector.artifact import load_artifact
from detector.engines.tensorflow_import import NATIVE_NOISE
from tests.conftest import ROOT

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
# The package may not be installed; the CLIs run from other folders, as a user's would.
ENV = os.environ | {
    "TF_CPP_MIN_LOG_LEVEL": "3",
    "TF_NUM_INTEROP_THREADS": "1",
    "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p),
}


def run_trainer(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """`python -m trainer ARGS` with TensorFlow quiet and one inter-op thread."""
    result = subprocess.run(
        [sys.executable, "-m", "trainer", *args],
        cwd=cwd,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert result.returncode == 0, (
        f"exit {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    )
    for noise in NATIVE_NOISE:  # TensorFlow's native start-up lines never reach the user
        assert noise not in result.stderr, result.stderr
    return result


@pytest.fixture(scope="module")
def ones_artifact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A dense-32 artifact trained 4 short epochs on 1600 ones, with its report drawn at train time."""
    out = tmp_path_factory.mktemp("cli") / "ones"
    run_trainer(
        "train",
        "--classes",
        "1",
        "--architecture",
        "dense-32",
        "--epochs",
        "4",
        "--batch-size",
        "32",
        "--learning-rate",
        "0.003",
        "--max-samples",
        "2000",
        "--out",
        str(out),
        cwd=out.parent,
    )
    return out


def test_train_draws_the_report_into_the_checksummed_artifact(ones_artifact: Path) -> None:
    artifact = load_artifact(ones_artifact)
    assert {"report.png", "report.html"} <= set(artifact.manifest.files)
    assert (ones_artifact / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    page = (ones_artifact / "report.html").read_text()
    assert artifact.baseline.model_version in page  # not "pending"
    assert "unseen classes" in page


def test_evaluate_prints_the_table_and_writes_json_outside_the_artifact(
    ones_artifact: Path, tmp_path: Path
) -> None:
    result = run_trainer("evaluate", str(ones_artifact), "--dataset", "mnist", cwd=tmp_path)
    version = load_artifact(ones_artifact).baseline.model_version
    assert "anomaly set" in result.stdout and "AUROC" in result.stdout
    for line in ("unseen classes   mse", "unseen classes   nmse", "rotated 90°      mahalanobis"):
        assert line in result.stdout
    written = json.loads((tmp_path / f"evaluation-{version}.json").read_text())
    unseen_mse = next(
        r for r in written["rows"] if r["anomaly_set"] == "unseen classes" and r["score"] == "mse"
    )
    assert unseen_mse["auroc"] > 0.8
    assert unseen_mse["normal_count"] == 1135  # ones in the MNIST test split
    load_artifact(ones_artifact)  # still verifies: nothing was written inside it


def test_report_redraws_beside_the_artifact(ones_artifact: Path, tmp_path: Path) -> None:
    out = tmp_path / "report"
    result = run_trainer("report", str(ones_artifact), "--out", str(out), cwd=tmp_path)
    assert (out / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "report.html" in result.stdout
    assert "<table>" in (out / "report.html").read_text()


def test_benchmark_one_class_prints_the_auroc_table_and_writes_results(tmp_path: Path) -> None:
    result = run_trainer(
        "benchmark",
        "--one-class",
        "--classes",
        "1",
        "--epochs",
        "1",
        "--max-samples",
        "500",
        "--batch-size",
        "16",
        "--learning-rate",
        "0.003",
        "--architecture",
        "dense-32",
        "--transforms",
        "rotations",
        "--transform-epochs",
        "1",
        "--orientation",
        "none",
        "--out-dir",
        str(tmp_path),
        cwd=tmp_path,
    )
    assert (
        "| normal class | AUROC mse | AUROC nmse | AUROC top-k | AUROC mahalanobis | AUROC transforms "
        "| AUROC knn | AUROC hidden-knn | AUROC hidden-mahalanobis | AUROC mse+transforms "
        "| AUROC nmse+transforms | AUROC mse+knn | AUROC mse+transforms+knn | AUROC nmse+transforms+knn "
        "| AUROC mse+hidden-knn |" in result.stdout
    )
    assert "| **mean** |" in result.stdout
    written = json.loads((tmp_path / "one-class-mnist-dense-32-e1-rotations-c1-n500.json").read_text())
    assert [r["normal_class"] for r in written["results"]] == [1]
    assert written["mean_auroc"]["mse"] > 0.8
    assert written["config"]["options"]["transforms"]["transforms"] == "rotations"
    assert written["networks"] == ["transformation classifier (rotations, at most 1 epoch(s))"]
    assert written["wall_seconds"] > 0
    assert (tmp_path / "one-class-mnist-dense-32-e1-rotations-c1-n500.md").is_file()


def test_benchmark_one_class_trains_the_default_detector_by_default(tmp_path: Path) -> None:
    # Only the budget is cut (one epoch, no step floor, 500 images): the rest is the default's.
    result = run_trainer(
        "benchmark",
        "--one-class",
        "--classes",
        "1",
        "--epochs",
        "1",
        "--min-steps",
        "0",
        "--max-samples",
        "500",
        "--out-dir",
        str(tmp_path),
        cwd=tmp_path,
    )
    assert "one-class benchmark: mnist, dense-64-16," in result.stdout
    assert "| AUROC mse+orientation+hidden-knn+hidden-mahalanobis |" in result.stdout
    assert "transforms" not in result.stdout.split("| normal class |")[1].split("\n")[0]
    written = json.loads(
        (tmp_path / "one-class-mnist-dense-64-16-e1-orientation-geometric-c1-n500.json").read_text()
    )
    config = written["config"]
    assert (config["architecture"], config["batch_size"]) == ("dense-64-16", 256)
    # The default detector's networks: the geometric orientation head, no transformation classifier.
    assert written["networks"] == ["orientation head (geometric)"]
    assert set(written["mean_auroc"]) >= {
        "mse",
        "orientation",
        "hidden-knn",
        "hidden-mahalanobis",
        "mse+orientation+hidden-knn",
        "mse+orientation+hidden-knn+hidden-mahalanobis",
    }


def test_a_transformation_score_is_trained_evaluated_and_drawn(tmp_path: Path) -> None:
    out = tmp_path / "all-digits"
    result = run_trainer(
        "train",
        "--architecture",
        "dense-32",
        "--epochs",
        "2",
        "--max-samples",
        "3000",
        "--score",
        "mse+transforms+knn",
        "--transforms",
        "rotations",
        "--out",
        str(out),
        cwd=tmp_path,
    )
    assert "held-out mse+transforms+knn:" in result.stdout
    artifact = load_artifact(out)
    assert {"transform_classifier.npz", "knn_reference.npy"} <= set(artifact.manifest.files)
    assert "transforms_loss" in artifact.baseline.training.history
    evaluation = run_trainer("evaluate", str(out), "--json", str(tmp_path / "e.json"), cwd=tmp_path)
    assert "rotated 90°      mse+transforms+knn " in evaluation.stdout
    rows = json.loads((tmp_path / "e.json").read_text())["rows"]
    own = next(r for r in rows if r["score"] == "mse+transforms+knn" and r["anomaly_set"] == "rotated 90°")
    assert own["auroc"] > 0.9  # the classifier knows which way up a digit is
    assert own["threshold"] == artifact.baseline.threshold.value
    assert "mse+transforms+knn" in (out / "report.html").read_text()


def test_evaluate_of_a_missing_artifact_fails_with_a_message(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "trainer", "evaluate", str(tmp_path / "nope"), "--dataset", "mnist"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env=ENV,
        timeout=120,
    )
    assert result.returncode == 2
    assert "nope does not exist" in result.stderr
