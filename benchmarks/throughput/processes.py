"""The processes a run starts: a private redis-server, the raw-socket producer, `python -m worker`."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import redis

from benchmarks.throughput.helpers import Scrape, free_port, scrape, wait_for
from benchmarks.throughput.plan import GROUP, OUTPUT


class RedisProcess:
    """A private redis-server on a free port, without persistence."""

    def __init__(self, directory: Path, extra_args: tuple[str, ...] = ()) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise SystemExit("redis-server is not on the PATH (apt-get install redis-server)")
        self.port = free_port()
        self.process = subprocess.Popen(
            [
                binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(directory),
                "--logfile",
                str(directory / "redis.log"),
                *extra_args,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.client = redis.Redis(port=self.port, socket_connect_timeout=1.0)

        def answers() -> bool:
            try:
                return bool(self.client.ping())
            except redis.RedisError:
                return False

        wait_for(answers, 10, f"redis-server on port {self.port}")
        self.version = str(self.client.info("server")["redis_version"])

    def stop(self) -> None:
        """Kill our server (its data is throwaway)."""
        self.client.close()
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)


class RawProducer:
    """The paced load: pre-encoded XADD commands written to a socket, replies skimmed.

    A producer in the benchmark process shares the 2 cores with the worker and Redis; through
    redis-py's pipeline it took about 0.6 of a core at 60k msg/s and so starved the worker it
    measures. Producers run elsewhere in production, so this one does as little as it can.
    """

    def __init__(self, port: int, stream: str, images: list[bytes], maxlen: int = 200_000) -> None:
        def resp(*args: bytes) -> bytes:
            return b"*%d\r\n" % len(args) + b"".join(b"$%d\r\n%s\r\n" % (len(a), a) for a in args)

        head = (b"XADD", stream.encode(), b"MAXLEN", b"~", str(maxlen).encode(), b"*", b"image")
        self.commands = [resp(*head, image) for image in images]
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.sock.setblocking(False)
        self.replies = 0
        self._tail = b""

    def send(self, start: int, count: int) -> None:
        """XADD entries start..start+count-1 (images cycle); read whatever replies have come."""
        n = len(self.commands)
        data = b"".join(self.commands[i % n] for i in range(start, start + count))
        self.sock.setblocking(True)
        self.sock.sendall(data)
        self.sock.setblocking(False)
        self._skim()

    def _skim(self) -> None:
        while True:
            try:
                chunk = self.sock.recv(1 << 20)
            except BlockingIOError:
                return
            if not chunk:
                raise ConnectionError("redis closed the producer's connection")
            self.replies += chunk.count(b"$")  # one bulk string (the new id) per XADD; ids have no $
            self._tail = (self._tail + chunk)[-200:]

    def finish(self, sent: int, timeout: float = 30.0) -> None:
        """Wait for every reply, then close."""
        deadline = time.monotonic() + timeout
        while self.replies < sent:
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"{self.replies} of {sent} XADD replies after {timeout:g}s; last bytes {self._tail!r}"
                )
            self._skim()
            time.sleep(0.001)
        self.sock.close()


class WorkerProcess:
    """One `python -m worker` process, as deployed, with its metrics endpoint."""

    def __init__(
        self,
        artifact: Path,
        redis_url: str,
        log_dir: Path,
        name: str,
        stream: str,
        batch_size: int,
        scores_stream: str = "",
        group: str = GROUP,
        engine: str = "auto",
        shadow_artifact: Path | None = None,
    ) -> None:
        self.name = name
        self.stream = stream
        self.group = group
        self.port = free_port()
        self.log_path = log_dir / f"worker-{name}.log"
        argv = [sys.executable, "-m", "worker", "--artifact", str(artifact)]
        argv += ["--redis-url", redis_url, "--input-stream", stream, "--group", group]
        argv += ["--output-stream", OUTPUT, "--dead-letter-stream", "bench:dead-letter"]
        argv += ["--consumer", name, "--batch-size", str(batch_size), "--metrics-host", "127.0.0.1"]
        argv += ["--metrics-port", str(self.port), "--engine", engine]
        if scores_stream:
            argv += ["--scores-stream", scores_stream]
        if shadow_artifact is not None:
            argv += ["--shadow-artifact", str(shadow_artifact)]
        env = {k: v for k, v in os.environ.items() if not k.startswith("ANOMALY_")}
        env["TF_CPP_MIN_LOG_LEVEL"] = "3"
        self.started = time.perf_counter()
        with open(self.log_path, "wb") as log_file:
            self.process = subprocess.Popen(argv, env=env, stdout=log_file, stderr=subprocess.STDOUT)
        self.pid = self.process.pid
        self.ready_seconds = float("nan")

    def wait_ready(self, timeout: float = 180.0) -> float:
        """Seconds from process start to /readyz answering 200."""

        def ready() -> bool:
            if self.process.poll() is not None:
                tail = self.log_path.read_text(errors="replace")[-3000:]
                raise RuntimeError(f"worker {self.name} exited with {self.process.returncode}:\n{tail}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/readyz", timeout=1) as r:
                    return bool(r.status == 200)
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                return False

        wait_for(ready, timeout, f"worker {self.name} /readyz", interval=0.02)
        self.ready_seconds = time.perf_counter() - self.started
        return self.ready_seconds

    def scrape(self) -> Scrape:
        """Its /metrics."""
        return scrape(self.port)

    def stop(self) -> None:
        """SIGTERM (warm stop: finish the batch in hand), then wait."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
