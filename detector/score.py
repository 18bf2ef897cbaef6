"""A detector's score: one component, or several standardised and summed. Pure numpy.

A score name is one component or several joined by "+" (components are registered in
`detector.components`):
  mse          mean squared reconstruction error
  nmse         mse divided by the image's mean squared intensity (plus epsilon)
  top-k        mean of the k% largest squared pixel errors (localised defects)
  mahalanobis  distance of the encoder's code to a Gaussian fitted on held-out normal codes
  transforms   how unsure a self-supervised classifier is of which rotation/flip/shift was
               applied: catches rotated digits that reconstruct well
  orientation  -log p(identity | x) from a head the autoencoder was trained with, on its first
               encoder layer: the transforms score's catch at about 0.5% of the autoencoder's cost
  knn          cosine distance to the k nearest normal training images
  hidden-knn   cosine distance to the k nearest normal prototypes in the encoder's first layer:
               a nearest-neighbour view at about a sixth of the autoencoder's cost
  hidden-mahalanobis
               distance of the encoder's first layer to a Gaussian of normal images' outputs:
               how strongly, not only which way, its units fire (about 3% of the autoencoder's cost)
  a+b[+c[+d]]  e.g. mse+orientation+hidden-knn+hidden-mahalanobis (the default) or
               mse+transforms+knn: each component standardised by its mean and std on held-out
               normal images, then summed: views of "not normal" that fail on different images
The trainer fits and calibrates the score it was asked for (`--score`) and the worker computes
the same one (`baseline.json` names it); the evaluation compares them (`COMPARED`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from detector.components import REGISTRY, Component
from detector.components.base import ForwardPass, NormalData

COMPONENTS: tuple[str, ...] = tuple(REGISTRY)
ScoreName = str  # a component, or components joined by "+" (components_of checks it)
# What `evaluate` and `benchmark` compare: every component, then the combinations that help.
COMPARED: tuple[str, ...] = (
    *COMPONENTS,
    "mse+transforms",
    "nmse+transforms",
    "mse+knn",
    "mse+transforms+knn",
    "nmse+transforms+knn",
    "mse+orientation",
    "mse+nmse+orientation",
    "mse+hidden-knn",
    "mse+orientation+hidden-knn",
    "mse+orientation+hidden-knn+hidden-mahalanobis",
)
DEFAULT_SCORE: ScoreName = "mse+orientation+hidden-knn+hidden-mahalanobis"
MAX_COMPONENTS = 4


def components_of(name: str) -> tuple[str, ...]:
    """The components of a score name; ValueError naming what is wrong."""
    parts = tuple(name.split("+"))
    unknown = [p for p in parts if p not in REGISTRY]
    if unknown:
        raise ValueError(
            f"score {name!r}: unknown component(s) {', '.join(map(repr, unknown))}; expected one of "
            f"{', '.join(COMPONENTS)}, or several joined by '+'"
        )
    if len(set(parts)) != len(parts) or len(parts) > MAX_COMPONENTS:
        raise ValueError(f"score {name!r}: at most {MAX_COMPONENTS} components, each at most once")
    return parts


def combine(parts: Sequence[np.ndarray], mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """The sum of scores, each standardised by its held-out normal mean and std."""
    if not len(parts) == len(mean) == len(std):
        raise ValueError(f"{len(parts)} scores to combine, but {len(mean)} means and {len(std)} stds")
    total = np.zeros(np.shape(parts[0]), np.float64)
    for values, m, s in zip(parts, mean, std, strict=True):
        total += (np.asarray(values, np.float64) - m) / s
    return total


def standardisation(parts: Sequence[np.ndarray]) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(means, stds) of each score on normal images: what `combine` needs."""
    means = tuple(float(np.mean(p)) for p in parts)
    stds = tuple(max(float(np.std(p)), 1e-12) for p in parts)
    return means, stds


@dataclass(frozen=True)
class Score:
    """A score with everything it needs: what an engine applies to a batch's `ForwardPass`."""

    name: ScoreName
    components: tuple[Component, ...]
    # Combined scores: each component's mean and std on held-out normal images, in order.
    combine_mean: tuple[float, ...] = ()
    combine_std: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        names = components_of(self.name)
        if names != tuple(c.name for c in self.components):
            raise ValueError(
                f"score {self.name!r} is made of {names}, found {[c.name for c in self.components]}"
            )
        if len(names) > 1:
            if not len(self.combine_mean) == len(self.combine_std) == len(names):
                raise ValueError(
                    f"the {self.name} score needs a mean and a std per component ({len(names)}), "
                    f"found {len(self.combine_mean)} and {len(self.combine_std)}"
                )
            if min(self.combine_std) <= 0:
                raise ValueError(f"combine_std must be positive, found {self.combine_std}")

    @classmethod
    def fit(cls, name: ScoreName, normal: NormalData) -> Score:
        """Fit every component on normal data, then the standardisation of a combined score."""
        components = tuple(REGISTRY[c].fit(normal) for c in components_of(name))
        if len(components) == 1:
            return cls(name, components)
        unscaled = cls(name, components, (0.0,) * len(components), (1.0,) * len(components))
        mean, std = standardisation(unscaled.parts(normal.forward(normal.validation)))
        return cls(name, components, mean, std)

    @classmethod
    def from_parameters(
        cls,
        name: ScoreName,
        parameters: Mapping[str, Any] | None,
        files: Mapping[str, bytes],
        input_dim: int,
        where: Mapping[str, str] | None = None,
    ) -> Score:
        """Rebuild a stored score: its parameters and the files its components own (by file name).

        ValueError names what is missing or wrong (`where` maps a file name to its path)."""
        params = dict(parameters or {})
        components = []
        for c in components_of(name):
            kind = REGISTRY[c]
            data = None
            if kind.file is not None:
                if kind.file not in files:
                    raise ValueError(f"the {name} score needs {kind.file_holds}")
                data = files[kind.file]
            path = (where or {}).get(kind.file or "", kind.file or "")
            components.append(kind.from_parameters(params, data, input_dim, path))
        return cls(
            name,
            tuple(components),
            tuple(params.get("combine_mean") or ()),
            tuple(params.get("combine_std") or ()),
        )

    @property
    def needs_encoder(self) -> bool:
        """Whether the encoder's layer outputs are an input (a component asks for them)."""
        return any(c.needs_encoder for c in self.components)

    def parameters(self) -> dict[str, Any] | None:
        """What baseline.json's score_parameters holds; None for a score with nothing to keep (mse)."""
        if len(self.components) == 1 and not self.components[0].parameter_fields:
            return None
        out: dict[str, Any] = {}
        for component in self.components:
            out |= component.parameters()
        if len(self.components) > 1:
            out |= {"combine_mean": list(self.combine_mean), "combine_std": list(self.combine_std)}
        return out

    def files(self) -> dict[str, bytes]:
        """The artifact files the components own, by name."""
        return {c.file: c.file_bytes() or b"" for c in self.components if c.file is not None}

    def parts(self, batch: ForwardPass) -> list[np.ndarray]:
        """Every component's per-row scores, in order (what the standardisation is fitted on)."""
        return [c.score(batch) for c in self.components]

    def __call__(self, batch: ForwardPass) -> np.ndarray:
        """Per-row scores (float64)."""
        parts = self.parts(batch)
        if len(parts) == 1:
            return parts[0]
        return combine(parts, self.combine_mean, self.combine_std)

    def component(self, name: str) -> Component | None:
        """The component called `name`, if this score has it."""
        return next((c for c in self.components if c.name == name), None)


def mse_score() -> Score:
    """The default score: mean squared reconstruction error."""
    return Score("mse", (REGISTRY["mse"].from_parameters({}, None, 0, ""),))
