"""anomaly-viewer's web app: the latest anomalies with their pictures, and one-click labels.

Design: the output stream carries no image, so the viewer reads the original from the input stream
by the alert's `source_id` (while the producers' MAXLEN still keeps it) and recomputes the
reconstruction and the error heatmap itself with the artifact's numpy network: the worker stays as
cheap as it is. Labels go to the labels stream (`contract.labels` is the contract). Everything
shown is escaped by Jinja2's autoescape, and the page's Content-Security-Policy allows no inline
script, so text a producer supplied (ids, any field) can never run.

Every endpoint that reads Redis or runs numpy is a plain function, which Starlette runs in its
threadpool: a slow Redis or a large picture never stalls the event loop. A Redis error becomes a
503 page. Requests must name an allowed host (DNS rebinding); labels need a session and its CSRF
token (`viewer.sessions`) or the token as a bearer.

I/O is in `ViewerStore` (Redis, `viewer.store`) and `ModelSource` (the artifact on disk);
`build_app` takes them.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode

import numpy as np
import redis
from jinja2 import Environment, FileSystemLoader, select_autoescape
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.middleware import Middleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, RedirectResponse, Response
from starlette.routing import Route
from starlette.templating import Jinja2Templates
from uvicorn.middleware.proxy_headers import ProxyHeadersMiddleware

from contract.codec import decode_batch, default_max_payload_bytes
from contract.labels import LABEL_VALUES, Label, LabelValue
from detector.artifact import load_artifact, manifest_digest
from detector.errors import AnomalyScorerError
from runtime.connection import make_redis
from runtime.settings.viewer import DEFAULT_ALLOWED_HOSTS, ViewerSettings, host_patterns
from viewer.pictures import Pictures, Reconstructor
from viewer.sessions import Sessions
from viewer.store import LATEST, Anomaly, ViewerStore

log = logging.getLogger(__name__)

TEMPLATES = Path(__file__).with_name("templates")
SESSION_COOKIE = "anomaly_viewer_session"
PICTURES = ("original", "reconstruction", "heatmap")
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
    "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)


class PictureUnavailable(AnomalyScorerError):
    """An alert whose pictures cannot be drawn; the message says why (the 404's text)."""


class ModelSource:
    """The artifact the pictures are computed with, reloaded when its manifest changes."""

    def __init__(self, artifact: Path) -> None:
        self.path = artifact
        self._digest = ""
        self._reconstructor: Reconstructor | None = None
        self._uint8_scale = 1.0 / 255.0
        self._lock = threading.Lock()  # pictures are drawn on several threadpool threads at once

    def current(self) -> tuple[Reconstructor, float]:
        """The reconstructor and the uint8 scale of the artifact as it is on disk now."""
        with self._lock:
            digest = manifest_digest(self.path)
            if self._reconstructor is None or digest != self._digest:
                artifact = load_artifact(self.path)
                self._reconstructor = Reconstructor(artifact)
                self._uint8_scale = artifact.baseline.preprocessing.uint8_scale
                self._digest = digest
                log.info("viewer model loaded model_version=%s", artifact.baseline.model_version)
            return self._reconstructor, self._uint8_scale


class PictureCache:
    """The pictures of the last `limit` alerts drawn, by (manifest digest, shard, alert id): a new
    artifact redraws them. Shared by the threadpool's threads."""

    def __init__(self, limit: int = 4 * LATEST) -> None:
        self.limit = limit
        self._entries: OrderedDict[tuple[str, int, str], Pictures] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: tuple[str, int, str]) -> Pictures | None:
        """The cached pictures, or None."""
        with self._lock:
            found = self._entries.get(key)
            if found is not None:
                self._entries.move_to_end(key)
            return found

    def put(self, key: tuple[str, int, str], pictures: Pictures) -> None:
        """Keep `pictures`, dropping the least recently used beyond the limit."""
        with self._lock:
            self._entries[key] = pictures
            self._entries.move_to_end(key)
            while len(self._entries) > self.limit:
                self._entries.popitem(last=False)


class RedisHealth:
    """Whether the last Redis call worked: one log line when Redis is lost, one when it is back."""

    def __init__(self) -> None:
        self._ok = True
        self._lock = threading.Lock()

    def lost(self, exc: redis.RedisError) -> None:
        """Record a failed call (logged once per outage)."""
        with self._lock:
            was_ok, self._ok = self._ok, False
        if was_ok:
            log.warning("viewer lost redis error=%s message=%s", type(exc).__name__, exc)

    def reached(self) -> None:
        """Record a call that worked (logged once after an outage)."""
        with self._lock:
            was_ok, self._ok = self._ok, True
        if not was_ok:
            log.info("viewer redis back")


def redis_problem(exc: redis.RedisError) -> str:
    """What the 503 page tells the operator about a Redis error."""
    if isinstance(exc, redis.exceptions.NoPermissionError):
        return (
            f"Redis refused a command of the viewer's user: {exc} "
            "(its ACL: deploy/README.md, Least privilege in Redis)"
        )
    if isinstance(exc, redis.exceptions.AuthenticationError):
        return (
            f"Redis refused the viewer's credentials: {exc} "
            "(the user of ANOMALY_REDIS_URL, the password of ANOMALY_REDIS_PASSWORD_FILE)"
        )
    if isinstance(exc, redis.ConnectionError | redis.TimeoutError):
        return f"Redis is unreachable: {exc}"
    return f"Redis answered with an error: {exc}"


def pictures_of(store: ViewerStore, model: ModelSource, alert: Anomaly) -> Pictures:
    """The pictures of an alert, drawn from the input entry it names in its shard's input stream;
    PictureUnavailable says why not (trimmed, or an entry that cannot be decoded or drawn)."""
    stream = store.input_streams[alert.shard]
    entry = store.original(alert.shard, alert.source_id)
    if entry is None:
        raise PictureUnavailable(
            f"input entry {alert.source_id!r} is not in {stream} (trimmed by the producers' MAXLEN, "
            "or not a full entry id)"
        )
    reconstructor, scale = model.current()
    dim = reconstructor.input_dim
    try:
        decoded = decode_batch([entry], dim, default_max_payload_bytes(dim), scale)
    except Exception as exc:
        # The codec's whole failure surface on hostile input (deep JSON nesting: RecursionError; a
        # 4,400-digit integer: ValueError; ...): whatever a writer put there, the answer is
        # "cannot be drawn", never a 500.
        raise PictureUnavailable(
            f"input entry {alert.source_id!r} of {stream} cannot be drawn: decoding it raised "
            f"{type(exc).__name__}"
        ) from exc
    if decoded.rejected:
        raise PictureUnavailable(
            f"input entry {alert.source_id!r} of {stream} cannot be drawn: {decoded.rejected[0].reason}"
        )
    try:
        return reconstructor.pictures(decoded.images[0], alert.region or None)
    except ValueError as exc:
        raise PictureUnavailable(f"input entry {alert.source_id!r} cannot be drawn: {exc}") from exc


def build_app(
    store: ViewerStore,
    model: ModelSource,
    token: str | None,
    clock: Callable[[], float] = time.time,
    by: str = "anomaly-viewer",
    *,
    allowed_hosts: Sequence[str] = tuple(host_patterns(DEFAULT_ALLOWED_HOSTS)),
    trusted_proxies: Sequence[str] = (),
    sessions: Sessions | None = None,
) -> Starlette:
    """The viewer: `/` the page, `/anomalies` its live list, `/image/...` the pictures, `/label`.

    `allowed_hosts` are the Host header values it answers (TrustedHostMiddleware's patterns);
    `trusted_proxies` the addresses whose X-Forwarded-Proto/-For it believes (none by default)."""
    env = Environment(loader=FileSystemLoader(TEMPLATES), autoescape=select_autoescape(["html"]))
    templates = Jinja2Templates(env=env)
    cache = PictureCache()
    health = RedisHealth()
    sessions = sessions or Sessions(token)

    def can_label(request: Request) -> bool:
        return sessions.session_ok(request.cookies.get(SESSION_COOKIE))

    def context(request: Request) -> dict[str, Any]:
        version = request.query_params.get("model_version", "")
        recent = store.recent()
        labels = store.labels()
        health.reached()
        shown = [a for a in recent if not version or a.model_version == version][:LATEST]
        return {
            "anomalies": [a.labelled(labels) for a in shown],
            "model_versions": sorted({a.model_version for a in recent} - {""}),
            "model_version": version,
            "can_label": can_label(request),
            "csrf": sessions.csrf_token(request.cookies.get(SESSION_COOKIE)),
            "labelling_configured": sessions.configured,
            "labels": LABEL_VALUES,
        }

    def secured(response: Response) -> Response:
        response.headers["Content-Security-Policy"] = CSP
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["Referrer-Policy"] = "no-referrer"
        return response

    def text(message: str, status: int) -> Response:
        return secured(PlainTextResponse(message, status_code=status))

    # The endpoints below that touch Redis or numpy are plain functions: Starlette runs them in its
    # threadpool, off the event loop.
    def page(request: Request) -> Response:
        given = request.query_params.get("token")
        if given is not None:  # ?token=... once: a session cookie, the token dropped from the address bar
            version = request.query_params.get("model_version")
            target = "/" + (f"?{urlencode({'model_version': version})}" if version else "")
            response = RedirectResponse(target, status_code=303)
            if sessions.token_ok(given):
                response.set_cookie(
                    SESSION_COOKIE,
                    sessions.new_session(),
                    httponly=True,
                    samesite="strict",
                    # The scheme is the connection's, or a trusted proxy's X-Forwarded-Proto.
                    secure=request.url.scheme == "https",
                )
            return secured(response)
        return secured(templates.TemplateResponse(request, "page.html", context(request)))

    def fragment(request: Request) -> Response:
        return secured(templates.TemplateResponse(request, "list.html", context(request)))

    def image(request: Request) -> Response:
        kind = request.path_params["kind"]
        shard = request.path_params["shard"]
        alert_id = request.path_params["alert_id"]
        if kind not in PICTURES:
            return text("pictures are original, reconstruction or heatmap", 404)
        try:
            key = (manifest_digest(model.path), shard, alert_id)
            pictures = cache.get(key)
            if pictures is None:
                alert = store.alert(shard, alert_id)
                health.reached()
                if alert is None:
                    where = store.output_streams[shard] if shard < store.shards else f"shard {shard}"
                    return text(f"no alert {alert_id!r} in {where}", 404)
                pictures = pictures_of(store, model, alert)
                cache.put(key, pictures)
        except PictureUnavailable as exc:
            return text(str(exc), 404)
        except (AnomalyScorerError, OSError) as exc:
            return text(f"no picture: {exc}", 404)
        data = getattr(pictures, kind)
        if data is None:
            return text(f"no {kind}: the artifact is not a dense model, only the original is drawn", 404)
        return secured(Response(data, media_type="image/png", headers={"Cache-Control": "max-age=3600"}))

    async def label(request: Request) -> Response:
        if not sessions.configured:
            return text("labelling is off: ANOMALY_VIEWER_TOKEN is not set", 403)
        bearer = _bearer(request)
        cookie = request.cookies.get(SESSION_COOKIE)
        if bearer is not None and not sessions.token_ok(bearer):
            return text("the Authorization bearer token is not the viewer token", 403)
        if bearer is None and not sessions.session_ok(cookie):
            return text(
                "labelling needs the viewer token: open /?token=... once, or send Authorization: Bearer",
                403,
            )
        form = await _small_form(request)
        if form is None:
            return text("a label is a small url-encoded form", 400)
        # A cookie is sent with any request the browser makes; the CSRF token only by our page.
        if bearer is None and not sessions.csrf_ok(cookie, form.get("csrf")):
            return text("the label has no valid CSRF token (field csrf): reload the page, click again", 403)
        value = next((v for v in LABEL_VALUES if v == form.get("label")), None)
        if value is None:
            return text(f"label must be anomaly or normal, found {form.get('label', '')!r}", 400)
        shard: int | None = None
        if form.get("shard"):
            shard_text = form["shard"]
            if not re.fullmatch(r"[0-9]{1,4}", shard_text) or int(shard_text) >= store.shards:
                return text(f"shard must be 0 to {store.shards - 1}, found {shard_text!r}", 400)
            shard = int(shard_text)
        wants_json = request.headers.get("accept", "").startswith("application/json")
        return await run_in_threadpool(write_label, form, value, shard, wants_json)

    def write_label(form: dict[str, str], value: LabelValue, shard: int | None, wants_json: bool) -> Response:
        source_id = form.get("source_id", "")
        anomaly = store.alert_of(source_id, shard)
        health.reached()
        if anomaly is None:
            return text(
                f"no alert with source_id {source_id!r} among the newest entries of the output stream", 404
            )
        try:
            score: float | None = float(anomaly.score)
        except ValueError:
            score = None
        entry = Label(
            source_id=source_id,
            label=value,
            model_version=anomaly.model_version,
            score=score if score is not None and np.isfinite(score) else None,
            labelled_at_ms=int(clock() * 1000),
            by=by,
            shard=anomaly.shard if store.shards > 1 else None,
        )
        entry_id = store.add_label(entry)
        log.info("labelled source_id=%s label=%s entry=%s", source_id, value, entry_id)
        if wants_json:
            return secured(JSONResponse({"entry_id": entry_id, **entry.fields()}))
        back = form.get("back", "/")
        return secured(
            RedirectResponse(back if back.startswith("/") and not back.startswith("//") else "/", 303)
        )

    def script(request: Request) -> Response:
        return secured(Response((TEMPLATES / "viewer.js").read_bytes(), media_type="text/javascript"))

    def style(request: Request) -> Response:
        return secured(Response((TEMPLATES / "viewer.css").read_bytes(), media_type="text/css"))

    def unavailable(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, redis.RedisError)  # registered for RedisError only
        health.lost(exc)
        return secured(
            templates.TemplateResponse(
                request,
                "unavailable.html",
                {"message": redis_problem(exc)},
                status_code=503,
                headers={"Retry-After": "5"},
            )
        )

    middleware = [Middleware(TrustedHostMiddleware, allowed_hosts=list(allowed_hosts), www_redirect=False)]
    if trusted_proxies:  # outermost: the host check and the endpoints see the client's scheme
        middleware.insert(0, Middleware(ProxyHeadersMiddleware, trusted_hosts=list(trusted_proxies)))
    return Starlette(
        routes=[
            Route("/", page),
            Route("/anomalies", fragment),
            Route("/image/{kind:str}/{shard:int}/{alert_id:str}.png", image),
            Route("/label", label, methods=["POST"]),
            Route("/viewer.js", script),
            Route("/viewer.css", style),
        ],
        middleware=middleware,
        exception_handlers={redis.RedisError: unavailable},
    )


def build_viewer(settings: ViewerSettings, model: ModelSource) -> Starlette:
    """The viewer app of these settings: the Redis client every program uses, the streams of every
    shard, labelling, the allowed hosts and trusted proxies (what `anomaly-viewer` serves)."""
    store = ViewerStore.from_settings(make_redis(settings, "anomaly-viewer"), settings)
    token = settings.viewer_token.get_secret_value() if settings.viewer_token else None
    return build_app(
        store,
        model,
        token,
        allowed_hosts=settings.allowed_hosts(),
        trusted_proxies=settings.trusted_proxies(),
    )


def _bearer(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    return header[7:] if header.lower().startswith("bearer ") else None


async def _small_form(request: Request, limit: int = 4096) -> dict[str, str] | None:
    """An application/x-www-form-urlencoded body of at most `limit` bytes as a dict (the first value
    of each name); None otherwise. Parsed here: Starlette's form parser needs python-multipart."""
    if not request.headers.get("content-type", "").startswith("application/x-www-form-urlencoded"):
        return None
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            return None
    try:
        pairs = parse_qsl(body.decode("utf-8"), keep_blank_values=True, max_num_fields=20)
    except (UnicodeDecodeError, ValueError):
        return None
    form: dict[str, str] = {}
    for name, value in pairs:
        form.setdefault(name, value)
    return form
