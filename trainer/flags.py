"""Command-line flags made from pydantic fields: one flag a field (`knn_k` is `--knn-k`), its
description the help, its type and bounds checked as it is parsed.

A flag defaults to None, so the values given can be told from the rest (a preset's fields stand
unless a flag says otherwise), and keeps the text as typed (`--epochs auto` is not the default's
None): the model converts it.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Iterable, Mapping
from typing import Annotated, Any, Literal, get_args, get_origin

from pydantic import TypeAdapter, ValidationError
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined


def flag_of(name: str) -> str:
    """The flag of a field: --knn-k for knn_k."""
    return "--" + name.replace("_", "-")


def add_field_flags(parser: argparse.ArgumentParser, fields: Mapping[str, FieldInfo]) -> None:
    """One flag per field, defaulting to None; a Literal's values are its choices."""
    for name, info in fields.items():
        choices = list(get_args(info.annotation)) if get_origin(info.annotation) is Literal else None
        text = info.description or ""
        if info.default is not None and info.default is not PydanticUndefined:
            text += f" (default: {info.default})"
        kinds: dict[str, Any] = {"choices": choices} if choices else {"type": _checked(name, info)}
        parser.add_argument(flag_of(name), dest=name, default=None, help=text.replace("%", "%%"), **kinds)


def given(args: argparse.Namespace, names: Iterable[str]) -> dict[str, Any]:
    """The fields among `names` that a flag gave, as typed."""
    return {name: getattr(args, name) for name in names if getattr(args, name, None) is not None}


def _checked(name: str, info: FieldInfo) -> Callable[[str], str]:
    """An argparse type that refuses what the field would, naming what was found, and keeps the text."""
    annotation: Any = Annotated[(info.annotation, *info.metadata)] if info.metadata else info.annotation
    adapter: TypeAdapter[Any] = TypeAdapter(annotation)

    def check(text: str) -> str:
        try:
            adapter.validate_python(text)
        except ValidationError as exc:
            message = exc.errors()[0]["msg"].removeprefix("Value error, ")
            named = "found" in message or repr(text) in message
            raise argparse.ArgumentTypeError(message if named else f"{message}, found {text}") from None
        return text

    check.__name__ = name  # argparse names the type in its own messages
    return check
