"""The one place that speaks HTTP: POST a request with the standard library's urllib.

urllib covers what the notifier needs with nothing to install: a timeout (on connecting and on
each read of the answer), our headers, TLS with the system's certificate store and hostname
checks, and the usual HTTPS_PROXY / NO_PROXY variables. Redirects are not followed (a POST that
is redirected is a misconfigured URL, and following it could send the body elsewhere): the 3xx
answer is returned and judged like a refusal.
"""

from __future__ import annotations

import http.client
import ssl
import urllib.error
import urllib.request
from email.message import Message
from typing import IO, Any

from notify.delivery import ReceiverUnreachable, Reply
from notify.formats import Outgoing

ANSWER_EXCERPT_BYTES = 2048


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    def redirect_request(
        self, req: urllib.request.Request, fp: IO[bytes], code: int, msg: str, headers: Message, newurl: str
    ) -> None:
        """Never follow: urllib then raises HTTPError with the 3xx answer."""
        return None


def _excerpt(answer: Any) -> str:
    try:
        return bytes(answer.read(ANSWER_EXCERPT_BYTES)).decode("utf-8", "replace")
    except (OSError, http.client.HTTPException, ValueError):
        return ""


class UrllibSender:
    """POSTs to one URL with urllib; a timeout or connection failure raises ReceiverUnreachable."""

    def __init__(
        self,
        url: str,
        timeout_seconds: float,
        user_agent: str,
        authorization: str | None = None,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self.url = url
        self.timeout_seconds = timeout_seconds
        self._headers = {"User-Agent": user_agent}
        if authorization:
            self._headers["Authorization"] = authorization
        context = tls or ssl.create_default_context()
        self._opener = urllib.request.build_opener(
            _NoRedirects(), urllib.request.HTTPSHandler(context=context)
        )

    def send(self, message: Outgoing) -> Reply:
        """POST `message`; the answer, whatever its status."""
        request = urllib.request.Request(
            self.url,
            data=message.body,
            method="POST",
            headers={**self._headers, "Content-Type": message.content_type, "Idempotency-Key": message.key},
        )
        try:
            with self._opener.open(request, timeout=self.timeout_seconds) as answer:
                return Reply(int(answer.status), answer.headers.get("Retry-After"), None, _excerpt(answer))
        except urllib.error.HTTPError as exc:  # a status urllib does not call success: ours to judge
            with exc:
                headers = exc.headers
                return Reply(
                    int(exc.code), headers.get("Retry-After"), headers.get("Location"), _excerpt(exc)
                )
        except urllib.error.URLError as exc:
            if isinstance(exc.reason, TimeoutError):
                raise ReceiverUnreachable("timeout", self._timed_out(exc.reason)) from exc
            raise ReceiverUnreachable("connection", _failed(exc.reason)) from exc
        except TimeoutError as exc:  # while reading the answer
            raise ReceiverUnreachable("timeout", self._timed_out(exc)) from exc
        except (OSError, http.client.HTTPException) as exc:  # reset, closed without an answer
            raise ReceiverUnreachable("connection", _failed(exc)) from exc

    def _timed_out(self, cause: object) -> str:
        return f"no answer within {self.timeout_seconds:g} s (ANOMALY_NOTIFY_TIMEOUT_SECONDS): {cause}"


def _failed(cause: object) -> str:
    kind = type(cause).__name__ if isinstance(cause, BaseException) else "error"
    return f"the connection to the receiver failed: {kind}: {cause}"
