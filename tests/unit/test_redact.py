"""One redactor for every URL that reaches a log, a terminal or an artifact."""

from __future__ import annotations

import pytest

from runtime.redact import redact_url


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://worker:s3cret@redis:6379/0", "redis://worker:***@redis:6379/0"),
        ("rediss://:s3cret@redis:6380", "rediss://:***@redis:6380"),
        ("redis://worker@redis:6379/0", "redis://worker@redis:6379/0"),
        ("redis://redis:6379/0?password=s3cret", "redis://redis:6379/0?password=***"),
        (
            "rediss://redis:6380/0?ssl_cert_reqs=required&ssl_password=s3cret",
            "rediss://redis:6380/0?ssl_cert_reqs=required&ssl_password=***",
        ),
        ("unix:///run/redis.sock?db=2", "unix:///run/redis.sock?db=2"),
        ("redis://u:p%40ss@host/0", "redis://u:***@host/0"),
    ],
)
def test_passwords_are_masked_wherever_the_url_carries_them(url: str, shown: str) -> None:
    assert redact_url(url) == shown
    assert "s3cret" not in redact_url(url)


def test_a_url_that_does_not_parse_is_not_shown_at_all() -> None:
    assert redact_url("redis://u:s3cret@[::1") == "***"
