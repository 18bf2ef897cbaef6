"""What an answer means, and how long to wait before trying again (pure; the sender is passed in).

- 2xx: delivered; the anomaly is acknowledged.
- 408, 429 and 5xx: the receiver may take it later: retried with capped, jittered exponential
  backoff (redis-py's EqualJitterBackoff: t = min(cap, base x 2^(failures-1)), a uniform draw in
  [t/2, t]; jittered at the cap too, where ExponentialWithJitterBackoff is almost always the cap
  itself, so many notifiers' retries would line up), or after the Retry-After the receiver asked
  for (seconds or an HTTP date, up to NOTIFY_RETRY_AFTER_MAX_SECONDS).
- a timeout or a connection that failed or broke: retried the same way.
- any other answer (4xx, a redirect, which is not followed): refused for good; the anomaly goes to
  the notifier's dead-letter stream with the status and the reason, then is acknowledged.
There is no limit on retries: an anomaly the receiver may still take is never dropped; it stays
unacknowledged in Redis (and is delivered after a restart) while the receiver is down.
"""

from __future__ import annotations

import email.utils
import math
from dataclasses import dataclass
from typing import Literal, Protocol

from detector.errors import AnomalyScorerError
from notify.formats import Outgoing

RETRIED_STATUSES = frozenset({408, 429})


class ReceiverUnreachable(AnomalyScorerError):
    """No answer: the request timed out, or the connection was refused, reset or broke.
    `kind` is timeout or connection (a metric label)."""

    def __init__(self, kind: Literal["timeout", "connection"], reason: str) -> None:
        super().__init__(reason)
        self.kind = kind
        self.reason = reason


@dataclass(frozen=True)
class Reply:
    """The receiver's answer, as far as the notifier cares."""

    status: int
    retry_after: str | None = None  # the Retry-After header, as sent
    location: str | None = None  # a redirect's Location header
    body: str = ""  # the first bytes of the answer, for the dead letter's reason


class Sender(Protocol):
    """Posts one request and returns the answer, or raises ReceiverUnreachable."""

    def send(self, message: Outgoing) -> Reply:
        """POST `message` to the receiver."""
        ...


@dataclass(frozen=True)
class Verdict:
    """What to do after one attempt."""

    outcome: Literal["delivered", "retry", "refused"]
    reason: str  # for logs and dead letters
    label: str  # metric label: 2xx, 4xx, 5xx, 408, 429, 3xx, timeout, connection
    status: int | None = None
    retry_after: float | None = None  # seconds the receiver asked for, if it did


def parse_retry_after(value: str | None, now: float) -> float | None:
    """Retry-After as seconds from `now` (wall clock): delay-seconds or an HTTP date; None when
    absent or unreadable (the backoff decides then)."""
    if value is None:
        return None
    text = value.strip()
    if text.isdigit():
        return float(text)
    try:
        when = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:  # RFC 9110 dates are GMT
        return None
    return max(0.0, when.timestamp() - now)


def judge(reply: Reply, now: float) -> Verdict:
    """The verdict on an answer (see the module docstring); `now` is the wall clock, for dates."""
    status = reply.status
    excerpt = f": {reply.body.strip()[:200]}" if reply.body.strip() else ""
    if 200 <= status < 300:
        return Verdict("delivered", f"HTTP {status}", "2xx", status)
    if status in RETRIED_STATUSES or 500 <= status < 600:
        label = str(status) if status in RETRIED_STATUSES else "5xx"
        return Verdict(
            "retry", f"HTTP {status}{excerpt}", label, status, parse_retry_after(reply.retry_after, now)
        )
    if 300 <= status < 400:
        where = f" to {reply.location}" if reply.location else ""
        return Verdict(
            "refused",
            f"HTTP {status}: the receiver redirected{where}; redirects are not followed, set "
            "ANOMALY_NOTIFY_WEBHOOK_URL to the address that answers",
            "3xx",
            status,
        )
    if 400 <= status < 500:
        return Verdict("refused", f"HTTP {status}: the receiver refused it{excerpt}", "4xx", status)
    return Verdict("retry", f"HTTP {status}: not an answer the notifier understands", "other", status)


def judge_unreachable(error: ReceiverUnreachable) -> Verdict:
    """A request that got no answer is retried."""
    return Verdict("retry", error.reason, error.kind)


class Backoff(Protocol):
    """redis-py's backoff interface: the wait after `failures` failures in a row."""

    def compute(self, failures: int) -> float:
        """Seconds to wait."""
        ...


@dataclass(frozen=True)
class RetryPolicy:
    """How long to wait before the next attempt."""

    backoff: Backoff
    retry_after_max_seconds: float

    def delay(self, failures: int, verdict: Verdict) -> float:
        """The wait after `failures` (1 or more) failed attempts, the last judged `verdict`: the
        receiver's Retry-After if it gave one (bounded), else the jittered backoff."""
        if verdict.retry_after is not None and math.isfinite(verdict.retry_after):
            return min(max(0.0, verdict.retry_after), self.retry_after_max_seconds)
        return float(self.backoff.compute(failures - 1))
