"""The hidden-mahalanobis score: distance of the encoder's first layer to a Gaussian of normal outputs."""

from __future__ import annotations

import io

import numpy as np
import pytest

from detector.components import REGISTRY
from detector.components.base import ComponentOptions, ForwardPass, NormalData, Setup
from detector.components.hidden_knn import HiddenKnn
from detector.components.hidden_mahalanobis import (
    HIDDEN_GAUSSIAN_FILE,
    HIDDEN_GAUSSIAN_FIT_ROWS,
    HiddenMahalanobis,
)
from detector.components.mahalanobis import LatentGaussian, mahalanobis_distances
from detector.score import DEFAULT_SCORE, Score, components_of


def _batch(layer: np.ndarray) -> ForwardPass:
    rows = layer.shape[0]
    return ForwardPass(
        np.zeros((rows, 16), np.float32), np.zeros((rows, 16), np.float32), (layer, layer[:, :2])
    )


def _npz(**arrays: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def test_the_score_is_the_mahalanobis_distance_of_the_first_layer() -> None:
    mean, precision = np.array([1.0, 0.0]), np.diag([1.0, 4.0])  # std 1 and 0.5
    layer = np.array([[1.0, 0.0], [3.0, 0.0], [1.0, 1.0], [3.0, 1.0]], np.float32)
    scores = HiddenMahalanobis(LatentGaussian(mean, precision)).score(_batch(layer))
    # 2 along the wide axis and 1 along the narrow one are both 2 std away.
    np.testing.assert_allclose(scores, [0.0, 2.0, 2.0, np.sqrt(8.0)], atol=1e-6)


def test_the_float32_whitening_gives_the_quadratic_form_of_a_correlated_gaussian() -> None:
    rng = np.random.default_rng(1)
    normal = rng.normal(size=(4000, 64)) @ rng.normal(size=(64, 64)) + 3.0  # correlated units
    gaussian = LatentGaussian.fit(normal)
    layer = (normal[:256] * rng.uniform(0.5, 2.0, (256, 1))).astype(np.float32)
    expected = mahalanobis_distances(layer, gaussian.mean, gaussian.precision)
    np.testing.assert_allclose(HiddenMahalanobis(gaussian).score(_batch(layer)), expected, rtol=1e-5)


def test_a_precision_that_is_not_positive_definite_is_refused_naming_the_file() -> None:
    bad = _npz(mean=np.zeros(2), precision=np.array([[1.0, 2.0], [2.0, 1.0]]))
    with pytest.raises(
        ValueError, match=r"g\.npz: the hidden-mahalanobis precision must be positive definite"
    ):
        HiddenMahalanobis.from_parameters({}, bad, 784, "g.npz")


def test_units_that_fire_at_an_unusual_strength_score_where_the_cosine_view_does_not() -> None:
    """The length of the layer's output counts: the same direction twice as strong is far."""
    rng = np.random.default_rng(0)
    normal = rng.normal(1.0, 0.05, size=(5000, 8)).clip(0)
    component = HiddenMahalanobis(LatentGaussian.fit(normal))
    typical, doubled = normal[:1], 2 * normal[:1]
    assert component.score(_batch(typical))[0] < 5 < component.score(_batch(doubled))[0]
    cosine = HiddenKnn(normal[:100].astype(np.float32), k=1)
    assert cosine.score(_batch(doubled.astype(np.float32)))[0] == pytest.approx(0.0, abs=1e-6)


def test_the_component_fits_on_the_first_encoder_layer_of_the_fit_split() -> None:
    rng = np.random.default_rng(2)
    fit = rng.random((400, 16)).astype(np.float32)
    weights = rng.normal(size=(16, 5)).astype(np.float32)
    seen: list[int] = []

    def forward(x: np.ndarray) -> ForwardPass:
        seen.append(x.shape[0])
        layer = np.maximum(x @ weights, 0)
        return ForwardPass(x, x, (layer, layer[:, :2]))

    component = HiddenMahalanobis.fit(
        NormalData(fit=fit, validation=fit[:10], forward=forward), ComponentOptions()
    )
    assert seen == [400]  # the fit split, not the validation split
    expected = LatentGaussian.fit(np.maximum(fit @ weights, 0))
    np.testing.assert_allclose(component.gaussian.mean, expected.mean)
    np.testing.assert_allclose(component.gaussian.precision, expected.precision)
    assert component.layer == 0


def test_a_large_fit_split_is_drawn_down_to_the_fit_rows_with_the_seed() -> None:
    fit = np.random.default_rng(3).random((HIDDEN_GAUSSIAN_FIT_ROWS + 500, 4)).astype(np.float32)
    seen: list[np.ndarray] = []

    def forward(x: np.ndarray) -> ForwardPass:
        seen.append(x)
        return ForwardPass(x, x, (x, x[:, :2]))

    HiddenMahalanobis.fit(
        NormalData(fit=fit, validation=fit[:10], forward=forward, seed=5), ComponentOptions()
    )
    HiddenMahalanobis.fit(
        NormalData(fit=fit, validation=fit[:10], forward=forward, seed=5), ComponentOptions()
    )
    assert seen[0].shape == (HIDDEN_GAUSSIAN_FIT_ROWS, 4)
    np.testing.assert_array_equal(seen[0], seen[1])


def test_the_gaussian_round_trips_through_the_artifact_file() -> None:
    rng = np.random.default_rng(4)
    component = HiddenMahalanobis(LatentGaussian.fit(rng.normal(size=(300, 6))))
    rebuilt = HiddenMahalanobis.from_parameters(component.parameters(), component.file_bytes(), 784, "g.npz")
    assert rebuilt.parameters() == {"hidden_mahalanobis_layer": 0}
    np.testing.assert_array_equal(rebuilt.gaussian.mean, component.gaussian.mean)
    np.testing.assert_array_equal(rebuilt.gaussian.precision, component.gaussian.precision)


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (None, "needs the Gaussian of normal outputs of the encoder's first layer"),
        (b"not a numpy file", "g.npz is unreadable"),
        (_npz(mean=np.zeros(3)), r"must hold the arrays mean and precision, found \['mean'\]"),
        (_npz(mean=np.zeros(3), precision=np.eye(4)), r"mean \(3,\) and precision \(4, 4\), expected"),
        (_npz(mean=np.zeros((3, 1)), precision=np.eye(3)), r"mean \(3, 1\) and precision \(3, 3\)"),
        (_npz(mean=np.zeros(2), precision=np.full((2, 2), np.inf)), "precision must hold finite floats"),
        (
            _npz(mean=np.zeros(2, np.int64), precision=np.eye(2)),
            "mean must hold finite floats, found dtype int64",
        ),
    ],
    ids=[
        "missing",
        "unreadable",
        "no-precision",
        "widths-differ",
        "mean-not-a-vector",
        "not-finite",
        "integers",
    ],
)
def test_a_bad_gaussian_file_is_refused_naming_it_and_what_was_expected(
    data: bytes | None, expected: str
) -> None:
    with pytest.raises(ValueError, match=expected):
        HiddenMahalanobis.from_parameters({}, data, 784, "g.npz")


def test_a_gaussian_of_another_width_than_the_layer_is_refused_naming_both() -> None:
    component = HiddenMahalanobis(LatentGaussian(np.zeros(6), np.eye(6)))
    with pytest.raises(ValueError, match="Gaussian has 6 values, encoder layer 0 gives 5"):
        component.score(_batch(np.ones((2, 5), np.float32)))


def test_the_default_score_is_mse_orientation_hidden_knn_and_hidden_mahalanobis() -> None:
    assert components_of(DEFAULT_SCORE) == ("mse", "orientation", "hidden-knn", "hidden-mahalanobis")
    assert REGISTRY["hidden-mahalanobis"] is HiddenMahalanobis
    assert HiddenMahalanobis.file == HIDDEN_GAUSSIAN_FILE and HiddenMahalanobis.needs_encoder


def test_a_stored_combined_score_with_hidden_mahalanobis_is_rebuilt_from_its_parameters_and_file() -> None:
    rng = np.random.default_rng(5)
    hidden = HiddenMahalanobis(LatentGaussian.fit(rng.normal(size=(200, 5))))
    mse = REGISTRY["mse"].from_parameters({}, None, 16, "")
    score = Score("mse+hidden-mahalanobis", (mse, hidden), (0.1, 0.2), (1.0, 2.0))
    rebuilt = Score.from_parameters("mse+hidden-mahalanobis", score.parameters(), score.files(), 16)
    layer = rng.normal(size=(4, 5)).astype(np.float32)
    batch = ForwardPass(
        rng.random((4, 16)).astype(np.float32), rng.random((4, 16)).astype(np.float32), (layer,)
    )
    np.testing.assert_allclose(rebuilt(batch), score(batch))


def test_it_refuses_an_encoder_whose_first_layer_is_not_a_hidden_one_before_any_training() -> None:
    """A convolutional encoder's first Dense layer is its latent code: a Gaussian fitted there would
    be the mahalanobis score under another name."""
    dense = ("dense-32", "dense-64-16")
    HiddenMahalanobis.check(Setup(784, 100, "dense-32", dense), ComponentOptions())
    with pytest.raises(
        ValueError, match=r"hidden-mahalanobis score needs a dense architecture .* found conv"
    ):
        HiddenMahalanobis.check(Setup(784, 100, "conv", dense), ComponentOptions())
