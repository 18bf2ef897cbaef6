"""A detector's configuration, in one shape: what `train`, the one-class benchmark, the presets and
`benchmarks.detection` train.

Every field is an `anomaly-trainer train` flag of the same name (`batch_size` is `--batch-size`;
`trainer.flags` makes them), and so is every option of the score components (`options`, from the
registry through `detector.score.ScoreOptions`: `knn_k` is `--knn-k`). `flags()` writes a
configuration back as the flags that give it; `updated()` takes flags' values, by those names.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field
from pydantic.fields import FieldInfo

from detector.components import REGISTRY
from detector.score import (
    DEFAULT_SCORE,
    MAX_COMPONENTS,
    ScoreName,
    ScoreOptions,
    components_of,
    option_fields,
)
from trainer.budget import DEFAULT_BATCH_SIZE, DEFAULT_EPOCHS, DEFAULT_MIN_STEPS
from trainer.models import DEFAULT_ARCHITECTURE, Architecture

# The default detector's threshold: the 99th percentile of held-out normal scores (docs/detection.md).
DEFAULT_THRESHOLD = "p99"
AUTO = "auto"


def epochs_or_auto(value: object) -> int | None:
    """A positive number of epochs, or None for auto (the word, as the flag takes it)."""
    if value is None or (isinstance(value, str) and value.strip().lower() == AUTO):
        return None
    try:
        number = int(str(value))
    except ValueError:
        number = 0
    if number <= 0 or isinstance(value, bool):
        raise ValueError(f"expected a positive integer or auto, found {value}")
    return number


def parse_classes(text: str) -> list[int]:
    """Classes as a flag gives them (1 or 0,1,2): sorted integers without repeats."""
    try:
        classes = sorted({int(v) for v in text.split(",") if v.strip()})
    except ValueError:
        raise ValueError(f"--classes takes integers like 1 or 0,1,2, found {text!r}") from None
    if not classes:
        raise ValueError("--classes needs at least one class")
    return classes


def _classes(value: object) -> object:
    return parse_classes(value) if isinstance(value, str) else value


def _score_name(name: str) -> str:
    components_of(name)  # ValueError naming what is wrong
    return name


def score_help() -> str:
    """The --score help: every registered component with its description."""
    listed = ", ".join(f"{name} ({kind.description})" for name, kind in REGISTRY.items())
    return (
        f"what the threshold applies to and the worker computes: {listed}, or up to {MAX_COMPONENTS} "
        "joined by '+', each standardised on held-out normal images and summed, e.g. "
        f"{DEFAULT_SCORE} or mse+transforms+knn (docs/detection.md); `evaluate` compares them"
    )


class DetectorConfig(BaseModel):
    """Everything a detector is trained as; the defaults are the default detector's."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    classes: Annotated[list[int] | None, BeforeValidator(_classes)] = Field(
        None, description="train only on these labels, e.g. 1 or 0,1,2 (default: all)"
    )
    architecture: Architecture = Field(DEFAULT_ARCHITECTURE, description="the autoencoder (trainer.models)")
    epochs: Annotated[int | None, BeforeValidator(epochs_or_auto)] = Field(
        None,
        description=f"maximum epochs; early stopping on held-out loss (default: auto: {DEFAULT_EPOCHS}, "
        f"or as many as {DEFAULT_MIN_STEPS:,} steps take when that is more, with early stopping only "
        "after those steps)",
    )
    min_steps: int | None = Field(
        None,
        ge=0,
        description="early stopping (and its choice of the best epoch) looks only at the epochs after "
        "this many optimizer steps (batches); with --epochs auto the epochs are raised to fit them: one "
        "MNIST class (17-22 steps an epoch) then trains 91-118 epochs, keeping the last weights "
        f"(default: {DEFAULT_MIN_STEPS} with --epochs auto, 0 with an explicit count)",
    )
    batch_size: int = Field(DEFAULT_BATCH_SIZE, ge=1, description="images per optimizer step")
    learning_rate: float = Field(1e-3, description="Adam learning rate")
    threshold: str = Field(
        DEFAULT_THRESHOLD,
        description="threshold policy: mean+Kstd, Kmean, pNN or fpr=F, e.g. mean+3std, 2mean, p95, fpr=0.01",
    )
    score: Annotated[ScoreName, AfterValidator(_score_name)] = Field(DEFAULT_SCORE, description=score_help())
    seed: int = Field(0, description="makes the split and the training repeatable")
    max_samples: int | None = Field(
        None, ge=1, description="use at most this many normal training images (quick runs)"
    )
    holdout_fraction: float = Field(
        0.2,
        description="share of normal training images held out, half for validation and half for calibration",
    )
    patience: int = Field(3, ge=1, description="early-stopping patience in epochs")
    preprocessing: Literal["unit", "standardize"] = Field(
        "unit", description="unit: pixels in [0,1] as is; standardize: per-feature z-scores"
    )
    options: ScoreOptions = Field(
        default_factory=ScoreOptions, description="the score components' options, each a flag of its own"
    )

    @classmethod
    def of(cls, **given: Any) -> DetectorConfig:
        """The default detector with `given` fields, the components' options by their own names."""
        return cls().updated(**given)

    def updated(self, **given: Any) -> DetectorConfig:
        """This configuration with `given` fields replaced (the components' options by their own
        names: knn_k=3), validated; ValueError names a field that does not exist."""
        own = {name: value for name, value in given.items() if name in type(self).model_fields}
        owners = option_fields()
        unknown = sorted(set(given) - set(own) - set(owners))
        if unknown:
            raise ValueError(
                f"a detector has no field {', '.join(unknown)}; expected one of {', '.join(self.flat())}"
            )
        fields = self.model_dump() | own
        chosen = own.get("options", self.options)
        options = chosen if isinstance(chosen, ScoreOptions) else ScoreOptions.model_validate(chosen)
        fields["options"] = options.updated({k: v for k, v in given.items() if k in owners})
        return type(self).model_validate(fields)

    def flat(self) -> dict[str, Any]:
        """Every field by its flag's name: the configuration's own, then every component option."""
        own = {name: getattr(self, name) for name in type(self).model_fields if name != "options"}
        return own | {
            field: getattr(self.options.of(owner), field) for field, (owner, _) in option_fields().items()
        }

    def flags(self) -> tuple[str, ...]:
        """The `anomaly-trainer train` flags that give this configuration: its fields that are not
        the defaults, in order."""
        default = DetectorConfig().flat()
        out: list[str] = []
        for name, value in self.flat().items():
            if value != default[name]:
                out += ["--" + name.replace("_", "-"), _flag_text(name, value)]
        return tuple(out)


def _flag_text(name: str, value: Any) -> str:
    if value is None and name == "epochs":
        return AUTO
    if isinstance(value, list):
        return ",".join(map(str, value))
    if value is None:
        raise ValueError(f"{name} None cannot be given as a flag")
    return str(value)


if clash := sorted(set(option_fields()) & set(DetectorConfig.model_fields)):  # one flag, one meaning
    raise ValueError(f"component options {clash} have the names of detector fields")


def flag_fields(exclude: Iterable[str] = ()) -> dict[str, FieldInfo]:
    """The fields `anomaly-trainer` makes flags of, by name: a detector's, then the components' options."""
    own = {name: info for name, info in DetectorConfig.model_fields.items() if name != "options"}
    every = own | {field: info for field, (_, info) in option_fields().items()}
    return {name: info for name, info in every.items() if name not in set(exclude)}
