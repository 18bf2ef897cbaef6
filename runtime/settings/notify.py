"""anomaly-notify's settings: the shared connection and streams, where anomalies are posted and in
which format, its consumer group on the output streams, its rate limit and retries."""

from __future__ import annotations

import os
import socket
from typing import Literal
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, field_validator, model_validator
from redis.crc import key_slot

from runtime.redact import redact_url
from runtime.settings.base import StreamKey, StreamSettings

NotifyFormat = Literal["webhook", "alertmanager", "cloudevents", "slack"]


def _default_consumer() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


def _http_url(value: str, name: str) -> str:
    parts = urlsplit(value)
    if parts.scheme not in {"http", "https"} or not parts.netloc:
        shown = redact_url(value)
        raise ValueError(f"{name}: expected an http:// or https:// URL with a host, found {shown!r}")
    return value


class NotifySettings(StreamSettings):
    """What anomaly-notify reads from ANOMALY_* variables (env name: ANOMALY_<FIELD>)."""

    notify_webhook_url: SecretStr | None = Field(
        None,
        description="anomaly-notify: where each anomaly is POSTed (http:// or https://); with "
        "NOTIFY_FORMAT=alertmanager, Alertmanager's address (/api/v2/alerts is appended unless the "
        "path ends so); a secret: Slack's incoming-webhook URL is its own credential. Required",
    )
    notify_viewer_url: str = Field(
        "",
        description="anomaly-notify: the address of anomaly-viewer as people open it, e.g. "
        "https://anomalies.example.com; set, every message links to the page and the alert's picture",
    )
    notify_format: NotifyFormat = Field(
        "webhook",
        description="anomaly-notify: the body posted: webhook (our JSON), alertmanager (Alertmanager's "
        "/api/v2/alerts), cloudevents (CloudEvents 1.0, structured JSON mode) or slack (an "
        "incoming-webhook message)",
    )
    notify_authorization: SecretStr | None = Field(
        None,
        description="anomaly-notify: an Authorization header sent with every request, e.g. "
        "'Bearer <token>' or 'Basic <base64>' (unset: none)",
    )
    notify_max_per_minute: int = Field(
        60,
        ge=1,
        le=100_000,
        description="anomaly-notify: at most this many anomalies are posted one by one in any 60 s; "
        "past it, the anomalies until the next summary are grouped into one summary message per "
        "NOTIFY_SUMMARY_INTERVAL_SECONDS (count, top scores, first and last ids, viewer link)",
    )
    notify_summary_interval_seconds: float = Field(
        60.0, gt=0, le=3600, description="anomaly-notify: how long a burst past the limit is gathered"
    )
    notify_group: StreamKey = Field(
        "anomaly-notify", description="anomaly-notify: its consumer group on the output stream of every shard"
    )
    notify_consumer: StreamKey = Field(
        default_factory=_default_consumer,
        description="anomaly-notify: this process's name in the group (a stable name lets a restarted "
        "notifier deliver its own unacknowledged anomalies at once)",
    )
    notify_start_id: str = Field(
        "$",
        description="anomaly-notify: where its group starts when it creates it: $ (anomalies published "
        "from now on) or 0 (every anomaly still in the stream)",
    )
    notify_dead_letter_stream: StreamKey = Field(
        "anomalies:notify-dead-letter",
        description="anomaly-notify: anomalies the receiver refused for good (4xx), with reason and "
        "status; one per shard like the other streams (anomalies:notify-dead-letter:{i})",
    )
    notify_dead_letter_maxlen: int = Field(
        100_000, ge=0, description="anomaly-notify: approximate cap of its dead-letter stream (0: none)"
    )
    notify_timeout_seconds: float = Field(
        10.0,
        gt=0,
        le=300,
        description="anomaly-notify: longest wait to connect, and for each read of the answer, per request",
    )
    notify_retry_base_seconds: float = Field(
        0.5, gt=0, description="anomaly-notify: the first retry waits up to this long (then 2x each time)"
    )
    notify_retry_cap_seconds: float = Field(
        60.0, gt=0, description="anomaly-notify: the longest wait between two attempts (jittered)"
    )
    notify_retry_after_max_seconds: float = Field(
        600.0,
        gt=0,
        description="anomaly-notify: a 429 or 503 Retry-After is honoured up to this many seconds",
    )
    notify_batch_size: int = Field(
        32, ge=1, le=1000, description="anomaly-notify: anomalies read per XREADGROUP"
    )
    notify_block_ms: int = Field(
        1000, ge=1, le=60_000, description="anomaly-notify: how long one read waits for anomalies"
    )
    notify_claim_idle_ms: int = Field(
        300_000,
        ge=1000,
        description="anomaly-notify: anomalies another notifier of the group has held unacknowledged "
        "this long are taken over (it died); the notifier renews what it holds long before",
    )
    notify_dead_consumer_idle_ms: int = Field(
        3_600_000,
        ge=0,
        description="anomaly-notify: consumers of its group idle this long with nothing pending are "
        "removed (notifiers that died or were replaced; 0: never)",
    )
    notify_metrics_host: str = Field(
        "0.0.0.0", description="anomaly-notify: address of its /metrics, /healthz, /readyz server"
    )
    notify_metrics_port: int = Field(
        9401, ge=0, le=65535, description="anomaly-notify: port of that server (0: any free port)"
    )
    notify_grace_seconds: float = Field(
        20.0,
        gt=0,
        description="anomaly-notify: time allowed to finish the delivery in hand on SIGTERM",
    )

    @field_validator("notify_webhook_url")
    @classmethod
    def _webhook(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None:
            _http_url(value.get_secret_value(), "ANOMALY_NOTIFY_WEBHOOK_URL")
        return value

    @field_validator("notify_viewer_url")
    @classmethod
    def _viewer(cls, value: str) -> str:
        return _http_url(value, "ANOMALY_NOTIFY_VIEWER_URL").rstrip("/") if value else value

    @field_validator("notify_start_id")
    @classmethod
    def _start_id(cls, value: str) -> str:
        if value not in {"0", "$"} and not value.replace("-", "").isdigit():
            raise ValueError(f"expected 0, $ or a stream id like 1700000000000-0, found {value!r}")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> NotifySettings:
        if self.notify_retry_base_seconds > self.notify_retry_cap_seconds:
            raise ValueError(
                f"ANOMALY_NOTIFY_RETRY_BASE_SECONDS ({self.notify_retry_base_seconds:g}) must not exceed "
                f"ANOMALY_NOTIFY_RETRY_CAP_SECONDS ({self.notify_retry_cap_seconds:g})"
            )
        # What a notifier holds unacknowledged (a burst gathered for its summary, an anomaly being
        # retried) is renewed every third of CLAIM_IDLE_MS; a request must fit well inside it.
        if self.notify_claim_idle_ms < 3_000 * self.notify_timeout_seconds:
            raise ValueError(
                f"ANOMALY_NOTIFY_CLAIM_IDLE_MS ({self.notify_claim_idle_ms}) must be at least 3 x "
                f"ANOMALY_NOTIFY_TIMEOUT_SECONDS ({self.notify_timeout_seconds:g} s), or another "
                "notifier may take over an anomaly while its request is still running"
            )
        if self.notify_dead_letter_stream in self.sharded_names():
            raise ValueError(
                f"ANOMALY_NOTIFY_DEAD_LETTER_STREAM ({self.notify_dead_letter_stream}) must differ from "
                f"the input, output, dead-letter and scores streams {self.sharded_names()}"
            )
        if self.shards > 1 and (
            "{" in self.notify_dead_letter_stream or "}" in self.notify_dead_letter_stream
        ):
            raise ValueError(
                f"with ANOMALY_SHARDS={self.shards} stream names get the hash tag :{{shard}} and may not "
                f"contain braces, found {[self.notify_dead_letter_stream]}"
            )
        # A refused anomaly is dead-lettered and acknowledged in one MULTI/EXEC: on a cluster both
        # streams must be in one slot (with several shards the :{i} suffix gives them one).
        if self.redis_cluster and self.shards == 1:
            names = [self.output_stream, self.notify_dead_letter_stream]
            slots = {name: key_slot(name.encode()) for name in names}
            if len(set(slots.values())) > 1:
                found = ", ".join(f"{name} (slot {slot})" for name, slot in slots.items())
                raise ValueError(
                    "with ANOMALY_REDIS_CLUSTER the output stream and ANOMALY_NOTIFY_DEAD_LETTER_STREAM "
                    f"must share one hash slot, found {found}; give them one hash tag, e.g. "
                    "{cams}:anomalies and {cams}:notify-dead-letter"
                )
        return self

    def webhook_url(self) -> str:
        """Where requests go: NOTIFY_WEBHOOK_URL, with /api/v2/alerts for Alertmanager."""
        if self.notify_webhook_url is None:
            raise ValueError("ANOMALY_NOTIFY_WEBHOOK_URL is not set")
        url = self.notify_webhook_url.get_secret_value()
        if self.notify_format == "alertmanager" and not urlsplit(url).path.rstrip("/").endswith(
            "/api/v2/alerts"
        ):
            parts = urlsplit(url)
            url = parts._replace(path=parts.path.rstrip("/") + "/api/v2/alerts").geturl()
        return url

    def redacted_webhook_url(self) -> str:
        """The receiver for logs: scheme, host and port only (a Slack URL's path is its secret)."""
        if self.notify_webhook_url is None:
            return "unset"
        parts = urlsplit(self.notify_webhook_url.get_secret_value())
        host = parts.netloc.rsplit("@", 1)[-1]
        return f"{parts.scheme}://{host}/..." if parts.path.strip("/") else f"{parts.scheme}://{host}"

    def summary(self) -> str:
        """key=value config line for the start-up log, without secrets."""
        fields = {
            "redis": self.redacted_redis_url(),
            "receiver": self.redacted_webhook_url(),
            "format": self.notify_format,
            "viewer": self.notify_viewer_url or "off",
            "outputs": ",".join(self.every_shard(self.output_stream)),
            "group": self.notify_group,
            "consumer": self.notify_consumer,
            "dead_letter": self.notify_dead_letter_stream,
            "max_per_minute": self.notify_max_per_minute,
            "metrics": f"{self.notify_metrics_host}:{self.notify_metrics_port}",
        }
        return " ".join(f"{k}={v}" for k, v in fields.items())
