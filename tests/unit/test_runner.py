"""The loop against fakeredis with a fake scorer (score = mean pixel): what lands where, and when."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from typing import Any

import fakeredis
import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from detector.errors import ArtifactError
from tests.conftest import wait_until
from tests.support import D, build_runner, make_model, pending, push, stream
from worker.commit import build_commit
from worker.isolation import ScoringFailed
from worker.loaded_model import LoadedModel
from worker.runner import Runner
from worker.stream import OUTPUT, SCORES


@pytest.fixture
def r() -> fakeredis.FakeRedis:
    return fakeredis.FakeRedis()


@pytest.fixture
def make_runner(r: fakeredis.FakeRedis) -> Callable[..., Runner]:
    def factory(consumer: str = "w1", **kwargs: Any) -> Runner:
        return build_runner(r, consumer=consumer, **kwargs)

    return factory


def test_flagged_images_are_published_with_the_contract_fields(r, make_runner) -> None:
    runner = make_runner()
    normal = push(r, 0.1, "cam-1")
    bright = push(r, 0.9, "cam-2")
    runner.drain()
    out = stream(r, "anomalies")
    assert len(out) == 1
    entry = out[0]
    assert set(entry) == {
        "id",
        "source_id",
        "score",
        "threshold",
        "z",
        "p_value",
        "model_version",
        "scored_at_ms",
        "score_components",
    }
    assert entry["id"] == "cam-2" and entry["source_id"] == bright.decode()
    assert float(entry["score"]) == pytest.approx(round(0.9 * 255) / 255, rel=1e-6)
    assert float(entry["threshold"]) == 0.5
    assert float(entry["z"]) == pytest.approx((round(0.9 * 255) / 255 - 0.25) / 0.1, rel=1e-6)
    # Conformal p-value: no held-out score (0, 0.006, ..., 0.6) is as large, so (1 + 0) / (101 + 1).
    assert float(entry["p_value"]) == pytest.approx(1 / 102)
    assert entry["model_version"] == "fake-v1"
    assert normal.decode() not in {e["source_id"] for e in out}
    assert pending(r) == 0


def test_output_id_falls_back_to_the_input_entry_id(r, make_runner) -> None:
    source = push(r, 0.9)
    make_runner().drain()
    assert stream(r, "anomalies")[0]["id"] == source.decode()


def test_one_forward_pass_per_batch_not_per_message(r, make_runner) -> None:
    runner = make_runner(batch_size=50)
    for i in range(120):
        push(r, 0.1 + (i % 2) * 0.8)
    runner.drain()
    assert runner.model.scorer.calls == [50, 50, 20]  # type: ignore[attr-defined]


def test_bad_entries_go_to_dead_letter_with_reason_and_original_fields_and_are_acked(r, make_runner) -> None:
    runner = make_runner()
    short = r.xadd("images", {"image": b"\x00" * 3, "id": "p-7", "tenant": "acme"})
    nan = r.xadd("images", {"image": "[" + ",".join(["NaN"] * D) + "]", "dtype": "json"})
    clash = r.xadd("images", {"image": b"x", "reason": "mine"})
    push(r, 0.1)
    runner.drain()
    dead = {e["source_id"]: e for e in stream(r, "images:dead-letter")}
    assert set(dead) == {short.decode(), nan.decode(), clash.decode()}
    assert dead[short.decode()]["reason"] == f"image has 3 bytes, expected {D} for dtype uint8"
    assert dead[short.decode()]["reason_code"] == "bad_length"
    assert (dead[short.decode()]["id"], dead[short.decode()]["tenant"]) == ("p-7", "acme")
    assert dead[nan.decode()]["reason_code"] == "non_finite"
    assert dead[clash.decode()]["original:reason"] == "mine"
    assert stream(r, "anomalies") == []
    assert pending(r) == 0


def test_metrics_count_scored_flagged_and_invalid(r, make_runner) -> None:
    registry = CollectorRegistry()
    runner = make_runner(registry=registry)
    for b in (0.1, 0.1, 0.9):
        push(r, b)
    push(r, 0.9, dtype="float32")
    r.xadd("images", {"image": b"bad"})
    runner.drain()
    value = registry.get_sample_value
    assert value("anomaly_messages_scored_total") == 4
    assert value("anomaly_messages_flagged_total") == 2
    assert value("anomaly_messages_invalid_total", {"reason": "bad_length"}) == 1
    assert value("anomaly_messages_total", {"dtype": "uint8", "outcome": "normal"}) == 2
    assert value("anomaly_messages_total", {"dtype": "float32", "outcome": "flagged"}) == 1
    assert value("anomaly_messages_total", {"dtype": "uint8", "outcome": "dead_letter"}) == 1
    assert value("anomaly_detection_rate") == 0.5
    assert value("anomaly_threshold") == 0.5
    assert value("anomaly_expected_detection_rate") == 0.05
    assert value("anomaly_score_count") == 4
    assert value("anomaly_end_to_end_latency_seconds_count") == 4
    assert value("anomaly_batch_size_sum") == 5
    assert (
        value(
            "anomaly_model_info",
            {"model_version": "fake-v1", "threshold_policy": "p95", "threshold": "0.5", "engine": "fake"},
        )
        == 1
    )


def test_group_gauges_show_the_sampled_pending_and_lag(r, make_runner) -> None:
    other = make_runner(consumer="other")
    other.start()
    for _ in range(3):
        push(r, 0.1)
    other.stream.read_new(2, None)  # another worker holds 2 pending; 1 entry not yet delivered
    registry = CollectorRegistry()
    make_runner(registry=registry).run_once()  # samples the group before it reads
    assert registry.get_sample_value("anomaly_consumer_group_pending", {"shard": "0"}) == 2
    assert registry.get_sample_value("anomaly_consumer_group_lag", {"shard": "0"}) == 1


def test_scores_stream_gets_every_score_with_flagged_field(r, make_runner) -> None:
    runner = make_runner(scores_stream="images:scores")
    low, high = push(r, 0.1), push(r, 0.9)
    runner.drain()
    scores = {e["source_id"]: e for e in stream(r, "images:scores")}
    assert scores[low.decode()]["flagged"] == "0" and scores[high.decode()]["flagged"] == "1"
    assert len(stream(r, "anomalies")) == 1


def test_backlog_pushed_before_the_group_existed_is_scored(r, make_runner) -> None:
    early = push(r, 0.9)
    make_runner().drain()
    assert [e["source_id"] for e in stream(r, "anomalies")] == [early.decode()]


def test_start_id_dollar_skips_the_backlog(r, make_runner) -> None:
    push(r, 0.9)
    runner = make_runner(start_id="$")
    runner.drain()
    later = push(r, 0.9)
    runner.drain()
    assert [e["source_id"] for e in stream(r, "anomalies")] == [later.decode()]


def test_restarted_consumer_first_handles_its_own_pending_entries(r, make_runner) -> None:
    first = make_runner()
    first.start()
    ids = [push(r, 0.9) for _ in range(3)]
    first.stream.read_new(10, None)  # delivered, then the worker "crashes" before committing
    assert pending(r) == 3
    make_runner().drain()  # same consumer name, as after a restart with a stable name
    assert sorted(e["source_id"] for e in stream(r, "anomalies")) == sorted(i.decode() for i in ids)
    assert pending(r) == 0


def test_entries_of_a_dead_consumer_are_reclaimed_once(r, make_runner) -> None:
    dead = make_runner(consumer="dead")
    dead.start()
    ids = [push(r, 0.9) for _ in range(4)]
    dead.stream.read_new(10, None)
    patient = make_runner(consumer="alive", claim_idle_ms=60_000)
    patient.drain()
    assert stream(r, "anomalies") == []  # not idle long enough yet: the owner may still be working
    alive = make_runner(consumer="alive", claim_idle_ms=100)
    wait_until(lambda: alive.drain() or stream(r, "anomalies"), 5, what="entries idle 100 ms reclaimed")
    assert sorted(e["source_id"] for e in stream(r, "anomalies")) == sorted(i.decode() for i in ids)
    assert alive.metrics.registry.get_sample_value("anomaly_messages_reclaimed_total") == 4
    alive.drain()
    assert len(stream(r, "anomalies")) == 4 and pending(r) == 0


def test_a_result_is_not_published_when_another_consumer_already_acked_the_entry(r, make_runner) -> None:
    slow = make_runner(consumer="slow")
    slow.start()
    entry = push(r, 0.9)
    entries = slow.stream.read_new(10, None)
    r.xack("images", "anomaly-scorer", entry)  # another worker reclaimed and committed it meanwhile
    slow.handle_batch(entries)
    assert stream(r, "anomalies") == []


@pytest.mark.parametrize("n", [1, 40], ids=["per-id-check", "range-check"])
def test_a_stale_workers_ack_of_a_normal_entry_leaves_it_to_its_new_owner(r, make_runner, n: int) -> None:
    slow = make_runner(consumer="slow")  # scores the entries normal (brightness 0.1 < 0.5)
    slow.start()
    ids = [push(r, 0.1) for _ in range(n)]
    entries = slow.stream.read_new(100, None)
    # While "slow" was paused, another worker took the entries over (as XAUTOCLAIM does)...
    r.xclaim("images", "anomaly-scorer", "owner", 0, ids)
    slow.handle_batch(entries)  # ...so the stale worker's plain acks are fenced, not applied
    assert slow.metrics.registry.get_sample_value("anomaly_messages_fenced_total") == n
    owners = {row["consumer"] for row in r.xpending_range("images", "anomaly-scorer", "-", "+", 100)}
    assert owners == {b"owner"} and pending(r) == n
    # The owner's model flags them (a stricter threshold): its anomalies are published.
    make_runner(consumer="owner", model=make_model(threshold=0.05)).drain()
    assert sorted(e["source_id"] for e in stream(r, "anomalies")) == sorted(i.decode() for i in ids)
    assert pending(r) == 0


def test_poison_entry_delivered_too_often_goes_to_dead_letter_with_count(r, make_runner) -> None:
    runner = make_runner(max_deliveries=2)
    runner.start()
    entry = push(r, 0.9)
    # Three deliveries that never committed (the worker crashed each time it read the entry).
    r.xreadgroup("anomaly-scorer", "w1", {"images": ">"})
    for _ in range(2):
        r.xreadgroup("anomaly-scorer", "w1", {"images": "0"})
    runner.start()
    runner.drain()
    dead = stream(r, "images:dead-letter")
    assert [d["source_id"] for d in dead] == [entry.decode()]
    assert dead[0]["reason_code"] == "max_deliveries"
    assert "delivered 4 times" in dead[0]["reason"] and "limit of 2" in dead[0]["reason"]
    assert stream(r, "anomalies") == [] and pending(r) == 0


def test_output_stream_is_capped_approximately(r, make_runner) -> None:
    runner = make_runner(output_maxlen=10)
    for _ in range(300):
        push(r, 0.9)
    runner.drain()
    assert r.xlen("anomalies") < 300


def test_reload_swaps_the_model_between_batches(r, make_runner) -> None:
    runner = make_runner(loader=lambda: make_model("fake-v2", threshold=0.95))
    push(r, 0.9)
    runner.drain()
    runner.reload_event.set()
    push(r, 0.9)
    runner.drain()
    versions = [e["model_version"] for e in stream(r, "anomalies")]
    assert versions == ["fake-v1"]  # 0.9 is below v2's threshold of 0.95
    assert runner.metrics.registry.get_sample_value("anomaly_model_reloads_total", {"result": "success"}) == 1
    assert runner.metrics.registry.get_sample_value("anomaly_threshold") == 0.95


def test_broken_new_artifact_is_refused_and_the_old_model_keeps_serving(r, make_runner) -> None:
    def broken() -> LoadedModel:
        raise ArtifactError("checksum mismatch for model.keras")

    runner = make_runner(loader=broken)
    runner.reload_event.set()
    push(r, 0.9)
    runner.drain()
    assert [e["model_version"] for e in stream(r, "anomalies")] == ["fake-v1"]
    assert runner.metrics.registry.get_sample_value("anomaly_model_reloads_total", {"result": "failure"}) == 1


def test_build_commit_acks_normal_entries_without_publishing() -> None:
    from contract.codec import DecodedBatch
    from worker.scoring import Decisions

    decoded = DecodedBatch(
        [b"1-0", b"2-0"], [{}, {b"id": b"x"}], ["uint8", "uint8"], np.zeros((2, D), np.float32)
    )
    decisions = Decisions(np.array([False, True]), np.zeros(2), np.ones(2))
    commit = build_commit(
        decoded,
        np.array([0.1, 0.9]),
        decisions,
        model_version="v",
        threshold=0.5,
        now_ms=1,
        with_scores_stream=False,
    )
    assert commit.plain_ids == [b"1-0"]
    assert [(eid, [t for t, _ in adds]) for eid, adds in commit.records] == [(b"2-0", [OUTPUT])]
    with_scores = build_commit(
        decoded,
        np.array([0.1, 0.9]),
        decisions,
        model_version="v",
        threshold=0.5,
        now_ms=1,
        with_scores_stream=True,
    )
    assert with_scores.plain_ids == []
    assert [[t for t, _ in adds] for _, adds in with_scores.records] == [[SCORES], [OUTPUT, SCORES]]


def test_json_payloads_are_scored_like_uint8(r, make_runner) -> None:
    runner = make_runner()
    r.xadd("images", {"image": json.dumps([0.9] * D), "dtype": "json", "id": "j"})
    runner.drain()
    assert stream(r, "anomalies")[0]["id"] == "j"


def test_entry_trimmed_while_pending_is_dead_lettered_as_deleted(r, make_runner) -> None:
    dead = make_runner(consumer="dead")
    dead.start()
    entry = push(r, 0.9)
    dead.stream.read_new(10, None)
    r.xdel("images", entry)
    alive = make_runner(consumer="alive", claim_idle_ms=100)
    time.sleep(0.15)
    alive.drain()
    assert [(d["source_id"], d["reason_code"]) for d in stream(r, "images:dead-letter")] == [
        (entry.decode(), "deleted")
    ]
    assert pending(r) == 0


def test_idle_consumers_with_nothing_pending_are_removed_but_busy_ones_kept(r, make_runner) -> None:
    gone, busy = make_runner(consumer="gone"), make_runner(consumer="busy")
    gone.drain()
    busy.start()
    push(r, 0.9)
    busy.stream.read_new(10, None)  # holds one pending entry
    time.sleep(0.15)
    me = make_runner(consumer="me", dead_consumer_idle_ms=100)
    me.drain()
    names = {c["name"] for c in r.xinfo_consumers("images", "anomaly-scorer")}
    assert b"gone" not in names and b"busy" in names and b"me" in names


def test_ready_as_soon_as_the_group_exists_before_any_read(r, make_runner) -> None:
    runner = make_runner()
    assert not runner.health.ready()
    runner.start()
    assert runner.health.ready()
    assert runner.metrics.registry.get_sample_value("anomaly_redis_up") == 1


@pytest.mark.parametrize(("prefetch", "in_hand"), [(True, 2), (False, 1)])
def test_slow_output_never_makes_the_worker_read_further_ahead(r, make_runner, prefetch, in_hand) -> None:
    runner = make_runner(batch_size=20, prefetch=prefetch)
    for i in range(200):
        push(r, 0.9 if i % 2 else 0.1)
    seen_pending: list[int] = []
    commit, read_new = runner.stream.send_commit, runner.stream.read_new
    reads = {"done": 0}

    def counted_read(*args: Any) -> Any:
        entries = read_new(*args)
        reads["done"] += 1
        return entries

    def slow_commit(batch):  # the output side is slow: look at what is in flight meanwhile
        if prefetch:  # batch k came from read k; the read ahead (read k + 1) runs meanwhile: let it end
            batch_number = len(seen_pending) + 1
            wait_until(
                lambda: reads["done"] > batch_number, 5, what=f"the read ahead of batch {batch_number}"
            )
        seen_pending.append(pending(r))
        return commit(batch)

    runner.stream.send_commit = slow_commit  # type: ignore[method-assign]
    runner.stream.read_new = counted_read  # type: ignore[method-assign]
    runner.drain()
    # The batch being committed, plus (with prefetch) the next one read meanwhile; never more.
    assert len(seen_pending) == 10 and max(seen_pending) == 20 * in_hand
    assert pending(r) == 0


def test_with_a_backlog_the_next_batch_is_read_while_this_one_is_committed(r, make_runner) -> None:
    runner = make_runner(batch_size=50)
    for i in range(120):
        push(r, 0.9 if i % 3 == 0 else 0.1)
    assert runner.run_once() == 50
    assert r.xlen("anomalies") == 17  # the first batch is committed when run_once returns...
    assert pending(r) == 50  # ...and the second is read (pending in Redis) but not yet handled
    assert runner.run_once() == 50  # handled from memory: the stream's next 20 are read meanwhile
    assert runner.run_once() == 20  # still a backlog (a quarter of 50 or more): its read ahead is empty
    assert pending(r) == 0 and r.xlen("anomalies") == 40
    assert runner.model.scorer.calls == [50, 50, 20]  # type: ignore[attr-defined]
    sources = [e["source_id"] for e in stream(r, "anomalies")]
    assert len(set(sources)) == 40  # each flagged entry published once


def test_a_batch_whose_metrics_fail_is_still_committed_and_its_connection_returned(r, make_runner) -> None:
    runner = make_runner(batch_size=10)
    for i in range(4):
        push(r, 0.9 if i % 2 else 0.1)

    def broken_record(*args: Any) -> Any:
        raise RuntimeError("metrics broke")

    runner.recorder.scored = broken_record  # type: ignore[method-assign]
    with pytest.raises(RuntimeError, match="metrics broke"):
        runner.run_once()
    # The commit was sent before the metrics were recorded: its answer was still read.
    assert pending(r) == 0 and len(stream(r, "anomalies")) == 2
    assert not runner.stream.redis.connection_pool._in_use_connections


def test_with_a_backlog_the_next_batch_is_scored_while_this_one_is_committed(r, make_runner) -> None:
    runner = make_runner(batch_size=20)
    for i in range(100):
        push(r, 0.9 if i % 2 else 0.1)
    commit = runner.stream.send_commit
    scorer = runner.model.scorer
    committed: list[int] = []

    def commit_once_the_next_is_scored(batch):
        # Batch k commits on this thread only after batch k+1 was scored on the scoring thread
        # (or nothing is left to read ahead): a runner that scored in turn would time out here.
        k = len(committed) + 1
        wait_until(
            lambda: len(scorer.calls) > k or (k >= 4 and not runner._ready),  # type: ignore[attr-defined]
            5,
            what=f"the scores of batch {k + 1} while batch {k} commits",
        )
        committed.append(k)
        return commit(batch)

    runner.stream.send_commit = commit_once_the_next_is_scored  # type: ignore[method-assign]
    runner.drain()
    assert committed == [1, 2, 3, 4, 5]
    assert scorer.calls == [20] * 5  # type: ignore[attr-defined]  # each batch scored once
    assert pending(r) == 0 and r.xlen("anomalies") == 50
    sources = [e["source_id"] for e in stream(r, "anomalies")]
    assert len(set(sources)) == 50


def test_a_small_batch_does_not_read_ahead(r, make_runner) -> None:
    runner = make_runner(batch_size=50)
    reads: list[int | None] = []
    read_new = runner.stream.read_new

    def counted(count: int, block_ms: int | None) -> list:
        reads.append(block_ms)
        return read_new(count, block_ms)

    runner.stream.read_new = counted  # type: ignore[method-assign]
    for _ in range(12):  # under a quarter of the batch: entries trickle in, nothing to overlap
        push(r, 0.1)
    assert runner.run_once(block_ms=5) == 12
    assert reads == [5]  # the one blocking read, no read ahead
    for _ in range(13):
        push(r, 0.1)
    assert runner.run_once(block_ms=5) == 13
    assert reads == [5, 5, None]  # a quarter of the batch: the next is read ahead, without blocking


def test_without_prefetch_a_full_batch_reads_nothing_ahead(r, make_runner) -> None:
    runner = make_runner(batch_size=50, prefetch=False)
    for _ in range(120):
        push(r, 0.1)
    assert runner.run_once() == 50
    assert pending(r) == 0


def test_a_prefetched_batch_is_finished_when_the_worker_stops(r, make_runner) -> None:
    runner = make_runner(batch_size=10)
    for _ in range(25):
        push(r, 0.9)
    runner.run_once()
    assert pending(r) == 10
    runner.request_stop()
    runner.run()  # stop already requested: no new reads, only the batch in hand
    assert pending(r) == 0 and r.xlen("anomalies") == 20
    assert runner.model.scorer.calls == [10, 10]  # type: ignore[attr-defined]


def test_after_a_redis_failure_the_prefetched_batch_comes_back_from_own_pending(r, make_runner) -> None:
    runner = make_runner(batch_size=10)
    for _ in range(20):
        push(r, 0.9)
    runner.run_once()
    runner._redis_failed()  # what run() does on a connection error: outcomes are unknown
    runner.drain()
    assert pending(r) == 0
    sources = [e["source_id"] for e in stream(r, "anomalies")]
    assert len(sources) == len(set(sources)) == 20


def test_a_prefetched_batch_is_scored_by_the_model_loaded_since(r, make_runner) -> None:
    runner = make_runner(batch_size=5, loader=lambda: make_model("fake-v2"))
    for _ in range(10):
        push(r, 0.9)
    runner.run_once()  # scores 5 with v1 and reads the next 5 meanwhile
    runner.reload_event.set()
    runner.run_once()
    versions = [e["model_version"] for e in stream(r, "anomalies")]
    assert versions == ["fake-v1"] * 5 + ["fake-v2"] * 5


def test_a_model_that_fails_every_image_on_the_second_thread_commits_nothing(r, make_runner) -> None:
    runner = make_runner(batch_size=5)
    for _ in range(10):
        push(r, 0.9)

    def broken(images: np.ndarray) -> np.ndarray:
        raise RuntimeError("scorer exploded")

    runner.model.scorer.score_batch = broken  # type: ignore[method-assign]
    with pytest.raises(ScoringFailed, match="scorer exploded"):
        runner.run_once()
    assert r.xlen("anomalies") == 0 and pending(r) == 10  # nothing acked: redelivered later
    runner.close()


def test_score_drift_gauge_is_nan_until_the_window_fills_then_follows_recent_scores(r, make_runner) -> None:
    runner = make_runner(drift_window_scores=20, loader=lambda: make_model("fake-v2"))
    drift = "anomaly_score_drift"
    value = runner.metrics.registry.get_sample_value
    for brightness in np.linspace(0.01, 0.59, 10):  # spread like the baseline (0 to 0.6)
        push(r, float(brightness))
    runner.drain()
    assert math.isnan(value(drift))
    for brightness in np.linspace(0.01, 0.59, 10):
        push(r, float(brightness))
    runner.drain()
    assert value(drift) < 0.1
    for _ in range(20):
        push(r, 0.95)  # every score above the whole baseline
    runner.drain()
    assert value(drift) > 0.25
    assert runner.reload()  # a new baseline: the window starts afresh
    assert math.isnan(value(drift))
