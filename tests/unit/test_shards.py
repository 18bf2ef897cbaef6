"""Shard names, shard selection in settings and producers, and the sharded loop on fakeredis."""

from __future__ import annotations

import fakeredis
import numpy as np
import pytest
from pydantic import ValidationError

from contract.codec import encode_image
from contract.shards import entry_time, newest_across_shards
from producer.client import ImageProducer
from runtime.settings import WorkerSettings
from tests.support import D, build_runner, stream
from worker.stream import StreamClient


def test_one_shard_keeps_todays_stream_names() -> None:
    settings = WorkerSettings(scores_stream="scores")
    assert settings.shard_list() == [0]
    assert settings.for_shard(0).stream_names() == ["images", "anomalies", "images:dead-letter", "scores"]


def test_shard_i_suffixes_every_stream_name_with_its_hash_tag() -> None:
    settings = WorkerSettings(shards=6, scores_stream="scores")
    assert settings.shard_list() == [0, 1, 2, 3, 4, 5]
    assert settings.for_shard(3).stream_names() == [
        "images:{3}",
        "anomalies:{3}",
        "images:dead-letter:{3}",
        "scores:{3}",
    ]


def test_cluster_mode_accepts_plain_names_when_sharded() -> None:
    WorkerSettings(shards=3, redis_cluster=True)  # each shard's names share the slot of its tag


@pytest.mark.parametrize("name", ["{cams}:images", "images}"])
def test_names_with_braces_are_refused_with_several_shards(name: str) -> None:
    with pytest.raises(ValidationError, match=r"ANOMALY_SHARDS=4 .* may not contain braces"):
        WorkerSettings(shards=4, input_stream=name)


@pytest.mark.parametrize("ids", ["0,7", "1,1", "a", ","])
def test_shard_ids_must_be_distinct_shards_that_exist(ids: str) -> None:
    with pytest.raises(ValidationError, match="ANOMALY_SHARD_IDS"):
        WorkerSettings(shards=4, shard_ids=ids)


def test_shard_ids_restrict_a_worker_to_some_shards() -> None:
    assert WorkerSettings(shards=6, shard_ids="0, 2,4").shard_list() == [0, 2, 4]


def test_sentinel_addresses_are_checked() -> None:
    with pytest.raises(ValidationError, match="expected host:port"):
        WorkerSettings(redis_sentinels="sentinel-a")
    WorkerSettings(redis_sentinels="10.0.0.1:26379,sentinel-b:26379")


def test_producer_keeps_one_id_on_one_shard_and_spreads_ids() -> None:
    r = fakeredis.FakeRedis()
    producer = ImageProducer(r, shards=4)
    image = np.zeros(D)
    shards = {producer.shard_of(f"camera-{i}") for i in range(100)}
    assert shards == {0, 1, 2, 3}
    assert len({producer.shard_of("camera-7") for _ in range(10)}) == 1
    producer.push(image, "camera-7")
    assert r.xlen(f"images:{{{producer.shard_of('camera-7')}}}") == 1


def test_producer_without_ids_goes_round_robin() -> None:
    r = fakeredis.FakeRedis()
    ImageProducer(r, shards=3).push_many(np.zeros((9, D)))
    assert [r.xlen(f"images:{{{i}}}") for i in range(3)] == [3, 3, 3]
    assert r.exists("images") == 0


def test_producer_refuses_braces_with_shards() -> None:
    with pytest.raises(ValueError, match="found braces"):
        ImageProducer(fakeredis.FakeRedis(), stream="{cams}:images", shards=2)


def test_a_sharded_worker_publishes_each_result_in_its_shard() -> None:
    r = fakeredis.FakeRedis()
    settings = WorkerSettings(shards=3, consumer="w1", reload_poll_seconds=0, scores_stream="scores")
    runner = build_runner(r, settings)
    for shard in range(3):
        for brightness in (0.9, 0.1):
            r.xadd(f"images:{{{shard}}}", dict(encode_image(np.full(D, brightness), "uint8")))
    assert runner.drain() == 6
    for shard in range(3):
        assert len(stream(r, f"anomalies:{{{shard}}}")) == 1 and len(stream(r, f"scores:{{{shard}}}")) == 2
        assert r.xpending(f"images:{{{shard}}}", "anomaly-scorer")["pending"] == 0
    assert isinstance(runner.stream, StreamClient)


def test_entry_times_order_entries_across_shards() -> None:
    assert entry_time(b"1700000000000-3") == (1700000000000, 3) == entry_time("1700000000000-3")
    assert entry_time(b"9-0") < entry_time(b"10-0") < entry_time(b"10-1")  # numbers, not text


def test_the_newest_of_every_shard_merge_newest_first_and_ties_go_to_the_lower_shard() -> None:
    shard_0 = [(b"9-0", "a"), (b"5-0", "b"), (b"1-0", "c")]  # newest first, as XREVRANGE
    shard_1 = [(b"10-0", "d"), (b"5-0", "e"), (b"2-0", "f")]
    merged = newest_across_shards([shard_0, shard_1], 4)
    assert merged == [(1, b"10-0", "d"), (0, b"9-0", "a"), (0, b"5-0", "b"), (1, b"5-0", "e")]
    assert newest_across_shards([shard_0, []], 10) == [(0, i, f) for i, f in shard_0]
    assert newest_across_shards([shard_0, shard_1], 0) == []
