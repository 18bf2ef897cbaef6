"""The dead-letter entry gives back the refused input entry: its own fields, clashing names
restored (what `anomaly-dlq redrive` puts back on the input stream)."""

from __future__ import annotations

import pytest

from contract.codec import Rejected
from contract.dead_letters import DEAD_LETTER_FIELDS, kept_name, original_fields
from worker.commit import dead_letter_fields


def _as_dict(flat: list[bytes | str]) -> dict[bytes, bytes]:
    as_bytes = [item if isinstance(item, bytes) else item.encode() for item in flat]
    return dict(zip(as_bytes[::2], as_bytes[1::2], strict=True))


@pytest.mark.parametrize(
    "fields",
    [
        {b"image": b"\x00\xff" * 8, b"dtype": b"uint8", b"id": b"cam-1"},
        {b"image": b"[0.5]", b"reason": b"mine", b"source_id": b"theirs", b"model_version": b"v0"},
        {b"original:image": b"a prefix of its own, on a name that is not ours", b"x": b""},
        {},
    ],
    ids=["plain", "clashing names", "a prefix of its own", "no fields"],
)
def test_the_original_entry_comes_back_from_its_dead_letter(fields: dict[bytes, bytes]) -> None:
    dead = _as_dict(dead_letter_fields(Rejected(b"1-0", fields, "bad_length", "too short"), 5, "v1"))
    assert original_fields(dead) == fields


def test_dead_letter_fields_are_never_taken_for_original_ones() -> None:
    dead = {name.encode(): b"x" for name in DEAD_LETTER_FIELDS}
    assert original_fields(dead) == {}
    assert kept_name("reason") == "original:reason" and kept_name("image") == "image"


def test_an_original_field_named_like_a_kept_one_is_ambiguous_and_read_as_kept() -> None:
    # The format cannot tell a producer's own `original:reason` from a kept `reason`: both read
    # back as `reason` (contract.dead_letters says so).
    dead = _as_dict(dead_letter_fields(Rejected(b"1-0", {b"original:reason": b"p"}, "c", "r"), 5, "v1"))
    assert original_fields(dead) == {b"reason": b"p"}


def test_str_fields_are_read_like_bytes() -> None:
    assert original_fields({"reason": "r", "original:reason": "mine", "image": "ab"}) == {
        b"reason": b"mine",
        b"image": b"ab",
    }
