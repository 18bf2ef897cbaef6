"""KEDA's own Redis user (deploy/README.md, "Least privilege in Redis") on a real redis-server: the
commands KEDA's redis-streams scaler sends for each trigger of deploy/k8s/keda-scaledobject.yaml
work as that user, with one shard and two, and everything else is NOPERM."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import redis
import yaml

from tests.conftest import ROOT, RedisServer

from .conftest import k8s_object, keda_generator

pytestmark = pytest.mark.integration

USER = "anomaly-keda"
PASSWORD = "keda-acl-pw"
SHARDED_KEYS = "~images:{*}"  # deploy/README.md: with ANOMALY_SHARDS > 1 the patterns take the suffix
# What KEDA's redis-streams scaler sends (kedacore/keda, KEDA 2.11 and later): getRedisClient in
# pkg/scalers/redis_scaler.go pings once when it builds a scaler; createEntriesCountFn in
# redis_streams_scaler.go, on every poll, per mode:
CONNECT = ("ping",)
SENT_BY_MODE = {
    # INFO: the Redis >= 7 check; XINFO GROUPS: the lag; XLEN: the lag while the group is missing.
    "lag": ("info", "xinfo|groups", "xlen"),
    "pending": ("xpending",),  # XPENDING stream group, the summary form
    "length": ("xlen",),
}


def trigger_mode(metadata: dict[str, str]) -> str:
    """KEDA's choice of mode (redisStreamsMetadata.Validate): consumerGroup with lagCount -> lag,
    consumerGroup alone -> pending entries, no consumerGroup -> stream length."""
    if metadata.get("consumerGroup"):
        return "lag" if int(metadata.get("lagCount", "0")) else "pending"
    return "length"


def declared_triggers(shards: int) -> list[dict[str, Any]]:
    """The committed ScaledObject's triggers (one shard), or the generator's for `shards`."""
    if shards == 1:
        return list(k8s_object("ScaledObject")["spec"]["triggers"])
    return list(yaml.safe_load(keda_generator().scaled_object(shards=shards))["spec"]["triggers"])


def documented_acl_line() -> str:
    """KEDA's `ACL SETUSER` line of deploy/README.md."""
    text = (ROOT / "deploy" / "README.md").read_text()
    lines = [ln for ln in text.splitlines() if ln.startswith(f"ACL SETUSER {USER} ")]
    assert len(lines) == 1, f"deploy/README.md documents {len(lines)} ACL lines for {USER}"
    return lines[0]


def granted_commands(line: str) -> set[str]:
    """The +commands of an ACL SETUSER line, as Redis names them (xinfo|groups)."""
    return {word[1:].lower() for word in line.split() if word.startswith("+")}


def test_the_documented_acl_grants_exactly_what_the_declared_triggers_send() -> None:
    modes = {trigger_mode(t["metadata"]) for t in declared_triggers(1)}
    assert modes == {"lag", "pending"}
    needed = set(CONNECT).union(*(SENT_BY_MODE[mode] for mode in modes))
    granted = granted_commands(documented_acl_line())
    assert granted == needed, f"missing {sorted(needed - granted)}, not needed {sorted(granted - needed)}"


def test_the_keda_secret_names_the_documented_user() -> None:
    secret = k8s_object("Secret", "anomaly-keda-redis")
    assert secret["stringData"]["redis-username"] == documented_acl_line().split()[2] == USER
    assert "data" not in secret and secret["stringData"]["redis-password"] == "CHANGE-ME"


@dataclass
class Keda:
    """A client logged in as KEDA's user, the triggers it serves, and an admin client."""

    client: redis.Redis
    triggers: list[dict[str, Any]]
    admin: redis.Redis


@pytest.fixture(params=[1, 2], ids=["one-shard", "two-shards"])
def keda(
    request: pytest.FixtureRequest, redis_client: redis.Redis, redis_server: RedisServer
) -> Iterator[Keda]:
    """KEDA's user created from its documented line (the shard patterns for 2), and its client."""
    if int(redis_client.info("server")["redis_version"].split(".")[0]) < 7:
        pytest.skip("the lag trigger needs Redis 7 (XINFO GROUPS lag)")
    shards = int(request.param)
    line = documented_acl_line().replace("KEDA-PASSWORD", PASSWORD)
    if shards > 1:
        assert SHARDED_KEYS in (ROOT / "deploy" / "README.md").read_text()
        line = line.replace(" ~images ", f" {SHARDED_KEYS} ")
    redis_client.execute_command(*line.split())
    client = redis.Redis(port=redis_server.port, username=USER, password=PASSWORD, decode_responses=True)
    try:
        yield Keda(client, declared_triggers(shards), redis_client)
    finally:
        client.close()
        redis_client.acl_deluser(USER)


def backlog(admin: redis.Redis, stream: str, group: str, added: int, delivered: int) -> None:
    """`added` entries in `stream`, of which a worker of `group` has read `delivered` (not acked)."""
    for i in range(added):
        admin.xadd(stream, {"image": b"\0" * 4, "id": f"e{i}"})
    admin.xgroup_create(stream, group, id="0")
    admin.xreadgroup(group, "worker-0", {stream: ">"}, count=delivered)


def test_keda_reads_lag_and_pending_entries_of_every_trigger_as_its_own_user(keda: Keda) -> None:
    streams = sorted({t["metadata"]["stream"] for t in keda.triggers})
    for stream in streams:
        group = keda.triggers[0]["metadata"]["consumerGroup"]
        backlog(keda.admin, stream, group, added=5, delivered=2)
    assert keda.client.ping() is True
    for trigger in keda.triggers:
        metadata = trigger["metadata"]
        stream, group = metadata["stream"], metadata["consumerGroup"]
        mode = trigger_mode(metadata)
        if mode == "lag":
            assert int(keda.client.info()["redis_version"].split(".")[0]) >= 7
            (found,) = [g for g in keda.client.xinfo_groups(stream) if g["name"] == group]
            assert found["lag"] == 3
            assert keda.client.xlen(stream) == 5
        else:
            assert mode == "pending"
            assert keda.client.xpending(stream, group)["pending"] == 2


def test_keda_finds_the_lag_of_a_stream_whose_group_does_not_exist_yet(keda: Keda) -> None:
    stream = keda.triggers[0]["metadata"]["stream"]
    keda.admin.xadd(stream, {"image": b"\0" * 4})
    assert keda.client.xinfo_groups(stream) == []
    assert keda.client.xlen(stream) == 1  # KEDA's lag when the group is missing


def test_keda_may_not_write_or_read_entries(keda: Keda) -> None:
    metadata = keda.triggers[0]["metadata"]
    stream, group = metadata["stream"], metadata["consumerGroup"]
    backlog(keda.admin, stream, group, added=2, delivered=1)
    entry_id = keda.admin.xrange(stream)[0][0]
    refused = {
        "XADD": lambda: keda.client.xadd(stream, {"forged": "1"}),
        "XACK": lambda: keda.client.xack(stream, group, entry_id),
        "DEL": lambda: keda.client.delete(stream),
        "XGROUP DESTROY": lambda: keda.client.xgroup_destroy(stream, group),
        "XREADGROUP": lambda: keda.client.xreadgroup(group, "keda", {stream: ">"}),
        "XRANGE": lambda: keda.client.xrange(stream),
        "XINFO GROUPS of another key": lambda: keda.client.xinfo_groups("anomalies"),
    }
    for command, call in refused.items():
        with pytest.raises(redis.exceptions.NoPermissionError):
            call()
            pytest.fail(f"{command} was allowed")
    assert keda.admin.xlen(stream) == 2 and keda.admin.xpending(stream, group)["pending"] == 1
