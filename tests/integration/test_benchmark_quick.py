"""`make bench-quick` keeps working: the benchmark's quick mode runs end to end (no timing assertions)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT

pytestmark = [pytest.mark.integration, pytest.mark.slow]


# It trains the most accurate detector (quick) and drains four workers: minutes on a loaded 2-core box.
@pytest.mark.timeout(600)
def test_quick_benchmark_writes_the_table_json_markdown_and_plot(tiny_artifact: Path, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ANOMALY_")}
    env["TF_CPP_MIN_LOG_LEVEL"] = "3"
    argv = [sys.executable, "-m", "benchmarks.throughput", "--quick", "--artifact", str(tiny_artifact)]
    done = subprocess.run(
        [*argv, "--out", str(tmp_path)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=540,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "bare consumer loop, uint8, batch 256 (the ceiling)" in done.stdout
    assert "worker, uint8, batch 256" in done.stdout
    results = json.loads((tmp_path / "throughput.json").read_text())
    assert {d["dtype"] for d in results["drains"]} == {"uint8", "json"}
    # The most accurate detector is served next to the default, on the same entries.
    assert [d["detector"] for d in results["drains"] if d["detector"] != "default"] == [
        "most accurate (dense-512-128-32, mse+transforms, rotations)"
    ]
    assert "serving the most accurate" in done.stdout
    for drain in results["drains"]:
        assert drain["rate"] > 0 and drain["bare"] > 0
        assert drain["scored"] >= drain["entries"]  # every rewound entry was scored by the worker
    assert [p["sent"] > 0 for p in results["paced"]] == [True, True]
    assert results["ready_seconds"]["uint8-b256"] > 0
    assert "| scenario |" in (tmp_path / "throughput.md").read_text()
    assert (tmp_path / "throughput.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
