"""The JSON Schemas in contract/schemas describe the entries the programs really write and read."""

from __future__ import annotations

import json
from typing import Any

import fakeredis
import jsonschema
import numpy as np
import pytest

from contract.codec import encode_image
from contract.labels import Label
from contract.schemas import SCHEMAS, entry_as_json, load_schema
from tests.support import D, build_runner, make_model, push


def validate(name: str, fields: dict[Any, Any]) -> None:
    schema = load_schema(name)
    jsonschema.Draft202012Validator.check_schema(schema)
    jsonschema.validate(entry_as_json(fields), schema, cls=jsonschema.Draft202012Validator)


def test_every_schema_is_valid_json_schema_2020_12() -> None:
    for name in SCHEMAS:
        jsonschema.Draft202012Validator.check_schema(load_schema(name))


@pytest.mark.parametrize("dtype", ["uint8", "float32", "json"])
def test_entries_producers_send_match_the_input_schema(dtype: str) -> None:
    fields = {
        **encode_image(np.random.default_rng(1).random(784), dtype),
        "id": "cam-7:frame-1",
        "site": "north",
    }
    validate("input-entry", fields)


@pytest.mark.parametrize(
    "fields",
    [
        {"dtype": "json"},  # no image
        {"image": "[[0, 1]]", "dtype": "json"},  # nested
        {"image": b"\x00" * 784, "dtype": "uint16"},
        {"image": b"\x00" * 784, "id": "x" * 300},
    ],
    ids=["no-image", "nested-json", "unknown-dtype", "long-id"],
)
def test_entries_the_worker_refuses_fail_the_input_schema_too(fields: dict[str, Any]) -> None:
    with pytest.raises(jsonschema.ValidationError):
        validate("input-entry", fields)


def test_output_scores_and_dead_letter_entries_the_worker_writes_match_their_schemas() -> None:
    r = fakeredis.FakeRedis()
    runner = build_runner(r, model=make_model("0123456789abcdef"), consumer="w1", scores_stream="scores")
    for brightness in (0.1, 0.9, 0.2, 0.95):
        push(r, brightness, pid=f"p-{brightness}")
    r.xadd("images", {"image": b"short", "id": "bad"})
    r.xadd("images", {"image": json.dumps([0.5] * D).replace("0.5", "NaN", 1), "dtype": "json"})
    r.xadd("images", {"image": b"\x00" * D, "reason": "a field named like a dead-letter field"})
    runner.drain()
    outputs, scores = r.xrange("anomalies"), r.xrange("scores")
    dead = r.xrange("images:dead-letter")
    assert len(outputs) == 2 and len(scores) == 5 and len(dead) == 2
    for _, fields in outputs:
        validate("output-entry", fields)
    for _, fields in scores:
        validate("output-entry", fields)
    for _, fields in dead:
        validate("dead-letter-entry", fields)


def test_labels_the_viewer_writes_match_the_label_schema_and_a_missing_score_is_fine() -> None:
    label = Label("1700000000000-0", "anomaly", "7d31431e51955ec5", None, 1700000001000, "alice")
    validate("label-entry", label.fields())
    without_score = {k: v for k, v in label.fields().items() if k != "score"}
    validate("label-entry", without_score)
    with pytest.raises(jsonschema.ValidationError):
        validate("label-entry", {**label.fields(), "label": "maybe"})
