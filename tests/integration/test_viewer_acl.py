"""anomaly-viewer as deployed, against a real redis-server: its own ACL user from deploy/README.md
(least privilege), the password in a file, one shard and two. The page, the pictures and a label
work; everything the ACL does not grant is NOPERM."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from starlette.testclient import TestClient

from contract.shards import shard_key
from runtime.connection import make_redis
from runtime.settings import ViewerSettings
from tests.conftest import ROOT, RedisServer
from tests.support import push_alert
from viewer.app import ModelSource, build_viewer

pytestmark = pytest.mark.integration

TOKEN = "viewer-token-for-tests"
PASSWORD = "viewer-pw-for-tests"
SHARDED_READS = "%R~images:{*} %R~anomalies:{*}"  # deploy/README.md: the patterns with ANOMALY_SHARDS > 1


def documented_viewer_acl(password: str, shards: int) -> list[str]:
    """The viewer's ACL SETUSER line of deploy/README.md, with the shard patterns it gives for N > 1."""
    text = (ROOT / "deploy" / "README.md").read_text()
    line = next(ln for ln in text.splitlines() if ln.startswith("ACL SETUSER anomaly-viewer "))
    line = line.replace("VIEWER-PASSWORD", password)
    if shards > 1:
        assert SHARDED_READS in text, "deploy/README.md no longer gives the viewer's sharded key patterns"
        line = line.replace("%R~images %R~anomalies", SHARDED_READS)
    return line.split()


@pytest.fixture(params=[1, 2], ids=["one-shard", "two-shards"])
def viewer_settings(
    request: pytest.FixtureRequest, redis_client: redis.Redis, redis_server: RedisServer, tmp_path: Path
) -> Iterator[ViewerSettings]:
    """Settings of a viewer that logs in as the documented ACL user, its password in a file."""
    shards = int(request.param)
    redis_client.execute_command(*documented_viewer_acl(PASSWORD, shards))
    secret = tmp_path / "redis-password"
    secret.write_text(PASSWORD + "\n")  # as a mounted Secret may end
    try:
        yield ViewerSettings(
            redis_url=f"redis://anomaly-viewer@127.0.0.1:{redis_server.port}/0",  # type: ignore[arg-type]
            redis_password_file=secret,
            shards=shards,
            viewer_token=TOKEN,  # type: ignore[arg-type]
        )
    finally:
        redis_client.acl_deluser("anomaly-viewer")


def shard_of(settings: ViewerSettings, index: int) -> int | None:
    return None if settings.shards == 1 else index % settings.shards


def test_the_viewer_works_with_its_least_privilege_acl_user(
    viewer_settings: ViewerSettings, redis_client: redis.Redis, tiny_artifact: Path
) -> None:
    admin = redis_client  # writes what the workers would
    alerts = [push_alert(admin, "v", f"alert-{i}", shard=shard_of(viewer_settings, i)) for i in range(2)]
    client = TestClient(
        build_viewer(viewer_settings, ModelSource(tiny_artifact)), base_url="http://localhost"
    )

    page = client.get("/")
    assert page.status_code == 200 and "alert-0" in page.text and "alert-1" in page.text
    for i, (_, alert) in enumerate(alerts):
        shard = shard_of(viewer_settings, i) or 0
        picture = client.get(f"/image/heatmap/{shard}/{alert}.png")
        assert picture.status_code == 200 and picture.content.startswith(b"\x89PNG")

    client.get(f"/?token={TOKEN}")
    csrf = re.search(r'name="csrf" value="([^"]*)"', client.get("/").text)
    assert csrf is not None
    source = alerts[-1][0]
    form = {"source_id": source, "label": "anomaly", "shard": str(shard_of(viewer_settings, 1) or 0)}
    done = client.post("/label", data={**form, "csrf": csrf.group(1)}, follow_redirects=False)
    assert done.status_code == 303
    [(_, fields)] = admin.xrange("anomaly-labels")
    assert fields[b"source_id"].decode() == source and fields[b"label"] == b"anomaly"
    assert "labelled anomaly" in client.get("/anomalies").text


def test_the_viewer_acl_user_may_do_nothing_else(viewer_settings: ViewerSettings, redis_client) -> None:
    push_alert(redis_client, "v", "a", shard=shard_of(viewer_settings, 0))
    inputs = "images" if viewer_settings.shards == 1 else shard_key("images", 0)
    outputs = "anomalies" if viewer_settings.shards == 1 else shard_key("anomalies", 0)
    redis_client.set("some-other-key", "x")
    viewer = make_redis(viewer_settings, "anomaly-viewer")
    assert viewer.xrevrange(outputs, count=1) and viewer.xrange(inputs, count=1)  # what it may
    forbidden = [
        lambda: viewer.xadd(inputs, {"image": b"\0"}),
        lambda: viewer.xadd(outputs, {"source_id": "1-0"}),
        lambda: viewer.xdel(outputs, viewer.xrevrange(outputs, count=1)[0][0]),
        lambda: viewer.xtrim("anomaly-labels", maxlen=0),
        lambda: viewer.xreadgroup("anomaly-scorer", "viewer", {inputs: ">"}, count=1),
        lambda: viewer.xrange("images:dead-letter", count=1),
        lambda: viewer.get("some-other-key"),
        lambda: viewer.keys("*"),
        lambda: viewer.flushall(),
    ]
    for index, command in enumerate(forbidden):
        with pytest.raises(redis.exceptions.NoPermissionError):
            command()
            pytest.fail(f"forbidden command {index} was allowed")
    assert redis_client.xlen(inputs) == 1 and redis_client.get("some-other-key") == b"x"


def test_a_command_the_acl_lacks_is_a_503_page_naming_it(
    viewer_settings: ViewerSettings, redis_client: redis.Redis, tiny_artifact: Path
) -> None:
    source, _ = push_alert(redis_client, "v", "a", shard=shard_of(viewer_settings, 0))
    redis_client.execute_command("ACL", "SETUSER", "anomaly-viewer", "-xadd")  # as if the ACL missed it
    client = TestClient(
        build_viewer(viewer_settings, ModelSource(tiny_artifact)), base_url="http://localhost"
    )
    refused = client.post(
        "/label",
        data={"source_id": source, "label": "normal"},
        headers={"Authorization": f"Bearer {TOKEN}"},
    )
    assert refused.status_code == 503 and "text/html" in refused.headers["content-type"]
    assert "no permissions to run the &#39;xadd&#39; command" in refused.text
    assert "Least privilege in Redis" in refused.text and "Traceback" not in refused.text
    assert client.get("/").status_code == 200  # reading still works
