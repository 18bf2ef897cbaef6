"""HTTP: /metrics, /healthz, /readyz and nothing else."""

from __future__ import annotations

import urllib.error
import urllib.request

import pytest
from prometheus_client import CollectorRegistry

from runtime.http import Health, HttpServer
from worker.metrics import WorkerMetrics


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


@pytest.fixture
def served():
    registry = CollectorRegistry()
    WorkerMetrics(registry).scored.inc(3)
    clock = Clock()
    health = Health(liveness_seconds=30, clock=clock)
    server = HttpServer("127.0.0.1", 0, registry, health).start()
    yield server.port, health, clock
    server.stop()


def test_metrics_exposes_the_worker_metrics(served) -> None:
    port, _, _ = served
    status, body = get(port, "/metrics")
    assert status == 200
    assert "anomaly_messages_scored_total 3.0" in body
    assert "process_resident_memory_bytes" in body


def test_readyz_needs_model_and_redis_and_fails_while_stopping(served) -> None:
    port, health, _ = served
    assert get(port, "/readyz")[0] == 503
    health.model_loaded = True
    assert get(port, "/readyz")[0] == 503
    health.redis_ok = True
    assert get(port, "/readyz") == (200, "ok: model_loaded=1 redis_ok=1 stopping=0\n")
    health.stopping = True
    assert get(port, "/readyz")[0] == 503


def test_readyz_of_a_program_without_a_model_needs_redis_only() -> None:
    health = Health(needs_model=False)
    server = HttpServer("127.0.0.1", 0, CollectorRegistry(), health).start()
    try:
        assert get(server.port, "/readyz") == (503, "not ok: redis_ok=0 stopping=0\n")
        health.redis_ok = True
        assert get(server.port, "/readyz") == (200, "ok: redis_ok=1 stopping=0\n")
    finally:
        server.stop()


def test_healthz_fails_when_the_loop_stalls(served) -> None:
    port, health, clock = served
    assert get(port, "/healthz")[0] == 200
    clock.now += 31
    assert get(port, "/healthz") == (503, "not ok: loop stalled\n")
    health.heartbeat()
    assert get(port, "/healthz")[0] == 200


@pytest.mark.parametrize("path", ["/", "/debug", "/metrics/../etc/passwd", "/healthz/x"])
def test_other_paths_are_not_found(served, path: str) -> None:
    assert get(served[0], path)[0] == 404
