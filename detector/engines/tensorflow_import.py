"""Import Keras (and TensorFlow under it) keeping TensorFlow's native start-up lines off stderr.

TensorFlow's C++ runtime writes two lines to file descriptor 2 while it loads, whatever
TF_CPP_MIN_LOG_LEVEL says: absl's "All log messages before absl::InitializeLog() ..." and the
oneDNN notice. People running the trainer or the demo read them as noise or as errors. The import
runs with descriptor 2 sent to a temporary file; every other line written meanwhile is passed on.
"""

from __future__ import annotations

import os
import sys
import tempfile
from types import ModuleType

NATIVE_NOISE = ("All log messages before absl::InitializeLog()", "oneDNN custom operations are on")


def import_keras_quietly() -> ModuleType:
    """`import keras` (TensorFlow backend) with TensorFlow's native start-up notices filtered out."""
    if "keras" in sys.modules:
        return sys.modules["keras"]
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            import keras
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            lines = captured.read().decode("utf-8", "replace").splitlines(keepends=True)
            sys.stderr.write("".join(line for line in lines if not any(n in line for n in NATIVE_NOISE)))
            sys.stderr.flush()
    return keras
