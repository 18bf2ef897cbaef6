"""Keras is imported with TensorFlow's native start-up notices filtered out, and nothing else."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT

FAKE_KERAS = """
import os
os.write(2, b"WARNING: All log messages before absl::InitializeLog() is called are written to STDERR\\n")
os.write(2, b"I0000 port.cc:153] oneDNN custom operations are on. You may see slightly different results\\n")
os.write(2, b"E0000 something a user must see\\n")
"""


def import_in_subprocess(tmp_path: Path, *, fake: bool) -> subprocess.CompletedProcess[str]:
    path = [str(ROOT)]
    if fake:
        (tmp_path / "keras.py").write_text(FAKE_KERAS)
        path.insert(0, str(tmp_path))
    code = "from detector.engines import tensorflow_import as t; t.import_keras_quietly()"
    code += "; t.import_keras_quietly(); print('imported')"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(path))
    env.pop("TF_CPP_MIN_LOG_LEVEL", None)
    return subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )


def test_native_start_up_notices_are_dropped_and_other_lines_kept(tmp_path: Path) -> None:
    done = import_in_subprocess(tmp_path, fake=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "imported\n"
    assert done.stderr == "E0000 something a user must see\n"


def test_real_keras_imports_without_tensorflow_start_up_noise(tmp_path: Path) -> None:
    done = import_in_subprocess(tmp_path, fake=False)
    assert done.returncode == 0, done.stderr
    assert "absl::InitializeLog" not in done.stderr and "oneDNN" not in done.stderr, done.stderr
