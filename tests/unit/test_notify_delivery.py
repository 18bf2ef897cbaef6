"""What each answer means (delivered, retried, refused for good) and how long the notifier waits
before trying again: capped, jittered exponential backoff, or the receiver's Retry-After."""

from __future__ import annotations

import email.utils

import pytest
from redis.backoff import EqualJitterBackoff

from notify.delivery import (
    ReceiverUnreachable,
    Reply,
    RetryPolicy,
    judge,
    judge_unreachable,
    parse_retry_after,
)

NOW = 1_700_000_000.0


@pytest.mark.parametrize("status", [200, 201, 202, 204, 299])
def test_a_2xx_is_delivered(status: int) -> None:
    assert judge(Reply(status), NOW).outcome == "delivered"


@pytest.mark.parametrize(
    ("status", "label"), [(500, "5xx"), (502, "5xx"), (503, "5xx"), (408, "408"), (429, "429")]
)
def test_5xx_408_and_429_are_retried(status: int, label: str) -> None:
    verdict = judge(Reply(status, body="busy"), NOW)
    assert (verdict.outcome, verdict.label, verdict.status) == ("retry", label, status)
    assert verdict.reason == f"HTTP {status}: busy"


@pytest.mark.parametrize("status", [400, 401, 403, 404, 409, 410, 413, 422])
def test_other_4xx_are_refused_for_good_with_the_status_and_the_answer(status: int) -> None:
    verdict = judge(Reply(status, body="  field 'text' is required \n"), NOW)
    assert (verdict.outcome, verdict.label, verdict.status) == ("refused", "4xx", status)
    assert verdict.reason == f"HTTP {status}: the receiver refused it: field 'text' is required"


def test_a_redirect_is_refused_naming_where_it_pointed() -> None:
    verdict = judge(Reply(301, location="https://hooks.example.com/new"), NOW)
    assert (verdict.outcome, verdict.label) == ("refused", "3xx")
    assert "redirected to https://hooks.example.com/new; redirects are not followed" in verdict.reason


def test_no_answer_is_retried() -> None:
    verdict = judge_unreachable(ReceiverUnreachable("timeout", "no answer within 1 s"))
    assert (verdict.outcome, verdict.label, verdict.reason) == ("retry", "timeout", "no answer within 1 s")


def test_retry_after_in_seconds_or_as_an_http_date() -> None:
    assert parse_retry_after("120", NOW) == 120.0
    assert parse_retry_after(email.utils.formatdate(NOW + 30, usegmt=True), NOW) == pytest.approx(30.0)
    assert parse_retry_after(email.utils.formatdate(NOW - 30, usegmt=True), NOW) == 0.0
    assert parse_retry_after("soon", NOW) is None
    assert parse_retry_after(None, NOW) is None


def test_a_429_with_retry_after_waits_what_the_receiver_asked_up_to_the_limit() -> None:
    policy = RetryPolicy(EqualJitterBackoff(cap=1.0, base=0.1), retry_after_max_seconds=60.0)
    assert policy.delay(1, judge(Reply(429, retry_after="7"), NOW)) == 7.0
    assert policy.delay(1, judge(Reply(503, retry_after="3600"), NOW)) == 60.0


class CountingBackoff:
    def __init__(self) -> None:
        self.asked: list[int] = []

    def compute(self, failures: int) -> float:
        self.asked.append(failures)
        return 0.25 * failures


def test_without_retry_after_the_backoff_decides_from_the_failures_so_far() -> None:
    backoff = CountingBackoff()
    policy = RetryPolicy(backoff, retry_after_max_seconds=60.0)
    verdict = judge(Reply(500), NOW)
    assert [policy.delay(n, verdict) for n in (1, 2, 3)] == [0.0, 0.25, 0.5]
    assert backoff.asked == [0, 1, 2]


def test_the_jittered_backoff_grows_exponentially_and_never_passes_its_cap() -> None:
    policy = RetryPolicy(EqualJitterBackoff(cap=2.0, base=0.1), retry_after_max_seconds=60.0)
    verdict = judge_unreachable(ReceiverUnreachable("connection", "refused"))
    for failures in range(1, 30):
        bound = min(2.0, 0.1 * 2 ** (failures - 1))
        delays = [policy.delay(failures, verdict) for _ in range(50)]
        assert all(bound / 2 <= d <= bound for d in delays)
        assert len(set(delays)) > 1  # jittered, at the cap too: many notifiers' retries do not line up
