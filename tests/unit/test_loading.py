"""Loading is total: an old artifact still loads and scores; a corrupt one is refused by name.

The corruptions rewrite manifest.json (and the model version, when model.keras changes) so the
checksums match, as a careless or buggy export would: the loader must still refuse each one with
an ArtifactError naming the file, and a worker reloading it keeps serving its old model.
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
from collections.abc import Callable
from pathlib import Path

import fakeredis
import numpy as np
import pytest

from detector.artifact import BASELINE_FILE, MANIFEST_FILE, MODEL_FILE, load_artifact
from detector.errors import ArtifactError
from detector.loading import load_scorer, probe_batch
from runtime.settings import WorkerSettings
from tests.conftest import ROOT
from tests.support import build_runner
from worker.loaded_model import load_model

OLD = ROOT / "tests" / "fixtures" / "artifact-1.2"
Corruption = Callable[[bytes], bytes]


def test_an_artifact_written_before_the_detector_core_loads_and_scores_as_it_did() -> None:
    expected = np.load(OLD / "expected_scores.npz")
    artifact, scorer = load_scorer(OLD / "artifact", "numpy")
    assert artifact.baseline.schema_version == "1.2" and artifact.baseline.score == "mse+transforms+knn"
    # float32 networks: another CPU's BLAS kernels round differently (about 6e-7 on scores of order
    # 1 from one machine to the next); a format or scoring regression moves them by far more.
    np.testing.assert_allclose(
        scorer.score_batch(expected["images"]), expected["scores"], rtol=1e-5, atol=1e-5
    )


@pytest.mark.slow
def test_an_old_artifact_scores_the_same_with_the_tensorflow_engine() -> None:
    expected = np.load(OLD / "expected_scores.npz")
    _, scorer = load_scorer(OLD / "artifact", "tensorflow", max_batch=32, jit=False)
    np.testing.assert_allclose(scorer.score_batch(expected["images"]), expected["scores"], atol=1e-5)


def test_the_probe_batch_is_blank_full_grey_and_seeded_noise() -> None:
    probe = probe_batch(16)
    assert probe.dtype == np.float32 and probe.shape == (7, 16)
    assert probe[0].max() == 0 and probe[1].min() == 1 and np.all(probe[2] == 0.5)
    np.testing.assert_array_equal(probe, probe_batch(16))


# --- corruptions ---------------------------------------------------------------------------------


def _npz_with(data: bytes, change: Callable[[dict[str, np.ndarray]], None]) -> bytes:
    with np.load(io.BytesIO(data), allow_pickle=False) as npz:
        arrays = {name: npz[name] for name in npz.files}
    change(arrays)
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)  # type: ignore[arg-type]
    return buffer.getvalue()


def _npy_with(data: bytes, change: Callable[[np.ndarray], np.ndarray]) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, change(np.load(io.BytesIO(data), allow_pickle=False)), allow_pickle=False)
    return buffer.getvalue()


def _nan_first(arrays: dict[str, np.ndarray]) -> None:
    arrays["kernel_0"] = np.full_like(arrays["kernel_0"], np.nan)


def _transposed_first(arrays: dict[str, np.ndarray]) -> None:
    arrays["kernel_0"] = arrays["kernel_0"].T.copy()


def _with_nan(a: np.ndarray) -> np.ndarray:
    a = a.astype(np.float64 if a.dtype == np.float64 else np.float32)
    a.flat[0] = np.nan
    return a


def _threshold_literal(data: bytes, literal: str) -> bytes:
    """baseline.json with threshold.value as a JSON literal json.dumps cannot write (1e999)."""
    baseline = json.loads(data)
    baseline["threshold"]["value"] = "THRESHOLD"
    return json.dumps(baseline).replace('"THRESHOLD"', literal).encode()


GENERIC: dict[str, Corruption] = {
    "truncated": lambda b: b[: len(b) // 2],
    "empty": lambda b: b"",
    "garbage": lambda b: np.random.default_rng(0).bytes(max(64, len(b) // 10)),
}
SPECIFIC: dict[str, dict[str, Corruption]] = {
    "dense_stack.npz": {
        "nan weights": lambda b: _npz_with(b, _nan_first),
        "wrong shapes": lambda b: _npz_with(b, _transposed_first),
    },
    "transform_classifier.npz": {
        "nan weights": lambda b: _npz_with(b, _nan_first),
        "wrong shapes": lambda b: _npz_with(b, _transposed_first),
    },
    "knn_reference.npy": {
        "nan values": lambda b: _npy_with(b, _with_nan),
        "wrong shape": lambda b: _npy_with(b, lambda a: a[:, :-1].copy()),
    },
    "calibration_errors.npy": {
        "nan values": lambda b: _npy_with(b, _with_nan),
        "wrong shape": lambda b: _npy_with(b, lambda a: a[:-1].copy()),
        "strings": lambda b: _npy_with(b, lambda a: a.astype(str)),
    },
    "baseline.json": {
        "wrong input_dim": lambda b: json.dumps(json.loads(b) | {"input_dim": 195}).encode(),
        "infinite threshold": lambda b: _threshold_literal(b, "Infinity"),
        "nan threshold": lambda b: _threshold_literal(b, "NaN"),
        "overflowing threshold": lambda b: _threshold_literal(b, "1e999"),
    },
}
FILES = (MODEL_FILE, BASELINE_FILE, "calibration_errors.npy", "dense_stack.npz", "transform_classifier.npz",
         "knn_reference.npy")  # fmt: skip
CASES = [
    (name, kind, change) for name in FILES for kind, change in (GENERIC | SPECIFIC.get(name, {})).items()
]


def corrupt(root: Path, name: str, change: Corruption) -> None:
    """Change one file and re-sign the artifact so every checksum (and the model version) matches."""
    path = root / name
    path.write_bytes(change(path.read_bytes()))
    manifest = json.loads((root / MANIFEST_FILE).read_bytes())
    if name == MODEL_FILE:
        version = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
        baseline = json.loads((root / BASELINE_FILE).read_bytes())
        (root / BASELINE_FILE).write_text(json.dumps(baseline | {"model_version": version}))
        manifest["model_version"] = version
    for file in manifest["files"]:
        manifest["files"][file] = hashlib.sha256((root / file).read_bytes()).hexdigest()
    (root / MANIFEST_FILE).write_text(json.dumps(manifest))


@pytest.fixture
def old_copy(tmp_path: Path) -> Path:
    path = tmp_path / "artifact"
    shutil.copytree(OLD / "artifact", path)
    return path


@pytest.mark.parametrize(("name", "kind", "change"), CASES, ids=[f"{n}-{k}" for n, k, _ in CASES])
def test_a_corrupt_file_is_refused_naming_it(
    old_copy: Path, name: str, kind: str, change: Corruption
) -> None:
    corrupt(old_copy, name, change)
    with pytest.raises(ArtifactError) as refused:
        load_scorer(old_copy, "auto", max_batch=8)
    assert name in str(refused.value)


def test_a_reload_of_a_corrupt_artifact_keeps_the_old_model(old_copy: Path) -> None:
    settings = WorkerSettings(artifact=old_copy, consumer="w1", reload_poll_seconds=0, batch_size=8)
    runner = build_runner(fakeredis.FakeRedis(), settings, loader=lambda: load_model(settings))
    old = runner.model
    corrupt(old_copy, "calibration_errors.npy", lambda b: b"")  # an EOFError before loading was total
    assert runner.reload() is False
    assert runner.model is old
    failures = runner.metrics.registry.get_sample_value("anomaly_model_reloads_total", {"result": "failure"})
    assert failures == 1


def _huge_mixed_decoder(arrays: dict[str, np.ndarray]) -> None:
    arrays["kernel_1"] = (np.sign(arrays["kernel_1"]) * 3e38).astype(np.float32)


def test_weights_that_overflow_to_nan_are_caught_by_the_probe(old_copy: Path) -> None:
    # Finite but huge weights of both signs: +inf and -inf meet in the decoder and give NaN.
    corrupt(old_copy, "dense_stack.npz", lambda b: _npz_with(b, _huge_mixed_decoder))
    load_artifact(old_copy)  # every file is well formed
    with pytest.raises(ArtifactError, match=r"probe batch .* expected finite numbers; .*dense_stack\.npz"):
        load_scorer(old_copy, "numpy", max_batch=8)


def test_an_update_that_lands_while_the_artifact_loads_is_picked_up_at_the_next_check(
    old_copy: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import worker.loaded_model as loaded_model
    from tests.conftest import wait_until

    def retuned(data: bytes) -> bytes:
        baseline = json.loads(data)
        baseline["threshold"]["value"] = 0.123
        return json.dumps(baseline).encode()

    real, landed = loaded_model.load_scorer, []

    def load_while_a_new_version_lands(*args, **kwargs):  # type: ignore[no-untyped-def]
        result = real(*args, **kwargs)
        if not landed:  # `retune` writes a new version after the files were read, before we return
            corrupt(old_copy, BASELINE_FILE, retuned)
            landed.append(True)
        return result

    monkeypatch.setattr(loaded_model, "load_scorer", load_while_a_new_version_lands)
    settings = WorkerSettings(artifact=old_copy, consumer="w1", reload_poll_seconds=0.01, batch_size=8)
    runner = build_runner(
        fakeredis.FakeRedis(), settings, model=load_model(settings), loader=lambda: load_model(settings)
    )
    assert landed and runner.model.rule.threshold != 0.123  # served: the version that was read

    def reloaded() -> bool:
        runner.models.maybe_reload()
        return runner.model.rule.threshold == 0.123

    wait_until(reloaded, 5, what="the version that landed during the load to be loaded")
