"""The notifier's loop, run synchronously (run_once, drain) on fakeredis with a scripted fake sender
and a fake clock: acknowledged only after a 2xx, retried with the same key, dead-lettered when
refused for good, rate-limited into summaries acknowledged after their delivery, stopped warm."""

from __future__ import annotations

from typing import Any

import fakeredis
import pytest
from prometheus_client import CollectorRegistry

from notify.delivery import ReceiverUnreachable, Reply
from notify.formats import Outgoing
from tests.notify_support import (
    FakeClock,
    FakeSender,
    build_notifier,
    dead_letters,
    notify_settings,
    output_fields,
    pending_count,
    publish,
)


@pytest.fixture
def r() -> Any:
    return fakeredis.FakeRedis()


def _sources(n: int, start: int = 0) -> list[str]:
    return [f"1700000000000-{i}" for i in range(start, start + n)]


def test_every_anomaly_is_posted_once_with_its_key_and_acknowledged(r: Any) -> None:
    for source in _sources(3):
        publish(r, source)
    sender = FakeSender()
    assert build_notifier(r, sender).drain() == 3
    assert sender.keys == [f"images/{s}" for s in _sources(3)]
    assert {m.json()["source_id"] for m in sender.sent} == set(_sources(3))
    assert pending_count(r) == 0 and dead_letters(r) == []


def test_nothing_is_acknowledged_before_the_receivers_answer(r: Any) -> None:
    publish(r, "1700000000000-0")
    sender = FakeSender()
    seen: list[int] = []
    sender.before_answer = lambda message: seen.append(pending_count(r))
    build_notifier(r, sender).drain()
    assert seen == [1] and pending_count(r) == 0


@pytest.mark.parametrize(
    "failures",
    [
        [500],
        [502, 503, 500],
        [408],
        [ReceiverUnreachable("timeout", "no answer within 1 s")],
        [ReceiverUnreachable("connection", "refused"), 500],
    ],
    ids=["500", "three 5xx", "408", "timeout", "connection error then 500"],
)
def test_a_failed_delivery_is_retried_with_the_same_key_until_it_is_taken(
    r: Any, failures: list[Any]
) -> None:
    publish(r, "1700000000000-0")
    registry = CollectorRegistry()
    clock = FakeClock()
    sender = FakeSender(failures)
    build_notifier(r, sender, clock, registry).drain()
    assert sender.keys == ["images/1700000000000-0"] * (len(failures) + 1)
    assert len(clock.waits) == len(failures) and all(0 < w <= 0.05 for w in clock.waits)
    assert pending_count(r) == 0 and dead_letters(r) == []
    assert registry.get_sample_value("anomaly_notify_retries_total") == len(failures)
    assert registry.get_sample_value("anomaly_notify_sent_total", {"kind": "anomaly"}) == 1


def test_a_429_waits_the_retry_after_it_asked_for(r: Any) -> None:
    publish(r, "1700000000000-0")
    clock = FakeClock()
    sender = FakeSender([Reply(429, retry_after="7")])
    build_notifier(r, sender, clock).drain()
    assert sum(clock.waits) == pytest.approx(7.0) and len(sender.sent) == 2


@pytest.mark.parametrize("status", [400, 404, 422, 301])
def test_a_refused_anomaly_is_dead_lettered_with_reason_and_status_then_acknowledged(
    r: Any, status: int
) -> None:
    output_id = publish(r, "1700000000000-0")
    publish(r, "1700000000000-1")
    registry = CollectorRegistry()
    sender = FakeSender([Reply(status, body="no such channel")])
    build_notifier(r, sender, registry=registry).drain()
    assert sender.keys == ["images/1700000000000-0", "images/1700000000000-1"]  # not retried
    (dead,) = dead_letters(r)
    assert dead["reason_code"] == "refused" and dead["status"] == str(status)
    assert dead["reason"].startswith(f"HTTP {status}")
    assert dead["output_id"] == output_id and dead["idempotency_key"] == "images/1700000000000-0"
    assert (dead["source_id"], dead["score"], dead["model_version"]) == ("1700000000000-0", "0.9", "v1")
    assert pending_count(r) == 0
    assert registry.get_sample_value("anomaly_notify_dead_lettered_total", {"reason_code": "refused"}) == 1


def test_an_output_entry_it_cannot_describe_is_dead_lettered_not_posted(r: Any) -> None:
    r.xadd("anomalies", output_fields("1700000000000-0") | {"score": "high"})
    sender = FakeSender()
    build_notifier(r, sender).drain()
    assert sender.sent == []
    (dead,) = dead_letters(r)
    assert dead["reason_code"] == "bad_entry" and dead["reason"] == "field score is 'high', expected a number"
    assert dead["status"] == "" and pending_count(r) == 0


def test_a_stop_while_retrying_leaves_the_anomaly_unacknowledged_and_a_restart_delivers_it(r: Any) -> None:
    publish(r, "1700000000000-0")
    clock = FakeClock()
    clock.stop_after_waits = 2  # SIGTERM arrives during the second backoff
    first = FakeSender([500, 500, 500])
    build_notifier(r, first, clock).drain()
    assert len(first.sent) == 2 and pending_count(r) == 1
    again = FakeSender()
    build_notifier(r, again).drain()  # the same consumer, restarted: its own pending first
    assert again.keys == first.keys[:1] and pending_count(r) == 0


def test_a_stop_during_a_delivery_finishes_it_and_leaves_the_rest_for_later(r: Any) -> None:
    for source in _sources(3):
        publish(r, source)
    sender = FakeSender()
    notifier = build_notifier(r, sender)

    def stop_on_the_first(message: Outgoing) -> None:
        notifier.request_stop()

    sender.before_answer = stop_on_the_first
    notifier.run()
    assert len(sender.sent) == 1 and pending_count(r) == 2  # delivered and acknowledged; two left
    assert notifier.health.stopping and not notifier.health.ready()


def test_past_the_limit_a_burst_becomes_one_summary_acknowledged_after_its_delivery(r: Any) -> None:
    for i, source in enumerate(_sources(6)):
        publish(r, source, score=1.0 + i)
    registry = CollectorRegistry()
    clock = FakeClock()
    sender = FakeSender()
    notifier = build_notifier(r, sender, clock, registry, notify_max_per_minute=2)
    notifier.run_once()
    assert [m.kind for m in sender.sent] == ["anomaly", "anomaly"]
    assert pending_count(r) == 4 and notifier.burst is not None and notifier.burst.count == 4
    assert registry.get_sample_value("anomaly_notify_rate_limited_total") == 4
    assert registry.get_sample_value("anomaly_notify_held") == 4
    clock.advance(59.0)
    notifier.run_once()
    assert len(sender.sent) == 2 and pending_count(r) == 4  # the interval is not over yet
    clock.advance(1.0)
    notifier.run_once()
    summary = sender.sent[-1]
    assert summary.kind == "summary" and pending_count(r) == 0
    body = summary.json()
    assert body["count"] == 4
    assert [a["score"] for a in body["top"]] == [6.0, 5.0, 4.0, 3.0]
    assert (body["first"]["source_id"], body["last"]["source_id"]) == (_sources(6)[2], _sources(6)[5])
    assert registry.get_sample_value("anomaly_notify_anomalies_delivered_total", {"how": "summary"}) == 4
    assert registry.get_sample_value("anomaly_notify_anomalies_delivered_total", {"how": "single"}) == 2
    assert registry.get_sample_value("anomaly_notify_held") == 0


def test_while_a_burst_gathers_every_new_anomaly_joins_it(r: Any) -> None:
    for source in _sources(3):
        publish(r, source)
    clock = FakeClock()
    sender = FakeSender()
    notifier = build_notifier(r, sender, clock, notify_max_per_minute=1)
    notifier.run_once()
    clock.advance(30.0)  # the limiter would allow one more now; the burst still takes it
    publish(r, "1700000000000-9")
    notifier.run_once()
    assert len(sender.sent) == 1 and notifier.burst is not None and notifier.burst.count == 3
    clock.advance(30.0)
    notifier.run_once()
    assert sender.sent[-1].json()["count"] == 3 and pending_count(r) == 0


def test_a_summary_that_fails_keeps_its_anomalies_pending_until_it_is_delivered(r: Any) -> None:
    for source in _sources(3):
        publish(r, source)
    clock = FakeClock()
    sender = FakeSender()
    notifier = build_notifier(r, sender, clock, notify_max_per_minute=1)
    notifier.run_once()
    clock.advance(60.0)
    pending_while_failing: list[int] = []

    def count_pending(message: Outgoing) -> None:
        pending_while_failing.append(pending_count(r))

    sender.before_answer = count_pending
    sender.answers = [503, 503]
    notifier.run_once()
    summaries = [m for m in sender.sent if m.kind == "summary"]
    assert len(summaries) == 3 and len({m.key for m in summaries}) == 1  # retried with one key
    assert pending_while_failing == [2, 2, 2] and pending_count(r) == 0


def test_a_refused_summary_dead_letters_each_of_its_anomalies(r: Any) -> None:
    for source in _sources(3):
        publish(r, source)
    clock = FakeClock()
    sender = FakeSender([200, 400])
    notifier = build_notifier(r, sender, clock, notify_max_per_minute=1)
    notifier.run_once()
    clock.advance(60.0)
    notifier.run_once()
    dead = dead_letters(r)
    assert [d["reason_code"] for d in dead] == ["summary_refused", "summary_refused"]
    assert [d["idempotency_key"] for d in dead] == [f"images/{s}" for s in _sources(3)[1:]]
    assert all(d["status"] == "400" and "was refused: HTTP 400" in d["reason"] for d in dead)
    assert pending_count(r) == 0


def test_burst_mode_sends_the_summary_of_what_passed_the_limit_before_returning(r: Any) -> None:
    for source in _sources(4):
        publish(r, source)
    sender = FakeSender()
    build_notifier(r, sender, notify_max_per_minute=3).drain()
    assert [m.kind for m in sender.sent] == ["anomaly"] * 3 + ["summary"]
    assert pending_count(r) == 0


def test_anomalies_of_every_shard_are_delivered_with_keys_that_do_not_collide(r: Any) -> None:
    # Shards hand out stream ids independently: the same source id in two shards.
    publish(r, "1700000000000-0", stream="anomalies:{0}")
    publish(r, "1700000000000-0", stream="anomalies:{1}")
    publish(r, "1700000000000-1", stream="anomalies:{1}")
    sender = FakeSender()
    build_notifier(r, sender, shards=2).drain()
    assert sorted(sender.keys) == [
        "images:{0}/1700000000000-0",
        "images:{1}/1700000000000-0",
        "images:{1}/1700000000000-1",
    ]
    assert pending_count(r, "anomalies:{0}") == pending_count(r, "anomalies:{1}") == 0


def test_a_refused_anomaly_of_a_shard_goes_to_that_shards_dead_letter_stream(r: Any) -> None:
    publish(r, "1700000000000-0", stream="anomalies:{1}")
    build_notifier(r, FakeSender([400]), shards=2).drain()
    assert [d["shard"] for d in dead_letters(r, "anomalies:notify-dead-letter:{1}")] == ["1"]
    assert dead_letters(r, "anomalies:notify-dead-letter:{0}") == []


def test_a_new_group_starts_at_the_end_of_the_stream_by_default(r: Any) -> None:
    publish(r, "1700000000000-0")
    sender = FakeSender()
    notifier = build_notifier(r, sender, notify_start_id="$")
    notifier.drain()
    publish(r, "1700000000000-1")
    notifier.drain()
    assert sender.keys == ["images/1700000000000-1"]


def test_what_it_holds_while_retrying_for_long_is_renewed(r: Any) -> None:
    publish(r, "1700000000000-0")
    clock = FakeClock()
    notifier = build_notifier(
        r, FakeSender([Reply(503, retry_after="600")]), clock, notify_claim_idle_ms=60_000
    )
    renewed: list[list[str]] = []
    group = notifier.groups[0]
    original = group.renew
    group.renew = lambda ids: renewed.append(list(ids)) or original(ids)  # type: ignore[method-assign]
    notifier.drain()
    assert sum(clock.waits) == pytest.approx(600.0) and max(clock.waits) <= 20.0
    assert len(renewed) >= 600 // 20 - 1 and all(ids == renewed[0] for ids in renewed)
    assert pending_count(r) == 0


def test_latency_and_request_metrics_are_recorded(r: Any) -> None:
    publish(r, "1700000000000-0")
    registry = CollectorRegistry()
    clock = FakeClock()
    build_notifier(r, FakeSender([500]), clock, registry).drain()
    assert registry.get_sample_value("anomaly_notify_delivery_latency_seconds_count") == 1
    assert registry.get_sample_value("anomaly_notify_request_seconds_count") == 2
    assert registry.get_sample_value("anomaly_notify_failed_attempts_total", {"reason": "5xx"}) == 1


def test_settings_refuse_a_claim_time_a_request_could_outlast() -> None:
    with pytest.raises(ValueError, match=r"ANOMALY_NOTIFY_CLAIM_IDLE_MS \(20000\) must be at least 3 x"):
        notify_settings(notify_timeout_seconds=10.0, notify_claim_idle_ms=20_000)


def test_settings_send_alertmanager_requests_to_its_alerts_api() -> None:
    assert (
        notify_settings(notify_format="alertmanager", notify_webhook_url="http://am:9093").webhook_url()
        == "http://am:9093/api/v2/alerts"
    )
    kept = notify_settings(notify_format="alertmanager", notify_webhook_url="http://am:9093/api/v2/alerts/")
    assert kept.webhook_url() == "http://am:9093/api/v2/alerts/"
    assert notify_settings(
        notify_webhook_url="https://hooks.slack.com/services/T/B/secret"
    ).redacted_webhook_url() == ("https://hooks.slack.com/...")
