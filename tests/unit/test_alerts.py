"""Labels are checked against the alerts the workers wrote: only a label whose source_id is an
alert of the artifact's model version is used, with that alert's score; the others are counted by
reason. The look-up reads the output (and scores) streams of every shard in bounded pages."""

from __future__ import annotations

import fakeredis
import pytest

from contract.labels import Label, LabelSet, latest_labels
from runtime.settings import StreamSettings
from tests.support import publish_alert
from trainer.alerts import (
    INVALID,
    NOT_AN_ALERT,
    OTHER_MODEL,
    SCORED_NORMAL,
    SEVERAL_SHARDS,
    Alert,
    AlertLookup,
    ShardStreams,
    alert_of,
    alert_streams,
    find_alerts,
    verify_labels,
)

MINE = "a1b2c3d4e5f60718"  # the artifact's model version
OLD = "0000000000000000"


def label(source_id: str, value: str = "anomaly", version: str = MINE, score: float | None = None) -> Label:
    return Label(source_id, value, version, score, 1, "test")  # type: ignore[arg-type]


def labels(*items: Label, invalid: int = 0) -> LabelSet:
    return LabelSet(items, len(items) + invalid, "9-0", tuple(f"{i}-0: bad" for i in range(invalid)))


def alert(source_id: str, score: float, version: str = MINE, shard: int = 0, flagged: bool = True) -> Alert:
    return Alert(source_id, version, score, flagged, f"anomalies:{{{shard}}}", shard)


def lookup(*alerts: Alert) -> AlertLookup:
    found = AlertLookup()
    for a in alerts:
        found.add(a)
    return found


# -- verify_labels (pure) -------------------------------------------------------------------------
def test_a_label_of_an_alert_is_used_with_the_alerts_score_not_its_own() -> None:
    verified = verify_labels(labels(label("1-0", score=1e299)), lookup(alert("1-0", 0.7)), MINE)
    assert verified.scores.tolist() == [0.7]
    assert verified.is_anomaly.tolist() == [True]
    assert verified.skipped_text() == ""


def test_a_label_without_a_score_is_used_with_the_alerts_score() -> None:
    verified = verify_labels(labels(label("1-0", "normal", score=None)), lookup(alert("1-0", 0.55)), MINE)
    assert verified.scores.tolist() == [0.55] and verified.is_anomaly.tolist() == [False]


def test_labels_with_made_up_ids_are_counted_as_not_an_alert_and_never_used() -> None:
    forged = [label(f"9999999999999-{i}", score=1e299) for i in range(12)]
    verified = verify_labels(labels(*forged), lookup(alert("1-0", 0.7)), MINE)
    assert verified.labels == () and verified.scores.size == 0
    assert verified.skipped[NOT_AN_ALERT] == 12
    assert verified.skipped_text() == "12 not an alert"


def test_labels_of_another_model_version_are_skipped_whatever_the_label_claims() -> None:
    verified = verify_labels(
        labels(label("1-0", version=OLD), label("2-0")),  # an old model's label; a label claiming ours
        lookup(alert("1-0", 0.7, version=OLD), alert("2-0", 0.8, version=OLD)),
        MINE,
    )
    assert verified.labels == ()
    assert verified.skipped[OTHER_MODEL] == 2


def test_a_scores_stream_entry_counts_only_when_it_was_flagged() -> None:
    verified = verify_labels(
        labels(label("1-0"), label("2-0", "normal")),
        lookup(alert("1-0", 0.2, flagged=False), alert("2-0", 0.6, flagged=True)),
        MINE,
    )
    assert [v.source_id for v in verified.labels] == ["2-0"] and verified.scores.tolist() == [0.6]
    assert verified.skipped[SCORED_NORMAL] == 1


def test_an_id_that_is_an_alert_in_two_shards_is_skipped_as_ambiguous() -> None:
    verified = verify_labels(
        labels(label("1-0")), lookup(alert("1-0", 0.7, shard=0), alert("1-0", 0.9, shard=1)), MINE
    )
    assert verified.labels == () and verified.skipped[SEVERAL_SHARDS] == 1


def test_a_label_naming_its_shard_picks_that_shards_alert_when_ids_coincide() -> None:
    from dataclasses import replace

    both = lookup(alert("1-0", 0.7, shard=0), alert("1-0", 0.9, shard=1))
    verified = verify_labels(labels(replace(label("1-0"), shard=1)), both, MINE)
    assert [lab.shard for lab in verified.labels] == [1] and verified.scores.tolist() == [0.9]
    elsewhere = verify_labels(
        labels(replace(label("2-0"), shard=1)), lookup(alert("2-0", 0.8, shard=0)), MINE
    )
    assert elsewhere.labels == () and elsewhere.skipped[NOT_AN_ALERT] == 1


def test_labels_off_the_contract_are_counted_as_invalid() -> None:
    verified = verify_labels(labels(invalid=3), lookup(), MINE)
    assert verified.skipped[INVALID] == 3 and verified.skipped_text() == "3 invalid"


@pytest.mark.parametrize(
    "fields",
    [
        {"source_id": "1-0", "model_version": MINE, "score": "inf"},
        {"source_id": "1-0", "model_version": MINE, "score": "NaN"},
        {"source_id": "1-0", "model_version": MINE, "score": "high"},
        {"source_id": "1-0", "score": "0.7"},
        {"model_version": MINE, "score": "0.7"},
    ],
)
def test_an_output_entry_off_the_contract_verifies_nothing(fields: dict[str, str]) -> None:
    raw = {k.encode(): v.encode() for k, v in fields.items()}
    assert alert_of(raw, "anomalies", 0, scores_stream=False) is None


def test_a_scores_stream_entry_is_an_alert_only_with_flagged_1() -> None:
    entry = {b"source_id": b"1-0", b"model_version": MINE.encode(), b"score": b"0.7"}
    assert alert_of(entry | {b"flagged": b"1"}, "scores", 0, scores_stream=True).flagged  # type: ignore[union-attr]
    assert not alert_of(entry | {b"flagged": b"0"}, "scores", 0, scores_stream=True).flagged  # type: ignore[union-attr]
    assert alert_of(entry, "anomalies", 0, scores_stream=False).flagged  # type: ignore[union-attr]


# -- find_alerts (paged reads of the streams) -------------------------------------------------------
def streams(shards: int = 1, scores: str = "") -> list[ShardStreams]:
    return alert_streams(StreamSettings(shards=shards, scores_stream=scores))


def test_every_shards_output_stream_is_read_and_only_the_labelled_alerts_kept() -> None:
    r = fakeredis.FakeRedis()
    for i in range(10):
        publish_alert(r, "anomalies:{0}", f"{i}-0", i, MINE)
        publish_alert(r, "anomalies:{1}", f"{i}-1", 100 + i, MINE)
    found = find_alerts(r, streams(shards=2), {"3-0", "7-1", "9999-0"}, MINE, page=3)
    assert {k: [a.score for a in v] for k, v in found.found.items()} == {"3-0": [3.0], "7-1": [107.0]}
    assert found.entries_read == {"anomalies:{0}": 10, "anomalies:{1}": 10}  # 9999-0 is in neither


def test_a_stream_is_read_newest_first_until_every_label_was_found_in_it() -> None:
    r = fakeredis.FakeRedis()
    for i in range(20):
        publish_alert(r, "anomalies", f"{i}-0", 0.5, MINE)
    found = find_alerts(r, streams(), {"17-0", "15-0"}, MINE, page=2)
    assert set(found.found) == {"15-0", "17-0"}
    assert found.entries_read == {"anomalies": 5}  # 19, 18, 17, 16, 15: nothing older was read


def test_the_scores_stream_is_read_only_for_labels_not_found_among_the_alerts() -> None:
    r = fakeredis.FakeRedis()
    publish_alert(r, "anomalies", "1-0", 0.7, MINE)
    publish_alert(r, "scores", "1-0", 0.7, MINE, flagged=True)
    publish_alert(r, "scores", "2-0", 0.8, MINE, flagged=True)  # trimmed from the output stream
    publish_alert(r, "scores", "3-0", 0.1, MINE, flagged=False)
    found = find_alerts(r, streams(scores="scores"), {"1-0", "2-0", "3-0"}, MINE)
    assert [(a.stream, a.flagged) for a in found.found["1-0"]] == [("anomalies", True)]
    assert [(a.stream, a.flagged) for a in found.found["2-0"]] == [("scores", True)]
    assert [(a.stream, a.flagged) for a in found.found["3-0"]] == [("scores", False)]


def test_an_alert_of_another_model_does_not_end_the_search_for_this_models() -> None:
    r = fakeredis.FakeRedis()
    publish_alert(r, "anomalies", "1-0", 0.7, MINE)
    publish_alert(r, "anomalies", "1-0", 0.9, OLD)  # newer: scored again by another model
    found = find_alerts(r, streams(), {"1-0"}, MINE, page=1)
    assert sorted((a.model_version, a.score) for a in found.found["1-0"]) == [(OLD, 0.9), (MINE, 0.7)]


def test_no_stream_is_read_when_no_label_is_of_this_model() -> None:
    r = fakeredis.FakeRedis()
    publish_alert(r, "anomalies", "1-0", 0.7, MINE)
    assert find_alerts(r, streams(scores="scores"), set(), MINE).entries_read == {}


def test_a_label_read_from_the_stream_without_a_score_is_verified_and_an_invalid_one_counted() -> None:
    r = fakeredis.FakeRedis()
    publish_alert(r, "anomalies", "1-0", 0.7, MINE)
    r.xadd("anomaly-labels", label("1-0", score=None).fields())  # type: ignore[arg-type]
    r.xadd("anomaly-labels", {"source_id": "2-0", "label": "maybe"})
    labelled = latest_labels(r.xrange("anomaly-labels"))
    verified = verify_labels(labelled, find_alerts(r, streams(), {"1-0"}, MINE), MINE)
    assert verified.scores.tolist() == [0.7] and verified.skipped_text() == "1 invalid"
