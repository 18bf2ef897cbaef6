"""A training run nobody watches on a terminal (a Job, compose) still says how far it is: a log line
per epoch and per component fit."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT
from tests.support import log_records

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def test_training_off_a_terminal_logs_each_epoch_and_each_component_fit(tmp_path: Path) -> None:
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", ANOMALY_LOG_FORMAT="logfmt")
    done = subprocess.run(
        [sys.executable, "-m", "trainer", "train", "--out", str(tmp_path / "a"), "--max-samples", "1500",
         "--epochs", "3", "--min-steps", "0", "--no-report"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    records = log_records(done.stderr)
    epochs = [r for r in records if r["msg"] == "epoch"]
    assert [(r["network"], r["epoch"], r["epochs"]) for r in epochs][:1] == [
        ("autoencoder+orientation", "1", "3")
    ]
    assert all(
        r["loss"] != "nan" and r["val_loss"] != "nan" and float(r["elapsed_seconds"]) >= 0 for r in epochs
    )
    fitted = [r["name"] for r in records if r["msg"] == "component fitted"]
    assert fitted == ["mse", "orientation", "hidden-knn", "hidden-mahalanobis"]
