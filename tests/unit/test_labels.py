"""The labels contract: what any tool writes to the labels stream, and how it is read back."""

from __future__ import annotations

import pytest

from contract.labels import InvalidLabel, Label, latest_labels, parse_label


def entry(**overrides: str) -> dict[bytes, bytes]:
    fields = {
        "source_id": "1700000000000-0",
        "label": "normal",
        "model_version": "abc123",
        "score": "0.25",
        "labelled_at_ms": "1700000001000",
        "by": "alice",
    } | overrides
    return {k.encode(): v.encode() for k, v in fields.items()}


def test_a_label_round_trips_through_its_stream_fields() -> None:
    label = Label("1-0", "anomaly", "abc123", 0.5, 1700000000000, "anomaly-viewer")
    assert parse_label(label.fields()) == label


def test_an_unknown_score_is_empty_and_reads_back_as_none() -> None:
    label = Label("1-0", "normal", "abc123", None, 1, "a tool")
    assert label.fields()["score"] == ""
    assert parse_label(label.fields()).score is None
    fields = entry()
    del fields[b"score"]
    assert parse_label(fields).score is None


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"label": "maybe"}, "label is 'maybe', expected 'anomaly' or 'normal'"),
        ({"score": "high"}, "score is 'high', expected a number or empty"),
        ({"score": "nan"}, "expected a finite number"),
        ({"labelled_at_ms": "yesterday"}, "labelled_at_ms is 'yesterday', expected Unix time in ms"),
        ({"source_id": ""}, "source_id is empty"),
        ({"by": "x" * 300}, "by has 300 bytes, expected at most 256"),
    ],
)
def test_an_entry_off_the_contract_is_refused_naming_the_field(
    overrides: dict[str, str], message: str
) -> None:
    with pytest.raises(InvalidLabel, match=message):
        parse_label(entry(**overrides))


def test_a_missing_required_field_is_named() -> None:
    fields = entry()
    del fields[b"model_version"]
    with pytest.raises(InvalidLabel, match="no field 'model_version'"):
        parse_label(fields)


def test_the_latest_label_of_a_source_id_wins_and_invalid_entries_are_listed() -> None:
    entries = [
        (b"1-0", entry(source_id="a", label="anomaly")),
        (b"2-0", entry(source_id="b", label="normal")),
        (b"3-0", entry(source_id="a", label="normal")),  # the operator corrected a click
        (b"4-0", entry(source_id="c", label="wrong")),
    ]
    labels = latest_labels(entries)
    assert {label.source_id: label.label for label in labels.labels} == {"a": "normal", "b": "normal"}
    assert labels.read == 4
    assert labels.last_id == "4-0"
    assert len(labels.invalid) == 1 and labels.invalid[0].startswith("4-0: ")


def test_a_label_may_name_its_alerts_shard_and_the_latest_per_shard_and_id_wins() -> None:
    zero = Label("5-0", "anomaly", "v", None, 1, "a", shard=0)
    one = Label("5-0", "normal", "v", None, 2, "a", shard=1)
    assert (
        parse_label(one.fields()) == one and "shard" not in Label("5-0", "normal", "v", None, 2, "a").fields()
    )
    kept = latest_labels([(b"1-0", zero.fields()), (b"2-0", one.fields())]).labels
    assert {(lab.shard, lab.label) for lab in kept} == {(0, "anomaly"), (1, "normal")}


@pytest.mark.parametrize("shard", ["-1", "x", "1024", "1.5"])
def test_a_shard_that_is_not_a_shard_number_makes_the_label_invalid(shard: str) -> None:
    with pytest.raises(InvalidLabel, match="label field shard"):
        parse_label({**Label("5-0", "anomaly", "v", None, 1, "a").fields(), "shard": shard})
