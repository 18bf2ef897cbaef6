"""anomaly-compare: score the same images with two artifacts and show where their decisions differ.

The promotion check for a shadow (candidate) model: the images are the most recent entries of the
input stream, of every shard (ANOMALY_SHARDS), read with XREVRANGE (no consumer group, nothing
acknowledged or changed), or an `.npy` file of images. Redis is reached like every program reaches
it: the ANOMALY_* settings (one node, Cluster or Sentinel, a password file), the flags overriding
them. Each artifact is loaded as a worker loads it (verified, probed) and decides with its own
threshold policy, or the one given.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from contract.codec import Entry, decode_batch, default_max_payload_bytes
from contract.shards import newest_across_shards
from detector.errors import AnomalyScorerError
from detector.loading import load_scorer
from runtime.cli import SettingsRefused, add_settings_flags, add_version_flag, load_settings, refuse
from runtime.connection import make_redis
from runtime.settings import StreamSettings
from worker.scoring import DecisionRule

PROG = "anomaly-compare"
EXIT_ERROR = 2
# The settings that say where the input entries are; the others (output, labels, ...) are not read.
CONNECTION_FIELDS = (
    "redis_cluster",
    "redis_sentinels",
    "redis_sentinel_service",
    "redis_sentinel_password_file",
    "redis_password_file",
    "shards",
)


class StreamUnreadable(AnomalyScorerError):
    """Redis refused or failed the read of the input streams; the message names the streams and the
    URL (without secrets) and the error."""


@dataclass(frozen=True)
class Side:
    """One artifact's result on the compared images."""

    artifact: str
    model_version: str
    threshold_policy: str
    threshold: float
    flagged: int
    flag_rate: float


@dataclass(frozen=True)
class Comparison:
    """Two artifacts' decisions on the same images."""

    images: int
    a: Side
    b: Side
    agreement: float
    flagged_by_both: int
    only_a: int
    only_b: int
    score_rank_correlation: float  # Spearman's rho of the two scores


def rank_correlation(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman's rho (ties broken by order: scores are continuous); NaN for fewer than 2 rows."""
    if x.size < 2:
        return float("nan")
    rx, ry = np.argsort(np.argsort(x)), np.argsort(np.argsort(y))
    return float(np.corrcoef(rx, ry)[0, 1])


def compare_decisions(
    a: tuple[str, str, DecisionRule, np.ndarray], b: tuple[str, str, DecisionRule, np.ndarray]
) -> Comparison:
    """Pure: (artifact, model version, rule, scores) of each side -> the comparison."""
    flags = []
    sides = []
    for artifact, version, rule, scores in (a, b):
        flagged = rule.decide(scores).flagged
        flags.append(flagged)
        n = int(flagged.size)
        count = int(np.count_nonzero(flagged))
        sides.append(Side(artifact, version, rule.policy, rule.threshold, count, count / n if n else 0.0))
    fa, fb = flags
    n = int(fa.size)
    return Comparison(
        images=n,
        a=sides[0],
        b=sides[1],
        agreement=float(np.mean(fa == fb)) if n else float("nan"),
        flagged_by_both=int(np.count_nonzero(fa & fb)),
        only_a=int(np.count_nonzero(fa & ~fb)),
        only_b=int(np.count_nonzero(~fa & fb)),
        score_rank_correlation=rank_correlation(np.asarray(a[3]), np.asarray(b[3])),
    )


def format_comparison(c: Comparison) -> str:
    """The comparison as a small table for people."""
    rows = [
        ("", "A", "B"),
        ("artifact", c.a.artifact, c.b.artifact),
        ("model_version", c.a.model_version, c.b.model_version),
        (
            "threshold",
            f"{c.a.threshold_policy} = {c.a.threshold:.6g}",
            f"{c.b.threshold_policy} = {c.b.threshold:.6g}",
        ),
        ("flagged", f"{c.a.flagged} ({c.a.flag_rate:.2%})", f"{c.b.flagged} ({c.b.flag_rate:.2%})"),
    ]
    width = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = ["  ".join(cell.ljust(width[i]) for i, cell in enumerate(row)).rstrip() for row in rows]
    lines += [
        f"images compared:      {c.images}",
        f"same decision:        {c.agreement:.2%}",
        f"flagged by both:      {c.flagged_by_both}",
        f"flagged by A only:    {c.only_a}",
        f"flagged by B only:    {c.only_b}",
        f"score rank correlation (Spearman): {c.score_rank_correlation:.4f}",
    ]
    return "\n".join(lines)


def recent_entries(client: Any, streams: list[str], count: int) -> list[Entry]:
    """The newest `count` entries of `streams` (the input stream of each shard) together, oldest
    first, read in one round trip. Read-only: XREVRANGE, no consumer group."""
    pipe = client.pipeline(transaction=False)
    for stream in streams:
        pipe.xrevrange(stream, "+", "-", count=count)
    newest = newest_across_shards([reply or [] for reply in pipe.execute()], count)
    return [(entry_id, fields or {}) for _, entry_id, fields in reversed(newest)]


def read_recent_entries(settings: StreamSettings, count: int) -> list[Entry]:
    """`recent_entries` of every shard's input stream, through the client every program uses
    (runtime.connection); a Redis error becomes StreamUnreadable."""
    import redis
    from redis.exceptions import RedisClusterException

    streams = settings.every_shard(settings.input_stream)
    try:
        client = make_redis(settings, PROG)
        try:
            return recent_entries(client, streams, count)
        finally:
            client.close()
    except (redis.RedisError, RedisClusterException, OSError) as exc:
        where = f"{', '.join(streams)} from {settings.redacted_redis_url()}"
        raise StreamUnreadable(f"cannot read the newest entries of {where}: {exc}") from exc


def decode_entries(entries: list[Entry], dim: int, uint8_scale: float) -> tuple[np.ndarray, int]:
    """Entries decoded as a worker decodes them: the images, and how many entries were rejected."""
    decoded = decode_batch(entries, dim, default_max_payload_bytes(dim), uint8_scale)
    return decoded.images, len(decoded.rejected)


def build_parser() -> argparse.ArgumentParser:
    """The CLI's arguments."""
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Score the same images with two artifacts (A: the served model, B: a candidate) and "
        "show flag rates, agreement and disagreements both ways. Images: the newest entries of the "
        "input stream, of every shard (read-only), or an .npy file. Redis and the streams come from "
        "the ANOMALY_* variables every program reads (ANOMALY_REDIS_URL, ANOMALY_INPUT_STREAM, "
        "ANOMALY_SHARDS, ANOMALY_REDIS_PASSWORD_FILE, Cluster, Sentinels); the flags override them.",
    )
    add_version_flag(p)
    p.add_argument("artifact_a", type=Path, help="artifact A (usually the one being served)")
    p.add_argument("artifact_b", type=Path, help="artifact B (the candidate)")
    source = p.add_mutually_exclusive_group()
    source.add_argument(
        "--redis-url",
        dest="redis_url",
        metavar="REDIS_URL",
        help="the Redis to read the newest --count input entries from [env ANOMALY_REDIS_URL, "
        "default: 'redis://localhost:6379/0']",
    )
    source.add_argument(
        "--npy", type=Path, help="an N x D .npy of images (uint8, or floats in [0, 1]) instead of Redis"
    )
    p.add_argument(
        "--stream",
        "--input-stream",
        dest="input_stream",
        metavar="STREAM",
        help="input stream; with ANOMALY_SHARDS above 1, that of every shard (images:{0}, ...) "
        "[env ANOMALY_INPUT_STREAM, default: 'images']",
    )
    add_settings_flags(p, StreamSettings, exclude=set(StreamSettings.model_fields) - set(CONNECTION_FIELDS))
    p.add_argument(
        "--count",
        type=int,
        default=10_000,
        help="newest entries to compare on, of all shards together (default: %(default)s)",
    )
    p.add_argument("--threshold-a", default="", help="threshold policy for A instead of its own, e.g. p99")
    p.add_argument("--threshold-b", default="", help="threshold policy for B instead of its own")
    p.add_argument(
        "--engine", choices=["auto", "numpy", "tensorflow"], default="auto", help="(default: auto)"
    )
    p.add_argument("--json", action="store_true", help="print the comparison as JSON")
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of anomaly-compare."""
    args = build_parser().parse_args(argv)
    if args.count < 1:
        print("anomaly-compare: error: --count must be at least 1", file=sys.stderr)
        return EXIT_ERROR
    settings: StreamSettings | None = None  # None: images from --npy
    if args.npy is None:
        try:
            settings = load_settings(StreamSettings, args)
        except SettingsRefused as exc:
            return refuse(PROG, str(exc))
    try:
        loaded = [load_scorer(path, args.engine) for path in (args.artifact_a, args.artifact_b)]
        (art_a, scorer_a), (art_b, scorer_b) = loaded
        dims = {art.baseline.input_dim for art, _ in loaded}
        scales = {art.baseline.preprocessing.uint8_scale for art, _ in loaded}
        if len(dims) != 1 or len(scales) != 1:
            raise AnomalyScorerError(
                f"the artifacts take different images: input_dim {sorted(dims)}, uint8 scale {sorted(scales)}"
            )
        (dim,), (scale,) = dims, scales
        rules = [
            DecisionRule.from_artifact(art, policy or None)
            for art, policy in ((art_a, args.threshold_a), (art_b, args.threshold_b))
        ]
        rejected = 0
        if settings is None:
            raw = np.load(args.npy, allow_pickle=False)
            images = (raw * scale if raw.dtype == np.uint8 else raw).astype(np.float32).reshape(len(raw), -1)
            if images.shape[1] != dim:
                raise AnomalyScorerError(
                    f"{args.npy} has {images.shape[1]} features per image, expected {dim}"
                )
        else:
            images, rejected = decode_entries(read_recent_entries(settings, args.count), dim, scale)
    except (AnomalyScorerError, OSError, ValueError) as exc:
        print(f"anomaly-compare: {exc}", file=sys.stderr)
        return EXIT_ERROR
    if not len(images):
        print("anomaly-compare: no scorable images to compare on", file=sys.stderr)
        return EXIT_ERROR
    comparison = compare_decisions(
        (str(args.artifact_a), scorer_a.model_version, rules[0], scorer_a.score_batch(images)),
        (str(args.artifact_b), scorer_b.model_version, rules[1], scorer_b.score_batch(images)),
    )
    if args.json:
        print(json.dumps({**asdict(comparison), "rejected_entries": rejected}, indent=2))
    else:
        if rejected:
            print(f"({rejected} entries could not be decoded and were left out)")
        print(format_comparison(comparison))
    return 0
