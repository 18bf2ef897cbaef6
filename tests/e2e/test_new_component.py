"""Adding a score component is one module and one registration line: a throwaway one, registered in
a child process only, is offered by the CLI, trained, served, evaluated and drawn in the report."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest
from pydantic import Field

from detector.components.base import Component, ComponentOptions, ForwardPass, NormalData
from tests.conftest import ROOT

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
# The children import this module before the rest of the project (nothing here may import
# detector.score or detector.artifact: their schemas are built from the registry as it is then).
ENV = os.environ | {
    "TF_CPP_MIN_LOG_LEVEL": "3",
    "TF_NUM_INTEROP_THREADS": "1",
    "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p),
}


# --- the module a newcomer writes ----------------------------------------------------------------


class FlooredL1Options(ComponentOptions):
    """Which pixel errors `l1` counts."""

    l1_floor: float = Field(0.0, ge=0, lt=1, description="l1: pixel errors up to this much count as none")


class FlooredL1(Component):
    """`l1`: mean absolute reconstruction error above a noise floor."""

    name = "l1"
    description = "mean absolute reconstruction error above a noise floor"
    options = FlooredL1Options
    parameter_fields: ClassVar[dict[str, tuple[Any, Any]]] = {
        "l1_floor": (
            float | None,
            Field(None, ge=0, lt=1, description="l1: the noise floor of pixel errors"),
        ),
    }
    required_parameters = ("l1_floor",)

    def __init__(self, floor: float) -> None:
        self.floor = floor

    @classmethod
    def fit(cls, normal: NormalData, options: FlooredL1Options) -> FlooredL1:
        """Nothing to learn: the floor chosen."""
        return cls(options.l1_floor)

    @classmethod
    def from_parameters(
        cls, parameters: Mapping[str, Any], data: bytes | None, input_dim: int, where: str
    ) -> FlooredL1:
        """The stored floor."""
        return cls(float(parameters["l1_floor"]))

    def parameters(self) -> dict[str, Any]:
        """The floor."""
        return {"l1_floor": self.floor}

    def score(self, batch: ForwardPass) -> np.ndarray:
        """Per-row mean of the absolute pixel errors beyond the floor."""
        return floored_l1(batch.images, batch.reconstructions, self.floor)


def floored_l1(images: np.ndarray, reconstructions: np.ndarray, floor: float) -> np.ndarray:
    """The score written out, for the test to recompute it."""
    errors = np.abs(np.asarray(images, np.float64) - reconstructions)
    return np.asarray(np.maximum(errors - floor, 0.0).mean(axis=1))


# --- the registration line, in a child process, then any program of the project --------------------

LAUNCHER = """
import runpy, sys
from detector.components import REGISTRY
from tests.e2e.test_new_component import FlooredL1
REGISTRY[FlooredL1.name] = FlooredL1  # the registration line
sys.argv = sys.argv[1:]
if sys.argv[0] == "trainer":
    from trainer.cli import main
    sys.exit(main(sys.argv[1:]))
runpy.run_path(sys.argv[0], run_name="__main__")
"""

SERVE = """
import json, sys
import numpy as np
from runtime.settings import WorkerSettings
from worker.loaded_model import load_model
model = load_model(WorkerSettings(artifact=sys.argv[1], engine="numpy"))
images = np.load(sys.argv[2])
print(json.dumps(model.scorer.score_batch(images).tolist()))
"""


def launch(*args: str, cwd: Path) -> str:
    """A program run with the throwaway component registered first; its stdout."""
    done = subprocess.run(
        [sys.executable, "-c", LAUNCHER, *args], cwd=cwd, env=ENV, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, f"exit {done.returncode}\nstdout:\n{done.stdout}\nstderr:\n{done.stderr}"
    return done.stdout


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An artifact of mse+l1 with --l1-floor 0.05, its report drawn at train time."""
    out = tmp_path_factory.mktemp("component") / "l1"
    flags = ["--score", "mse+l1", "--l1-floor", "0.05", "--classes", "1", "--architecture", "dense-32"]
    short = ["--epochs", "3", "--batch-size", "32", "--learning-rate", "0.003", "--max-samples", "1000"]
    launch("trainer", "train", *flags, *short, "--out", str(out), cwd=out.parent)
    return out


def test_the_cli_offers_its_flag_and_describes_it_in_the_score_help(tmp_path: Path) -> None:
    for command in ("train", "benchmark"):
        assert "--l1-floor L1_FLOOR" in launch("trainer", command, "--help", cwd=tmp_path)
    help_text = " ".join(launch("trainer", "train", "--help", cwd=tmp_path).split())
    assert "l1 (mean absolute reconstruction error above a noise floor)" in help_text


def test_it_is_trained_with_its_option_and_kept_in_the_artifact(trained: Path) -> None:
    baseline = json.loads((trained / "baseline.json").read_text())
    assert baseline["schema_version"] == "1.7" and baseline["score"] == "mse+l1"
    assert baseline["score_parameters"]["l1_floor"] == 0.05


def test_the_worker_serves_it_as_it_was_calibrated(trained: Path, tmp_path: Path) -> None:
    from detector.networks import DenseStack
    from detector.score import combine
    from tests.conftest import mnist_sample

    images, _ = mnist_sample(64, seed=21)
    np.save(tmp_path / "images.npy", images)
    (tmp_path / "serve.py").write_text(SERVE)
    served = launch(str(tmp_path / "serve.py"), str(trained), str(tmp_path / "images.npy"), cwd=tmp_path)
    # By hand: the dense stack's reconstruction, mse and the floored l1, standardised and summed.
    params = json.loads((trained / "baseline.json").read_text())["score_parameters"]
    stack = DenseStack.from_bytes((trained / "dense_stack.npz").read_bytes(), "dense_stack.npz")
    recon = stack.reconstruct(images)
    mse = np.mean(np.square(images - recon), axis=1, dtype=np.float64)
    expected = combine([mse, floored_l1(images, recon, 0.05)], params["combine_mean"], params["combine_std"])
    np.testing.assert_allclose(json.loads(served), expected, rtol=1e-5, atol=1e-5)


def test_it_is_evaluated_and_drawn_in_the_report(trained: Path, tmp_path: Path) -> None:
    evaluated = tmp_path / "e.json"
    launch("trainer", "evaluate", str(trained), "--dataset", "mnist", "--json", str(evaluated), cwd=tmp_path)
    rows = json.loads(evaluated.read_text())["rows"]
    own = {r["anomaly_set"]: r for r in rows if r["score"] == "mse+l1"}
    assert set(own) == {"unseen classes", "rotated 90°"}
    assert own["unseen classes"]["auroc"] > 0.8, rows
    threshold = json.loads((trained / "baseline.json").read_text())["threshold"]["value"]
    assert own["unseen classes"]["threshold"] == threshold  # the artifact's own, as the worker's
    assert "<td>mse+l1</td>" in (trained / "report.html").read_text()
    report = tmp_path / "report"
    launch("trainer", "report", str(trained), "--out", str(report), cwd=tmp_path)
    assert "<td>mse+l1</td>" in (report / "report.html").read_text()


def test_the_parent_process_never_saw_it() -> None:
    """Registered in the children only: the project's own registry is as it was."""
    from detector.components import REGISTRY

    assert "l1" not in REGISTRY and (ROOT / "detector" / "components" / "l1.py").exists() is False
