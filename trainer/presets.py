"""Named detector configurations: the reference notebooks, one flag away (`train --preset NAME`).

A preset is a `DetectorConfig`; flags given on the command line win over its fields. The notebooks
trained for their epochs with early stopping from the first one, so their presets turn the
default's step floor off (`min_steps` 0).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from trainer.config import DetectorConfig

PRESETS: dict[str, DetectorConfig] = {
    "notebook-standardized": DetectorConfig(
        architecture="dense-32", preprocessing="standardize", threshold="p95", score="mse", min_steps=0
    ),
    "notebook-2mean": DetectorConfig(
        architecture="dense-32", epochs=50, threshold="2mean", score="mse", min_steps=0
    ),
    # The default before the orientation score.
    "notebook-3std": DetectorConfig(
        architecture="dense-64-16", epochs=20, threshold="mean+3std", score="mse", min_steps=0
    ),
}


def resolve(preset: str | None, given: Mapping[str, Any]) -> DetectorConfig:
    """The preset (the default detector when None) with the fields `given` that are not None;
    ValueError on an unknown preset."""
    if preset is not None and preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; expected one of {', '.join(PRESETS)}")
    base = DetectorConfig() if preset is None else PRESETS[preset]
    return base.updated(**{name: value for name, value in given.items() if value is not None})
