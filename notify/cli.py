"""anomaly-notify: settings from ANOMALY_* variables, flags override; builds the real parts and runs."""

from __future__ import annotations

import argparse
import logging
from importlib.metadata import PackageNotFoundError, version

from runtime.cli import (
    EXIT_CONFIG,
    SettingsRefused,
    add_settings_flags,
    add_version_flag,
    configure_logging,
    load_settings,
    refuse,
)
from runtime.settings import NotifySettings
from runtime.signals import Signals

log = logging.getLogger("notify")
PROG = "anomaly-notify"


def build_parser() -> argparse.ArgumentParser:
    """One flag per setting (--notify-webhook-url for ANOMALY_NOTIFY_WEBHOOK_URL, ...), plus --burst."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Post every anomaly of the output stream(s) to a webhook, Alertmanager, a "
        "CloudEvents sink or Slack, at least once, with an Idempotency-Key; a burst past "
        "--notify-max-per-minute becomes one summary. Every flag can also be set as an environment "
        "variable ANOMALY_<NAME>; flags win.",
    )
    add_settings_flags(parser, NotifySettings)
    add_version_flag(parser)
    parser.add_argument(
        "--burst",
        action="store_true",
        help="deliver what is in the streams now (and the summary of what passed the limit), then exit",
    )
    return parser


def _user_agent() -> str:
    try:
        return f"{PROG}/{version('anomaly-scorer')}"
    except PackageNotFoundError:  # run from a source tree that was never installed
        return PROG


def main(argv: list[str] | None = None) -> int:
    """Entry point of anomaly-notify."""
    signals = Signals(logger="notify").install(reload=False)  # first: an early signal is remembered
    args = build_parser().parse_args(argv)
    try:
        settings = load_settings(NotifySettings, args)
    except SettingsRefused as exc:
        return refuse(PROG, str(exc))
    if settings.notify_webhook_url is None:
        return refuse(
            PROG,
            "ANOMALY_NOTIFY_WEBHOOK_URL is not set: expected the receiver's http:// or https:// URL "
            "(or --notify-webhook-url)",
        )
    signals.grace_seconds = settings.notify_grace_seconds
    configure_logging(settings)
    log.info("starting %s", settings.summary())
    return serve(settings, signals, burst=args.burst)


def serve(settings: NotifySettings, signals: Signals, burst: bool = False) -> int:
    """Build the notifier's parts (metrics and health server, Redis client, sender, formatter) and
    run it until stopped; a stop requested while building ends it with 0."""
    from prometheus_client import CollectorRegistry

    from notify.anomalies import ViewerLinks
    from notify.formats import Formatter
    from notify.metrics import NotifyMetrics
    from notify.notifier import Notifier
    from notify.sender import UrllibSender
    from notify.stream import OutputGroup
    from runtime.connection import make_redis
    from runtime.http import Health, HttpServer

    registry = CollectorRegistry()
    metrics = NotifyMetrics(registry)
    health = Health(liveness_seconds=max(60.0, 3 * settings.notify_block_ms / 1000.0), needs_model=False)
    try:
        host, port = settings.notify_metrics_host, settings.notify_metrics_port
        server = HttpServer(host, port, registry, health).start()
    except OSError as exc:
        log.error(
            "cannot serve metrics host=%s port=%s error=%s",
            settings.notify_metrics_host,
            settings.notify_metrics_port,
            exc,
        )
        return EXIT_CONFIG
    log.info(
        "http listening host=%s port=%d paths=/metrics,/healthz,/readyz",
        settings.notify_metrics_host,
        server.port,
    )
    client = make_redis(settings, settings.notify_consumer, settings.notify_block_ms / 1000.0 + 10.0)
    groups = [
        OutputGroup(
            client,
            shard=shard,
            output_stream=settings.in_shard(settings.output_stream, shard),
            input_stream=settings.in_shard(settings.input_stream, shard),
            dead_letter_stream=settings.in_shard(settings.notify_dead_letter_stream, shard),
            dead_letter_maxlen=settings.notify_dead_letter_maxlen,
            group=settings.notify_group,
            consumer=settings.notify_consumer,
        )
        for shard in range(settings.shards)
    ]
    authorization = settings.notify_authorization
    sender = UrllibSender(
        settings.webhook_url(),
        settings.notify_timeout_seconds,
        _user_agent(),
        authorization.get_secret_value() if authorization is not None else None,
    )
    formatter = Formatter(
        settings.notify_format, ViewerLinks(settings.notify_viewer_url), settings.notify_max_per_minute
    )
    notifier = Notifier(settings, groups, sender, formatter, metrics, health)
    signals.attach(notifier)  # a stop that came during start-up applies now
    try:
        if burst:
            handled = notifier.drain()
            log.info("burst done read=%d", handled)
        else:
            notifier.run()
    finally:
        server.stop()
        client.close()
    log.info("stopped")
    return 0
