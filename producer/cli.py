"""anomaly-producer: push MNIST test digits (some rotated 90 degrees) to the input stream."""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np

from runtime.cli import SettingsRefused, add_version_flag, load_settings, refuse
from runtime.connection import make_redis
from runtime.settings import StreamSettings


def build_parser() -> argparse.ArgumentParser:
    """The CLI's arguments."""
    p = argparse.ArgumentParser(
        prog="anomaly-producer",
        description="Push MNIST test images to a Redis stream, optionally some rotated by 90 degrees "
        "(anomalies for a model trained on upright digits). Ids are normal-N / rotated-N.",
    )
    # The connection and the stream come from the ANOMALY_* variables every program reads (Sentinel
    # and password files included); these flags override them.
    p.add_argument(
        "--redis-url", help="Redis to push to [env ANOMALY_REDIS_URL, default: redis://localhost:6379/0]"
    )
    p.add_argument("--stream", help="input stream [env ANOMALY_INPUT_STREAM, default: images]")
    p.add_argument(
        "--shards",
        type=int,
        help="shards of the input stream (the workers' ANOMALY_SHARDS): above 1 each image goes to "
        "STREAM:{i}, i = CRC-32 of the image id mod SHARDS [env ANOMALY_SHARDS, default: 1]",
    )
    p.add_argument(
        "--redis-cluster",
        action=argparse.BooleanOptionalAction,
        help="speak the Redis Cluster protocol (REDIS_URL is any node) "
        "[env ANOMALY_REDIS_CLUSTER, default: off]",
    )
    p.add_argument("--count", type=int, default=1000, help="images to push (default: %(default)s)")
    p.add_argument(
        "--rotated-fraction",
        type=float,
        default=0.0,
        help="share rotated by 90 degrees (default: 0)",
    )
    p.add_argument(
        "--dtype",
        choices=["uint8", "float32", "json"],
        default="uint8",
        help="payload encoding (default: uint8)",
    )
    p.add_argument(
        "--rate",
        type=float,
        default=0.0,
        help="messages per second; 0 = as fast as possible (default)",
    )
    p.add_argument("--dataset", default="mnist", help="mnist or fashion-mnist (default: mnist)")
    p.add_argument("--data-dir", help="folder with the IDX files (see anomaly-trainer train --help)")
    add_version_flag(p)
    p.add_argument("--seed", type=int, default=0, help="which images are picked and rotated (default: 0)")
    p.add_argument(
        "--maxlen",
        type=int,
        default=1_000_000,
        help="approximate cap of the stream (default: %(default)s)",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of anomaly-producer."""
    args = build_parser().parse_args(argv)
    if not 0 <= args.rotated_fraction <= 1:
        print("anomaly-producer: error: --rotated-fraction must be in [0, 1]", file=sys.stderr)
        return 2
    overrides = {"redis_url": args.redis_url, "input_stream": args.stream, "shards": args.shards}
    overrides["redis_cluster"] = args.redis_cluster
    try:
        settings = load_settings(StreamSettings, argparse.Namespace(**overrides))
    except SettingsRefused as exc:
        return refuse("anomaly-producer", str(exc))
    from detector.datasets import DatasetError, load_dataset, rotate90
    from producer.client import ImageProducer

    try:
        test = load_dataset(args.dataset, args.data_dir).test.x
    except DatasetError as exc:
        print(f"anomaly-producer: error: {exc}", file=sys.stderr)
        return 2
    rng = np.random.default_rng(args.seed)
    picked = test[rng.choice(test.shape[0], args.count, replace=args.count > test.shape[0])]
    rotated = rng.random(args.count) < args.rotated_fraction
    picked[rotated] = rotate90(picked[rotated])
    ids = [f"{'rotated' if r else 'normal'}-{i}" for i, r in enumerate(rotated)]
    client = make_redis(settings, "anomaly-producer")
    stream = settings.input_stream
    try:
        producer = ImageProducer(client, stream, args.dtype, args.maxlen, shards=settings.shards)
    except ValueError as exc:
        print(f"anomaly-producer: error: {exc}", file=sys.stderr)
        return 2
    started = time.monotonic()
    if args.rate <= 0:
        producer.push_many(picked, ids)
    else:
        per_tick = max(1, int(args.rate / 100))  # send in small groups, 100 times a second
        for start in range(0, args.count, per_tick):
            producer.push_many(picked[start : start + per_tick], ids[start : start + per_tick])
            due = started + (start + per_tick) / args.rate
            time.sleep(max(0.0, due - time.monotonic()))
    took = time.monotonic() - started
    print(
        f"pushed {args.count} images ({int(rotated.sum())} rotated) to {stream}"
        f"{f' ({settings.shards} shards)' if settings.shards > 1 else ''} in {took:.2f}s "
        f"({args.count / max(took, 1e-9):.0f}/s)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
