"""anomaly-compare: two artifacts' decisions on the same images, from a stream (read-only) or a file."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from detector.artifact import load_artifact
from detector.engines.numpy_engine import NumpyScorer
from producer.client import ImageProducer
from tests.conftest import RedisServer, mnist_sample
from tools.compare import compare_decisions, main
from worker.scoring import DecisionRule

pytestmark = pytest.mark.integration


def rule(threshold: float) -> DecisionRule:
    return DecisionRule(threshold, f"t{threshold}", 0.25, 0.1, 0.05, np.linspace(0, 1, 11))


def test_decisions_are_compared_both_ways_on_a_constructed_case() -> None:
    scores = np.array([0.1, 0.4, 0.9, 0.35])
    c = compare_decisions(("a", "va", rule(0.5), scores), ("b", "vb", rule(0.3), scores))
    assert (c.images, c.a.flagged, c.b.flagged) == (4, 1, 3)
    assert (c.flagged_by_both, c.only_a, c.only_b) == (1, 0, 2)
    assert c.agreement == 0.5 and c.b.flag_rate == 0.75
    assert c.score_rank_correlation == pytest.approx(1.0)
    reversed_ranks = compare_decisions(("a", "va", rule(0.5), scores), ("b", "vb", rule(0.5), -scores))
    assert reversed_ranks.score_rank_correlation == pytest.approx(-1.0)


def uint8_digits(n: int) -> np.ndarray:
    return (mnist_sample(n, seed=9)[0] * 255).round().astype(np.uint8)


def expected_flags(artifact: Path, images: np.ndarray, policy: str | None) -> np.ndarray:
    loaded = load_artifact(artifact)
    scores = NumpyScorer(loaded).score_batch(images.astype(np.float32) / 255)
    return DecisionRule.from_artifact(loaded, policy).decide(scores).flagged


def test_compares_on_the_newest_stream_entries_without_touching_the_stream(
    tiny_artifact: Path, redis_client, redis_server: RedisServer, capsys: pytest.CaptureFixture[str]
) -> None:
    older, newest = uint8_digits(500)[:100], uint8_digits(500)[100:]
    ImageProducer(redis_client, "images").push_many(older)
    ImageProducer(redis_client, "images").push_many(newest)
    redis_client.xadd("images", {"image": b"short"})  # the newest entry, rejected by the decoder
    args = [str(tiny_artifact), str(tiny_artifact), "--redis-url", redis_server.url, "--count", "401"]
    assert main([*args, "--threshold-b", "p50", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    own, median = expected_flags(tiny_artifact, newest, None), expected_flags(tiny_artifact, newest, "p50")
    assert result["images"] == 400 and result["rejected_entries"] == 1
    assert result["a"]["flagged"] == int(own.sum()) and result["b"]["flagged"] == int(median.sum())
    assert result["agreement"] == pytest.approx(float(np.mean(own == median)))
    assert result["only_a"] == int((own & ~median).sum()) and result["b"]["threshold_policy"] == "p50"
    assert result["score_rank_correlation"] == pytest.approx(1.0)
    assert redis_client.xlen("images") == 501 and redis_client.xinfo_groups("images") == []


def test_compares_on_an_npy_file_and_prints_a_table(
    tiny_artifact: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    images = uint8_digits(200)
    np.save(tmp_path / "images.npy", images)
    assert main([str(tiny_artifact), str(tiny_artifact), "--npy", str(tmp_path / "images.npy")]) == 0
    out = capsys.readouterr().out
    assert "images compared:      200" in out and "same decision:        100.00%" in out
    assert "flagged by B only:    0" in out


def test_a_broken_artifact_is_reported_by_name(tiny_artifact: Path, tmp_path: Path, capsys) -> None:
    np.save(tmp_path / "images.npy", uint8_digits(10))
    code = main([str(tiny_artifact), str(tmp_path / "missing"), "--npy", str(tmp_path / "images.npy")])
    assert code == 2
    assert str(tmp_path / "missing") in capsys.readouterr().err
