"""The artifact format: schema, write, read and verify. Both the trainer and the worker import it.

An artifact is a directory:
  model.keras              the Keras autoencoder (input D floats -> D floats)
  dense_stack.npz          optional, since 1.1: the same model as numpy arrays when it is a chain of
                           Dense layers (detector.networks); the worker then runs without TensorFlow
  <component files>        since 1.2, a score component's own file (detector.components), e.g.
                           transform_classifier.npz (transforms) or knn_reference.npy (knn)
  baseline.json            `Baseline` below: statistics, threshold policy, preprocessing, training
  calibration_errors.npy   sorted held-out normal errors (float64): p-values, policy switching
  manifest.json            sha256 of every other file; the worker refuses a mismatch
  report.png / report.html what people look at (optional, also checksummed)
It imports nothing heavy (no TensorFlow): the Keras model is loaded by `detector.engines.keras_engine`.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import os
import shutil
import stat
import tempfile
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeVar

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, model_validator

from detector.components import REGISTRY
from detector.errors import ArtifactError
from detector.networks import DENSE_STACK_FILE, DenseStack
from detector.score import Score, ScoreName, components_of

log = logging.getLogger(__name__)

# 1.1: optional dense_stack.npz; scores nmse, top-k, mahalanobis.
# 1.2: components transforms (transform_classifier.npz) and knn (knn_reference.npy), and
#      combined scores such as mse+transforms+knn.
# 1.3: the orientation component (orientation_head.npz), the dihedral transformation set, and
#      score_buckets (the anomaly_score histogram's bounds); 1.2 artifacts load as they are.
# 1.4: `retune`, written only by `anomaly-trainer retune` (where a re-tuned threshold came from);
#      an artifact without it is read by a 1.3 worker with a warning, a re-tuned one is refused.
# 1.5: the hidden-knn component (hidden_knn_prototypes.npy), in the default score since
#      2026-11-30; a 1.4 worker refuses a score that names it, and reads the others as they are.
# 1.6: the hidden-mahalanobis component (hidden_gaussian.npz), in the default score since
#      2026-11-30 (evening); a 1.5 worker refuses a score that names it, and reads the others as they are.
# 1.7: `input`, the image layout a producer sends (width x height x channels, row-major, values
#      in [0, 1]); optional, so 1.6 artifacts load as they are, and a 1.6 worker refuses a 1.7
#      artifact that has it (upgrade the workers before the trainer).
SCHEMA_VERSION = "1.7"
MODEL_FILE = "model.keras"
BASELINE_FILE = "baseline.json"
MANIFEST_FILE = "manifest.json"
ERRORS_FILE = "calibration_errors.npy"
PERCENTILES = (50.0, 90.0, 95.0, 99.0, 99.9)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, protected_namespaces=())


class Statistics(_Strict):
    """Per-image reconstruction error on held-out normal data."""

    count: int = Field(gt=0)
    mean: float
    std: float
    min: float
    max: float
    percentiles: dict[str, float] = Field(description="keys '50', '90', '95', '99', '99.9'")

    @classmethod
    def of(cls, errors: np.ndarray) -> Statistics:
        """Summarise a 1-D array of errors."""
        e = np.asarray(errors, dtype=np.float64).ravel()
        return cls(
            count=int(e.size),
            mean=float(e.mean()),
            std=float(e.std()),
            min=float(e.min()),
            max=float(e.max()),
            percentiles={f"{p:g}": float(np.percentile(e, p)) for p in PERCENTILES},
        )


class Threshold(_Strict):
    """The decision rule: flag when score > value."""

    policy: str = Field(description="e.g. mean+3std, 2mean, p95, fpr=0.01")
    # JSON parsers accept Infinity, NaN and 1e999 (inf): a threshold of inf flags nothing, of NaN
    # nothing either (every comparison is false), so a reader refuses them, naming threshold.value.
    value: float = Field(allow_inf_nan=False, description="flag when score > value; a finite number")
    expected_flag_rate: float = Field(
        ge=0, le=1, description="share of held-out normal images above the threshold"
    )


class InputLayout(_Strict):
    """How the input_dim values of one image are laid out: what producers send (docs/producers.md)."""

    width: int = Field(gt=0)
    height: int = Field(gt=0)
    channels: int = Field(1, gt=0, description="1: grey")
    order: Literal["row-major"] = Field("row-major", description="row 0 left to right, then row 1, ...")
    value_range: tuple[float, float] = Field((0.0, 1.0), description="after dtype decoding (uint8 / 255)")

    @classmethod
    def square_grey(cls, input_dim: int) -> InputLayout | None:
        """side x side x 1 when input_dim is a square, else None (the layout is not known)."""
        side = math.isqrt(input_dim)
        return cls(width=side, height=side) if side * side == input_dim else None


class Preprocessing(_Strict):
    """How raw pixels in [0,1] become model input; the worker applies it identically."""

    kind: Literal["unit", "standardize"] = "unit"
    input_range: tuple[float, float] = (0.0, 1.0)
    uint8_scale: float = Field(1.0 / 255.0, description="uint8 pixels are multiplied by this")
    feature_mean: list[float] | None = None
    feature_std: list[float] | None = None


class _ScoreParametersBase(_Strict):
    """What the scores other than mse keep; written only for them. The combination's fields are
    here, every component adds its own (`Component.parameter_fields`)."""

    combine_mean: list[float] | None = Field(
        None, description="combined scores (a+b): each component's mean on held-out normal images"
    )
    combine_std: list[float] | None = Field(
        None, description="combined scores (a+b): each component's std on held-out normal images"
    )


if TYPE_CHECKING:

    class ScoreParameters(_ScoreParametersBase):
        """Typed loosely for mypy: its fields come from the registered components."""

        def __init__(self, **fields: Any) -> None: ...

        def __getattr__(self, name: str) -> Any: ...

else:
    ScoreParameters = create_model(
        "ScoreParameters",
        __base__=_ScoreParametersBase,
        __doc__=_ScoreParametersBase.__doc__,
        **{
            name: field
            for component in REGISTRY.values()
            for name, field in component.parameter_fields.items()
        },
    )


class Training(_Strict):
    """What produced the model, enough to reproduce it."""

    dataset: str
    classes: list[int] | None = None
    architecture: str
    epochs_requested: int
    epochs_run: int
    batch_size: int
    learning_rate: float
    seed: int
    train_count: int
    validation_count: int
    calibration_count: int
    history: dict[str, list[float]] = Field(default_factory=dict)
    duration_seconds: float
    created_at: str
    keras_version: str
    tensorflow_version: str


class RateEstimate(_Strict):
    """A proportion with its 95% Wilson interval (None where there was nothing to count)."""

    value: float | None
    low: float | None
    high: float | None
    successes: int = Field(ge=0)
    trials: int = Field(ge=0)


class AlertEstimate(_Strict):
    """Precision and recall of alerts at a threshold by operators' labels, FPR by normal scores."""

    threshold: float
    precision: RateEstimate
    recall: RateEstimate = Field(description="relative to the alerts labelled anomaly")
    fpr: RateEstimate = Field(description="held-out normal errors plus the alerts labelled normal")


class Retune(_Strict):
    """Where a re-tuned threshold came from (`anomaly-trainer retune`)."""

    labels_stream: str
    labels_redis: str = Field(description="the Redis URL, without its password")
    labels_read: int = Field(ge=0, description="entries read from the labels stream")
    labels_last_id: str = Field(description="the stream id of the last entry read")
    labels_used: int = Field(ge=0, description="labelled alerts of this model with a score")
    target: str = Field(description="e.g. precision>=0.9 or fpr<=0.01")
    previous_threshold: Threshold
    before: AlertEstimate
    after: AlertEstimate
    retuned_at: str


class Baseline(_Strict):
    """baseline.json: everything the worker needs besides the model weights."""

    schema_version: str = SCHEMA_VERSION
    model_version: str = Field(description="sha256 of model.keras, first 16 hex digits")
    input_dim: int = Field(gt=0)
    latent_dim: int | None = None
    input: InputLayout | None = Field(None, description="the image layout (since schema 1.7)")
    score: ScoreName = Field(
        "mse",
        description=f"what the threshold applies to: {', '.join(REGISTRY)}, "
        "or several joined by '+' (standardised and summed)",
    )
    score_parameters: ScoreParameters | None = None
    preprocessing: Preprocessing = Preprocessing()
    statistics: Statistics
    threshold: Threshold
    score_buckets: list[float] | None = Field(
        None,
        description="upper bounds of the worker's anomaly_score histogram, from the held-out normal "
        "scores and the threshold (detector.thresholds.score_buckets); absent before schema 1.3",
    )
    calibration_errors_file: str = ERRORS_FILE
    training: Training
    retune: Retune | None = None  # written only by `anomaly-trainer retune`

    @model_validator(mode="after")
    def _input_fits_input_dim(self) -> Baseline:
        layout = self.input
        if layout is not None and layout.width * layout.height * layout.channels != self.input_dim:
            raise ValueError(
                f"input {layout.width} x {layout.height} x {layout.channels} is "
                f"{layout.width * layout.height * layout.channels} values, input_dim says {self.input_dim}"
            )
        return self

    @model_validator(mode="after")
    def _score_has_its_parameters(self) -> Baseline:
        components = components_of(self.score)
        params = {} if self.score_parameters is None else self.score_parameters.model_dump()
        needs = [
            " and ".join(REGISTRY[c].required_parameters)
            for c in components
            if any(params.get(name) is None for name in REGISTRY[c].required_parameters)
        ]
        if len(components) > 1 and (params.get("combine_mean") is None or params.get("combine_std") is None):
            needs.append("combine_mean and combine_std")
        if needs:
            raise ValueError(f"score {self.score!r} needs score_parameters." + ", ".join(needs))
        if self.score_parameters is None:
            return self
        if len(components) > 1:
            means, stds = params["combine_mean"], params["combine_std"]
            if not len(means) == len(stds) == len(components):
                raise ValueError(
                    f"score {self.score!r} has {len(components)} components, found {len(means)} "
                    f"combine_mean and {len(stds)} combine_std values"
                )
            if min(stds) <= 0:
                raise ValueError(f"combine_std must be positive, found {stds}")
        for c in components:
            REGISTRY[c].check_parameters(params, self.latent_dim)
        return self


class Manifest(_Strict):
    """manifest.json: checksums of every file of the artifact but itself."""

    schema_version: str = SCHEMA_VERSION
    model_version: str
    files: dict[str, str] = Field(description="file name -> sha256 hex digest")


@dataclass(frozen=True)
class LoadedArtifact:
    """A verified artifact, read into memory once (no second read between verify and use)."""

    path: Path
    baseline: Baseline
    manifest: Manifest
    model_bytes: bytes
    calibration_errors: np.ndarray  # sorted ascending, float64
    score: Score  # the score the threshold was calibrated on, with its components' parameters and files
    dense_stack: DenseStack | None = None  # the model as numpy arrays, when the trainer wrote them
    # sha256 of the manifest.json that was verified: a reload compares it with the file on disk, so
    # an update that lands while this one loads is seen at the next check.
    manifest_digest: str = ""


def sha256_hex(data: bytes) -> str:
    """Hex sha256 of bytes."""
    return hashlib.sha256(data).hexdigest()


def model_version_of(model_bytes: bytes) -> str:
    """The content hash that names a model."""
    return sha256_hex(model_bytes)[:16]


SchemaT = TypeVar("SchemaT", bound=BaseModel)


def _versioned(model: type[SchemaT], raw: object, where: Path) -> SchemaT:
    """`raw` (parsed JSON of `where`) as `model`, after its schema version was checked."""
    if isinstance(raw, dict):
        _check_schema_version(str(raw.get("schema_version", "")), str(where))
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        raise ArtifactError(f"{where} does not match the schema: {exc}") from exc


def _check_schema_version(found: str, what: str) -> None:
    expected_major = SCHEMA_VERSION.split(".")[0]
    major = found.partition(".")[0]
    if major != expected_major:
        raise ArtifactError(
            f"{what}: schema version {found!r} is not supported, expected {SCHEMA_VERSION!r} "
            f"(major {expected_major}); retrain or upgrade the worker"
        )
    if _minor(found) > _minor(SCHEMA_VERSION):  # older minors are read as they are
        log.warning(
            "artifact schema is newer than this worker; files it does not know are ignored "
            "what=%s found=%s expected=%s",
            what,
            found,
            SCHEMA_VERSION,
        )


def _minor(version: str) -> int:
    minor = version.partition(".")[2].partition(".")[0]
    return int(minor) if minor.isdigit() else 0


def _parse_json(data: bytes, where: Path) -> object:
    try:
        return json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise ArtifactError(f"artifact file {where} is not valid JSON: {exc}") from exc


# Files of an artifact are opened without following symlinks and without blocking (a FIFO would
# otherwise hang the worker), and must be regular files.
_OPEN_FLAGS = (
    os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
)


class _ArtifactReader:
    """Reads the files of one artifact directory, opened once: every file comes from that directory
    even if a symlink to it is swapped meanwhile."""

    def __init__(self, root: Path) -> None:
        self.root = root
        try:
            self._fd = os.open(
                root, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_CLOEXEC", 0)
            )
        except (FileNotFoundError, NotADirectoryError) as exc:
            raise ArtifactError(f"artifact directory {root} does not exist or is not a directory") from exc

    def close(self) -> None:
        """Release the directory."""
        os.close(self._fd)

    def read(self, name: str) -> bytes:
        """The bytes of `name`, a regular file of the directory; ArtifactError names what it is otherwise."""
        where = self.root / name
        try:
            fd = os.open(name, _OPEN_FLAGS, dir_fd=self._fd)
        except FileNotFoundError as exc:
            raise ArtifactError(f"artifact file {where} is missing") from exc
        except OSError as exc:  # ELOOP: a symlink (O_NOFOLLOW)
            if os.path.islink(where):
                raise ArtifactError(
                    f"artifact file {where} is a symbolic link; expected a regular file (links inside "
                    "an artifact are refused, link the artifact directory instead)"
                ) from exc
            raise ArtifactError(f"artifact file {where} cannot be opened: {exc}") from exc
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                kind = (
                    "a FIFO"
                    if stat.S_ISFIFO(info.st_mode)
                    else "a directory"
                    if stat.S_ISDIR(info.st_mode)
                    else "not a regular file"
                )
                raise ArtifactError(f"artifact file {where} is {kind}; expected a regular file")
            chunks = []
            while chunk := os.read(fd, 1 << 20):
                chunks.append(chunk)
            return b"".join(chunks)
        finally:
            os.close(fd)


def manifest_digest(artifact_dir: str | os.PathLike[str]) -> str:
    """sha256 of manifest.json: it changes whenever any file of the artifact does."""
    reader = _ArtifactReader(Path(artifact_dir))
    try:
        return sha256_hex(reader.read(MANIFEST_FILE))
    finally:
        reader.close()


def load_artifact(path: str | os.PathLike[str]) -> LoadedArtifact:
    """Read and verify an artifact directory; raise ArtifactError naming what is wrong."""
    reader = _ArtifactReader(Path(path))
    try:
        return _load(reader)
    finally:
        reader.close()


def _load(reader: _ArtifactReader) -> LoadedArtifact:
    root = reader.root
    manifest_bytes = reader.read(MANIFEST_FILE)
    manifest = _versioned(Manifest, _parse_json(manifest_bytes, root / MANIFEST_FILE), root / MANIFEST_FILE)

    contents: dict[str, bytes] = {}
    for name, expected in manifest.files.items():
        if Path(name).name != name or name in (".", ".."):
            raise ArtifactError(f"manifest names {name!r}: only plain file names are allowed")
        try:
            data = reader.read(name)
        except ArtifactError as exc:
            if "is missing" in str(exc):
                raise ArtifactError(f"artifact file {root / name} listed in the manifest is missing") from exc
            raise
        found = sha256_hex(data)
        if found != expected:
            raise ArtifactError(
                f"checksum mismatch for {root / name}: manifest says sha256 {expected[:16]}..., "
                f"file has {found[:16]}...; the artifact was modified or is half-written"
            )
        contents[name] = data
    for required in (MODEL_FILE, BASELINE_FILE, ERRORS_FILE):
        if required not in contents:
            raise ArtifactError(f"manifest of {root} does not list required file {required!r}")

    raw_baseline = _parse_json(contents[BASELINE_FILE], root / BASELINE_FILE)
    baseline = _versioned(Baseline, raw_baseline, root / BASELINE_FILE)
    model_bytes = contents[MODEL_FILE]
    if model_version_of(model_bytes) != baseline.model_version:
        raise ArtifactError(
            f"model_version {baseline.model_version} in {root / BASELINE_FILE} does not match "
            f"the hash of {MODEL_FILE} ({model_version_of(model_bytes)})"
        )
    if manifest.model_version != baseline.model_version:
        raise ArtifactError(
            f"manifest model_version {manifest.model_version} differs from baseline's "
            f"{baseline.model_version}"
        )
    errors_path = root / baseline.calibration_errors_file
    if baseline.calibration_errors_file not in contents:
        raise ArtifactError(f"manifest of {root} does not list {baseline.calibration_errors_file!r}")
    errors = np.sort(_read_errors(errors_path, contents[baseline.calibration_errors_file]))
    if errors.size != baseline.statistics.count:
        raise ArtifactError(
            f"{errors_path} has {errors.size} errors, baseline statistics say {baseline.statistics.count}"
        )
    dense_stack = None
    if DENSE_STACK_FILE in contents:
        where = str(root / DENSE_STACK_FILE)
        dense_stack = DenseStack.from_bytes(contents[DENSE_STACK_FILE], where)
        if dense_stack.input_dim != baseline.input_dim:
            raise ArtifactError(
                f"{where} takes {dense_stack.input_dim} features, baseline.json says input_dim "
                f"{baseline.input_dim}"
            )
    score = _score(root, baseline, contents)
    digest = sha256_hex(manifest_bytes)
    return LoadedArtifact(root, baseline, manifest, model_bytes, errors, score, dense_stack, digest)


def _read_errors(where: Path, data: bytes) -> np.ndarray:
    """The calibration errors: one .npy array of finite numbers, flattened to float64."""
    try:
        loaded = np.load(io.BytesIO(data), allow_pickle=False)
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as exc:  # an empty file is an EOFError
        raise ArtifactError(f"{where} is unreadable: {exc}") from exc
    if not isinstance(loaded, np.ndarray) or loaded.dtype.kind not in "fiu":
        found = type(loaded).__name__ if not isinstance(loaded, np.ndarray) else f"dtype {loaded.dtype}"
        raise ArtifactError(f"{where} must hold one .npy array of numbers, found {found}")
    errors = np.asarray(loaded, dtype=np.float64).ravel()
    if not np.isfinite(errors).all():
        raise ArtifactError(f"{where} holds non-finite errors; expected finite numbers")
    return errors


def check_keras_file(where: Path, data: bytes) -> None:
    """A .keras file is a zip with config.json: checked without TensorFlow, which the numpy engine
    never loads, so a broken model.keras is refused before it is needed."""
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as exc:
        raise ArtifactError(f"{where} is not a readable .keras file: {exc}") from exc
    if "config.json" not in names:
        raise ArtifactError(f"{where} is not a .keras file: it has no config.json, found {names[:5]}")


def _score(root: Path, baseline: Baseline, contents: dict[str, bytes]) -> Score:
    """The baseline's score with its components' parameters and files; ArtifactError names the file."""
    params = None if baseline.score_parameters is None else baseline.score_parameters.model_dump()
    for c in components_of(baseline.score):
        name = REGISTRY[c].file
        if name is not None and name not in contents:
            raise ArtifactError(
                f"score {baseline.score!r} needs {name}, which the manifest of {root} does not list"
            )
    where = {name: str(root / name) for name in contents}
    try:
        return Score.from_parameters(baseline.score, params, contents, baseline.input_dim, where)
    except ValueError as exc:
        raise ArtifactError(str(exc)) from exc


def write_artifact(out: str | os.PathLike[str], stage: Callable[[Path], Baseline]) -> Path:
    """Build an artifact in a temporary sibling directory, then move it into place.

    `stage(tmp)` writes model.keras (and any report files) into `tmp` and returns the baseline;
    its `model_version` is overwritten here with the hash of model.keras. A worker never sees
    half an artifact: it is either the old directory or the complete new one.
    """
    target = Path(out).resolve()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        baseline = stage(tmp)
        model_bytes = (tmp / MODEL_FILE).read_bytes()
        version = model_version_of(model_bytes)
        baseline = baseline.model_copy(update={"model_version": version})
        Baseline.model_validate(baseline.model_dump())  # re-check after the update
        (tmp / BASELINE_FILE).write_text(baseline.model_dump_json(indent=2, exclude=_unused(baseline)) + "\n")
        files = {
            p.name: sha256_hex(p.read_bytes())
            for p in sorted(tmp.iterdir())
            if p.is_file() and p.name != MANIFEST_FILE
        }
        manifest = Manifest(model_version=version, files=files)
        (tmp / MANIFEST_FILE).write_text(manifest.model_dump_json(indent=2) + "\n")
        os.chmod(tmp, 0o755)
        if target.exists():
            # Directories cannot be replaced atomically; the old one steps aside for a moment.
            old = target.with_name(f".{target.name}.old-{time.time_ns()}")
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def _unused(baseline: Baseline) -> dict[str, Any] | None:
    """Score fields left out when unset, so older workers still read what they can score: a 1.0
    worker an mse artifact, a 1.1 worker an nmse, top-k or mahalanobis one."""
    params = baseline.score_parameters
    unused: dict[str, Any] = {} if baseline.retune is not None else {"retune": True}
    if baseline.input is None:
        unused["input"] = True
    if params is None:
        return unused | {"score_parameters": True}
    unset = {name for name, value in params if value is None}
    return (unused | {"score_parameters": unset}) if unset else unused or None


def save_errors(path: Path, errors: np.ndarray) -> None:
    """Write held-out errors sorted ascending, as the worker expects them."""
    np.save(path, np.sort(np.asarray(errors, dtype=np.float64).ravel()), allow_pickle=False)
