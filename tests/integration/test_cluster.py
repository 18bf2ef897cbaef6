"""The worker on a real three-node Redis Cluster: one hash slot per pipeline (or per shard), scripts
included."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydantic import ValidationError
from redis.crc import key_slot

from tests.conftest import RedisServer, free_cluster_port, wait_until
from tests.support import build_runner, stream
from worker.codec import encode_image
from worker.redis_client import make_redis
from worker.settings import WorkerSettings

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[RedisServer]]:
    if shutil.which("redis-cli") is None:
        pytest.skip("redis-cli (Debian's redis-tools) is needed to create a cluster and is not installed")
    nodes: list[RedisServer] = []
    try:
        for _ in range(3):
            directory: Path = tmp_path_factory.mktemp("cluster-node")
            # The cluster bus listens on port + 10000: an ephemeral port above 55535 would not start.
            nodes.append(RedisServer(free_cluster_port(), directory, ("--cluster-enabled", "yes")).start())
        subprocess.run(
            [
                "redis-cli",
                "--cluster",
                "create",
                *(f"127.0.0.1:{n.port}" for n in nodes),
                "--cluster-replicas",
                "0",
                "--cluster-yes",
            ],
            check=True,
            capture_output=True,
            timeout=60,
        )

        def ready() -> bool:
            info = subprocess.run(
                ["redis-cli", "-p", str(nodes[0].port), "cluster", "info"], capture_output=True, text=True
            ).stdout
            return "cluster_state:ok" in info

        wait_until(ready, 20, what="cluster_state:ok")
        yield nodes
    finally:
        for node in nodes:
            node.stop(kill=True)


def test_worker_scores_on_a_cluster_with_hash_tagged_streams(cluster: list[RedisServer]) -> None:
    settings = WorkerSettings(
        redis_url=f"redis://127.0.0.1:{cluster[0].port}/0",
        redis_cluster=True,  # type: ignore[arg-type]
        input_stream="{cams}:images",
        output_stream="{cams}:anomalies",
        dead_letter_stream="{cams}:dead-letter",
        scores_stream="{cams}:scores",
        consumer="c1",
        reload_poll_seconds=0,
        dead_consumer_idle_ms=1,
        batch_size=2,  # full batches: the commit runs on the scoring thread while the next is read
    )
    client = make_redis(settings)
    runner = build_runner(client, settings)
    for brightness in (0.9, 0.1, 0.9):
        client.xadd("{cams}:images", {"image": bytes([round(brightness * 255)]) * 16})
    client.xadd("{cams}:images", {"image": b"bad"})
    assert runner.drain() == 4
    assert len(stream(client, "{cams}:anomalies")) == 2 and len(stream(client, "{cams}:scores")) == 3
    assert [d["reason_code"] for d in stream(client, "{cams}:dead-letter")] == ["bad_length"]
    assert runner.stream.group_state().pending == 0


def test_cluster_mode_refuses_streams_in_different_slots() -> None:
    with pytest.raises(ValidationError, match=r"must share one hash slot, found images \(slot 9450\)"):
        WorkerSettings(redis_cluster=True)


def test_sharded_worker_reads_fairly_across_cluster_nodes(cluster: list[RedisServer]) -> None:
    settings = WorkerSettings(
        redis_url=f"redis://127.0.0.1:{cluster[0].port}/0",
        redis_cluster=True,  # type: ignore[arg-type]
        shards=3,
        scores_stream="scores",
        group="fair",
        consumer="c1",
        reload_poll_seconds=0,
        batch_size=32,
    )
    client = make_redis(settings)
    for shard in range(3):  # a fresh run: the module's cluster is shared
        client.delete(*(name for name in settings.for_shard(shard).stream_names()))
    slots = {key_slot(f"images:{{{shard}}}".encode()) for shard in range(3)}
    assert len(slots) == 3
    runner = build_runner(client, settings)
    runner.start()
    fields = dict(encode_image(np.full(16, 0.1), "uint8"))
    for _ in range(1000):
        client.xadd("images:{0}", fields)
    for shard in (1, 2):
        for _ in range(5):
            client.xadd(f"images:{{{shard}}}", fields)
    for _ in range(4):
        runner.run_once(block_ms=None)
    assert client.xlen("scores:{1}") == 5 and client.xlen("scores:{2}") == 5
    assert client.xlen("scores:{0}") < 1000  # the backlog waits its turn
    runner.drain()
    runner.close()
    assert client.xlen("scores:{0}") == 1000
    assert all(runner.shards.streams[i].group_state().pending == 0 for i in range(3))


def _move_slot(cluster: list[RedisServer], key: str, client: Any) -> None:
    """Migrate the slot of `key` to another node the way redis-cli --cluster reshard does."""
    slot = key_slot(key.encode())
    source_port = client.get_node_from_key(key).port
    nodes = {n.port: n.client() for n in cluster}
    source = nodes[source_port]
    target_port = next(port for port in nodes if port != source_port)
    target = nodes[target_port]
    source_id, target_id = (
        source.execute_command("CLUSTER", "MYID"),
        target.execute_command("CLUSTER", "MYID"),
    )
    target.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", source_id)
    source.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", target_id)
    keys = source.execute_command("CLUSTER", "GETKEYSINSLOT", slot, 1000)
    source.execute_command("MIGRATE", "127.0.0.1", target_port, "", 0, 10_000, "KEYS", *keys)
    for node in nodes.values():
        node.execute_command("CLUSTER", "SETSLOT", slot, "NODE", target_id)


def test_a_shard_whose_slot_migrates_mid_run_is_followed(cluster: list[RedisServer]) -> None:
    settings = WorkerSettings(
        redis_url=f"redis://127.0.0.1:{cluster[0].port}/0",
        redis_cluster=True,  # type: ignore[arg-type]
        shards=2,
        scores_stream="scores",
        group="moving",
        consumer="c1",
        reload_poll_seconds=0,
        batch_size=16,
        prefetch=False,
    )
    client = make_redis(settings)
    for shard in range(2):
        client.delete(*settings.for_shard(shard).stream_names())
    runner = build_runner(client, settings)
    runner.start()
    fields = dict(encode_image(np.full(16, 0.9), "uint8"))
    ids = [client.xadd("images:{1}", fields) for _ in range(40)]
    runner.run_once(block_ms=None)  # one batch handled, the rest waits in the moving slot
    _move_slot(cluster, "images:{1}", client)
    ids.extend(client.xadd("images:{1}", fields) for _ in range(20))  # MOVED, then the new node
    runner.drain()
    runner.close()
    scored = [f[b"source_id"] for _, f in client.xrange("scores:{1}")]
    assert sorted(scored) == sorted(ids) and len(set(scored)) == 60
    assert client.xlen("anomalies:{1}") == 60 and client.xlen("images:{1}") == 60
    assert runner.shards.streams[1].group_state().pending == 0
