"""Shards, fencing and WAIT on a real redis-server: fair reads, owner-only commits."""

from __future__ import annotations

import threading
import time
from typing import Any

import numpy as np
import pytest
import redis
from prometheus_client import CollectorRegistry

from contract.codec import encode_image
from runtime.settings import WorkerSettings
from tests.conftest import wait_until
from tests.support import D, build_runner, stream
from worker.runner import Runner
from worker.stream import OUTPUT, Commit, StreamClient

pytestmark = pytest.mark.integration


def sharded_runner(client: Any, shards: int = 3, **overrides: Any) -> Runner:
    settings = WorkerSettings(**{"shards": shards, "consumer": "w1", "reload_poll_seconds": 0, **overrides})
    return build_runner(client, settings, registry=CollectorRegistry())


def push_to(client: Any, shard: int, n: int, brightness: float = 0.1) -> list[bytes]:
    fields = dict(encode_image(np.full(D, brightness), "uint8"))
    pipe = client.pipeline(transaction=False)
    for _ in range(n):
        pipe.xadd(f"images:{{{shard}}}", fields)
    return list(pipe.execute())


def handled(client: Any, shard: int) -> int:
    return len(client.xrange(f"scores:{{{shard}}}"))


def consumer_of(client: redis.Redis, name: str) -> StreamClient:
    return StreamClient(client, input_stream="in", output_stream="out", dead_letter_stream="dl",
                        scores_stream="", group="g", consumer=name, output_maxlen=0,
                        dead_letter_maxlen=0, scores_maxlen=0)  # fmt: skip


def test_a_commit_publishes_only_entries_this_consumer_owns(redis_client: redis.Redis) -> None:
    slow, fast = consumer_of(redis_client, "slow"), consumer_of(redis_client, "fast")
    slow.ensure_group("0")
    ids = [redis_client.xadd("in", {"image": b"x"}) for _ in range(4)]
    slow.read_new(10, None)
    # The slow consumer paused past the idle time: the fast one claimed two of its entries.
    redis_client.xclaim("in", "g", "fast", 0, ids[:2])
    commit = Commit(
        plain_ids=[ids[0], ids[2]], records=[(i, [(OUTPUT, ["n", "1"])]) for i in (ids[1], ids[3])]
    )
    late = slow.commit_batch(commit)
    # Only the owner acks, plain ids (nothing to publish) as much as records: slow's ack of ids[0]
    # would otherwise take it off the pending list and fence the owner's result for it.
    assert (late.acked, late.published, late.fenced) == (2, 1, 2)
    assert [f[b"n"] for _, f in redis_client.xrange("out")] == [b"1"]  # only ids[3], slow's own
    owner = fast.commit_batch(Commit(plain_ids=[ids[0]], records=[(ids[1], [(OUTPUT, ["n", "2"])])]))
    assert (owner.acked, owner.published, owner.fenced) == (2, 1, 0)
    assert redis_client.xlen("out") == 2 and slow.group_state().pending == 0


def test_ownership_of_a_large_batch_is_read_with_one_range(redis_client: redis.Redis) -> None:
    slow, fast = consumer_of(redis_client, "slow"), consumer_of(redis_client, "fast")
    slow.ensure_group("0")
    ids = [redis_client.xadd("in", {"image": b"x"}) for _ in range(1500)]  # two XPENDING pages
    slow.read_new(2000, None)
    redis_client.xclaim("in", "g", "fast", 0, ids[700:900])
    result = slow.commit_batch(Commit(records=[(i, [(OUTPUT, ["n", "1"])]) for i in ids]))
    assert (result.acked, result.published, result.fenced) == (1300, 1300, 200)
    again = fast.commit_batch(Commit(records=[(i, [(OUTPUT, ["n", "2"])]) for i in ids[690:910]]))
    assert (again.acked, again.published, again.fenced) == (200, 200, 20)
    assert redis_client.xlen("out") == 1500 and slow.group_state().pending == 0


def test_plain_acks_of_a_large_batch_are_fenced_by_owner_too(redis_client: redis.Redis) -> None:
    slow = consumer_of(redis_client, "slow")
    slow.ensure_group("0")
    ids = [redis_client.xadd("in", {"image": b"x"}) for _ in range(1500)]  # two XPENDING pages
    slow.read_new(2000, None)
    redis_client.xclaim("in", "g", "fast", 0, ids[1100:1300])  # in the second page
    result = slow.commit_batch(Commit(plain_ids=ids))
    assert (result.acked, result.published, result.fenced) == (1300, 0, 200)
    owners = {row["consumer"] for row in redis_client.xpending_range("in", "g", "-", "+", 2000)}
    assert owners == {b"fast"} and slow.group_state().pending == 200


def test_a_paused_runner_resumed_after_its_batch_was_reclaimed_publishes_nothing(
    redis_client: redis.Redis,
) -> None:
    paused = sharded_runner(redis_client, shards=2, consumer="paused", scores_stream="scores")
    paused.start()
    push_to(redis_client, 1, 5, brightness=0.9)
    [(shard, entries)] = paused.shards.read_new(10, None)
    reclaimer = sharded_runner(
        redis_client, shards=2, consumer="other", scores_stream="scores", claim_idle_ms=100
    )
    wait_until(lambda: reclaimer.drain() == 5, 5, what="the paused runner's entries reclaimed")
    paused.handle_batch(entries, stream=shard)  # resumed: its batch in hand is fenced
    assert len(stream(redis_client, "scores:{1}")) == 5 and len(stream(redis_client, "anomalies:{1}")) == 5
    assert paused.metrics.registry.get_sample_value("anomaly_messages_fenced_total") == 5
    assert int(redis_client.xpending("images:{1}", "anomaly-scorer")["pending"]) == 0


def test_a_shard_with_a_large_backlog_does_not_starve_the_others(redis_client: redis.Redis) -> None:
    runner = sharded_runner(redis_client, scores_stream="scores", batch_size=64)
    runner.start()
    push_to(redis_client, 0, 3000)
    push_to(redis_client, 1, 10)
    push_to(redis_client, 2, 10)
    batches = 0
    while handled(redis_client, 1) + handled(redis_client, 2) < 20:
        runner.run_once()
        batches += 1
    assert batches <= 3, "one read serves every shard with entries"
    assert handled(redis_client, 0) <= 3 * 64
    # And a trickle arriving while shard 0 still has a backlog is served within a round.
    push_to(redis_client, 2, 5)
    for _ in range(4):
        runner.run_once()
    assert handled(redis_client, 2) == 15 and handled(redis_client, 0) < 3000
    runner.drain()
    runner.close()
    assert [handled(redis_client, s) for s in range(3)] == [3000, 10, 15]


def test_a_blocking_read_returns_when_any_shard_gets_an_entry(redis_client: redis.Redis) -> None:
    runner = sharded_runner(redis_client, scores_stream="scores")
    runner.start()
    done: list[float] = []
    reader = threading.Thread(target=lambda: done.append(runner.run_once(block_ms=10_000)))
    reader.start()
    wait_until(lambda: redis_client.info("clients")["blocked_clients"] == 1, 5, what="the read blocking")
    pushed = time.monotonic()
    push_to(redis_client, 2, 1)
    reader.join(10)
    assert done == [1] and time.monotonic() - pushed < 2.0
    assert handled(redis_client, 2) == 1


def test_group_gauges_are_labelled_by_shard(redis_client: redis.Redis) -> None:
    runner = sharded_runner(redis_client, shards=2, shard_ids="1")
    runner.start()
    push_to(redis_client, 1, 3)
    runner.run_once(block_ms=None)  # samples before reading: 3 undelivered
    registry = runner.metrics.registry
    assert registry.get_sample_value("anomaly_consumer_group_lag", {"shard": "1"}) == 3
    assert registry.get_sample_value("anomaly_consumer_group_lag", {"shard": "0"}) is None
    assert not redis_client.exists("images:{0}")  # shard 0 is not this worker's


def test_wait_replicas_without_replicas_commits_and_counts_the_shortfall(redis_client: redis.Redis) -> None:
    runner = build_runner(
        redis_client, consumer="w1", reload_poll_seconds=0, wait_replicas=1, wait_timeout_ms=20
    )
    redis_client.xadd("images", dict(encode_image(np.full(D, 0.9), "uint8")))
    assert runner.drain() == 1
    assert len(stream(redis_client, "anomalies")) == 1
    assert runner.metrics.registry.get_sample_value("anomaly_commits_unreplicated_total") == 1
