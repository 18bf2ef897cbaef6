"""anomaly-viewer: the operator's page of the latest anomalies, from ANOMALY_* settings
(runtime.settings.ViewerSettings: Redis, streams and shards, artifact, ANOMALY_VIEWER_TOKEN, the
allowed hosts and trusted proxies)."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from types import FrameType

from detector.errors import AnomalyScorerError
from runtime.cli import (
    EXIT_CONFIG,
    SettingsRefused,
    add_settings_flags,
    add_version_flag,
    configure_logging,
    load_settings,
    refuse,
)
from runtime.settings import ViewerSettings

log = logging.getLogger("viewer")


def build_parser() -> argparse.ArgumentParser:
    """--host and --port; everything else comes from ANOMALY_* variables."""
    parser = argparse.ArgumentParser(
        prog="anomaly-viewer",
        description="Serve a page of the latest anomalies (original, reconstruction, error heatmap, "
        "region) that updates live, and label them with one click (with ANOMALY_VIEWER_TOKEN). "
        "With ANOMALY_SHARDS=N it shows the anomalies of every shard. It answers only requests "
        "for the hosts of --viewer-allowed-hosts. "
        "Every flag but --host and --port can also be set as an environment variable "
        "ANOMALY_<NAME>; flags win.",
    )
    add_settings_flags(parser, ViewerSettings)
    add_version_flag(parser, "ANOMALY_ARTIFACT")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    parser.add_argument("--port", type=int, default=9500, help="port to listen on (default: 9500)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of anomaly-viewer."""
    args = build_parser().parse_args(argv)
    try:
        settings = load_settings(ViewerSettings, args)
    except SettingsRefused as exc:
        return refuse("anomaly-viewer", str(exc))
    configure_logging(settings)
    if settings.artifact is None:
        print(
            "anomaly-viewer: ANOMALY_ARTIFACT is not set; expected the served artifact directory",
            file=sys.stderr,
        )
        return EXIT_CONFIG
    try:
        import uvicorn

        from viewer.app import ModelSource, build_viewer
    except ImportError as exc:
        print(
            f"anomaly-viewer: {exc.name} is not installed; "
            "install the extra: pip install 'anomaly-scorer[viewer]'",
            file=sys.stderr,
        )
        return EXIT_CONFIG
    model = ModelSource(settings.artifact)
    try:
        model.current()  # refuse a broken artifact at start, not at the first picture
    except (AnomalyScorerError, OSError) as exc:
        print(f"anomaly-viewer: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    app = build_viewer(settings, model)
    token = settings.viewer_token
    log.info(
        "viewer starting url=%s redis=%s output=%s shards=%d labels=%s labelling=%s "
        "allowed_hosts=%s trusted_proxies=%s",
        f"http://{args.host}:{args.port}/",
        settings.redacted_redis_url(),
        settings.output_stream,
        settings.shards,
        settings.labels_stream,
        "on" if token else "off",
        ",".join(settings.allowed_hosts()),
        ",".join(settings.trusted_proxies()) or "none",
    )
    # uvicorn stops gracefully on SIGTERM and SIGINT, then raises the signal again against the
    # handler it found installed: this one, so a pod's stop ends with exit 0, not death by signal.
    for number in (signal.SIGTERM, signal.SIGINT):
        signal.signal(number, _stopped)
    # proxy_headers off: the app applies X-Forwarded-* itself, from VIEWER_TRUSTED_PROXIES only.
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", proxy_headers=False)
    log.info("stopped")
    return 0


def _stopped(signum: int, _frame: FrameType | None) -> None:
    log.info("stop requested signal=%s", signal.Signals(signum).name)


if __name__ == "__main__":
    sys.exit(main())
