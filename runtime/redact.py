"""URLs without their secrets: what logs, terminals and artifacts may show of a Redis URL."""

from __future__ import annotations

from urllib.parse import parse_qsl, urlencode, urlsplit

MASK = "***"
# Query parameters that carry secrets (redis-py passes every query parameter to the connection:
# ?password=..., ?ssl_password=...). A name containing any of these is masked.
SECRET_PARTS = ("pass", "secret", "token", "auth", "key")


def redact_url(url: str) -> str:
    """`url` with the userinfo's password and every secret-looking query value replaced by ***."""
    try:
        parts = urlsplit(url)
        netloc = parts.netloc
        if "@" in netloc:
            userinfo, host = netloc.rsplit("@", 1)
            user, colon, _ = userinfo.partition(":")
            netloc = f"{user}:{MASK}@{host}" if colon else f"{user}@{host}"
        query = parts.query
        if query:
            pairs = parse_qsl(query, keep_blank_values=True)
            query = urlencode(
                [(name, MASK if _is_secret(name) else value) for name, value in pairs], safe="*"
            )
        if netloc == parts.netloc and query == parts.query:
            return url
        # Rebuilt by hand: urlunsplit drops the // of an empty authority (unix:///path).
        text = f"{parts.scheme}://{netloc}{parts.path}"
        return text + (f"?{query}" if query else "") + (f"#{parts.fragment}" if parts.fragment else "")
    except ValueError:  # not a URL at all (a bad port, brackets): show nothing of it
        return MASK


def _is_secret(name: str) -> bool:
    lowered = name.lower()
    return any(part in lowered for part in SECRET_PARTS)
