"""The loop with its scoring process, against a real redis-server: every entry committed once,
whatever happens to the child."""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import wait_until
from tests.support import ChildScorer, build_runner, make_model, pending, push, stream
from worker.runner import Runner
from worker.scoring_process import ScoringProcess, ScoringProcessError

pytestmark = pytest.mark.integration


@pytest.fixture
def running() -> Iterator[list[tuple[Runner, threading.Thread]]]:
    """Runners started with `start`; each is stopped and its thread joined after the test."""
    started: list[tuple[Runner, threading.Thread]] = []
    yield started
    for runner, thread in started:
        runner.request_stop()
        thread.join(60)
        runner.close()  # and its scoring process


def start(started: list[tuple[Runner, threading.Thread]], runner: Runner) -> None:
    thread = threading.Thread(target=runner.run, name="loop", daemon=True)
    thread.start()
    started.append((runner, thread))


def push_half_bright(client: Any, n: int) -> None:
    for i in range(n):
        push(client, 0.9 if i % 2 else 0.1, f"img-{i}")


def failures(runner: Runner) -> float | None:
    return runner.metrics.registry.get_sample_value("anomaly_scoring_process_failures_total")


def published_once(client: Any, expected: int) -> bool:
    ids = [entry["id"] for entry in stream(client, "anomalies")]
    assert len(ids) == len(set(ids)), f"an entry was published twice: {sorted(ids)}"
    return len(ids) == expected and pending(client) == 0


def test_a_backlog_scored_in_the_child_publishes_each_flagged_entry_once(redis_client) -> None:
    scoring = ScoringProcess(rows=20)
    runner = build_runner(
        redis_client, batch_size=20, model=make_model(scorer=ChildScorer()), scoring_process=scoring
    )
    push_half_bright(redis_client, 100)
    try:
        assert runner.drain() == 100
        assert scoring.pid is not None  # the backlog went to the child
    finally:
        runner.close()
    assert scoring.pid is None  # the runner's close stopped it
    assert published_once(redis_client, 50)
    assert runner.model.scorer.calls == []  # type: ignore[attr-defined]  # none scored here


def test_when_the_child_dies_the_batches_in_hand_are_read_again_and_committed_once(
    redis_client, running, tmp_path: Path, caplog
) -> None:
    gate = tmp_path / "gate"
    scoring = ScoringProcess(rows=10)
    runner = build_runner(
        redis_client,
        batch_size=10,
        model=make_model(scorer=ChildScorer(gate=gate)),
        scoring_process=scoring,
        claim_idle_ms=600_000,  # only our own pending reads can bring the batches back
    )
    push_half_bright(redis_client, 40)
    start(running, runner)
    wait_until(gate.with_suffix(".entered").exists, 30, what="the child scoring the first batch")
    killed = scoring.pid
    assert killed is not None
    os.kill(killed, signal.SIGKILL)
    gate.touch()
    wait_until(lambda: published_once(redis_client, 20), 60, what="every flagged entry published once")
    assert "scoring process failed, starting a new one" in caplog.text
    assert failures(runner) == 1
    wait_until(lambda: scoring.pid not in (None, killed), 30, what="a new scoring process")


def test_a_child_that_keeps_failing_leaves_the_scoring_to_the_thread(redis_client, running, caplog) -> None:
    broken = ScoringProcess(rows=10, python="/bin/false")  # exits at once, every time
    runner = build_runner(
        redis_client, batch_size=10, model=make_model(scorer=ChildScorer()), scoring_process=broken
    )
    push_half_bright(redis_client, 40)
    start(running, runner)
    wait_until(lambda: published_once(redis_client, 20), 60, what="every flagged entry published once")
    assert runner.scoring_process is None
    assert "scoring process failed 3 times in a row, scoring on a thread from now on" in caplog.text
    assert failures(runner) == 3


def test_a_batch_scored_in_the_child_is_finished_at_a_warm_stop(redis_client) -> None:
    model = make_model(scorer=ChildScorer())
    runner = build_runner(redis_client, batch_size=10, model=model, scoring_process=ScoringProcess(10))
    push_half_bright(redis_client, 25)
    try:
        runner.run_once()  # commits the first 10, reads the next 10 and starts scoring them
        assert pending(redis_client) == 10
        runner.request_stop()
        runner.run()  # stop already requested: no new reads, only the batch in hand
    finally:
        runner.close()
    assert pending(redis_client) == 0 and published_once(redis_client, 10)


def test_a_batch_scored_ahead_by_the_old_model_is_scored_again_by_the_reloaded_one(redis_client) -> None:
    runner = build_runner(
        redis_client,
        batch_size=5,
        model=make_model("fake-v1", scorer=ChildScorer("fake-v1")),
        loader=lambda: make_model("fake-v2", scorer=ChildScorer("fake-v2")),
        scoring_process=ScoringProcess(5),
    )
    for _ in range(10):
        push(redis_client, 0.9)
    try:
        runner.run_once()  # scores 5 with v1 in the child and reads the next 5 meanwhile
        runner.reload_event.set()
        runner.run_once()
    finally:
        runner.close()
    versions = [entry["model_version"] for entry in stream(redis_client, "anomalies")]
    assert versions == ["fake-v1"] * 5 + ["fake-v2"] * 5


def test_a_model_that_does_not_pickle_is_scored_on_the_thread(redis_client) -> None:
    scorer = ChildScorer()
    scorer.lock = threading.Lock()  # type: ignore[attr-defined]
    scoring = ScoringProcess(rows=10)
    model = make_model(scorer=scorer)
    runner = build_runner(redis_client, batch_size=10, model=model, scoring_process=scoring)
    push_half_bright(redis_client, 40)
    try:
        assert runner.drain() == 40
        assert scoring.pid is None  # never started
    finally:
        runner.close()
    assert published_once(redis_client, 20)
    assert scorer.calls == [10, 10, 10, 10]  # scored here, on the thread


def test_when_the_next_batch_cannot_be_sent_the_scored_one_is_still_committed(
    redis_client, monkeypatch, caplog
) -> None:
    scoring = ScoringProcess(rows=10)
    runner = build_runner(
        redis_client, batch_size=10, model=make_model(scorer=ChildScorer()), scoring_process=scoring
    )
    push_half_bright(redis_client, 30)
    submit = scoring.submit
    calls: list[int] = []

    def failing_second(*args: Any, **kwargs: Any) -> Any:
        calls.append(len(calls) + 1)
        if len(calls) == 2:  # the batch read ahead, sent while the first one is about to commit
            raise ScoringProcessError(
                "the scoring process (pid 1) exited with code -9 while receiving a batch"
            )
        return submit(*args, **kwargs)

    monkeypatch.setattr(scoring, "submit", failing_second)
    try:
        assert runner.run_once() == 10
        assert pending(redis_client) == 10  # the first batch committed; the second read, in hand
        assert "scoring process could not take the next batch" in caplog.text
        assert runner.drain() == 20  # the second one is sent again in its turn
    finally:
        runner.close()
    assert published_once(redis_client, 15)
    assert failures(runner) == 1
