"""The artifact: written atomically, read back identical, refused when tampered with."""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from detector.artifact import (
    BASELINE_FILE,
    ERRORS_FILE,
    MANIFEST_FILE,
    MODEL_FILE,
    SCHEMA_VERSION,
    Baseline,
    Preprocessing,
    Statistics,
    Threshold,
    Training,
    load_artifact,
    save_errors,
    write_artifact,
)
from detector.errors import ArtifactError

ERRORS = np.random.default_rng(0).gamma(2.0, 0.01, 500)


def make_baseline() -> Baseline:
    return Baseline(
        model_version="pending",
        input_dim=4,
        preprocessing=Preprocessing(),
        statistics=Statistics.of(ERRORS),
        threshold=Threshold(policy="p95", value=float(np.percentile(ERRORS, 95)), expected_flag_rate=0.05),
        training=Training(
            dataset="synthetic",
            architecture="dense-32",
            epochs_requested=1,
            epochs_run=1,
            batch_size=8,
            learning_rate=1e-3,
            seed=0,
            train_count=10,
            validation_count=2,
            calibration_count=500,
            duration_seconds=1.0,
            created_at="2026-01-01T00:00:00+00:00",
            keras_version="3",
            tensorflow_version="2",
        ),
    )


def write_fake(out: Path, model_bytes: bytes = b"fake model weights") -> Path:
    def stage(tmp: Path) -> Baseline:
        (tmp / MODEL_FILE).write_bytes(model_bytes)
        save_errors(tmp / ERRORS_FILE, ERRORS)
        return make_baseline()

    return write_artifact(out, stage)


def test_round_trip_keeps_baseline_and_sorted_errors(tmp_path: Path) -> None:
    path = write_fake(tmp_path / "a")
    loaded = load_artifact(path)
    assert loaded.baseline.statistics == Statistics.of(ERRORS)
    assert loaded.baseline.statistics.percentiles.keys() == {"50", "90", "95", "99", "99.9"}
    np.testing.assert_array_equal(loaded.calibration_errors, np.sort(ERRORS))
    assert loaded.model_bytes == b"fake model weights"
    assert set(loaded.manifest.files) == {MODEL_FILE, BASELINE_FILE, ERRORS_FILE}


def test_model_version_is_the_content_hash_of_the_model(tmp_path: Path) -> None:
    a = load_artifact(write_fake(tmp_path / "a", b"weights one")).baseline.model_version
    b = load_artifact(write_fake(tmp_path / "b", b"weights two")).baseline.model_version
    again = load_artifact(write_fake(tmp_path / "c", b"weights one")).baseline.model_version
    assert a != b and a == again and len(a) == 16


def test_rewriting_replaces_the_directory_whole_and_leaves_no_temporaries(tmp_path: Path) -> None:
    write_fake(tmp_path / "a", b"first")
    write_fake(tmp_path / "a", b"second")
    assert load_artifact(tmp_path / "a").model_bytes == b"second"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]


def test_failed_staging_leaves_the_old_artifact_untouched(tmp_path: Path) -> None:
    write_fake(tmp_path / "a", b"good")

    def broken(tmp: Path) -> Baseline:
        (tmp / MODEL_FILE).write_bytes(b"half")
        raise RuntimeError("training crashed")

    with pytest.raises(RuntimeError):
        write_artifact(tmp_path / "a", broken)
    assert load_artifact(tmp_path / "a").model_bytes == b"good"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]


@pytest.mark.parametrize("name", [MODEL_FILE, BASELINE_FILE, ERRORS_FILE])
def test_a_modified_file_is_refused_naming_it(tmp_path: Path, name: str) -> None:
    path = write_fake(tmp_path / "a")
    with open(path / name, "ab") as handle:
        handle.write(b" ")
    with pytest.raises(ArtifactError, match=f"checksum mismatch for .*{name}"):
        load_artifact(path)


def test_a_missing_file_is_refused_naming_it(tmp_path: Path) -> None:
    path = write_fake(tmp_path / "a")
    (path / MODEL_FILE).unlink()
    with pytest.raises(ArtifactError, match=f"{MODEL_FILE} listed in the manifest is missing"):
        load_artifact(path)


def test_a_missing_manifest_is_refused(tmp_path: Path) -> None:
    path = write_fake(tmp_path / "a")
    (path / MANIFEST_FILE).unlink()
    with pytest.raises(ArtifactError, match=r"manifest\.json is missing"):
        load_artifact(path)


def test_a_missing_directory_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ArtifactError, match="does not exist"):
        load_artifact(tmp_path / "nowhere")


def _rewrite(path: Path, name: str, change) -> None:
    """Edit a JSON file and re-sign the manifest, as a careless tool would."""
    import hashlib

    data = json.loads((path / name).read_text())
    change(data)
    (path / name).write_text(json.dumps(data))
    manifest = json.loads((path / MANIFEST_FILE).read_text())
    if name != MANIFEST_FILE:
        manifest["files"][name] = hashlib.sha256((path / name).read_bytes()).hexdigest()
    (path / MANIFEST_FILE).write_text(json.dumps(manifest))


def test_schema_major_version_mismatch_is_refused(tmp_path: Path) -> None:
    path = write_fake(tmp_path / "a")
    _rewrite(path, BASELINE_FILE, lambda d: d.update(schema_version="2.0"))
    expected = re.escape(SCHEMA_VERSION)
    with pytest.raises(
        ArtifactError, match=rf"schema version '2\.0' is not supported, expected '{expected}'"
    ):
        load_artifact(path)


def test_newer_schema_minor_version_only_warns(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = write_fake(tmp_path / "a")
    major, minor = SCHEMA_VERSION.split(".")
    _rewrite(path, BASELINE_FILE, lambda d: d.update(schema_version=f"{major}.{int(minor) + 1}"))
    with caplog.at_level(logging.WARNING):
        load_artifact(path)
    assert "artifact schema is newer than this worker" in caplog.text


def test_older_schema_minor_version_loads_quietly(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = write_fake(tmp_path / "a")
    _rewrite(path, BASELINE_FILE, lambda d: d.update(schema_version="1.0"))
    with caplog.at_level(logging.WARNING):
        assert load_artifact(path).dense_stack is None
    assert "schema" not in caplog.text


def test_unknown_baseline_field_is_refused(tmp_path: Path) -> None:
    path = write_fake(tmp_path / "a")
    _rewrite(path, BASELINE_FILE, lambda d: d.update(surprise=1))
    with pytest.raises(ArtifactError, match="does not match the schema"):
        load_artifact(path)


def test_model_version_not_matching_the_model_is_refused(tmp_path: Path) -> None:
    path = write_fake(tmp_path / "a")
    _rewrite(path, BASELINE_FILE, lambda d: d.update(model_version="0000000000000000"))
    with pytest.raises(ArtifactError, match=r"does not match the hash of model\.keras"):
        load_artifact(path)


def test_manifest_cannot_point_outside_the_artifact(tmp_path: Path) -> None:
    path = write_fake(tmp_path / "a")
    shutil.copy(path / MODEL_FILE, tmp_path / "outside")
    _rewrite(path, MANIFEST_FILE, lambda d: d["files"].update({"../outside": d["files"][MODEL_FILE]}))
    with pytest.raises(ArtifactError, match="only plain file names"):
        load_artifact(path)


# -- what the artifact's files may be: regular files, read once, never through a link or a FIFO -----
@pytest.mark.parametrize("name", [MODEL_FILE, MANIFEST_FILE, ERRORS_FILE])
def test_a_file_that_is_a_symlink_is_refused_even_when_its_target_matches(tmp_path: Path, name: str) -> None:
    path = write_fake(tmp_path / "a")
    target = tmp_path / f"elsewhere-{name}"
    shutil.copy(path / name, target)
    (path / name).unlink()
    (path / name).symlink_to(target)
    with pytest.raises(ArtifactError, match=f"{name} is a symbolic link; expected a regular file"):
        load_artifact(path)


@pytest.mark.timeout(10)
@pytest.mark.parametrize("name", [MANIFEST_FILE, ERRORS_FILE])
def test_a_fifo_in_place_of_a_file_is_refused_without_blocking(tmp_path: Path, name: str) -> None:
    import os

    path = write_fake(tmp_path / "a")
    (path / name).unlink()
    os.mkfifo(path / name)  # opened for reading, it would wait for a writer forever
    with pytest.raises(ArtifactError, match=f"{name} is a FIFO; expected a regular file"):
        load_artifact(path)


def test_an_artifact_directory_reached_through_a_symlink_loads(tmp_path: Path) -> None:
    real = write_fake(tmp_path / "v3")
    (tmp_path / "current").symlink_to(real)  # a common deployment: current -> v3
    assert (
        load_artifact(tmp_path / "current").baseline.model_version
        == load_artifact(real).baseline.model_version
    )


def test_the_loaded_artifact_carries_the_digest_of_the_manifest_it_verified(tmp_path: Path) -> None:
    import hashlib

    from detector.artifact import manifest_digest

    path = write_fake(tmp_path / "a")
    expected = hashlib.sha256((path / MANIFEST_FILE).read_bytes()).hexdigest()
    assert load_artifact(path).manifest_digest == expected == manifest_digest(path)


@pytest.mark.parametrize("literal", ["Infinity", "-Infinity", "NaN", "1e999"])
def test_a_threshold_that_is_not_finite_is_refused_naming_the_field(tmp_path: Path, literal: str) -> None:
    # Python's json reads these literals (1e999 as inf); a threshold of inf or NaN flags nothing.
    import hashlib

    path = write_fake(tmp_path / "a")
    baseline = json.loads((path / BASELINE_FILE).read_text())
    baseline["threshold"]["value"] = "THRESHOLD"
    (path / BASELINE_FILE).write_text(json.dumps(baseline).replace('"THRESHOLD"', literal))
    manifest = json.loads((path / MANIFEST_FILE).read_text())
    manifest["files"][BASELINE_FILE] = hashlib.sha256((path / BASELINE_FILE).read_bytes()).hexdigest()
    (path / MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match=r"does not match the schema(.|\n)*threshold\.value(.|\n)*finite"):
        load_artifact(path)


def test_a_threshold_that_is_not_finite_cannot_be_written() -> None:
    with pytest.raises(ValueError, match="finite"):
        Threshold(policy="retuned precision>=0.9", value=float("inf"), expected_flag_rate=0.0)
