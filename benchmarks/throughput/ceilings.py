"""Step 3, the ceilings: the bare consumer loop, the forward pass alone, the naive per-message loop."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import numpy as np

from benchmarks.throughput.helpers import StreamReply, log
from benchmarks.throughput.plan import BARE_GROUP, DIM, NAIVE_GROUP
from benchmarks.throughput.project import (
    DecisionRule,
    KerasScorer,
    LoadedModel,
    NumpyScorer,
    load_artifact,
    reconstruction_errors,
    square_side,
)
from benchmarks.throughput.session import Bench


def bare_consumer(bench: Bench, dtype: str, batch_size: int, entries: int) -> float:
    """XREADGROUP COUNT batch + decode to a float32 (n, 784) array + XACK, no scoring: msg/s."""
    stream, _, expected = bench.rewind(dtype, entries, BARE_GROUP)
    scale = np.float32(1.0 / 255.0)
    done = 0
    started = time.perf_counter()
    while True:
        reply = cast(StreamReply, bench.r.xreadgroup(BARE_GROUP, "bare", {stream: ">"}, count=batch_size))
        if not reply:
            break
        items = reply[0][1]
        ids = [entry_id for entry_id, _ in items]
        raw = [fields[b"image"] for _, fields in items]
        if dtype == "uint8":
            images = np.frombuffer(b"".join(raw), np.uint8).reshape(len(raw), DIM) * scale
        elif dtype == "float32":
            images = np.frombuffer(b"".join(raw), "<f4").reshape(len(raw), DIM).astype(np.float32)
        else:
            images = np.asarray([json.loads(p) for p in raw], np.float32)
        assert images.shape == (len(ids), DIM)
        bench.r.xack(stream, BARE_GROUP, *ids)
        done += len(ids)
    elapsed = time.perf_counter() - started
    if done != expected:
        log(f"warning: bare loop read {done} entries, expected {expected}")
    return done / elapsed


def scoring_ceiling(bench: Bench) -> tuple[dict[str, float], Any]:
    """Scoring alone (the forward pass and the artifact's score), images/s: both engines per
    batch size; the eager call and model.predict with the per-row MSE, for reference.

    Returns the rates and the Keras model, which the naive baseline calls.
    """
    import tensorflow as tf

    artifact = load_artifact(bench.artifact)
    compiled = KerasScorer(artifact, max_batch=1024, jit=True)
    compiled.warm_up(1024)
    engines: dict[str, NumpyScorer | KerasScorer] = {"numpy": NumpyScorer(artifact), "compiled": compiled}
    x = bench.images[:1024].astype(np.float32) / 255.0
    seconds = bench.plan.ceiling_seconds

    def timed(rows: int, fn: Callable[[], Any]) -> float:
        fn()
        count, started = 0, time.perf_counter()
        while (elapsed := time.perf_counter() - started) < seconds:
            fn()
            count += rows
        return count / elapsed

    out: dict[str, float] = {}
    for name, scorer in engines.items():
        for b in (1, 32, 256, 1024):
            out[f"{name} b{b}"] = timed(b, lambda b=b, s=scorer: s.score_batch(x[:b]))  # type: ignore[misc]
    model = compiled.model
    x256 = x[:256]

    def eager() -> np.ndarray:
        z = tf.constant(x256)
        return np.asarray(tf.reduce_mean(tf.square(z - model(z, training=False)), axis=1))

    def predict() -> np.ndarray:
        return np.mean(np.square(x256 - model.predict(x256, batch_size=256, verbose=0)), axis=1)

    out["eager b256"] = timed(256, eager)
    out["model.predict b256"] = timed(256, predict)
    # The parity the worker relies on, checked on the benchmark's own artifact too: both engines
    # against the artifact's score of model.predict's outputs (as the trainer calibrated it). A
    # combined score is a sum of z-scores: near 0 its float32 noise is absolute, not relative.
    reference = reconstruction_errors(model, x256, artifact.score)
    atol = 1e-7 if artifact.score.name == "mse" else 1e-4
    for scorer in engines.values():
        np.testing.assert_allclose(scorer.score_batch(x256), reference, rtol=1e-4, atol=atol)
    return out, model


def naive_per_message(bench: Bench, model: Any) -> float:
    """One XREADGROUP COUNT 1, decode, model.predict, XADD result and XACK per message: msg/s."""
    stream, _, _ = bench.rewind("uint8", bench.plan.naive_messages, NAIVE_GROUP)
    done, started = 0, time.perf_counter()
    while done < bench.plan.naive_messages:
        reply = cast(StreamReply, bench.r.xreadgroup(NAIVE_GROUP, "naive", {stream: ">"}, count=1))
        if not reply:
            break
        [(entry_id, fields)] = reply[0][1]
        x = np.frombuffer(fields[b"image"], np.uint8).reshape(1, DIM) / np.float32(255.0)
        score = float(np.mean(np.square(x - model.predict(x, verbose=0))))
        bench.r.xadd("bench:naive-scores", {"source_id": entry_id, "score": repr(score)})
        bench.r.xack(stream, NAIVE_GROUP, entry_id)
        done += 1
    return done / (time.perf_counter() - started)


def region_cost(artifact: Path, images: np.ndarray, seconds: float) -> dict[str, float]:
    """What the `region` and `score_components` fields cost per batch of 256 digits (numpy engine,
    one BLAS thread as the worker runs): the worker's path (one more forward pass of the flagged
    rows: their components' contributions, their error's window) and the
    scores-stream path (every row's window from the scoring pass's own error: its time beyond
    `score_batch`), in ms."""
    from threadpoolctl import threadpool_limits

    loaded = load_artifact(artifact)
    scorer = NumpyScorer(loaded)
    rule = DecisionRule.from_artifact(loaded)
    model = LoadedModel(scorer, rule, 1 / 255, "", region_side=square_side(scorer.input_dim))
    x = images[:256].astype(np.float32) / 255.0
    flagged = rule.decide(scorer.score_batch(x)).flagged

    def ms_per_call(fn: Callable[[], Any], repeats: int = 5) -> float:
        """Median of `repeats` timed runs, like the drains: one burst of other jobs moves it less."""
        fn()
        runs = []
        for _ in range(repeats):
            count, started = 0, time.perf_counter()
            while (elapsed := time.perf_counter() - started) < seconds / repeats:
                fn()
                count += 1
            runs.append(elapsed / count * 1000.0)
        return float(np.median(runs))

    with threadpool_limits(1):
        score_ms = ms_per_call(lambda: scorer.score_batch(x))
        flagged_ms = ms_per_call(lambda: model.explain(x, flagged))
        every_ms = max(0.0, ms_per_call(lambda: model.score_and_locate(x)) - score_ms)
    return {
        "batch": 256.0,
        "flagged_rows": float(np.count_nonzero(flagged)),
        "score_batch_ms": score_ms,
        "explain_flagged_ms": flagged_ms,
        "region_every_row_ms": every_ms,
    }
