"""Load an artifact into a scorer that is known to work, or refuse it with an ArtifactError.

Loading is total: whatever goes wrong while reading, verifying, building the engine, warming it up
or scoring a probe batch becomes an `ArtifactError` naming the artifact and, where it is known,
the file. A worker reloading a bad artifact therefore keeps serving the old one. The probe batch
(blank, full and mid-grey images and a few seeded random ones) catches what loads but cannot
score, such as NaN weights: a NaN score is never above the threshold, so nothing would be flagged.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Literal

import numpy as np

from detector.artifact import DENSE_STACK_FILE, MODEL_FILE, LoadedArtifact, check_keras_file, load_artifact
from detector.components import REGISTRY
from detector.engines.keras_engine import KerasScorer
from detector.engines.numpy_engine import NumpyScorer
from detector.errors import AnomalyScorerError, ArtifactError, MissingExtra
from detector.score import components_of

Engine = Literal["auto", "numpy", "tensorflow"]
Scorer = NumpyScorer | KerasScorer
PROBE_RANDOM_ROWS = 4


def make_scorer(
    artifact: LoadedArtifact, engine: Engine = "auto", max_batch: int = 1024, jit: bool = True
) -> Scorer:
    """The scorer for `engine`; auto takes numpy when the artifact has a dense stack."""
    if engine == "numpy" or (engine == "auto" and artifact.dense_stack is not None):
        return NumpyScorer(artifact)
    if engine in ("auto", "tensorflow"):
        require_tensorflow(artifact, engine)
        return KerasScorer(artifact, max_batch=max_batch, jit=jit)
    raise ValueError(f"engine must be auto, numpy or tensorflow, found {engine!r}")


def require_tensorflow(artifact: LoadedArtifact, engine: Engine) -> None:
    """Refuse, naming the extra to install, when the TensorFlow engine is needed but absent."""
    missing = [name for name in ("tensorflow", "keras") if importlib.util.find_spec(name) is None]
    if not missing:
        return
    why = (
        "ANOMALY_ENGINE=tensorflow asks for the TensorFlow engine"
        if engine == "tensorflow"
        else f"{artifact.path} has no {DENSE_STACK_FILE} (a conv model, or an artifact of schema 1.0), "
        "so only the TensorFlow engine can score it"
    )
    raise MissingExtra(
        f"{why}, but {' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} not installed; "
        "install the extra: pip install 'anomaly-scorer[tensorflow]'"
    )


def probe_batch(input_dim: int) -> np.ndarray:
    """Images every working artifact scores finitely: blank, full, mid-grey and seeded noise."""
    fixed = np.stack([np.zeros(input_dim), np.ones(input_dim), np.full(input_dim, 0.5)])
    noise = np.random.default_rng(0).random((PROBE_RANDOM_ROWS, input_dim))
    return np.concatenate([fixed, noise]).astype(np.float32)


def check_probe(artifact: LoadedArtifact, scorer: Scorer) -> None:
    """ArtifactError naming the files that take part unless the probe batch scores finitely."""
    # Overflow is what the probe looks for: counted below by name, not warned about on the way.
    with np.errstate(over="ignore", invalid="ignore"):
        scores = scorer.score_batch(probe_batch(artifact.baseline.input_dim))
    if np.isfinite(scores).all():
        return
    network = DENSE_STACK_FILE if scorer.engine == "numpy" else MODEL_FILE
    owned = [REGISTRY[c].file for c in components_of(artifact.baseline.score)]
    files = ", ".join(str(artifact.path / name) for name in [network, *owned, "baseline.json"] if name)
    raise ArtifactError(
        f"artifact {artifact.path} scores a probe batch of blank, full, grey and random images as "
        f"{scores.tolist()}, expected finite numbers; one of {files} holds NaN or infinite values"
    )


def load_scorer(
    path: str | os.PathLike[str], engine: Engine = "auto", max_batch: int = 1024, jit: bool = True
) -> tuple[LoadedArtifact, Scorer]:
    """Read and verify the artifact, build and warm up its scorer, and check it on a probe batch."""
    try:
        artifact = load_artifact(path)
        check_keras_file(artifact.path / MODEL_FILE, artifact.model_bytes)
        scorer = make_scorer(artifact, engine, max_batch=max_batch, jit=jit)
        check_probe(artifact, scorer)
        scorer.warm_up(max_batch)
    except AnomalyScorerError:
        raise
    # Anything else (a numpy, zip, h5py or TensorFlow error on a corrupt file) is a refused
    # artifact too: the caller keeps its old model instead of dying on an unexpected type.
    except Exception as exc:
        raise ArtifactError(f"artifact {path} cannot be loaded: {type(exc).__name__}: {exc}") from exc
    return artifact, scorer
