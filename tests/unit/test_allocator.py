"""ANOMALY_TUNE_MALLOC: the memory one batch frees serves the next instead of faulting in afresh."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from runtime.settings import WorkerSettings
from worker.allocator import (
    BATCH_LOOP_SETTINGS,
    M_MMAP_THRESHOLD,
    M_TOP_PAD,
    M_TRIM_THRESHOLD,
    glibc_mallopt,
    keep_freed_memory,
)

# A batch's allocations in miniature: the joined payloads, the float32 images, a reconstruction
# and its error; prints the page faults per batch once the loop is warm.
BATCH_LOOP = textwrap.dedent(
    """
    import resource, sys
    import numpy as np
    from worker.allocator import keep_freed_memory
    if sys.argv[1] == "tuned":
        assert all(keep_freed_memory().values())
    rng = np.random.default_rng(0)
    payloads = [rng.integers(0, 255, 784, dtype=np.uint8).tobytes() for _ in range(256)]
    encode = rng.random((784, 64), dtype=np.float32)
    decode = rng.random((64, 784), dtype=np.float32)

    def batch():
        images = np.frombuffer(b"".join(payloads), np.uint8).reshape(256, 784) * np.float32(1 / 255)
        error = images - (images @ encode) @ decode
        return float((error * error).sum())

    for _ in range(20):
        batch()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(100):
        batch()
    print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 100)
    """
)


def faults_per_batch(mode: str) -> float:
    done = subprocess.run(
        [sys.executable, "-c", BATCH_LOOP, mode], capture_output=True, text=True, timeout=120, check=True
    )
    return float(done.stdout.strip())


def test_each_threshold_is_set_and_reported() -> None:
    calls: list[tuple[int, int]] = []

    def mallopt(param: int, value: int) -> int:
        calls.append((param, value))
        return 1

    tuned = keep_freed_memory(mallopt)

    assert calls == list(BATCH_LOOP_SETTINGS)
    assert {param for param, _ in calls} == {M_MMAP_THRESHOLD, M_TRIM_THRESHOLD, M_TOP_PAD}
    assert tuned == {
        "mmap_threshold=16777216": True,
        "trim_threshold=67108864": True,
        "top_pad=16777216": True,
    }


def test_a_refused_threshold_is_reported_as_not_taken() -> None:
    tuned = keep_freed_memory(lambda param, value: 0 if param == M_TOP_PAD else 1)

    assert tuned["top_pad=16777216"] is False
    assert tuned["mmap_threshold=16777216"] is True


def test_the_mmap_threshold_holds_the_largest_batch() -> None:
    largest_batch_bytes = 4096 * 784 * 4  # ANOMALY_BATCH_SIZE's upper bound, float32 images
    assert dict(BATCH_LOOP_SETTINGS)[M_MMAP_THRESHOLD] > largest_batch_bytes


def test_tuning_is_on_by_default_and_can_be_turned_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ANOMALY_REDIS_URL", "redis://localhost:6379/0")
    assert WorkerSettings().tune_malloc is True
    monkeypatch.setenv("ANOMALY_TUNE_MALLOC", "false")
    assert WorkerSettings().tune_malloc is False


@pytest.mark.skipif(glibc_mallopt() is None, reason="mallopt is glibc's; this C library has none")
def test_the_batch_loop_stops_faulting_its_memory_back_in() -> None:
    untuned = faults_per_batch("defaults")
    if untuned < 100:
        pytest.skip(f"this glibc's defaults fault {untuned:.0f} pages per batch: nothing to stop")

    assert faults_per_batch("tuned") < 5, f"with the defaults: {untuned:.0f} page faults per batch"
