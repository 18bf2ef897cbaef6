"""anomaly-worker: settings from ANOMALY_* variables, flags override; builds the real parts and runs."""

from __future__ import annotations

import argparse
import gc
import logging
import os
import sys
from pathlib import Path

from threadpoolctl import threadpool_limits

from runtime.cli import (
    EXIT_CONFIG,
    SettingsRefused,
    add_settings_flags,
    add_version_flag,
    configure_logging,
    load_settings,
    refuse,
)
from runtime.connection import make_redis
from runtime.settings import WorkerSettings
from runtime.signals import Signals
from worker.allocator import keep_freed_memory

log = logging.getLogger("worker")


def build_parser() -> argparse.ArgumentParser:
    """One flag per setting (--batch-size for ANOMALY_BATCH_SIZE, ...), plus --burst."""
    parser = argparse.ArgumentParser(
        prog="anomaly-worker",
        description="Score images from a Redis stream with an autoencoder artifact and publish the "
        "anomalies. Every flag can also be set as an environment variable ANOMALY_<NAME>; "
        "flags win.",
    )
    add_settings_flags(parser, WorkerSettings)
    add_version_flag(parser, "ANOMALY_ARTIFACT")
    parser.add_argument(
        "--describe",
        metavar="ARTIFACT",
        type=Path,
        help="print what producers must send to this artifact's workers (D, the image layout, the "
        "entry fields for each dtype) and exit",
    )
    parser.add_argument(
        "--burst",
        action="store_true",
        help="handle what is in the stream now, then exit (batch jobs, tests)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of anomaly-worker."""
    signals = Signals().install()  # first: a signal during start-up is remembered, never fatal
    args = build_parser().parse_args(argv)
    if args.describe is not None:
        return _describe(args.describe)
    try:
        settings = load_settings(WorkerSettings, args)
    except SettingsRefused as exc:
        return refuse("anomaly-worker", str(exc))
    signals.grace_seconds = settings.grace_seconds
    configure_logging(settings)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    log.info("starting", extra={"fields": settings.summary_fields()})
    return serve(settings, signals, burst=args.burst)


def _describe(path: Path) -> int:
    from detector.artifact import load_artifact
    from detector.errors import ArtifactError
    from worker.describe import describe

    try:
        print(describe(load_artifact(path)))
    except ArtifactError as exc:
        return refuse("anomaly-worker", f"cannot describe the artifact: {exc}")
    return 0


def serve(settings: WorkerSettings, signals: Signals, burst: bool = False) -> int:
    """Build the worker's parts (metrics and health server, model, Redis client, scoring process,
    runner) and run it until stopped; a stop requested while building ends it with 0."""
    from prometheus_client import CollectorRegistry

    from detector.errors import AnomalyScorerError
    from runtime.http import Health, HttpServer
    from worker.loaded_model import check_shadow_fits, load_model
    from worker.metrics import WorkerMetrics
    from worker.runner import Runner
    from worker.scoring_process import ScoringProcess, ScoringProcessError
    from worker.shards import ShardSet

    registry = CollectorRegistry()
    metrics = WorkerMetrics(registry)
    health = Health(liveness_seconds=max(60.0, 3 * settings.block_ms / 1000.0))
    try:
        server = HttpServer(settings.metrics_host, settings.metrics_port, registry, health).start()
    except OSError as exc:
        log.error(
            "cannot serve metrics host=%s port=%s error=%s",
            settings.metrics_host,
            settings.metrics_port,
            exc,
        )
        return EXIT_CONFIG
    log.info(
        "http listening host=%s port=%d paths=%s",
        settings.metrics_host,
        server.port,
        "/metrics,/healthz,/readyz",
    )
    # numpy's BLAS starts one spinning thread per core; the worker scores on one of its own
    # threads and needs the other core for reading and for Redis (see ANOMALY_SCORING_THREADS).
    threadpool_limits(settings.scoring_threads, user_api="blas")
    if settings.tune_malloc:
        tuned = keep_freed_memory()
        if refused := [name for name, taken in tuned.items() if not taken]:
            log.warning("malloc refused some thresholds (left at its defaults) refused=%s", ",".join(refused))
        log.debug("malloc thresholds %s", ",".join(tuned) or "unchanged: the C library is not glibc")
    try:
        model = load_model(settings)
        shadow = load_model(settings, shadow=True) if settings.shadow_artifact is not None else None
        if shadow is not None:
            check_shadow_fits(model, shadow)
    except (AnomalyScorerError, OSError, ValueError) as exc:
        log.error("model not loaded error=%s", exc)
        print(f"anomaly-worker: cannot load the artifact: {exc}", file=sys.stderr)
        server.stop()
        return EXIT_CONFIG
    rule = model.rule
    log.info(
        "model loaded model_version=%s engine=%s threshold=%.6g policy=%s expected_flag_rate=%.4f",
        model.scorer.model_version,
        model.scorer.engine,
        rule.threshold,
        rule.policy,
        rule.expected_flag_rate,
    )
    if shadow is not None:
        log.info(
            "shadow model loaded model_version=%s engine=%s threshold=%.6g policy=%s",
            shadow.scorer.model_version,
            shadow.scorer.engine,
            shadow.rule.threshold,
            shadow.rule.policy,
        )
    if signals.stop_requested.is_set():
        log.info("stopped during start-up, before the first read")
        server.stop()
        return 0
    scoring_process = None
    if settings.prefetch and settings.scoring_process:
        scoring_process = ScoringProcess(settings.batch_size, settings.scoring_threads, settings.tune_malloc)
        try:
            if scoring_process.accepts(model, shadow):  # else started if a reload brings such a model
                scoring_process.start(model.scorer.input_dim)
        except ScoringProcessError as exc:
            log.warning("scoring process not started, scoring on a thread instead error=%s", exc)
            scoring_process = None
    client = make_redis(settings, settings.consumer, settings.block_ms / 1000.0 + 10.0)
    runner = Runner(
        settings,
        ShardSet.from_settings(client, settings),
        model,
        metrics,
        health,
        loader=lambda: load_model(settings),
        shadow=shadow,
        shadow_loader=(lambda: load_model(settings, shadow=True)) if shadow is not None else None,
        scoring_process=scoring_process,
    )
    # One read of runner.scoring_process: the loop may drop it while a scrape reads it.
    metrics.watch_scoring_process(lambda: getattr(runner.scoring_process, "pid", None))
    signals.attach(runner)  # a stop or reload that came during start-up applies now
    # Everything loaded so far lives as long as the process: keep it out of the garbage
    # collector's full passes, which otherwise stop the loop for about 20 ms every few seconds.
    gc.freeze()
    try:
        if burst:
            handled = runner.drain()
            log.info("burst done handled=%d", handled)
        else:
            runner.run()
    finally:
        runner.close()
        server.stop()
        client.close()
    log.info("stopped")
    return 0
