"""anomaly-trainer: argument parsing only; the work is in trainer.train, trainer.evaluate,
trainer.report, trainer.benchmark and trainer.retune.

A detector's flags are made from its configuration (`trainer.config.DetectorConfig`) and the
score components' options (the registry), by `trainer.flags`: one flag a field, help and bounds
from the field.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from detector.components import REGISTRY
from detector.components.orientation import OrientationOptions
from detector.components.transforms import TRANSFORM_SETS
from detector.datasets import Dataset
from detector.engines.tensorflow_import import import_keras_quietly
from detector.retune import MAX_FLAG_RATE_FACTOR
from detector.score import ScoreOptions, components_of, option_fields
from runtime import logs
from runtime.cli import add_version_flag
from runtime.logs import LOG_FORMATS
from trainer.config import DetectorConfig, flag_fields, parse_classes
from trainer.flags import add_field_flags, given
from trainer.presets import PRESETS, resolve

if TYPE_CHECKING:
    from trainer.benchmark import BenchmarkRun

# What the one-class benchmark sets its own way: the classes it runs, and which networks it trains
# (--transforms, --orientation); its detector has no threshold to calibrate.
BENCHMARK_OWN = ("classes", "score", "threshold", "transforms", "orientation_transforms")


def _classes(text: str) -> list[int]:
    try:
        return parse_classes(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _fitted_without_networks() -> dict[str, Any]:
    """The option flags of the components `evaluate` and `report` can fit (those needing no network)."""
    fittable = {name for name, kind in REGISTRY.items() if kind.network(kind.options()) is None}
    return {field: info for field, (owner, info) in option_fields().items() if owner in fittable}


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
        "--preset",
        choices=sorted(PRESETS),
        help="a reference notebook's configuration, as the flags it stands for; flags given as well "
        "win over it: "
        + "; ".join(f"{name}: {' '.join(config.flags())}" for name, config in PRESETS.items())
        + " (default: none, the default detector)",
    )
    add_field_flags(t, flag_fields())
    t.add_argument(
        "--report",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="draw report.png beside the artifact (--no-report: skip it)",
    )
    t.add_argument("--log-level", default=os.environ.get("ANOMALY_LOG_LEVEL", "INFO"))

    e = sub.add_parser(
        "evaluate",
        help="AUROC, average precision and flag rates of an artifact on a test set",
        description="Score the test split: normal-class images against unseen classes (when the "
        "artifact was trained with --classes) and against the normal images rotated 90 degrees, "
        "with the artifact's own score as the worker computes it and every other compared score its "
        "networks allow (the components it lacks fitted on its training splits as the trainer fits "
        "them, with the options below). Prints a table and writes JSON.",
    )
    e.add_argument("artifact", type=Path, help="artifact directory written by `anomaly-trainer train`")
    _add_dataset_args(e, default=None)
    e.add_argument(
        "--json",
        type=Path,
        help="where to write the evaluation (default: ./evaluation-<model_version>.json; "
        "not inside the artifact, whose files are checksummed)",
    )
    add_field_flags(e, _fitted_without_networks())
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
    add_field_flags(r, _fitted_without_networks())
    r.add_argument("--log-level", default=os.environ.get("ANOMALY_LOG_LEVEL", "WARNING"))

    b = sub.add_parser(
        "benchmark",
        help="the one-class benchmark: per-class AUROC table",
        description="Train on one class's training images, score the whole test set (the other "
        "classes are anomalies), for each class; print the AUROC table and write JSON and markdown. "
        "Each class trains the detector `train` would (the flags below are train's), through the same "
        "pipeline; by default the default detector: the dense-64-16 autoencoder with the geometric "
        "orientation head, its epoch budget and batch size, and no transformation classifier.",
    )
    _add_dataset_args(b, default="mnist")
    b.add_argument(
        "--one-class",
        action="store_true",
        required=True,
        help="the one-class protocol (the only protocol so far; required to be explicit)",
    )
    b.add_argument("--classes", type=_classes, help="normal classes to run (default: 0,...,9)")
    add_field_flags(b, flag_fields(exclude=BENCHMARK_OWN))
    b.add_argument(
        "--transforms",
        choices=[*TRANSFORM_SETS, "none"],
        default="none",
        help="also train the self-supervised transformation classifier on this set and compare the "
        "scores with transforms (default: none, as the default detector has no classifier)",
    )
    b.add_argument(
        "--orientation",
        choices=[*TRANSFORM_SETS, "none"],
        default=OrientationOptions().orientation_transforms,
        help="train each autoencoder with the orientation head on this set, as the default detector "
        "(its score is then the default's, compared with the others); none: the autoencoder alone "
        "(its score then mse) (default: %(default)s)",
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
    from detector.datasets import DatasetError
    from detector.errors import ArtifactError, ThresholdPolicyError

    commands = {"train": _train, "evaluate": _evaluate, "report": _report, "benchmark": _benchmark}
    try:
        return commands[args.command](args)
    except (DatasetError, ThresholdPolicyError, ArtifactError, ValueError) as exc:
        print(f"anomaly-trainer: error: {exc}", file=sys.stderr)
        return 2


def train_config(args: argparse.Namespace) -> DetectorConfig:
    """The DetectorConfig of parsed `train` arguments: flags given win over the preset, which wins
    over the defaults; `--epochs auto` wins over a preset's epochs too."""
    return resolve(args.preset, given(args, flag_fields()))


def _train(args: argparse.Namespace) -> int:
    from detector.datasets import load_dataset
    from trainer.train import train

    config = train_config(args)
    dataset = load_dataset(args.dataset, args.data_dir)
    result = train(config, dataset, args.out, report=args.report)
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


def _artifact_dataset(args: argparse.Namespace) -> Dataset:
    """The dataset named on the command line, else the one in the artifact's baseline.json."""
    from detector.artifact import load_artifact
    from detector.datasets import load_dataset

    name = args.dataset or load_artifact(args.artifact).baseline.training.dataset
    return load_dataset(name, args.data_dir)


def _options(args: argparse.Namespace) -> ScoreOptions:
    """The components' options `evaluate` and `report` fit with: the flags given, else defaults."""
    return ScoreOptions().updated(given(args, _fitted_without_networks()))


def _evaluate(args: argparse.Namespace) -> int:
    from trainer.evaluate import evaluate_artifact

    dataset = _artifact_dataset(args)
    evaluation, *_ = evaluate_artifact(args.artifact, dataset, _options(args))
    out = args.json or Path(f"evaluation-{evaluation.model_version}.json")
    evaluation.write_json(out)
    print(
        f"evaluation of {evaluation.architecture} model {evaluation.model_version} on {dataset.name} "
        f"test (normal classes: {evaluation.classes or 'all'}); threshold {evaluation.threshold_policy}"
    )
    print(evaluation.table())
    scored = dict.fromkeys(c for row in evaluation.rows for c in components_of(row.score))
    for name in scored:
        print(f"  {name}: {REGISTRY[name].description}")
    print(
        "the components the artifact lacks are fitted on its training splits as the trainer fits them; "
        f"the other scores' thresholds apply {evaluation.threshold_policy} to the calibration split"
    )
    print(f"written: {out}")
    return 0


def _report(args: argparse.Namespace) -> int:
    from trainer.report import report_from_artifact

    dataset = _artifact_dataset(args)
    out = args.out or args.artifact.resolve().with_name(args.artifact.resolve().name + "-report")
    paths = report_from_artifact(args.artifact, dataset, out, _options(args))
    for path in paths:
        print(f"written: {path}")
    return 0


def benchmark_run(args: argparse.Namespace) -> BenchmarkRun:
    """The BenchmarkRun of parsed `benchmark` arguments: the detector `train` would train with the
    same flags, its networks chosen by --orientation and --transforms."""
    from trainer.benchmark import BenchmarkRun

    values = given(args, flag_fields(exclude=BENCHMARK_OWN))
    if args.orientation == "none":
        values["score"] = "mse"  # the autoencoder alone
    else:
        values["orientation_transforms"] = args.orientation
    if args.transforms != "none":
        values["transforms"] = args.transforms
    return BenchmarkRun(
        detector=DetectorConfig.of(**values),
        dataset=args.dataset,
        classes=tuple(args.classes or range(10)),
        also_fit=("transforms",) if args.transforms != "none" else (),
    )


def _benchmark(args: argparse.Namespace) -> int:
    from detector.datasets import load_dataset
    from trainer.benchmark import RESULTS_DIR, ClassResult, epochs_text, run_benchmark, write_results

    run = benchmark_run(args)
    dataset = load_dataset(args.dataset, args.data_dir)

    def progress(r: ClassResult) -> None:
        cells = "  ".join(f"{k} {v:.4f}" for k, v in r.auroc.items())
        print(f"class {r.normal_class}: AUROC {cells}  ({r.epochs_run} epochs, {r.seconds:.0f}s)", flush=True)

    detector = run.detector
    print(
        f"one-class benchmark: {run.dataset}, {detector.architecture}, "
        f"{epochs_text(detector.epochs, detector.min_steps).lower()}, "
        f"classes {','.join(map(str, run.classes))}",
        flush=True,
    )
    result = run_benchmark(run, dataset, on_class=progress)
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
