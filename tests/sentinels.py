"""A primary, a replica and three Sentinels started by the tests, optionally with passwords and TLS."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis

from tests.conftest import RedisServer, free_port, redis_server_binary, wait_until


@dataclass
class SentinelSet:
    primary: RedisServer
    replica: RedisServer
    sentinels: list[subprocess.Popen[bytes]]
    ports: list[int]
    sentinel_password: str | None = None
    tls_ca: Path | None = None

    @property
    def addresses(self) -> str:
        return ",".join(f"127.0.0.1:{port}" for port in self.ports)

    def sentinel_client(self, port: int, **options: Any) -> redis.Redis:
        """A client of one Sentinel with its password and TLS, if any."""
        if self.tls_ca is not None:
            options.update(ssl=True, ssl_ca_certs=str(self.tls_ca))
        return redis.Redis(port=port, password=self.sentinel_password, **options)


@contextmanager
def sentinel_set(
    directory: Path,
    *,
    password: str | None = None,
    sentinel_password: str | None = None,
    tls_ca: Path | None = None,
    for_failover: bool = True,
) -> Iterator[SentinelSet]:
    """1 primary, 1 replica, 3 sentinels (quorum 2, primary down after 1 s). `password`: the data
    nodes' requirepass; `sentinel_password`: the Sentinels' own; `tls_ca`: every one of them speaks
    TLS only, with the certificates in `directory` (tests.support.write_test_certificates).
    `for_failover`: wait until the Sentinels know the replica and each other (gossip: up to about
    10 s), else only until each names the primary."""
    binary = redis_server_binary()
    primary_dir, replica_dir = directory / "primary", directory / "replica"
    for d in (primary_dir, replica_dir):
        d.mkdir()
        if tls_ca is not None:
            for name in ("server.crt", "server.key"):
                (d / name).symlink_to(directory / name)
    primary = RedisServer(free_port(), primary_dir, tls_ca=tls_ca, password=password).start()
    replica_of = ("--replicaof", "127.0.0.1", str(primary.port))
    replica = RedisServer(free_port(), replica_dir, replica_of, tls_ca=tls_ca, password=password).start()
    sentinels: list[subprocess.Popen[bytes]] = []
    ports: list[int] = []
    result = SentinelSet(primary, replica, sentinels, ports, sentinel_password, tls_ca)
    try:
        for i in range(3):
            port = free_port()
            lines = [
                f"bind 127.0.0.1\ndir {directory}\nlogfile {directory}/sentinel-{i}.log",
                f"sentinel monitor mymaster 127.0.0.1 {primary.port} 2",
                "sentinel down-after-milliseconds mymaster 1000",
                "sentinel failover-timeout mymaster 5000",
            ]
            if tls_ca is None:
                lines.append(f"port {port}")
            else:
                lines += [
                    f"port 0\ntls-port {port}\ntls-cert-file {directory}/server.crt",
                    f"tls-key-file {directory}/server.key\ntls-ca-cert-file {tls_ca}",
                    "tls-auth-clients no\ntls-replication yes",  # replication: to the data nodes
                ]
            if password is not None:
                lines.append(f"sentinel auth-pass mymaster {password}")
            if sentinel_password is not None:  # its own, and the one it sends to the other Sentinels
                lines.append(f"requirepass {sentinel_password}\nsentinel sentinel-pass {sentinel_password}")
            config = directory / f"sentinel-{i}.conf"
            config.write_text("\n".join(lines) + "\n")
            sentinels.append(subprocess.Popen([binary, str(config), "--sentinel"], stdout=subprocess.DEVNULL))
            ports.append(port)

        def everyone_known() -> bool:
            for port in ports:
                try:
                    s = result.sentinel_client(port, socket_timeout=1, decode_responses=True)
                    if not for_failover:
                        if s.sentinel_get_master_addr_by_name("mymaster") != ("127.0.0.1", primary.port):
                            return False
                        continue
                    if len(s.sentinel_slaves("mymaster")) != 1 or len(s.sentinel_sentinels("mymaster")) != 2:
                        return False
                except redis.RedisError:
                    return False
            return replica.client().info("replication").get("master_link_status") == "up"

        what = "sentinels know the replica and each other" if for_failover else "sentinels name the primary"
        wait_until(everyone_known, 60, interval=0.2, what=what)
        yield result
    finally:
        for process in sentinels:
            process.kill()
            process.wait(10)
        primary.stop(kill=True)
        replica.stop(kill=True)
