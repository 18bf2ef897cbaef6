"""Shadow scoring: a candidate model scores every batch beside the served one, publishes nothing to
the output stream, and reports how often it agrees; reloads cover it."""

from __future__ import annotations

import math
from pathlib import Path

import fakeredis
import pytest

from detector.errors import ArtifactError
from runtime.settings import WorkerSettings
from tests.support import build_runner, make_model, pending, push, stream
from worker.loaded_model import LoadedModel


@pytest.fixture
def r() -> fakeredis.FakeRedis:
    return fakeredis.FakeRedis()


def candidate(threshold: float = 0.3, version: str = "cand-v1") -> LoadedModel:
    """The fake mean-pixel model with a lower threshold: it flags more."""
    return make_model(version, threshold=threshold)


def push_three(r: fakeredis.FakeRedis) -> dict[str, bytes]:
    """One image both models call normal, one only the candidate flags, one both flag."""
    return {"both normal": push(r, 0.1, "a"), "candidate only": push(r, 0.4, "b"), "both": push(r, 0.9, "c")}


def test_the_shadow_model_never_publishes_to_the_output_stream(r) -> None:
    runner = build_runner(r, shadow=candidate(), scores_stream="scores")
    ids = push_three(r)
    runner.drain()
    assert [e["source_id"] for e in stream(r, "anomalies")] == [ids["both"].decode()]
    assert {e["model_version"] for e in stream(r, "scores")} == {"fake-v1"}
    assert pending(r) == 0


def test_agreement_ratio_and_shadow_counters_on_a_constructed_batch(r) -> None:
    runner = build_runner(r, shadow=candidate())
    value = runner.metrics.registry.get_sample_value
    assert math.isnan(value("anomaly_shadow_agreement_ratio"))
    push_three(r)
    runner.drain()
    assert value("anomaly_shadow_messages_scored_total") == 3
    assert value("anomaly_shadow_messages_flagged_total") == 2
    assert value("anomaly_messages_flagged_total") == 1
    assert value("anomaly_shadow_agreement_ratio") == pytest.approx(2 / 3)
    info = {"model_version": "cand-v1", "threshold_policy": "p95", "threshold": "0.3", "engine": "fake"}
    assert value("anomaly_shadow_model_info", info) == 1


def test_the_shadow_scores_stream_gets_the_candidates_decision_on_every_image(r) -> None:
    runner = build_runner(r, shadow=candidate(), shadow_artifact=Path("cand"), shadow_scores_stream="shadow")
    ids = push_three(r)
    runner.drain()
    rows = {e["id"]: e for e in stream(r, "shadow")}
    assert rows.keys() == {"a", "b", "c"}
    assert [(rows[k]["flagged"], rows[k]["primary_flagged"]) for k in "abc"] == [
        ("0", "0"),
        ("1", "0"),
        ("1", "1"),
    ]
    assert rows["b"]["source_id"] == ids["candidate only"].decode()
    assert {e["model_version"] for e in rows.values()} == {"cand-v1"}
    assert float(rows["b"]["threshold"]) == 0.3
    assert len(stream(r, "anomalies")) == 1


def test_a_shadow_that_fails_to_score_never_stops_the_served_results(r, caplog) -> None:
    shadow = candidate()

    def broken(images):
        raise FloatingPointError("candidate exploded")

    shadow.scorer.score_batch = broken  # type: ignore[method-assign]
    runner = build_runner(r, shadow=shadow, shadow_artifact=Path("cand"), shadow_scores_stream="shadow")
    ids = push_three(r)
    with caplog.at_level("ERROR", logger="worker.runner"):
        runner.drain()
        push_three(r)
        runner.drain()
    value = runner.metrics.registry.get_sample_value
    assert stream(r, "anomalies")[0]["source_id"] == ids["both"].decode()
    assert len(stream(r, "anomalies")) == 2 and pending(r) == 0  # served and acked as usual
    assert stream(r, "shadow") == []  # the candidate's results are skipped, never half written
    assert value("anomaly_shadow_errors_total") == 2  # one per batch
    assert value("anomaly_shadow_messages_scored_total") == 0
    failures = [rec.getMessage() for rec in caplog.records if "shadow model failed" in rec.getMessage()]
    assert len(failures) == 1 and "FloatingPointError: candidate exploded" in failures[0]  # once a minute


def test_without_a_shadow_nothing_is_reported(r) -> None:
    runner = build_runner(r)
    push_three(r)
    runner.drain()
    assert runner.metrics.registry.get_sample_value("anomaly_shadow_messages_scored_total") == 0


def test_reload_swaps_the_shadow_too(r) -> None:
    runner = build_runner(
        r,
        shadow=candidate(),
        loader=lambda: make_model("fake-v2"),
        shadow_loader=lambda: candidate(version="cand-v2"),
    )
    assert runner.reload()
    assert runner.model.scorer.model_version == "fake-v2"
    assert runner.shadow is not None and runner.shadow.scorer.model_version == "cand-v2"
    push(r, 0.9)
    runner.drain()
    info = {"model_version": "cand-v2", "threshold_policy": "p95", "threshold": "0.3", "engine": "fake"}
    assert runner.metrics.registry.get_sample_value("anomaly_shadow_model_info", info) == 1


def test_a_broken_shadow_on_reload_keeps_both_old_models(r) -> None:
    def broken() -> LoadedModel:
        raise ArtifactError("cand/dense_stack.npz is unreadable")

    runner = build_runner(r, shadow=candidate(), loader=lambda: make_model("fake-v2"), shadow_loader=broken)
    assert not runner.reload()
    assert runner.model.scorer.model_version == "fake-v1"
    assert runner.shadow is not None and runner.shadow.scorer.model_version == "cand-v1"
    assert runner.metrics.registry.get_sample_value("anomaly_model_reloads_total", {"result": "failure"}) == 1


def test_a_shadow_of_another_image_width_is_refused(r) -> None:
    class Wider:
        input_dim = 32
        engine = "fake"
        model_version = "wide"

        def score_batch(self, images):  # pragma: no cover - never called
            raise AssertionError

    wide = LoadedModel(Wider(), candidate().rule, 1 / 255, "wide")
    with pytest.raises(ArtifactError, match=r"takes 32 features .* expected 16"):
        build_runner(r, shadow=wide)


def test_a_shadow_scores_stream_without_a_shadow_artifact_is_refused() -> None:
    with pytest.raises(ValueError, match="ANOMALY_SHADOW_SCORES_STREAM is set but ANOMALY_SHADOW_ARTIFACT"):
        WorkerSettings(shadow_scores_stream="shadow")  # type: ignore[call-arg]


def test_the_shadow_scores_stream_must_differ_from_the_others() -> None:
    with pytest.raises(ValueError, match="must differ"):
        WorkerSettings(shadow_artifact=Path("c"), shadow_scores_stream="anomalies")  # type: ignore[call-arg]
