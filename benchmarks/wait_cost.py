"""What ANOMALY_WAIT_REPLICAS costs: the commit of one batch (the worker's commit script, then WAIT
on the same connection) against a primary with one replica on this machine, WAIT 0 and 1
alternating, at batch 256 and 32. Medians of per-commit times, so a busy machine blurs them less
than a drain rate.

    python -m benchmarks.wait_cost [--entries 20000] [--rounds 5]

Writes benchmarks/results/wait-cost.{json,md}. The replica is local, so the figure is the price of
one more round trip per commit (primary -> replica -> primary ack, which replicas send every
100 ms unless WAIT asks sooner) plus WAIT's own handling; across zones add the network round trip.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import redis

from benchmarks.throughput.helpers import load_mnist_uint8, log, wait_for
from benchmarks.throughput.plan import RESULTS
from benchmarks.throughput.processes import RedisProcess
from contract.codec import encode_image
from worker.stream import OUTPUT, Commit, StreamClient


def commit_times(client: redis.Redis, batch: int, wait: int, group: str) -> list[float]:
    """Read the whole stream through a new group in batches; seconds of each commit_batch call
    (every entry acked, one in 20 published as an anomaly, as a worker at a 5% flag rate does)."""
    stream = StreamClient(client, input_stream="images", output_stream="anomalies",
                          dead_letter_stream="dead-letter", scores_stream="", group=group,
                          consumer="bench", output_maxlen=100_000, dead_letter_maxlen=0,
                          scores_maxlen=0, wait_replicas=wait, wait_timeout_ms=1000)  # fmt: skip
    stream.ensure_group("0")
    times = []
    while entries := stream.read_new(batch, None):
        ids = [entry_id for entry_id, _ in entries]
        flagged = set(ids[::20])
        commit = Commit(
            plain_ids=[i for i in ids if i not in flagged],
            records=[(i, [(OUTPUT, ["source_id", i, "score", "0.5"])]) for i in ids if i in flagged],
            id_range=(ids[0], ids[-1]),
        )
        started = time.perf_counter()
        result = stream.commit_batch(commit)
        times.append(time.perf_counter() - started)
        if wait and result.replicas != wait:
            raise SystemExit(f"WAIT {wait} confirmed {result.replicas} replicas")
    return times


def main(argv: list[str] | None = None) -> int:
    """Entry point: python -m benchmarks.wait_cost."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.wait_cost", description=__doc__)
    parser.add_argument("--entries", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
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
                times: dict[int, list[float]] = {0: [], 1: []}
                for round_ in range(args.rounds):
                    for wait in (0, 1):
                        times[wait] += commit_times(primary.client, batch, wait, f"g-{batch}-{wait}-{round_}")
                for wait in (0, 1):
                    ms = np.array(times[wait]) * 1000
                    rows.append({"batch_size": batch, "wait_replicas": wait, "commits": len(ms),
                                 "commit_ms_p50": round(float(np.median(ms)), 3),
                                 "commit_ms_p99": round(float(np.percentile(ms, 99)), 3)})  # fmt: skip
                    log(f"batch {batch} WAIT {wait}: commit p50 {np.median(ms):.3f} ms")
        finally:
            replica.stop()
            primary.stop()
    for row in rows:
        base = next(r for r in rows if r["batch_size"] == row["batch_size"] and r["wait_replicas"] == 0)
        row["added_ms_p50"] = round(row["commit_ms_p50"] - base["commit_ms_p50"], 3)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "wait-cost.json").write_text(
        json.dumps({"entries": args.entries, "rows": rows}, indent=2) + "\n"
    )
    lines = ["| batch | WAIT replicas | commits | commit p50 ms | commit p99 ms | added p50 ms |"]
    lines.append("|---|---|---|---|---|---|")
    for r in rows:
        lines.append(
            f"| {r['batch_size']} | {r['wait_replicas']} | {r['commits']} | {r['commit_ms_p50']} "
            f"| {r['commit_ms_p99']} | {r['added_ms_p50']} |"
        )
    (args.out / "wait-cost.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
