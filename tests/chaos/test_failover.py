"""A Redis primary killed under load: sharded workers on Redis Cluster and on Sentinel carry on, and
every input entry that survived is handled exactly once. A paused worker's late commit is fenced.

Each failover test prints one line `FAILOVER {...}` with what asynchronous replication lost (run
with -s): entries acknowledged to the producer and gone, and results the workers committed that
were lost with the primary (the entry came back and was published again).
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis
from redis.backoff import NoBackoff
from redis.cluster import RedisCluster
from redis.retry import Retry
from redis.sentinel import Sentinel

from producer.client import ImageProducer
from tests.chaos.fleet import Fleet
from tests.conftest import RedisServer, free_cluster_port, mnist_sample, wait_until
from tests.sentinels import SentinelSet, sentinel_set
from tests.support import metric_sum, metrics_text

pytestmark = [pytest.mark.chaos, pytest.mark.slow]

GROUP = "anomaly-scorer"
NO_RETRY: dict[str, Any] = {
    "retry": Retry(NoBackoff(), 0),
    "socket_timeout": 5.0,
    "socket_connect_timeout": 1.0,
}


def need_redis_cli() -> None:
    if shutil.which("redis-cli") is None:
        pytest.skip("redis-cli (Debian's redis-tools) is needed and is not installed")


# ------------------------------------------------------------------------------------- producing
@dataclass
class Producer:
    """Pushes `count` images at `per_second` on a thread; remembers the ids Redis acknowledged."""

    producer: ImageProducer
    count: int
    per_second: float
    acknowledged: list[str] = field(default_factory=list)
    failed: int = 0
    thread: threading.Thread | None = None

    def start(self) -> Producer:
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        return self

    def _run(self) -> None:
        x, _ = mnist_sample(200, seed=4)
        started = time.monotonic()
        for i in range(self.count):
            pid = f"p-{i}"
            try:
                if i % 50 == 7:  # a few malformed entries: they must be dead-lettered exactly once
                    key = self.producer.streams[self.producer.shard_of(pid)]
                    self.producer.redis.xadd(key, {"image": b"\x00" * 5, "id": pid})
                else:
                    self.producer.push(x[i % len(x)], pid)
                self.acknowledged.append(pid)
            except redis.RedisError:
                self.failed += 1  # not acknowledged: it may or may not be there; never retried
            time.sleep(max(0.0, started + (i + 1) / self.per_second - time.monotonic()))

    def join(self) -> None:
        assert self.thread is not None
        self.thread.join(120)

    def pushed(self) -> int:
        return len(self.acknowledged) + self.failed


# ------------------------------------------------------------------------------------- checking
def shard_totals(client: Any, shards: int) -> tuple[int, int, int]:
    """(surviving inputs, results, pending) over all shards."""
    inputs = results = pending = 0
    for i in range(shards):
        inputs += client.xlen(f"images:{{{i}}}")
        results += client.xlen(f"scores:{{{i}}}") + client.xlen(f"images:dead-letter:{{{i}}}")
        if client.exists(f"images:{{{i}}}"):
            pending += int(client.xpending(f"images:{{{i}}}", GROUP)["pending"])
    return inputs, results, pending


def held_once_settled(client: Any, consumer: str, shards: int = 2, window: float = 0.5) -> int:
    """How many entries `consumer` (stopped) has pending, once that count stayed the same for
    `window` seconds; 0 while it still changes (a commit in flight landing)."""

    def count() -> int:
        return sum(
            len(client.xpending_range(f"images:{{{i}}}", GROUP, "-", "+", 10_000, consumername=consumer))
            for i in range(shards)
        )

    before = count()
    time.sleep(window)  # the window in which the count must not change
    return before if count() == before else 0


def all_handled(client: Any, shards: int) -> bool:
    try:
        inputs, results, pending = shard_totals(client, shards)
    except redis.RedisError:
        return False
    return results >= inputs > 0 and pending == 0


def assert_survivors_handled_once(client: Any, shards: int) -> tuple[set[str], int]:
    """Every input entry on the server has exactly one result (score or dead letter) in its shard;
    returns the producer ids that survived and the number of results."""
    survivors: set[str] = set()
    results = 0
    for i in range(shards):
        inputs = {entry_id: fields[b"id"].decode() for entry_id, fields in client.xrange(f"images:{{{i}}}")}
        survivors.update(inputs.values())
        scored = Counter(f[b"source_id"] for _, f in client.xrange(f"scores:{{{i}}}"))
        dead = Counter(f[b"source_id"] for _, f in client.xrange(f"images:dead-letter:{{{i}}}"))
        both = scored + dead
        results += sum(both.values())
        assert [k for k, v in both.items() if v > 1] == [], f"shard {i}: handled twice"
        assert set(both) == set(inputs), f"shard {i}: lost {len(set(inputs) - set(both))} entries"
        assert int(client.xpending(f"images:{{{i}}}", GROUP)["pending"]) == 0
        anomalies = Counter(f[b"source_id"] for _, f in client.xrange(f"anomalies:{{{i}}}"))
        flagged = {f[b"source_id"] for _, f in client.xrange(f"scores:{{{i}}}") if f[b"flagged"] == b"1"}
        assert set(anomalies) == flagged and all(v == 1 for v in anomalies.values())
    return survivors, results


def published_by_workers(fleet: Fleet) -> float:
    """Entries the workers committed as owners: handled minus fenced, summed over the fleet."""
    total = 0.0
    for _, port in fleet.workers.values():
        text = metrics_text(port)
        total += metric_sum(text, "anomaly_messages_total") - metric_sum(
            text, "anomaly_messages_fenced_total"
        )
    return total


def run_failover(
    fleet: Fleet,
    client: Any,
    producer: Producer,
    shards: int,
    kill_primary: Callable[[], None],
    label: dict[str, Any],
) -> None:
    """Start the fleet and the producer, kill the primary a third in, and check the outcome."""
    names = [fleet.start(wait_ready=False) for _ in range(3)]
    for name in names:
        fleet.wait_ready(name)
    producer.start()
    wait_until(lambda: producer.pushed() >= producer.count // 3, 60, what="a third pushed")
    wait_until(lambda: shard_totals(client, shards)[1] > 0, 30, what="workers scoring")
    kill_primary()
    producer.join()
    wait_until(lambda: all_handled(client, shards), 180, interval=0.5, what="every surviving entry handled")
    for name, (process, _) in fleet.workers.items():
        assert process.poll() is None, f"worker {name} exited: " + (fleet.log_dir / f"{name}.log").read_text()
    survivors, results = assert_survivors_handled_once(client, shards)
    # Counters follow their commit (on the scoring thread): wait until two scrapes agree.
    readings: list[float] = []
    wait_until(lambda: readings.append(published_by_workers(fleet)) or readings[-2:-1] == readings[-1:],
               30, interval=0.5, what="worker counters settled")  # fmt: skip
    published = int(readings[-1])
    lost_inputs = sorted(set(producer.acknowledged) - survivors)
    report = {
        **label,
        "pushed": producer.pushed(),
        "acknowledged": len(producer.acknowledged),
        "not_acknowledged": producer.failed,
        "acknowledged_then_lost": len(lost_inputs),
        "results_committed": published,
        "results_on_server": results,
        # Committed by a worker and gone with the primary (their entries were scored again).
        "results_lost": max(0, published - results),
        # On the server though the worker saw an error (the primary died after running the
        # script and replicating it, before the reply): counted by no worker.
        "results_committed_unconfirmed": max(0, results - published),
    }
    print("FAILOVER " + json.dumps(report))
    assert producer.pushed() == producer.count


# ------------------------------------------------------------------------------------- cluster
@pytest.fixture
def six_node_cluster(tmp_path: Path) -> Iterator[list[RedisServer]]:
    """3 primaries with one replica each; a primary is declared failed after 1 s."""
    need_redis_cli()
    nodes: list[RedisServer] = []
    options = ("--cluster-enabled", "yes", "--cluster-node-timeout", "1000",
               "--cluster-require-full-coverage", "no", "--cluster-replica-validity-factor", "0")  # fmt: skip
    try:
        for i in range(6):
            directory = tmp_path / f"node-{i}"
            directory.mkdir()
            nodes.append(RedisServer(free_cluster_port(), directory, options).start())
        subprocess.run(
            ["redis-cli", "--cluster", "create", *(f"127.0.0.1:{n.port}" for n in nodes),
             "--cluster-replicas", "1", "--cluster-yes"],
            check=True, capture_output=True, timeout=60,
        )  # fmt: skip

        def replicas_in_sync() -> bool:
            for node in nodes:
                info = node.client().info("replication")
                if info["role"] == "slave" and info.get("master_link_status") != "up":
                    return False
            states = [node.client().cluster("info")["cluster_state"] for node in nodes]
            return all(state == "ok" for state in states)

        wait_until(replicas_in_sync, 60, interval=0.2, what="cluster ok with replicas in sync")
        yield nodes
    finally:
        for node in nodes:
            node.stop(kill=True)


def failover_env(shards: int, wait_replicas: int) -> dict[str, str]:
    """The worker settings both failover runs share, so their figures compare: small batches,
    a quick reclaim, a generous poison limit, and WAIT as the run's parameter."""
    return {
        "ANOMALY_SHARDS": str(shards),
        "ANOMALY_BATCH_SIZE": "64",
        "ANOMALY_CLAIM_IDLE_MS": "3000",
        "ANOMALY_MAX_DELIVERIES": "50",
        "ANOMALY_WAIT_REPLICAS": str(wait_replicas),
        "ANOMALY_WAIT_TIMEOUT_MS": "200",
    }


@pytest.mark.parametrize("wait_replicas", [0, 1], ids=["async", "wait-1"])
def test_cluster_primary_killed_mid_run_every_surviving_entry_handled_once(
    six_node_cluster: list[RedisServer], tiny_artifact: Path, tmp_path: Path, wait_replicas: int
) -> None:
    shards = 6
    seed = six_node_cluster[0]
    client = RedisCluster(host="127.0.0.1", port=seed.port, **NO_RETRY)
    fleet = Fleet(seed.url, tiny_artifact, tmp_path)
    fleet.extra_env.update(
        ANOMALY_REDIS_CLUSTER="true",
        **failover_env(shards, wait_replicas),
    )
    producer = Producer(ImageProducer(client, shards=shards), count=3000, per_second=500)
    by_port = {node.port: node for node in six_node_cluster}

    def kill_primary_of_shard_0() -> None:
        victim = by_port[client.get_node_from_key("images:{0}").port]
        assert victim.process is not None
        victim.process.kill()

    try:
        run_failover(fleet, client, producer, shards, kill_primary_of_shard_0,
                     {"mode": "cluster", "wait_replicas": wait_replicas})  # fmt: skip
        primary = client.get_node_from_key("images:{0}").port
        assert by_port[primary].process.poll() is None  # type: ignore[union-attr]  # the replica took over
    finally:
        fleet.stop_all()
        client.close()


# ------------------------------------------------------------------------------------- sentinel
@pytest.fixture(name="sentinel_set")
def sentinel_set_fixture(tmp_path: Path) -> Iterator[SentinelSet]:
    """1 primary, 1 replica, 3 sentinels (quorum 2, primary down after 1 s)."""
    with sentinel_set(tmp_path) as nodes:
        yield nodes


@pytest.mark.parametrize("wait_replicas", [0, 1], ids=["async", "wait-1"])
def test_sentinel_primary_killed_mid_run_every_surviving_entry_handled_once(
    sentinel_set: SentinelSet, tiny_artifact: Path, tmp_path: Path, wait_replicas: int
) -> None:
    shards = 2
    sentinel = Sentinel(
        [("127.0.0.1", p) for p in sentinel_set.ports], sentinel_kwargs={"socket_timeout": 1.0}
    )
    client = sentinel.master_for("mymaster", **NO_RETRY)
    fleet = Fleet("redis://127.0.0.1/0", tiny_artifact, tmp_path)
    fleet.extra_env.update(
        ANOMALY_REDIS_SENTINELS=sentinel_set.addresses,
        ANOMALY_REDIS_SENTINEL_SERVICE="mymaster",
        **failover_env(shards, wait_replicas),
    )
    producer = Producer(ImageProducer(client, shards=shards), count=3000, per_second=500)

    def kill_primary() -> None:
        assert sentinel_set.primary.process is not None
        sentinel_set.primary.process.kill()

    try:
        run_failover(
            fleet,
            client,
            producer,
            shards,
            kill_primary,
            {"mode": "sentinel", "wait_replicas": wait_replicas},
        )
        assert sentinel.discover_master("mymaster")[1] == sentinel_set.replica.port
    finally:
        fleet.stop_all()
        client.close()


# ------------------------------------------------------------------------------------- paused worker
def test_worker_paused_past_claim_idle_publishes_nothing_it_no_longer_owns(
    redis_server: RedisServer, tiny_artifact: Path, tmp_path: Path
) -> None:
    client = redis_server.client()
    client.flushdb()
    fleet = Fleet(redis_server.url, tiny_artifact, tmp_path)
    fleet.extra_env.update(ANOMALY_SHARDS="2", ANOMALY_BATCH_SIZE="64", ANOMALY_CLAIM_IDLE_MS="1000")
    try:
        paused = fleet.start()
        x, _ = mnist_sample(200, seed=5)
        producer = ImageProducer(client, shards=2)
        producer.push_many(np.stack([x[i % len(x)] for i in range(4000)]), [f"p-{i}" for i in range(4000)])
        process, paused_port = fleet.workers[paused]
        wait_until(lambda: client.xlen("scores:{0}") + client.xlen("scores:{1}") > 0, 60, what="scoring")
        process.send_signal(signal.SIGSTOP)
        # A commit it sent just before it stopped may still be on its way to Redis (it sends a
        # commit and reads the next batch before the answer): count what it holds once that landed.
        held = wait_until(lambda: held_once_settled(client, paused), 10, what="the paused worker's pending")
        other = fleet.start()
        # The other worker reclaims what the paused one held (idle > 1 s) and handles the rest.
        wait_until(lambda: all_handled(client, 2), 120, interval=0.2, what="all handled by the other worker")
        process.send_signal(signal.SIGCONT)
        wait_until(
            lambda: metric_sum(metrics_text(paused_port), "anomaly_messages_fenced_total") > 0,
            30,
            what="the resumed worker's batch in hand fenced",
        )
        survivors, results = assert_survivors_handled_once(client, 2)
        assert len(survivors) == results == 4000
        reclaimed = metric_sum(metrics_text(fleet.workers[other][1]), "anomaly_messages_reclaimed_total")
        assert held > 0 and reclaimed >= held
        wait_until(lambda: published_by_workers(fleet) == results, 30, what="owners published every result")
    finally:
        fleet.stop_all()
