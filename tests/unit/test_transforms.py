"""The transformation sets, the numpy classifier and the transformation score (components.transforms)."""

from __future__ import annotations

import numpy as np
import pytest

from detector.components.transforms import TransformScorer, TransformSet, log_softmax
from detector.errors import ArtifactError
from detector.networks import TransformClassifier
from detector.score import Score


def _images(n: int, side: int = 28, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((n, side * side), dtype=np.float32)


def test_the_rotation_set_is_the_four_quarter_turns_identity_first() -> None:
    x = _images(3)
    rotations = TransformSet.named("rotations", 784)
    assert len(rotations) == 4
    for k in range(4):
        expected = np.rot90(x.reshape(3, 28, 28), k, axes=(1, 2)).reshape(3, 784)
        np.testing.assert_array_equal(rotations.apply(x, k), expected)


def test_the_geometric_set_has_72_distinct_transformations_identity_first() -> None:
    geometric = TransformSet.named("geometric", 784)
    assert len(geometric) == 72
    np.testing.assert_array_equal(geometric.sources[0], np.arange(784))
    assert len({p.tobytes() for p in geometric.sources}) == 72
    flips_and_turns = [geometric.sources[t] for t in (0, 1, 2, 3, 36, 37, 38, 39)]  # unshifted
    for p in flips_and_turns:  # these move pixels, never drop or repeat one
        np.testing.assert_array_equal(np.sort(p), np.arange(784))


def test_a_shift_fills_the_uncovered_rows_with_zeros_instead_of_wrapping() -> None:
    x = _images(2)
    geometric = TransformSet.named("geometric", 784)
    down = geometric.apply(x, 6 * 4).reshape(2, 28, 28)  # shifts in order (0,0),(0,-4),(0,4),(-4,0),.. (4,0)
    np.testing.assert_array_equal(down[:, :4], 0.0)
    np.testing.assert_array_equal(down[:, 4:], x.reshape(2, 28, 28)[:, :24])


def test_the_training_set_labels_every_image_with_its_transformation() -> None:
    x = _images(5)
    rotations = TransformSet.named("rotations", 784)
    images, labels = rotations.training_set(x)
    assert images.shape == (20, 784) and labels.tolist() == [0] * 5 + [1] * 5 + [2] * 5 + [3] * 5
    np.testing.assert_array_equal(images[7], rotations.apply(x, 1)[2])


def test_non_square_images_are_refused_with_their_size() -> None:
    with pytest.raises(ValueError, match=r"need square images .* found D=780"):
        TransformSet.named("rotations", 780)


def test_an_unknown_set_is_refused_with_the_choices() -> None:
    with pytest.raises(ValueError, match=r"must be one of rotations, dihedral, geometric, found 'mirror'"):
        TransformSet.named("mirror", 784)


def _classifier(classes: int = 4, seed: int = 0) -> TransformClassifier:
    rng = np.random.default_rng(seed)
    return TransformClassifier(
        (rng.normal(size=(784, 16)).astype(np.float32), rng.normal(size=(16, classes)).astype(np.float32)),
        (np.zeros(16, np.float32), np.zeros(classes, np.float32)),
        ("relu", "linear"),
    )


def test_the_classifier_survives_its_file_format() -> None:
    classifier = _classifier()
    again = TransformClassifier.from_bytes(classifier.to_bytes(), "transform_classifier.npz")
    x = _images(4)
    np.testing.assert_array_equal(again.logits(x), classifier.logits(x))
    assert again.activations == ("relu", "linear")


def test_an_unreadable_classifier_file_names_itself() -> None:
    with pytest.raises(ArtifactError, match=r"art/transform_classifier\.npz is not a readable \.npz"):
        TransformClassifier.from_bytes(b"not a zip", "art/transform_classifier.npz")


def test_a_classifier_of_the_wrong_size_is_refused() -> None:
    with pytest.raises(ValueError, match=r"maps 784 pixels to 4 transformations, expected 784 to 72"):
        TransformScorer(TransformSet.named("geometric", 784), _classifier(4))


def test_log_softmax_is_finite_for_huge_logits() -> None:
    out = log_softmax(np.array([[1e6, 0.0], [0.0, 0.0]]))
    np.testing.assert_allclose(out, [[0.0, -1e6], [np.log(0.5), np.log(0.5)]])


def _oriented_images(n: int, seed: int) -> np.ndarray:
    """Noisy 'L' shapes: the one way up is unmistakable, as a digit's is."""
    rng = np.random.default_rng(seed)
    images = rng.random((n, 28, 28), dtype=np.float32) * 0.1
    for i in range(n):
        top, left = rng.integers(2, 8, size=2)
        images[i, top : top + 16, left : left + 3] = 1.0  # the stem
        images[i, top + 13 : top + 16, left : left + 12] = 1.0  # the foot, to the right
    return images.reshape(n, 784)


def test_a_trained_classifier_scores_rotated_images_as_more_anomalous() -> None:
    from trainer.evaluate import auroc
    from trainer.transforms import train_transform_classifier

    x = _oriented_images(300, seed=1)
    classifier, losses = train_transform_classifier(x[:250], x[250:], "rotations", epochs=3, seed=0)
    assert losses["loss"][-1] < losses["loss"][0]
    scorer = TransformScorer(TransformSet.named("rotations", 784), classifier)
    upright = _oriented_images(100, seed=2)
    rotated = TransformSet.named("rotations", 784).apply(upright, 1)
    assert auroc(scorer(upright), scorer(rotated)) > 0.95


def test_a_transformation_score_without_a_classifier_is_refused() -> None:
    with pytest.raises(ValueError, match=r"the mse\+transforms score needs the transformation classifier"):
        Score.from_parameters("mse+transforms", {"combine_mean": [0, 0], "combine_std": [1, 1]}, {}, 784)


def test_a_score_name_is_components_joined_by_plus() -> None:
    from detector.score import components_of

    assert components_of("mse") == ("mse",)
    assert components_of("nmse+transforms+knn") == ("nmse", "transforms", "knn")
    with pytest.raises(ValueError, match=r"unknown component\(s\) 'msq'; expected one of mse, nmse"):
        components_of("msq+knn")
    with pytest.raises(ValueError, match=r"each at most once"):
        components_of("mse+mse")


def test_combined_scores_add_the_standardised_components() -> None:
    from detector.score import combine, standardisation

    a, b = np.array([1.0, 3.0]), np.array([10.0, 30.0])
    np.testing.assert_allclose(combine([a, b], (1.0, 10.0), (2.0, 10.0)), [0.0, 3.0])
    mean, std = standardisation([a, b])
    np.testing.assert_allclose(combine([a, b], mean, std), [-2.0, 2.0])


def test_knn_distance_is_zero_for_a_reference_image_and_grows_away_from_it() -> None:
    from detector.components.knn import knn_distances, unit_rows

    reference = _images(50, seed=3)
    other = _images(1, seed=4)
    near = knn_distances(reference[:1] * 2.0, unit_rows(reference), k=1)  # cosine: scale-free
    far = knn_distances(other, unit_rows(reference), k=1)
    assert near[0] == pytest.approx(0.0, abs=1e-6)
    assert far[0] > 0.1
    with pytest.raises(ValueError, match=r"k must be in 1\.\.50"):
        knn_distances(other, unit_rows(reference), k=51)


def _by_hand(image: np.ndarray, flip: bool, dy: int, dx: int, k: int) -> np.ndarray:
    """One geometric transformation written out: flip, shift with zero fill, quarter turns."""
    side = image.shape[0]
    out = image[:, ::-1] if flip else image
    moved = np.zeros_like(out)
    moved[max(dy, 0) : side + min(dy, 0), max(dx, 0) : side + min(dx, 0)] = out[
        max(-dy, 0) : side + min(-dy, 0), max(-dx, 0) : side + min(-dx, 0)
    ]
    return np.rot90(moved, k)


@pytest.mark.parametrize("side", [12, 28])
def test_every_geometric_transformation_is_a_flip_a_zero_filled_shift_and_a_turn(side: int) -> None:
    x = np.random.default_rng(5).random((3, side * side), dtype=np.float32)
    geometric = TransformSet.named("geometric", side * side)
    d = max(1, side // 7)
    t = 0
    for flip in (False, True):
        for dy in (0, -d, d):
            for dx in (0, -d, d):
                for k in range(4):
                    expected = [_by_hand(img.reshape(side, side), flip, dy, dx, k).ravel() for img in x]
                    np.testing.assert_array_equal(geometric.apply(x, t), np.stack(expected), err_msg=f"t={t}")
                    t += 1
    assert t == len(geometric) == 72
