"""report.png and report.html: what a person looks at after training.

Loss curves, the held-out error histogram with the threshold and the anomaly sets overlaid,
originals beside reconstructions, the most and least anomalous test images, and the evaluation
table. Drawn into the artifact at train time, and by `anomaly-trainer report ARTIFACT` into a
folder beside it (the artifact's own files are checksummed by its manifest).
"""

from __future__ import annotations

import html
import logging
import math
from pathlib import Path
from typing import Any

import numpy as np

from detector.artifact import MODEL_FILE, Baseline, model_version_of
from detector.components import REGISTRY
from detector.datasets import Dataset
from detector.score import ScoreOptions
from trainer.compared import ComparedScores
from trainer.evaluate import Evaluation, anomaly_sets, evaluate, load_for_evaluation
from trainer.splits import Splits

log = logging.getLogger(__name__)
REPORT_FILE = "report.png"
REPORT_HTML = "report.html"
SET_COLOURS = {"held-out normal": "tab:blue", "unseen classes": "tab:orange", "rotated 90°": "tab:green"}


def score_title(score: str) -> str:
    """What a score measures, in words: its component's description, or the sum it is."""
    parts = score.split("+")
    if len(parts) == 1:
        return REGISTRY[score].description if score in REGISTRY else score
    return "standardised sum of " + " + ".join(parts)


def write_report(
    out_dir: Path,
    baseline: Baseline,
    dataset: Dataset,
    splits: Splits,
    compared: ComparedScores,
    n_examples: int = 12,
) -> Path | None:
    """Draw out_dir/report.png and report.html; skip with a log line when matplotlib is absent."""
    try:
        import matplotlib

        matplotlib.use("Agg")
    except ImportError:
        log.warning("report skipped reason=matplotlib-not-installed hint='pip install .[train]'")
        return None
    if baseline.model_version == "pending" and (out_dir / MODEL_FILE).is_file():
        # At train time the version is set after staging; it is the hash of the model already saved.
        version = model_version_of((out_dir / MODEL_FILE).read_bytes())
        baseline = baseline.model_copy(update={"model_version": version})
    evaluation = None
    try:
        evaluation, _ = evaluate(compared, baseline, dataset, splits)
    except ValueError as exc:  # e.g. an unlabelled, non-square .npy dataset has no anomaly sets
        log.warning("report without evaluation reason=%s", exc)
    png = _draw_png(out_dir / REPORT_FILE, baseline, dataset, splits, compared, evaluation, n_examples)
    _write_html(out_dir / REPORT_HTML, baseline, evaluation)
    return png


def report_from_artifact(
    artifact_path: Path, dataset: Dataset, out_dir: Path, options: ScoreOptions | None = None
) -> list[Path]:
    """Re-draw an artifact's report into `out_dir` (created); returns the files written."""
    artifact, splits, compared = load_for_evaluation(artifact_path, dataset, options)
    out_dir.mkdir(parents=True, exist_ok=True)
    png = write_report(out_dir, artifact.baseline, dataset, splits, compared)
    return [p for p in (png, out_dir / REPORT_HTML) if p is not None and p.exists()]


def _draw_png(
    path: Path,
    baseline: Baseline,
    dataset: Dataset,
    splits: Splits,
    scorer: ComparedScores,
    evaluation: Evaluation | None,
    n_examples: int,
) -> Path:
    import matplotlib.pyplot as plt

    dim = baseline.input_dim
    side = math.isqrt(dim)
    square = side * side == dim
    t = baseline.threshold
    tr = baseline.training
    normal_x, sets_x = anomaly_sets(dataset, tr.classes)
    score = baseline.score
    errors = {"held-out normal": scorer.own_scores(splits.calibration)}
    errors |= {name: scorer.own_scores(x[:3000]) for name, x in sets_x.items()}

    n_rows = len(evaluation.rows) if evaluation is not None else 0
    summary_height = 1.2 + 0.3 * n_rows
    # Heights in inches: an image row is about as tall as its pictures plus their captions.
    recon_height = 1.3 * 2 * (1 + len(sets_x)) + 0.4
    ratios = [4.2, recon_height, 2 * 1.6 + 0.4, summary_height] if square else [4.2, summary_height]
    fig = plt.figure(figsize=(14, sum(ratios)), constrained_layout=True)
    grid = fig.add_gridspec(len(ratios), 2, height_ratios=ratios)
    fig.suptitle(
        f"{tr.architecture} autoencoder on {tr.dataset}, normal classes {_classes(tr.classes)}, "
        f"model {baseline.model_version}",
        fontsize=15,
        fontweight="bold",
    )

    ax = fig.add_subplot(grid[0, 0])
    history = tr.history
    for key, label in (("loss", "train"), ("val_loss", "held-out validation")):
        if history.get(key):
            ax.plot(range(1, len(history[key]) + 1), history[key], marker="o", label=label)
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set(title=f"Loss per epoch ({tr.epochs_run} of {tr.epochs_requested} run)", xlabel="epoch")
    ax.set_ylabel("mean squared error")
    ax.set_yscale("log")
    ax.legend()
    ax.grid(alpha=0.3, which="both")

    ax = fig.add_subplot(grid[0, 1])
    # Combined scores are sums of z-scores, so they can be negative: a linear axis then.
    log_scale = t.value > 0 and all(bool(np.all(e > 0)) for e in errors.values())
    if log_scale:
        positive = np.concatenate([e[e > 0] for e in errors.values()] + [np.array([t.value])])
        bins = np.geomspace(positive.min(), positive.max(), 70)
    else:
        every = np.concatenate([*errors.values(), np.array([t.value])])
        bins = np.linspace(every.min(), max(float(np.percentile(every, 99.5)), t.value), 70)
    for name, values in errors.items():
        ax.hist(
            np.clip(values, bins[0], bins[-1]),
            bins=bins.tolist(),
            alpha=0.55 if name == "held-out normal" else 0.45,
            density=False,
            weights=np.full(values.size, 1.0 / values.size),
            color=SET_COLOURS.get(name),
            label=f"{name} (n={values.size})",
        )
    ax.axvline(
        t.value, color="red", linestyle="--", linewidth=2, label=f"threshold {t.policy} = {t.value:.4g}"
    )
    if log_scale:
        ax.set_xscale("log")
    ax.set(
        title=f"Per-image anomaly score ({score_title(score)})",
        xlabel=f"{score} (log scale)" if log_scale else f"{score} (values above the axis counted at its end)",
        ylabel="share of set",
    )
    ax.legend(loc="upper left", fontsize=9)

    if square:
        _draw_reconstructions(fig, grid[1, :], scorer, normal_x, sets_x, side, n_examples, t.value, score)
        _draw_extremes(fig, grid[2, :], scorer, dataset, side, n_examples, t.value, score)

    ax = fig.add_subplot(grid[-1, :])
    ax.axis("off")
    _draw_summary(ax, baseline, evaluation, summary_height)
    fig.savefig(path, dpi=72)
    plt.close(fig)
    return path


def _classes(classes: list[int] | None) -> str:
    return "all" if classes is None else ",".join(map(str, classes))


def _strip(
    ax: Any,
    images: np.ndarray,
    side: int,
    label: str,
    captions: list[str] | None = None,
    colours: list[str] | None = None,
) -> None:
    """Images side by side in one axis (one picture, so the layout cannot open gaps between them)."""
    pad = 3
    canvas = np.ones((side, len(images) * (side + pad) - pad), np.float32)
    for i, image in enumerate(images):
        canvas[:, i * (side + pad) : i * (side + pad) + side] = np.asarray(image).reshape(side, side)
    ax.imshow(np.clip(canvas, 0, 1), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_visible(False)
    ax.set_ylabel(label, fontsize=9, rotation=0, ha="right", va="center")
    for i, caption in enumerate(captions or []):
        colour = colours[i] if colours else "black"
        ax.text(
            i * (side + pad) + side / 2, side + 1, caption, ha="center", va="top", fontsize=8, color=colour
        )


def _draw_reconstructions(
    fig: Any,
    cell: Any,
    scorer: ComparedScores,
    normal_x: np.ndarray,
    sets_x: dict[str, np.ndarray],
    side: int,
    n: int,
    threshold: float,
    score: str = "mse",
) -> None:
    """Strips of originals above their reconstructions: normal test images, then each anomaly set."""
    groups = [("normal test", normal_x[:n])] + [(name, x[:n]) for name, x in sets_x.items()]
    sub = cell.subgridspec(2 * len(groups), 1, hspace=0.0)
    for g, (name, images) in enumerate(groups):
        values = scorer.own_scores(images)
        top = fig.add_subplot(sub[2 * g, 0])
        _strip(top, images, side, name)
        if g == 0:
            top.set_title(
                f"Originals above their reconstructions ({score} below each, red: above the threshold)",
                loc="left",
                fontsize=11,
            )
        _strip(
            fig.add_subplot(sub[2 * g + 1, 0]),
            scorer.reconstruct(images),
            side,
            "reconstructed",
            [f"{v:.4g}" for v in values],
            ["red" if v > threshold else "black" for v in values],
        )


def _draw_extremes(
    fig: Any,
    cell: Any,
    scorer: ComparedScores,
    dataset: Dataset,
    side: int,
    n: int,
    threshold: float,
    score: str = "mse",
) -> None:
    """The most and least anomalous images of the whole (unrotated) test split, by the artifact's score."""
    x, y = dataset.test.x, dataset.test.y
    values = scorer.own_scores(x)
    order = np.argsort(values)
    picks = (("most anomalous", order[::-1][:n]), ("least anomalous", order[:n]))
    sub = cell.subgridspec(2, 1, hspace=0.0)
    for row, (label, idx) in enumerate(picks):
        ax = fig.add_subplot(sub[row, 0])
        captions = [(f"class {y[k]}\n" if y is not None else "") + f"{values[k]:.4g}" for k in idx]
        colours = ["red" if values[k] > threshold else "black" for k in idx]
        _strip(ax, x[idx], side, f"test:\n{label}", captions, colours)
        if row == 0:
            ax.set_title(
                f"Most and least anomalous of all {x.shape[0]} test images (class and {score} below each)",
                loc="left",
                fontsize=11,
            )


def _draw_summary(ax: Any, baseline: Baseline, evaluation: Evaluation | None, height_inches: float) -> None:
    s = baseline.statistics
    t = baseline.threshold
    tr = baseline.training
    lines = [
        f"held-out normal {baseline.score}: n={s.count}  mean={s.mean:.5f}  std={s.std:.5f}  "
        f"p95={s.percentiles['95']:.5f}  p99={s.percentiles['99']:.5f}",
        f"threshold {t.policy} = {t.value:.5f}: flags {t.expected_flag_rate:.2%} of held-out normal images",
        f"training: {tr.epochs_run} epochs, {tr.train_count} images, batch {tr.batch_size}, "
        f"lr {tr.learning_rate:g}, seed {tr.seed}, {tr.duration_seconds:.0f} s, "
        f"preprocessing {baseline.preprocessing.kind}",
    ]
    ax.text(0.0, 1.0, "\n".join(lines), va="top", family="monospace", fontsize=10)
    if evaluation is None or not evaluation.rows:
        return
    table_top = 1 - 1.0 / height_inches  # below the three summary lines and the title
    header = ["anomaly set", "score", "AUROC", "avg precision", "flagged normal", "flagged anomalies"]
    cells = [
        [
            r.anomaly_set,
            r.score,
            f"{r.auroc:.4f}",
            f"{r.average_precision:.4f}",
            "-" if r.flagged_normal is None else f"{r.flagged_normal:.2%}",
            "-" if r.flagged_anomaly is None else f"{r.flagged_anomaly:.2%}",
        ]
        for r in evaluation.rows
    ]
    table = ax.table(
        cellText=cells, colLabels=header, loc="lower center", cellLoc="center", bbox=(0, 0, 1, table_top)
    )
    table.auto_set_font_size(False)
    table.set_fontsize(10)
    for (row, _), cell in table.get_celld().items():
        if row == 0:
            cell.set_text_props(fontweight="bold")
            cell.set_facecolor("#e8e8e8")
    ax.set_title(
        f"Evaluation on the {evaluation.dataset} test split (threshold {evaluation.threshold_policy}; the "
        "components the score lacks fitted on the training splits as the trainer fits them)",
        fontsize=11,
        loc="left",
        y=table_top + 0.01,
    )


def _write_html(path: Path, baseline: Baseline, evaluation: Evaluation | None) -> None:
    """A page around report.png with the evaluation as a real table (copyable numbers)."""
    tr = baseline.training
    t = baseline.threshold
    rows = ""
    if evaluation is not None:
        for r in evaluation.rows:
            flagged_n = "-" if r.flagged_normal is None else f"{r.flagged_normal:.2%}"
            flagged_a = "-" if r.flagged_anomaly is None else f"{r.flagged_anomaly:.2%}"
            rows += (
                f"<tr><td>{html.escape(r.anomaly_set)}</td><td>{r.score}</td><td>{r.auroc:.4f}</td>"
                f"<td>{r.average_precision:.4f}</td><td>{flagged_n}</td><td>{flagged_a}</td>"
                f"<td>{r.normal_count}</td><td>{r.anomaly_count}</td></tr>\n"
            )
    table = (
        "<table><tr><th>anomaly set</th><th>score</th><th>AUROC</th><th>average precision</th>"
        "<th>flagged normal</th><th>flagged anomalies</th><th>n normal</th><th>n anomalies</th></tr>\n"
        f"{rows}</table>"
        if rows
        else "<p>No evaluation (the dataset has no labelled or image-shaped test split).</p>"
    )
    title = html.escape(f"{tr.architecture} on {tr.dataset}, model {baseline.model_version}")
    path.write_text(
        f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{title}</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto}}
table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:4px 10px;text-align:right}}
img{{max-width:100%}}</style></head><body>
<h1>{title}</h1>
<p>Normal classes: {_classes(tr.classes)}. Threshold <b>{html.escape(t.policy)} = {t.value:.5g}</b>,
flags {t.expected_flag_rate:.2%} of held-out normal images. {tr.epochs_run} epochs on {tr.train_count}
images, seed {tr.seed}.</p>
<h2>Evaluation on the test split</h2>
{table}
<h2>Report</h2>
<img src="{REPORT_FILE}" alt="loss curves, error histograms, reconstructions, extremes">
</body></html>
"""
    )
