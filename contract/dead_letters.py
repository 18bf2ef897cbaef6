"""The dead-letter entry: what the worker writes for an input entry it refuses, and how the entry
that was refused is read back out of it (`anomaly-dlq redrive`).

A dead-letter entry has the fields DEAD_LETTER_FIELDS (source_id, reason, reason_code,
failed_at_ms, model_version), then every field of the refused input entry; an original field with
one of those names is kept as `original:<name>` (an entry that had its own `reason` keeps it as
`original:reason`). Any other name, `original:` prefix or not, is the original's own. (An input
field that is itself named `original:<one of those names>` reads back as `<name>`: the format
cannot tell it from a kept one.)
"""

from __future__ import annotations

from collections.abc import Mapping

DEAD_LETTER_FIELDS = ("source_id", "reason", "reason_code", "failed_at_ms", "model_version")
ORIGINAL_PREFIX = "original:"
_OURS = frozenset(name.encode() for name in DEAD_LETTER_FIELDS)
_PREFIX = ORIGINAL_PREFIX.encode()


def _as_bytes(value: bytes | str) -> bytes:
    return value if isinstance(value, bytes) else value.encode("utf-8")


def kept_name(name: str) -> str:
    """The name an original field `name` gets in the dead-letter entry."""
    return f"{ORIGINAL_PREFIX}{name}" if name in DEAD_LETTER_FIELDS else name


def original_fields(dead_letter: Mapping[bytes, bytes] | Mapping[str, str]) -> dict[bytes, bytes]:
    """The refused input entry's own fields, in order: the dead-letter fields dropped and
    `original:<name>` restored to `<name>` (the inverse of `kept_name`)."""
    out: dict[bytes, bytes] = {}
    for key, value in dead_letter.items():
        name = _as_bytes(key)
        if name in _OURS:
            continue
        if name.startswith(_PREFIX) and name[len(_PREFIX) :] in _OURS:
            name = name[len(_PREFIX) :]
        out[name] = _as_bytes(value)
    return out
