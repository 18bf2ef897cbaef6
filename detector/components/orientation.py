"""`orientation`: how unsure the autoencoder's own transformation head is that an image is as given.

The trainer trains the autoencoder and a small linear head together (one multi-task network,
`trainer.multitask`): the head reads the encoder's first layer and learns, from normal images only,
which of a set of transformations was applied: in the default the 72 `geometric` ones (4 rotations
x {no flip, mirror} x 9 shifts of 0 or 4 pixels; `dihedral`, the 8 without shifts, before
2026-11-30). The shared layer so learns where the ink of an upright, unmirrored normal image sits, which
reconstruction alone does not: an autoencoder of all digits reconstructs a rotated 1 (a horizontal
stroke) well.

At serving time only the image as given is classified: `score(x) = -log p(identity | x)`, one
64 x 72 matrix product on a layer the autoencoder computes anyway (about 4.5% of dense-64-16's
multiply-adds), where the `transforms` score runs a separate 784-512-256 classifier on every
transformed copy (about 20 times the autoencoder). Pure numpy.

The head is stored as `orientation_head.npz`, a chain of Dense layers in the format of
`detector.networks.TransformClassifier` (one linear layer in the trained default).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
from pydantic import Field

from detector.components.base import Component, ComponentOptions, ForwardPass, NormalData, Setup
from detector.components.transforms import (
    TRANSFORM_SET_SIZES,
    TRANSFORM_SETS,
    TransformSet,
    TransformSetName,
)
from detector.networks import TransformClassifier

ORIENTATION_HEAD_FILE = "orientation_head.npz"
# The set the trainer's head learns unless told otherwise.
DEFAULT_ORIENTATION_TRANSFORMS: TransformSetName = "geometric"
# What an artifact without `orientation_transforms` meant (the set of the first orientation heads).
LEGACY_ORIENTATION_TRANSFORMS: TransformSetName = "dihedral"


def identity_nll(head: TransformClassifier, layer: np.ndarray) -> np.ndarray:
    """-log p(identity | x) per row, from the head's logits on an encoder layer's outputs.

    logsumexp(logits) - logits[identity], the exponentials in float32 and in place: 3.5 times
    faster than a float64 log-softmax of all 72 `geometric` logits (82 against 285 us at batch 256
    on one core), within 1e-6 of it."""
    logits = np.asarray(head.logits(layer), np.float32)
    top = logits.max(axis=1, keepdims=True)
    identity = np.asarray(logits[:, 0] - top[:, 0], np.float64)
    np.subtract(logits, top, out=logits)
    np.exp(logits, out=logits)
    return np.asarray(np.log(logits.sum(axis=1, dtype=np.float64)) - identity)


@dataclass(frozen=True)
class OrientationHeadSpec:
    """The network `orientation` needs: a linear head on the encoder's first layer that tells the
    set `transforms` apart, trained together with the autoencoder (trainer.multitask)."""

    transforms: TransformSetName

    def __str__(self) -> str:
        return f"orientation head ({self.transforms})"

    @property
    def slug(self) -> str:
        """A short name for file names."""
        return f"orientation-{self.transforms}"


class OrientationOptions(ComponentOptions):
    """The set the orientation head learns."""

    orientation_transforms: TransformSetName = Field(
        DEFAULT_ORIENTATION_TRANSFORMS,
        description="the orientation score's set, which its head learns with the autoencoder: geometric "
        "(72: rotations x mirror x 4-pixel shifts), dihedral (8: rotations x mirror) or rotations (4); "
        "scoring costs the same for each (only the image as given is classified)",
    )


class Orientation(Component):
    """`orientation`: -log p(identity | x) from a head on the encoder's first layer."""

    name = "orientation"
    description = (
        "-log p(identity | x) from a head trained with the autoencoder on its first layer; dense "
        "architectures, square images"
    )
    options = OrientationOptions
    needs_encoder = True
    needs_dense = True
    parameter_fields: ClassVar[dict[str, tuple[Any, Any]]] = {
        "orientation_transforms": (
            TransformSetName | None,
            Field(None, description="orientation: the set the head tells apart (geometric in the default)"),
        ),
        "orientation_layer": (
            int | None,
            Field(None, ge=0, description="orientation: the encoder layer the head reads (0: the first)"),
        ),
    }
    required_parameters = ("orientation_transforms", "orientation_layer")
    file = ORIENTATION_HEAD_FILE
    file_holds = "the orientation head"

    def __init__(self, head: TransformClassifier, transforms: TransformSetName, layer: int = 0) -> None:
        expected = TRANSFORM_SET_SIZES[transforms]
        if head.classes != expected:
            raise ValueError(
                f"the orientation head gives {head.classes} logits, expected {expected} ({transforms})"
            )
        self.head = head
        self.transforms: TransformSetName = transforms
        self.layer = layer

    @classmethod
    def check(cls, setup: Setup, options: OrientationOptions) -> None:
        """A dense architecture and square images."""
        super().check(setup, options)
        TransformSet.named(options.orientation_transforms, setup.input_dim)

    @classmethod
    def network(cls, options: OrientationOptions) -> OrientationHeadSpec:
        """The head of its set."""
        return OrientationHeadSpec(options.orientation_transforms)

    @classmethod
    def fit(cls, normal: NormalData, options: OrientationOptions) -> Orientation:
        """The head the trainer trained with the autoencoder."""
        head = normal.networks.get(cls.network(options))
        if head is None:
            raise ValueError("the orientation score needs the head trained with the autoencoder")
        return cls(head, options.orientation_transforms, 0)

    @classmethod
    def from_parameters(
        cls, parameters: Mapping[str, Any], data: bytes | None, input_dim: int, where: str
    ) -> Orientation:
        """The head from its file; the set and layer from score_parameters."""
        if data is None:
            raise ValueError("the orientation score needs the orientation head")
        transforms = parameters.get("orientation_transforms") or LEGACY_ORIENTATION_TRANSFORMS
        if transforms not in TRANSFORM_SETS:
            raise ValueError(
                f"orientation_transforms must be one of {', '.join(TRANSFORM_SETS)}, found {transforms!r}"
            )
        head = TransformClassifier.from_bytes(data, where)
        try:
            return cls(head, transforms, int(parameters.get("orientation_layer") or 0))
        except ValueError as exc:
            raise ValueError(f"{where}: {exc}") from exc

    def parameters(self) -> dict[str, Any]:
        """The set and the layer the head reads."""
        return {"orientation_transforms": self.transforms, "orientation_layer": self.layer}

    def file_bytes(self) -> bytes:
        """orientation_head.npz."""
        return self.head.to_bytes()

    def score(self, batch: ForwardPass) -> np.ndarray:
        """-log p(identity | x)."""
        layer = batch.encoder_layer(self.layer)
        if layer.shape[1] != self.head.input_dim:
            raise ValueError(
                f"the orientation head reads {self.head.input_dim} values, encoder layer "
                f"{self.layer} gives {layer.shape[1]}"
            )
        return identity_nll(self.head, layer)
