"""anomaly-dlq against a real redis-server, one shard and two, on dead letters a real worker runner
wrote: list counts reason codes and shows the newest, show prints one, a redrive puts the original
entry back on its own shard's input stream exactly once (killed midway and run again too) and a
worker then scores it, a dry run changes nothing, purge deletes by reason and age, and the
documented least-privilege ACL user is enough."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis

from contract.codec import encode_image
from runtime.settings import StreamSettings
from tests.conftest import ROOT, RedisServer
from tests.support import D, MeanPixelScorer, acl_arguments, build_runner, make_model, stream
from tools import dlq

pytestmark = pytest.mark.integration

PASSWORD = "dlq-pw-for-tests"
SHARDED_KEYS = "~images:dead-letter:{*} (~images:dead-letter:{*} ~images:{*} +eval +evalsha +xadd)"


class PickyScorer(MeanPixelScorer):
    """The model before the fix: it raises on very bright images (so the worker dead-letters each
    of them with reason_code score_error and scores the rest of the batch)."""

    def score_batch(self, images: np.ndarray) -> np.ndarray:
        if (images.mean(axis=1) > 0.9).any():
            raise ValueError("too bright for this model")
        return super().score_batch(images)


def _inputs(shards: int) -> list[str]:
    return ["images"] if shards == 1 else [f"images:{{{i}}}" for i in range(shards)]


def _dead(shards: int) -> list[str]:
    return ["images:dead-letter"] if shards == 1 else [f"images:dead-letter:{{{i}}}" for i in range(shards)]


def _push(r: Any, name: str, brightness: float, pid: str, **extra: Any) -> None:
    r.xadd(name, {**encode_image(np.full(D, brightness)), "id": pid, **extra})


def _worker_dead_letters(r: Any, shards: int) -> None:
    """Per shard: a normal image, a bright one the picky model fails on (with a field `reason` of
    its own), and one of the wrong length; a worker runner with the picky model handles them."""
    for shard, name in enumerate(_inputs(shards)):
        _push(r, name, 0.2, f"normal-{shard}")
        _push(r, name, 0.95, f"bright-{shard}", reason="the producer's own field")
        r.xadd(name, {"image": b"\x00" * 3, "id": f"short-{shard}"})
    runner = build_runner(r, model=make_model(scorer=PickyScorer()), shards=shards)
    runner.drain()
    runner.close()


@pytest.fixture(params=[1, 2], ids=["one-shard", "two-shards"])
def shards(request: pytest.FixtureRequest) -> int:
    return int(request.param)


@pytest.fixture
def use_redis(redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """anomaly-dlq reads ANOMALY_REDIS_URL like every program. Its main() would point the root
    logger at this test's captured stderr, which later tests would write to once it is closed."""
    monkeypatch.setenv("ANOMALY_REDIS_URL", redis_server.url)
    monkeypatch.setattr(dlq, "configure_logging", lambda settings: None)
    yield


def run_dlq(capsys: pytest.CaptureFixture[str], shards: int, *argv: str) -> tuple[int, str]:
    code = dlq.main(["--shards", str(shards), *argv])
    return code, capsys.readouterr().out


def _snapshot(r: Any, shards: int) -> dict[str, list[Any]]:
    return {name: r.xrange(name) for name in (*_inputs(shards), *_dead(shards))}


def test_list_counts_reason_codes_and_shows_the_newest_with_their_reasons(
    redis_client: redis.Redis, use_redis: None, capsys: pytest.CaptureFixture[str], shards: int
) -> None:
    _worker_dead_letters(redis_client, shards)
    code, out = run_dlq(capsys, shards, "list")
    assert code == 0
    lines = out.splitlines()
    assert lines[0] == f"{2 * shards} dead letters in {', '.join(_dead(shards))}"
    per_shard = "" if shards == 1 else "  (shard 0: 1, shard 1: 1)"
    assert (
        f"  {shards:>8}  score_error{per_shard}" in lines and f"  {shards:>8}  bad_length{per_shard}" in lines
    )
    assert f"newest {2 * shards}:" in lines
    newest = lines[lines.index(f"newest {2 * shards}:") + 1 :]
    assert any(
        "bad_length" in line and "image has 3 bytes, expected 16 for dtype uint8" in line for line in newest
    )
    assert any("score_error" in line and "too bright for this model" in line for line in newest)


def test_show_prints_every_field_and_what_a_redrive_would_put_back(
    redis_client: redis.Redis, use_redis: None, capsys: pytest.CaptureFixture[str]
) -> None:
    _worker_dead_letters(redis_client, 1)
    dead_id = next(
        i for i, f in redis_client.xrange("images:dead-letter") if f[b"reason_code"] == b"score_error"
    )
    code, out = run_dlq(capsys, 1, "show", dead_id.decode())
    assert code == 0
    assert f"images:dead-letter {dead_id.decode()} (shard 0" in out
    assert "  reason_code: score_error" in out and "  original:reason: the producer's own field" in out
    assert "  image: <16 bytes>" in out
    assert "  redrive would put back: image, dtype, id, reason -> images" in out
    assert run_dlq(capsys, 1, "show", "1-1") == (1, "no dead letter 1-1 in images:dead-letter\n")


def test_dry_runs_change_nothing_and_say_what_they_would_do(
    redis_client: redis.Redis, use_redis: None, capsys: pytest.CaptureFixture[str], shards: int
) -> None:
    _worker_dead_letters(redis_client, shards)
    before = _snapshot(redis_client, shards)
    code, out = run_dlq(capsys, shards, "redrive", "--reason", "score_error")
    assert code == 0 and f"would redrive {shards} dead letters (reason_code score_error)" in out
    assert "dry run: nothing changed; add --apply to redrive" in out
    code, out = run_dlq(capsys, shards, "purge", "--older-than", "0s")
    assert code == 0 and f"would purge {2 * shards} dead letters (older than 0 s): " in out
    assert _snapshot(redis_client, shards) == before


def test_a_redrive_puts_the_original_entry_back_on_its_shard_once_and_a_worker_scores_it(
    redis_client: redis.Redis, use_redis: None, capsys: pytest.CaptureFixture[str], shards: int
) -> None:
    _worker_dead_letters(redis_client, shards)
    inputs_before = {name: len(stream(redis_client, name)) for name in _inputs(shards)}
    code, out = run_dlq(capsys, shards, "redrive", "--reason", "score_error", "--apply")
    assert code == 0 and f"redriven {shards}" in out
    for shard, name in enumerate(_inputs(shards)):
        entries = stream(redis_client, name)
        assert len(entries) == inputs_before[name] + 1
        # Exactly the fields the producer sent, its own `reason` restored, nothing of the worker's.
        assert entries[-1] == {
            **{k: v.decode("utf-8", "replace") for k, v in encode_image(np.full(D, 0.95)).items()},
            "id": f"bright-{shard}",
            "reason": "the producer's own field",
        }
        assert [d["reason_code"] for d in stream(redis_client, _dead(shards)[shard])] == ["bad_length"]
    # Run again: nothing is left to redrive, nothing moves twice.
    code, out = run_dlq(capsys, shards, "redrive", "--reason", "score_error", "--apply")
    assert code == 0 and "redriving 0 dead letters" in out
    assert {name: len(stream(redis_client, name)) for name in _inputs(shards)} == {
        name: n + 1 for name, n in inputs_before.items()
    }
    # The fixed model scores the redriven images: both bright ones are flagged now.
    runner = build_runner(redis_client, shards=shards)
    runner.drain()
    runner.close()
    outputs = ["anomalies"] if shards == 1 else [f"anomalies:{{{i}}}" for i in range(shards)]
    flagged = sorted(e["id"] for name in outputs for e in stream(redis_client, name))
    assert flagged == [f"bright-{shard}" for shard in range(shards)]


def test_a_redrive_killed_midway_and_run_again_moves_each_dead_letter_exactly_once(
    redis_client: redis.Redis, redis_server: RedisServer
) -> None:
    worker_fields = {"reason": "r", "reason_code": "score_error", "failed_at_ms": "1", "model_version": "v"}
    for i in range(6):
        redis_client.xadd("images:dead-letter", {"source_id": f"1-{i}", **worker_fields, "id": f"cam-{i}"})
    settings = StreamSettings(redis_url=redis_server.url)  # type: ignore[arg-type]
    store = dlq.DeadLetters(redis_server.client(), settings)
    script = store._redrive
    calls = 0

    def dies_on_the_fourth(*args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls == 4:  # as if the process were killed here: this entry's script never ran
            raise redis.ConnectionError("killed")
        return script(*args, **kwargs)

    store._redrive = dies_on_the_fourth  # type: ignore[assignment]
    selection = dlq.Selection(reasons=frozenset({"score_error"}))
    with pytest.raises(redis.ConnectionError):
        dlq.redrive_letters(store, selection, [0], apply=True, limit=None, out=lambda line: None)
    assert redis_client.xlen("images") == 3 and redis_client.xlen("images:dead-letter") == 3
    again = dlq.DeadLetters(redis_server.client(), settings)
    dlq.redrive_letters(again, selection, [0], apply=True, limit=None, out=lambda line: None)
    assert sorted(e["id"] for e in stream(redis_client, "images")) == [f"cam-{i}" for i in range(6)]
    assert redis_client.xlen("images:dead-letter") == 0


def test_the_redrive_script_leaves_a_dead_letter_that_is_already_gone_alone(
    redis_client: redis.Redis, redis_server: RedisServer
) -> None:
    dead_id = redis_client.xadd("images:dead-letter", {"reason_code": "bad_length", "image": "x"}).decode()
    store = dlq.DeadLetters(redis_server.client(), StreamSettings(redis_url=redis_server.url))  # type: ignore[arg-type]
    (letter,) = store.find(dead_id, [0])
    assert store.redrive(letter) is not None
    assert store.redrive(letter) is None  # a second run, or a client retry after a lost answer
    assert [e["image"] for e in stream(redis_client, "images")] == ["x"]


def test_what_cannot_go_back_to_the_input_stream_is_skipped_saying_why(
    redis_client: redis.Redis, use_redis: None, capsys: pytest.CaptureFixture[str]
) -> None:
    redis_client.xadd("images:dead-letter", {"source_id": "1-0", "reason_code": "deleted", "reason": "gone"})
    notifiers = {
        "reason_code": "deleted",
        "output_id": "5-0",
        "idempotency_key": "images/1-0",
        "score": "0.9",
    }
    redis_client.xadd("images:dead-letter", notifiers)  # as if --dead-letter-stream named the notifier's
    code, out = run_dlq(capsys, 1, "redrive", "--reason", "deleted", "--apply")
    assert code == 0 and "redriving 0 dead letters" in out
    assert "no original fields to put back (reason_code deleted)" in out
    assert "a dead letter of anomaly-notify (an anomaly, not an input entry)" in out
    assert redis_client.xlen("images") == 0 and redis_client.xlen("images:dead-letter") == 2


def test_purge_deletes_by_reason_and_by_age_only_with_apply(
    redis_client: redis.Redis, use_redis: None, capsys: pytest.CaptureFixture[str]
) -> None:
    now_ms = int(time.time() * 1000)
    old = str(now_ms - 8 * 86_400_000)
    for code, failed in (("bad_length", old), ("bad_length", str(now_ms)), ("score_error", old)):
        redis_client.xadd("images:dead-letter", {"reason_code": code, "failed_at_ms": failed, "image": "x"})
    code, out = run_dlq(capsys, 1, "purge", "--reason", "bad_length", "--older-than", "7d", "--apply")
    assert (
        code == 0
        and out == "purged 1 dead letters (reason_code bad_length, older than 604800 s): bad_length: 1\n"
    )
    left = [(d["reason_code"], d["failed_at_ms"]) for d in stream(redis_client, "images:dead-letter")]
    assert left == [("bad_length", str(now_ms)), ("score_error", old)]
    code, out = run_dlq(capsys, 1, "purge", "--older-than", "1w", "--apply")
    assert [d["reason_code"] for d in stream(redis_client, "images:dead-letter")] == ["bad_length"]


def test_redrive_and_purge_refuse_to_run_without_saying_which(
    use_redis: None, capsys: pytest.CaptureFixture[str]
) -> None:
    for command in ("redrive", "purge"):
        with pytest.raises(SystemExit) as exited:
            dlq.main([command, "--apply"])
        assert exited.value.code == 2
        assert f"{command} needs --reason, --id or --older-than" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        dlq.main(["purge", "--older-than", "a week"])
    assert "expected a duration like 90s, 15m, 12h, 7d or 2w, found 'a week'" in capsys.readouterr().err


def documented_dlq_acl(password: str, shards: int) -> list[str]:
    """anomaly-dlq's ACL SETUSER line of deploy/README.md, with its sharded patterns for N > 1."""
    text = (ROOT / "deploy" / "README.md").read_text()
    line = next(ln for ln in text.splitlines() if ln.startswith("ACL SETUSER anomaly-dlq "))
    line = line.replace("DLQ-PASSWORD", password)
    if shards > 1:
        assert SHARDED_KEYS in text, "deploy/README.md no longer gives anomaly-dlq's sharded key patterns"
        line = line.replace(
            "~images:dead-letter (~images:dead-letter ~images +eval +evalsha +xadd)", SHARDED_KEYS
        )
    return acl_arguments(line)


def test_anomaly_dlq_works_with_its_least_privilege_acl_user(
    redis_client: redis.Redis, redis_server: RedisServer, tmp_path: Path, shards: int
) -> None:
    _worker_dead_letters(redis_client, shards)
    redis_client.execute_command(*documented_dlq_acl(PASSWORD, shards))
    secret = tmp_path / "redis-password"
    secret.write_text(PASSWORD + "\n")
    env = {
        "PATH": "/usr/bin:/bin",
        "ANOMALY_REDIS_URL": f"redis://anomaly-dlq@127.0.0.1:{redis_server.port}/0",
        "ANOMALY_REDIS_PASSWORD_FILE": str(secret),
        "ANOMALY_SHARDS": str(shards),
    }
    console = str(Path(sys.executable).with_name("anomaly-dlq"))  # as a user runs it

    def run(*argv: str) -> str:
        result = subprocess.run(
            [console, *argv], env=env, capture_output=True, text=True, cwd=ROOT, timeout=60
        )
        assert result.returncode == 0, result.stderr
        return result.stdout

    try:
        assert run("list").startswith(f"{2 * shards} dead letters")
        assert "redriven " + str(shards) in run("redrive", "--reason", "score_error", "--apply")
        assert "purged " + str(shards) in run("purge", "--reason", "bad_length", "--apply")
        assert all(redis_client.xlen(name) == 0 for name in _dead(shards))
        user = redis.Redis(port=redis_server.port, username="anomaly-dlq", password=PASSWORD)
        for forbidden in (
            lambda: user.xrange(_inputs(shards)[0]),  # the images themselves
            lambda: user.xreadgroup("anomaly-scorer", "x", {_inputs(shards)[0]: ">"}),
            lambda: user.xdel(_inputs(shards)[0], "1-0"),
            lambda: user.xrange("anomalies"),
        ):
            with pytest.raises(redis.exceptions.NoPermissionError):
                forbidden()
        with pytest.raises(redis.exceptions.ResponseError, match="can't access at least one of the keys"):
            user.eval(
                "return redis.call('XRANGE', KEYS[1], '-', '+')", 1, _inputs(shards)[0]
            )  # from a script
        user.close()
    finally:
        redis_client.acl_deluser("anomaly-dlq")
