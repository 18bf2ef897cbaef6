"""docs/producers.md as a producer in another language reads it: its examples run against a real
Redis and a real worker, and its shard arithmetic is the one the workers use."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import zlib
from pathlib import Path

import numpy as np
import pytest

from contract.shards import shard_of_id
from runtime.settings import WorkerSettings
from tests.conftest import ROOT, RedisServer
from tests.support import build_runner
from worker.loaded_model import load_model

pytestmark = [pytest.mark.e2e]
DOC = (ROOT / "docs" / "producers.md").read_text()


def code_blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", DOC, re.S)


def scored(client, tiny_artifact: Path) -> dict[str, dict[bytes, bytes]]:
    """Drain the input stream with a real worker (the tiny artifact); the scores stream by id."""
    settings = WorkerSettings(
        artifact=tiny_artifact, consumer="doc", scores_stream="scores", reload_poll_seconds=0, prefetch=False
    )
    runner = build_runner(client, settings, model=load_model(settings))
    runner.drain()
    runner.close()
    return {f[b"id"].decode(): f for _, f in client.xrange("scores")}


def test_the_redis_cli_examples_give_images_the_worker_scores(
    redis_server: RedisServer, tiny_artifact: Path, tmp_path: Path
) -> None:
    client = redis_server.client()
    client.flushdb()
    json_example, raw_example = code_blocks("sh")[1:3]
    (tmp_path / "frame.raw").write_bytes(np.full(784, 255, np.uint8).tobytes())
    env = dict(os.environ, ANOMALY_REDIS_URL=redis_server.url)
    for example in (json_example, raw_example):
        done = subprocess.run(
            ["bash", "-c", example], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=30
        )
        assert done.returncode == 0 and re.fullmatch(r"\d+-\d+\n", done.stdout), done.stdout + done.stderr
    by_id = scored(client, tiny_artifact)
    assert set(by_id) == {"cam-7:frame-123", "cam-7:frame-124"}
    assert client.xlen("images:dead-letter") == 0


def test_the_shard_example_is_what_the_workers_compute() -> None:
    found = re.search(
        r'`crc32\("([^"]+)"\) = ([\d,]+)`, so with (\d+) shards it goes to `images:\{(\d+)\}`', DOC
    )
    assert found, "the shard example is missing from docs/producers.md"
    producer_id, crc, shards, shard = (
        found.group(1),
        int(found.group(2).replace(",", "")),
        int(found.group(3)),
        int(found.group(4)),
    )
    assert zlib.crc32(producer_id.encode()) == crc
    assert shard_of_id(producer_id, shards) == shard == crc % shards


def _ioredis(cache: Path) -> Path | None:
    """A node_modules with ioredis, installed from the npm registry into `cache` if need be."""
    if (cache / "node_modules" / "ioredis").is_dir():
        return cache / "node_modules"
    cache.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(
        ["npm", "install", "--silent", "--no-audit", "--no-fund", "ioredis@5"],
        cwd=cache, capture_output=True, text=True, timeout=180, check=False,
    )  # fmt: skip
    return cache / "node_modules" if done.returncode == 0 else None


@pytest.mark.skipif(
    shutil.which("node") is None or shutil.which("npm") is None, reason="node and npm are not installed"
)
def test_the_node_example_pushes_to_the_shard_the_workers_read(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    modules = _ioredis(ROOT / "build" / "node-ioredis")
    if modules is None:
        pytest.skip("ioredis could not be installed from the npm registry")
    client = redis_server.client()
    client.flushdb()
    [example] = code_blocks("js")
    script = tmp_path / "produce.js"
    script.write_text(example)
    env = dict(os.environ, ANOMALY_REDIS_URL=redis_server.url, ANOMALY_SHARDS="4", NODE_PATH=str(modules))
    done = subprocess.run(["node", str(script)], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    expected = f"images:{{{shard_of_id('cam-7:frame-123', 4)}}}"
    [(_, fields)] = client.xrange(expected)
    assert fields[b"id"] == b"cam-7:frame-123" and len(fields[b"image"]) == 784
