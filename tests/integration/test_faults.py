"""Faults done for real: network cuts, Redis down at start, a least-privilege ACL user."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from runtime.connection import make_redis
from runtime.settings import WorkerSettings
from tests.conftest import ROOT, RedisServer, free_port, wait_until
from tests.integration.tcp_proxy import TcpProxy
from tests.support import build_runner, push, stream, write_test_certificates
from worker.runner import Runner

pytestmark = pytest.mark.integration


def real_runner(settings: WorkerSettings) -> Runner:
    """A runner with the worker's real Redis client (retries, timeouts) and the fake model."""
    return build_runner(make_redis(settings), settings)


@pytest.fixture
def running() -> Iterator[Any]:
    threads: list[tuple[Runner, threading.Thread]] = []

    def start(runner: Runner) -> Runner:
        thread = threading.Thread(target=runner.run, daemon=True)
        thread.start()
        threads.append((runner, thread))
        return runner

    yield start
    for runner, thread in threads:
        runner.request_stop()
        thread.join(15)
        assert not thread.is_alive(), "worker loop did not stop"


def test_network_cut_is_survived_without_loss_or_duplicates(
    redis_client, redis_server: RedisServer, running, caplog: pytest.LogCaptureFixture
) -> None:
    proxy = TcpProxy(redis_server.port)
    try:
        settings = WorkerSettings(
            redis_url=f"redis://127.0.0.1:{proxy.port}/0",
            consumer="w1",
            block_ms=100,
            scores_stream="scores",
            reload_poll_seconds=0,
        )  # type: ignore[arg-type]
        runner = running(real_runner(settings))
        ids = [push(redis_client, 0.9 if i % 4 == 0 else 0.1) for i in range(200)]
        wait_until(lambda: redis_client.xlen("scores") == 200, 10, what="first 200 scored")
        errors = runner.metrics.registry.get_sample_value

        def logged(prefix: str) -> int:
            return sum(r.getMessage().startswith(prefix) for r in caplog.records)

        with caplog.at_level(logging.INFO, logger="worker.runner"):
            for cut in range(1, 3):
                proxy.cut()
                ids += [push(redis_client, 0.9 if i % 4 == 0 else 0.1) for i in range(100)]
                wait_until(lambda: not runner.health.redis_ok, 10, what="worker to notice the cut")
                assert errors("anomaly_redis_up") == 0
                failed_before = errors("anomaly_redis_errors_total")
                # Stay cut through several retries: each failed one counts an error, none logs again.
                wait_until(
                    lambda: errors("anomaly_redis_errors_total") >= failed_before + 2,  # noqa: B023
                    20,
                    what="two more failed retries while cut",
                )
                proxy.restore()
                # The line is written by the worker thread after it marks itself ready: wait for it.
                wait_until(lambda: logged("redis back") == cut, 20, what=f"'redis back' logged {cut} times")  # noqa: B023
            assert logged("redis lost") == 2 and logged("redis back") == 2  # once per state change
        wait_until(lambda: redis_client.xlen("scores") == 400, 20, what="all 400 scored")
        scored = [e["source_id"] for e in stream(redis_client, "scores")]
        assert sorted(scored) == sorted(i.decode() for i in ids)  # each exactly once
        assert len(stream(redis_client, "anomalies")) == 100
        assert int(redis_client.xpending("images", "anomaly-scorer")["pending"]) == 0
        assert errors("anomaly_redis_errors_total") >= 6
    finally:
        proxy.close()


def test_redis_down_at_start_the_worker_waits_then_works(
    tmp_path, running, caplog: pytest.LogCaptureFixture
) -> None:
    port = free_port()
    settings = WorkerSettings(
        redis_url=f"redis://127.0.0.1:{port}/0", consumer="w1", block_ms=100, reload_poll_seconds=0
    )  # type: ignore[arg-type]
    errors = "anomaly_redis_errors_total"
    with caplog.at_level(logging.INFO, logger="worker.runner"):
        runner = running(real_runner(settings))
        # Several failed attempts; the first one's log line is written before the second attempt.
        wait_until(
            lambda: (runner.metrics.registry.get_sample_value(errors) or 0) >= 3, 20, what="3 failed attempts"
        )
    assert not runner.health.ready() and runner.health.alive()
    assert [r.getMessage().split(" error=")[0] for r in caplog.records if "redis" in r.getMessage()] == [
        "redis unreachable"
    ]  # one line for the state change, not one per retry
    server = RedisServer(port, tmp_path).start()
    try:
        client = server.client()
        wait_until(lambda: runner.health.ready(), 20, what="ready after Redis started")
        push(client, 0.9)
        wait_until(lambda: client.xlen("anomalies") == 1, 10, what="scored")
    finally:
        runner.request_stop()
        server.stop()


def documented_acl(password: str) -> str:
    text = (ROOT / "deploy" / "README.md").read_text()
    line = next(ln for ln in text.splitlines() if ln.startswith("ACL SETUSER anomaly-worker "))
    return line.replace("WORKER-PASSWORD", password)


def test_worker_runs_with_the_documented_least_privilege_acl(
    redis_client, redis_server: RedisServer, running, caplog: pytest.LogCaptureFixture
) -> None:
    admin = redis_client
    admin.execute_command(*documented_acl("s3cret-pw").split())
    try:
        with caplog.at_level(logging.DEBUG):
            settings = WorkerSettings(
                redis_url=f"redis://anomaly-worker:s3cret-pw@127.0.0.1:{redis_server.port}/0",
                consumer="acl",
                block_ms=100,
                reload_poll_seconds=0,
            )  # type: ignore[arg-type]
            runner = running(real_runner(settings))
            push(admin, 0.9)
            admin.xadd("images", {"image": b"bad"})
            wait_until(
                lambda: admin.xlen("anomalies") == 1 and admin.xlen("images:dead-letter") == 1,
                15,
                what="scored with the ACL user",
            )
            assert runner.metrics.registry.get_sample_value("anomaly_redis_errors_total") == 0
            runner.request_stop()
        assert "s3cret-pw" not in caplog.text
        limited = redis.Redis(port=redis_server.port, username="anomaly-worker", password="s3cret-pw")
        with pytest.raises(redis.exceptions.NoPermissionError):
            limited.get("some-other-key")
        with pytest.raises(redis.exceptions.NoPermissionError):
            limited.flushall()
        with pytest.raises(redis.exceptions.NoPermissionError):
            limited.xadd("other-stream", {"a": 1})
    finally:
        admin.acl_deluser("anomaly-worker")


def test_password_file_is_used_and_wrong_password_is_reported_not_logged(
    redis_client, redis_server: RedisServer, running, tmp_path, caplog: pytest.LogCaptureFixture
) -> None:
    redis_client.acl_setuser("filed", enabled=True, passwords=["+right-pw"], keys=["*"], commands=["+@all"])
    try:
        secret = tmp_path / "password"
        secret.write_text("wrong-pw\n")
        url = f"redis://filed@127.0.0.1:{redis_server.port}/0"
        with caplog.at_level(logging.INFO):
            runner = running(
                real_runner(
                    WorkerSettings(
                        redis_url=url,
                        redis_password_file=secret,  # type: ignore[arg-type]
                        consumer="pf",
                        block_ms=100,
                        reload_poll_seconds=0,
                    )
                )
            )
            # The error is counted, then logged: wait for the line itself.
            wait_until(
                lambda: "redis unreachable error=invalid username-password pair" in caplog.text,
                10,
                what="authentication error logged",
            )
            assert runner.metrics.registry.get_sample_value("anomaly_redis_errors_total") >= 1
            assert not runner.health.ready()
            runner.request_stop()
        assert "wrong-pw" not in caplog.text
        secret.write_text("right-pw\n")
        ok = running(
            real_runner(
                WorkerSettings(
                    redis_url=url,
                    redis_password_file=secret,  # type: ignore[arg-type]
                    consumer="pf2",
                    block_ms=100,
                    reload_poll_seconds=0,
                )
            )
        )
        push(redis_client, 0.9)
        wait_until(lambda: redis_client.xlen("anomalies") == 1, 10, what="scored with the filed password")
        assert ok.health.ready()
    finally:
        redis_client.acl_deluser("filed")


@pytest.fixture
def tls_redis(tmp_path) -> Iterator[RedisServer]:
    """A redis-server that speaks only TLS, with a throwaway CA made by openssl."""
    server = RedisServer(free_port(), tmp_path, tls_ca=write_test_certificates(tmp_path)).start()
    yield server
    server.stop(kill=True)


def test_worker_connects_over_tls_with_a_rediss_url(tls_redis: RedisServer, running) -> None:
    admin = tls_redis.client()
    url = f"rediss://127.0.0.1:{tls_redis.port}/0?ssl_ca_certs={tls_redis.tls_ca}"
    runner = running(
        real_runner(
            WorkerSettings(
                redis_url=url,
                consumer="tls",
                block_ms=100,  # type: ignore[arg-type]
                reload_poll_seconds=0,
            )
        )
    )
    push(admin, 0.9)
    wait_until(lambda: admin.xlen("anomalies") == 1, 15, what="scored over TLS")
    assert runner.health.ready()
    plain = redis.Redis(port=tls_redis.port, socket_timeout=2)
    with pytest.raises(redis.ConnectionError):
        plain.ping()  # the server refuses plaintext: the worker really used TLS
