"""Who may write the labels stream, by the ACL lines deploy/README.md documents, on a real
redis-server: the viewer's user only; the worker's, KEDA's, the producers', retune's and
anomaly-compare's get NOPERM."""

from __future__ import annotations

import re
from collections.abc import Iterator

import pytest
import redis

from contract.labels import Label
from tests.conftest import ROOT, RedisServer

pytestmark = pytest.mark.integration

PASSWORD = "labels-acl-pw"
USERS = ("anomaly-worker", "anomaly-keda", "producer", "anomaly-viewer", "anomaly-retune", "anomaly-compare")
LABEL = Label("1-0", "anomaly", "a1b2c3d4e5f60718", None, 1, "test").fields()


def documented_acl_lines() -> dict[str, str]:
    """User -> its `ACL SETUSER` line in deploy/README.md's least-privilege section."""
    lines = (ROOT / "deploy" / "README.md").read_text().splitlines()
    acl = {ln.split()[2]: ln for ln in lines if ln.startswith("ACL SETUSER ")}
    assert set(USERS) <= set(acl), f"deploy/README.md documents ACL users {sorted(acl)}, expected {USERS}"
    return acl


@pytest.fixture
def acl_users(redis_client: redis.Redis, redis_server: RedisServer) -> Iterator[dict[str, redis.Redis]]:
    """Each documented user, created from its line (every password PASSWORD), with a client of it."""
    if int(redis_client.info("server")["redis_version"].split(".")[0]) < 7:
        pytest.skip("the viewer's line uses %R~ key patterns, Redis 7.0 and newer")
    clients = {}
    for user, line in documented_acl_lines().items():
        redis_client.execute_command(*re.sub(r">[A-Z]+-PASSWORD", f">{PASSWORD}", line).split())
        clients[user] = redis.Redis(port=redis_server.port, username=user, password=PASSWORD)
    try:
        yield clients
    finally:
        for user, client in clients.items():
            client.close()
            redis_client.acl_deluser(user)


@pytest.mark.parametrize(
    "user", ["anomaly-worker", "anomaly-keda", "producer", "anomaly-retune", "anomaly-compare"]
)
def test_only_the_viewers_user_may_write_the_labels_stream(
    acl_users: dict[str, redis.Redis], user: str
) -> None:
    with pytest.raises(redis.exceptions.NoPermissionError):
        acl_users[user].xadd("anomaly-labels", LABEL)  # type: ignore[arg-type]
    assert acl_users["anomaly-viewer"].xadd("anomaly-labels", LABEL)  # type: ignore[arg-type]


def test_the_viewers_user_reads_the_streams_it_shows_and_writes_no_other(
    acl_users: dict[str, redis.Redis], redis_client: redis.Redis
) -> None:
    viewer = acl_users["anomaly-viewer"]
    redis_client.xadd("images", {"image": b"\0" * 4})
    redis_client.xadd("anomalies", {"source_id": "1-0", "score": "0.9"})
    assert len(viewer.xrange("images")) == 1 and len(viewer.xrevrange("anomalies")) == 1
    for stream in ("images", "anomalies"):
        with pytest.raises(redis.exceptions.NoPermissionError):
            viewer.xadd(stream, {"forged": "1"})
