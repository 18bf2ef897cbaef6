"""What a producer learns of an artifact: D, the image layout (schema 1.7's `input`), the entry fields."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError

from detector.artifact import InputLayout, load_artifact
from detector.datasets import Dataset, Split, load_dataset
from tests.conftest import ROOT
from trainer.train import input_layout

OLD = ROOT / "tests" / "fixtures" / "artifact-1.2" / "artifact"


def test_mnist_knows_its_images_are_28_by_28_grey() -> None:
    assert load_dataset("mnist").image_shape == (28, 28, 1)


@pytest.mark.parametrize(
    ("shape", "dim", "expected"),
    [
        ((28, 28, 1), 784, (28, 28, 1)),
        ((10, 20, 3), 600, (20, 10, 3)),
        (None, 784, (28, 28, 1)),
        (None, 600, None),
    ],
)
def test_the_trainer_records_the_layout_it_knows_or_a_square_grey_one(shape, dim, expected) -> None:
    split = Split(np.zeros((2, dim), np.float32), None)
    layout = input_layout(Dataset("d", split, split, "test", shape), dim)
    found = None if layout is None else (layout.width, layout.height, layout.channels)
    assert found == expected


def test_a_layout_that_does_not_make_input_dim_is_refused() -> None:
    baseline = load_artifact(OLD).baseline  # D = 196
    data = baseline.model_dump() | {"input": {"width": 28, "height": 28, "channels": 1}}
    with pytest.raises(ValidationError, match="28 x 28 x 1 is 784 values, input_dim says 196"):
        type(baseline).model_validate(data)


def test_the_default_training_records_the_layout_in_the_artifact(tiny_artifact: Path) -> None:
    layout = load_artifact(tiny_artifact).baseline.input
    assert layout == InputLayout(width=28, height=28, channels=1)


def test_describe_prints_d_the_layout_and_the_fields_and_refuses_what_is_no_artifact(
    tiny_artifact: Path, tmp_path: Path
) -> None:
    def describe(path: Path) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "worker", "--describe", str(path)],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
        )

    done = describe(tiny_artifact)
    assert done.returncode == 0, done.stderr
    assert "input_dim (D)   784" in done.stdout
    assert "28 x 28 x 1 (grey), row-major, values in [0, 1] (recorded by the trainer)" in done.stdout
    assert "dtype=float32  3136 bytes" in done.stdout
    old = describe(OLD)
    assert "14 x 14 x 1 (grey)" in old.stdout and "inferred from D" in old.stdout
    missing = describe(tmp_path / "nothing")
    assert missing.returncode == 2 and "cannot describe the artifact" in missing.stderr
