"""anomaly-trainer: argument parsing only; the work is in trainer.train / detector.datasets."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from detector.components.hidden_knn import DEFAULT_HIDDEN_KNN_K, DEFAULT_HIDDEN_KNN_PROTOTYPES
from detector.components.knn import DEFAULT_KNN_K, DEFAULT_KNN_REFERENCE_ROWS
from detector.components.orientation import DEFAULT_ORIENTATION_TRANSFORMS
from detector.components.transforms import TRANSFORM_SETS
from detector.datasets import Dataset
from detector.engines.tensorflow_import import import_keras_quietly
from detector.retune import MAX_FLAG_RATE_FACTOR
from detector.score import DEFAULT_SCORE, components_of
from runtime import logs
from runtime.cli import add_version_flag
from runtime.logs import LOG_FORMATS
from trainer.budget import DEFAULT_BATCH_SIZE, DEFAULT_EPOCHS, DEFAULT_MIN_STEPS
from trainer.models import ARCHITECTURES, DEFAULT_ARCHITECTURE
from trainer.presets import DEFAULT_THRESHOLD, PRESETS, resolve
from trainer.transforms import DEFAULT_TRANSFORM_EPOCHS


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


if TYPE_CHECKING:
    from trainer.benchmark import BenchmarkConfig
    from trainer.train import TrainConfig


def _positive(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, found {text}")
    return value


AUTO = "auto"


def _epochs(text: str) -> int | str:
    """A positive number of epochs, or auto (trainer.budget's default; kept as the word so that it
    wins over a preset's epochs, and turned into None when the config is built)."""
    if text.strip().lower() == AUTO:
        return AUTO
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer or auto, found {text}")
    return value


def _non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected 0 or a positive integer, found {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The CLI's arguments."""
    parser = argparse.ArgumentParser(
        prog="anomaly-trainer",
        description="Train an autoencoder anomaly detector and write a versioned artifact.",
    )
    add_version_flag(parser)
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
        "--preset",
        choices=sorted(PRESETS),
        help="a reference notebook's configuration; flags given as well win over it: "
        + "; ".join(f"{name}: {p.description}" for name, p in PRESETS.items())
        + " (default: none, the default detector: dense-64-16 trained with its orientation head, "
        f"score {DEFAULT_SCORE}, threshold {DEFAULT_THRESHOLD}, {DEFAULT_EPOCHS} epochs or "
        f"{DEFAULT_MIN_STEPS:,} steps, whichever is longer)",
    )
    t.add_argument(
        "--architecture",
        choices=sorted(ARCHITECTURES),
        help=f"(default: {DEFAULT_ARCHITECTURE})",
    )
    t.add_argument(
        "--epochs",
        type=_epochs,
        help="maximum epochs; early stopping on held-out loss (default: auto: "
        f"{DEFAULT_EPOCHS}, or as many as {DEFAULT_MIN_STEPS:,} steps take when that is more, "
        "with early stopping only after those steps)",
    )
    t.add_argument(
        "--min-steps",
        type=_non_negative,
        help="early stopping (and its choice of the best epoch) looks only at the epochs after this "
        "many optimizer steps (batches); with --epochs auto the epochs are raised to fit them: one "
        "MNIST class (17-22 steps an epoch) then trains 91-118 epochs, keeping the last weights "
        f"(default: {DEFAULT_MIN_STEPS} with --epochs auto, 0 with an explicit count or a preset)",
    )
    t.add_argument(
        "--batch-size", type=_positive, default=DEFAULT_BATCH_SIZE, help=f"(default: {DEFAULT_BATCH_SIZE})"
    )
    t.add_argument("--learning-rate", type=float, default=1e-3, help="Adam learning rate (default: 0.001)")
    t.add_argument(
        "--threshold",
        help="threshold policy: mean+Kstd, Kmean, pNN or fpr=F, "
        f"e.g. mean+3std, 2mean, p95, fpr=0.01 (default: {DEFAULT_THRESHOLD})",
    )
    t.add_argument(
        "--score",
        type=_score,
        help=f"what the threshold applies to and the worker computes (default: {DEFAULT_SCORE}): "
        "mse, nmse (mse "
        "relative to the image's ink), top-k (mean of the 5%% largest pixel errors), mahalanobis "
        "(distance of the latent code to normal codes), transforms (a self-supervised classifier's "
        "doubt about which rotation/flip/shift was applied; square images), orientation (-log "
        "p(identity | x) from a head trained with the autoencoder on its first layer; dense "
        "architectures, square images), knn (cosine distance to the nearest normal training "
        "images), hidden-knn (cosine distance to the nearest normal prototypes in the encoder's "
        "first layer), hidden-mahalanobis (distance of that layer to a Gaussian of normal images' "
        "outputs), or up to four joined by '+', each standardised on held-out normal images and "
        "summed, e.g. mse+orientation+hidden-knn+hidden-mahalanobis or mse+transforms+knn "
        "(docs/detection.md); `evaluate` compares them",
    )
    t.add_argument(
        "--transforms",
        choices=list(TRANSFORM_SETS),
        default="geometric",
        help="the transforms score's set: rotations (4), dihedral (8: rotations x mirror) or "
        "geometric (72: flips x shifts x rotations, the stronger and 18 times costlier to score "
        "than rotations) (default: geometric)",
    )
    t.add_argument(
        "--orientation-transforms",
        choices=list(TRANSFORM_SETS),
        default=DEFAULT_ORIENTATION_TRANSFORMS,
        help="the orientation score's set, which its head learns with the autoencoder: geometric "
        "(72: rotations x mirror x 4-pixel shifts, the default), dihedral (8: rotations x mirror, "
        "the default before 2026-11-30) or rotations (4); scoring costs the same for each (only "
        "the image as given is classified)",
    )
    t.add_argument(
        "--knn-k",
        type=_positive,
        default=DEFAULT_KNN_K,
        help=f"knn: how many nearest normal images are averaged (default: {DEFAULT_KNN_K})",
    )
    t.add_argument(
        "--knn-reference",
        type=_positive,
        default=DEFAULT_KNN_REFERENCE_ROWS,
        help="knn: at most this many normal training images are kept in the artifact; each costs "
        f"the worker D multiply-adds per scored image of D pixels (default: {DEFAULT_KNN_REFERENCE_ROWS})",
    )
    t.add_argument(
        "--hidden-knn-k",
        type=_positive,
        default=DEFAULT_HIDDEN_KNN_K,
        help="hidden-knn: how many nearest normal prototypes are averaged; 1 takes one argmax pass per "
        f"image instead of {DEFAULT_HIDDEN_KNN_K} argmax passes (default: {DEFAULT_HIDDEN_KNN_K})",
    )
    t.add_argument(
        "--hidden-knn-prototypes",
        type=_positive,
        default=DEFAULT_HIDDEN_KNN_PROTOTYPES,
        help="hidden-knn: k-means centres of the first encoder layer kept in the artifact; each "
        "costs the worker one multiply-add per layer value per scored image "
        f"(default: {DEFAULT_HIDDEN_KNN_PROTOTYPES})",
    )
    t.add_argument(
        "--transform-epochs",
        type=_positive,
        default=DEFAULT_TRANSFORM_EPOCHS,
        help=f"maximum epochs of the transformation classifier (default: {DEFAULT_TRANSFORM_EPOCHS})",
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
        help="unit: pixels in [0,1] as is (default); standardize: per-feature z-scores",
    )
    t.add_argument("--no-report", action="store_true", help="do not draw report.png")
    t.add_argument("--log-level", default=os.environ.get("ANOMALY_LOG_LEVEL", "INFO"))

    e = sub.add_parser(
        "evaluate",
        help="AUROC, average precision and flag rates of an artifact on a test set",
        description="Score the test split: normal-class images against unseen classes (when the "
        "artifact was trained with --classes) and against the normal images rotated 90 degrees, "
        "with every score the artifact's networks allow (mse, nmse, top-k, mahalanobis, knn, "
        "hidden-knn, hidden-mahalanobis, their combinations, and transforms or orientation when the "
        "artifact has the classifier or the head; the knn references, hidden-knn prototypes and "
        "hidden-mahalanobis Gaussian are the artifact's own, or fitted on the training split as the "
        "trainer fits them). Prints a table and writes JSON.",
    )
    e.add_argument("artifact", type=Path, help="artifact directory written by `anomaly-trainer train`")
    _add_dataset_args(e, default=None)
    e.add_argument(
        "--json",
        type=Path,
        help="where to write the evaluation (default: ./evaluation-<model_version>.json; "
        "not inside the artifact, whose files are checksummed)",
    )
    e.add_argument("--top-k", type=_percent, default=5.0, help="top-k%% pixel error score's k (default: 5)")
    e.add_argument("--log-level", default=os.environ.get("ANOMALY_LOG_LEVEL", "WARNING"))

    r = sub.add_parser(
        "report",
        help="draw report.png and report.html for an artifact",
        description="Re-draw an artifact's report (loss curves, reconstructions, error histograms, "
        "most and least anomalous test images, the evaluation table) into a folder beside it.",
    )
    r.add_argument("artifact", type=Path, help="artifact directory written by `anomaly-trainer train`")
    _add_dataset_args(r, default=None)
    r.add_argument("--out", type=Path, help="output folder (default: ARTIFACT-report next to the artifact)")
    r.add_argument("--log-level", default=os.environ.get("ANOMALY_LOG_LEVEL", "WARNING"))

    b = sub.add_parser(
        "benchmark",
        help="the one-class benchmark: per-class AUROC table",
        description="Train on one class's training images, score the whole test set (the other "
        "classes are anomalies), for each class; print the AUROC table and write JSON and markdown. "
        "The defaults train the default detector, as `train` does: the dense-64-16 autoencoder "
        "with the geometric orientation head, its epoch budget and batch size, and no "
        "transformation classifier.",
    )
    _add_dataset_args(b, default="mnist")
    b.add_argument(
        "--one-class",
        action="store_true",
        required=True,
        help="the one-class protocol (the only protocol so far; required to be explicit)",
    )
    b.add_argument(
        "--architecture",
        default=DEFAULT_ARCHITECTURE,
        choices=sorted(ARCHITECTURES),
        help=f"(default: {DEFAULT_ARCHITECTURE}, as `train`)",
    )
    b.add_argument(
        "--epochs",
        type=_epochs,
        default=AUTO,
        help=f"maximum epochs per class; auto: {DEFAULT_EPOCHS}, or as many as --min-steps takes "
        "when that is more, as `train` does (default: auto)",
    )
    b.add_argument(
        "--min-steps",
        type=_non_negative,
        help="early stopping looks only at the epochs after this many steps (default: as `train`, "
        f"{DEFAULT_MIN_STEPS} with --epochs auto, 0 with a count)",
    )
    b.add_argument("--classes", type=_classes, help="normal classes to run (default: 0,...,9)")
    b.add_argument("--max-samples", type=_positive, help="at most this many training images per class")
    b.add_argument(
        "--batch-size",
        type=_positive,
        default=DEFAULT_BATCH_SIZE,
        help=f"(default: {DEFAULT_BATCH_SIZE}, as `train`)",
    )
    b.add_argument("--learning-rate", type=float, default=1e-3, help="(default: 0.001)")
    b.add_argument("--patience", type=_positive, default=3, help="early-stopping patience (default: 3)")
    b.add_argument("--seed", type=int, default=0, help="(default: 0)")
    b.add_argument("--top-k", type=_percent, default=5.0, help="top-k%% pixel error score's k (default: 5)")
    b.add_argument(
        "--transforms",
        choices=[*TRANSFORM_SETS, "none"],
        default="none",
        help="also train the self-supervised transformation classifier on this set and compare the "
        "scores with transforms (transforms, mse+transforms, nmse+transforms, mse+transforms+knn, "
        "nmse+transforms+knn; default: none, as the default detector has no classifier)",
    )
    b.add_argument(
        "--transform-epochs",
        type=_positive,
        default=DEFAULT_TRANSFORM_EPOCHS,
        help=f"maximum epochs of the transformation classifier (default: {DEFAULT_TRANSFORM_EPOCHS})",
    )
    b.add_argument(
        "--orientation",
        choices=[*TRANSFORM_SETS, "none"],
        default=DEFAULT_ORIENTATION_TRANSFORMS,
        help="train each autoencoder with the orientation head on this set and compare the "
        "orientation scores (orientation, mse+orientation, mse+nmse+orientation, "
        f"mse+orientation+hidden-knn, {DEFAULT_SCORE}; default: {DEFAULT_ORIENTATION_TRANSFORMS}, as "
        "the default "
        "detector; none: the autoencoder alone)",
    )
    b.add_argument(
        "--out-dir",
        type=Path,
        help="folder for the JSON and markdown results (default: benchmarks/results/ of the project)",
    )
    b.add_argument("--log-level", default=os.environ.get("ANOMALY_LOG_LEVEL", "WARNING"))
    _add_retune_parser(sub)
    return parser


def _add_retune_parser(sub: Any) -> None:
    rt = sub.add_parser(
        "retune",
        help="a new artifact version with a threshold chosen from operators' labels",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=f"""\
Choose the threshold that meets the target from operators' labels (the labels stream, which
anomaly-viewer writes) and the held-out normal errors, print precision and recall before and
after, and write the same model with that threshold to --out (the served artifact itself is
fine: it is replaced atomically and workers serving it reload it).

Labels are checked: a label counts only when its source_id is an alert of the artifact's model
version in the output stream of any shard (or, with ANOMALY_SCORES_STREAM, an entry with
flagged=1 there), and that alert's score is used, not the label's. The others are counted by
reason (not an alert, scored normal, of another model version, in several shards, invalid).

Bounds: it prints the change (threshold, and share of the held-out normal images flagged, before
-> after) and refuses (exit 2, nothing written) a threshold that is not finite, lies outside the
range of the held-out errors and the verified alerts' scores, flags none of the held-out normal
images, or changes that share more than {MAX_FLAG_RATE_FACTOR}x either way; --force writes it
anyway, unless it is not finite.

Redis and the streams come from the settings every program reads: ANOMALY_REDIS_URL,
ANOMALY_REDIS_PASSWORD_FILE, ANOMALY_REDIS_CLUSTER, ANOMALY_REDIS_SENTINELS (with
_SENTINEL_SERVICE, _SENTINEL_PASSWORD[_FILE]), ANOMALY_OUTPUT_STREAM, ANOMALY_SCORES_STREAM,
ANOMALY_LABELS_STREAM and ANOMALY_SHARDS; an unknown ANOMALY_* variable is refused.

Changed (the CLI contract, on purpose): --labels is optional and overrides ANOMALY_REDIS_URL
(it was required); labels without a score are used; labels of entries that were not alerts of
this model are not; a threshold out of bounds needs --force.""",
    )
    rt.add_argument("artifact", type=Path, help="artifact directory whose alerts were labelled")
    rt.add_argument(
        "--labels",
        metavar="REDIS_URL",
        help="Redis holding the labels stream and the output streams; overrides ANOMALY_REDIS_URL "
        "(optional: it was required before)",
    )
    rt.add_argument(
        "--labels-stream", help="labels stream; overrides ANOMALY_LABELS_STREAM (default: anomaly-labels)"
    )
    target = rt.add_mutually_exclusive_group(required=True)
    target.add_argument(
        "--target-precision", type=float, metavar="P", help="lowest threshold with precision >= P"
    )
    target.add_argument("--target-fpr", type=float, metavar="F", help="lowest threshold with FPR <= F")
    rt.add_argument(
        "--out", required=True, type=Path, help="artifact directory to write (replaced atomically)"
    )
    rt.add_argument(
        "--force",
        action="store_true",
        help="write a threshold that breaks the range or flag-rate bound (printed either way); a "
        "threshold that is not finite is never written",
    )
    rt.add_argument("--log-level", default=os.environ.get("ANOMALY_LOG_LEVEL", "WARNING"))


def _score(text: str) -> str:
    try:
        components_of(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def _percent(text: str) -> float:
    value = float(text)
    if not 0 < value <= 100:
        raise argparse.ArgumentTypeError(f"expected a percentage in (0, 100], found {text}")
    return value


def _add_dataset_args(parser: argparse.ArgumentParser, default: str | None) -> None:
    parser.add_argument(
        "--dataset",
        default=default,
        help="mnist or fashion-mnist"
        + (f" (default: {default})" if default else " (default: the dataset the artifact was trained on)"),
    )
    parser.add_argument("--data-dir", help="folder with the IDX .gz files (see `train --help`)")


def main(argv: list[str] | None = None) -> int:
    """Entry point of anomaly-trainer."""
    args = build_parser().parse_args(argv)
    log_format = os.environ.get("ANOMALY_LOG_FORMAT", "logfmt")
    if log_format not in LOG_FORMATS:
        print(
            "anomaly-trainer: invalid setting ANOMALY_LOG_FORMAT: expected logfmt or json, "
            f"found {log_format!r}",
            file=sys.stderr,
        )
        return 2
    logs.configure(args.log_level.upper(), log_format)
    if args.command == "retune":  # no Keras: the model is copied, not run
        return _retune(args)
    import_keras_quietly()  # every other command trains or runs a Keras model
    from detector.datasets import DatasetError, load_dataset
    from detector.errors import ArtifactError, ThresholdPolicyError
    from trainer.train import train

    if args.command == "train":
        config = train_config(args)
        try:
            dataset = load_dataset(args.dataset, args.data_dir)
            result = train(config, dataset)
        except (DatasetError, ThresholdPolicyError, ArtifactError, ValueError) as exc:
            print(f"anomaly-trainer: error: {exc}", file=sys.stderr)
            return 2
        b = result.baseline
        h = b.training.history
        held_out = f"held-out {b.score}:"
        print(
            f"trained {b.training.architecture} on {b.training.dataset} "
            f"(classes: {b.training.classes or 'all'}) "
            f"in {result.duration_seconds:.1f}s"
        )
        print(f"  epochs run:      {b.training.epochs_run} of {b.training.epochs_requested}")
        print(f"  final loss:      train {h['loss'][-1]:.5f}, held-out {h['val_loss'][-1]:.5f}")
        print(
            f"  {held_out:<{max(17, len(held_out) + 1)}}mean {b.statistics.mean:.5f}, "
            f"std {b.statistics.std:.5f}, n {b.statistics.count}"
        )
        print(
            f"  threshold:       {b.threshold.policy} = {b.threshold.value:.5f} "
            f"(flags {b.threshold.expected_flag_rate:.2%} of held-out normal images)"
        )
        print(f"  model version:   {b.model_version}")
        print(f"  artifact:        {result.artifact}")
        return 0
    try:
        if args.command == "evaluate":
            return _evaluate(args)
        if args.command == "report":
            return _report(args)
        if args.command == "benchmark":
            return _benchmark(args)
    except (DatasetError, ThresholdPolicyError, ArtifactError, ValueError) as exc:
        print(f"anomaly-trainer: error: {exc}", file=sys.stderr)
        return 2
    return 2  # pragma: no cover - argparse enforces the subcommand


def _artifact_dataset(args: argparse.Namespace) -> Dataset:
    """The dataset named on the command line, else the one in the artifact's baseline.json."""
    from detector.artifact import load_artifact
    from detector.datasets import load_dataset

    name = args.dataset or load_artifact(args.artifact).baseline.training.dataset
    return load_dataset(name, args.data_dir)


def _evaluate(args: argparse.Namespace) -> int:
    from trainer.evaluate import evaluate_artifact

    dataset = _artifact_dataset(args)
    evaluation, *_ = evaluate_artifact(args.artifact, dataset, args.top_k)
    out = args.json or Path(f"evaluation-{evaluation.model_version}.json")
    evaluation.write_json(out)
    print(
        f"evaluation of {evaluation.architecture} model {evaluation.model_version} on {dataset.name} "
        f"test (normal classes: {evaluation.classes or 'all'}); threshold {evaluation.threshold_policy}"
    )
    print(evaluation.table())
    print(
        f"top-k = mean of the {evaluation.top_k_percent:g}% largest squared pixel errors; "
        f"mahalanobis fitted on the {evaluation.latent_fit}; their thresholds apply "
        f"{evaluation.threshold_policy} to the calibration split"
    )
    print(f"written: {out}")
    return 0


def _report(args: argparse.Namespace) -> int:
    from trainer.report import report_from_artifact

    dataset = _artifact_dataset(args)
    out = args.out or args.artifact.resolve().with_name(args.artifact.resolve().name + "-report")
    paths = report_from_artifact(args.artifact, dataset, out)
    for path in paths:
        print(f"written: {path}")
    return 0


def train_config(args: argparse.Namespace) -> TrainConfig:
    """The TrainConfig of parsed `train` arguments: flags given win over the preset, which wins over
    the defaults; `--epochs auto` wins over a preset's epochs too."""
    from trainer.train import TrainConfig

    chosen = resolve(
        args.preset,
        {
            "architecture": args.architecture,
            "epochs": args.epochs,
            "min_steps": args.min_steps,
            "threshold": args.threshold,
            "score": args.score,
            "preprocessing": args.preprocessing,
        },
        TrainConfig,
    )
    if chosen.get("epochs") == AUTO:
        chosen["epochs"] = None
    return TrainConfig(
        out=args.out,
        dataset=args.dataset,
        data_dir=args.data_dir,
        classes=args.classes,
        batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        transforms=args.transforms,
        orientation_transforms=args.orientation_transforms,
        transform_epochs=args.transform_epochs,
        knn_k=args.knn_k,
        knn_reference_rows=args.knn_reference,
        hidden_knn_k=args.hidden_knn_k,
        hidden_knn_prototypes=args.hidden_knn_prototypes,
        seed=args.seed,
        holdout_fraction=args.holdout_fraction,
        max_samples=args.max_samples,
        patience=args.patience,
        report=not args.no_report,
        **chosen,
    )


def benchmark_config(args: argparse.Namespace) -> BenchmarkConfig:
    """The BenchmarkConfig of parsed `benchmark` arguments."""
    from trainer.benchmark import BenchmarkConfig

    return BenchmarkConfig(
        dataset=args.dataset,
        architecture=args.architecture,
        classes=args.classes or list(range(10)),
        epochs=None if args.epochs == AUTO else args.epochs,
        min_steps=args.min_steps,
        batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        patience=args.patience,
        seed=args.seed,
        max_samples=args.max_samples,
        top_k_percent=args.top_k,
        transforms=None if args.transforms == "none" else args.transforms,
        transform_epochs=args.transform_epochs,
        orientation=None if args.orientation == "none" else args.orientation,
    )


def _benchmark(args: argparse.Namespace) -> int:
    from detector.datasets import load_dataset
    from trainer.benchmark import RESULTS_DIR, ClassResult, epochs_text, run_benchmark, write_results

    config = benchmark_config(args)
    dataset = load_dataset(args.dataset, args.data_dir)

    def progress(r: ClassResult) -> None:
        cells = "  ".join(f"{k} {v:.4f}" for k, v in r.auroc.items())
        print(f"class {r.normal_class}: AUROC {cells}  ({r.epochs_run} epochs, {r.seconds:.0f}s)", flush=True)

    print(
        f"one-class benchmark: {config.dataset}, {config.architecture}, "
        f"{epochs_text(config.epochs, config.min_steps).lower()}, "
        f"classes {','.join(map(str, config.classes))}",
        flush=True,
    )
    result = run_benchmark(config, dataset, on_class=progress)
    print()
    print(result.table())
    json_path, md_path = write_results(result, args.out_dir or RESULTS_DIR)
    print(f"wall time {result.wall_seconds:.0f}s; written: {json_path}, {md_path}")
    return 0


def _retune(args: argparse.Namespace) -> int:
    from detector.artifact import load_artifact
    from detector.errors import AnomalyScorerError
    from detector.retune import BOUND_FINITE, Target
    from runtime.cli import SettingsRefused, load_settings, refuse
    from runtime.settings import StreamSettings
    from trainer.retune import (
        connect_and_verify_labels,
        labels_summary,
        plan_retune,
        plan_summary,
        write_retuned,
    )

    prog = "anomaly-trainer retune"
    try:
        target = (
            Target("precision", args.target_precision)
            if args.target_precision is not None
            else Target("fpr", args.target_fpr)
        )
        # --labels and --labels-stream override ANOMALY_REDIS_URL and ANOMALY_LABELS_STREAM.
        flags = argparse.Namespace(redis_url=args.labels, labels_stream=args.labels_stream)
        settings = load_settings(StreamSettings, flags)
        artifact = load_artifact(args.artifact)
        version = artifact.baseline.model_version
        read = connect_and_verify_labels(settings, version)
        print("\n".join(labels_summary(read, version, settings.labels_stream)), flush=True)
        plan = plan_retune(artifact, read.verified, target)
    except SettingsRefused as exc:
        return refuse(prog, str(exc))
    except (AnomalyScorerError, ValueError) as exc:
        return refuse(prog, f"error: {exc}")
    print("\n".join(plan_summary(plan)), flush=True)
    if plan.violations:
        messages = [v.message for v in plan.violations]
        if not args.force or any(v.bound == BOUND_FINITE for v in plan.violations):
            hint = "" if args.force else "; give --force to write it anyway"
            return refuse(prog, "\n".join(["refused, nothing written:", *messages]) + hint)
        print("\n".join(f"{prog}: --force: written past {m}" for m in messages), file=sys.stderr)
    try:
        written = write_retuned(
            plan,
            args.out,
            read,
            labels_stream=settings.labels_stream,
            redis_url=settings.redis_url.get_secret_value(),
        )
    except (AnomalyScorerError, OSError) as exc:
        return refuse(prog, f"error: {exc}")
    print(f"artifact: {written}")
    return 0
