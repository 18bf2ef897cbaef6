"""anomaly-notify as a user runs it (`anomaly-notify`, `python -m notify`), against a real
redis-server and a real HTTP receiver: kill -9 mid-delivery and a restart lose nothing (the one
delivered but not acknowledged comes again, with the same key), SIGTERM finishes the delivery in
hand and exits 0, health and metrics are served, a missing receiver URL is refused."""

from __future__ import annotations

import collections
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from tests.conftest import ROOT, RedisServer, free_port, wait_until
from tests.notify_support import Receiver, Script, pending_count, publish, running_receiver
from tests.support import http_status, logged, metric_sum, wait_for_metrics

pytestmark = [pytest.mark.e2e, pytest.mark.chaos]

CONSOLE_SCRIPT = Path(sys.executable).with_name("anomaly-notify")


def start_notify(env: dict[str, str], log: Path, as_module: bool = False) -> subprocess.Popen[bytes]:
    """anomaly-notify (or python -m notify) with `env`, its log in a file; waits for /readyz."""
    port = int(env["ANOMALY_NOTIFY_METRICS_PORT"])
    argv = [sys.executable, "-m", "notify"] if as_module else [str(CONSOLE_SCRIPT)]
    clean = {k: v for k, v in os.environ.items() if not k.startswith("ANOMALY_")}
    with log.open("a") as out:  # a file, not a pipe: a full pipe would block the notifier
        process = subprocess.Popen(argv, env={**clean, "PYTHONUNBUFFERED": "1", **env}, cwd=ROOT, stderr=out)
    try:
        wait_until(
            lambda: http_status(port, "/readyz") == 200 or process.poll() is not None,
            60,
            0.1,
            what=f"anomaly-notify /readyz on port {port}",
        )
    except AssertionError:
        process.kill()
        process.wait(10)
        raise
    if process.poll() is not None:
        raise AssertionError(f"anomaly-notify exited with {process.returncode}:\n{log.read_text()}")
    return process


def notify_env(server: RedisServer, receiver: Receiver, consumer: str, **extra: str) -> dict[str, str]:
    return {
        "ANOMALY_REDIS_URL": server.url,
        "ANOMALY_NOTIFY_WEBHOOK_URL": receiver.url,
        "ANOMALY_NOTIFY_START_ID": "0",
        "ANOMALY_NOTIFY_CONSUMER": consumer,
        "ANOMALY_NOTIFY_METRICS_HOST": "127.0.0.1",
        "ANOMALY_NOTIFY_METRICS_PORT": str(free_port()),
        "ANOMALY_NOTIFY_BLOCK_MS": "200",
        "ANOMALY_NOTIFY_RETRY_BASE_SECONDS": "0.05",
        "ANOMALY_NOTIFY_RETRY_CAP_SECONDS": "0.2",
        **extra,
    }


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    with running_receiver() as running:
        yield running


def _publish(r: redis.Redis, n: int) -> list[str]:
    sources = [f"1700000000000-{i}" for i in range(n)]
    for source in sources:
        publish(r, source)
    return [f"images/{s}" for s in sources]


@pytest.mark.parametrize(
    "restart_as",
    ["the same consumer", "another consumer"],
    ids=["own-pending-first", "xautoclaim-of-the-dead-one"],
)
def test_kill_9_mid_delivery_then_a_restart_delivers_every_anomaly_at_least_once(
    redis_client: redis.Redis, redis_server: RedisServer, receiver: Receiver, tmp_path: Path, restart_as: str
) -> None:
    keys = _publish(redis_client, 20)
    # The 8th request is taken by the receiver, but its answer never comes: delivered, not acked.
    receiver.script = Script(answers=["ok"] * 7 + ["hold"])
    log = tmp_path / "notify.log"
    first = start_notify(notify_env(redis_server, receiver, "n1", ANOMALY_NOTIFY_TIMEOUT_SECONDS="30"), log)
    try:
        receiver.wait_for(lambda got: len(got) == 8, 30, "the 8th request, held")
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait(10)
    receiver.release.set()  # the held request's handler ends; its connection is gone anyway
    held = receiver.requests[7].key
    assert pending_count(redis_client) == 20 - 7  # the held one and the 12 never read or not acked

    if restart_as == "the same consumer":  # its own pending entries are read first
        env = notify_env(redis_server, receiver, "n1")
    else:  # n1 is dead: n2 takes its anomalies over once idle for CLAIM_IDLE_MS
        env = notify_env(redis_server, receiver, "n2", ANOMALY_NOTIFY_CLAIM_IDLE_MS="6000",
                         ANOMALY_NOTIFY_TIMEOUT_SECONDS="2")  # fmt: skip
    second = start_notify(env, log, as_module=True)
    try:
        receiver.wait_for(lambda got: {r.key for r in got if r.status == 200} >= set(keys), 60, "every key")
        wait_until(lambda: pending_count(redis_client) == 0, 30, what="every anomaly acknowledged")
    finally:
        second.send_signal(signal.SIGTERM)
        assert second.wait(30) == 0, log.read_text()
    delivered = collections.Counter(receiver.delivered_keys())
    assert set(delivered) == set(keys)
    assert {key for key, times in delivered.items() if times > 1} == {held}  # delivered twice, one key
    assert delivered[held] == 2


def test_sigterm_finishes_the_delivery_in_hand_and_exits_0(
    redis_client: redis.Redis, redis_server: RedisServer, receiver: Receiver, tmp_path: Path
) -> None:
    keys = _publish(redis_client, 3)
    receiver.script = Script(answers=["slow"])  # the first answer waits until released
    log = tmp_path / "notify.log"
    env = notify_env(redis_server, receiver, "n1")
    process = start_notify(env, log)
    try:
        receiver.wait_for(lambda got: len(got) == 1, 30, "the first request")
        process.send_signal(signal.SIGTERM)
        wait_until(
            lambda: logged(log.read_text(), "stop requested", signal="SIGTERM"), 10, what="the stop logged"
        )
        assert process.poll() is None  # still waiting for the receiver's answer
        receiver.release.set()
        assert process.wait(30) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)
    assert receiver.delivered_keys() == keys[:1]  # finished; nothing new started after the stop
    assert pending_count(redis_client) == 2  # the first acknowledged; the rest wait for the next run
    assert "Traceback" not in log.read_text() and logged(log.read_text(), "stopped")


def test_health_and_metrics_are_served_on_the_notify_metrics_port(
    redis_client: redis.Redis, redis_server: RedisServer, receiver: Receiver, tmp_path: Path
) -> None:
    keys = _publish(redis_client, 2)
    receiver.script = Script(answers=[500])
    env = notify_env(redis_server, receiver, "n1")
    port = int(env["ANOMALY_NOTIFY_METRICS_PORT"])
    process = start_notify(env, tmp_path / "notify.log")
    try:
        receiver.wait_for(lambda got: {r.key for r in got if r.status == 200} == set(keys), 30, "both keys")
        assert http_status(port, "/healthz") == 200 and http_status(port, "/readyz") == 200
        # Counters are written after the acknowledgement that follows the receiver's answer.
        text = wait_for_metrics(port, {"anomaly_notify_sent_total": 2.0, "anomaly_notify_retries_total": 1.0})
        assert metric_sum(text, "anomaly_notify_failed_attempts_total") == 1.0
        assert metric_sum(text, "anomaly_notify_redis_up") == 1.0
        assert "anomaly_notify_delivery_latency_seconds_bucket" in text
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(30) == 0


def test_without_a_receiver_url_it_refuses_to_start_naming_the_variable(redis_server: RedisServer) -> None:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("ANOMALY_")}
    result = subprocess.run(
        [str(CONSOLE_SCRIPT)],
        env={**clean, "ANOMALY_REDIS_URL": redis_server.url},
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    assert "anomaly-notify: ANOMALY_NOTIFY_WEBHOOK_URL is not set" in result.stderr


def test_help_lists_every_notify_setting_as_a_flag() -> None:
    result = subprocess.run([str(CONSOLE_SCRIPT), "--help"], capture_output=True, text=True, check=True)
    text = " ".join(result.stdout.split())
    for flag in ("--notify-webhook-url", "--notify-format", "--notify-max-per-minute", "--notify-viewer-url",
                 "--burst", "--notify-group", "--notify-metrics-port"):  # fmt: skip
        assert flag in text
    assert "webhook (our JSON), alertmanager" in text and "ANOMALY_NOTIFY_MAX_PER_MINUTE" in text
