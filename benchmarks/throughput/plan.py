"""What a run does (the full and the quick plan) and the names it uses: paths, streams, groups."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CACHE = ROOT / "benchmarks" / ".cache"
RESULTS = ROOT / "benchmarks" / "results"
MNIST_TEST = ROOT / "data" / "mnist" / "t10k-images-idx3-ubyte.gz"
DIM = 784
GROUP = "bench"  # the workers' group; the bare loop and the naive baseline read through their own
BARE_GROUP, NAIVE_GROUP = "bare", "naive"
OUTPUT = "bench:anomalies"
STREAMS = {"uint8": "bench:uint8", "float32": "bench:float32", "json": "bench:json"}


@dataclass(frozen=True)
class Plan:
    """How much of everything a run does."""

    name: str
    entries: dict[str, int]  # pre-filled entries per payload dtype
    drains: tuple[tuple[str, int, int], ...]  # (dtype, batch size, entries drained)
    repeats: int  # drains (and bare passes) per configuration; the median is reported
    ceiling_seconds: float
    naive_messages: int
    paced_seconds: float
    fixed_rate: float
    flat_seconds: float  # long paced run for the memory trend (0: skipped)
    two_workers: bool
    tensorflow_drain: bool  # also drain uint8 batch 256 with ANOMALY_ENGINE=tensorflow
    shadow_drain: bool  # also drain uint8 batch 256 with a shadow model (ANOMALY_SHADOW_ARTIFACT)
    train_args: tuple[str, ...]  # how long the benchmark's models train (their weights barely matter)
    # Other detectors drained at uint8 batch 256 next to the default: (label, `train` flags).
    detectors: tuple[tuple[str, tuple[str, ...]], ...] = ()


# The main artifact is the default detector (`anomaly-trainer train` without flags); these are
# served too, so the cost of accuracy shows next to it (the Pareto table in docs/detection.md).
MOST_ACCURATE = (
    "most accurate (dense-512-128-32, mse+transforms, rotations)",
    ("--architecture", "dense-512-128-32", "--score", "mse+transforms", "--transforms", "rotations"),
)
MSE_ONLY = ("mse only (--preset notebook-3std, the default before)", ("--preset", "notebook-3std"))


FULL = Plan(
    name="full",
    entries={"uint8": 200_000, "float32": 60_000, "json": 20_000},
    drains=(
        ("uint8", 256, 200_000),
        ("uint8", 1024, 200_000),
        ("uint8", 32, 100_000),
        ("uint8", 1, 10_000),
        ("float32", 256, 60_000),
        ("json", 256, 20_000),
    ),
    repeats=3,
    ceiling_seconds=3.0,
    naive_messages=300,
    paced_seconds=20.0,
    fixed_rate=5000.0,
    flat_seconds=600.0,
    two_workers=True,
    tensorflow_drain=True,
    shadow_drain=True,
    train_args=("--epochs", "2", "--max-samples", "5000", "--transform-epochs", "1"),
    detectors=(MOST_ACCURATE, MSE_ONLY),
)
QUICK = Plan(
    name="quick",
    entries={"uint8": 20_000, "float32": 4_000, "json": 1_000},
    drains=(("uint8", 256, 20_000), ("json", 256, 1_000)),
    repeats=1,
    ceiling_seconds=0.5,
    naive_messages=30,
    paced_seconds=3.0,
    fixed_rate=5000.0,
    flat_seconds=0.0,
    two_workers=False,
    tensorflow_drain=False,
    shadow_drain=True,
    train_args=("--epochs", "1", "--max-samples", "2000", "--transform-epochs", "1"),
    detectors=(MOST_ACCURATE,),
)
