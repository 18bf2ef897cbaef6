"""What anomaly-notify posts, for each ANOMALY_NOTIFY_FORMAT: each body's exact shape, for one
anomaly and for a summary, with and without the viewer's links; and how an output entry is read."""

from __future__ import annotations

import pytest

from notify.anomalies import BadAnomaly, ViewerLinks, parse_anomaly
from notify.formats import CLOUDEVENTS_JSON, JSON, Formatter, rfc3339, slack_escape
from notify.grouping import Burst
from tests.notify_support import anomaly, output_fields

VIEWER = ViewerLinks("https://anomalies.example.com")
NO_VIEWER = ViewerLinks("")
PICTURE = "https://anomalies.example.com/image/original/0/1700000000100-0.png"
PAGE = "https://anomalies.example.com/?model_version=v1"


def _burst() -> Burst:
    burst = Burst.starting_with(anomaly("1700000000000-0", score=0.9), now=0.0)
    burst.add(anomaly("1700000000000-1", score=2.5, entry_id="1700000000200-0", id="cam-8"))
    burst.add(anomaly("1700000000000-2", score=1.0, entry_id="1700000000300-0", id="cam-9"))
    return burst


def _brief(source: str, output: str, pid: str, score: float, viewer: bool = True) -> dict[str, object]:
    brief: dict[str, object] = {
        "key": f"images/{source}",
        "id": pid,
        "source_id": source,
        "shard": 0,
        "output_id": output,
        "score": score,
        "model_version": "v1",
    }
    if viewer:
        brief["picture_url"] = f"https://anomalies.example.com/image/original/0/{output}.png"
    return brief


WEBHOOK_ANOMALY = {
    "kind": "anomaly",
    "key": "images/1700000000000-0",
    "id": "cam-7",
    "source_id": "1700000000000-0",
    "shard": 0,
    "output_id": "1700000000100-0",
    "score": 0.9,
    "threshold": 0.5,
    "z": 4.2,
    "p_value": 0.001,
    "model_version": "v1",
    "region": "7,7,14,14",
    "region_share": 0.4,
    "score_components": {"mse": 0.5, "hidden-knn": 0.4},
    "scored_at_ms": 1700000000000,
    "viewer_url": PAGE,
    "picture_url": PICTURE,
}


def test_webhook_body_of_one_anomaly() -> None:
    message = Formatter("webhook", VIEWER, 60).anomaly(anomaly())
    assert message.content_type == JSON and message.kind == "anomaly"
    assert message.key == "images/1700000000000-0"
    assert message.json() == WEBHOOK_ANOMALY


def test_webhook_body_without_a_viewer_has_no_links() -> None:
    body = Formatter("webhook", NO_VIEWER, 60).anomaly(anomaly()).json()
    assert body == {k: v for k, v in WEBHOOK_ANOMALY.items() if k not in ("viewer_url", "picture_url")}


def test_webhook_body_of_a_summary() -> None:
    message = Formatter("webhook", VIEWER, 60).summary(_burst())
    assert message.kind == "summary" and message.key.startswith("summary/")
    assert message.json() == {
        "kind": "summary",
        "key": message.key,
        "count": 3,
        "since_ms": 1700000000100,
        "until_ms": 1700000000300,
        "max_per_minute": 60,
        "first": _brief("1700000000000-0", "1700000000100-0", "cam-7", 0.9),
        "last": _brief("1700000000000-2", "1700000000300-0", "cam-9", 1.0),
        "top": [
            _brief("1700000000000-1", "1700000000200-0", "cam-8", 2.5),
            _brief("1700000000000-2", "1700000000300-0", "cam-9", 1.0),
            _brief("1700000000000-0", "1700000000100-0", "cam-7", 0.9),
        ],
        "viewer_url": "https://anomalies.example.com/",
    }


def test_alertmanager_body_is_a_list_of_one_postable_alert() -> None:
    message = Formatter("alertmanager", VIEWER, 60).anomaly(anomaly())
    assert message.content_type == JSON
    assert message.json() == [
        {
            "labels": {
                "alertname": "AnomalyDetected",
                "anomaly_key": "images/1700000000000-0",
                "source_id": "1700000000000-0",
                "shard": "0",
                "model_version": "v1",
            },
            "annotations": {
                "summary": "Anomaly cam-7 scored 0.9 (threshold 0.5)",
                "score": "0.9",
                "threshold": "0.5",
                "p_value": "0.001",
                "z": "4.2",
                "region": "7,7,14,14",
                "score_components": "mse 0.5, hidden-knn 0.4",
                "id": "cam-7",
                "output_id": "1700000000100-0",
            },
            "startsAt": "2023-11-14T22:13:20.000Z",
            "generatorURL": PICTURE,
        }
    ]


def test_alertmanager_alert_without_viewer_or_optional_fields_leaves_them_out() -> None:
    bare = anomaly(
        id="", z=None, p_value=None, region="", region_share=None, scored_at_ms=None, score_components={}
    )
    (alert,) = Formatter("alertmanager", NO_VIEWER, 60).anomaly(bare).json()
    assert "generatorURL" not in alert
    assert alert["annotations"] == {
        "summary": "Anomaly 1700000000000-0 scored 0.9 (threshold 0.5)",
        "score": "0.9",
        "threshold": "0.5",
        "output_id": "1700000000100-0",
    }
    assert alert["startsAt"] == rfc3339(1700000000100)  # no scored_at_ms: when it was published


def test_alertmanager_summary_is_one_burst_alert() -> None:
    burst = _burst()
    (alert,) = Formatter("alertmanager", VIEWER, 60).summary(burst).json()
    assert alert == {
        "labels": {"alertname": "AnomalyBurst", "summary_key": burst.key},
        "annotations": {
            "summary": "3 anomalies past the limit of 60 a minute; top scores: cam-8 2.5, cam-9 1, cam-7 0.9",
            "count": "3",
            "first_id": "cam-7",
            "last_id": "cam-9",
            "first_key": "images/1700000000000-0",
            "last_key": "images/1700000000000-2",
        },
        "startsAt": "2023-11-14T22:13:20.100Z",
        "generatorURL": "https://anomalies.example.com/",
    }


def test_cloudevent_in_structured_mode_carries_the_webhook_body_as_data() -> None:
    message = Formatter("cloudevents", VIEWER, 60).anomaly(anomaly(shard=1))
    assert message.content_type == CLOUDEVENTS_JSON == "application/cloudevents+json; charset=utf-8"
    event = message.json()
    assert event == {
        "specversion": "1.0",
        "id": "images:{1}/1700000000000-0",
        "source": "/anomaly-scorer/anomalies:{1}",
        "type": "anomaly-scorer.anomaly.detected",
        "time": "2023-11-14T22:13:20.000Z",
        "subject": "cam-7",
        "datacontenttype": "application/json",
        "data": Formatter("webhook", VIEWER, 60).anomaly(anomaly(shard=1)).json(),
    }
    assert (
        event["data"]["picture_url"] == "https://anomalies.example.com/image/original/1/1700000000100-0.png"
    )


def test_cloudevent_of_a_summary() -> None:
    burst = _burst()
    event = Formatter("cloudevents", VIEWER, 60).summary(burst).json()
    assert {k: v for k, v in event.items() if k != "data"} == {
        "specversion": "1.0",
        "id": burst.key,
        "source": "/anomaly-scorer/anomaly-notify",
        "type": "anomaly-scorer.anomaly.summary",
        "time": "2023-11-14T22:13:20.300Z",
        "datacontenttype": "application/json",
    }
    assert event["data"] == Formatter("webhook", VIEWER, 60).summary(burst).json()


def test_slack_message_has_text_and_blocks_with_the_links() -> None:
    assert Formatter("slack", VIEWER, 60).anomaly(anomaly()).json() == {
        "text": "Anomaly cam-7 scored 0.9 (threshold 0.5)",
        "blocks": [
            {
                "type": "section",
                "text": {
                    "type": "mrkdwn",
                    "text": "Anomaly cam-7 scored 0.9 (threshold 0.5)\n"
                    "p-value 0.001 · model v1 · shard 0 · region 7,7,14,14\n"
                    "why: mse 0.5, hidden-knn 0.4",
                },
            },
            {
                "type": "context",
                "elements": [{"type": "mrkdwn", "text": f"<{PICTURE}|picture> · <{PAGE}|viewer>"}],
            },
        ],
    }


def test_slack_summary_names_count_top_scores_first_and_last() -> None:
    body = Formatter("slack", NO_VIEWER, 60).summary(_burst()).json()
    assert body == {
        "text": "3 anomalies past the limit of 60 a minute",
        "blocks": [
            {
                "type": "section",
                "text": {
                    "type": "mrkdwn",
                    "text": "3 anomalies past the limit of 60 a minute\n"
                    "top scores: cam-8 2.5, cam-9 1, cam-7 0.9\n"
                    "first cam-7 · last cam-9 · 2023-11-14T22:13:20.100Z to 2023-11-14T22:13:20.300Z",
                },
            }
        ],
    }


def test_slack_escapes_what_a_producer_wrote_so_it_cannot_mention_or_link() -> None:
    body = Formatter("slack", NO_VIEWER, 60).anomaly(anomaly(id="<!channel> & <http://evil|x>")).json()
    assert body["text"] == "Anomaly &lt;!channel&gt; &amp; &lt;http://evil|x&gt; scored 0.9 (threshold 0.5)"
    assert slack_escape("x" * 500).endswith("…") and len(slack_escape("x" * 500)) == 200


def test_the_key_is_the_input_entry_so_shards_never_collide() -> None:
    # Two shards hand out the same stream id; their anomalies keep distinct keys.
    assert anomaly("5-0", shard=0).key == "images/5-0"
    assert anomaly("5-0", shard=1).key == "images:{1}/5-0"


def test_an_output_entry_is_parsed_into_an_anomaly() -> None:
    fields = {k.encode(): v.encode() for k, v in output_fields("1700000000000-3").items()}
    parsed = parse_anomaly(
        b"1700000000100-0", fields, shard=0, output_stream="anomalies", input_stream="images"
    )
    assert parsed == anomaly("1700000000000-3", id="cam-1700000000000-3")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"source_id": "abc"}, "field source_id is 'abc', expected a stream id like 1700000000000-0"),
        ({"score": "high"}, "field score is 'high', expected a number"),
        ({"threshold": "nan"}, "field threshold is 'nan', expected a finite number"),
        ({"score": ""}, "field score is missing, expected a number"),
        ({"id": "x" * 2000}, "field id has 2000 bytes, expected at most 1024"),
    ],
)
def test_an_output_entry_that_cannot_be_described_is_refused_naming_the_field(
    change: dict[str, str], message: str
) -> None:
    fields = {k.encode(): v.encode() for k, v in (output_fields("1-0") | change).items()}
    with pytest.raises(BadAnomaly) as caught:
        parse_anomaly(b"2-0", fields, shard=0, output_stream="anomalies", input_stream="images")
    assert str(caught.value) == message


def test_optional_numbers_that_are_not_finite_are_left_out_never_written_as_nan() -> None:
    fields = {k.encode(): v.encode() for k, v in output_fields("1-0", z="inf", p_value="nan").items()}
    parsed = parse_anomaly(b"2-0", fields, shard=0, output_stream="anomalies", input_stream="images")
    body = Formatter("webhook", NO_VIEWER, 60).anomaly(parsed).json()
    assert body["z"] is None and body["p_value"] is None


@pytest.mark.parametrize(
    "written",
    ["", "[" * 5000, "not json", "[0.5]", '{"mse": "high", "knn": true, "x": null}', '{"mse": 1e999}'],
)
def test_score_components_that_are_not_ours_leave_the_anomaly_without_them(written: str) -> None:
    fields = {
        k.encode(): v.encode() for k, v in output_fields("1700000000000-3", score_components=written).items()
    }
    parsed = parse_anomaly(
        b"1700000000100-0", fields, shard=0, output_stream="anomalies", input_stream="images"
    )
    assert parsed.score_components == {} and parsed.why == ""
    assert (
        "score_components"
        not in Formatter("alertmanager", VIEWER, 60).anomaly(parsed).json()[0]["annotations"]
    )
    assert Formatter("webhook", VIEWER, 60).anomaly(parsed).json()["score_components"] is None


def test_the_largest_contribution_comes_first_in_why() -> None:
    assert anomaly(score_components={"mse": 0.2, "orientation": 5.0, "hidden-knn": 1.5}).why == (
        "orientation 5, hidden-knn 1.5, mse 0.2"
    )


def test_viewer_links_follow_the_viewers_routes() -> None:
    links = ViewerLinks("http://viewer:9500")
    assert links.page() == "http://viewer:9500/"
    assert links.page("v 1/x") == "http://viewer:9500/?model_version=v+1%2Fx"
    assert links.picture(anomaly(shard=3)) == "http://viewer:9500/image/original/3/1700000000100-0.png"
    assert NO_VIEWER.page() is None and NO_VIEWER.picture(anomaly()) is None
