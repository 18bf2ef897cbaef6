"""The scores the evaluation compares for one detector, computed through the `Score` the worker loads.

A detector's own score is the `Score` the trainer fitted (and wrote: the worker loads it back from
the artifact); the others of `detector.score.COMPARED` are built from the same registry: every
component the own score lacks is fitted as the trainer would fit it, if it can be (its check
passes and the networks it needs were trained), and a combination is standardised on the
held-out normal images as the trainer standardises it. `evaluate`, the report and the one-class
benchmark compute them all from one forward pass, each component once.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np

from detector.components import REGISTRY, Component
from detector.components.base import ForwardPass, NormalData, Setup
from detector.preprocessing import InputScaling
from detector.score import COMPARED, Score, ScoreOptions, components_of


def can_fit(kind: type[Component], normal: NormalData, setup: Setup, options: ScoreOptions) -> bool:
    """Whether `kind` can be fitted on `normal`: its check passes and its network was trained."""
    chosen = options.of(kind.name)
    try:
        kind.check(setup, chosen)
    except ValueError:
        return False
    network = kind.network(chosen)
    return network is None or network in normal.networks


@dataclass(frozen=True)
class ComparedScores:
    """A detector's own score and every compared score its networks allow, on raw images."""

    own: Score
    scores: Mapping[str, Score]  # COMPARED's order, then the own score if it is not among them
    scaling: InputScaling  # raw pixels -> model space, as the worker applies it
    forward: Callable[[np.ndarray], ForwardPass]  # model space, every encoder layer included
    options: ScoreOptions  # what the components the own score lacks were fitted with

    @classmethod
    def fitted(
        cls, own: Score, normal: NormalData, scaling: InputScaling, setup: Setup, options: ScoreOptions
    ) -> ComparedScores:
        """The own score as it is; the other components fitted on `normal` with `options`."""
        components: dict[str, Component] = {c.name: c for c in own.components}
        for name, kind in REGISTRY.items():
            if name not in components and can_fit(kind, normal, setup, options):
                components[name] = kind.fit(normal, options.of(name))
        batch = normal.forward(normal.validation)
        validation = {name: component.score(batch) for name, component in components.items()}
        names = [n for n in COMPARED if all(c in components for c in components_of(n))]
        scores = {
            name: Score.combining(
                name,
                tuple(components[c] for c in components_of(name)),
                [validation[c] for c in components_of(name)],
            )
            for name in names
        }
        scores[own.name] = own
        return cls(own, scores, scaling, normal.forward, options)

    def __call__(self, images: np.ndarray) -> dict[str, np.ndarray]:
        """Every score of every row of raw images, by name: one forward pass, each component once."""
        batch = self.forward(self.scaling(images))
        components = {c.name: c for score in self.scores.values() for c in score.components}
        parts = {name: component.score(batch) for name, component in components.items()}
        return {
            name: score.combined([parts[c.name] for c in score.components])
            for name, score in self.scores.items()
        }

    def own_scores(self, images: np.ndarray) -> np.ndarray:
        """The detector's own score of raw images: what the worker computes."""
        return self.own(self.forward(self.scaling(images)))

    def reconstruct(self, images: np.ndarray) -> np.ndarray:
        """The reconstructions of raw images, back in pixel space (for display)."""
        return self.scaling.undo(self.forward(self.scaling(images)).reconstructions)
