"""Score components by name. Adding one: a module with a `Component` subclass, and a line here.

Every consumer reads this registry: the trainer's `--score` help and option flags, the fit, the
artifact's schema and files, both engines, the evaluation, the report and the benchmarks.
"""

from __future__ import annotations

from detector.components.base import Component
from detector.components.hidden_knn import HiddenKnn
from detector.components.hidden_mahalanobis import HiddenMahalanobis
from detector.components.knn import Knn
from detector.components.mahalanobis import Mahalanobis
from detector.components.orientation import Orientation
from detector.components.reconstruction import Mse, Nmse, TopK
from detector.components.transforms import Transforms

# The order is the one error messages list and `detector.score.COMPARED` starts with.
REGISTRY: dict[str, type[Component]] = {
    component.name: component
    for component in (
        Mse,
        Nmse,
        TopK,
        Mahalanobis,
        Transforms,
        Orientation,
        Knn,
        HiddenKnn,
        HiddenMahalanobis,
    )
}
