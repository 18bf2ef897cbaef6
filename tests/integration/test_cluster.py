"""The worker on a real three-node Redis Cluster: one hash slot per pipeline (or per shard), scripts
included."""

from __future__ import annotations

import logging
import shutil
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydantic import ValidationError
from redis.crc import key_slot

from contract.codec import encode_image
from producer.client import ImageProducer
from runtime.connection import make_redis
from runtime.settings import WorkerSettings
from tests.conftest import RedisServer, free_cluster_port, wait_until
from tests.support import build_runner, stream

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
            # Every node: each learns the others' slots by gossip, and one that has not yet answers
            # CLUSTERDOWN (seen about one run in ten when only the first node was asked).
            return all(
                "cluster_state:ok"
                in subprocess.run(
                    ["redis-cli", "-p", str(node.port), "cluster", "info"], capture_output=True, text=True
                ).stdout
                for node in nodes
            )

        wait_until(ready, 20, what="cluster_state:ok on every node")
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


class SlotMigration:
    """Moves the slot of `key` to another node in the steps redis-cli --cluster reshard takes, so a
    test can stop half way: IMPORTING on the target, then MIGRATING on the source (this order, or
    the target answers MOVED to a client sent there by ASK), keys moved with MIGRATE, and at the end
    SETSLOT NODE on the target, then the source, then the rest. Told the other way round the source
    sends clients to the target, which, still IMPORTING, sends them back: redis-py 8.1 gives up on
    such a loop with ClusterError("TTL exhausted.") (an XADD then "ran out of redirects")."""

    def __init__(self, cluster: list[RedisServer], key: str, client: Any) -> None:
        self.slot = key_slot(key.encode())
        source_port = client.get_node_from_key(key).port
        self.nodes = {n.port: n.client() for n in cluster}
        self.source = self.nodes[source_port]
        self.target_port = next(port for port in self.nodes if port != source_port)
        self.target = self.nodes[self.target_port]
        self.source_id = self.source.execute_command("CLUSTER", "MYID")
        self.target_id = self.target.execute_command("CLUSTER", "MYID")

    def begin(self) -> None:
        self.target.execute_command("CLUSTER", "SETSLOT", self.slot, "IMPORTING", self.source_id)
        self.source.execute_command("CLUSTER", "SETSLOT", self.slot, "MIGRATING", self.target_id)

    def move(self, *keys: str) -> None:
        """MIGRATE these keys of the slot (all that are left when none are named) to the target."""
        names = list(keys) or self.source.execute_command("CLUSTER", "GETKEYSINSLOT", self.slot, 1000)
        if names:
            self.source.execute_command(
                "MIGRATE", "127.0.0.1", self.target_port, "", 0, 10_000, "KEYS", *names
            )

    def finish(self) -> None:
        self.move()
        others = [node for node in self.nodes.values() if node not in (self.target, self.source)]
        for node in (self.target, self.source, *others):
            node.execute_command("CLUSTER", "SETSLOT", self.slot, "NODE", self.target_id)


def _move_slot(cluster: list[RedisServer], key: str, client: Any) -> None:
    """Migrate the slot of `key` to another node in one go."""
    migration = SlotMigration(cluster, key, client)
    migration.begin()
    migration.finish()


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


class PacedProducer:
    """Pushes images to both shards with producer ids (p-0, p-1, ...) until stopped, one XADD at a
    time and in pipelined chunks by turns; records the ids of what Redis acknowledged."""

    def __init__(self, url: str) -> None:
        from redis.cluster import RedisCluster

        self.producer = ImageProducer(RedisCluster.from_url(url), stream="images", shards=2)
        self.acknowledged: list[bytes] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.image = np.full(16, 0.9)

    def _run(self) -> None:
        n = 0
        while not self.stop.wait(0.01):
            self.acknowledged.append(self.producer.push(self.image, producer_id=f"p-{n}"))
            ids = [f"p-{n + i}" for i in range(1, 5)]
            self.acknowledged.extend(self.producer.push_many(np.stack([self.image] * 4), ids=ids))
            n += 5

    def pushed_to(self, shard: int) -> int:
        """How many of the acknowledged entries went to `shard` (ids are pushed in turn)."""
        return sum(1 for i in range(len(self.acknowledged)) if self.producer.shard_of(f"p-{i}") == shard)


@pytest.mark.parametrize("wait_replicas", [0, 1], ids=["commit-script", "commit-pipeline-with-wait"])
def test_a_shard_caught_half_migrated_scores_every_entry_once(
    cluster: list[RedisServer], caplog: pytest.LogCaptureFixture, wait_replicas: int
) -> None:
    caplog.set_level(logging.INFO, logger="worker.stream")
    url = f"redis://127.0.0.1:{cluster[0].port}/0"

    def settings_of(consumer: str) -> WorkerSettings:
        return WorkerSettings(
            redis_url=url,
            redis_cluster=True,  # type: ignore[arg-type]
            shards=2,
            scores_stream="scores",
            group="half",
            consumer=consumer,
            reload_poll_seconds=0,
            batch_size=16,
            block_ms=100,
            # Two workers, XAUTOCLAIM every 0.1 s (through ASK too): entries of a consumer that dies
            # mid-migration are reclaimed; fencing keeps one result each; nothing turns poison.
            claim_idle_ms=200,
            max_deliveries=1000,
            wait_replicas=wait_replicas,  # 1 of none: WAIT times out, the pipeline path is what counts
            wait_timeout_ms=5,
        )

    client = make_redis(settings_of("admin"))
    for shard in range(2):
        client.delete(*settings_of("admin").for_shard(shard).stream_names())
    client.xadd("images:{1}", {"image": b"bad"})  # the shard's dead-letter stream exists from here
    runners = [build_runner(make_redis(settings_of(c)), settings_of(c)) for c in ("c1", "c2")]
    workers = [threading.Thread(target=runner.run, daemon=True) for runner in runners]
    producer = PacedProducer(url)
    migration = SlotMigration(cluster, "images:{1}", client)
    for worker in workers:
        worker.start()
    producer.thread.start()
    try:
        wait_until(lambda: client.xlen("scores:{1}") >= 20, 30, what="shard 1 scored before the migration")
        assert client.xlen("images:dead-letter:{1}") == 1

        # Half way, split: the outputs on the target, the input and dead letters still on the source.
        # Reads and pushes are served by the source; the commit (all four streams) gets TRYAGAIN.
        migration.begin()
        migration.move("anomalies:{1}", "scores:{1}")
        pushed = producer.pushed_to(1)
        wait_until(lambda: "commit deferred" in caplog.text, 30, what="a commit refused with TRYAGAIN")
        wait_until(lambda: producer.pushed_to(1) >= pushed + 20, 30, what="pushes to the split slot")

        # Still half way, every key on the target: the source answers ASK for all of them. A consumer
        # that takes entries and dies leaves them to the workers' XAUTOCLAIM.
        migration.move("images:{1}", "images:dead-letter:{1}")
        scored = client.xlen("scores:{1}")
        wait_until(lambda: client.xlen("scores:{1}") >= scored + 20, 30, what="scoring through ASK")

        def held_by_the_dead() -> int:
            return len(client.xpending_range("images:{1}", "half", "-", "+", 100, consumername="dies"))

        def taken_by_the_dead() -> bool:
            client.xreadgroup("half", "dies", {"images:{1}": ">"}, count=5)  # races the workers
            return held_by_the_dead() >= 3

        wait_until(taken_by_the_dead, 30, what="a consumer that dies took entries")
        wait_until(lambda: held_by_the_dead() == 0, 30, what="the dead consumer's entries reclaimed")

        migration.finish()  # the slot is the target's now: MOVED, then served there
        pushed = producer.pushed_to(1)
        wait_until(lambda: producer.pushed_to(1) >= pushed + 20, 30, what="pushes after the migration")
        producer.stop.set()
        producer.thread.join(30)
        expected = sorted(producer.acknowledged)

        def every_entry_scored() -> bool:
            return client.xlen("scores:{0}") + client.xlen("scores:{1}") >= len(expected)

        wait_until(every_entry_scored, 60, what=f"{len(expected)} entries scored")
    finally:
        producer.stop.set()
        migration.finish()  # again after a failure: the module's other tests share the cluster
        for runner, worker in zip(runners, workers, strict=True):
            runner.request_stop()
            worker.join(30)
            assert not worker.is_alive(), "worker loop did not stop"
    scored_ids = sorted(f[b"source_id"] for shard in (0, 1) for _, f in client.xrange(f"scores:{{{shard}}}"))
    assert scored_ids == expected  # each acknowledged entry exactly once, nothing else
    assert client.xlen("images:dead-letter:{1}") == 1
    assert [s.group_state().pending for s in runners[0].shards.streams] == [0, 0]
    assert "commit ran after the slot migration shard=1" in caplog.text
    # Reads and commits waited the migration out without failing: the workers stayed ready.
    assert "redis refused" not in caplog.text and "redis lost" not in caplog.text
    assert client.get_node_from_key("images:{1}").port == migration.target_port
