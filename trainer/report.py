"""report.png: what a person looks at after training (loss curves, reconstructions, errors)."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from trainer.data import Dataset, rotate90
from worker.artifact import Baseline

log = logging.getLogger(__name__)
REPORT_FILE = "report.png"


def write_report(
    out_dir: Path,
    model: Any,
    baseline: Baseline,
    dataset: Dataset,
    splits: Any,
    transform: Callable[[np.ndarray], np.ndarray],
    n_examples: int = 8,
) -> Path | None:
    """Draw the report into out_dir/report.png; skip with a log line when matplotlib is absent."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("report skipped reason=matplotlib-not-installed hint='pip install .[train]'")
        return None

    from trainer.train import reconstruction_errors

    dim = baseline.input_dim
    side = math.isqrt(dim)
    square = side * side == dim
    history = baseline.training.history
    cal_errors = reconstruction_errors(model, transform(splits.calibration))
    examples = dataset.test.x[:n_examples]
    recon = model.predict(transform(examples), verbose=0)
    if baseline.preprocessing.kind == "standardize":
        mean = np.asarray(baseline.preprocessing.feature_mean, np.float32)
        std = np.maximum(np.asarray(baseline.preprocessing.feature_std, np.float32), 1e-6)
        recon = recon * std + mean

    fig = plt.figure(figsize=(13, 8.5), constrained_layout=True)
    grid = fig.add_gridspec(3, 2, height_ratios=[1.1, 1.1, 0.9])
    t = baseline.threshold
    fig.suptitle(
        f"Autoencoder {baseline.training.architecture} on {baseline.training.dataset}"
        f" (classes {baseline.training.classes or 'all'}) - model {baseline.model_version}",
        fontsize=13,
    )

    ax = fig.add_subplot(grid[0, 0])
    for key, label in (("loss", "train"), ("val_loss", "held-out validation")):
        if history.get(key):
            ax.plot(range(1, len(history[key]) + 1), history[key], marker="o", label=label)
    ax.set(title="Loss (MSE) per epoch", xlabel="epoch", ylabel="MSE")
    ax.legend()
    ax.grid(alpha=0.3)

    ax = fig.add_subplot(grid[0, 1])
    bins = np.linspace(0, max(float(np.percentile(cal_errors, 99.9)), t.value) * 2.5, 80).tolist()
    ax.hist(cal_errors, bins=bins, alpha=0.7, density=True, label="held-out normal")
    if square and side == 28:
        rotated = rotate90(dataset.test.x[:2000])
        rot_errors = reconstruction_errors(model, transform(rotated))
        ax.hist(
            np.clip(rot_errors, 0, bins[-1]),
            bins=bins,
            alpha=0.5,
            density=True,
            label="test rotated 90°",
        )
    ax.axvline(t.value, color="red", linestyle="--", label=f"threshold {t.policy} = {t.value:.4f}")
    ax.set(title="Reconstruction error distribution", xlabel="per-image MSE", ylabel="density")
    ax.legend()

    if square:
        sub = grid[1, :].subgridspec(2, n_examples)
        for i in range(len(examples)):
            for row, images, name in ((0, examples, "original"), (1, recon, "reconstruction")):
                a = fig.add_subplot(sub[row, i])
                a.imshow(np.asarray(images[i]).reshape(side, side), cmap="gray", vmin=0, vmax=1)
                a.set_xticks([])
                a.set_yticks([])
                if i == 0:
                    a.set_ylabel(name, fontsize=9)

    ax = fig.add_subplot(grid[2, :])
    ax.axis("off")
    s = baseline.statistics
    lines = [
        f"held-out normal errors: n={s.count}  mean={s.mean:.5f}  std={s.std:.5f}  "
        f"p95={s.percentiles['95']:.5f}  p99={s.percentiles['99']:.5f}",
        f"threshold: {t.policy} = {t.value:.5f}; "
        f"expected flag rate on normal data {t.expected_flag_rate:.2%}",
        f"training: {baseline.training.epochs_run} epochs, {baseline.training.train_count} images, "
        f"batch {baseline.training.batch_size}, seed {baseline.training.seed}",
    ]
    ax.text(0.0, 0.9, "\n".join(lines), va="top", family="monospace", fontsize=10)
    path = out_dir / REPORT_FILE
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path
