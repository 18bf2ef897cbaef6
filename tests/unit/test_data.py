"""Datasets: IDX gzip files, the lookup order, any N x D .npy array, and the Keras download path."""

from __future__ import annotations

import gzip
import shutil
from pathlib import Path

import numpy as np
import pytest

from detector import datasets as data
from detector.datasets import DatasetError, load_dataset, load_npy, read_idx, rotate90
from tests.conftest import ROOT, SHARED_DATASETS


def write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(d.to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as handle:
        handle.write(header + array.astype(np.uint8).tobytes())


def fake_idx_dir(folder: Path, value: int) -> Path:
    folder.mkdir(parents=True)
    for prefix, n in (("train", 6), ("t10k", 3)):
        write_idx(folder / f"{prefix}-images-idx3-ubyte.gz", np.full((n, 28, 28), value))
        write_idx(folder / f"{prefix}-labels-idx1-ubyte.gz", np.arange(n) % 10)
    return folder


@pytest.fixture
def no_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ANOMALY_DATA_DIR", raising=False)


def test_shipped_mnist_loads_as_n_by_784_floats_in_unit_range(no_env: None) -> None:
    ds = load_dataset("mnist")
    assert ds.train.x.shape == (60_000, 784) and ds.test.x.shape == (10_000, 784)
    assert ds.train.x.dtype == np.float32 and ds.train.x.min() == 0.0 and 0.99 < ds.train.x.max() <= 1.0
    assert set(np.unique(ds.test.y)) == set(range(10))  # type: ignore[arg-type]
    assert Path(ds.source) == ROOT / "data" / "mnist"


@pytest.mark.skipif(
    not (SHARED_DATASETS / "fashion-mnist").is_dir(), reason="../shared/datasets is not beside the repo"
)
def test_fashion_mnist_loads_from_a_data_dir(no_env: None) -> None:
    ds = load_dataset("fashion-mnist", SHARED_DATASETS)
    assert ds.train.x.shape == (60_000, 784) and ds.test.y is not None and ds.test.y.shape == (10_000,)


def test_data_dir_comes_before_the_environment_and_the_shipped_copy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    flag_dir = fake_idx_dir(tmp_path / "flag" / "mnist", 255)
    env_dir = fake_idx_dir(tmp_path / "env" / "mnist", 0)
    monkeypatch.setenv("ANOMALY_DATA_DIR", str(env_dir.parent))
    assert load_dataset("mnist", flag_dir.parent).train.x.mean() == 1.0
    assert load_dataset("mnist").train.x.mean() == 0.0  # the environment before the shipped copy


def test_keras_cache_and_then_download_are_the_last_resorts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_env: None
) -> None:
    monkeypatch.setattr(data, "PROJECT_DATA", tmp_path / "none")
    monkeypatch.setattr(data, "SYSTEM_DATA", tmp_path / "none")
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras"))
    (tmp_path / "keras" / "datasets").mkdir(parents=True)
    x = np.full((4, 28, 28), 51, np.uint8)
    y = np.arange(4, dtype=np.uint8)
    np.savez(tmp_path / "keras" / "datasets" / "fashion_mnist.npz", x_train=x, y_train=y, x_test=x, y_test=y)
    assert load_dataset("fashion-mnist").train.x.max() == pytest.approx(0.2)

    calls: list[str] = []

    def offline() -> None:
        calls.append("download")
        raise OSError("network is unreachable")

    import keras

    monkeypatch.setattr(keras.datasets.mnist, "load_data", offline)
    with pytest.raises(DatasetError, match="Keras download failed: network is unreachable") as info:
        load_dataset("mnist")
    assert calls == ["download"] and "ANOMALY_DATA_DIR" in str(info.value)


def test_any_n_by_d_npy_array_is_training_data(tmp_path: Path) -> None:
    array = np.random.default_rng(0).random((50, 7)).astype(np.float32)
    np.save(tmp_path / "x.npy", array)
    ds = load_dataset(str(tmp_path / "x.npy"))
    assert ds.train.x.shape[1] == 7 and ds.train.x.shape[0] + ds.test.x.shape[0] == 50
    assert ds.train.y is None


def test_npy_outside_unit_range_is_refused_with_the_range(tmp_path: Path) -> None:
    np.save(tmp_path / "x.npy", np.array([[0.0, 3.0], [1.0, 2.0]]))
    with pytest.raises(DatasetError, match=r"values span \[0, 3\]; expected finite values in \[0, 1\]"):
        load_npy(tmp_path / "x.npy")


def test_truncated_idx_file_is_refused(tmp_path: Path) -> None:
    shutil.copy(ROOT / "data" / "mnist" / "t10k-labels-idx1-ubyte.gz", tmp_path / "l.gz")
    with gzip.open(tmp_path / "l.gz") as handle:
        raw = handle.read()
    with gzip.open(tmp_path / "cut.gz", "wb") as handle:
        handle.write(raw[:-5])
    with pytest.raises(DatasetError, match="has 9995 data bytes, expected 10000"):
        read_idx(tmp_path / "cut.gz")


def test_unknown_dataset_names_the_choices() -> None:
    with pytest.raises(DatasetError, match=r"expected mnist, fashion-mnist or a \.npy path"):
        load_dataset("cifar")


def test_rotate90_turns_a_horizontal_bar_vertical() -> None:
    image = np.zeros((1, 28, 28), np.float32)
    image[0, 5, :] = 1.0
    rotated = rotate90(image.reshape(1, 784)).reshape(28, 28)
    assert rotated[:, 5].tolist() == [1.0] * 28  # counter-clockwise: row 5 becomes column 5
    assert rotated.sum() == 28
