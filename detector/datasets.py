"""Datasets: IDX gzip (MNIST, Fashion-MNIST) and any N x D .npy array.

Lookup order for a named dataset: --data-dir, $ANOMALY_DATA_DIR, the copy the project ships
(data/), Debian's /usr/share/datasets, Keras' cache (~/.keras/datasets/NAME.npz), and finally
Keras' download (which needs internet).
"""

from __future__ import annotations

import gzip
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from detector.errors import AnomalyScorerError

log = logging.getLogger(__name__)

PROJECT_DATA = Path(__file__).resolve().parent.parent / "data"
SYSTEM_DATA = Path("/usr/share/datasets")
KNOWN = {"mnist": "mnist", "fashion-mnist": "fashion_mnist"}
IDX_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}


class DatasetError(AnomalyScorerError):
    """A dataset cannot be found or read."""


@dataclass(frozen=True)
class Split:
    """Flattened images as float32 in [0, 1] (N x D) and integer labels (N,) or None."""

    x: np.ndarray
    y: np.ndarray | None


@dataclass(frozen=True)
class Dataset:
    """Train and test splits plus where they came from."""

    name: str
    train: Split
    test: Split
    source: str
    # (height, width, channels) of one image before it was flattened, when the source says so
    image_shape: tuple[int, int, int] | None = None


def image_shape_of(array: np.ndarray) -> tuple[int, int, int] | None:
    """The (height, width, channels) of N x H x W or N x H x W x C images; None for N x D rows."""
    if array.ndim == 3:
        return int(array.shape[1]), int(array.shape[2]), 1
    if array.ndim == 4:
        return int(array.shape[1]), int(array.shape[2]), int(array.shape[3])
    return None


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (gzip or plain) into an array of its declared shape."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as handle:
        data = handle.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise DatasetError(f"{path} is not an IDX file (bad magic {data[:4]!r})")
    if data[2] != 0x08:
        raise DatasetError(f"{path}: IDX type 0x{data[2]:02x} is not supported, expected 0x08 (uint8)")
    ndim = data[3]
    header = 4 + 4 * ndim
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    expected = int(np.prod(shape))
    if len(data) - header != expected:
        raise DatasetError(
            f"{path} has {len(data) - header} data bytes, expected {expected} for shape {shape}"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape)


def _idx_dir_candidates(base: Path, name: str) -> list[Path]:
    return [base / name, base / name.replace("-", "_"), base]


def _has_idx(folder: Path) -> bool:
    return all((folder / f).is_file() for pair in IDX_FILES.values() for f in pair)


def _load_idx_dir(folder: Path, name: str) -> Dataset:
    splits = {}
    shape = None
    for split, (images, labels) in IDX_FILES.items():
        x = read_idx(folder / images)
        shape = image_shape_of(x)
        y = read_idx(folder / labels).astype(np.int64)
        if x.shape[0] != y.shape[0]:
            raise DatasetError(f"{folder}: {x.shape[0]} {split} images but {y.shape[0]} labels")
        splits[split] = Split(to_unit_float(x.reshape(x.shape[0], -1)), y)
    return Dataset(name, splits["train"], splits["test"], str(folder), shape)


def to_unit_float(pixels: np.ndarray) -> np.ndarray:
    """uint8 0-255 -> float32 in [0, 1], the scale the worker applies to uint8 payloads."""
    return pixels.astype(np.float32) / np.float32(255.0)


def search_path(data_dir: str | os.PathLike[str] | None) -> list[Path]:
    """Folders searched for IDX files, in order."""
    bases: list[Path] = []
    if data_dir:
        bases.append(Path(data_dir))
    if env := os.environ.get("ANOMALY_DATA_DIR"):
        bases.append(Path(env))
    bases += [PROJECT_DATA, SYSTEM_DATA]
    return bases


def load_dataset(name: str, data_dir: str | os.PathLike[str] | None = None) -> Dataset:
    """Load `mnist`, `fashion-mnist`, or a path to an N x D .npy file."""
    if name.endswith(".npy") or Path(name).suffix == ".npy":
        return load_npy(Path(name))
    if name not in KNOWN:
        raise DatasetError(f"unknown dataset {name!r}; expected mnist, fashion-mnist or a .npy path")
    tried: list[str] = []
    for base in search_path(data_dir):
        for folder in _idx_dir_candidates(base, name):
            if _has_idx(folder):
                log.info("dataset found name=%s path=%s", name, folder)
                return _load_idx_dir(folder, name)
            tried.append(str(folder))
    keras_name = KNOWN[name]
    cache = Path(os.environ.get("KERAS_HOME", Path.home() / ".keras")) / "datasets"
    cached = cache / f"{keras_name}.npz"
    if cached.is_file():
        with np.load(cached, allow_pickle=False) as npz:
            return _from_arrays(
                name, npz["x_train"], npz["y_train"], npz["x_test"], npz["y_test"], str(cached)
            )
    tried.append(str(cached))
    return _download_with_keras(name, keras_name, tried)


def _from_arrays(
    name: str,
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_test: np.ndarray,
    y_test: np.ndarray,
    source: str,
) -> Dataset:
    return Dataset(
        name,
        Split(to_unit_float(x_train.reshape(len(x_train), -1)), y_train.astype(np.int64)),
        Split(to_unit_float(x_test.reshape(len(x_test), -1)), y_test.astype(np.int64)),
        source,
        image_shape_of(x_train),
    )


def _download_with_keras(name: str, keras_name: str, tried: list[str]) -> Dataset:
    """The last resort: Keras' own download (fails without internet, with a clear message)."""
    import keras

    loader = getattr(keras.datasets, keras_name)
    log.info("dataset not found locally, downloading with keras name=%s", name)
    try:
        (x_train, y_train), (x_test, y_test) = loader.load_data()
    except Exception as exc:  # network errors come in many types (URLError, OSError, HTTPError...)
        raise DatasetError(
            f"dataset {name!r} not found in {', '.join(tried)} and the Keras download failed: {exc}; "
            "pass --data-dir or set ANOMALY_DATA_DIR to a folder with the IDX .gz files"
        ) from exc
    return _from_arrays(name, x_train, y_train, x_test, y_test, f"keras.datasets.{keras_name}")


def load_npy(path: Path, test_fraction: float = 0.2, seed: int = 0) -> Dataset:
    """Any N x D float array in [0, 1] (or uint8) as training data; the last part is the test split."""
    try:
        array = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise DatasetError(f"cannot read {path} as a .npy array: {exc}") from exc
    if array.ndim < 2:
        raise DatasetError(f"{path} has shape {array.shape}, expected N x D")
    flat = array.reshape(array.shape[0], -1)
    x = to_unit_float(flat) if flat.dtype == np.uint8 else flat.astype(np.float32)
    if not np.isfinite(x).all() or x.min() < 0 or x.max() > 1:
        raise DatasetError(
            f"{path} values span [{np.nanmin(x):g}, {np.nanmax(x):g}]; expected finite values in [0, 1] "
            "(scale your data first)"
        )
    order = np.random.default_rng(seed).permutation(x.shape[0])
    cut = round(x.shape[0] * (1 - test_fraction))
    return Dataset(
        str(path), Split(x[order[:cut]], None), Split(x[order[cut:]], None), str(path), image_shape_of(array)
    )


def rotate90(images: np.ndarray, side: int = 28) -> np.ndarray:
    """Rotate flattened square images by 90 degrees (the reference notebooks' anomaly)."""
    n = images.shape[0]
    return np.rot90(images.reshape(n, side, side), k=1, axes=(1, 2)).reshape(n, side * side).copy()
