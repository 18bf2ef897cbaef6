"""Self-supervised transformation scores: how sure a classifier is of which geometric
transformation was applied to an image (Golan and El-Yaniv 2018, "GEOM"). Pure numpy.

A classifier trained on normal images learns which way up they are, where their ink sits and
which way they face. A rotated digit, or one class seen through a model of another, leaves it
unsure, so the score is the summed negative log-likelihood of the right transformation over the
whole set: `score(x) = -sum_t log p(t | T_t(x))`. It catches what reconstruction misses: an
autoencoder of all digits reconstructs a rotated 1 (a horizontal stroke) well, a classifier that
has seen 1s standing up does not mistake it for upright.

Every transformation is a gather of the pixels of a square image (rotations by multiples of 90
degrees, a horizontal flip, shifts that fill the uncovered border with 0), so the set is stored
by name and rebuilt exactly.

  rotations   4: rotations by 0, 90, 180, 270 degrees
  dihedral    8: the 4 rotations x {no flip, horizontal flip}: every way up and every mirror image
              (what the `orientation` score's head tells apart)
  geometric   72: GEOM's set, {no flip, flip} x {shift by -s, 0, +s pixels}^2 (rows and columns)
              x the 4 rotations, s a seventh of the side (4 pixels on 28 x 28). Shifts fill with
              0 rather than wrap around: a wrapped edge is a seam the classifier learns to spot
              instead of the object (Fashion-MNIST one-class 0.918 -> 0.933 on class 0)

The classifier is stored as `transform_classifier.npz`: a chain of Dense layers
(`detector.networks.TransformClassifier`) whose last layer gives one logit per transformation. The
component asks for it (`TransformClassifierSpec`), the trainer trains it (trainer.transforms) and
hands it to `Transforms.fit`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import numpy as np
from pydantic import Field

from detector.components.base import Component, ComponentOptions, ForwardPass, NormalData, Setup
from detector.networks import TransformClassifier

TRANSFORM_CLASSIFIER_FILE = "transform_classifier.npz"
TransformSetName = Literal["rotations", "dihedral", "geometric"]
TRANSFORM_SETS: tuple[TransformSetName, ...] = ("rotations", "dihedral", "geometric")
# How many transformations each set has (`len(TransformSet.named(name, ...))`, known without an image).
TRANSFORM_SET_SIZES: dict[str, int] = {"rotations": 4, "dihedral": 8, "geometric": 72}


def _side_of(input_dim: int) -> int:
    side = math.isqrt(input_dim)
    if side * side != input_dim or side < 4:
        raise ValueError(
            f"transformation scores need square images (D = side x side, side >= 4), found D={input_dim}"
        )
    return side


def _shift(side: int) -> int:
    """A seventh of the side: 4 pixels on 28 x 28, the shift measured in docs/detection.md."""
    return max(1, side // 7)


@dataclass(frozen=True)
class TransformSet:
    """A named set of pixel gathers of a side x side image; index 0 is the identity.

    `sources[t, j]` is the pixel that transformation t puts at position j, or side*side for a
    pixel shifted in from outside the image (a 0, appended by `pad`)."""

    name: TransformSetName
    side: int
    sources: np.ndarray  # (T, side*side) int in [0, side*side]

    @classmethod
    def named(cls, name: str, input_dim: int) -> TransformSet:
        """The set `name` for flattened square images of `input_dim` pixels."""
        if name not in TRANSFORM_SETS:
            raise ValueError(f"transformation set must be one of {', '.join(TRANSFORM_SETS)}, found {name!r}")
        side = _side_of(input_dim)
        # The image's pixel indices in the middle of a 3 x 3 canvas of "outside" (index side*side).
        canvas = np.full((3 * side, 3 * side), side * side)
        canvas[side : 2 * side, side : 2 * side] = np.arange(side * side).reshape(side, side)
        flips = (False, True) if name in ("dihedral", "geometric") else (False,)
        d = _shift(side)
        shifts = [(dy, dx) for dy in (0, -d, d) for dx in (0, -d, d)] if name == "geometric" else [(0, 0)]
        sources = []
        for flip in flips:
            flipped = canvas[:, ::-1] if flip else canvas
            for dy, dx in shifts:
                window = flipped[side - dy : 2 * side - dy, side - dx : 2 * side - dx]
                for k in range(4):
                    sources.append(np.rot90(window, k).ravel())
        return cls(name, side, np.stack(sources).astype(np.intp))

    def __len__(self) -> int:
        return int(self.sources.shape[0])

    @staticmethod
    def pad(x: np.ndarray) -> np.ndarray:
        """Rows with one 0 appended: what shifted-in pixels are gathered from."""
        x = np.asarray(x, np.float32)
        return np.concatenate([x, np.zeros((x.shape[0], 1), np.float32)], axis=1)

    def apply_padded(self, padded: np.ndarray, t: int) -> np.ndarray:
        """Transformation `t` of every row of a `pad`ded (n, side*side + 1) batch."""
        return np.ascontiguousarray(padded[:, self.sources[t]])

    def apply(self, x: np.ndarray, t: int) -> np.ndarray:
        """Transformation `t` of every row of a (n, side*side) batch."""
        return self.apply_padded(self.pad(x), t)

    def training_set(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Every transformation of every row, and its label (the transformation's index)."""
        padded = self.pad(x)
        images = np.concatenate([self.apply_padded(padded, t) for t in range(len(self))])
        labels = np.repeat(np.arange(len(self)), x.shape[0])
        return images, labels


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise log-softmax, stable for large logits."""
    z = np.asarray(logits, np.float64)
    z = z - z.max(axis=1, keepdims=True)
    return np.asarray(z - np.log(np.exp(z).sum(axis=1, keepdims=True)))


@dataclass(frozen=True)
class TransformScorer:
    """The transformation score of a batch: -sum_t log p(t | T_t(x)), one value per row."""

    transforms: TransformSet
    classifier: TransformClassifier

    def __post_init__(self) -> None:
        side = self.transforms.side
        if self.classifier.input_dim != side * side or self.classifier.classes != len(self.transforms):
            raise ValueError(
                f"the classifier maps {self.classifier.input_dim} pixels to {self.classifier.classes} "
                f"transformations, expected {side * side} to {len(self.transforms)} "
                f"({self.transforms.name})"
            )

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """Per-row scores (float64); higher is more anomalous."""
        padded = self.transforms.pad(x)
        out = np.zeros(padded.shape[0], np.float64)
        for t in range(len(self.transforms)):
            out -= log_softmax(self.classifier.logits(self.transforms.apply_padded(padded, t)))[:, t]
        return out


@dataclass(frozen=True)
class TransformClassifierSpec:
    """The network `transforms` needs: a classifier of the set `transforms`, trained for at most
    `epochs` epochs by the trainer (trainer.transforms)."""

    transforms: TransformSetName
    epochs: int

    def __str__(self) -> str:
        return f"transformation classifier ({self.transforms}, at most {self.epochs} epoch(s))"

    @property
    def slug(self) -> str:
        """A short name for file names."""
        return self.transforms


class TransformsOptions(ComponentOptions):
    """The transformation classifier's set and training."""

    transforms: TransformSetName = Field(
        "geometric",
        description="the transforms score's set: rotations (4), dihedral (8: rotations x mirror) or "
        "geometric (72: flips x shifts x rotations, the stronger and 18 times costlier to score than "
        "rotations)",
    )
    transform_epochs: int = Field(3, ge=1, description="maximum epochs of the transformation classifier")


class Transforms(Component):
    """`transforms`: the transformation classifier's summed negative log-likelihood."""

    name = "transforms"
    description = (
        "a self-supervised classifier's doubt about which rotation/flip/shift was applied; square images"
    )
    options = TransformsOptions
    parameter_fields: ClassVar[dict[str, tuple[Any, Any]]] = {
        "transforms": (
            TransformSetName | None,
            Field(
                None,
                description="transforms: the set the classifier tells apart (rotations, dihedral, geometric)",
            ),
        )
    }
    required_parameters = ("transforms",)
    file = TRANSFORM_CLASSIFIER_FILE
    file_holds = "the transformation classifier"

    def __init__(self, scorer: TransformScorer) -> None:
        self.scorer = scorer

    @classmethod
    def check(cls, setup: Setup, options: TransformsOptions) -> None:
        """Square images only."""
        super().check(setup, options)
        TransformSet.named(options.transforms, setup.input_dim)

    @classmethod
    def network(cls, options: TransformsOptions) -> TransformClassifierSpec:
        """The classifier of its set."""
        return TransformClassifierSpec(options.transforms, options.transform_epochs)

    @classmethod
    def fit(cls, normal: NormalData, options: TransformsOptions) -> Transforms:
        """The classifier the trainer fitted, checked against its set."""
        classifier = normal.networks.get(cls.network(options))
        if classifier is None:
            raise ValueError("the transforms score needs the transformation classifier")
        transforms = TransformSet.named(options.transforms, int(normal.validation.shape[1]))
        return cls(TransformScorer(transforms, classifier))

    @classmethod
    def from_parameters(
        cls, parameters: Mapping[str, Any], data: bytes | None, input_dim: int, where: str
    ) -> Transforms:
        """The classifier from its file, for the set named in score_parameters."""
        if data is None:
            raise ValueError("the transforms score needs the transformation classifier")
        classifier = TransformClassifier.from_bytes(data, where)
        transforms = TransformSet.named(str(parameters.get("transforms")), input_dim)
        try:
            return cls(TransformScorer(transforms, classifier))
        except ValueError as exc:
            raise ValueError(f"{where}: {exc}") from exc

    def parameters(self) -> dict[str, Any]:
        """The set's name."""
        return {"transforms": self.scorer.transforms.name}

    def file_bytes(self) -> bytes:
        """transform_classifier.npz."""
        return self.scorer.classifier.to_bytes()

    def score(self, batch: ForwardPass) -> np.ndarray:
        """-sum_t log p(t | T_t(x))."""
        return self.scorer(batch.images)
