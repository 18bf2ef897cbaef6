"""JSON Schemas of the stream entries other programs write or read (contract/schemas/*.json), and
the JSON view of an entry they check: each value as UTF-8 text, a binary image as base64."""

from __future__ import annotations

import base64
import json
from collections.abc import Mapping
from importlib import resources
from typing import Any

SCHEMAS = ("input-entry", "output-entry", "dead-letter-entry", "label-entry")


def load_schema(name: str) -> dict[str, Any]:
    """The JSON Schema `name` (one of SCHEMAS)."""
    if name not in SCHEMAS:
        raise ValueError(f"no schema {name!r}; expected one of {', '.join(SCHEMAS)}")
    text = resources.files("contract").joinpath("schemas", f"{name}.schema.json").read_text("utf-8")
    schema: dict[str, Any] = json.loads(text)
    return schema


def entry_as_json(fields: Mapping[bytes | str, bytes | str]) -> dict[str, str]:
    """A stream entry as the schemas see it: text values, and base64 for a value that is not UTF-8
    text or is a binary image (an `image` whose dtype is not json)."""
    out: dict[str, str] = {}
    texts = {_text(k): v for k, v in fields.items()}
    binary_image = texts.get("dtype", b"uint8") not in (b"json", "json")
    for name, value in texts.items():
        raw = value.encode() if isinstance(value, str) else value
        if name in ("image", "original:image") and binary_image:
            out[name] = base64.b64encode(raw).decode("ascii")
            continue
        try:
            out[name] = raw.decode("utf-8")
        except UnicodeDecodeError:
            out[name] = base64.b64encode(raw).decode("ascii")
    return out


def _text(key: bytes | str) -> str:
    return key.decode("utf-8", "replace") if isinstance(key, bytes) else key
