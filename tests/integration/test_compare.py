"""anomaly-compare: two artifacts' decisions on the same images, from the input stream of every shard
(read-only) or a file; Redis reached through the ANOMALY_* settings, as its own least-privilege
ACL user with a password file (deploy/README.md)."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import redis

from contract.shards import entry_time, shard_key
from detector.artifact import load_artifact
from detector.engines.numpy_engine import NumpyScorer
from producer.client import ImageProducer
from tests.conftest import ROOT, RedisServer, mnist_sample
from tools.compare import compare_decisions, main, recent_entries
from worker.scoring import DecisionRule

pytestmark = pytest.mark.integration

USER = "anomaly-compare"
PASSWORD = "compare-pw-for-tests"
SHARDED_KEYS = "~images:{*}"  # deploy/README.md: with ANOMALY_SHARDS > 1 the patterns take the suffix


@pytest.fixture(autouse=True)
def no_anomaly_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test gives the settings it means: nothing from the shell that runs pytest."""
    for name in list(os.environ):
        if name.startswith("ANOMALY_"):
            monkeypatch.delenv(name)


def rule(threshold: float) -> DecisionRule:
    return DecisionRule(threshold, f"t{threshold}", 0.25, 0.1, 0.05, np.linspace(0, 1, 11))


def test_decisions_are_compared_both_ways_on_a_constructed_case() -> None:
    scores = np.array([0.1, 0.4, 0.9, 0.35])
    c = compare_decisions(("a", "va", rule(0.5), scores), ("b", "vb", rule(0.3), scores))
    assert (c.images, c.a.flagged, c.b.flagged) == (4, 1, 3)
    assert (c.flagged_by_both, c.only_a, c.only_b) == (1, 0, 2)
    assert c.agreement == 0.5 and c.b.flag_rate == 0.75
    assert c.score_rank_correlation == pytest.approx(1.0)
    reversed_ranks = compare_decisions(("a", "va", rule(0.5), scores), ("b", "vb", rule(0.5), -scores))
    assert reversed_ranks.score_rank_correlation == pytest.approx(-1.0)


def uint8_digits(n: int) -> np.ndarray:
    return (mnist_sample(n, seed=9)[0] * 255).round().astype(np.uint8)


def expected_flags(artifact: Path, images: np.ndarray, policy: str | None) -> np.ndarray:
    loaded = load_artifact(artifact)
    scores = NumpyScorer(loaded).score_batch(images.astype(np.float32) / 255)
    return DecisionRule.from_artifact(loaded, policy).decide(scores).flagged


def test_compares_on_the_newest_stream_entries_without_touching_the_stream(
    tiny_artifact: Path, redis_client, redis_server: RedisServer, capsys: pytest.CaptureFixture[str]
) -> None:
    older, newest = uint8_digits(500)[:100], uint8_digits(500)[100:]
    ImageProducer(redis_client, "images").push_many(older)
    ImageProducer(redis_client, "images").push_many(newest)
    redis_client.xadd("images", {"image": b"short"})  # the newest entry, rejected by the decoder
    args = [str(tiny_artifact), str(tiny_artifact), "--redis-url", redis_server.url, "--count", "401"]
    assert main([*args, "--threshold-b", "p50", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    own, median = expected_flags(tiny_artifact, newest, None), expected_flags(tiny_artifact, newest, "p50")
    assert result["images"] == 400 and result["rejected_entries"] == 1
    assert result["a"]["flagged"] == int(own.sum()) and result["b"]["flagged"] == int(median.sum())
    assert result["agreement"] == pytest.approx(float(np.mean(own == median)))
    assert result["only_a"] == int((own & ~median).sum()) and result["b"]["threshold_policy"] == "p50"
    assert result["score_rank_correlation"] == pytest.approx(1.0)
    assert redis_client.xlen("images") == 501 and redis_client.xinfo_groups("images") == []


def test_compares_on_an_npy_file_and_prints_a_table(
    tiny_artifact: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    images = uint8_digits(200)
    np.save(tmp_path / "images.npy", images)
    assert main([str(tiny_artifact), str(tiny_artifact), "--npy", str(tmp_path / "images.npy")]) == 0
    out = capsys.readouterr().out
    assert "images compared:      200" in out and "same decision:        100.00%" in out
    assert "flagged by B only:    0" in out


def test_a_broken_artifact_is_reported_by_name(tiny_artifact: Path, tmp_path: Path, capsys) -> None:
    np.save(tmp_path / "images.npy", uint8_digits(10))
    code = main([str(tiny_artifact), str(tmp_path / "missing"), "--npy", str(tmp_path / "images.npy")])
    assert code == 2
    assert str(tmp_path / "missing") in capsys.readouterr().err


def push_interleaved(client: redis.Redis, images: np.ndarray, shards: int) -> dict[str, np.ndarray]:
    """Push `images` in small chunks alternating between the shards' input streams, so that their
    entry ids interleave in time; producer id -> image."""
    by_id = {}
    names = [shard_key("images", shard) for shard in range(shards)] if shards > 1 else ["images"]
    producers = [ImageProducer(client, name) for name in names]
    for start in range(0, len(images), 25):
        chunk = images[start : start + 25]
        ids = [f"img-{start + i}" for i in range(len(chunk))]
        producers[(start // 25) % shards].push_many(chunk, ids)
        by_id.update(zip(ids, chunk, strict=True))
    return by_id


def newest_by_entry_id(client: redis.Redis, streams: list[str], count: int) -> list[tuple[bytes, bytes]]:
    """(entry id, producer id) of the `count` newest entries of `streams` together, newest first;
    an id two shards share goes to the lower shard first (a stable sort of shard 0 before 1)."""
    everything = [(entry_id, f[b"id"]) for stream in streams for entry_id, f in client.xrevrange(stream)]
    return sorted(everything, key=lambda e: entry_time(e[0]), reverse=True)[:count]


def test_reads_the_newest_entries_of_every_shard_merged_by_entry_id(redis_client: redis.Redis) -> None:
    push_interleaved(redis_client, uint8_digits(300), shards=2)
    streams = [shard_key("images", shard) for shard in range(2)]
    entries = recent_entries(redis_client, streams, 120)
    expected = newest_by_entry_id(redis_client, streams, 120)
    assert [(entry_id, fields[b"id"]) for entry_id, fields in entries] == expected[::-1]  # oldest first
    shards_seen = {(int(producer_id.split(b"-")[1]) // 25) % 2 for _, producer_id in expected}
    assert shards_seen == {0, 1}, "the newest 120 of 300 alternating chunks come from both shards"


def test_compares_on_the_newest_entries_of_two_shards(
    tiny_artifact: Path,
    redis_client: redis.Redis,
    redis_server: RedisServer,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    by_id = push_interleaved(redis_client, uint8_digits(300), shards=2)
    monkeypatch.setenv("ANOMALY_SHARDS", "2")
    monkeypatch.setenv("ANOMALY_INPUT_STREAM", "images")
    args = [str(tiny_artifact), str(tiny_artifact), "--redis-url", redis_server.url, "--count", "200"]
    assert main([*args, "--threshold-b", "p50", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    newest = newest_by_entry_id(redis_client, [shard_key("images", s) for s in range(2)], 200)
    images = np.stack([by_id[producer_id.decode()] for _, producer_id in newest])
    own, median = expected_flags(tiny_artifact, images, None), expected_flags(tiny_artifact, images, "p50")
    assert result["images"] == 200 and result["rejected_entries"] == 0
    assert result["a"]["flagged"] == int(own.sum()) and result["b"]["flagged"] == int(median.sum())
    assert result["only_b"] == int((median & ~own).sum())
    assert redis_client.xlen(shard_key("images", 0)) + redis_client.xlen(shard_key("images", 1)) == 300


def documented_compare_acl(password: str, shards: int) -> list[str]:
    """anomaly-compare's ACL SETUSER line of deploy/README.md (the shard patterns for N > 1)."""
    text = (ROOT / "deploy" / "README.md").read_text()
    (line,) = [ln for ln in text.splitlines() if ln.startswith(f"ACL SETUSER {USER} ")]
    line = line.replace("COMPARE-PASSWORD", password)
    if shards > 1:
        assert SHARDED_KEYS in text
        line = line.replace(" ~images ", f" {SHARDED_KEYS} ")
    return line.split()


@pytest.fixture
def compare_user(redis_client: redis.Redis, tmp_path: Path) -> Iterator[Path]:
    """The documented ACL user for two shards; the path of a file holding its password."""
    redis_client.execute_command(*documented_compare_acl(PASSWORD, shards=2))
    secret = tmp_path / "redis-password"
    secret.write_text(PASSWORD + "\n")  # as a mounted Secret may end
    try:
        yield secret
    finally:
        redis_client.acl_deluser(USER)


def test_compares_as_its_least_privilege_user_with_a_password_file(
    tiny_artifact: Path,
    compare_user: Path,
    redis_client: redis.Redis,
    redis_server: RedisServer,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    push_interleaved(redis_client, uint8_digits(100), shards=2)
    # As deployed: the URL names the user only, the password comes from a file, the shards from
    # the environment; no flag but the artifacts and the count.
    monkeypatch.setenv("ANOMALY_REDIS_URL", f"redis://{USER}@127.0.0.1:{redis_server.port}/0")
    monkeypatch.setenv("ANOMALY_REDIS_PASSWORD_FILE", str(compare_user))
    monkeypatch.setenv("ANOMALY_SHARDS", "2")
    assert main([str(tiny_artifact), str(tiny_artifact), "--count", "60", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["images"] == 60
    # That user reads the input streams and nothing else.
    client = redis.Redis(port=redis_server.port, username=USER, password=PASSWORD)
    try:
        assert len(client.xrevrange(shard_key("images", 1), count=5)) == 5
        for refused in (
            lambda: client.xadd(shard_key("images", 0), {"forged": "1"}),
            lambda: client.xrange(shard_key("images", 0)),
            lambda: client.xreadgroup("g", "c", {shard_key("images", 0): ">"}),
            lambda: client.xrevrange(shard_key("anomalies", 0)),
            lambda: client.delete(shard_key("images", 0)),
        ):
            with pytest.raises(redis.exceptions.NoPermissionError):
                refused()
    finally:
        client.close()
    assert redis_client.xinfo_groups(shard_key("images", 0)) == []


def test_a_refused_read_names_the_streams_and_the_url_without_the_password(
    tiny_artifact: Path,
    compare_user: Path,
    redis_client: redis.Redis,
    redis_server: RedisServer,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    push_interleaved(redis_client, uint8_digits(10), shards=1)
    url = f"redis://{USER}:{PASSWORD}@127.0.0.1:{redis_server.port}/0"
    # One shard: `images` itself, which the two-shard ACL (~images:{*}) does not grant.
    assert main([str(tiny_artifact), str(tiny_artifact), "--redis-url", url, "--stream", "images"]) == 2
    err = capsys.readouterr().err
    assert "cannot read the newest entries of images from redis://anomaly-compare" in err
    assert "no permissions to access one of the keys" in err and PASSWORD not in err


def test_a_misspelt_setting_is_refused_by_name(
    tiny_artifact: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("ANOMALY_SHARD", "2")
    assert main([str(tiny_artifact), str(tiny_artifact)]) == 2
    assert (
        "anomaly-compare: unknown setting ANOMALY_SHARD; did you mean ANOMALY_SHARDS?"
        in capsys.readouterr().err
    )
