"""The preamble every command-line program shares: flags generated from a settings class, settings
read from the environment and the flags, one line per refused setting, and the log set-up.

    parser = argparse.ArgumentParser(prog="anomaly-viewer", ...)
    add_settings_flags(parser, ViewerSettings)
    settings = load_settings(ViewerSettings, parser.parse_args(argv))   # or raises SettingsRefused
    configure_logging(settings)
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Collection, Mapping
from typing import Any, TypeVar

from pydantic import SecretStr, ValidationError

from runtime import logs
from runtime.settings import KNOWN_VARIABLES, AnomalySettings, unknown_variables
from runtime.settings.base import ENV_PREFIX
from runtime.settings.environment import service_link_variables
from runtime.version import package_version

EXIT_CONFIG = 2  # a refused setting, artifact or argument: fix the configuration, do not retry
SettingsT = TypeVar("SettingsT", bound=AnomalySettings)


class SettingsRefused(Exception):
    """The environment or the flags hold a setting the program cannot use; the message has one line
    per problem, naming the variable."""


def add_settings_flags(
    parser: argparse.ArgumentParser, cls: type[AnomalySettings], exclude: Collection[str] = ()
) -> None:
    """One flag per field of `cls` (--batch-size for ANOMALY_BATCH_SIZE; booleans as --x / --no-x),
    each defaulting to None so that only the flags given override the environment."""
    for name, info in cls.model_fields.items():
        if name in exclude:
            continue
        flag = "--" + name.replace("_", "-")
        env = f"{ENV_PREFIX}{name.upper()}"
        default = "hostname-pid" if info.default_factory is not None else info.default
        if isinstance(default, SecretStr):
            default = "(secret)"
        text = f"{info.description} [env {env}, default: {default!r}]"
        if info.annotation is bool:
            parser.add_argument(
                flag, dest=name, default=None, action=argparse.BooleanOptionalAction, help=text
            )
        else:
            parser.add_argument(flag, dest=name, default=None, metavar=name.upper(), help=text)


def load_settings(
    cls: type[SettingsT],
    args: argparse.Namespace | None = None,
    environ: Mapping[str, str] | None = None,
) -> SettingsT:
    """The settings of `cls` from the environment, overridden by the flags that were given."""
    env = os.environ if environ is None else environ
    if unknown := unknown_variables(env, KNOWN_VARIABLES):
        raise SettingsRefused("\n".join(unknown))
    overrides: dict[str, Any] = {}
    if args is not None:
        overrides = {k: v for k, v in vars(args).items() if k in cls.model_fields and v is not None}
    try:
        return cls(**overrides)
    except ValidationError as exc:
        raise SettingsRefused(explain(exc, cls)) from None


def explain(exc: ValidationError, cls: type[AnomalySettings]) -> str:
    """One line per invalid setting, naming the variable; a secret's value is never shown."""
    lines = []
    for error in exc.errors():
        name = ".".join(str(p) for p in error["loc"]) or "settings"
        env = f"{ENV_PREFIX}{name.upper()}" if name != "settings" else "settings"
        value = error.get("input")
        field = cls.model_fields.get(name)
        secret = field is not None and "SecretStr" in str(field.annotation)
        shown = "" if secret or isinstance(value, dict) else f" (found {value!r})"
        lines.append(f"invalid setting {env}: {error['msg']}{shown}")
    return "\n".join(lines)


def configure_logging(settings: AnomalySettings, environ: Mapping[str, str] | None = None) -> None:
    """Logs to stderr at ANOMALY_LOG_LEVEL in ANOMALY_LOG_FORMAT; the platform's variables that
    were tolerated are named once, at debug."""
    logs.configure(settings.log_level, settings.log_format)
    links = service_link_variables(os.environ if environ is None else environ)
    if links:
        logging.getLogger("runtime").debug(
            "ignored Kubernetes service-link variables count=%d names=%s", len(links), ",".join(sorted(links))
        )


def refuse(prog: str, message: str) -> int:
    """Print `message` (one problem a line) prefixed with the program's name; return EXIT_CONFIG."""
    print("\n".join(f"{prog}: {line}" for line in message.splitlines()), file=sys.stderr)
    return EXIT_CONFIG


def describe_version(prog: str, artifact: str | None = None) -> str:
    """`prog VERSION`, and with an artifact the model it would load: `model_version=... schema=...`."""
    line = f"{prog} {package_version()}"
    if not artifact:
        return line
    from detector.artifact import load_artifact
    from detector.errors import ArtifactError

    try:
        baseline = load_artifact(artifact).baseline
    except ArtifactError as exc:
        return f"{line}\nartifact {artifact}: not loadable ({exc})"
    model = f"model_version={baseline.model_version} schema={baseline.schema_version}"
    return f"{line}\nartifact {artifact}: {model}"


def add_version_flag(parser: argparse.ArgumentParser, artifact_env: str | None = None) -> None:
    """--version: the package version, and the model_version of the artifact that `artifact_env`
    (e.g. ANOMALY_ARTIFACT) names, when it is set."""

    class Version(argparse.Action):
        def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, *_: Any) -> None:
            given = getattr(namespace, "artifact", None)  # --artifact before --version
            artifact = str(given) if given else (os.environ.get(artifact_env) if artifact_env else None)
            print(describe_version(parser.prog, artifact))
            parser.exit()

    parser.add_argument(
        "--version",
        nargs=0,
        action=Version,
        help="print the version"
        + (f" (and the model_version of the artifact in {artifact_env}, when set)" if artifact_env else "")
        + " and exit",
    )
