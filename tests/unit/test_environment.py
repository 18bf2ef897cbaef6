"""Which ANOMALY_* variables a program accepts: every program's settings, and the service links
Kubernetes injects (recognised by name and value), while a typo is still refused."""

from __future__ import annotations

import pytest

from runtime.settings import KNOWN_VARIABLES, unknown_variables
from runtime.settings.environment import service_link_variables

# What a pod in a namespace with Services anomaly-worker (port 9400, named metrics) and
# anomaly-viewer (port 9500, named http) gets with enableServiceLinks on (the default).
SERVICE_LINKS = {
    "ANOMALY_WORKER_SERVICE_HOST": "10.96.12.7",
    "ANOMALY_WORKER_SERVICE_PORT": "9400",
    "ANOMALY_WORKER_SERVICE_PORT_METRICS": "9400",
    "ANOMALY_WORKER_PORT": "tcp://10.96.12.7:9400",
    "ANOMALY_WORKER_PORT_9400_TCP": "tcp://10.96.12.7:9400",
    "ANOMALY_WORKER_PORT_9400_TCP_PROTO": "tcp",
    "ANOMALY_WORKER_PORT_9400_TCP_PORT": "9400",
    "ANOMALY_WORKER_PORT_9400_TCP_ADDR": "10.96.12.7",
    "ANOMALY_VIEWER_SERVICE_HOST": "fd00::1b",
    "ANOMALY_VIEWER_SERVICE_PORT": "9500",
    "ANOMALY_VIEWER_SERVICE_PORT_HTTP": "9500",
    "ANOMALY_VIEWER_PORT": "tcp://[fd00::1b]:9500",
    "ANOMALY_VIEWER_PORT_9500_TCP": "tcp://[fd00::1b]:9500",
    "ANOMALY_VIEWER_PORT_9500_TCP_PROTO": "tcp",
    "ANOMALY_VIEWER_PORT_9500_TCP_PORT": "9500",
    "ANOMALY_VIEWER_PORT_9500_TCP_ADDR": "fd00::1b",
}


def test_kubernetes_service_links_of_our_services_are_not_refused() -> None:
    environ = {**SERVICE_LINKS, "ANOMALY_BATCH_SIZE": "64", "HOME": "/"}
    assert unknown_variables(environ, KNOWN_VARIABLES) == []
    assert service_link_variables(environ) == frozenset(SERVICE_LINKS)


def test_a_real_setting_that_looks_like_a_service_link_stays_a_setting() -> None:
    environ = {**SERVICE_LINKS, "ANOMALY_METRICS_PORT": "9401"}
    assert "ANOMALY_METRICS_PORT" not in service_link_variables(environ)
    assert unknown_variables(environ, KNOWN_VARIABLES) == []


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("ANOMALY_METRIC_PORT", "9400"),  # a typo of ANOMALY_METRICS_PORT: no tcp:// value
        ("ANOMALY_WORKER_PORT", "9400"),  # a service's _PORT is a URL, not a number
        ("ANOMALY_WORKER_SERVICE_PORT", "lots"),
        ("ANOMALY_WORKER_PORT_9400_TCP_ADDR", "not-an-address"),
    ],
)
def test_a_typo_that_looks_like_a_service_link_is_still_refused(name: str, value: str) -> None:
    environ = {**{k: v for k, v in SERVICE_LINKS.items() if k != name}, name: value}
    assert [m.split(";")[0] for m in unknown_variables(environ, KNOWN_VARIABLES)] == [
        f"unknown setting {name}"
    ]


def test_port_variables_without_their_services_host_are_refused() -> None:
    # No ANOMALY_CACHE_SERVICE_HOST: nothing says a Service `anomaly-cache` exists.
    environ = {"ANOMALY_CACHE_PORT": "tcp://10.0.0.1:6379", "ANOMALY_CACHE_SERVICE_PORT": "6379"}
    assert len(unknown_variables(environ, KNOWN_VARIABLES)) == 2


def test_one_environment_serves_every_program() -> None:
    # The viewer may read the worker's ConfigMap: the worker's settings are not typos to it.
    environ = {"ANOMALY_BATCH_SIZE": "64", "ANOMALY_VIEWER_TOKEN": "t", "ANOMALY_CLAIM_IDLE_MS": "1000"}
    assert unknown_variables(environ, KNOWN_VARIABLES) == []
