"""Named training configurations: the reference notebooks, one flag away (`train --preset NAME`).

A preset sets some of `TrainConfig`'s fields; flags given on the command line win over it, and
the fields it leaves alone keep their defaults (the default detector's). The notebooks trained
for their epochs with early stopping from the first one, so their presets turn the default's step
floor off (`min_steps` 0).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

# The default detector (no preset): dense-64-16 trained with its orientation head, scored
# mse+orientation+hidden-knn+hidden-mahalanobis (detector.score.DEFAULT_SCORE), its threshold the
# 99th percentile of held-out normal scores, trained 20 epochs or 2,000 steps, whichever is longer
# (trainer.budget).
# docs/detection.md has the measurements behind each choice.
DEFAULT_THRESHOLD = "p99"


@dataclass(frozen=True)
class Preset:
    """What a preset sets, and what it reproduces (for --help)."""

    description: str
    settings: dict[str, Any]


PRESETS: dict[str, Preset] = {
    "notebook-standardized": Preset(
        "dense-32 on per-feature standardised pixels, threshold p95",
        {
            "architecture": "dense-32",
            "preprocessing": "standardize",
            "threshold": "p95",
            "score": "mse",
            "min_steps": 0,
        },
    ),
    "notebook-2mean": Preset(
        "dense-32, 50 epochs, threshold twice the mean error",
        {"architecture": "dense-32", "epochs": 50, "threshold": "2mean", "score": "mse", "min_steps": 0},
    ),
    "notebook-3std": Preset(
        "dense-64-16, 20 epochs, threshold mean + 3 std (the default before the orientation score)",
        {
            "architecture": "dense-64-16",
            "epochs": 20,
            "threshold": "mean+3std",
            "score": "mse",
            "min_steps": 0,
        },
    ),
}


def resolve(preset: str | None, given: dict[str, Any], config_type: type) -> dict[str, Any]:
    """The TrainConfig fields: those `given` on the command line (not None), else the preset's.

    Fields neither sets are left out, so the config's defaults apply. ValueError on an unknown
    preset or a preset field the config does not have."""
    settings: dict[str, Any] = {}
    if preset is not None:
        if preset not in PRESETS:
            raise ValueError(f"unknown preset {preset!r}; expected one of {', '.join(PRESETS)}")
        settings = dict(PRESETS[preset].settings)
    known = {f.name for f in fields(config_type)}
    unknown = set(settings) - known
    if unknown:
        raise ValueError(f"preset {preset!r} sets {sorted(unknown)}, which {config_type.__name__} lacks")
    return settings | {k: v for k, v in given.items() if v is not None}
