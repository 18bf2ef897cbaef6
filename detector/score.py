"""A detector's score: one component, or several standardised and summed. Pure numpy.

A score name is one component (registered in `detector.components`, each with its one-line
`description`) or several joined by "+", e.g. mse+orientation+hidden-knn+hidden-mahalanobis (the
default) or mse+transforms+knn: each component standardised by its mean and std on held-out
normal images, then summed, so that views of "not normal" that fail on different images add up.
The trainer checks and fits the score it was asked for (`--score`, with the components' options:
`ScoreOptions`), the worker computes the same one (`baseline.json` names it), and the evaluation
compares it with the others of `COMPARED`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, create_model
from pydantic.fields import FieldInfo

from detector.components import REGISTRY, Component
from detector.components.base import ComponentOptions, ForwardPass, NormalData, Setup

log = logging.getLogger(__name__)

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


def option_fields() -> dict[str, tuple[str, FieldInfo]]:
    """Every component option by its field name (the trainer's flag): (its component, its field).

    ValueError when two components use one name: a flag must say whose option it is."""
    out: dict[str, tuple[str, FieldInfo]] = {}
    for name, kind in REGISTRY.items():
        for field, info in kind.options.model_fields.items():
            if field in out:
                raise ValueError(f"option {field!r} of {name} is already an option of {out[field][0]}")
            out[field] = (name, info)
    return out


def _attribute(component: str) -> str:
    return component.replace("-", "_")


class _ScoreOptionsBase(BaseModel):
    """The options of every component that has some, each under its component's name (hidden-knn
    as hidden_knn); the fields come from the registry."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    def of(self, component: str) -> ComponentOptions:
        """The options of `component` (its defaults when it has none)."""
        options = getattr(self, _attribute(component), None)
        return options if isinstance(options, ComponentOptions) else REGISTRY[component].options()

    def updated(self, values: Mapping[str, Any]) -> ScoreOptions:
        """These options with `values` (by field name, as `option_fields` names them) replaced."""
        owners = option_fields()
        unknown = sorted(set(values) - set(owners))
        if unknown:
            raise ValueError(
                f"unknown component option(s) {', '.join(unknown)}; expected one of {', '.join(owners)}"
            )
        nested = self.model_dump()
        for field, value in values.items():
            nested.setdefault(_attribute(owners[field][0]), {})[field] = value
        return ScoreOptions.model_validate(nested)


if TYPE_CHECKING:

    class ScoreOptions(_ScoreOptionsBase):
        """Typed loosely for mypy: its fields come from the registered components."""

        def __init__(self, **fields: Any) -> None: ...

        def __getattr__(self, name: str) -> Any: ...

else:
    option_fields()  # one name, one component: checked once the registry is complete
    ScoreOptions = create_model(
        "ScoreOptions",
        __base__=_ScoreOptionsBase,
        __doc__=_ScoreOptionsBase.__doc__,
        **{
            _attribute(name): (
                kind.options,
                Field(default_factory=kind.options, description=kind.description),
            )
            for name, kind in REGISTRY.items()
            if kind.options.model_fields
        },
    )


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

    @staticmethod
    def check(name: ScoreName, setup: Setup, options: ScoreOptions) -> None:
        """ValueError naming the first component that cannot be fitted in `setup` (and why)."""
        for c in components_of(name):
            REGISTRY[c].check(setup, options.of(c))

    @classmethod
    def fit(cls, name: ScoreName, normal: NormalData, options: ScoreOptions | None = None) -> Score:
        """Fit every component on normal data, then the standardisation of a combined score."""
        chosen = options or ScoreOptions()
        fitted = []
        for component in components_of(name):
            started = time.monotonic()
            fitted.append(REGISTRY[component].fit(normal, chosen.of(component)))
            log.info("component fitted name=%s seconds=%.2f", component, time.monotonic() - started)
        components = tuple(fitted)
        if len(components) == 1:
            return cls(name, components)
        batch = normal.forward(normal.validation)
        return cls.combining(name, components, [c.score(batch) for c in components])

    @classmethod
    def combining(
        cls, name: ScoreName, components: tuple[Component, ...], normal_parts: Sequence[np.ndarray]
    ) -> Score:
        """The score of fitted `components`: one as it is, several standardised by their scores of
        held-out normal images (`normal_parts`, in order)."""
        if len(components) == 1:
            return cls(name, components)
        mean, std = standardisation(normal_parts)
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
        return self.combined(self.parts(batch))

    def combined(self, parts: Sequence[np.ndarray]) -> np.ndarray:
        """The score of its components' per-row scores (`parts`, in order): what `__call__` returns
        of a batch, for a caller that computed the parts once for several scores."""
        if len(parts) == 1:
            return np.asarray(parts[0])
        return combine(parts, self.combine_mean, self.combine_std)

    def contributions(self, parts: Sequence[np.ndarray]) -> np.ndarray:
        """What each component adds to the score, per row: an (n, k) float64 array whose rows sum
        to the score. Combined: each part standardised by its held-out normal mean and std (0 is
        as normal as the average normal image, 3 is three of its stds above); one component: its
        score itself."""
        if len(parts) == 1:
            return np.asarray(parts[0], np.float64).reshape(-1, 1)
        if len(parts) != len(self.combine_mean):
            raise ValueError(f"{len(parts)} parts for the {self.name} score of {len(self.combine_mean)}")
        mean = np.asarray(self.combine_mean, np.float64)
        std = np.asarray(self.combine_std, np.float64)
        return (np.stack([np.asarray(p, np.float64) for p in parts], axis=1) - mean) / std

    def component(self, name: str) -> Component | None:
        """The component called `name`, if this score has it."""
        return next((c for c in self.components if c.name == name), None)


def mse_score() -> Score:
    """The default score: mean squared reconstruction error."""
    return Score("mse", (REGISTRY["mse"].from_parameters({}, None, 0, ""),))
