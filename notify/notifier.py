"""The loop: read anomalies, post each (or a summary of a burst), acknowledge what was delivered;
retry, dead-letter, rate-limit, recover, stop.

`Notifier.run_once()` is one iteration and `Notifier.drain()` a burst (deliver what is there, then
return), so the real loop is tested synchronously with a fake sender and a fake clock; `run()`
adds the Redis fault handling around it.

Delivery is at least once. An anomaly is acknowledged only after the receiver's 2xx (or after its
dead letter is written, in the same MULTI/EXEC), so one delivered and not yet acknowledged when the
process dies is delivered again, with the same Idempotency-Key: by this consumer when it restarts
under the same name (its own pending entries are read first), else by any notifier of the group
once it has been idle for NOTIFY_CLAIM_IDLE_MS (XAUTOCLAIM). What a notifier holds for a while
(a burst gathered for its summary, an anomaly being retried) is renewed every third of that time,
so a live notifier's anomalies are not taken over.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence

import redis
from redis.backoff import EqualJitterBackoff

from notify.anomalies import Anomaly, BadAnomaly, parse_anomaly
from notify.dead_letters import dead_letter_fields
from notify.delivery import (
    Backoff,
    ReceiverUnreachable,
    RetryPolicy,
    Sender,
    Verdict,
    judge,
    judge_unreachable,
)
from notify.formats import Formatter, Outgoing
from notify.grouping import Burst, Held, RateLimiter
from notify.metrics import NotifyMetrics
from notify.stream import Entry, OutputGroup, read_new
from runtime.groups import PRUNE_INTERVAL_SECONDS, refused_by_acl
from runtime.http import Health
from runtime.settings import NotifySettings

log = logging.getLogger("notify")

# Longest single pause while retrying: the loop's heartbeat (/healthz) and the renewal of what it
# holds run between pauses, so a Retry-After of minutes never looks like a hung loop.
PAUSE_SLICE_SECONDS = 5.0
REDIS_BACKOFF = EqualJitterBackoff(cap=5.0, base=0.1)


class Notifier:
    """One notifier: its reads, its rate limit and burst, its deliveries. Dependencies are passed in."""

    def __init__(
        self,
        settings: NotifySettings,
        groups: Sequence[OutputGroup],
        sender: Sender,
        formatter: Formatter,
        metrics: NotifyMetrics,
        health: Health | None = None,
        *,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
        wait: Callable[[float], bool] | None = None,
        backoff: Backoff | None = None,
    ) -> None:
        self.settings = settings
        self.groups = list(groups)
        self.sender = sender
        self.formatter = formatter
        self.metrics = metrics
        self.health = health or Health(needs_model=False)
        self.clock = clock
        self.monotonic = monotonic
        self.stop_event = threading.Event()
        # Pauses end early when a stop is requested (the default waits on the stop event itself).
        self.wait = wait or self.stop_event.wait
        self.policy = RetryPolicy(
            backoff
            or EqualJitterBackoff(
                cap=settings.notify_retry_cap_seconds, base=settings.notify_retry_base_seconds
            ),
            settings.notify_retry_after_max_seconds,
        )
        self.limiter = RateLimiter(settings.notify_max_per_minute)
        self.burst: Burst | None = None
        self._held: set[tuple[int, str]] = set()  # the burst's members, so a re-read skips them
        self._in_flight: list[Held] = []  # what the delivery being tried holds
        self._started = False
        self._pending_cursors: list[bytes | None] = [b"0"] * len(self.groups)
        self._claim_cursors = [b"0-0"] * len(self.groups)
        self._claim_shard = 0
        self._claim_interval = max(0.05, settings.notify_claim_idle_ms / 2000.0)
        self._next_claim = monotonic() + self._claim_interval
        self._renew_interval = settings.notify_claim_idle_ms / 3000.0
        self._next_renew = monotonic() + self._renew_interval
        self._next_shard = 0  # on a cluster, the shard read next
        self._next_prune = 0.0  # idle consumers of the group are looked for at start, then each minute
        self._prune_refused = False  # the Redis user may not prune (told once)
        self._receiver_failing = False

    # -- control ------------------------------------------------------------------------------
    def request_stop(self) -> None:
        """Finish the delivery in hand, then leave the loop (SIGTERM)."""
        self.stop_event.set()
        self.health.stopping = True

    def start(self) -> None:
        """Create the groups if missing; the next reads recover this consumer's own pending."""
        for group in self.groups:
            if group.ensure_group(self.settings.notify_start_id):
                log.info(
                    "group created stream=%s group=%s start_id=%s",
                    group.output_stream,
                    group.group,
                    self.settings.notify_start_id,
                )
        self._pending_cursors = [b"0"] * len(self.groups)
        self._started = True
        self.health.redis_ok = True
        self.metrics.redis_up.set(1)

    # -- one iteration ------------------------------------------------------------------------
    def run_once(self, block_ms: int | None = None) -> int:
        """One iteration: a summary that is due, then own pending, stale entries of others, or new
        ones (waiting up to `block_ms`, never past the summary's time); returns how many were read."""
        if not self._started:
            self.start()
        self.health.heartbeat()
        self.send_summary_if_due()
        if self.stop_event.is_set():
            return 0
        self._renew_if_due()
        self._prune_if_due()
        batches = self._read(block_ms)
        handled = 0
        for group, entries in batches:
            for entry_id, fields in entries:
                if self.stop_event.is_set():  # the rest stay pending: read again after a restart
                    return handled
                self._handle(group, entry_id, fields)
                handled += 1
                self.send_summary_if_due()
        self.health.redis_ok = True
        self.metrics.redis_up.set(1)
        return handled

    def drain(self) -> int:
        """Burst mode: deliver everything there is now (no blocking), send the summary of what passed
        the limit, then return the count read."""
        self._next_claim = self.monotonic()
        total = 0
        while not self.stop_event.is_set():
            handled = self.run_once(block_ms=None)
            total += handled
            claiming = self.monotonic() >= self._next_claim
            if handled == 0 and all(c is None for c in self._pending_cursors) and not claiming:
                break
        if not self.stop_event.is_set():
            self.send_summary_if_due(force=True)
        return total

    def run(self) -> None:
        """The loop until a stop is requested: Redis lost is retried with backoff (logged once when
        lost and once when back), and the own pending entries are read again after it is back."""
        lost_since: float | None = None
        failures = 0
        log.info("notifying receiver=%s format=%s", self.settings.redacted_webhook_url(), self.formatter.name)
        while not self.stop_event.is_set():
            try:
                self.run_once(self.settings.notify_block_ms)
            except (redis.ConnectionError, redis.TimeoutError, redis.ResponseError) as exc:
                self.metrics.redis_errors.inc()
                self.metrics.redis_up.set(0)
                self.health.redis_ok = False
                self._in_flight = []
                if isinstance(exc, redis.ResponseError) and "NOGROUP" in str(exc):
                    log.warning("group or stream gone, creating it again error=%s", exc)
                    self._started = False
                    continue
                if lost_since is None:
                    lost_since = self.monotonic()
                    log.error("redis failing, retrying error=%s", exc)
                self._pending_cursors = [b"0"] * len(self.groups)  # what was in hand is read again
                failures += 1
                self._pause(REDIS_BACKOFF.compute(failures))
                continue
            if lost_since is not None:
                log.info("redis back after_seconds=%.1f", self.monotonic() - lost_since)
                lost_since, failures = None, 0
        log.info("stopping held_for_summary=%d", self.burst.count if self.burst else 0)

    # -- reading ------------------------------------------------------------------------------
    def _read(self, block_ms: int | None) -> list[tuple[OutputGroup, list[Entry]]]:
        count = self.settings.notify_batch_size
        for index, cursor in enumerate(self._pending_cursors):
            if cursor is not None:
                group = self.groups[index]
                entries = group.read_own_pending(cursor, count)
                self._pending_cursors[index] = entries[-1][0] if entries else None
                if entries:
                    return [(group, entries)]
        if self.monotonic() >= self._next_claim:
            found = self._reclaim()
            if found:
                return found
        if self.burst is not None and block_ms is not None:
            due_in = self.burst.started_at + self.settings.notify_summary_interval_seconds - self.monotonic()
            block_ms = max(1, min(block_ms, int(due_in * 1000)))
        if self.settings.redis_cluster and len(self.groups) > 1:
            # Shards live in different slots: one XREADGROUP per shard, in turn.
            group = self.groups[self._next_shard]
            self._next_shard = (self._next_shard + 1) % len(self.groups)
            wait = None if block_ms is None else max(1, block_ms // len(self.groups))
            return read_new([group], count, wait)
        return read_new(self.groups, count, block_ms)

    def _reclaim(self) -> list[tuple[OutputGroup, list[Entry]]]:
        index = self._claim_shard
        group = self.groups[index]
        found = group.reclaim_stale(
            self.settings.notify_claim_idle_ms, self._claim_cursors[index], self.settings.notify_batch_size
        )
        self._claim_cursors[index] = found.cursor
        if found.cursor in (b"0-0", b"0"):
            self._claim_shard = (index + 1) % len(self.groups)
            if self._claim_shard == 0:
                self._next_claim = self.monotonic() + self._claim_interval
        if found.trimmed:  # Redis >= 7 removed them from the group already: nothing to acknowledge
            records = [(self._id(i), self._trimmed_fields(group, self._id(i))) for i in found.trimmed]
            group.dead_letter(records, ack=False)
            self.metrics.dead_lettered.labels("trimmed").inc(len(records))
            log.warning(
                "anomalies trimmed before they were delivered count=%d shard=%d", len(records), group.shard
            )
        # Entries this notifier holds itself (its burst) can come back when it renews late.
        entries = [(i, f) for i, f in found.entries if (group.shard, self._id(i)) not in self._held]
        if entries:
            self.metrics.reclaimed.inc(len(entries))
            log.info("reclaimed stale anomalies count=%d shard=%d", len(entries), group.shard)
            return [(group, entries)]
        return []

    # -- one anomaly --------------------------------------------------------------------------
    def _handle(self, group: OutputGroup, raw_id: bytes | str, fields: Mapping[bytes, bytes]) -> None:
        entry_id = self._id(raw_id)
        if (group.shard, entry_id) in self._held:
            return  # in the burst already (read again after Redis came back)
        if not fields:  # trimmed while pending: its data is gone
            group.dead_letter([(entry_id, self._trimmed_fields(group, entry_id))])
            self.metrics.dead_lettered.labels("trimmed").inc()
            return
        try:
            anomaly = parse_anomaly(
                entry_id,
                fields,
                shard=group.shard,
                output_stream=group.output_stream,
                input_stream=group.input_stream,
            )
        except BadAnomaly as exc:
            log.warning(
                "output entry not delivered stream=%s id=%s reason=%s", group.output_stream, entry_id, exc
            )
            record = dead_letter_fields(
                reason_code="bad_entry",
                reason=str(exc),
                status=None,
                failed_at_ms=self._now_ms(),
                output_id=entry_id,
                shard=group.shard,
                key="",
                original=fields,
            )
            group.dead_letter([(entry_id, record)])
            self.metrics.dead_lettered.labels("bad_entry").inc()
            return
        now = self.monotonic()
        if self.burst is None and self.limiter.allows(now):
            self.limiter.record(now)
            self._deliver_one(group, anomaly, fields)
            return
        self.metrics.rate_limited.inc()
        if self.burst is None:
            self.burst = Burst.starting_with(anomaly, now)
            log.info(
                "rate limit reached, gathering a summary max_per_minute=%d interval_seconds=%g",
                self.settings.notify_max_per_minute,
                self.settings.notify_summary_interval_seconds,
            )
        else:
            self.burst.add(anomaly)
        self._held.add((group.shard, entry_id))
        self._update_held()

    def _deliver_one(self, group: OutputGroup, anomaly: Anomaly, fields: Mapping[bytes, bytes]) -> None:
        verdict = self._deliver(self.formatter.anomaly(anomaly), [Held(group.shard, anomaly.entry_id)])
        if verdict is None:
            return  # stopping: it stays pending, delivered again (same key) after the restart
        if verdict.outcome == "delivered":
            group.ack([anomaly.entry_id])
            self.metrics.delivered.labels("single").inc()
            self._observe_latency([anomaly.published_at_ms])
            log.debug("delivered key=%s", anomaly.key)
            return
        log.warning(
            "anomaly refused, dead-lettered key=%s status=%s reason=%s",
            anomaly.key,
            verdict.status,
            verdict.reason,
        )
        record = dead_letter_fields(
            reason_code="refused",
            reason=verdict.reason,
            status=verdict.status,
            failed_at_ms=self._now_ms(),
            output_id=anomaly.entry_id,
            shard=group.shard,
            key=anomaly.key,
            original=fields,
        )
        group.dead_letter([(anomaly.entry_id, record)])
        self.metrics.dead_lettered.labels("refused").inc()

    # -- a summary ----------------------------------------------------------------------------
    def send_summary_if_due(self, force: bool = False) -> None:
        """Post the burst's summary once its interval is over (or at once with `force`); its
        anomalies are acknowledged only after the summary was delivered (or dead-lettered)."""
        burst = self.burst
        if burst is None:
            return
        if not force and not burst.due(self.monotonic(), self.settings.notify_summary_interval_seconds):
            return
        verdict = self._deliver(self.formatter.summary(burst), burst.members)
        if verdict is None:
            return  # stopping: the burst stays pending in Redis
        by_shard: dict[int, list[str]] = defaultdict(list)
        for member in burst.members:
            by_shard[member.shard].append(member.entry_id)
        if verdict.outcome == "delivered":
            for shard, ids in by_shard.items():
                self.groups[self._index(shard)].ack(ids)
            self.metrics.delivered.labels("summary").inc(burst.count)
            self._observe_latency([int(m.entry_id.split("-", 1)[0]) for m in burst.members])
            log.info("summary delivered count=%d key=%s", burst.count, burst.key)
        else:
            log.warning(
                "summary refused, its anomalies dead-lettered count=%d status=%s reason=%s",
                burst.count,
                verdict.status,
                verdict.reason,
            )
            now_ms = self._now_ms()
            why = f"the summary {burst.key} of {burst.count} anomalies was refused: {verdict.reason}"
            keys = dict(zip(((m.shard, m.entry_id) for m in burst.members), burst.keys, strict=True))
            for shard, ids in by_shard.items():
                records = [
                    (
                        entry_id,
                        dead_letter_fields(
                            reason_code="summary_refused",
                            reason=why,
                            status=verdict.status,
                            failed_at_ms=now_ms,
                            output_id=entry_id,
                            shard=shard,
                            key=keys[(shard, entry_id)],
                        ),
                    )
                    for entry_id in ids
                ]
                self.groups[self._index(shard)].dead_letter(records)
            self.metrics.dead_lettered.labels("summary_refused").inc(burst.count)
        self.burst = None
        self._held.clear()
        self._update_held()

    # -- one message, with its retries --------------------------------------------------------
    def _deliver(self, message: Outgoing, holds: Sequence[Held]) -> Verdict | None:
        """Post `message` until the receiver answers for good: the verdict (delivered or refused),
        or None when a stop came while retrying (nothing acknowledged)."""
        self._in_flight = list(holds)
        self._update_held()
        failures = 0
        try:
            while True:
                started = self.monotonic()
                try:
                    verdict = judge(self.sender.send(message), self.clock())
                except ReceiverUnreachable as exc:
                    verdict = judge_unreachable(exc)
                self.metrics.request_seconds.observe(max(0.0, self.monotonic() - started))
                if verdict.outcome == "delivered":
                    self.metrics.sent.labels(message.kind).inc()
                    if self._receiver_failing:
                        self._receiver_failing = False
                        log.info("receiver back failures=%d", failures)
                    return verdict
                self.metrics.failed.labels(verdict.label).inc()
                if verdict.outcome == "refused":
                    return verdict
                failures += 1
                delay = self.policy.delay(failures, verdict)
                if not self._receiver_failing:
                    self._receiver_failing = True
                    log.warning(
                        "receiver failing, retrying key=%s reason=%s retry_in_seconds=%.2f",
                        message.key,
                        verdict.reason,
                        delay,
                    )
                if self.stop_event.is_set() or self._pause(delay):
                    log.info("stop requested while retrying; left unacknowledged key=%s", message.key)
                    return None
                self.metrics.retried.inc()
        finally:
            self._in_flight = []
            self._update_held()

    def _pause(self, seconds: float) -> bool:
        """Wait `seconds` in slices, keeping the heartbeat and the renewal going; True when a stop
        was requested meanwhile."""
        remaining = seconds
        while True:
            step = min(remaining, PAUSE_SLICE_SECONDS, self._renew_interval)
            if self.wait(step):
                return True
            remaining -= step
            self.health.heartbeat()
            self._renew_if_due()
            if remaining <= 0:
                return self.stop_event.is_set()

    def _renew_if_due(self) -> None:
        if self.monotonic() < self._next_renew:
            return
        self._next_renew = self.monotonic() + self._renew_interval
        by_shard: dict[int, list[str]] = defaultdict(list)
        for member in (*self._in_flight, *(self.burst.members if self.burst else ())):
            by_shard[member.shard].append(member.entry_id)
        for shard, ids in by_shard.items():
            self.groups[self._index(shard)].renew(ids)

    # -- small helpers ------------------------------------------------------------------------
    def _prune_if_due(self) -> None:
        """Remove the consumers of the group that hold nothing and have not read for
        NOTIFY_DEAD_CONSUMER_IDLE_MS (each restarted pod leaves its name behind). A user whose ACL
        does not allow it (an ACL from before this setting) is told once; delivery goes on."""
        idle_ms = self.settings.notify_dead_consumer_idle_ms
        if not idle_ms or self._prune_refused or self.monotonic() < self._next_prune:
            return
        self._next_prune = self.monotonic() + PRUNE_INTERVAL_SECONDS
        for group in self.groups:
            try:
                removed = group.prune_consumers(idle_ms)
            except redis.ResponseError as exc:
                if not refused_by_acl(exc):
                    raise
                self._prune_refused = True
                log.warning(
                    "idle consumers are not removed: the Redis user may not run the pruning script "
                    "(deploy/README.md, Least privilege; or set ANOMALY_NOTIFY_DEAD_CONSUMER_IDLE_MS=0) "
                    "error=%s",
                    exc,
                )
                return
            if removed:
                log.info(
                    "removed idle consumers with nothing pending count=%d shard=%d names=%s",
                    len(removed),
                    group.shard,
                    ",".join(removed[:10]),
                )

    def _trimmed_fields(self, group: OutputGroup, entry_id: str) -> dict[str | bytes, str | bytes]:
        return dead_letter_fields(
            reason_code="trimmed",
            reason="the output entry was trimmed from the stream before it was delivered; its data is lost",
            status=None,
            failed_at_ms=self._now_ms(),
            output_id=entry_id,
            shard=group.shard,
            key="",
        )

    def _observe_latency(self, published_ms: Sequence[int]) -> None:
        now = self.clock()
        for ms in published_ms:
            self.metrics.delivery_latency.observe(max(0.0, now - ms / 1000.0))

    def _update_held(self) -> None:
        # A summary in flight holds the burst's own members: count each anomaly once.
        extra = sum(1 for m in self._in_flight if (m.shard, m.entry_id) not in self._held)
        self.metrics.held.set(len(self._held) + extra)

    def _index(self, shard: int) -> int:
        for index, group in enumerate(self.groups):
            if group.shard == shard:
                return index
        raise KeyError(f"no output group for shard {shard}; groups: {[g.shard for g in self.groups]}")

    def _now_ms(self) -> int:
        return int(self.clock() * 1000)

    @staticmethod
    def _id(raw: bytes | str) -> str:
        return raw.decode() if isinstance(raw, bytes) else raw
