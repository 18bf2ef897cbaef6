"""One bad entry never stops the fleet: what the model cannot score, and what kills a worker, ends in
the dead-letter stream alone; its neighbours are scored, once."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import fakeredis
import numpy as np
import pytest

from tests.support import MeanPixelScorer, build_runner, make_model, pending, push, stream
from worker.runner import Runner

POISON = 0.77  # the brightness of the image the fake models choke on


class Crash(BaseException):
    """Stands for the process dying (a segfault, an OOM kill): nothing in the worker catches it."""


class ChokingScorer(MeanPixelScorer):
    """The mean-pixel scorer that fails on images of brightness POISON: `how` is raise (a Python
    error), nan (a score that is not finite) or crash (the process dies)."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how

    def score_batch(self, images: np.ndarray) -> np.ndarray:
        scores = super().score_batch(images)
        poisoned = np.isclose(images.mean(axis=1), round(POISON * 255) / 255, atol=1e-3)
        if poisoned.any():
            if self.how == "crash":
                raise Crash("the worker process died")
            if self.how == "raise":
                raise FloatingPointError("the model overflowed on this image")
            scores[poisoned] = np.nan
        return scores


@pytest.fixture
def r() -> fakeredis.FakeRedis:
    return fakeredis.FakeRedis()


@pytest.fixture
def make_runner(r: fakeredis.FakeRedis) -> Callable[..., Runner]:
    def factory(how: str = "raise", **kwargs: Any) -> Runner:
        return build_runner(r, model=make_model(scorer=ChokingScorer(how)), **{"consumer": "w1", **kwargs})

    return factory


def push_batch(r: fakeredis.FakeRedis, poison_at: int, n: int = 10) -> tuple[list[bytes], bytes]:
    ids = [push(r, POISON if i == poison_at else (0.9 if i % 2 else 0.1)) for i in range(n)]
    return [entry for i, entry in enumerate(ids) if i != poison_at], ids[poison_at]


def outcomes(r: fakeredis.FakeRedis) -> tuple[list[str], dict[str, str]]:
    """(every source_id scored, in the scores stream) and {dead-lettered source_id: reason_code}."""
    scored = [e["source_id"] for e in stream(r, "scores")]
    dead = {e["source_id"]: e["reason_code"] for e in stream(r, "images:dead-letter")}
    return scored, dead


@pytest.mark.parametrize("how", ["raise", "nan"])
def test_an_image_the_model_cannot_score_is_dead_lettered_alone_and_its_batch_is_committed(
    r, make_runner, how: str
) -> None:
    good, poison = push_batch(r, poison_at=3)
    runner = make_runner(how, scores_stream="scores")
    runner.drain()
    scored, dead = outcomes(r)
    assert sorted(scored) == sorted(i.decode() for i in good)  # each once
    assert dead == {poison.decode(): "score_error"}
    reason = stream(r, "images:dead-letter")[0]["reason"]
    assert ("FloatingPointError: the model overflowed" if how == "raise" else "score is nan") in reason
    assert pending(r) == 0
    assert (
        runner.metrics.registry.get_sample_value("anomaly_messages_invalid_total", {"reason": "score_error"})
        == 1
    )


def test_an_entry_that_kills_the_worker_is_dead_lettered_alone_after_max_deliveries(r, make_runner) -> None:
    good, poison = push_batch(r, poison_at=4)
    restarts = 0
    while True:  # the worker restarts after each crash, with the same consumer name (a pod's)
        try:
            make_runner("crash", scores_stream="scores", max_deliveries=3, prefetch=False).drain()
            break
        except Crash:
            restarts += 1
            assert restarts < 10, "the crash loop never ended"
    scored, dead = outcomes(r)
    assert sorted(scored) == sorted(i.decode() for i in good)  # every neighbour scored, once
    assert dead == {poison.decode(): "max_deliveries"}
    assert "delivered 4 times" in stream(r, "images:dead-letter")[0]["reason"]
    # Died on the batch (delivery 1), then on the poison alone (deliveries 2 and 3); its 4th
    # delivery is over the limit of 3 and goes to the dead-letter stream without being scored.
    assert restarts == 3
    assert pending(r) == 0


def age(r: fakeredis.FakeRedis, consumer: str, idle_ms: int) -> None:
    """Make `consumer`'s pending entries look idle for `idle_ms` (XCLAIM to itself, JUSTID:
    no delivery counted)."""
    ids = [
        row["message_id"] for row in r.xpending_range("images", "anomaly-scorer", "-", "+", 1000, consumer)
    ]
    if ids:
        r.xclaim("images", "anomaly-scorer", consumer, 0, ids, idle=idle_ms, justid=True)


def test_a_worker_that_reclaims_a_killers_entries_dead_letters_only_the_killer(r, make_runner) -> None:
    good, poison = push_batch(r, poison_at=6)
    with pytest.raises(Crash):
        make_runner("crash", consumer="first").drain()  # died on the batch: all ten pending to "first"
    age(r, "first", 10_000)  # "first" never comes back
    restarts = 0
    while True:  # the worker that reclaims them dies on the poison too, and restarts
        try:
            make_runner(
                "crash", consumer="second", scores_stream="scores", claim_idle_ms=100, max_deliveries=3
            ).drain()
            break
        except Crash:
            restarts += 1
            assert restarts < 10, "the crash loop never ended"
    scored, dead = outcomes(r)
    assert sorted(scored) == sorted(i.decode() for i in good)
    assert dead == {poison.decode(): "max_deliveries"}
    assert restarts == 2  # deliveries 2 (the claim) and 3; the 4th is over the limit
    assert pending(r) == 0


def test_a_model_that_fails_every_image_commits_nothing_and_dead_letters_by_deliveries(
    r, make_runner
) -> None:
    ids = [push(r, POISON) for _ in range(4)]
    runner = make_runner("raise", max_deliveries=2)
    runner.drain()  # each attempt fails the whole batch: read again one entry at a time
    _, dead = outcomes(r)
    assert dead == {i.decode(): "max_deliveries" for i in ids}
    assert runner.metrics.registry.get_sample_value("anomaly_batches_unscored_total") >= 1
    assert pending(r) == 0 and r.xlen("anomalies") == 0
