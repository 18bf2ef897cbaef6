"""The Bench: one run's redis-server, pre-filled streams and worker processes, stopped whatever happens."""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, cast

import redis

from benchmarks.throughput.helpers import load_mnist_uint8, log, rss_mb
from benchmarks.throughput.plan import BARE_GROUP, GROUP, NAIVE_GROUP, STREAMS, Plan
from benchmarks.throughput.processes import RedisProcess, WorkerProcess
from benchmarks.throughput.project import payloads


class Bench:
    """The run: owns the Redis server, the streams and the worker processes."""

    def __init__(self, plan: Plan, artifact: Path, tmp: Path) -> None:
        self.plan = plan
        self.artifact = artifact
        self.tmp = tmp
        self.redis = RedisProcess(tmp)
        self.r = redis.Redis(port=self.redis.port)
        self.images = load_mnist_uint8()
        self.ids: dict[str, list[bytes]] = {}
        self.wakes: dict[str, int] = {dtype: 0 for dtype in STREAMS}
        self.wake_fields = {d: {"image": payloads(self.images[:1], d)[0], "dtype": d} for d in STREAMS}
        self.workers: list[WorkerProcess] = []

    def close(self) -> None:
        """Stop every worker we started, then our redis-server."""
        for worker in self.workers:
            worker.stop()
        self.r.close()
        self.redis.stop()

    # -- setup
    def prefill(self) -> None:
        """XADD the plan's entries per dtype (pipelined), and an idle group on each stream."""
        for dtype, count in self.plan.entries.items():
            stream = STREAMS[dtype]
            encoded = payloads(self.images[: min(count, len(self.images))], dtype)
            ids: list[bytes] = []
            for start in range(0, count, 1000):
                pipe = self.r.pipeline(transaction=False)
                for i in range(start, min(start + 1000, count)):
                    pipe.execute_command(
                        "XADD", stream, "*", "image", encoded[i % len(encoded)], "dtype", dtype
                    )
                ids.extend(pipe.execute())
            self.ids[dtype] = ids
            for group in (BARE_GROUP, NAIVE_GROUP):
                self.r.xgroup_create(stream, group, id="$", mkstream=True)
        used = self.r.info("memory")["used_memory"] / 2**20
        log(f"pre-filled {self.plan.entries} redis used_memory={used:.0f}MB")

    def rewind(self, dtype: str, entries: int, group: str = GROUP) -> tuple[str, bytes, int]:
        """Rewind `group` to just before the last `entries` pre-filled entries; add a wake-up entry.

        Returns (stream, id of the wake-up entry, entries now undelivered to `group`).
        """
        stream, ids = STREAMS[dtype], self.ids[dtype]
        start = ids[-entries - 1] if entries < len(ids) else b"0"
        self.r.xgroup_setid(stream, group, start)
        self.wakes[dtype] += 1
        # A blocked XREADGROUP is not woken by SETID; a new entry wakes it.
        wake = cast(bytes, self.r.xadd(stream, self.wake_fields[dtype]))  # type: ignore[arg-type]
        return stream, wake, entries + self.wakes[dtype]

    def group(self, stream: str, group: str = GROUP) -> dict[str, Any]:
        """XINFO GROUPS row of `group`."""
        for info in self.r.xinfo_groups(stream):
            if info["name"] in (group, group.encode()):
                return dict(info)
        raise KeyError(f"group {group} missing on {stream}")

    # -- the real worker
    def start_worker(
        self,
        name: str,
        stream: str,
        batch_size: int,
        group: str,
        engine: str = "auto",
        shadow: bool = False,
        artifact: Path | None = None,
    ) -> WorkerProcess:
        """Start a worker on `group` (created idle, at the stream's end) and wait for /readyz; with
        `shadow`, the same artifact also runs as its shadow model (a second forward pass per batch);
        `artifact` serves another detector than the run's."""
        if not any(info["name"] in (group, group.encode()) for info in self.r.xinfo_groups(stream)):
            self.r.xgroup_create(stream, group, id="$")
        worker = WorkerProcess(
            artifact or self.artifact,
            self.redis.url,
            self.tmp,
            name,
            stream,
            batch_size,
            group=group,
            engine=engine,
            shadow_artifact=self.artifact if shadow else None,
        )
        self.workers.append(worker)
        seconds = worker.wait_ready()
        log(f"worker {name} ready in {seconds:.2f}s rss={rss_mb(worker.pid):.0f}MB")
        return worker

    def stop_worker(self, worker: WorkerProcess) -> None:
        """Stop it and forget it."""
        worker.stop()
        self.workers.remove(worker)


@contextmanager
def bench_session(plan: Plan, artifact: Path) -> Iterator[Bench]:
    """A Bench whose workers and redis-server are stopped whatever happens."""
    with tempfile.TemporaryDirectory(prefix="anomaly-bench-") as tmp:
        bench = Bench(plan, artifact, Path(tmp))
        try:
            yield bench
        finally:
            bench.close()
