"""What the worker's score drift gauge (anomaly_score_drift, worker/drift.py) reads on MNIST.

The PSI of a window of scores against the artifact's held-out normal scores, for windows of normal
test digits (disjoint ones: how much it moves with no change) and of changed inputs: digits
rotated by 90 degrees, under heavy Gaussian noise, inverted, Fashion-MNIST items, and normal
streams with a share of rotated digits mixed in. It is a statistic, not a timing: the figures do
not depend on the machine's load.

    python -m benchmarks.drift [--artifact DIR] [--out benchmarks/results]

Without --artifact it trains the default (`anomaly-trainer train --dataset mnist`, all digits) into
a temporary directory first.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
FASHION_DIRS = (ROOT.parent / "shared" / "datasets" / "fashion-mnist",)
WINDOWS = (500, 2000, 5000)
MIXES = (0.05, 0.10, 0.25)


def changed_inputs(digits: np.ndarray, fashion: np.ndarray | None) -> dict[str, np.ndarray]:
    """The changed streams, each as long as `digits`."""
    from detector.datasets import rotate90

    rng = np.random.default_rng(0)
    streams = {
        "rotated 90 degrees": rotate90(digits),
        "Gaussian noise (sigma 0.3)": np.clip(digits + rng.normal(0, 0.3, digits.shape), 0, 1),
        "inverted": 1 - digits,
    }
    if fashion is not None:
        streams["Fashion-MNIST items"] = fashion[: len(digits)]
    for share in MIXES:
        mixed = digits.copy()
        chosen = rng.random(len(digits)) < share
        mixed[chosen] = rotate90(digits[chosen])
        streams[f"normal with {share:.0%} rotated"] = mixed
    return {name: x.astype(np.float32) for name, x in streams.items()}


def measure(artifact: Path) -> dict[str, object]:
    """PSI per window size for normal windows and for each changed stream."""
    from detector.artifact import load_artifact
    from detector.datasets import DatasetError, load_dataset
    from detector.loading import make_scorer
    from worker.drift import population_stability_index

    loaded = load_artifact(artifact)
    scorer = make_scorer(loaded)
    baseline = loaded.calibration_errors
    test = load_dataset("mnist").test.x
    fashion = None
    for folder in FASHION_DIRS:
        try:
            fashion = load_dataset("fashion-mnist", folder).test.x
            break
        except DatasetError:
            continue
    digit_scores = scorer.score_batch(test)
    rows: dict[str, dict[str, float]] = {}
    for window in WINDOWS:
        normal = [
            population_stability_index(baseline, digit_scores[i : i + window])
            for i in range(0, len(test) - window + 1, window)
        ]
        rows.setdefault("normal test digits (median of disjoint windows)", {})[str(window)] = float(
            np.median(normal)
        )
        rows.setdefault("normal test digits (largest window)", {})[str(window)] = float(np.max(normal))
        for name, x in changed_inputs(test[:window], fashion).items():
            psi = population_stability_index(baseline, scorer.score_batch(x))
            rows.setdefault(name, {})[str(window)] = psi
    return {
        "artifact": str(artifact),
        "architecture": loaded.baseline.training.architecture,
        "score": loaded.baseline.score,
        "calibration_scores": int(baseline.size),
        "windows": list(WINDOWS),
        "psi": rows,
        "measured_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def table(results: dict[str, object]) -> str:
    """The results as a Markdown table."""
    windows = results["windows"]
    assert isinstance(windows, list)
    head = "| input | " + " | ".join(f"PSI, window {w}" for w in windows) + " |"
    lines = [head, "|---|" + "---:|" * len(windows)]
    psi = results["psi"]
    assert isinstance(psi, dict)
    for name, by_window in psi.items():
        lines.append(f"| {name} | " + " | ".join(f"{by_window[str(w)]:.3f}" for w in windows) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Train (or take) an artifact, measure, print and write the results."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.drift", description=__doc__)
    parser.add_argument("--artifact", type=Path, help="measure this artifact instead of training the default")
    parser.add_argument("--out", type=Path, default=RESULTS, help=f"results directory (default: {RESULTS})")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        artifact = args.artifact
        if artifact is None:
            artifact = Path(tmp) / "default"
            command = [sys.executable, "-m", "trainer", "train", "--dataset", "mnist", "--out", str(artifact)]
            subprocess.run([*command, "--no-report"], check=True, cwd=ROOT)
        results = measure(artifact)
    text = table(results)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "drift.json").write_text(json.dumps(results, indent=2) + "\n")
    header = (
        "# Score drift on MNIST\n\n"
        f"`python -m benchmarks.drift`, {results['measured_at']}: PSI (worker/drift.py, 10 bins at the "
        f"baseline's deciles) of windows of scores against the {results['calibration_scores']} held-out "
        f"normal scores of a `{results['architecture']}` `{results['score']}` artifact trained on all "
        "digits. Normal windows are disjoint slices of the 10,000 test digits; each changed input "
        "uses the first test digits (or Fashion-MNIST test items).\n\n"
    )
    (args.out / "drift.md").write_text(header + text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
