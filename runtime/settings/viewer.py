"""anomaly-viewer's settings: the shared connection and streams, the artifact it draws with, labelling,
and who may address it (Host names) or speak for its clients (proxies)."""

from __future__ import annotations

import ipaddress
from pathlib import Path

from pydantic import Field, SecretStr, field_validator

from runtime.settings.base import StreamSettings

DEFAULT_ALLOWED_HOSTS = "localhost,127.0.0.1,::1"


def _items(value: str) -> list[str]:
    return [item.strip() for item in value.split(",") if item.strip()]


def _host_pattern(item: str) -> str:
    bare = item.strip("[]")
    try:
        if ipaddress.ip_address(bare).version == 6:
            return f"[{bare.lower()}]"
    except ValueError:
        pass
    return item.lower()


def host_patterns(value: str) -> list[str]:
    """Comma-separated host names as Starlette's TrustedHostMiddleware compares them: lower case,
    an IPv6 address in brackets (a Host header always writes it so: `[::1]:9500`)."""
    return [_host_pattern(item) for item in _items(value)]


class ViewerSettings(StreamSettings):
    """What anomaly-viewer reads from ANOMALY_* variables (--host and --port are flags)."""

    artifact: Path | None = Field(
        None, description="the served artifact directory: the viewer redraws reconstructions with it"
    )
    viewer_token: SecretStr | None = Field(
        None,
        description="anomaly-viewer: the token that allows labelling: open /?token=<it> once (a "
        "session cookie), or send it as Authorization: Bearer (unset: the page is read-only)",
    )
    viewer_allowed_hosts: str = Field(
        DEFAULT_ALLOWED_HOSTS,
        description="anomaly-viewer: the host names it answers to in the Host header, comma-separated "
        "(the port is ignored; *.example.com for every subdomain, * for any); a request for another "
        "host gets 400 'Invalid host header' (DNS rebinding)",
    )
    viewer_trusted_proxies: str = Field(
        "",
        description="anomaly-viewer: addresses or networks (comma-separated, e.g. 10.0.0.0/8) of the "
        "TLS-terminating proxies whose X-Forwarded-Proto and X-Forwarded-For it believes; empty: "
        "none, the scheme is the connection's own",
    )

    @field_validator("viewer_allowed_hosts")
    @classmethod
    def _host_patterns(cls, value: str) -> str:
        items = _items(value)
        if not items:
            raise ValueError("expected at least one host name, e.g. localhost,127.0.0.1,::1, found none")
        for item in items:
            wildcard = "*" in item and item != "*" and (not item.startswith("*.") or "*" in item[1:])
            if wildcard:
                raise ValueError(f"a wildcard host must look like *.example.com (or be *), found {item!r}")
        return value

    @field_validator("viewer_trusted_proxies")
    @classmethod
    def _proxy_addresses(cls, value: str) -> str:
        for item in _items(value):
            try:
                ipaddress.ip_network(item, strict=False)
            except ValueError:
                raise ValueError(
                    f"expected IP addresses or networks (10.0.0.7, 10.0.0.0/8, ::1), found {item!r}"
                ) from None
        return value

    def allowed_hosts(self) -> list[str]:
        """VIEWER_ALLOWED_HOSTS as TrustedHostMiddleware's patterns (IPv6 addresses bracketed)."""
        return host_patterns(self.viewer_allowed_hosts)

    def trusted_proxies(self) -> list[str]:
        """VIEWER_TRUSTED_PROXIES as a list of addresses and networks (empty: trust no proxy)."""
        return _items(self.viewer_trusted_proxies)
