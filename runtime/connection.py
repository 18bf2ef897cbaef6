"""Connecting to the configured Redis: one node, Redis Cluster, or the primary Sentinel names."""

from __future__ import annotations

from typing import Any

from runtime.settings import RedisSettings


def make_redis(
    settings: RedisSettings, client_name: str = "anomaly-scorer", read_timeout_seconds: float = 10.0
) -> Any:
    """A client of the configured Redis (one node, Cluster, or the primary Sentinel names) with
    redis-py's own retry (jittered backoff). Every program connects through it; `client_name` shows
    in CLIENT LIST, and `read_timeout_seconds` must exceed the longest blocking read it makes."""
    import redis
    from redis.backoff import ExponentialWithJitterBackoff
    from redis.retry import Retry

    kwargs: dict[str, Any] = {
        "retry": Retry(ExponentialWithJitterBackoff(cap=1.0, base=0.05), retries=3),
        "retry_on_error": [redis.ConnectionError, redis.TimeoutError],
        "socket_timeout": read_timeout_seconds,
        "socket_connect_timeout": 5.0,
        "health_check_interval": 15,
        "client_name": client_name,
    }
    if (password := settings.redis_password()) is not None:
        kwargs["password"] = password
    if settings.redis_sentinels:
        return sentinel_primary(settings, kwargs)
    if settings.redis_cluster:
        from redis.cluster import RedisCluster

        return RedisCluster.from_url(settings.redis_url.get_secret_value(), **kwargs)
    return redis.Redis.from_url(settings.redis_url.get_secret_value(), **kwargs)


def sentinel_primary(settings: RedisSettings, kwargs: dict[str, Any]) -> Any:
    """A client of the primary the Sentinels name for REDIS_SENTINEL_SERVICE: redis-py's
    SentinelConnectionPool asks them again after a connection fails, so it follows a failover
    (an old primary turned replica answers READONLY, which redis-py also treats as a lost connection).

    A rediss:// REDIS_URL puts TLS, with the URL's ssl_* options, on both the Sentinel connections
    and the primary's (redis-py's SentinelManagedSSLConnection); REDIS_SENTINEL_PASSWORD[_FILE]
    is sent to the Sentinels only, the URL's password (or REDIS_PASSWORD_FILE) to the primary."""
    from redis.backoff import NoBackoff
    from redis.connection import SSLConnection, parse_url
    from redis.retry import Retry
    from redis.sentinel import Sentinel

    url = parse_url(settings.redis_url.get_secret_value())
    for option in ("db", "username", "password"):
        if option in url and option not in kwargs:
            kwargs[option] = url[option]
    addresses = []
    for address in filter(None, (a.strip() for a in settings.redis_sentinels.split(","))):
        host, _, port = address.rpartition(":")
        addresses.append((host, int(port)))
    # No retry per Sentinel: redis-py asks the next one, and the data client's Retry repeats the
    # round. With redis-py 8.1's default (backoff, retries) a round of 3 Sentinels that refuse us
    # (a wrong REDIS_SENTINEL_PASSWORD) took 13 s, and the first error was logged after about 50 s.
    sentinel_kwargs: dict[str, Any] = {
        "socket_timeout": 2.0,
        "socket_connect_timeout": 2.0,
        "retry": Retry(NoBackoff(), 0),
    }
    if url.get("connection_class") is SSLConnection:
        tls = {option: value for option, value in url.items() if option.startswith("ssl_")}
        kwargs.update(ssl=True, **tls)
        sentinel_kwargs.update(ssl=True, **tls)
    if (password := settings.sentinel_password()) is not None:
        sentinel_kwargs["password"] = password
    sentinel = Sentinel(addresses, sentinel_kwargs=sentinel_kwargs)
    return sentinel.master_for(settings.redis_sentinel_service, **kwargs)
