"""The scoring process: a child that scores what the loop would have, and whose end the loop survives."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from contract.codec import scale_pixels
from runtime.settings import WorkerSettings
from tests.conftest import ROOT, wait_until
from tests.support import ChildScorer, D, make_model
from worker.batch import score_batch
from worker.loaded_model import load_model
from worker.scoring_process import ScoringProcess, ScoringProcessError


@pytest.fixture
def shared_dir(monkeypatch, tmp_path: Path) -> Path:
    """Where the scoring processes of this test put their buffer files (never left there)."""
    import worker.scoring_process as scoring_process

    directory = tmp_path / "shm"
    directory.mkdir()
    monkeypatch.setattr(scoring_process, "SHARED_DIR", directory)
    return directory


@pytest.fixture
def process(shared_dir: Path) -> Iterator[ScoringProcess]:
    scoring = ScoringProcess(rows=64)
    yield scoring
    scoring.close()


def images(n: int, brightness: float = 0.1, width: int = D) -> np.ndarray:
    rng = np.random.default_rng(n)
    return np.clip(rng.normal(brightness, 0.05, (n, width)), 0, 1).astype(np.float32)


def gone(pid: int) -> bool:
    """The process has exited (a zombie nobody reaped yet counts as exited)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return True
    return state in ("Z", "X")


def test_the_child_scores_a_real_artifact_as_this_process_would(process, tiny_artifact) -> None:
    model = load_model(WorkerSettings(artifact=tiny_artifact))
    shadow = load_model(WorkerSettings(artifact=tiny_artifact))
    batch = images(40, 0.3, model.scorer.input_dim)
    for with_shadow, every_region in ((None, False), (shadow, True)):
        there = process.submit(model, with_shadow, batch, None, every_region).result()
        here = score_batch(model, with_shadow, batch, every_region)
        np.testing.assert_allclose(there.scores, here.scores, rtol=1e-5)
        np.testing.assert_array_equal(there.decisions.flagged, here.decisions.flagged)
        assert there.regions.keys() == here.regions.keys()
        assert (there.shadow is None) == (with_shadow is None)
        if there.shadow is not None and here.shadow is not None:
            np.testing.assert_allclose(there.shadow.scores, here.shadow.scores, rtol=1e-5)


def test_raw_uint8_pixels_are_scaled_in_the_child_as_the_codec_scales_them(process, tiny_artifact) -> None:
    model = load_model(WorkerSettings(artifact=tiny_artifact))
    pixels = np.random.default_rng(0).integers(0, 256, (30, model.scorer.input_dim), dtype=np.uint8)
    there = process.submit(model, None, pixels, model.uint8_scale, False).result()
    here = score_batch(model, None, scale_pixels(pixels, model.uint8_scale), False)
    np.testing.assert_allclose(there.scores, here.scores, rtol=1e-5)
    with pytest.raises(ValueError, match="pixels are float32, expected uint8 with scale"):
        process.submit(model, None, pixels.astype(np.float32), model.uint8_scale, False)


def test_a_reloaded_model_is_sent_before_the_next_batch(process) -> None:
    batch = images(10, 0.3)  # mean pixel about 0.3
    strict = make_model("v1", threshold=0.5, scorer=ChildScorer("v1"))
    lenient = make_model("v2", threshold=0.1, scorer=ChildScorer("v2"))
    assert not process.submit(strict, None, batch, None, False).result().decisions.flagged.any()
    assert process.submit(lenient, None, batch, None, False).result().decisions.flagged.all()
    assert not process.submit(strict, None, batch, None, False).result().decisions.flagged.any()


def test_a_scoring_error_is_raised_where_the_scores_are_collected_and_the_child_goes_on(process) -> None:
    broken = make_model(scorer=ChildScorer(fail="weights are NaN"))
    pending = process.submit(broken, None, images(5), None, False)
    with pytest.raises(ValueError, match="weights are NaN"):
        pending.result()
    pid = process.pid
    fine = make_model(scorer=ChildScorer())
    assert process.submit(fine, None, images(5), None, False).result().scores.shape == (5,)
    assert process.pid == pid


def test_a_child_killed_while_scoring_fails_that_batch_and_the_next_batch_starts_a_new_one(
    process, tmp_path
) -> None:
    gate = tmp_path / "gate"
    gated = make_model(scorer=ChildScorer(gate=gate))
    pending = process.submit(gated, None, images(5), None, False)
    wait_until(gate.with_suffix(".entered").exists, 30, what="the child scoring the batch")
    first = process.pid
    assert first is not None
    os.kill(first, signal.SIGKILL)
    died = rf"pid {first}\) exited with code -9 while scoring a batch"
    with pytest.raises(ScoringProcessError, match=died):
        pending.result()
    gate.touch()
    gated = make_model(scorer=ChildScorer(gate=gate))
    scored = process.submit(gated, None, images(5, 0.9), None, False).result()
    assert scored.decisions.flagged.all()
    assert process.pid not in (None, first)


def test_the_child_ignores_sigint_and_sigterm_and_leaves_when_its_socket_closes(process) -> None:
    process.start(D)
    pid = process.pid
    assert pid is not None
    os.kill(pid, signal.SIGTERM)  # what a supervisor might send the worker's whole group
    os.kill(pid, signal.SIGINT)
    fine = make_model(scorer=ChildScorer())
    assert process.submit(fine, None, images(3), None, False).result().scores.shape == (3,)
    assert process.pid == pid  # the same child scored it
    process.close()
    assert gone(pid)


def test_a_child_stuck_on_a_batch_is_killed_after_the_timeout_and_replaced(shared_dir, tmp_path) -> None:
    scoring = ScoringProcess(rows=8, score_timeout=1.0)
    try:
        gate = tmp_path / "gate"  # never opened while the first child scores
        pending = scoring.submit(make_model(scorer=ChildScorer(gate=gate)), None, images(4), None, False)
        stuck = scoring.pid
        with pytest.raises(ScoringProcessError, match=r"no answer within 1 s, killed"):
            pending.result()
        assert stuck is not None and gone(stuck)
        fine = make_model(scorer=ChildScorer())
        assert scoring.submit(fine, None, images(4), None, False).result().scores.shape == (4,)
        assert scoring.pid not in (None, stuck)
    finally:
        scoring.close()


def test_a_child_silent_at_start_is_killed_after_the_start_timeout(shared_dir, tmp_path) -> None:
    silent = tmp_path / "silent-python"
    silent.write_text('#!/bin/sh\necho $$ > "$0.pid"\nexec sleep 60\n')
    silent.chmod(0o755)
    scoring = ScoringProcess(rows=8, start_timeout=0.5, python=str(silent))
    with pytest.raises(ScoringProcessError, match=r"did not answer within 0.5 s of its start"):
        scoring.start(D)
    assert gone(int(Path(f"{silent}.pid").read_text()))
    assert scoring.failures == 1


def test_a_new_width_starts_a_child_with_a_buffer_that_fits(process) -> None:
    fine = make_model(scorer=ChildScorer())
    assert process.submit(fine, None, images(4, width=D), None, False).result().scores.shape == (4,)
    first = process.pid
    assert process.submit(fine, None, images(4, width=2 * D), None, False).result().scores.shape == (4,)
    assert process.pid not in (None, first)


def test_the_child_exits_when_the_worker_is_killed(tmp_path) -> None:
    script = textwrap.dedent(
        """
        import sys, time
        from worker.scoring_process import ScoringProcess
        scoring = ScoringProcess(rows=8)
        scoring.start(16)
        print(scoring.pid, flush=True)
        time.sleep(120)
        """
    )
    worker = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert worker.stdout is not None
        child = int(worker.stdout.readline())
        assert not gone(child)
        worker.kill()  # kill -9: no finally, no atexit
        worker.wait(10)
        wait_until(lambda: gone(child), 10, what=f"scoring process {child} to exit after its parent")
    finally:
        worker.kill()
        worker.wait(10)
        if worker.stdout is not None:
            worker.stdout.close()


def test_the_child_imports_the_workers_packages_not_the_working_directorys(
    process, tmp_path, monkeypatch
) -> None:
    impostor = tmp_path / "worker"
    impostor.mkdir()
    (impostor / "__init__.py").write_text("raise ImportError('the working directory holds another worker')\n")
    monkeypatch.chdir(tmp_path)  # as if the worker were started from a directory holding one
    fine = make_model(scorer=ChildScorer())
    assert process.submit(fine, None, images(3), None, False).result().scores.shape == (3,)


def test_a_model_the_child_cannot_import_fails_its_batch_and_counts_as_a_process_failure(process) -> None:
    from tests.support import ParentOnlyScorer

    model = make_model(scorer=ParentOnlyScorer())
    pending = process.submit(model, None, images(3), None, False)
    with pytest.raises(ScoringProcessError, match="cannot load the model it was sent: ModuleNotFoundError"):
        pending.result()
    assert process.failures == 1 and process.pid is not None  # the child is alive and still answers
    fine = make_model(scorer=ChildScorer())
    assert process.submit(fine, None, images(2), None, False).result().scores.shape == (2,)


def test_a_child_whose_worker_died_mid_batch_leaves_without_a_traceback(tmp_path) -> None:
    gate, log = tmp_path / "gate", tmp_path / "child.log"
    script = textwrap.dedent(
        f"""
        import numpy as np
        from pathlib import Path
        from tests.support import ChildScorer, make_model
        from worker.scoring_process import ScoringProcess
        scoring = ScoringProcess(rows=8)
        model = make_model(scorer=ChildScorer(gate=Path({str(gate)!r})))
        scoring.submit(model, None, np.zeros((4, 16), np.float32), None, False)
        print(scoring.pid, flush=True)
        import time; time.sleep(120)
        """
    )
    with log.open("w") as stderr:
        worker = subprocess.Popen(
            [sys.executable, "-c", script], cwd=ROOT, stdout=subprocess.PIPE, stderr=stderr, text=True
        )
    try:
        assert worker.stdout is not None
        child = int(worker.stdout.readline())
        wait_until(gate.with_suffix(".entered").exists, 30, what="the child scoring")
        worker.kill()  # the worker dies while its child scores
        worker.wait(10)
        gate.touch()  # the child finishes the batch and finds nobody to answer
        wait_until(lambda: gone(child), 30, what=f"scoring process {child} to exit")
        assert "Traceback" not in log.read_text() and "Error" not in log.read_text(), log.read_text()
    finally:
        worker.kill()
        worker.wait(10)
        if worker.stdout is not None:
            worker.stdout.close()


def test_no_file_is_left_behind_in_shared_memory(process, shared_dir) -> None:
    process.start(D)
    assert list(shared_dir.iterdir()) == []  # unlinked before the child started: nothing can leak
    fine = make_model(scorer=ChildScorer())
    assert process.submit(fine, None, images(3), None, False).result().scores.shape == (3,)
    process.close()
    assert list(shared_dir.iterdir()) == []


def test_a_batch_larger_than_the_buffer_is_refused_with_both_sizes(process) -> None:
    with pytest.raises(ValueError, match="a batch of 65 rows does not fit the scoring process's 64"):
        process.submit(make_model(scorer=ChildScorer()), None, images(65), None, False)


def test_a_child_that_cannot_start_is_an_error_naming_its_exit_code(shared_dir) -> None:
    scoring = ScoringProcess(rows=8, python="/bin/false")
    with pytest.raises(ScoringProcessError, match="exited with code 1 while starting"):
        scoring.start(D)
    missing = ScoringProcess(rows=8, python="/nonexistent/python")
    cannot = r"could not be started \(/nonexistent/python, a 512-byte buffer in .*No such file"
    with pytest.raises(ScoringProcessError, match=cannot):
        missing.start(D)
    assert list(shared_dir.iterdir()) == []  # no buffer file left behind by either
    assert (scoring.failures, missing.failures) == (1, 1)


def test_a_full_shared_memory_is_an_error_at_start_not_a_crash_later(monkeypatch, shared_dir) -> None:
    import worker.scoring_process as scoring_process

    def full(fd: int, offset: int, size: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(scoring_process.os, "posix_fallocate", full)
    with pytest.raises(ScoringProcessError, match=r"a 512-byte buffer in .*No space left on device"):
        ScoringProcess(rows=8).start(D)
    assert list(shared_dir.iterdir()) == []  # nothing left behind


def test_only_numpy_engines_that_pickle_are_sent_to_the_child(caplog) -> None:
    scoring = ScoringProcess(rows=8)  # never started: accepts only looks at the models
    numpy_model = make_model(scorer=ChildScorer())
    other = make_model()  # engine "fake": like the TensorFlow engine, scored on the thread
    assert scoring.accepts(numpy_model, None) and scoring.accepts(numpy_model, numpy_model)
    assert not scoring.accepts(other, None) and not scoring.accepts(numpy_model, other)
    locked = ChildScorer("v-locked")
    locked.lock = threading.Lock()  # type: ignore[attr-defined]  # a lock does not pickle
    unsendable = make_model("v-locked", scorer=locked)
    assert not scoring.accepts(unsendable, None)
    assert "model cannot be sent to the scoring process, scoring it on a thread model_version=v-locked" in (
        caplog.text
    )
    with pytest.raises(ValueError, match="model v-locked cannot be scored in a child process"):
        scoring.submit(unsendable, None, images(2), None, False)


def test_the_worker_metrics_show_the_childs_memory_and_cpu_while_it_runs(process) -> None:
    from prometheus_client import CollectorRegistry

    from worker.metrics import WorkerMetrics

    registry = CollectorRegistry()
    WorkerMetrics(registry).watch_scoring_process(lambda: process.pid)
    value = registry.get_sample_value
    assert value("anomaly_scoring_process_resident_memory_bytes") is None  # no child yet
    process.start(D)
    assert value("anomaly_scoring_process_resident_memory_bytes") > 10 * 2**20  # numpy and the detector
    assert value("anomaly_scoring_process_cpu_seconds_total") > 0
    process.close()
    assert value("anomaly_scoring_process_resident_memory_bytes") is None
