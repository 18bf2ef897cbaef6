"""What fencing every ack costs: the commit of one batch with the worker's commit script, which
checks that each entry (those with nothing to publish too) is pending to this consumer, against
the script before that check (release 0787e0a, read from git: plain acks unchecked), alternating
rounds at batch 256 and 32 and a 5% flag rate. Medians of per-commit times.

    python -m benchmarks.commit_cost [--entries 20000] [--rounds 5]     (part of `make bench`)

Writes benchmarks/results/commit-cost.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import redis

from benchmarks.throughput.helpers import load_mnist_uint8, log
from benchmarks.throughput.plan import RESULTS
from benchmarks.throughput.processes import RedisProcess
from contract.codec import encode_image
from worker.stream import OUTPUT, Commit, StreamClient

UNFENCED_PLAIN_ACKS = "0787e0a"  # the last commit whose script acked plain ids without a check
ROOT = Path(__file__).resolve().parent.parent


def previous_script() -> str:
    """COMMIT_SCRIPT as it was at UNFENCED_PLAIN_ACKS (the same argument layout as today's)."""
    source = subprocess.run(
        ["git", "-C", str(ROOT), "show", f"{UNFENCED_PLAIN_ACKS}:worker/stream.py"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    found = re.search(r'COMMIT_SCRIPT = """(.*?)"""', source, re.S)
    if found is None:
        raise SystemExit(f"no COMMIT_SCRIPT in worker/stream.py at {UNFENCED_PLAIN_ACKS}")
    return found.group(1)


def commit_times(client: redis.Redis, batch: int, script: str | None, group: str) -> list[float]:
    """Read the whole stream through a new group in batches; seconds of each commit_batch call with
    the current script (`script` None) or `script`."""
    stream = StreamClient(client, input_stream="images", output_stream="anomalies",
                          dead_letter_stream="dead-letter", scores_stream="", group=group,
                          consumer="bench", output_maxlen=100_000, dead_letter_maxlen=0,
                          scores_maxlen=0)  # fmt: skip
    if script is not None:
        stream._commit = client.register_script(script)
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
        if result.acked != len(ids):
            raise SystemExit(f"a commit acked {result.acked} of {len(ids)} entries")
    return times


def main(argv: list[str] | None = None) -> int:
    """Entry point: python -m benchmarks.commit_cost."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.commit_cost", description=__doc__)
    parser.add_argument("--entries", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    scripts = {
        "every ack fenced (today)": None,
        f"plain acks unchecked ({UNFENCED_PLAIN_ACKS})": previous_script(),
    }
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        server = RedisProcess(Path(tmp))
        try:
            images = load_mnist_uint8()
            pipe = server.client.pipeline(transaction=False)
            for i in range(args.entries):
                pipe.xadd("images", dict(encode_image(images[i % len(images)], "uint8")))
            pipe.execute()
            for batch in (256, 32):
                times: dict[str, list[float]] = {name: [] for name in scripts}
                for round_ in range(args.rounds):
                    for index, (name, script) in enumerate(scripts.items()):
                        times[name] += commit_times(
                            server.client, batch, script, f"g-{batch}-{index}-{round_}"
                        )
                for name in scripts:
                    ms = np.array(times[name]) * 1000
                    rows.append({"batch_size": batch, "script": name, "commits": len(ms),
                                 "commit_ms_p50": round(float(np.median(ms)), 3),
                                 "commit_ms_p99": round(float(np.percentile(ms, 99)), 3)})  # fmt: skip
                    log(f"batch {batch} {name}: commit p50 {np.median(ms):.3f} ms")
        finally:
            server.stop()
    for row in rows:
        base = next(r for r in rows if r["batch_size"] == row["batch_size"] and r["script"] != row["script"])
        row["vs_other_p50"] = round(row["commit_ms_p50"] / base["commit_ms_p50"], 3)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "commit-cost.json").write_text(
        json.dumps({"entries": args.entries, "rows": rows}, indent=2) + "\n"
    )
    lines = ["| batch | commit script | commits | commit p50 ms | commit p99 ms | p50 / the other's |"]
    lines.append("|---|---|---|---|---|---|")
    for r in rows:
        lines.append(
            f"| {r['batch_size']} | {r['script']} | {r['commits']} | {r['commit_ms_p50']} "
            f"| {r['commit_ms_p99']} | {r['vs_other_p50']} |"
        )
    (args.out / "commit-cost.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
