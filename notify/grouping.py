"""How many messages go out: at most MAX_PER_MINUTE anomalies one by one in any 60 s; past that,
every anomaly until the next summary joins a `Burst`, sent as one summary message once
SUMMARY_INTERVAL_SECONDS have passed since its first anomaly (pure; the clock is passed in).

So a receiver gets at most MAX_PER_MINUTE single messages a minute, plus one summary per interval
while the flood lasts. A burst holds no more than MAX_SUMMARISED anomalies: a fuller one is sent
at once (each one summarised stays unacknowledged in Redis until its summary is delivered, and the
notifier keeps its id in memory meanwhile).
"""

from __future__ import annotations

import collections
import hashlib
import heapq
from dataclasses import dataclass, field

from notify.anomalies import Anomaly

WINDOW_SECONDS = 60.0
TOP_SCORES = 5
MAX_SUMMARISED = 10_000


class RateLimiter:
    """At most `per_minute` sends in any sliding 60 s."""

    def __init__(self, per_minute: int) -> None:
        self.per_minute = per_minute
        self._sent: collections.deque[float] = collections.deque()

    def allows(self, now: float) -> bool:
        """Whether one more message may go out at `now` (monotonic seconds)."""
        while self._sent and self._sent[0] <= now - WINDOW_SECONDS:
            self._sent.popleft()
        return len(self._sent) < self.per_minute

    def record(self, now: float) -> None:
        """One message went out at `now` (its retries do not count again)."""
        self._sent.append(now)


@dataclass(frozen=True)
class Held:
    """What acknowledging a summarised anomaly needs: its shard and output entry id."""

    shard: int
    entry_id: str


@dataclass
class Burst:
    """The anomalies past the limit, gathered for one summary: counts and the few that are shown,
    plus the id of every one (to acknowledge them once the summary is delivered)."""

    started_at: float  # monotonic seconds of the first anomaly
    first: Anomaly
    last: Anomaly
    since_ms: int  # when its earliest anomaly was published (output entry id)
    until_ms: int  # when its latest was
    members: list[Held] = field(default_factory=list)
    keys: list[str] = field(default_factory=list)
    # (score, order, anomaly): a min-heap of the highest TOP_SCORES, ties kept in arrival order
    _top: list[tuple[float, int, Anomaly]] = field(default_factory=list)

    @classmethod
    def starting_with(cls, anomaly: Anomaly, now: float) -> Burst:
        """A burst whose first anomaly is `anomaly`, arrived at `now`."""
        published = anomaly.published_at_ms
        burst = cls(started_at=now, first=anomaly, last=anomaly, since_ms=published, until_ms=published)
        burst.add(anomaly)
        return burst

    def add(self, anomaly: Anomaly) -> None:
        """One more anomaly past the limit."""
        self.last = anomaly
        self.since_ms = min(self.since_ms, anomaly.published_at_ms)
        self.until_ms = max(self.until_ms, anomaly.published_at_ms)
        self.members.append(Held(anomaly.shard, anomaly.entry_id))
        self.keys.append(anomaly.key)
        item = (anomaly.score, -len(self.members), anomaly)
        if len(self._top) < TOP_SCORES:
            heapq.heappush(self._top, item)
        elif item[:2] > self._top[0][:2]:
            heapq.heapreplace(self._top, item)

    @property
    def count(self) -> int:
        """How many anomalies it summarises."""
        return len(self.members)

    def top(self) -> list[Anomaly]:
        """The highest-scoring anomalies, highest first (the earlier of equal scores first)."""
        return [a for _, _, a in sorted(self._top, key=lambda item: item[:2], reverse=True)]

    def due(self, now: float, interval_seconds: float) -> bool:
        """Whether its summary should go out: the interval is over, or it is full."""
        return now - self.started_at >= interval_seconds or self.count >= MAX_SUMMARISED

    @property
    def key(self) -> str:
        """The summary's Idempotency-Key: a digest of its members' keys, so a retry of the same
        summary carries the same key (a summary re-formed after a restart is another message)."""
        digest = hashlib.sha256("\n".join(sorted(self.keys)).encode()).hexdigest()[:32]
        return f"summary/{digest}"
