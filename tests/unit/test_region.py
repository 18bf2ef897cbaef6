"""The region: the window holding the largest share of an image's squared reconstruction error."""

from __future__ import annotations

import json

import fakeredis
import numpy as np
import pytest

from detector.engines.common import Explanation
from detector.region import default_window, locate_regions, square_side
from tests.support import build_runner, stream
from worker.loaded_model import LoadedModel
from worker.scoring import DecisionRule


def test_square_images_have_a_side_and_others_none() -> None:
    assert square_side(784) == 28
    assert square_side(16) == 4
    assert square_side(785) is None
    assert square_side(1) is None


def test_the_window_is_a_quarter_of_the_side() -> None:
    assert default_window(28) == 7
    assert default_window(3) == 1


def test_a_defect_is_found_where_it_is_with_its_share() -> None:
    errors = np.full((1, 28, 28), 0.001)
    errors[0, 20:27, 3:10] = 1.0  # rows 20-26 (y), columns 3-9 (x)
    regions = locate_regions(errors.reshape(1, -1), 28)
    assert regions.field(0) == "3,20,10,27"
    expected_share = 49.0 / (49.0 + 0.001 * (784 - 49))
    assert regions.shares[0] == pytest.approx(expected_share)


def test_x_is_the_column_and_the_ends_are_exclusive() -> None:
    errors = np.zeros((1, 8, 8))
    errors[0, 0, 7] = 5.0  # top-right pixel
    regions = locate_regions(errors.reshape(1, -1), 8, window=2)
    x0, y0, x1, y1 = regions.boxes[0]
    assert (x0, y0, x1, y1) == (6, 0, 8, 2)
    assert x0 <= 7 < x1 and y0 <= 0 < y1
    assert regions.shares[0] == 1.0


def test_every_row_of_a_batch_is_located_on_its_own() -> None:
    rng = np.random.default_rng(0)
    errors = rng.random((50, 28, 28)) * 0.01
    spots = rng.integers(0, 22, size=(50, 2))
    for i, (y, x) in enumerate(spots):
        errors[i, y : y + 7, x : x + 7] += 1.0
    regions = locate_regions(errors.reshape(50, -1), 28)
    assert np.array_equal(regions.boxes[:, 0], spots[:, 1])
    assert np.array_equal(regions.boxes[:, 1], spots[:, 0])
    assert np.all((regions.shares > 0) & (regions.shares <= 1))
    assert regions.fields() == [regions.field(i) for i in range(50)]
    assert regions.fields()[0] == f"{spots[0][1]},{spots[0][0]},{spots[0][1] + 7},{spots[0][0] + 7}"


def test_the_sliding_sums_equal_a_brute_force_search() -> None:
    rng = np.random.default_rng(1)
    errors = rng.random((5, 10, 10)) ** 4
    regions = locate_regions(errors.reshape(5, -1), 10, window=3)
    for i in range(5):
        sums = {(x, y): errors[i, y : y + 3, x : x + 3].sum() for y in range(8) for x in range(8)}
        (x, y), best = max(sums.items(), key=lambda kv: kv[1])
        assert tuple(regions.boxes[i]) == (x, y, x + 3, y + 3)
        assert regions.shares[i] == pytest.approx(best / errors[i].sum())


def test_an_image_without_error_gets_share_zero() -> None:
    regions = locate_regions(np.zeros((2, 16)), 4)
    assert regions.shares.tolist() == [0.0, 0.0]
    assert regions.field(0) == "0,0,1,1"


def test_a_wrong_width_or_window_is_refused_naming_both() -> None:
    with pytest.raises(ValueError, match=r"shape \(1, 15\), expected \(n, 16\)"):
        locate_regions(np.zeros((1, 15)), 4)
    with pytest.raises(ValueError, match="window 5 must be between 1 and the image side 4"):
        locate_regions(np.zeros((1, 16)), 4, window=5)


# -- in the worker's output ---------------------------------------------------------------------


class SpotScorer:
    """Score = brightest pixel; its squared error is the image itself (a bright spot is the error)."""

    input_dim = 16
    engine = "fake"
    model_version = "spot-v1"

    def __init__(self) -> None:
        self.located_rows: list[int] = []  # by score_with_squared_error (the scores stream)
        self.explained_rows: list[int] = []  # the flagged rows, explained (region and why)
        self.scored_rows: list[int] = []  # by score_batch alone

    def score_batch(self, images: np.ndarray) -> np.ndarray:
        self.scored_rows.append(images.shape[0])
        return self._scores(images)

    def _scores(self, images: np.ndarray) -> np.ndarray:
        return images.max(axis=1).astype(np.float64)

    def score_with_squared_error(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        self.located_rows.append(images.shape[0])
        return self._scores(images), np.square(images)

    def explain(self, images: np.ndarray) -> Explanation:
        self.explained_rows.append(images.shape[0])
        return Explanation(("max-pixel",), self._scores(images).reshape(-1, 1), np.square(images))


def spot_model(side: int | None = 4) -> tuple[LoadedModel, SpotScorer]:
    scorer = SpotScorer()
    rule = DecisionRule(0.5, "p95", 0.1, 0.1, 0.05, np.linspace(0, 0.6, 101))
    return LoadedModel(scorer, rule, 1 / 255, "spot", region_side=side), scorer


def spot_image(x: int, y: int) -> bytes:
    image = np.zeros((4, 4), np.uint8)
    image[y, x] = 255
    return image.tobytes()


def test_output_and_scores_entries_carry_the_region_of_a_square_image() -> None:
    r = fakeredis.FakeRedis()
    model, _ = spot_model()
    r.xadd("images", {"image": spot_image(x=3, y=0), "id": "spot"})
    r.xadd("images", {"image": bytes(16), "id": "dark"})
    build_runner(r, model=model, scores_stream="scores").drain()
    [anomaly] = stream(r, "anomalies")
    assert anomaly["region"] == "3,0,4,1"  # window 1 on a 4 x 4 image: the pixel itself
    assert float(anomaly["region_share"]) == 1.0
    scores = {e["id"]: e for e in stream(r, "scores")}
    assert scores["spot"]["region"] == "3,0,4,1"
    assert scores["dark"]["region"] == "0,0,1,1" and float(scores["dark"]["region_share"]) == 0.0


def test_without_a_scores_stream_only_flagged_rows_are_located() -> None:
    r = fakeredis.FakeRedis()
    model, scorer = spot_model()
    r.xadd("images", {"image": spot_image(x=1, y=2)})
    for _ in range(9):
        r.xadd("images", {"image": bytes(16)})
    build_runner(r, model=model).drain()
    assert scorer.scored_rows == [10] and scorer.explained_rows == [1]  # one more pass, of 1 row
    assert scorer.located_rows == []
    assert stream(r, "anomalies")[0]["region"] == "1,2,2,3"


def test_with_a_scores_stream_every_row_is_located_from_the_scoring_pass() -> None:
    r = fakeredis.FakeRedis()
    model, scorer = spot_model()
    r.xadd("images", {"image": spot_image(x=1, y=2), "id": "spot"})
    for _ in range(9):
        r.xadd("images", {"image": bytes(16)})
    build_runner(r, model=model, scores_stream="scores").drain()
    assert scorer.located_rows == [10]  # one pass for the batch's scores and its 10 regions
    assert scorer.scored_rows == []  # no second pass for the scores alone
    assert scorer.explained_rows == [1]  # the flagged row's score components
    regions = [(e["id"] == "spot", e["region"]) for e in stream(r, "scores")]
    assert sorted(set(regions)) == [(False, "0,0,1,1"), (True, "1,2,2,3")] and len(regions) == 10
    assert stream(r, "anomalies")[0]["region"] == "1,2,2,3"


def test_images_that_are_not_square_have_no_region_fields() -> None:
    r = fakeredis.FakeRedis()
    model, scorer = spot_model(side=None)
    r.xadd("images", {"image": spot_image(x=0, y=0)})
    build_runner(r, model=model, scores_stream="scores").drain()
    assert "region" not in stream(r, "anomalies")[0]
    assert "region_share" not in stream(r, "scores")[0]
    assert scorer.located_rows == []
    assert json.loads(stream(r, "anomalies")[0]["score_components"]) == {"max-pixel": 1.0}


def test_the_real_engine_locates_a_defect_painted_on_a_digit(tiny_artifact) -> None:
    from detector.loading import load_scorer
    from tests.conftest import mnist_sample

    _, scorer = load_scorer(tiny_artifact, "numpy")
    digit = mnist_sample(1, seed=3)[0][0].reshape(28, 28).copy()
    digit[2:9, 18:25] = 1.0  # a bright square where digits have no ink
    errors = scorer.squared_error(digit.reshape(1, -1).astype(np.float32))
    np.testing.assert_allclose(errors.mean(axis=1), scorer.score_batch(digit.reshape(1, -1)), rtol=1e-5)
    regions = locate_regions(errors, 28)
    x0, y0 = regions.boxes[0][:2]
    assert abs(x0 - 18) <= 2 and abs(y0 - 2) <= 2, regions.field(0)
    assert regions.shares[0] > 0.3
