"""The rate limit and the burst: at most MAX_PER_MINUTE single messages in any 60 s, and past it
one summary per interval that names how many, the top scores, the first and the last."""

from __future__ import annotations

from notify.grouping import MAX_SUMMARISED, TOP_SCORES, Burst, Held, RateLimiter
from tests.notify_support import anomaly


def _numbered(i: int, score: float = 1.0):
    return anomaly(f"1700000000000-{i}", score=score, entry_id=f"1700000000{i:03d}-0", id=f"cam-{i}")


def test_the_limit_counts_sends_in_a_sliding_minute() -> None:
    limiter = RateLimiter(per_minute=2)
    assert limiter.allows(0.0)
    limiter.record(0.0)
    limiter.record(30.0)
    assert not limiter.allows(59.9)
    assert limiter.allows(60.0)  # the send at 0 s has left the window
    limiter.record(60.0)
    assert not limiter.allows(89.9)
    assert limiter.allows(90.0)


def test_a_burst_counts_every_member_and_keeps_the_first_and_the_last() -> None:
    burst = Burst.starting_with(_numbered(1), now=10.0)
    for i in range(2, 6):
        burst.add(_numbered(i))
    assert burst.count == 5
    assert (burst.first.id, burst.last.id) == ("cam-1", "cam-5")
    assert burst.members[0] == Held(0, "1700000000001-0") and len(burst.members) == 5
    assert (burst.since_ms, burst.until_ms) == (1700000000001, 1700000000005)


def test_the_top_scores_are_the_highest_highest_first_earlier_ties_first() -> None:
    scores = [0.5, 3.0, 1.0, 3.0, 2.0, 0.1, 4.0, 1.5]
    burst = Burst.starting_with(_numbered(0, scores[0]), now=0.0)
    for i, score in enumerate(scores[1:], start=1):
        burst.add(_numbered(i, score))
    top = burst.top()
    assert len(top) == TOP_SCORES
    assert [(a.score, a.id) for a in top] == [
        (4.0, "cam-6"),
        (3.0, "cam-1"),
        (3.0, "cam-3"),
        (2.0, "cam-4"),
        (1.5, "cam-7"),
    ]


def test_a_burst_is_due_after_its_interval_or_when_full() -> None:
    burst = Burst.starting_with(_numbered(1), now=100.0)
    assert not burst.due(159.9, interval_seconds=60)
    assert burst.due(160.0, interval_seconds=60)
    full = Burst.starting_with(_numbered(1), now=100.0)
    for i in range(MAX_SUMMARISED - 1):
        full.add(_numbered(2 + i % 900))
    assert full.due(100.0, interval_seconds=60)


def test_the_summary_key_depends_on_its_members_only() -> None:
    a = Burst.starting_with(_numbered(1), now=0.0)
    a.add(_numbered(2))
    b = Burst.starting_with(_numbered(2), now=5.0)
    b.add(_numbered(1))
    c = Burst.starting_with(_numbered(1), now=0.0)
    assert a.key == b.key != c.key
    assert a.key.startswith("summary/") and len(a.key) == len("summary/") + 32
