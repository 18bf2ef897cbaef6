"""The hidden-knn score: cosine distance to normal prototypes of the encoder's first layer."""

from __future__ import annotations

import io

import numpy as np
import pytest

from detector.components import REGISTRY
from detector.components.base import ForwardPass, NormalData
from detector.components.hidden_knn import (
    DEFAULT_HIDDEN_KNN_K,
    HIDDEN_KNN_FILE,
    HiddenKnn,
    HiddenKnnOptions,
    fit_prototypes,
)
from detector.components.knn import mean_of_largest, unit_rows
from detector.score import DEFAULT_SCORE, Score, components_of


def _batch(layer: np.ndarray) -> ForwardPass:
    rows = layer.shape[0]
    return ForwardPass(
        np.zeros((rows, 16), np.float32), np.zeros((rows, 16), np.float32), (layer, layer[:, :2])
    )


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def test_the_score_is_one_minus_the_mean_cosine_similarity_to_the_k_nearest_prototypes() -> None:
    rng = np.random.default_rng(0)
    prototypes = rng.normal(size=(20, 6)).astype(np.float32)
    layer = rng.normal(size=(9, 6)).astype(np.float32)
    similarity = unit_rows(layer) @ unit_rows(prototypes).T
    expected = 1.0 - np.sort(similarity, axis=1)[:, -3:].mean(axis=1)
    np.testing.assert_allclose(HiddenKnn(prototypes, k=3).score(_batch(layer)), expected, atol=1e-6)


def test_an_image_on_a_prototype_scores_zero_and_one_pointing_away_scores_more() -> None:
    prototypes = np.eye(4, dtype=np.float32)
    layer = np.array([[2.0, 0, 0, 0], [0, 0, 0, -1.0]], np.float32)  # length does not matter
    scores = HiddenKnn(prototypes, k=1).score(_batch(layer))
    np.testing.assert_allclose(scores, [0.0, 1.0], atol=1e-6)


def test_the_prototypes_are_kept_as_unit_rows_and_round_trip_through_the_artifact_file() -> None:
    component = HiddenKnn(np.array([[3.0, 4.0], [0.0, 2.0], [1.0, 0.0]], np.float32), k=2)
    np.testing.assert_allclose(np.linalg.norm(component.prototypes, axis=1), 1.0, atol=1e-6)
    rebuilt = HiddenKnn.from_parameters(component.parameters(), component.file_bytes(), 784, "p.npy")
    assert rebuilt.parameters() == {"hidden_knn_k": 2, "hidden_knn_layer": 0}
    np.testing.assert_array_equal(rebuilt.prototypes, component.prototypes)


@pytest.mark.parametrize(
    ("data", "parameters", "expected"),
    [
        (None, {}, "needs the normal prototypes of the encoder's first layer"),
        (b"not a numpy file", {}, "p.npy is unreadable"),
        (_npy(np.zeros(5, np.float32)), {}, r"shape \(5,\), expected \(n, width\) with n >= hidden_knn_k 3"),
        (_npy(np.ones((2, 4), np.float32)), {"hidden_knn_k": 3}, r"shape \(2, 4\)"),
        (_npy(np.full((4, 4), np.nan, np.float32)), {}, "must hold finite floats"),
        (_npy(np.ones((4, 4), np.int64)), {}, "found dtype int64"),
    ],
    ids=["missing", "unreadable", "one-dimensional", "fewer-than-k", "not-finite", "integers"],
)
def test_a_bad_prototypes_file_is_refused_naming_it_and_what_was_expected(
    data: bytes | None, parameters: dict[str, int], expected: str
) -> None:
    with pytest.raises(ValueError, match=expected):
        HiddenKnn.from_parameters(parameters, data, 784, "p.npy")


def test_prototypes_of_another_width_than_the_layer_are_refused_naming_both() -> None:
    with pytest.raises(ValueError, match="prototypes have 6 values, encoder layer 0 gives 5"):
        HiddenKnn(np.ones((4, 6), np.float32)).score(_batch(np.ones((2, 5), np.float32)))


def test_k_larger_than_the_prototypes_is_refused() -> None:
    with pytest.raises(ValueError, match=r"hidden_knn_k must be in 1\.\.2 \(prototypes\), found 3"):
        HiddenKnn(np.ones((2, 4), np.float32), k=3)


def test_fitted_prototypes_are_unit_centres_of_the_normal_directions() -> None:
    rng = np.random.default_rng(1)
    directions = np.eye(8, dtype=np.float32)[:3]
    rows = np.repeat(directions, 200, axis=0) * rng.uniform(0.5, 3.0, (600, 1))  # lengths vary
    rows += rng.normal(scale=0.02, size=rows.shape)
    prototypes = fit_prototypes(rows.astype(np.float32), 3, seed=0)
    np.testing.assert_allclose(np.linalg.norm(prototypes, axis=1), 1.0, atol=1e-5)
    # Each direction has a prototype within a few degrees of it.
    assert (directions @ prototypes.T).max(axis=1).min() > 0.99


def test_with_fewer_rows_than_prototypes_the_rows_are_the_prototypes() -> None:
    rows = np.array([[1.0, 1.0], [0.0, 3.0]], np.float32)
    np.testing.assert_allclose(fit_prototypes(rows, 512, seed=0), unit_rows(rows))


def test_the_component_fits_on_the_first_encoder_layer_of_the_fit_split() -> None:
    rng = np.random.default_rng(2)
    fit = rng.random((40, 16)).astype(np.float32)
    weights = rng.normal(size=(16, 5)).astype(np.float32)
    seen: list[int] = []

    def forward(x: np.ndarray) -> ForwardPass:
        seen.append(x.shape[0])
        layer = np.maximum(x @ weights, 0)
        return ForwardPass(x, x, (layer, layer[:, :2]))

    component = HiddenKnn.fit(NormalData(fit=fit, validation=fit[:10], forward=forward), HiddenKnnOptions())
    assert seen == [40]  # the fit split, not the validation split
    assert component.prototypes.shape == (40, 5) and component.k == DEFAULT_HIDDEN_KNN_K
    # Fewer images than prototypes (40 < 256): each image's layer output is a prototype.
    np.testing.assert_allclose(component.prototypes, unit_rows(np.maximum(fit @ weights, 0)), atol=1e-6)


def test_the_trainer_chooses_how_many_prototypes_are_fitted_and_how_many_nearest_are_averaged() -> None:
    rng = np.random.default_rng(3)
    fit = rng.random((300, 16)).astype(np.float32)
    weights = rng.normal(size=(16, 5)).astype(np.float32)

    def forward(x: np.ndarray) -> ForwardPass:
        layer = np.maximum(x @ weights, 0)
        return ForwardPass(x, x, (layer, layer[:, :2]))

    normal = NormalData(fit=fit, validation=fit[:10], forward=forward)
    component = HiddenKnn.fit(normal, HiddenKnnOptions(hidden_knn_k=1, hidden_knn_prototypes=32))
    assert component.prototypes.shape == (32, 5) and component.k == 1
    assert component.parameters()["hidden_knn_k"] == 1
    layer = np.maximum(fit[:7] @ weights, 0)
    nearest = (unit_rows(layer) @ component.prototypes.T).max(axis=1)
    np.testing.assert_allclose(component.score(_batch(layer)), 1.0 - nearest, atol=1e-6)


def test_the_default_score_has_hidden_knn_with_the_prototypes_file() -> None:
    assert "hidden-knn" in components_of(DEFAULT_SCORE)
    assert REGISTRY["hidden-knn"] is HiddenKnn and HiddenKnn.file == HIDDEN_KNN_FILE
    assert HiddenKnn.needs_encoder


def test_a_stored_combined_score_with_hidden_knn_is_rebuilt_from_its_parameters_and_file() -> None:
    rng = np.random.default_rng(3)
    hidden = HiddenKnn(rng.normal(size=(10, 5)).astype(np.float32), k=2)
    mse = REGISTRY["mse"].from_parameters({}, None, 16, "")
    score = Score("mse+hidden-knn", (mse, hidden), (0.1, 0.2), (1.0, 2.0))
    rebuilt = Score.from_parameters("mse+hidden-knn", score.parameters(), score.files(), 16)
    layer = rng.normal(size=(4, 5)).astype(np.float32)
    batch = ForwardPass(
        rng.random((4, 16)).astype(np.float32), rng.random((4, 16)).astype(np.float32), (layer,)
    )
    np.testing.assert_allclose(rebuilt(batch), score(batch))


@pytest.mark.parametrize("k", [1, 2, 3, 4, 5, 8])
def test_the_mean_of_the_k_largest_is_that_of_a_full_sort_ties_included(k: int) -> None:
    values = np.random.default_rng(k).integers(0, 5, size=(50, 12)).astype(np.float32)  # many ties
    expected = np.sort(values, axis=1)[:, -k:].mean(axis=1)
    np.testing.assert_allclose(mean_of_largest(values.copy(), k), expected)
