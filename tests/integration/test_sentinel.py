"""The worker through Redis Sentinels that require a password, in clear and over TLS."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from pydantic import ValidationError

from runtime.connection import make_redis
from runtime.settings import WorkerSettings
from tests.sentinels import SentinelSet, sentinel_set
from tests.support import build_runner, push, stream, write_test_certificates

pytestmark = pytest.mark.integration

DATA_PASSWORD = "data-secret"
SENTINEL_PASSWORD = "sentinel-secret"
ONLY_SERVE = {"for_failover": False}  # no failover here: the Sentinels need only name the primary


@pytest.fixture
def guarded(tmp_path: Path) -> Iterator[SentinelSet]:
    """Sentinels with their own requirepass, in front of a primary and replica with another."""
    with sentinel_set(
        tmp_path, password=DATA_PASSWORD, sentinel_password=SENTINEL_PASSWORD, **ONLY_SERVE
    ) as nodes:
        yield nodes


@pytest.fixture
def guarded_tls(tmp_path: Path) -> Iterator[SentinelSet]:
    """The same, every server speaking TLS only."""
    ca = write_test_certificates(tmp_path)
    with sentinel_set(
        tmp_path, password=DATA_PASSWORD, sentinel_password=SENTINEL_PASSWORD, tls_ca=ca
    ) as nodes:
        yield nodes


def settings_for(nodes: SentinelSet, url: str, **overrides: object) -> WorkerSettings:
    return WorkerSettings(
        redis_url=url,  # type: ignore[arg-type]
        redis_sentinels=nodes.addresses,
        consumer="w1",
        reload_poll_seconds=0,
        **overrides,  # type: ignore[arg-type]
    )


def test_worker_serves_through_sentinels_that_require_a_password(
    guarded: SentinelSet, tmp_path: Path
) -> None:
    filed = tmp_path / "sentinel-password"
    filed.write_text(SENTINEL_PASSWORD + "\n")
    settings = settings_for(
        guarded, f"redis://:{DATA_PASSWORD}@sentinel-managed/0", redis_sentinel_password_file=filed
    )
    runner = build_runner(make_redis(settings), settings)
    admin = guarded.primary.client()
    push(admin, 0.9)
    push(admin, 0.1)
    assert runner.drain() == 2
    assert len(stream(admin, "anomalies")) == 1
    assert runner.stream.group_state().pending == 0


def test_without_the_sentinel_password_no_primary_is_found_and_the_error_says_why(
    guarded: SentinelSet,
) -> None:
    settings = settings_for(guarded, f"redis://:{DATA_PASSWORD}@sentinel-managed/0")
    with pytest.raises(redis.ConnectionError) as refused:
        make_redis(settings).ping()
    message = str(refused.value)
    assert "No master found for 'mymaster'" in message
    assert message.count("AuthenticationError") == 3  # each Sentinel refused us, and says so
    assert SENTINEL_PASSWORD not in message and DATA_PASSWORD not in message


def test_a_sentinel_password_given_twice_is_refused() -> None:
    with pytest.raises(
        ValidationError, match="REDIS_SENTINEL_PASSWORD and ANOMALY_REDIS_SENTINEL_PASSWORD_FILE"
    ):
        WorkerSettings(redis_sentinel_password="a", redis_sentinel_password_file=Path("b"))  # type: ignore[arg-type]


def test_a_rediss_url_puts_tls_on_the_sentinels_and_the_primary(guarded_tls: SentinelSet) -> None:
    ca = guarded_tls.tls_ca
    settings = settings_for(
        guarded_tls,
        f"rediss://:{DATA_PASSWORD}@sentinel-managed/0?ssl_ca_certs={ca}",
        redis_sentinel_password=SENTINEL_PASSWORD,
    )
    client = make_redis(settings)
    runner = build_runner(client, settings)
    admin = guarded_tls.primary.client()
    push(admin, 0.9)
    assert runner.drain() == 1
    assert len(stream(admin, "anomalies")) == 1
    connection = client.connection_pool.get_connection()
    try:
        assert type(connection).__name__ == "SentinelManagedSSLConnection"
    finally:
        client.connection_pool.release(connection)
    plain = settings_for(
        guarded_tls, f"redis://:{DATA_PASSWORD}@sentinel-managed/0", redis_sentinel_password=SENTINEL_PASSWORD
    )
    with pytest.raises(redis.ConnectionError, match="No master found"):
        make_redis(plain).ping()  # the Sentinels speak TLS only: the rediss:// scheme is what made it work
