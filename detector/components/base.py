"""What a score component is: one interface for fitting, scoring and the artifact.

A component turns one batch's forward pass (`ForwardPass`: the images in model space, their
reconstructions and, when it asks for them, the encoder's layer outputs) into one number per
image, higher meaning more anomalous. It may fit something on normal data (a Gaussian of codes,
reference images) with options of its own (`ComponentOptions`: the trainer's flags), check before
training that it can be fitted (`check`: a dense architecture, square images), keep numbers in
`baseline.json`'s `score_parameters` and one file of its own in the artifact. `detector.score`
combines components; `detector.components` registers them by name.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, ClassVar

import numpy as np
from pydantic import BaseModel, ConfigDict

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


class ComponentOptions(BaseModel):
    """A component's training options: typed and defaulted fields with one line of help each.

    Each field is the trainer's flag of the same name (`knn_k` is `--knn-k`) and its description
    the flag's help; the names are unique across components (`detector.score.ScoreOptions`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)


@dataclass(frozen=True)
class Setup:
    """What a component will be fitted in, known before anything is trained: what its check reads."""

    input_dim: int  # values per image
    fit_rows: int  # normal images in the fit split
    architecture: str
    # The architectures that are chains of Dense layers: their encoder's first layer is a hidden one.
    dense_architectures: tuple[str, ...]

    @property
    def dense(self) -> bool:
        """Whether the autoencoder is a chain of Dense layers."""
        return self.architecture in self.dense_architectures


@dataclass(frozen=True)
class NormalData:
    """What components fit on: normal images in model space and the trained networks' views of them.

    `fit` is the split the autoencoder was trained on, `validation` the held-out split the
    statistics are fitted on. `networks` holds what the trainer trained for a component besides the
    autoencoder, under the spec the component asked for (`Component.network`)."""

    fit: np.ndarray
    validation: np.ndarray
    forward: Callable[[np.ndarray], ForwardPass]  # the trained autoencoder, encoder layers included
    seed: int = 0
    networks: Mapping[Hashable, TransformClassifier] = field(default_factory=dict)

    def fit_sample(self, rows: int) -> np.ndarray:
        """The fit split, or a seeded draw of `rows` of it (in order) when it has more."""
        if self.fit.shape[0] <= rows:
            return self.fit
        pick = np.random.default_rng(self.seed).choice(self.fit.shape[0], rows, replace=False)
        return self.fit[np.sort(pick)]


class Component(ABC):
    """One view of "not normal", scored per image, with everything it is: options, check and fit."""

    name: ClassVar[str]
    description: ClassVar[str]  # one line: the trainer's --score help, the report's titles
    options: ClassVar[type[ComponentOptions]] = ComponentOptions  # none unless it declares its own
    needs_encoder: ClassVar[bool] = False  # reads ForwardPass.encoder_layers
    # Reads the encoder's first layer as a hidden layer: only a chain of Dense layers has one (a
    # convolutional encoder's first Dense layer is its latent code).
    needs_dense: ClassVar[bool] = False
    # Fields this component keeps in baseline.json's score_parameters: name -> (type, pydantic Field).
    parameter_fields: ClassVar[dict[str, tuple[Any, Any]]] = {}
    # Parameters that must be set in an artifact whose score has this component.
    required_parameters: ClassVar[tuple[str, ...]] = ()
    # The artifact file this component owns, if any, and what it holds (for messages).
    file: ClassVar[str | None] = None
    file_holds: ClassVar[str] = ""

    @classmethod
    def check(cls, setup: Setup, options: Any) -> None:
        """ValueError naming what this component needs and `setup` lacks: before anything trains."""
        if cls.needs_dense and not setup.dense:
            raise ValueError(
                f"the {cls.name} score needs a dense architecture "
                f"({', '.join(setup.dense_architectures)}), found {setup.architecture}"
            )

    @classmethod
    def network(cls, options: Any) -> Hashable | None:
        """The spec of a network of its own that the trainer trains first and hands over in
        `NormalData.networks` (the trainer knows every kind of spec), if it needs one."""
        return None

    @classmethod
    def fit(cls, normal: NormalData, options: Any) -> Component:
        """Fit on normal data with its `options`; a component with nothing to fit takes its default
        parameters."""
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
