"""Who may label, pure: the viewer token, the session cookie it buys, and the CSRF token of a session.

The operator opens `/?token=<ANOMALY_VIEWER_TOKEN>` once and gets a session: a random id signed
with a key this process drew at start (HMAC-SHA256), so the cookie is never the token itself, a
stolen cookie does not reveal it, and a restart ends every session (open the token link again).
A label posted from the page carries the session's CSRF token, an HMAC of the session id under
another purpose: another site can make a browser send the cookie (SameSite aside), never read the
token out of the page. API clients send `Authorization: Bearer <token>` instead, which browsers
never add on their own, so they need no CSRF token.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets

_SESSION = b"session"
_CSRF = b"csrf"


class Sessions:
    """Checks the token, issues and verifies session cookies and their CSRF tokens (constant time)."""

    def __init__(self, token: str | None, key: bytes | None = None) -> None:
        self._token = token or None
        self._key = key if key is not None else secrets.token_bytes(32)

    @property
    def configured(self) -> bool:
        """Whether labelling is on at all (a token is set)."""
        return self._token is not None

    def token_ok(self, given: str | None) -> bool:
        """Whether `given` is the viewer token."""
        if self._token is None or given is None:
            return False
        return hmac.compare_digest(self._token.encode(), given.encode())

    def _mac(self, purpose: bytes, session_id: str) -> str:
        return hmac.new(self._key, purpose + b"\0" + session_id.encode(), hashlib.sha256).hexdigest()

    def new_session(self) -> str:
        """A fresh session cookie value: `<random id>.<its signature>`."""
        session_id = secrets.token_urlsafe(18)
        return f"{session_id}.{self._mac(_SESSION, session_id)}"

    def _session_id(self, cookie: str | None) -> str | None:
        if self._token is None or not cookie:
            return None
        session_id, _, signature = cookie.partition(".")
        expected = self._mac(_SESSION, session_id).encode()
        if not session_id or not hmac.compare_digest(signature.encode(), expected):
            return None
        return session_id

    def session_ok(self, cookie: str | None) -> bool:
        """Whether `cookie` is a session this process issued."""
        return self._session_id(cookie) is not None

    def csrf_token(self, cookie: str | None) -> str:
        """The CSRF token the page embeds in its label forms ("" without a valid session)."""
        session_id = self._session_id(cookie)
        return "" if session_id is None else self._mac(_CSRF, session_id)

    def csrf_ok(self, cookie: str | None, given: str | None) -> bool:
        """Whether `given` is the CSRF token of the valid session `cookie`."""
        expected = self.csrf_token(cookie)
        return bool(expected) and given is not None and hmac.compare_digest(expected.encode(), given.encode())
