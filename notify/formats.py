"""The bodies posted, one function per ANOMALY_NOTIFY_FORMAT, for one anomaly and for a summary
(pure: an `Outgoing` request is built, nothing is sent).

- webhook: our JSON object (`kind` anomaly or summary), described in docs/operations.md.
- alertmanager: Alertmanager's POST /api/v2/alerts body, a list of postable alerts (labels,
  annotations, startsAt, generatorURL when there is a viewer link). Labels identify an alert, so
  each anomaly's carry its key; Alertmanager resolves it after its resolve_timeout.
- cloudevents: one CloudEvent 1.0 in structured JSON mode (application/cloudevents+json): id (the
  key), source, type, time, subject, and our JSON object as `data`.
- slack: an incoming-webhook message: `text` (the notification's fallback) and `blocks`; what a
  producer wrote is escaped (&, <, >), so an id cannot mention @channel or forge a link.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from notify.anomalies import Anomaly, ViewerLinks
from notify.grouping import Burst

JSON = "application/json"
CLOUDEVENTS_JSON = "application/cloudevents+json; charset=utf-8"
EVENT_SOURCE = "/anomaly-scorer"
ANOMALY_EVENT = "anomaly-scorer.anomaly.detected"
SUMMARY_EVENT = "anomaly-scorer.anomaly.summary"
SLACK_TEXT_LIMIT = 200  # characters of any one producer-supplied value in a Slack message


@dataclass(frozen=True)
class Outgoing:
    """One request to the receiver: the body and the headers that say what it is."""

    key: str  # the Idempotency-Key
    body: bytes
    content_type: str
    kind: str  # anomaly or summary (metric label)

    def json(self) -> Any:
        """The body, parsed (tests, logs)."""
        return json.loads(self.body)


def _dump(body: Any) -> bytes:
    # allow_nan=False: a NaN would make the body invalid JSON; parse_anomaly leaves them out.
    return json.dumps(body, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode("utf-8")


def rfc3339(ms: int) -> str:
    """Milliseconds since the epoch as RFC 3339 in UTC, e.g. 2023-11-14T22:13:20.000Z."""
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _when(anomaly: Anomaly) -> int:
    return anomaly.scored_at_ms if anomaly.scored_at_ms is not None else anomaly.published_at_ms


# -- webhook: our own JSON -----------------------------------------------------------------------
def anomaly_object(anomaly: Anomaly, links: ViewerLinks) -> dict[str, Any]:
    """The webhook body of one anomaly (also the `data` of its CloudEvent)."""
    body: dict[str, Any] = {
        "kind": "anomaly",
        "key": anomaly.key,
        "id": anomaly.id,
        "source_id": anomaly.source_id,
        "shard": anomaly.shard,
        "output_id": anomaly.entry_id,
        "score": anomaly.score,
        "threshold": anomaly.threshold,
        "z": anomaly.z,
        "p_value": anomaly.p_value,
        "model_version": anomaly.model_version,
        "region": anomaly.region or None,
        "region_share": anomaly.region_share,
        "score_components": dict(anomaly.score_components) or None,
        "scored_at_ms": anomaly.scored_at_ms,
    }
    if links.base:
        body["viewer_url"] = links.page(anomaly.model_version)
        body["picture_url"] = links.picture(anomaly)
    return body


def _brief(anomaly: Anomaly, links: ViewerLinks) -> dict[str, Any]:
    brief: dict[str, Any] = {
        "key": anomaly.key,
        "id": anomaly.id,
        "source_id": anomaly.source_id,
        "shard": anomaly.shard,
        "output_id": anomaly.entry_id,
        "score": anomaly.score,
        "model_version": anomaly.model_version,
    }
    if links.base:
        brief["picture_url"] = links.picture(anomaly)
    return brief


def summary_object(burst: Burst, links: ViewerLinks, per_minute: int) -> dict[str, Any]:
    """The webhook body of a summary: how many, the top scores, the first and the last."""
    body: dict[str, Any] = {
        "kind": "summary",
        "key": burst.key,
        "count": burst.count,
        "since_ms": burst.since_ms,
        "until_ms": burst.until_ms,
        "max_per_minute": per_minute,
        "first": _brief(burst.first, links),
        "last": _brief(burst.last, links),
        "top": [_brief(a, links) for a in burst.top()],
    }
    if links.base:
        body["viewer_url"] = links.page()
    return body


def _webhook_anomaly(anomaly: Anomaly, links: ViewerLinks) -> Outgoing:
    return Outgoing(anomaly.key, _dump(anomaly_object(anomaly, links)), JSON, "anomaly")


def _webhook_summary(burst: Burst, links: ViewerLinks, per_minute: int) -> Outgoing:
    return Outgoing(burst.key, _dump(summary_object(burst, links, per_minute)), JSON, "summary")


# -- Alertmanager ---------------------------------------------------------------------------------
def _g(value: float | None) -> str:
    return "" if value is None else f"{value:.6g}"


def _alertmanager_anomaly(anomaly: Anomaly, links: ViewerLinks) -> Outgoing:
    annotations = {
        "summary": f"Anomaly {anomaly.name} scored {anomaly.score:.6g} (threshold {anomaly.threshold:.6g})",
        "score": repr(anomaly.score),
        "threshold": repr(anomaly.threshold),
        "p_value": _g(anomaly.p_value),
        "z": _g(anomaly.z),
        "region": anomaly.region,
        "score_components": anomaly.why,
        "id": anomaly.id,
        "output_id": anomaly.entry_id,
    }
    alert: dict[str, Any] = {
        "labels": {
            "alertname": "AnomalyDetected",
            "anomaly_key": anomaly.key,
            "source_id": anomaly.source_id,
            "shard": str(anomaly.shard),
            "model_version": anomaly.model_version,
        },
        # Alertmanager keeps annotations as given; empty ones say nothing.
        "annotations": {name: value for name, value in annotations.items() if value},
        "startsAt": rfc3339(_when(anomaly)),
    }
    if (picture := links.picture(anomaly)) is not None:
        alert["generatorURL"] = picture
    return Outgoing(anomaly.key, _dump([alert]), JSON, "anomaly")


def _alertmanager_summary(burst: Burst, links: ViewerLinks, per_minute: int) -> Outgoing:
    top = ", ".join(f"{a.name} {a.score:.6g}" for a in burst.top())
    alert: dict[str, Any] = {
        "labels": {"alertname": "AnomalyBurst", "summary_key": burst.key},
        "annotations": {
            "summary": f"{burst.count} anomalies past the limit of {per_minute} a minute; top scores: {top}",
            "count": str(burst.count),
            "first_id": burst.first.name,
            "last_id": burst.last.name,
            "first_key": burst.first.key,
            "last_key": burst.last.key,
        },
        "startsAt": rfc3339(burst.since_ms),
    }
    if (page := links.page()) is not None:
        alert["generatorURL"] = page
    return Outgoing(burst.key, _dump([alert]), JSON, "summary")


# -- CloudEvents ----------------------------------------------------------------------------------
def _cloudevents_anomaly(anomaly: Anomaly, links: ViewerLinks) -> Outgoing:
    event = {
        "specversion": "1.0",
        "id": anomaly.key,
        "source": f"{EVENT_SOURCE}/{anomaly.output_stream}",
        "type": ANOMALY_EVENT,
        "time": rfc3339(_when(anomaly)),
        "subject": anomaly.name,
        "datacontenttype": JSON,
        "data": anomaly_object(anomaly, links),
    }
    return Outgoing(anomaly.key, _dump(event), CLOUDEVENTS_JSON, "anomaly")


def _cloudevents_summary(burst: Burst, links: ViewerLinks, per_minute: int) -> Outgoing:
    event = {
        "specversion": "1.0",
        "id": burst.key,
        "source": f"{EVENT_SOURCE}/anomaly-notify",
        "type": SUMMARY_EVENT,
        "time": rfc3339(burst.until_ms),
        "datacontenttype": JSON,
        "data": summary_object(burst, links, per_minute),
    }
    return Outgoing(burst.key, _dump(event), CLOUDEVENTS_JSON, "summary")


# -- Slack ----------------------------------------------------------------------------------------
def slack_escape(text: str) -> str:
    """Text as Slack shows it literally: &, < and > are its markup."""
    short = text if len(text) <= SLACK_TEXT_LIMIT else text[: SLACK_TEXT_LIMIT - 1] + "…"
    return short.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _slack_link(url: str | None, label: str) -> str | None:
    return None if url is None else f"<{slack_escape(url)}|{label}>"


def _slack(text: str, details: str, links: list[str | None]) -> dict[str, Any]:
    blocks: list[dict[str, Any]] = [
        {"type": "section", "text": {"type": "mrkdwn", "text": f"{text}\n{details}"}},
    ]
    shown = [link for link in links if link is not None]
    if shown:
        blocks.append({"type": "context", "elements": [{"type": "mrkdwn", "text": " · ".join(shown)}]})
    return {"text": text, "blocks": blocks}


def _slack_anomaly(anomaly: Anomaly, links: ViewerLinks) -> Outgoing:
    text = (
        f"Anomaly {slack_escape(anomaly.name)} scored {anomaly.score:.6g} (threshold {anomaly.threshold:.6g})"
    )
    details = (
        f"p-value {_g(anomaly.p_value) or 'n/a'} · model {slack_escape(anomaly.model_version) or 'n/a'} · "
        f"shard {anomaly.shard} · region {slack_escape(anomaly.region) or 'n/a'}"
        + (f"\nwhy: {slack_escape(anomaly.why)}" if anomaly.why else "")
    )
    body = _slack(
        text,
        details,
        [
            _slack_link(links.picture(anomaly), "picture"),
            _slack_link(links.page(anomaly.model_version), "viewer"),
        ],
    )
    return Outgoing(anomaly.key, _dump(body), JSON, "anomaly")


def _slack_summary(burst: Burst, links: ViewerLinks, per_minute: int) -> Outgoing:
    text = f"{burst.count} anomalies past the limit of {per_minute} a minute"
    top = ", ".join(f"{slack_escape(a.name)} {a.score:.6g}" for a in burst.top())
    details = (
        f"top scores: {top}\nfirst {slack_escape(burst.first.name)} · last {slack_escape(burst.last.name)} · "
        f"{rfc3339(burst.since_ms)} to {rfc3339(burst.until_ms)}"
    )
    body = _slack(text, details, [_slack_link(links.page(), "viewer")])
    return Outgoing(burst.key, _dump(body), JSON, "summary")


AnomalyFormat = Callable[[Anomaly, ViewerLinks], Outgoing]
SummaryFormat = Callable[[Burst, ViewerLinks, int], Outgoing]
FORMATS: dict[str, tuple[AnomalyFormat, SummaryFormat]] = {
    "webhook": (_webhook_anomaly, _webhook_summary),
    "alertmanager": (_alertmanager_anomaly, _alertmanager_summary),
    "cloudevents": (_cloudevents_anomaly, _cloudevents_summary),
    "slack": (_slack_anomaly, _slack_summary),
}


class Formatter:
    """The requests of one format (ANOMALY_NOTIFY_FORMAT), with the viewer's links."""

    def __init__(self, name: str, links: ViewerLinks, per_minute: int) -> None:
        if name not in FORMATS:
            raise ValueError(f"unknown format {name!r}, expected one of {', '.join(FORMATS)}")
        self.name = name
        self.links = links
        self.per_minute = per_minute
        self._anomaly, self._summary = FORMATS[name]

    def anomaly(self, anomaly: Anomaly) -> Outgoing:
        """The request announcing one anomaly."""
        return self._anomaly(anomaly, self.links)

    def summary(self, burst: Burst) -> Outgoing:
        """The request summarising a burst."""
        return self._summary(burst, self.links, self.per_minute)
