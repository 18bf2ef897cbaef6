"""Helpers of the anomaly-notify tests: output entries as the worker writes them, a scripted fake
sender, a fake clock, a notifier factory, and a real HTTP receiver on a free port."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CollectorRegistry

from notify.anomalies import Anomaly, ViewerLinks
from notify.delivery import ReceiverUnreachable, Reply
from notify.formats import Formatter, Outgoing
from notify.metrics import NotifyMetrics
from notify.notifier import Notifier
from notify.stream import OutputGroup
from runtime.http import Health
from runtime.settings import NotifySettings


def output_fields(source_id: str, score: float = 0.9, pid: str = "", **extra: str) -> dict[str, str]:
    """An output entry's fields as worker.commit.build_commit writes them."""
    return {
        "id": pid or f"cam-{source_id}",
        "source_id": source_id,
        "score": repr(score),
        "threshold": "0.5",
        "z": "4.2",
        "p_value": "0.001",
        "model_version": "v1",
        "scored_at_ms": "1700000000000",
        "region": "7,7,14,14",
        "region_share": "0.4",
        "score_components": '{"mse":0.5,"hidden-knn":0.4}',
    } | extra


def publish(r: Any, source_id: str, score: float = 0.9, stream: str = "anomalies", **extra: str) -> str:
    """XADD one anomaly to an output stream; returns its entry id."""
    return str(r.xadd(stream, output_fields(source_id, score, **extra)).decode())


def anomaly(
    source_id: str = "1700000000000-0", *, shard: int = 0, score: float = 0.9, **fields: Any
) -> Anomaly:
    """An Anomaly as parse_anomaly returns it for a worker's output entry."""
    values: dict[str, Any] = {
        "shard": shard,
        "output_stream": "anomalies" if shard == 0 else f"anomalies:{{{shard}}}",
        "input_stream": "images" if shard == 0 else f"images:{{{shard}}}",
        "entry_id": "1700000000100-0",
        "source_id": source_id,
        "id": "cam-7",
        "score": score,
        "threshold": 0.5,
        "z": 4.2,
        "p_value": 0.001,
        "model_version": "v1",
        "scored_at_ms": 1700000000000,
        "region": "7,7,14,14",
        "region_share": 0.4,
        "score_components": {"mse": 0.5, "hidden-knn": 0.4},
    } | fields
    return Anomaly(**values)


class FakeClock:
    """Wall and monotonic time that move only when told (or when the notifier waits)."""

    def __init__(self, wall: float = 1_700_000_100.0) -> None:
        self.wall = wall
        self.mono = 1000.0
        self.waits: list[float] = []
        self.stop_after_waits: int | None = None  # the notifier's stop, requested on that wait

    def time(self) -> float:
        return self.wall

    def monotonic(self) -> float:
        return self.mono

    def advance(self, seconds: float) -> None:
        self.wall += seconds
        self.mono += seconds

    def wait(self, seconds: float) -> bool:
        """The notifier's pause: time passes at once; True (stopped) on the scripted wait."""
        self.waits.append(seconds)
        self.advance(seconds)
        return self.stop_after_waits is not None and len(self.waits) >= self.stop_after_waits


Answer = int | Reply | ReceiverUnreachable


class FakeSender:
    """Answers each request with the next scripted answer (a status, a Reply, or a
    ReceiverUnreachable to raise), then 200; records every request."""

    def __init__(self, answers: Iterable[Answer] = ()) -> None:
        self.answers = list(answers)
        self.sent: list[Outgoing] = []
        self.before_answer: Callable[[Outgoing], None] | None = None

    def send(self, message: Outgoing) -> Reply:
        self.sent.append(message)
        if self.before_answer is not None:
            self.before_answer(message)
        answer: Answer = self.answers.pop(0) if self.answers else 200
        if isinstance(answer, ReceiverUnreachable):
            raise answer
        return answer if isinstance(answer, Reply) else Reply(answer)

    @property
    def keys(self) -> list[str]:
        return [m.key for m in self.sent]


def notify_settings(**overrides: Any) -> NotifySettings:
    """Settings for tests: consumer n1, the whole backlog, small retry waits."""
    values: dict[str, Any] = {
        "notify_webhook_url": "http://127.0.0.1:1/hook",
        "notify_consumer": "n1",
        "notify_start_id": "0",
        "notify_retry_base_seconds": 0.01,
        "notify_retry_cap_seconds": 0.05,
        "notify_timeout_seconds": 1.0,
        "notify_claim_idle_ms": 60_000,
    } | overrides
    return NotifySettings(**values)


def output_groups(client: Any, settings: NotifySettings) -> list[OutputGroup]:
    """One OutputGroup per shard, as anomaly-notify builds them."""
    return [
        OutputGroup(
            client,
            shard=shard,
            output_stream=settings.in_shard(settings.output_stream, shard),
            input_stream=settings.in_shard(settings.input_stream, shard),
            dead_letter_stream=settings.in_shard(settings.notify_dead_letter_stream, shard),
            dead_letter_maxlen=settings.notify_dead_letter_maxlen,
            group=settings.notify_group,
            consumer=settings.notify_consumer,
        )
        for shard in range(settings.shards)
    ]


def build_notifier(
    client: Any,
    sender: Any,
    clock: FakeClock | None = None,
    registry: CollectorRegistry | None = None,
    settings: NotifySettings | None = None,
    **overrides: Any,
) -> Notifier:
    """A notifier on `client` with a fake clock (its pauses take no time) and a fresh registry."""
    settings = settings or notify_settings(**overrides)
    clock = clock or FakeClock()
    formatter = Formatter(
        settings.notify_format, ViewerLinks(settings.notify_viewer_url), settings.notify_max_per_minute
    )
    return Notifier(
        settings,
        output_groups(client, settings),
        sender,
        formatter,
        NotifyMetrics(registry or CollectorRegistry(), with_process=False),
        Health(needs_model=False),
        clock=clock.time,
        monotonic=clock.monotonic,
        wait=clock.wait,
    )


def dead_letters(r: Any, stream: str = "anomalies:notify-dead-letter") -> list[dict[str, str]]:
    """A dead-letter stream's entries as str dicts."""
    return [{k.decode(): v.decode("utf-8", "replace") for k, v in f.items()} for _, f in r.xrange(stream)]


def pending_count(r: Any, stream: str = "anomalies", group: str = "anomaly-notify") -> int:
    """Entries of the notifier's group not acknowledged yet."""
    return int(r.xpending(stream, group)["pending"])


# -- a real receiver ------------------------------------------------------------------------------
@dataclass
class Received:
    """One request the receiver got."""

    path: str
    headers: dict[str, str]
    body: Any
    status: int  # what it answered (0: it did not answer in time); a held answer counts as 200
    at: float = field(default_factory=time.monotonic)  # when it arrived

    @property
    def key(self) -> str:
        return self.headers.get("idempotency-key", "")


@dataclass
class Script:
    """What the receiver answers: `answers` in turn, then `then`. An answer is "ok", a status,
    "timeout" (no answer until released: the client gives up first), "hold" (the receiver took
    it, recorded as a 200, but the answer never comes: released, the connection just closes) or
    "slow" (taken, answered 200 once released)."""

    answers: list[int | str] = field(default_factory=list)
    then: int | str = 200
    retry_after: str | None = None


class Receiver:
    """A threaded HTTP server on a free port that records every POST and answers as scripted."""

    def __init__(self, script: Script | None = None) -> None:
        self.script = script or Script()
        self.requests: list[Received] = []
        self.lock = threading.Lock()
        self.changed = threading.Condition(self.lock)
        self.release = threading.Event()  # ends every "timeout" and "hold" answer
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", "0"))
                raw = self.rfile.read(length)
                with receiver.lock:
                    answer = (
                        receiver.script.answers.pop(0) if receiver.script.answers else receiver.script.then
                    )
                try:
                    body = json.loads(raw)
                except ValueError:
                    body = raw.decode("utf-8", "replace")
                record = Received(self.path, {k.lower(): v for k, v in self.headers.items()}, body, 0)
                if answer in ("hold", "timeout"):
                    record.status = 200 if answer == "hold" else 0
                    receiver._record(record)
                    receiver.release.wait(60)
                    self.close_connection = True
                    return
                status = 200 if answer in ("ok", "slow") else int(answer)
                record.status = status
                receiver._record(record)
                if answer == "slow":
                    receiver.release.wait(60)
                self.send_response(status)
                if receiver.script.retry_after is not None and status in (429, 503):
                    self.send_header("Retry-After", receiver.script.retry_after)
                text = b"refused: bad request" if 400 <= status < 500 else b"ok"
                self.send_header("Content-Length", str(len(text)))
                try:
                    self.end_headers()
                    self.wfile.write(text)
                except (BrokenPipeError, ConnectionResetError):  # the client gave up: it counts as a timeout
                    return

            def log_message(self, format: str, *args: Any) -> None:
                """Quiet."""

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = int(self.server.server_address[1])
        self.url = f"http://127.0.0.1:{self.port}/hook"
        self._thread = threading.Thread(target=self.server.serve_forever, name="receiver", daemon=True)

    def _record(self, record: Received) -> None:
        with self.changed:
            self.requests.append(record)
            self.changed.notify_all()

    def start(self) -> Receiver:
        self._thread.start()
        return self

    def stop(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()

    def wait_for(
        self, condition: Callable[[list[Received]], bool], timeout: float, what: str
    ) -> list[Received]:
        """Wait until `condition(requests)` holds; fail after `timeout` seconds naming `what`."""
        with self.changed:
            if not self.changed.wait_for(lambda: condition(self.requests), timeout):
                raise AssertionError(f"timed out after {timeout}s waiting for {what}; got {self.summary()}")
            return list(self.requests)

    def delivered_keys(self) -> list[str]:
        """The keys of the requests answered 2xx, in order."""
        with self.lock:
            return [r.key for r in self.requests if 200 <= r.status < 300]

    def summary(self) -> list[tuple[str, int]]:
        return [(r.key, r.status) for r in self.requests]


@contextmanager
def running_receiver(script: Script | None = None) -> Iterator[Receiver]:
    """A receiver for the length of a `with` block."""
    receiver = Receiver(script).start()
    try:
        yield receiver
    finally:
        receiver.stop()
