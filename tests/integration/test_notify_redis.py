"""anomaly-notify against a real redis-server and a real HTTP receiver started by the test (a small
threaded http.server on a free port, scripted to fail, time out, refuse and recover): every anomaly
arrives, a duplicate only after a failure and always with the same key, a refused one is
dead-lettered with its reason and status, both shards are read, a dead notifier's anomalies are
taken over, and the documented least-privilege ACL user is enough."""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from prometheus_client import CollectorRegistry

from notify.anomalies import ViewerLinks
from notify.formats import Formatter
from notify.metrics import NotifyMetrics
from notify.notifier import Notifier
from notify.sender import UrllibSender
from runtime.connection import make_redis
from runtime.http import Health
from runtime.settings import NotifySettings
from tests.conftest import ROOT, RedisServer, wait_until
from tests.notify_support import (
    Receiver,
    Script,
    dead_letters,
    notify_settings,
    output_groups,
    pending_count,
    publish,
    running_receiver,
)
from tests.support import acl_arguments

pytestmark = pytest.mark.integration

PASSWORD = "notify-pw-for-tests"
SHARDED_KEYS = "~anomalies:{*} (~anomalies:notify-dead-letter:{*} +xadd)"  # deploy/README.md, N > 1


def real_notifier(
    client: Any,
    settings: NotifySettings,
    registry: CollectorRegistry | None = None,
    monotonic: Callable[[], float] = time.monotonic,
) -> Notifier:
    """A notifier as anomaly-notify builds it (urllib sender, real clock), on `client`."""
    sender = UrllibSender(settings.webhook_url(), settings.notify_timeout_seconds, "anomaly-notify/test")
    formatter = Formatter(
        settings.notify_format, ViewerLinks(settings.notify_viewer_url), settings.notify_max_per_minute
    )
    metrics = NotifyMetrics(registry or CollectorRegistry(), with_process=False)
    groups = output_groups(client, settings)
    return Notifier(
        settings, groups, sender, formatter, metrics, Health(needs_model=False), monotonic=monotonic
    )


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    with running_receiver() as running:
        yield running


def _publish_many(r: Any, n: int, stream: str = "anomalies") -> list[str]:
    """n anomalies on `stream`; returns the keys the notifier must deliver."""
    prefix = "images" if stream == "anomalies" else stream.replace("anomalies", "images")
    sources = [f"1700000000000-{i}" for i in range(n)]
    for source in sources:
        publish(r, source, stream=stream)
    return [f"{prefix}/{s}" for s in sources]


def _assert_duplicates_only_after_a_failure(receiver: Receiver) -> None:
    """Per key: every request before its one 2xx failed (5xx or no answer), and none came after."""
    by_key: dict[str, list[int]] = collections.defaultdict(list)
    for request in receiver.requests:
        by_key[request.key].append(request.status)
    for key, statuses in by_key.items():
        assert statuses[-1] == 200 and all(s != 200 for s in statuses[:-1]), (key, statuses)


def test_every_anomaly_arrives_through_errors_and_timeouts_with_the_same_key(
    redis_client: redis.Redis, redis_server: RedisServer, receiver: Receiver
) -> None:
    keys = _publish_many(redis_client, 12)
    receiver.script = Script(answers=[200, 500, "timeout", 502, 200, 503, 200, "timeout"])
    # A scripted "timeout" never answers; 1.5 s is ample for every other answer on a busy machine,
    # so only the scripted ones time out.
    settings = notify_settings(
        redis_url=redis_server.url, notify_webhook_url=receiver.url, notify_timeout_seconds=1.5
    )
    registry = CollectorRegistry()
    assert real_notifier(redis_server.client(), settings, registry).drain() == 12
    assert sorted(receiver.delivered_keys()) == sorted(keys)
    assert len(receiver.requests) == 12 + 5  # one more request per failure, none otherwise
    _assert_duplicates_only_after_a_failure(receiver)
    for request in receiver.requests:  # the key in the header names the anomaly in the body
        assert request.key == f"images/{request.body['source_id']}"
        assert request.headers["content-type"] == "application/json"
        assert request.headers["user-agent"] == "anomaly-notify/test"
    assert pending_count(redis_client) == 0 and dead_letters(redis_client) == []
    assert registry.get_sample_value("anomaly_notify_failed_attempts_total", {"reason": "timeout"}) == 2
    assert registry.get_sample_value("anomaly_notify_failed_attempts_total", {"reason": "5xx"}) == 3


def test_a_refused_anomaly_is_dead_lettered_with_the_receivers_reason_and_status(
    redis_client: redis.Redis, redis_server: RedisServer, receiver: Receiver
) -> None:
    keys = _publish_many(redis_client, 3)
    receiver.script = Script(answers=[200, 400])
    settings = notify_settings(redis_url=redis_server.url, notify_webhook_url=receiver.url)
    real_notifier(redis_server.client(), settings).drain()
    assert receiver.delivered_keys() == [keys[0], keys[2]] and len(receiver.requests) == 3
    (dead,) = dead_letters(redis_client)
    assert dead["reason_code"] == "refused" and dead["status"] == "400"
    assert dead["reason"] == "HTTP 400: the receiver refused it: refused: bad request"
    assert dead["idempotency_key"] == keys[1] and dead["source_id"] == "1700000000000-1"
    assert pending_count(redis_client) == 0


def test_a_429_is_retried_after_the_retry_after_it_gave(
    redis_client: redis.Redis, redis_server: RedisServer, receiver: Receiver
) -> None:
    _publish_many(redis_client, 1)
    receiver.script = Script(answers=[429], retry_after="1")
    settings = notify_settings(redis_url=redis_server.url, notify_webhook_url=receiver.url)
    real_notifier(redis_server.client(), settings).drain()
    first, second = receiver.requests
    assert (first.status, second.status, first.key) == (429, 200, second.key)
    assert second.at - first.at >= 0.95


def test_anomalies_of_both_shards_are_delivered(
    redis_client: redis.Redis, redis_server: RedisServer, receiver: Receiver
) -> None:
    keys = _publish_many(redis_client, 4, "anomalies:{0}") + _publish_many(redis_client, 4, "anomalies:{1}")
    settings = notify_settings(redis_url=redis_server.url, notify_webhook_url=receiver.url, shards=2)
    real_notifier(redis_server.client(), settings).drain()
    assert sorted(receiver.delivered_keys()) == sorted(keys) and len(set(keys)) == 8
    assert {r.body["shard"] for r in receiver.requests} == {0, 1}
    assert pending_count(redis_client, "anomalies:{0}") == pending_count(redis_client, "anomalies:{1}") == 0


def test_a_notifier_that_stops_acknowledging_has_its_anomalies_taken_over(
    redis_client: redis.Redis, redis_server: RedisServer, receiver: Receiver
) -> None:
    keys = _publish_many(redis_client, 3)
    # n1 reads the three anomalies and dies before delivering any (nothing acknowledged).
    redis_client.xgroup_create("anomalies", "anomaly-notify", id="0")
    redis_client.xreadgroup("anomaly-notify", "n1", {"anomalies": ">"}, count=10)
    settings = notify_settings(
        redis_url=redis_server.url,
        notify_webhook_url=receiver.url,
        notify_consumer="n2",
        notify_claim_idle_ms=3000,
        notify_timeout_seconds=1.0,
    )
    wait_until(
        lambda: all(row["time_since_delivered"] >= 3000 for row in redis_client.xpending_range(
            "anomalies", "anomaly-notify", "-", "+", 10)),
        timeout=10,
        what="n1's anomalies idle for NOTIFY_CLAIM_IDLE_MS",
    )  # fmt: skip
    registry = CollectorRegistry()
    real_notifier(redis_server.client(), settings, registry).drain()
    assert sorted(receiver.delivered_keys()) == sorted(keys)
    assert pending_count(redis_client) == 0
    assert registry.get_sample_value("anomaly_notify_reclaimed_total") == 3


def test_the_notifier_recovers_when_redis_restarts(own_redis: RedisServer, receiver: Receiver) -> None:
    admin = own_redis.client()
    keys = _publish_many(admin, 2)
    settings = notify_settings(redis_url=own_redis.url, notify_webhook_url=receiver.url, notify_block_ms=100)
    notifier = real_notifier(make_redis(settings, "n1", 5.0), settings)
    thread = threading.Thread(target=notifier.run, name="notifier")
    thread.start()
    try:
        receiver.wait_for(lambda got: len(got) >= 2, 20, "the first two anomalies")
        own_redis.stop(kill=True)
        wait_until(lambda: not notifier.health.redis_ok, 20, what="the notifier to see Redis gone")
        own_redis.start()  # AOF: the stream, the group and its pending entries come back
        publish(own_redis.client(), "1700000000001-0")
        keys.append("images/1700000000001-0")
        receiver.wait_for(
            lambda got: any(r.key == keys[-1] and r.status == 200 for r in got),
            30,
            "the anomaly published after the restart",
        )
        wait_until(lambda: notifier.health.redis_ok, 20, what="the notifier to see Redis back")
    finally:
        notifier.request_stop()
        thread.join(30)
    assert not thread.is_alive()
    assert sorted(set(receiver.delivered_keys())) == sorted(keys)


def _idle_ms(r: redis.Redis, stream: str, name: str) -> int:
    found = [c for c in r.xinfo_consumers(stream, "anomaly-notify") if c["name"] == name.encode()]
    return int(found[0]["idle"]) if found else -1


PRUNING_RULES = ("+xgroup|delconsumer", "+xinfo|consumers", "+evalsha", "+eval", "+script|load")


@pytest.mark.parametrize(
    "without",
    [PRUNING_RULES, PRUNING_RULES[:2]],
    ids=["the-acl-before-pruning", "scripts-but-not-their-commands"],
)
def test_a_notifier_whose_user_may_not_prune_says_so_once_and_delivers(
    redis_client: redis.Redis,
    redis_server: RedisServer,
    receiver: Receiver,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    without: tuple[str, ...],
) -> None:
    before = [word for word in documented_notify_acl(PASSWORD, 1) if word not in without]
    assert len(before) == len(documented_notify_acl(PASSWORD, 1)) - len(without)
    redis_client.execute_command(*before)
    secret = tmp_path / "redis-password"
    secret.write_text(PASSWORD + "\n")
    try:
        keys = _publish_many(redis_client, 2)
        settings = notify_settings(
            redis_url=f"redis://anomaly-notify@127.0.0.1:{redis_server.port}/0",
            redis_password_file=secret,
            notify_webhook_url=receiver.url,
            notify_dead_consumer_idle_ms=5,
        )
        client = make_redis(settings, "n1")
        minutes_later = [0.0]  # added to the real clock
        notifier = real_notifier(client, settings, monotonic=lambda: time.monotonic() + minutes_later[0])
        with caplog.at_level("WARNING", logger="notify"):
            notifier.drain()
            minutes_later[0] = 120.0  # two pruning intervals later: it does not try again
            notifier.drain()
        assert sorted(receiver.delivered_keys()) == sorted(keys)
        told = [r for r in caplog.records if r.getMessage().startswith("idle consumers are not removed")]
        assert len(told) == 1, [r.getMessage() for r in told]
        assert "no permissions" in told[0].getMessage() or "can't run this command" in told[0].getMessage()
        client.close()
    finally:
        redis_client.acl_deluser("anomaly-notify")


def documented_notify_acl(password: str, shards: int) -> list[str]:
    """anomaly-notify's ACL SETUSER line of deploy/README.md, with its sharded patterns for N > 1."""
    text = (ROOT / "deploy" / "README.md").read_text()
    line = next(ln for ln in text.splitlines() if ln.startswith("ACL SETUSER anomaly-notify "))
    line = line.replace("NOTIFY-PASSWORD", password)
    if shards > 1:
        assert SHARDED_KEYS in text, "deploy/README.md no longer gives the notifier's sharded key patterns"
        line = line.replace("~anomalies (~anomalies:notify-dead-letter +xadd)", SHARDED_KEYS)
    return acl_arguments(line)


@pytest.mark.parametrize("shards", [1, 2], ids=["one-shard", "two-shards"])
def test_the_notifier_works_with_its_least_privilege_acl_user(
    redis_client: redis.Redis, redis_server: RedisServer, receiver: Receiver, tmp_path: Path, shards: int
) -> None:
    redis_client.execute_command(*documented_notify_acl(PASSWORD, shards))
    secret = tmp_path / "redis-password"
    secret.write_text(PASSWORD + "\n")
    try:
        output = "anomalies" if shards == 1 else "anomalies:{1}"
        keys = _publish_many(redis_client, 3, output)
        receiver.script = Script(answers=[200, 404])
        settings = notify_settings(
            redis_url=f"redis://anomaly-notify@127.0.0.1:{redis_server.port}/0",
            redis_password_file=secret,
            notify_webhook_url=receiver.url,
            shards=shards,
        )
        # A notifier pod that was replaced left its name in the group; this one removes it.
        redis_client.xgroup_create(output, "anomaly-notify", id="0")
        redis_client.xgroup_createconsumer(output, "anomaly-notify", "replaced-pod")
        wait_until(lambda: _idle_ms(redis_client, output, "replaced-pod") > 5, 10, what="an idle consumer")
        settings = settings.model_copy(update={"notify_dead_consumer_idle_ms": 5})
        client = make_redis(settings, "n1")
        real_notifier(client, settings).drain()
        assert sorted(receiver.delivered_keys()) == sorted([keys[0], keys[2]])
        assert [c["name"] for c in redis_client.xinfo_consumers(output, "anomaly-notify")] == [b"n1"]
        dead_stream = settings.in_shard(settings.notify_dead_letter_stream, shards - 1)
        assert [d["status"] for d in dead_letters(redis_client, dead_stream)] == ["404"]
        assert pending_count(redis_client, output) == 0
        for forbidden in (
            lambda: client.xadd(output, {"forged": "alert"}),  # the alerts retune trusts
            lambda: client.xdel(output, "1-0"),
            lambda: client.xadd(settings.in_shard("images", 0), {"x": "y"}),
            lambda: client.xrange(settings.in_shard("images:dead-letter", 0)),
            lambda: client.xadd("anomaly-labels", {"label": "normal"}),
        ):
            with pytest.raises(redis.exceptions.NoPermissionError):
                forbidden()
        client.close()
    finally:
        redis_client.acl_deluser("anomaly-notify")
