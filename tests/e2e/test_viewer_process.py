"""anomaly-viewer as a process, as a pod runs it: SIGTERM stops it cleanly, with exit 0."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT, RedisServer, free_port, wait_until
from tests.support import http_status, logged

pytestmark = [pytest.mark.e2e]


def test_sigterm_stops_the_viewer_with_exit_0(
    redis_server: RedisServer, tiny_artifact: Path, tmp_path: Path
) -> None:
    port = free_port()
    env = dict(os.environ, ANOMALY_REDIS_URL=redis_server.url, ANOMALY_ARTIFACT=str(tiny_artifact))
    log = tmp_path / "viewer.log"
    with log.open("w") as sink:
        viewer = subprocess.Popen(
            [sys.executable, "-m", "viewer", "--port", str(port)], cwd=ROOT, env=env, stderr=sink
        )
    try:
        wait_until(
            lambda: http_status(port, "/") == 200 or viewer.poll() is not None, 60, what="the viewer's page"
        )
        viewer.send_signal(signal.SIGTERM)
        assert viewer.wait(20) == 0, log.read_text()
        assert logged(log.read_text(), "stop requested", signal="SIGTERM") and logged(
            log.read_text(), "stopped"
        )
    finally:
        viewer.kill()
        viewer.wait(10)
