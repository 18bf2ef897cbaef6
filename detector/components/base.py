"""What a score component is: one interface for fitting, scoring and the artifact.

A component turns one batch's forward pass (`ForwardPass`: the images in model space, their
reconstructions and, when it asks for them, the encoder's layer outputs) into one number per
image, higher meaning more anomalous. It may fit something on normal data (a Gaussian of codes,
reference images), keep numbers in `baseline.json`'s `score_parameters` and one file of its own in
the artifact. `detector.score` combines components; `detector.components` registers them by name.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import cached_property
from typing import Any, ClassVar

import numpy as np

from detector.networks import TransformClassifier


def row_mean_square(a: np.ndarray) -> np.ndarray:
    """Per-row mean of squares (float64), without a squared copy of the batch.

    einsum in the input's precision: np.mean(..., dtype=float64) of a float64 batch took 25 times
    longer (about 5 ms at 256 x 784 on 2 cores) and made the default score 4 times slower."""
    return np.asarray(np.einsum("ij,ij->i", a, a), np.float64) / a.shape[1]


@dataclass(frozen=True)
class ForwardPass:
    """One batch through the autoencoder, in model space: what every component scores.

    `encoder_layers` holds the output of each Dense layer of the encoder, input side first, so
    the last is the latent code; engines fill it only when a component asks (`needs_encoder`)."""

    images: np.ndarray
    reconstructions: np.ndarray
    encoder_layers: tuple[np.ndarray, ...] = ()

    @cached_property
    def row_mse(self) -> np.ndarray:
        """Per-row mean squared reconstruction error (float64), computed once for every component."""
        return row_mean_square(np.subtract(self.images, self.reconstructions))

    @property
    def codes(self) -> np.ndarray:
        """The latent code of every row; ValueError when the engine did not compute it."""
        if not self.encoder_layers:
            raise ValueError("this score needs the encoder's outputs, and the forward pass has none")
        return self.encoder_layers[-1]

    def encoder_layer(self, index: int) -> np.ndarray:
        """The output of the encoder's Dense layer `index`; ValueError naming what exists."""
        if not 0 <= index < len(self.encoder_layers):
            raise ValueError(
                f"this score reads encoder layer {index}, the forward pass has "
                f"{len(self.encoder_layers)} encoder layer outputs"
            )
        return self.encoder_layers[index]


# The set the trainer's orientation head learns unless told otherwise (detector.components.orientation).
DEFAULT_ORIENTATION_TRANSFORMS = "geometric"


@dataclass(frozen=True)
class NormalData:
    """What components fit on: normal images in model space and the trained networks' views of them.

    `fit` is the split the autoencoder was trained on, `validation` the held-out split the
    statistics are fitted on. The options are those of `anomaly-trainer train`."""

    fit: np.ndarray
    validation: np.ndarray
    forward: Callable[[np.ndarray], ForwardPass]  # the trained autoencoder, encoder layers included
    seed: int = 0
    knn_k: int | None = None
    knn_reference_rows: int | None = None
    hidden_knn_k: int | None = None  # None: the component's defaults
    hidden_knn_prototypes: int | None = None
    transforms: str | None = None
    classifier: TransformClassifier | None = None  # trained by the trainer (a network of its own)
    # Trained by the trainer together with the autoencoder, on its first encoder layer.
    orientation_head: TransformClassifier | None = None
    orientation_transforms: str = DEFAULT_ORIENTATION_TRANSFORMS  # the set the head tells apart

    def fit_sample(self, rows: int) -> np.ndarray:
        """The fit split, or a seeded draw of `rows` of it (in order) when it has more."""
        if self.fit.shape[0] <= rows:
            return self.fit
        pick = np.random.default_rng(self.seed).choice(self.fit.shape[0], rows, replace=False)
        return self.fit[np.sort(pick)]


class Component(ABC):
    """One view of "not normal", scored per image."""

    name: ClassVar[str]
    needs_encoder: ClassVar[bool] = False  # reads ForwardPass.encoder_layers
    # Fields this component keeps in baseline.json's score_parameters: name -> (type, pydantic Field).
    parameter_fields: ClassVar[dict[str, tuple[Any, Any]]] = {}
    # Parameters that must be set in an artifact whose score has this component.
    required_parameters: ClassVar[tuple[str, ...]] = ()
    # The artifact file this component owns, if any, and what it holds (for messages).
    file: ClassVar[str | None] = None
    file_holds: ClassVar[str] = ""

    @classmethod
    def fit(cls, normal: NormalData) -> Component:
        """Fit on normal data; a component with nothing to fit takes its default parameters."""
        return cls.from_parameters({}, None, int(normal.validation.shape[1]), "")

    @classmethod
    @abstractmethod
    def from_parameters(
        cls, parameters: Mapping[str, Any], data: bytes | None, input_dim: int, where: str
    ) -> Component:
        """Rebuild from the artifact: score_parameters and this component's file (`where` names it)."""

    @classmethod
    def check_parameters(cls, parameters: Mapping[str, Any], latent_dim: int | None) -> None:
        """ValueError when stored parameters cannot belong together (checked with baseline.json)."""
        return None  # most components store nothing that could disagree

    def parameters(self) -> dict[str, Any]:
        """What goes into score_parameters."""
        return {}

    def file_bytes(self) -> bytes | None:
        """The content of this component's artifact file, if it has one."""
        return None

    @abstractmethod
    def score(self, batch: ForwardPass) -> np.ndarray:
        """Per-row scores (float64) of a batch in model space."""
