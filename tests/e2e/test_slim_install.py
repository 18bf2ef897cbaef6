"""The base install (`pip install anomaly-scorer`, no extras) is the worker: small, no TensorFlow,
and it serves a dense artifact; an artifact that needs TensorFlow is refused naming the extra."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from producer.client import ImageProducer
from tests.conftest import ROOT, RedisServer, mnist_sample

# Creating the venv downloads and unpacks wheels: minutes on a busy machine, counted in one test.
pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(900)]

SLIM_LIMIT_MB = 400
HEAVY = ("tensorflow", "keras", "matplotlib", "sklearn")


def run(argv: list[str], cwd: Path, **kwargs: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=600, **kwargs)  # type: ignore[call-overload, no-any-return]


@pytest.fixture(scope="module")
def slim_venv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A fresh venv with the locked base requirements and the package itself, built from a copy of
    the sources (so nothing is written into the checkout)."""
    where = tmp_path_factory.mktemp("slim")
    source = where / "src"
    shutil.copytree(
        ROOT,
        source,
        ignore=shutil.ignore_patterns(".git", ".venv", "tests", "benchmarks", "data", "deploy", "build",
                                      "*.egg-info", "__pycache__", "artifacts", "demo-artifact", "docs"),
    )  # fmt: skip
    venv = where / "venv"
    steps = [
        [sys.executable, "-m", "venv", str(venv)],
        [str(venv / "bin/pip"), "install", "--quiet", "--require-hashes", "-r", "requirements/worker.txt"],
        [str(venv / "bin/pip"), "install", "--quiet", "--no-deps", "."],
    ]
    for step in steps:
        done = run(step, source)
        assert done.returncode == 0, f"{' '.join(step)} failed:\n{done.stdout}\n{done.stderr}"
    yield venv


def directory_mb(path: Path) -> float:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink()) / 2**20


def test_base_install_has_nothing_heavy_and_stays_small(slim_venv: Path, tmp_path: Path) -> None:
    probe = (
        f"import importlib.util as u, json; print(json.dumps({{n: bool(u.find_spec(n)) for n in {HEAVY}}}))"
    )
    done = run([str(slim_venv / "bin/python"), "-c", probe], tmp_path)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == dict.fromkeys(HEAVY, False)
    size = directory_mb(slim_venv)
    print(f"base install: {size:.0f} MB as a fresh venv")
    assert size < SLIM_LIMIT_MB, f"the base install takes {size:.0f} MB, expected under {SLIM_LIMIT_MB}"
    for script in ("anomaly-worker", "anomaly-producer"):
        assert run([str(slim_venv / "bin" / script), "--help"], tmp_path).returncode == 0, script


def test_base_install_serves_a_dense_artifact(
    slim_venv: Path, tiny_artifact: Path, redis_client, redis_server: RedisServer, tmp_path: Path
) -> None:
    images = (mnist_sample(300, seed=5)[0] * 255).round().astype(np.uint8)
    ImageProducer(redis_client, "images").push_many(images, [f"digit-{i}" for i in range(len(images))])
    env = dict(
        {k: v for k, v in os.environ.items() if not k.startswith("ANOMALY_")},
        ANOMALY_REDIS_URL=redis_server.url,
        ANOMALY_ARTIFACT=str(tiny_artifact),
        ANOMALY_SCORES_STREAM="scores",
        ANOMALY_METRICS_HOST="127.0.0.1",
        ANOMALY_METRICS_PORT="0",
    )
    done = run([str(slim_venv / "bin/anomaly-worker"), "--burst"], tmp_path, env=env)
    assert done.returncode == 0, done.stderr
    assert "engine=numpy" in done.stderr
    scored = {f[b"id"].decode() for _, f in redis_client.xrange("scores")}
    assert scored == {f"digit-{i}" for i in range(len(images))}
    assert int(redis_client.xpending("images", "anomaly-scorer")["pending"]) == 0


def without_dense_stack(artifact: Path, out: Path) -> Path:
    """A copy whose manifest no longer lists dense_stack.npz: only TensorFlow can score it."""
    shutil.copytree(artifact, out)
    (out / "dense_stack.npz").unlink()
    manifest = json.loads((out / "manifest.json").read_text())
    del manifest["files"]["dense_stack.npz"]
    (out / "manifest.json").write_text(json.dumps(manifest))
    return out


@pytest.mark.parametrize("case", ["artifact without dense_stack.npz", "ANOMALY_ENGINE=tensorflow"])
def test_without_tensorflow_an_artifact_that_needs_it_is_refused_naming_the_extra(
    slim_venv: Path, tiny_artifact: Path, tmp_path: Path, case: str
) -> None:
    artifact = tiny_artifact
    env = {k: v for k, v in os.environ.items() if not k.startswith("ANOMALY_")}
    if case.startswith("artifact"):
        artifact = without_dense_stack(tiny_artifact, tmp_path / "conv-like")
    else:
        env["ANOMALY_ENGINE"] = "tensorflow"
    done = run(
        [str(slim_venv / "bin/anomaly-worker"), "--artifact", str(artifact), "--metrics-port", "0"],
        tmp_path,
        env=env,
    )
    assert done.returncode == 2, done.stderr
    assert "pip install 'anomaly-scorer[tensorflow]'" in done.stderr
    assert "not installed" in done.stderr
