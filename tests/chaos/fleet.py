"""Worker subprocesses for the chaos tests: start, wait until ready, kill, pause."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from tests.conftest import ROOT, free_port, wait_until
from tests.support import http_status


@dataclass
class Fleet:
    """Worker subprocesses sharing one group; each start gets a new consumer name."""

    redis_url: str
    artifact: Path
    log_dir: Path
    extra_env: dict[str, str] = field(default_factory=dict)
    workers: dict[str, tuple[subprocess.Popen[bytes], int]] = field(default_factory=dict)
    started: int = 0

    def start(self, name: str | None = None, wait_ready: bool = True) -> str:
        self.started += 1
        name = name or f"w{self.started}"
        port = free_port()
        env = dict(
            os.environ,
            TF_CPP_MIN_LOG_LEVEL="3",
            ANOMALY_REDIS_URL=self.redis_url,
            ANOMALY_ARTIFACT=str(self.artifact),
            ANOMALY_METRICS_HOST="127.0.0.1",
            ANOMALY_METRICS_PORT=str(port),
            ANOMALY_CONSUMER=name,
            ANOMALY_SCORES_STREAM="scores",
            ANOMALY_BLOCK_MS="100",
            **self.extra_env,
        )
        with open(self.log_dir / f"{name}.log", "ab") as log:
            process = subprocess.Popen([sys.executable, "-m", "worker"], env=env, cwd=ROOT, stderr=log)
        self.workers[name] = (process, port)
        if wait_ready:
            self.wait_ready(name)
        return name

    def wait_ready(self, name: str) -> None:
        process, port = self.workers[name]
        wait_until(
            lambda: http_status(port, "/readyz") == 200 or process.poll() is not None,
            120,
            what=f"{name} ready",
        )
        assert process.poll() is None, (self.log_dir / f"{name}.log").read_text()

    def kill(self, name: str) -> None:
        process, _ = self.workers.pop(name)
        process.kill()
        process.wait(10)

    def stop_all(self) -> None:
        for process, _ in self.workers.values():
            if process.poll() is None:
                process.kill()
                process.wait(10)
        self.workers.clear()
