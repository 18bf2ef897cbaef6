"""What each score costs the worker: images per second of the numpy engine's score_batch, one core.

The detection benchmarks (docs/detection.md) show that combined scores such as
mse+transforms+knn detect best; this measures what they cost to serve. Each score gets its own
artifact, trained quickly (the cost depends on the shapes, not on how well the weights fit):
dense-512-128-32, 12,500 MNIST training images (10,000 in the fit split, so a knn reference of
10,000 rows, the trainer's default), one epoch of each network. Then `NumpyScorer.score_batch`
runs on batches of 256 uint8-scaled test digits with BLAS held to one thread, as the worker runs
it (ANOMALY_SCORING_THREADS=1), for at least `--seconds` per score. Ratios are to mse, measured
in the same run.

    python benchmarks/score_cost.py [--seconds 5] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

RESULTS = ROOT / "benchmarks" / "results"
# (score, transformation set): what is trained and timed.
CASES: list[tuple[str, str]] = [
    ("mse", "geometric"),
    ("knn", "geometric"),
    ("mse+knn", "geometric"),
    ("mse+transforms", "rotations"),
    ("mse+transforms", "geometric"),
    ("mse+transforms+knn", "rotations"),
    ("mse+transforms+knn", "geometric"),
]
BATCH = 256


def train_case(score: str, transforms: str, out: Path, data_dir: str | None) -> Path:
    """A quick artifact of `score` (one epoch each), as `anomaly-trainer train` would write it."""
    from detector.datasets import load_dataset
    from trainer.config import DetectorConfig
    from trainer.train import train

    config = DetectorConfig.of(
        architecture="dense-512-128-32",
        epochs=1,
        transform_epochs=1,
        score=score,
        transforms=transforms,
        max_samples=12_500,
        holdout_fraction=0.2,
    )
    return train(config, load_dataset("mnist", data_dir), out, report=False, progress=False).artifact


def images_per_second(artifact: Path, images: np.ndarray, seconds: float) -> float:
    """score_batch throughput of the numpy engine on batches of BATCH rows."""
    from detector.artifact import load_artifact
    from detector.engines.numpy_engine import NumpyScorer

    scorer = NumpyScorer(load_artifact(artifact))
    scorer.warm_up(BATCH)
    done, started, batch = 0, time.perf_counter(), 0
    while True:
        start = (batch * BATCH) % (images.shape[0] - BATCH)
        scorer.score_batch(images[start : start + BATCH])
        done += BATCH
        batch += 1
        elapsed = time.perf_counter() - started
        if elapsed >= seconds:
            return done / elapsed


def main(argv: list[str] | None = None) -> int:
    """Train one artifact per case, time each, print the table, write JSON."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="timing per score (default: 5)")
    parser.add_argument(
        "--data-dir", help="folder with mnist/ IDX files (default: the trainer's search path)"
    )
    parser.add_argument("--out", type=Path, default=RESULTS, help=f"results folder (default: {RESULTS})")
    args = parser.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    from threadpoolctl import threadpool_limits

    from detector.datasets import load_dataset

    test = load_dataset("mnist", args.data_dir).test.x
    images = (np.round(test * 255) / 255).astype(np.float32)  # as the worker decodes uint8 pixels
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        artifacts = {}
        for score, transforms in CASES:
            label = score if "transforms" not in score else f"{score} ({transforms})"
            print(f"training {label} ...", file=sys.stderr, flush=True)
            artifacts[label] = train_case(
                score, transforms, Path(tmp) / label.replace(" ", "_"), args.data_dir
            )
        with threadpool_limits(1):
            for label, path in artifacts.items():
                rate = images_per_second(path, images, args.seconds)
                rows.append({"score": label, "images_per_second": round(rate)})
                print(f"{label:<36} {rate:>10,.0f} images/s", file=sys.stderr, flush=True)
    base = rows[0]["images_per_second"]
    for row in rows:
        row["ratio_to_mse"] = round(row["images_per_second"] / base, 3)
    lines = ["| score | images/s (numpy engine, 1 thread, batch 256) | ratio to mse |", "|---|---:|---:|"]
    lines += [f"| {r['score']} | {r['images_per_second']:,} | {r['ratio_to_mse']:.3f} |" for r in rows]
    table = "\n".join(lines)
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    result = {
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "cpu_count": os.cpu_count(),
        "batch": BATCH,
        "seconds_per_score": args.seconds,
        "rows": rows,
    }
    (args.out / "score-cost.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "score-cost.md").write_text(f"# What each score costs the worker\n\n{table}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
