"""The detectors compared, by the label of their row in the Pareto table: the reference notebooks'
presets, the previous defaults, the default and the most accurate. Each is one `DetectorConfig`:
its artifact is trained with its flags (`DetectorConfig.flags`), its one-class runs with the same
configuration (trainer.benchmark)."""

from __future__ import annotations

from trainer.config import DetectorConfig
from trainer.presets import PRESETS

DEFAULT = "**default** (dense-64-16 + orientation head, mse+orientation+hidden-knn+hidden-mahalanobis, p99)"

DETECTORS: dict[str, DetectorConfig] = {
    "notebook-standardized (dense-32, standardised pixels, p95)": PRESETS["notebook-standardized"],
    "notebook-2mean (dense-32, 50 epochs, 2mean)": PRESETS["notebook-2mean"],
    "notebook-3std (dense-64-16, 20 epochs, mean+3std)": PRESETS["notebook-3std"],
    "previous default (dense-64-16, mse, 10 epochs, mean+3std)": DetectorConfig(
        score="mse", threshold="mean+3std", epochs=10, min_steps=0
    ),
    "default until 2026-11-30 (dense-64-16 + dihedral head, mse+nmse+orientation, p99)": DetectorConfig.of(
        score="mse+nmse+orientation", orientation_transforms="dihedral"
    ),
    DEFAULT: DetectorConfig(),
    # The default's networks: its one-class run is shared with the default's.
    "default of 2026-11-30 without hidden-mahalanobis (mse+orientation+hidden-knn, p99)": DetectorConfig(
        score="mse+orientation+hidden-knn"
    ),
    "most accurate (dense-512-128-32, mse+transforms, rotations)": DetectorConfig.of(
        architecture="dense-512-128-32", score="mse+transforms", transforms="rotations"
    ),
}
# The rows whose one-class figures are not measured, and why.
WITHOUT_ONE_CLASS: dict[str, str] = {
    "notebook-standardized (dense-32, standardised pixels, p95)": "measured on unit pixels only so far",
    "previous default (dense-64-16, mse, 10 epochs, mean+3std)": "the notebook-3std row with fewer epochs",
}
