"""anomaly-notify's Prometheus metrics, all registered on an injected registry.

Names are a contract with dashboards and alert rules: anomaly_notify_*.
"""

from __future__ import annotations

import platform

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    PlatformCollector,
    ProcessCollector,
)

from runtime.version import package_version

DELIVERY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 900, 3600)
REQUEST_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class NotifyMetrics:
    """Every metric the notifier exports."""

    def __init__(self, registry: CollectorRegistry, with_process: bool = True) -> None:
        self.registry = registry
        r = registry
        if with_process:
            ProcessCollector(registry=r)
            PlatformCollector(registry=r)
        self.build = Info("anomaly_build", "The running program's package and Python versions.", registry=r)
        self.build.info({"version": package_version(), "python": platform.python_version()})
        self.sent = Counter(
            "anomaly_notify_sent",
            "Messages the receiver accepted (2xx), by kind: anomaly (one) or summary (a burst).",
            ["kind"],
            registry=r,
        )
        self.delivered = Counter(
            "anomaly_notify_anomalies_delivered",
            "Anomalies delivered and acknowledged, by how: single or summary.",
            ["how"],
            registry=r,
        )
        self.failed = Counter(
            "anomaly_notify_failed_attempts",
            "Attempts that delivered nothing, by reason: 5xx, 408, 429, 4xx, 3xx, timeout, connection.",
            ["reason"],
            registry=r,
        )
        self.retried = Counter(
            "anomaly_notify_retries",
            "Attempts made again after a failure (backoff or Retry-After).",
            registry=r,
        )
        self.dead_lettered = Counter(
            "anomaly_notify_dead_lettered",
            "Anomalies put on the notifier's dead-letter stream, by reason code: refused (4xx, 3xx), "
            "summary_refused, bad_entry, trimmed.",
            ["reason_code"],
            registry=r,
        )
        self.rate_limited = Counter(
            "anomaly_notify_rate_limited",
            "Anomalies past ANOMALY_NOTIFY_MAX_PER_MINUTE, summarised instead of sent one by one.",
            registry=r,
        )
        self.delivery_latency = Histogram(
            "anomaly_notify_delivery_latency_seconds",
            "From an anomaly's publication (its output entry id) to the receiver's 2xx.",
            buckets=DELIVERY_BUCKETS,
            registry=r,
        )
        self.request_seconds = Histogram(
            "anomaly_notify_request_seconds",
            "One HTTP attempt, answered or not.",
            buckets=REQUEST_BUCKETS,
            registry=r,
        )
        self.held = Gauge(
            "anomaly_notify_held",
            "Anomalies read and not yet acknowledged: being delivered or retried, or in a summary "
            "being gathered.",
            registry=r,
        )
        self.reclaimed = Counter(
            "anomaly_notify_reclaimed",
            "Anomalies taken over from a notifier of the group that stopped acknowledging them.",
            registry=r,
        )
        self.redis_up = Gauge("anomaly_notify_redis_up", "1 while Redis answers the notifier.", registry=r)
        self.redis_errors = Counter(
            "anomaly_notify_redis_errors", "Redis calls of the notifier that failed.", registry=r
        )
