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
from worker.scoring_process import ScoringProcess

pytestmark = pytest.mark.integration


@pytest.fixture
def running() -> Iterator[list[tuple[Runner, threading.Thread]]]:
    """Runners started with `start`; each is stopped and its thread joined after the test."""
    started: list[tuple[Runner, threading.Thread]] = []
    yield started
    for runner, thread in started:
        runner.request_stop()
        thread.join(60)
        runner.close()
        if runner.scoring_process is not None:
            runner.scoring_process.close()


def start(started: list[tuple[Runner, threading.Thread]], runner: Runner) -> None:
    thread = threading.Thread(target=runner.run, name="loop", daemon=True)
    thread.start()
    started.append((runner, thread))


def push_half_bright(client: Any, n: int) -> None:
    for i in range(n):
        push(client, 0.9 if i % 2 else 0.1, f"img-{i}")


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
        scoring.close()
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
    assert scoring.pid not in (None, killed)


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
