"""anomaly-viewer's web app: the latest anomalies with their pictures, and one-click labels.

Design: the output stream carries no image, so the viewer reads the original from the input stream
by `source_id` (while the producers' MAXLEN still keeps it) and recomputes the reconstruction and
the error heatmap itself with the artifact's numpy network: the worker stays as cheap as it is.
Labels go to the labels stream (`contract.labels` is the contract). Everything shown is escaped
by Jinja2's autoescape, and the page's Content-Security-Policy allows no inline script, so text a
producer supplied (ids, any field) can never run.

I/O is in `ViewerStore` (Redis) and `ModelSource` (the artifact on disk); `build_app` takes them.
"""

from __future__ import annotations

import hmac
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode

import numpy as np
import redis
from jinja2 import Environment, FileSystemLoader, select_autoescape
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, RedirectResponse, Response
from starlette.routing import Route
from starlette.templating import Jinja2Templates

from contract.codec import decode_batch, default_max_payload_bytes
from contract.labels import LABEL_VALUES, Label, latest_labels
from detector.artifact import load_artifact, manifest_digest
from detector.errors import AnomalyScorerError
from viewer.pictures import Pictures, Reconstructor

log = logging.getLogger(__name__)

TEMPLATES = Path(__file__).with_name("templates")
TOKEN_COOKIE = "anomaly_viewer_token"
LATEST = 50  # anomalies on the page
SCAN = 1000  # output entries read to find them (filtering by model version)
LABELS_SCAN = 10_000
PICTURES = ("original", "reconstruction", "heatmap")  # label entries read to show what is labelled already
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
    "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)


def _text(value: bytes | str | None) -> str:
    if value is None:
        return ""
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


@dataclass(frozen=True)
class Anomaly:
    """One output entry as the page shows it (every field as the worker or producer wrote it)."""

    entry_id: str
    id: str
    source_id: str
    score: str
    threshold: str
    z: str
    p_value: str
    model_version: str
    scored_at_ms: str
    region: str
    region_share: str
    label: str = ""  # the latest label, if any

    @classmethod
    def from_entry(cls, entry_id: bytes | str, fields: Mapping[bytes, bytes]) -> Anomaly:
        """An output-stream entry; missing fields are empty."""

        def get(name: str) -> str:
            return _text(fields.get(name.encode()))

        return cls(
            entry_id=_text(entry_id),
            id=get("id"),
            source_id=get("source_id"),
            score=get("score"),
            threshold=get("threshold"),
            z=get("z"),
            p_value=get("p_value"),
            model_version=get("model_version"),
            scored_at_ms=get("scored_at_ms"),
            region=get("region"),
            region_share=get("region_share"),
        )

    def number(self, name: str, digits: int = 4) -> str:
        """A numeric field rounded for people; the raw text when it is not a number."""
        raw = getattr(self, name)
        try:
            return f"{float(raw):.{digits}g}"
        except ValueError:
            return raw

    @property
    def scored_at(self) -> str:
        """UTC time of scoring, or the raw field."""
        try:
            return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(int(self.scored_at_ms) / 1000))
        except (ValueError, OverflowError, OSError):
            return self.scored_at_ms


class ViewerStore:
    """The viewer's Redis reads and its one write (a label). Read-only on every other stream."""

    def __init__(self, client: Any, input_stream: str, output_stream: str, labels_stream: str) -> None:
        self.client = client
        self.input_stream = input_stream
        self.output_stream = output_stream
        self.labels_stream = labels_stream

    def latest(self, model_version: str = "", count: int = LATEST) -> list[Anomaly]:
        """The newest anomalies first, optionally of one model version, with their latest labels."""
        entries = self.client.xrevrange(self.output_stream, count=SCAN)
        anomalies = [Anomaly.from_entry(entry_id, fields) for entry_id, fields in entries]
        if model_version:
            anomalies = [a for a in anomalies if a.model_version == model_version]
        anomalies = anomalies[:count]
        labels = self.labels()
        return [
            Anomaly(**{**a.__dict__, "label": labels[a.source_id].label}) if a.source_id in labels else a
            for a in anomalies
        ]

    def model_versions(self) -> list[str]:
        """Model versions among the latest output entries, for the filter."""
        entries = self.client.xrevrange(self.output_stream, count=SCAN)
        return sorted({_text(fields.get(b"model_version")) for _, fields in entries} - {""})

    def anomaly(self, source_id: str) -> Anomaly | None:
        """The newest output entry for an input entry id."""
        for entry_id, fields in self.client.xrevrange(self.output_stream, count=SCAN):
            if _text(fields.get(b"source_id")) == source_id:
                return Anomaly.from_entry(entry_id, fields)
        return None

    def original(self, source_id: str) -> tuple[bytes, dict[bytes, bytes]] | None:
        """The input entry, while the input stream still holds it."""
        try:
            found = self.client.xrange(self.input_stream, min=source_id, max=source_id, count=1)
        except redis.ResponseError as exc:  # an id Redis refuses (not an entry id): nothing to show
            if "Invalid stream ID" in str(exc):
                return None
            raise
        return (found[0][0], found[0][1]) if found else None

    def labels(self) -> dict[str, Label]:
        """The latest label per source_id among the last LABELS_SCAN label entries."""
        entries = list(reversed(self.client.xrevrange(self.labels_stream, count=LABELS_SCAN)))
        return {label.source_id: label for label in latest_labels(entries).labels}

    def add_label(self, label: Label) -> str:
        """XADD the label; returns its entry id."""
        return _text(self.client.xadd(self.labels_stream, label.fields()))


class ModelSource:
    """The artifact the pictures are computed with, reloaded when its manifest changes."""

    def __init__(self, artifact: Path) -> None:
        self.path = artifact
        self._digest = ""
        self._reconstructor: Reconstructor | None = None
        self._uint8_scale = 1.0 / 255.0

    def current(self) -> tuple[Reconstructor, float]:
        """The reconstructor and the uint8 scale of the artifact as it is on disk now."""
        digest = manifest_digest(self.path)
        if self._reconstructor is None or digest != self._digest:
            artifact = load_artifact(self.path)
            self._reconstructor = Reconstructor(artifact)
            self._uint8_scale = artifact.baseline.preprocessing.uint8_scale
            self._digest = digest
            log.info("viewer model loaded model_version=%s", artifact.baseline.model_version)
        return self._reconstructor, self._uint8_scale


def pictures_of(store: ViewerStore, model: ModelSource, source_id: str) -> Pictures | None:
    """The pictures of an anomaly, or None when its input entry is gone or cannot be decoded."""
    entry = store.original(source_id)
    if entry is None:
        return None
    reconstructor, scale = model.current()
    dim = reconstructor.input_dim
    decoded = decode_batch([entry], dim, default_max_payload_bytes(dim), scale)
    if not decoded.ids:
        return None
    anomaly = store.anomaly(source_id)
    return reconstructor.pictures(decoded.images[0], anomaly.region if anomaly else None)


def _token_ok(expected: str | None, given: str | None) -> bool:
    if not expected or given is None:
        return False
    return hmac.compare_digest(expected.encode(), given.encode())


def build_app(
    store: ViewerStore,
    model: ModelSource,
    token: str | None,
    clock: Callable[[], float] = time.time,
    by: str = "anomaly-viewer",
) -> Starlette:
    """The viewer: `/` the page, `/anomalies` its live list, `/image/...` the pictures, `/label`."""
    env = Environment(loader=FileSystemLoader(TEMPLATES), autoescape=select_autoescape(["html"]))
    templates = Jinja2Templates(env=env)
    cache: dict[tuple[str, str], Pictures | None] = {}  # (manifest digest, source_id): a reload redraws

    def can_label(request: Request) -> bool:
        return _token_ok(token, request.cookies.get(TOKEN_COOKIE))

    def context(request: Request) -> dict[str, Any]:
        version = request.query_params.get("model_version", "")
        return {
            "anomalies": store.latest(version),
            "model_versions": store.model_versions(),
            "model_version": version,
            "can_label": can_label(request),
            "labelling_configured": bool(token),
            "labels": LABEL_VALUES,
        }

    def secured(response: Response) -> Response:
        response.headers["Content-Security-Policy"] = CSP
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["Referrer-Policy"] = "no-referrer"
        return response

    async def page(request: Request) -> Response:
        given = request.query_params.get("token")
        if given is not None:  # ?token=... once: kept in a cookie, dropped from the address bar
            version = request.query_params.get("model_version")
            target = "/" + (f"?{urlencode({'model_version': version})}" if version else "")
            response = RedirectResponse(target, status_code=303)
            if _token_ok(token, given):
                response.set_cookie(TOKEN_COOKIE, given, httponly=True, samesite="strict")
            return secured(response)
        return secured(templates.TemplateResponse(request, "page.html", context(request)))

    async def fragment(request: Request) -> Response:
        return secured(templates.TemplateResponse(request, "list.html", context(request)))

    async def image(request: Request) -> Response:
        kind = request.path_params["kind"]
        source_id = request.path_params["source_id"]
        if kind not in PICTURES:
            return secured(
                PlainTextResponse("pictures are original, reconstruction or heatmap", status_code=404)
            )
        try:
            key = (manifest_digest(model.path), source_id)
            if key not in cache:
                cache[key] = pictures_of(store, model, source_id)
                if len(cache) > 4 * LATEST:
                    cache.pop(next(iter(cache)))
        except (AnomalyScorerError, ValueError, OSError) as exc:
            return secured(PlainTextResponse(f"no picture: {exc}", status_code=404))
        pictures = cache[key]
        data = None if pictures is None else getattr(pictures, kind, None)
        if not isinstance(data, bytes):
            return secured(
                PlainTextResponse("no such picture (the input entry may be trimmed)", status_code=404)
            )
        return secured(Response(data, media_type="image/png", headers={"Cache-Control": "max-age=3600"}))

    async def label(request: Request) -> Response:
        if not token:
            return secured(
                PlainTextResponse("labelling is off: ANOMALY_VIEWER_TOKEN is not set", status_code=403)
            )
        if not can_label(request) and not _token_ok(token, _bearer(request)):
            return secured(PlainTextResponse("labelling needs the viewer token", status_code=403))
        form = await _small_form(request)
        if form is None:
            return secured(PlainTextResponse("a label is a small url-encoded form", status_code=400))
        source_id = form.get("source_id", "")
        value = form.get("label", "")
        if value not in LABEL_VALUES:
            return secured(
                PlainTextResponse(f"label must be anomaly or normal, found {value!r}", status_code=400)
            )
        anomaly = store.anomaly(source_id)
        if anomaly is None:
            return secured(
                PlainTextResponse("no anomaly with that source_id in the output stream", status_code=404)
            )
        try:
            score: float | None = float(anomaly.score)
        except ValueError:
            score = None
        entry = Label(
            source_id=source_id,
            label=value,  # checked against LABEL_VALUES above
            model_version=anomaly.model_version,
            score=score if score is not None and np.isfinite(score) else None,
            labelled_at_ms=int(clock() * 1000),
            by=by,
        )
        entry_id = store.add_label(entry)
        log.info("labelled source_id=%s label=%s entry=%s", source_id, value, entry_id)
        if request.headers.get("accept", "").startswith("application/json"):
            return secured(JSONResponse({"entry_id": entry_id, **entry.fields()}))
        back = form.get("back", "/")
        return secured(
            RedirectResponse(back if back.startswith("/") and not back.startswith("//") else "/", 303)
        )

    async def script(request: Request) -> Response:
        return secured(Response((TEMPLATES / "viewer.js").read_bytes(), media_type="text/javascript"))

    async def style(request: Request) -> Response:
        return secured(Response((TEMPLATES / "viewer.css").read_bytes(), media_type="text/css"))

    return Starlette(
        routes=[
            Route("/", page),
            Route("/anomalies", fragment),
            Route("/image/{kind:str}/{source_id:str}.png", image),
            Route("/label", label, methods=["POST"]),
            Route("/viewer.js", script),
            Route("/viewer.css", style),
        ]
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
