"""What ANOMALY_WAIT_REPLICAS costs: one in-process worker drains pre-filled uint8 digits from a
primary with one replica on this machine, with WAIT 0 and 1, alternating, at batch 256 and 32.

    python -m benchmarks.wait_cost [--entries 20000] [--repeats 3]

Writes benchmarks/results/wait-cost.{json,md}. The replica is local, so the figure is the price of
one more round trip per commit (primary -> replica -> primary) plus WAIT's own handling; across
zones add the network round trip between them to every commit.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import redis
from prometheus_client import CollectorRegistry

from benchmarks.throughput.helpers import load_mnist_uint8, log, median, wait_for
from benchmarks.throughput.plan import QUICK, RESULTS
from benchmarks.throughput.processes import RedisProcess
from benchmarks.throughput.run import ensure_artifact
from worker.codec import encode_image
from worker.loaded_model import load_model
from worker.metrics import WorkerMetrics
from worker.runner import Runner
from worker.settings import WorkerSettings
from worker.shards import ShardSet


def drain_rate(
    primary: RedisProcess, artifact: Path, batch: int, wait: int, group: str, entries: int
) -> float:
    """Messages per second of one runner draining the whole stream through a new group."""
    settings = WorkerSettings(
        redis_url=primary.url,  # type: ignore[arg-type]
        artifact=artifact,
        group=group,
        consumer="bench",
        batch_size=batch,
        wait_replicas=wait,
        wait_timeout_ms=1000,
        reload_poll_seconds=0,
        drift_window_scores=0,
    )
    client = redis.Redis.from_url(primary.url)
    runner = Runner(settings, ShardSet.from_settings(client, settings), load_model(settings),
                    WorkerMetrics(CollectorRegistry(), with_process=False))  # fmt: skip
    started = time.perf_counter()
    handled = runner.drain()
    elapsed = time.perf_counter() - started
    runner.close()
    client.close()
    if handled != entries:
        raise SystemExit(f"drained {handled} entries, expected {entries}")
    return entries / elapsed


def main(argv: list[str] | None = None) -> int:
    """Entry point: python -m benchmarks.wait_cost."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.wait_cost", description=__doc__)
    parser.add_argument("--entries", type=int, default=20_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    artifact = ensure_artifact(QUICK, None)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "p").mkdir()
        (Path(tmp) / "r").mkdir()
        primary = RedisProcess(Path(tmp) / "p")
        replica = RedisProcess(Path(tmp) / "r", ("--replicaof", "127.0.0.1", str(primary.port)))
        try:
            images = load_mnist_uint8()
            pipe = primary.client.pipeline(transaction=False)
            for i in range(args.entries):
                pipe.xadd("images", dict(encode_image(images[i % len(images)], "uint8")))
            pipe.execute()
            wait_for(lambda: replica.client.xlen("images") == args.entries, 30, "replica in sync")
            for batch in (256, 32):
                rates: dict[int, list[float]] = {0: [], 1: []}
                for repeat in range(args.repeats):
                    for wait in (0, 1):
                        group = f"g-{batch}-{wait}-{repeat}"
                        rates[wait].append(drain_rate(primary, artifact, batch, wait, group, args.entries))
                for wait in (0, 1):
                    rate = median(rates[wait])
                    rows.append({"batch_size": batch, "wait_replicas": wait, "msg_per_s": round(rate),
                                 "ms_per_batch": round(1000 * batch / rate, 3)})  # fmt: skip
                    log(f"batch {batch} WAIT {wait}: {rate:,.0f} msg/s")
        finally:
            replica.stop()
            primary.stop()
    for row in rows:
        base = next(r for r in rows if r["batch_size"] == row["batch_size"] and r["wait_replicas"] == 0)
        row["relative"] = round(row["msg_per_s"] / base["msg_per_s"], 3)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "wait-cost.json").write_text(
        json.dumps({"entries": args.entries, "rows": rows}, indent=2) + "\n"
    )
    lines = ["| batch | WAIT replicas | msg/s | ms per batch | vs no WAIT |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['batch_size']} | {r['wait_replicas']} | {r['msg_per_s']:,} | {r['ms_per_batch']} "
            f"| {r['relative']} |"
        )
    (args.out / "wait-cost.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
