"""anomaly-viewer's app against fakeredis and a real tiny artifact: what the page shows, that
nothing a producer wrote can run, and that labelling needs the token."""

from __future__ import annotations

from pathlib import Path

import fakeredis
import numpy as np
import pytest
from starlette.testclient import TestClient

from contract.labels import parse_label
from detector.artifact import load_artifact
from tests.conftest import mnist_sample
from viewer.app import ModelSource, ViewerStore, build_app
from viewer.pictures import png

TOKEN = "s3cret-token"
EVIL = '<script>alert("id")</script><img src=x onerror=alert(1)>'


def push_anomaly(r: fakeredis.FakeRedis, version: str, pid: str, score: float = 0.5, **extra: str) -> str:
    """An input entry (a real digit) and the output entry a worker would write for it."""
    digit = (mnist_sample(1, seed=len(r.xrange("images")))[0][0] * 255).round().astype(np.uint8)
    source = r.xadd("images", {"image": digit.tobytes(), "id": pid}).decode()
    fields = {
        "id": pid,
        "source_id": source,
        "score": repr(score),
        "threshold": "0.1",
        "z": "4.2",
        "p_value": "0.001",
        "model_version": version,
        "scored_at_ms": "1700000000000",
        "region": "7,7,14,14",
        "region_share": "0.4",
    } | extra
    r.xadd("anomalies", fields)  # type: ignore[arg-type]
    return source


@pytest.fixture
def r() -> fakeredis.FakeRedis:
    return fakeredis.FakeRedis()


def client_for(r: fakeredis.FakeRedis, artifact: Path, token: str | None) -> TestClient:
    store = ViewerStore(r, "images", "anomalies", "anomaly-labels")
    return TestClient(build_app(store, ModelSource(artifact), token, clock=lambda: 1700000005.0))


def test_the_page_lists_the_newest_anomalies_first_with_their_pictures(r, tiny_artifact: Path) -> None:
    version = load_artifact(tiny_artifact).baseline.model_version
    first = push_anomaly(r, version, "cam-1:frame-1")
    second = push_anomaly(r, version, "cam-1:frame-2")
    page = client_for(r, tiny_artifact, None).get("/")
    assert page.status_code == 200
    assert page.text.index("cam-1:frame-2") < page.text.index("cam-1:frame-1")
    for kind in ("original", "reconstruction", "heatmap"):
        assert f"/image/{kind}/{second}.png" in page.text
    assert "7,7,14,14" in page.text and version in page.text and "2023-11-14 22:13:20 UTC" in page.text
    picture = client_for(r, tiny_artifact, None).get(f"/image/heatmap/{first}.png")
    assert picture.status_code == 200 and picture.headers["content-type"] == "image/png"
    assert picture.content.startswith(b"\x89PNG")


def test_a_picture_of_a_trimmed_input_entry_is_a_404_not_an_error(r, tiny_artifact: Path) -> None:
    source = push_anomaly(r, "v", "gone")
    r.xdel("images", source)
    assert client_for(r, tiny_artifact, None).get(f"/image/original/{source}.png").status_code == 404


def test_producer_text_is_escaped_everywhere_and_no_inline_script_may_run(r, tiny_artifact: Path) -> None:
    push_anomaly(r, EVIL, EVIL, region=EVIL, z=EVIL, score=0.5)
    client = client_for(r, tiny_artifact, TOKEN)
    client.get(f"/?token={TOKEN}")
    for path in ("/", "/anomalies", f"/?model_version={EVIL}"):
        response = client.get(path)
        assert "<script>alert" not in response.text
        assert "<img src=x" not in response.text
        assert "&lt;script&gt;alert" in response.text
        csp = response.headers["content-security-policy"]
        assert "script-src 'self'" in csp and "unsafe-inline" not in csp
    assert client.get("/").text.count("<script") == 1  # /viewer.js, nothing else


def test_without_a_token_the_page_is_read_only(r, tiny_artifact: Path) -> None:
    source = push_anomaly(r, "v", "a")
    client = client_for(r, tiny_artifact, None)
    assert 'action="/label"' not in client.get("/").text
    refused = client.post("/label", data={"source_id": source, "label": "normal"})
    assert refused.status_code == 403 and "ANOMALY_VIEWER_TOKEN is not set" in refused.text
    assert r.xlen("anomaly-labels") == 0


def test_labelling_needs_the_right_token(r, tiny_artifact: Path) -> None:
    source = push_anomaly(r, "v", "a")
    client = client_for(r, tiny_artifact, TOKEN)
    assert 'action="/label"' not in client.get("/").text
    client.get("/?token=wrong")
    assert client.post("/label", data={"source_id": source, "label": "normal"}).status_code == 403
    assert r.xlen("anomaly-labels") == 0


def test_one_click_writes_a_label_by_the_contract(r, tiny_artifact: Path) -> None:
    source = push_anomaly(r, "model-7", "a", score=0.375)
    client = client_for(r, tiny_artifact, TOKEN)
    client.get(f"/?token={TOKEN}")  # the operator opens the link with the token once
    page = client.get("/").text
    assert 'action="/label"' in page and ">normal</button>" in page
    done = client.post(
        "/label", data={"source_id": source, "label": "normal", "back": "/"}, follow_redirects=False
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


def test_a_label_other_than_anomaly_or_normal_is_refused(r, tiny_artifact: Path) -> None:
    source = push_anomaly(r, "v", "a")
    client = client_for(r, tiny_artifact, TOKEN)
    refused = client.post(
        "/label", data={"source_id": source, "label": "maybe"}, headers={"Authorization": f"Bearer {TOKEN}"}
    )
    assert refused.status_code == 400 and "found 'maybe'" in refused.text


def test_the_page_filters_by_model_version(r, tiny_artifact: Path) -> None:
    push_anomaly(r, "old-model", "from-old")
    push_anomaly(r, "new-model", "from-new")
    page = client_for(r, tiny_artifact, None).get("/?model_version=new-model").text
    assert "from-new" in page and "from-old" not in page
    assert '<option value="old-model">' in page


def test_png_encodes_grey_and_rgb_arrays() -> None:
    assert png(np.zeros((2, 3), np.uint8))[12:16] == b"IHDR"
    with pytest.raises(ValueError, match=r"found shape \(2, 3, 4\)"):
        png(np.zeros((2, 3, 4), np.uint8))
