"""anomaly-trainer: argument parsing only; the work is in trainer.train / trainer.data."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from trainer.models import ARCHITECTURES, DEFAULT_ARCHITECTURE


def _classes(text: str) -> list[int]:
    try:
        values = sorted({int(v) for v in text.split(",") if v.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--classes takes integers like 1 or 0,1,2, found {text!r}"
        ) from None
    if not values:
        raise argparse.ArgumentTypeError("--classes needs at least one class")
    return values


def _positive(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, found {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The CLI's arguments."""
    parser = argparse.ArgumentParser(
        prog="anomaly-trainer",
        description="Train an autoencoder anomaly detector and write a versioned artifact.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    t = sub.add_parser(
        "train",
        help="train a model and write an artifact directory",
        description="Train on normal images, calibrate the threshold on held-out normal data, "
        "and write DIR/{model.keras,baseline.json,calibration_errors.npy,manifest.json,report.png}.",
    )
    t.add_argument(
        "--dataset",
        default="mnist",
        help="mnist, fashion-mnist, or a path to an N x D .npy file (default: mnist)",
    )
    t.add_argument(
        "--out", required=True, type=Path, help="artifact directory to write (replaced atomically)"
    )
    t.add_argument(
        "--data-dir",
        help="folder with the IDX .gz files; searched before $ANOMALY_DATA_DIR, the shipped data/, "
        "/usr/share/datasets, the Keras cache and finally the Keras download",
    )
    t.add_argument(
        "--classes",
        type=_classes,
        help="train only on these labels, e.g. 1 or 0,1,2 (default: all)",
    )
    t.add_argument(
        "--architecture",
        default=DEFAULT_ARCHITECTURE,
        choices=sorted(ARCHITECTURES),
        help=f"(default: {DEFAULT_ARCHITECTURE})",
    )
    t.add_argument(
        "--epochs",
        type=_positive,
        default=10,
        help="maximum epochs; early stopping on held-out loss (default: 10)",
    )
    t.add_argument("--batch-size", type=_positive, default=256, help="(default: 256)")
    t.add_argument("--learning-rate", type=float, default=1e-3, help="Adam learning rate (default: 0.001)")
    t.add_argument(
        "--threshold",
        default="mean+3std",
        help="threshold policy: mean+Kstd, Kmean, pNN or fpr=F, "
        "e.g. mean+3std (default), 2mean, p95, fpr=0.01",
    )
    t.add_argument(
        "--seed",
        type=int,
        default=0,
        help="makes the split and the training repeatable (default: 0)",
    )
    t.add_argument(
        "--max-samples",
        type=_positive,
        help="use at most this many normal training images (quick runs)",
    )
    t.add_argument(
        "--holdout-fraction",
        type=float,
        default=0.2,
        help="share of normal training images held out, half for validation "
        "and half for calibration (default: 0.2)",
    )
    t.add_argument(
        "--patience",
        type=_positive,
        default=3,
        help="early-stopping patience in epochs (default: 3)",
    )
    t.add_argument(
        "--preprocessing",
        choices=["unit", "standardize"],
        default="unit",
        help="unit: pixels in [0,1] as is (default); standardize: per-feature z-scores",
    )
    t.add_argument("--no-report", action="store_true", help="do not draw report.png")
    t.add_argument("--log-level", default=os.environ.get("ANOMALY_LOG_LEVEL", "INFO"))
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of anomaly-trainer."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
        stream=sys.stderr,
    )
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    from trainer.data import DatasetError, load_dataset
    from trainer.train import TrainConfig, train
    from worker.errors import ArtifactError, ThresholdPolicyError

    if args.command == "train":
        config = TrainConfig(
            out=args.out,
            dataset=args.dataset,
            data_dir=args.data_dir,
            classes=args.classes,
            architecture=args.architecture,
            epochs=args.epochs,
            batch_size=args.batch_size,
            learning_rate=args.learning_rate,
            threshold=args.threshold,
            seed=args.seed,
            holdout_fraction=args.holdout_fraction,
            max_samples=args.max_samples,
            patience=args.patience,
            preprocessing=args.preprocessing,
            report=not args.no_report,
        )
        try:
            dataset = load_dataset(args.dataset, args.data_dir)
            result = train(config, dataset)
        except (DatasetError, ThresholdPolicyError, ArtifactError, ValueError) as exc:
            print(f"anomaly-trainer: error: {exc}", file=sys.stderr)
            return 2
        b = result.baseline
        h = b.training.history
        print(
            f"trained {b.training.architecture} on {b.training.dataset} "
            f"(classes: {b.training.classes or 'all'}) "
            f"in {result.duration_seconds:.1f}s"
        )
        print(f"  epochs run:      {b.training.epochs_run} of {b.training.epochs_requested}")
        print(f"  final loss:      train {h['loss'][-1]:.5f}, held-out {h['val_loss'][-1]:.5f}")
        print(
            f"  held-out errors: mean {b.statistics.mean:.5f}, std {b.statistics.std:.5f}, "
            f"n {b.statistics.count}"
        )
        print(
            f"  threshold:       {b.threshold.policy} = {b.threshold.value:.5f} "
            f"(flags {b.threshold.expected_flag_rate:.2%} of held-out normal images)"
        )
        print(f"  model version:   {b.model_version}")
        print(f"  artifact:        {result.artifact}")
        return 0
    return 2  # pragma: no cover - argparse enforces the subcommand
