"""anomaly-viewer's app against fakeredis and a real tiny artifact: what the page shows (alerts of
every shard, newest first, read in bounded amounts), that only alerts are drawn, that nothing a
producer wrote can run or crash it, who may label (session, CSRF token, bearer), which hosts it
answers, and a 503 page when Redis is down."""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path
from typing import Any

import fakeredis
import numpy as np
import pytest
from pydantic import ValidationError
from starlette.testclient import TestClient

from contract.codec import scale_pixels
from contract.labels import parse_label
from contract.shards import shard_key
from detector.artifact import load_artifact
from runtime.settings import ViewerSettings
from tests.conftest import mnist_sample
from tests.support import push_alert
from viewer.app import SESSION_COOKIE, ModelSource, build_app
from viewer.pictures import Reconstructor, png
from viewer.sessions import Sessions
from viewer.store import LABELS_SCAN, LATEST, SCAN, ViewerStore, entry_id_key

TOKEN = "s3cret-token"
EVIL = '<script>alert("id")</script><img src=x onerror=alert(1)>'
LOCAL = "http://localhost"


@pytest.fixture
def r() -> fakeredis.FakeRedis:
    return fakeredis.FakeRedis()


def store_for(client: Any, shards: int = 1) -> ViewerStore:
    return ViewerStore.from_settings(client, ViewerSettings(shards=shards))


def client_for(
    r: Any,
    artifact: Path,
    token: str | None = None,
    *,
    shards: int = 1,
    base_url: str = LOCAL,
    model: ModelSource | None = None,
    client: tuple[str, int] = ("127.0.0.1", 50000),
    **options: Any,
) -> TestClient:
    app = build_app(
        store_for(r, shards), model or ModelSource(artifact), token, clock=lambda: 1700000005.0, **options
    )
    return TestClient(app, base_url=base_url, client=client)


def picture_url(kind: str, alert: str, shard: int = 0) -> str:
    return f"/image/{kind}/{shard}/{alert}.png"


def logged_in(client: TestClient) -> str:
    """Open the token link once, as the operator does; returns the page's CSRF token."""
    client.get(f"/?token={TOKEN}")
    return csrf_of(client.get("/").text)


def csrf_of(page: str) -> str:
    match = re.search(r'name="csrf" value="([^"]*)"', page)
    assert match is not None, "the page has no label form"
    return match.group(1)


def articles(page: str) -> list[str]:
    """The producer ids of the anomalies on a page, in order."""
    return re.findall(r'<dd class="id">([^<]*)</dd>', page)


# ---------------------------------------------------------------- what the page shows


def test_the_page_lists_the_newest_anomalies_first_with_their_pictures(r, tiny_artifact: Path) -> None:
    version = load_artifact(tiny_artifact).baseline.model_version
    _, first = push_alert(r, version, "cam-1:frame-1")
    _, second = push_alert(r, version, "cam-1:frame-2")
    client = client_for(r, tiny_artifact)
    page = client.get("/")
    assert page.status_code == 200
    assert articles(page.text) == ["cam-1:frame-2", "cam-1:frame-1"]
    for kind in ("original", "reconstruction", "heatmap"):
        assert picture_url(kind, second) in page.text
    assert "7,7,14,14" in page.text and version in page.text and "2023-11-14 22:13:20 UTC" in page.text
    picture = client.get(picture_url("heatmap", first))
    assert picture.status_code == 200 and picture.headers["content-type"] == "image/png"
    assert picture.content.startswith(b"\x89PNG")


def test_the_page_filters_by_model_version(r, tiny_artifact: Path) -> None:
    push_alert(r, "old-model", "from-old")
    push_alert(r, "new-model", "from-new")
    page = client_for(r, tiny_artifact).get("/?model_version=new-model").text
    assert articles(page) == ["from-new"]
    assert '<option value="old-model">' in page


def test_producer_text_is_escaped_everywhere_and_no_inline_script_may_run(r, tiny_artifact: Path) -> None:
    push_alert(r, EVIL, EVIL, region=EVIL, z=EVIL, score=0.5)
    client = client_for(r, tiny_artifact, TOKEN)
    logged_in(client)
    for path in ("/", "/anomalies", f"/?model_version={EVIL}"):
        response = client.get(path)
        assert "<script>alert" not in response.text
        assert "<img src=x" not in response.text
        assert "&lt;script&gt;alert" in response.text
        csp = response.headers["content-security-policy"]
        assert "script-src 'self'" in csp and "unsafe-inline" not in csp
    assert client.get("/").text.count("<script") == 1  # /viewer.js, nothing else


def why(page: str) -> list[str]:
    """The `why` line of every anomaly on a page: its score components as shown, in order."""
    return [
        re.sub(r"<[^>]+>", "", cell).strip()
        for cell in re.findall(r'<dd class="why">(.*?)</dd>', page, re.DOTALL)
    ]


def test_each_alert_says_which_score_component_flagged_it_largest_first(r, tiny_artifact: Path) -> None:
    components = '{"mse":1.25,"orientation":0.4,"hidden-knn":6.125,"hidden-mahalanobis":-0.5}'
    push_alert(r, "m", "explained", score_components=components)
    push_alert(r, "m", "from-an-older-worker")  # no score_components field
    page = client_for(r, tiny_artifact).get("/").text
    assert why(page) == [
        "–",
        "hidden-knn 6.12 · mse 1.25 · orientation 0.4 · hidden-mahalanobis -0.5",
    ]
    assert '<span class="component largest" title="what hidden-knn added to the score">' in page


@pytest.mark.parametrize(
    "hostile",
    [
        "[" * 5000,  # deeper than any parser's stack
        "not json",
        "[1, 2, 3]",
        '{"mse": "1e999", "orientation": true, "x": null, "y": NaN, "z": Infinity}',
        json.dumps({EVIL: 2.0}),
        json.dumps({f"c{i}": float(i) for i in range(500)}),
    ],
)
def test_hostile_score_components_never_break_the_page_and_are_escaped(
    r, tiny_artifact: Path, hostile: str
) -> None:
    push_alert(r, "m", "hostile", score_components=hostile)
    response = client_for(r, tiny_artifact).get("/")
    assert response.status_code == 200 and articles(response.text) == ["hostile"]
    assert "<script>alert" not in response.text
    (shown,) = why(response.text)
    assert shown.count("·") < 8  # at most MAX_COMPONENTS_SHOWN


# ---------------------------------------------------------------- only alerts are drawn


def test_picture_of_an_id_that_is_not_an_alert_is_404(r, tiny_artifact: Path) -> None:
    # Input ids apart from the alert's own (output ids are now): each stream numbers its entries.
    source, alert = push_alert(r, "v", "flagged", source_id="100-0")
    normal = r.xadd("images", {"image": bytes(784), "id": "scored-normal"}, id="200-0").decode()
    client = client_for(r, tiny_artifact)
    assert client.get(picture_url("original", alert)).status_code == 200
    for not_an_alert in (normal, source):  # input entries: neither is an output entry's id
        refused = client.get(picture_url("original", not_an_alert))
        assert refused.status_code == 404 and "no alert" in refused.text


def test_a_millisecond_only_id_matches_no_entry(r, tiny_artifact: Path) -> None:
    source, alert = push_alert(r, "v", "a", source_id="1700000000000-5")
    client = client_for(r, tiny_artifact)
    milliseconds = alert.split("-")[0]
    assert client.get(picture_url("original", milliseconds)).status_code == 404
    # Redis reads a bare millisecond as a range over that whole millisecond: never asked so.
    assert store_for(r).original(0, "1700000000000") is None
    assert store_for(r).original(0, source) is not None
    # An output entry whose source_id is a bare millisecond (a hostile writer) draws nothing either.
    r.xadd("images", {"image": bytes(784)}, id="1700000000001-0")
    forged = r.xadd("anomalies", {"source_id": "1700000000001", "model_version": "v"}).decode()
    refused = client.get(picture_url("original", forged))
    assert refused.status_code == 404 and "not a full entry id" in refused.text


@pytest.mark.parametrize(
    "text,key",
    [
        ("1700000000000-0", (1700000000000, 0)),
        ("0-1", (0, 1)),
        ("1700000000000", None),
        ("1700000000000-", None),
        ("-1-0", None),
        ("01-0", None),
        ("1-0-0", None),
        (f"{2**64}-0", None),
        ("1-0 ", None),
        ("", None),
    ],
)
def test_only_full_entry_ids_are_entry_ids(text: str, key: tuple[int, int] | None) -> None:
    assert entry_id_key(text) == key


def test_a_picture_of_a_trimmed_input_entry_is_a_404_not_an_error(r, tiny_artifact: Path) -> None:
    source, alert = push_alert(r, "v", "gone")
    r.xdel("images", source)
    missing = client_for(r, tiny_artifact).get(picture_url("original", alert))
    assert missing.status_code == 404 and "trimmed" in missing.text


DEEP_JSON = {"image": b"[" * 5000, "dtype": b"json"}
HUGE_INTEGER = {"image": b"[" + b"0," * 783 + b"1" * 4400 + b"]", "dtype": b"json"}


@pytest.mark.parametrize(
    "image",
    [
        pytest.param(DEEP_JSON, id="5-KB-of-brackets"),
        pytest.param(HUGE_INTEGER, id="4400-digit-integer"),
        pytest.param({"image": b"\xff\xfe[0.5]", "dtype": b"json"}, id="not-utf8"),
        pytest.param({"image": b"x" * 10, "dtype": b"uint8"}, id="short-uint8"),
        pytest.param({"image": b"[]", "dtype": b"bfloat16"}, id="unknown-dtype"),
    ],
)
def test_an_input_entry_that_cannot_be_decoded_is_a_404_cannot_be_drawn(
    r, tiny_artifact: Path, image: dict[str, bytes]
) -> None:
    _, alert = push_alert(r, "v", "poison", image=image)
    client = client_for(r, tiny_artifact)
    for kind in ("original", "heatmap"):
        refused = client.get(picture_url(kind, alert))
        assert refused.status_code == 404 and "cannot be drawn" in refused.text
    assert client.get("/").status_code == 200


# ---------------------------------------------------------------- which hosts it answers


@pytest.mark.parametrize("host", ["localhost", "localhost:9500", "127.0.0.1:9500", "[::1]:9500"])
def test_the_page_answers_localhost_by_default(r, tiny_artifact: Path, host: str) -> None:
    assert client_for(r, tiny_artifact).get("/", headers={"host": host}).status_code == 200


def test_a_request_for_another_host_is_refused(r, tiny_artifact: Path) -> None:
    push_alert(r, "v", "a")
    client = client_for(r, tiny_artifact, TOKEN)
    for path in ("/", "/anomalies", f"/?token={TOKEN}"):
        refused = client.get(path, headers={"host": "attacker.example:9500"}, follow_redirects=False)
        assert refused.status_code == 400 and "set-cookie" not in refused.headers


def test_allowed_hosts_are_configurable(r, tiny_artifact: Path) -> None:
    settings = ViewerSettings(viewer_allowed_hosts="viewer.example.com, *.internal.example")
    client = client_for(r, tiny_artifact, allowed_hosts=settings.allowed_hosts())
    assert client.get("/", headers={"host": "viewer.example.com"}).status_code == 200
    assert client.get("/", headers={"host": "a.internal.example:443"}).status_code == 200
    assert client.get("/", headers={"host": "localhost"}).status_code == 400


def test_allowed_hosts_setting_brackets_ipv6_and_refuses_a_bad_wildcard() -> None:
    assert ViewerSettings().allowed_hosts() == ["localhost", "127.0.0.1", "[::1]"]
    assert ViewerSettings(viewer_allowed_hosts="Viewer.Example.COM,fd00::1").allowed_hosts() == [
        "viewer.example.com",
        "[fd00::1]",
    ]
    with pytest.raises(ValidationError, match=r"like \*\.example\.com.*found 'view\*\.example\.com'"):
        ViewerSettings(viewer_allowed_hosts="view*.example.com")
    with pytest.raises(ValidationError, match="at least one host name"):
        ViewerSettings(viewer_allowed_hosts=" , ")


def test_trusted_proxies_setting_takes_addresses_and_networks_only() -> None:
    assert ViewerSettings().trusted_proxies() == []
    assert ViewerSettings(viewer_trusted_proxies="10.0.0.0/8, ::1").trusted_proxies() == ["10.0.0.0/8", "::1"]
    with pytest.raises(ValidationError, match=r"found 'ingress\.example'"):
        ViewerSettings(viewer_trusted_proxies="ingress.example")
    with pytest.raises(ValidationError, match=r"found '\*'"):
        ViewerSettings(viewer_trusted_proxies="*")


# ---------------------------------------------------------------- who may label


def test_without_a_token_the_page_is_read_only(r, tiny_artifact: Path) -> None:
    source, _ = push_alert(r, "v", "a")
    client = client_for(r, tiny_artifact)
    assert 'action="/label"' not in client.get("/").text
    refused = client.post("/label", data={"source_id": source, "label": "normal"})
    assert refused.status_code == 403 and "ANOMALY_VIEWER_TOKEN is not set" in refused.text
    assert r.xlen("anomaly-labels") == 0


def test_labelling_needs_the_right_token(r, tiny_artifact: Path) -> None:
    source, _ = push_alert(r, "v", "a")
    client = client_for(r, tiny_artifact, TOKEN)
    assert 'action="/label"' not in client.get("/").text
    client.get("/?token=wrong")
    assert SESSION_COOKIE not in client.cookies
    assert client.post("/label", data={"source_id": source, "label": "normal"}).status_code == 403
    assert r.xlen("anomaly-labels") == 0


def test_one_click_writes_a_label_by_the_contract(r, tiny_artifact: Path) -> None:
    source, _ = push_alert(r, "model-7", "a", score=0.375)
    client = client_for(r, tiny_artifact, TOKEN)
    csrf = logged_in(client)  # the operator opens the link with the token once
    page = client.get("/").text
    assert 'action="/label"' in page and ">normal</button>" in page
    done = client.post(
        "/label",
        data={"source_id": source, "label": "normal", "back": "/", "shard": "0", "csrf": csrf},
        follow_redirects=False,
    )
    assert done.status_code == 303
    [(_, fields)] = r.xrange("anomaly-labels")
    label = parse_label(fields)
    assert (label.source_id, label.label, label.model_version, label.score) == (
        source,
        "normal",
        "model-7",
        0.375,
    )
    assert label.labelled_at_ms == 1700000005000 and label.by == "anomaly-viewer"
    assert "labelled normal" in client.get("/").text


def test_label_without_csrf_token_is_refused(r, tiny_artifact: Path) -> None:
    source, _ = push_alert(r, "v", "a")
    client = client_for(r, tiny_artifact, TOKEN)
    csrf = logged_in(client)
    other_session = Sessions(TOKEN).csrf_token(Sessions(TOKEN).new_session())
    altered = csrf[:-1] + ("1" if csrf.endswith("0") else "0")
    for given in ({}, {"csrf": ""}, {"csrf": altered}, {"csrf": other_session}, {"csrf": "é"}):
        refused = client.post("/label", data={"source_id": source, "label": "anomaly", **given})
        assert refused.status_code == 403 and "CSRF" in refused.text, given
    assert r.xlen("anomaly-labels") == 0


def test_the_session_cookie_is_not_the_token_and_is_httponly_and_strict(r, tiny_artifact: Path) -> None:
    client = client_for(r, tiny_artifact, TOKEN)
    opened = client.get(f"/?token={TOKEN}", follow_redirects=False)
    assert opened.status_code == 303 and opened.headers["location"] == "/"
    cookie = opened.headers["set-cookie"]
    assert cookie.startswith(f"{SESSION_COOKIE}=") and TOKEN not in cookie
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie and "Path=/" in cookie
    assert "Secure" not in cookie  # plain HTTP: a Secure cookie would never come back
    again = client_for(r, tiny_artifact, TOKEN).get(f"/?token={TOKEN}", follow_redirects=False)
    assert again.cookies[SESSION_COOKIE] != opened.cookies[SESSION_COOKIE]  # a session each time


def test_the_session_cookie_is_secure_over_tls(r, tiny_artifact: Path) -> None:
    client = client_for(r, tiny_artifact, TOKEN, base_url="https://localhost")
    cookie = client.get(f"/?token={TOKEN}", follow_redirects=False).headers["set-cookie"]
    assert "Secure" in cookie


def test_x_forwarded_proto_is_believed_from_a_trusted_proxy_only(r, tiny_artifact: Path) -> None:
    def cookie_via(client_address: str, trusted: tuple[str, ...]) -> str:
        client = client_for(r, tiny_artifact, TOKEN, client=(client_address, 4000), trusted_proxies=trusted)
        response = client.get(
            f"/?token={TOKEN}", headers={"x-forwarded-proto": "https"}, follow_redirects=False
        )
        return str(response.headers["set-cookie"])

    assert "Secure" in cookie_via("10.1.2.3", ("10.0.0.0/8",))
    assert "Secure" not in cookie_via("192.168.1.9", ("10.0.0.0/8",))  # anybody else: not believed
    assert "Secure" not in cookie_via("10.1.2.3", ())  # no trusted proxy configured (the default)


def test_a_forged_session_cookie_cannot_label(r, tiny_artifact: Path) -> None:
    source, _ = push_alert(r, "v", "a")
    foreign = Sessions(TOKEN)  # another process: another key
    forged_cookie = foreign.new_session()
    client = client_for(r, tiny_artifact, TOKEN)
    for cookie in (TOKEN, forged_cookie, "x.y", "."):  # TOKEN: the raw token is no session either
        sent = {"cookie": f"{SESSION_COOKIE}={cookie}"}
        assert 'action="/label"' not in client.get("/", headers=sent).text
        form = {"source_id": source, "label": "anomaly", "csrf": foreign.csrf_token(forged_cookie)}
        assert client.post("/label", data=form, headers=sent).status_code == 403
    assert r.xlen("anomaly-labels") == 0


def test_api_clients_label_with_a_bearer_token_and_no_csrf_token(r, tiny_artifact: Path) -> None:
    source, _ = push_alert(r, "model-7", "a", score=0.25)
    client = client_for(r, tiny_artifact, TOKEN)
    done = client.post(
        "/label",
        data={"source_id": source, "label": "anomaly"},
        headers={"Authorization": f"Bearer {TOKEN}", "Accept": "application/json"},
    )
    assert done.status_code == 200 and done.json()["source_id"] == source
    wrong = client.post(
        "/label", data={"source_id": source, "label": "anomaly"}, headers={"Authorization": "Bearer nope"}
    )
    assert wrong.status_code == 403
    assert r.xlen("anomaly-labels") == 1


def test_a_label_other_than_anomaly_or_normal_is_refused(r, tiny_artifact: Path) -> None:
    source, _ = push_alert(r, "v", "a")
    client = client_for(r, tiny_artifact, TOKEN)
    refused = client.post(
        "/label", data={"source_id": source, "label": "maybe"}, headers={"Authorization": f"Bearer {TOKEN}"}
    )
    assert refused.status_code == 400 and "found 'maybe'" in refused.text


def test_a_label_of_an_id_that_is_not_an_alert_is_refused(r, tiny_artifact: Path) -> None:
    push_alert(r, "v", "a", source_id="1700000000000-0")
    normal = r.xadd("images", {"image": bytes(784)}).decode()
    client = client_for(r, tiny_artifact, TOKEN)
    bearer = {"Authorization": f"Bearer {TOKEN}"}
    for source_id in (normal, "1700000000000", "not-an-id"):
        refused = client.post("/label", data={"source_id": source_id, "label": "anomaly"}, headers=bearer)
        assert refused.status_code == 404, source_id
    assert r.xlen("anomaly-labels") == 0


def test_sessions_are_signed_and_the_csrf_token_belongs_to_its_session() -> None:
    sessions = Sessions(TOKEN, key=b"k" * 32)
    one, two = sessions.new_session(), sessions.new_session()
    assert sessions.session_ok(one) and sessions.session_ok(two) and one != two
    assert TOKEN not in one
    assert sessions.csrf_ok(one, sessions.csrf_token(one))
    assert not sessions.csrf_ok(one, sessions.csrf_token(two))
    assert not Sessions(TOKEN, key=b"o" * 32).session_ok(one)
    assert not Sessions(None, key=b"k" * 32).session_ok(one)  # labelling off: no session counts
    assert sessions.csrf_token("forged.cookie") == ""


# ---------------------------------------------------------------- Redis: off the loop, bounded, down


def _on_event_loop() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


class Recording:
    """A Redis client (or pipeline) that records each call: (command, key, count, on the event loop)."""

    def __init__(self, client: Any, calls: list[tuple[str, str, int | None, bool]] | None = None) -> None:
        self.client = client
        self.calls = [] if calls is None else calls

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(self.client, name)
        if not callable(attribute):
            return attribute

        def call(*args: Any, **kwargs: Any) -> Any:
            key = str(args[0]) if args else ""
            self.calls.append((name, key, kwargs.get("count"), _on_event_loop()))
            result = attribute(*args, **kwargs)
            return Recording(result, self.calls) if name == "pipeline" else result

        return call


class RecordingModel(ModelSource):
    """The artifact source, recording whether each use ran on the event loop."""

    def __init__(self, artifact: Path) -> None:
        super().__init__(artifact)
        self.on_loop: list[bool] = []

    def current(self) -> Any:
        self.on_loop.append(_on_event_loop())
        return super().current()


def test_redis_and_numpy_work_runs_off_the_event_loop(r, tiny_artifact: Path) -> None:
    source, alert = push_alert(r, "v", "a")
    recording, model = Recording(r), RecordingModel(tiny_artifact)
    client = client_for(recording, tiny_artifact, TOKEN, model=model)
    csrf = logged_in(client)
    assert client.get("/anomalies").status_code == 200
    assert client.get(picture_url("heatmap", alert)).status_code == 200
    label = {"source_id": source, "label": "anomaly", "csrf": csrf}
    assert client.post("/label", data=label, follow_redirects=False).status_code == 303
    commands = {name for name, *_ in recording.calls}
    assert {"pipeline", "xrevrange", "xrange", "xadd"} <= commands
    assert [call for call in recording.calls if call[3]] == [], "Redis was called on the event loop"
    assert model.on_loop and not any(model.on_loop), "the artifact was used on the event loop"


def test_a_page_reads_a_bounded_number_of_entries(r, tiny_artifact: Path) -> None:
    for i in range(SCAN + 200):  # more alerts than a page reads, with no input entries behind them
        r.xadd("anomalies", {"id": f"n-{i}", "source_id": f"{i + 1}-0", "model_version": "v"})
    recording = Recording(r)
    client = client_for(recording, tiny_artifact)
    page = client.get("/").text
    assert articles(page)[:2] == [f"n-{SCAN + 199}", f"n-{SCAN + 198}"] and len(articles(page)) == LATEST
    client.get(picture_url("original", r.xrevrange("anomalies", count=1)[0][0].decode()))
    reads = [call for call in recording.calls if call[0] in {"xrange", "xrevrange"}]
    assert reads and all(count is not None for _, _, count, _ in reads), reads
    assert all(count <= SCAN for _, key, count, _ in reads if key != "anomaly-labels")
    assert all(count <= LABELS_SCAN for _, key, count, _ in reads if key == "anomaly-labels")


@pytest.fixture
def redis_down() -> fakeredis.FakeRedis:
    server = fakeredis.FakeServer()
    server.connected = False
    return fakeredis.FakeRedis(server=server)


def test_page_is_503_when_redis_is_down(redis_down, tiny_artifact: Path) -> None:
    client = client_for(redis_down, tiny_artifact, TOKEN)
    bearer = {"Authorization": f"Bearer {TOKEN}"}
    for response in (
        client.get("/"),
        client.get("/anomalies"),
        client.get(picture_url("original", "1700000000000-0")),
        client.post("/label", data={"source_id": "1700000000000-0", "label": "anomaly"}, headers=bearer),
    ):
        assert response.status_code == 503
        assert response.headers["content-type"].startswith("text/html")
        assert "Redis is unreachable" in response.text and "Traceback" not in response.text
        assert response.headers["retry-after"] == "5"


# ---------------------------------------------------------------- shards


def test_the_store_reads_every_shard_s_streams() -> None:
    store = store_for(fakeredis.FakeRedis(), shards=3)
    assert store.output_streams == [shard_key("anomalies", i) for i in range(3)]
    assert store.input_streams == [shard_key("images", i) for i in range(3)]
    assert store.labels_stream == "anomaly-labels"  # the labels stream is not sharded
    assert store_for(fakeredis.FakeRedis()).output_streams == ["anomalies"]


def test_anomalies_of_every_shard_are_shown_newest_first(r, tiny_artifact: Path) -> None:
    for order, shard in enumerate((2, 0, 1, 0, 2)):
        push_alert(r, "v", f"alert-{order}-shard-{shard}", shard=shard)
    client = client_for(r, tiny_artifact, shards=3)
    page = client.get("/").text
    assert articles(page) == [
        "alert-4-shard-2",
        "alert-3-shard-0",
        "alert-2-shard-1",
        "alert-1-shard-0",
        "alert-0-shard-2",
    ]
    for shard in (0, 1, 2):
        assert f"/image/original/{shard}/" in page


def test_pictures_are_drawn_from_the_input_stream_of_the_alerts_shard(r, tiny_artifact: Path) -> None:
    # The same input entry id in two shards (each stream has its own ids), holding different digits.
    digits = (mnist_sample(2, seed=3)[0] * 255).round().astype(np.uint8)
    alerts = [
        push_alert(r, "v", f"in-shard-{shard}", shard=shard, source_id="5-0", image={"image": d.tobytes()})
        for shard, d in enumerate(digits)
    ]
    client = client_for(r, tiny_artifact, shards=2)
    artifact = load_artifact(tiny_artifact)
    reconstructor = Reconstructor(artifact)
    for shard, ((source, alert), digit) in enumerate(zip(alerts, digits, strict=True)):
        assert source == "5-0"
        pixels = scale_pixels(digit[None], artifact.baseline.preprocessing.uint8_scale)[0]
        expected = reconstructor.pictures(pixels, "7,7,14,14").original
        assert client.get(picture_url("original", alert, shard)).content == expected
    assert client.get(picture_url("original", alerts[0][1], 2)).status_code == 404  # no shard 2


def test_the_model_version_filter_spans_every_shard(r, tiny_artifact: Path) -> None:
    push_alert(r, "old", "old-0", shard=0)
    push_alert(r, "new", "new-1", shard=1)
    push_alert(r, "new", "new-0", shard=0)
    page = client_for(r, tiny_artifact, shards=2).get("/?model_version=new").text
    assert articles(page) == ["new-0", "new-1"]
    assert '<option value="old">' in page


def test_a_label_finds_its_alert_in_any_shard(r, tiny_artifact: Path) -> None:
    push_alert(r, "model-a", "in-0", shard=0)
    source, _ = push_alert(r, "model-b", "in-1", shard=1, score=0.75)
    client = client_for(r, tiny_artifact, TOKEN, shards=2)
    done = client.post(
        "/label",
        data={"source_id": source, "label": "anomaly"},
        headers={"Authorization": f"Bearer {TOKEN}", "Accept": "application/json"},
    )
    assert done.status_code == 200
    assert (done.json()["model_version"], done.json()["score"]) == ("model-b", "0.75")
    wrong_shard = client.post(
        "/label",
        data={"source_id": source, "label": "anomaly", "shard": "0"},
        headers={"Authorization": f"Bearer {TOKEN}"},
    )
    assert wrong_shard.status_code == 404
    for shard in ("2", "²", "-1"):
        refused = client.post(
            "/label",
            data={"source_id": source, "label": "anomaly", "shard": shard},
            headers={"Authorization": f"Bearer {TOKEN}"},
        )
        assert refused.status_code == 400 and "shard must be 0 to 1" in refused.text, shard


def test_png_encodes_grey_and_rgb_arrays() -> None:
    assert png(np.zeros((2, 3), np.uint8))[12:16] == b"IHDR"
    with pytest.raises(ValueError, match=r"found shape \(2, 3, 4\)"):
        png(np.zeros((2, 3, 4), np.uint8))
