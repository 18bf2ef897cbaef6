"""Argument parsing and the printed summary; the measuring is in `run`, the files in `results`."""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from benchmarks import throughput
from benchmarks.throughput.plan import FULL, QUICK, RESULTS
from benchmarks.throughput.results import format_table, table_rows, targets, write_results
from benchmarks.throughput.run import detector_artifacts, ensure_artifact, run


def main(argv: list[str] | None = None) -> int:
    """Entry point: python -m benchmarks.throughput [--quick]."""
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.throughput", description=(throughput.__doc__ or "").split("\n")[0]
    )
    parser.add_argument(
        "--quick", action="store_true", help="smoke run (under a minute): small streams, no long runs"
    )
    parser.add_argument("--artifact", type=Path, help="use this artifact instead of the cached/trained one")
    parser.add_argument("--out", type=Path, default=RESULTS, help=f"results directory (default: {RESULTS})")
    parser.add_argument(
        "--flat-seconds",
        type=float,
        default=None,
        help="length of the memory-trend run (full: 600, quick: 0)",
    )
    args = parser.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    plan = QUICK if args.quick else FULL
    started = time.perf_counter()
    artifact = ensure_artifact(plan, args.artifact)
    flat = plan.flat_seconds if args.flat_seconds is None else args.flat_seconds
    results = run(plan, artifact, flat, detector_artifacts(plan))
    results["finished"] = time.strftime("%Y-%m-%d %H:%M")
    results["wall_seconds"] = round(time.perf_counter() - started, 1)
    table = format_table(table_rows(results))
    goals = targets(results)
    write_results(results, args.out, table, goals)
    print(table)
    print()
    for goal, value, ok in goals:
        print(f"{'met ' if ok else 'MISS'}  {goal}: {value}")
    print(f"\nwall time {results['wall_seconds']:.0f}s; results in {args.out}")
    return 0
