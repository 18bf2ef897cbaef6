"""The loop: read a batch, decode, score, decide, commit; recover, reclaim, reload, stop.

`Runner.run_once()` is one iteration and `Runner.drain()` a burst (handle what is there, then
return), so the real loop is tested synchronously. `run()` adds the fault handling around it.

With a backlog (a read that filled a quarter of the batch or more), batches are scored elsewhere:
batch k while this thread reads and decodes batch k+1, then k+1 while this thread commits and
records k (ANOMALY_PREFETCH). Elsewhere is a child process for the numpy engine
(worker.scoring_process, ANOMALY_SCORING_PROCESS), else a second thread (TensorFlow releases the
GIL for its whole call; numpy only inside each operation, and this thread holds it for most of a
batch). The forward pass thus overlaps both Redis round trips. The batch read ahead and its
scores are only held in memory; until it is committed it stays pending in Redis like any other.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import redis
from redis.backoff import ExponentialWithJitterBackoff

from contract.codec import DecodedBatch, Entry, Rejected, decode_batch, default_max_payload_bytes
from runtime.groups import PRUNE_INTERVAL_SECONDS
from runtime.http import Health
from runtime.settings import WorkerSettings
from worker.batch import Scored, score_batch
from worker.commit import DELETED_REASON, build_commit, dead_letter_fields
from worker.isolation import ScoringFailed, score_isolating
from worker.loaded_model import LoadedModel, ModelLoader
from worker.metrics import WorkerMetrics
from worker.model_slot import ModelSlot
from worker.recorder import BatchRecorder
from worker.scoring_process import PendingScores, ScoringProcess, ScoringProcessError
from worker.shards import ShardSet
from worker.stream import (
    DEAD_LETTER,
    Commit,
    StreamClient,
)

log = logging.getLogger(__name__)

# A read that filled this share of the batch means entries arrive faster than single batches
# are handled: read the next one while this one is scored. Below it, the read ahead would
# mostly come back empty (one wasted round trip per small batch at low rates).
PREFETCH_FROM_SHARE = 0.25
# After this many scoring-process failures in a row (it died, hung, or would not start), the worker
# scores on its thread instead: slower, but it keeps serving.
SCORING_PROCESS_ATTEMPTS = 3
# Entries delivered before and never committed are handled this many at a time (see run_once).
SUSPECTS_AT_A_TIME = 1

InFlight = Future[Scored] | PendingScores  # a batch's scores being computed elsewhere


@dataclass(frozen=True)
class Prefetched:
    """New entries of one shard, read (and decoded with `model`, if not None; maybe already being
    scored) before their turn: while the previous batch was scored, or by a read that served
    several shards."""

    stream: StreamClient
    entries: list[Entry]
    decoded: DecodedBatch | None = None
    model: LoadedModel | None = None
    scoring: InFlight | None = None  # its scores, being computed for `decoded`


class Runner:
    """One worker: the loop and its state. Dependencies are passed in."""

    def __init__(
        self,
        settings: WorkerSettings,
        stream: StreamClient | ShardSet,
        model: LoadedModel,
        metrics: WorkerMetrics,
        health: Health | None = None,
        loader: ModelLoader | None = None,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
        shadow: LoadedModel | None = None,
        shadow_loader: ModelLoader | None = None,
        scoring_process: ScoringProcess | None = None,
    ) -> None:
        self.settings = settings
        self.shards = stream if isinstance(stream, ShardSet) else ShardSet([stream])
        self.stream = self.shards.streams[0]  # the first (with one shard, the only) shard
        self.metrics = metrics
        self.health = health or Health()
        self.models = ModelSlot(
            model,
            metrics,
            shadow=shadow,
            loader=loader,
            shadow_loader=shadow_loader,
            artifact=settings.artifact,
            shadow_artifact=settings.shadow_artifact,
            poll_seconds=settings.reload_poll_seconds,
            drift_window_scores=settings.drift_window_scores,
            monotonic=monotonic,
        )
        self.reload_event = self.models.reload_event
        self.recorder = BatchRecorder(metrics, settings.detection_window_seconds, clock, monotonic)
        self.scoring_process = scoring_process  # where backlog batches are scored; closed by close()
        self.clock = clock
        self.monotonic = monotonic
        self.stop_event = threading.Event()
        self.max_payload = settings.max_payload_bytes or default_max_payload_bytes(model.scorer.input_dim)
        self._started = False
        # Per shard: where the read of our own pending entries resumes (None: done), and the
        # XAUTOCLAIM cursor; reclaim visits the shards in turn, one call per iteration.
        self._pending_cursors: list[bytes | str | None] = [b"0"] * len(self.shards)
        self._claim_cursors: list[bytes | str] = [b"0-0"] * len(self.shards)
        self._claim_shard = 0
        self._claim_interval = max(0.05, settings.claim_idle_ms / 2000.0)
        self._next_claim = monotonic() + self._claim_interval
        self._next_sample = 0.0
        self._next_prune = 0.0
        self._ready: deque[Prefetched] = deque()
        self._prefetch_from = max(1, math.ceil(settings.batch_size * PREFETCH_FROM_SHARE))
        self._scoring_thread: ThreadPoolExecutor | None = None
        self._output_groups: dict[str, set[str]] = {}  # shard -> groups of its output stream seen
        self.health.model_loaded = True

    @property
    def model(self) -> LoadedModel:
        """The served model (swapped between batches by a reload)."""
        return self.models.model

    @property
    def shadow(self) -> LoadedModel | None:
        """The shadow (candidate) model, if one runs."""
        return self.models.shadow

    def reload(self) -> bool:
        """Load, verify and swap in a new model (and shadow); keep both old ones when either fails."""
        return self.models.reload()

    # -- one iteration ---------------------------------------------------------------------
    def start(self) -> None:
        """Create the groups if missing; the next reads recover this consumer's own pending."""
        for shard in self.shards.streams:
            if shard.ensure_group(self.settings.start_id):
                log.info(
                    "group created stream=%s group=%s start_id=%s",
                    shard.input_stream,
                    self.settings.group,
                    self.settings.start_id,
                )
        self._pending_cursors = [b"0"] * len(self.shards)
        self._started = True
        # Redis answered: ready now, not after the first blocking read (up to block_ms later).
        self.health.redis_ok = True
        self.metrics.redis_up.set(1)

    def run_once(self, block_ms: int | None = None) -> int:
        """One iteration: own pending first, then stale entries of others, then new ones."""
        if not self._started:
            self.start()
        self.health.heartbeat()
        self.models.maybe_reload()
        self._maybe_sample_group()
        entries: list[Entry] = []
        stream = self.stream
        for index, cursor in enumerate(self._pending_cursors):
            if cursor is not None and not entries:
                stream = self.shards.streams[index]
                # One at a time: these were delivered before and never committed (this worker
                # crashed, lost Redis, or failed to score them). Each read counts a delivery of
                # that entry alone, so an entry that kills the worker reaches MAX_DELIVERIES by
                # itself, and its neighbours are scored.
                entries = stream.read_own_pending(cursor, SUSPECTS_AT_A_TIME)
                self._pending_cursors[index] = entries[-1][0] if entries else None
        suspects = bool(entries)
        decoded: DecodedBatch | None = None
        scoring: InFlight | None = None
        if not entries and self._ready:
            ready = self._ready.popleft()
            stream, entries = ready.stream, ready.entries
            if ready.model is self.model:  # else reloaded since (or not decoded): decode for this model
                decoded, scoring = ready.decoded, ready.scoring
        if not entries and self.monotonic() >= self._next_claim:
            stream, entries = self._reclaim()
            suspects = bool(entries)
        if not entries:
            batches = self.shards.read_new(self.settings.batch_size, block_ms)
            if batches:
                (stream, entries), rest = batches[0], batches[1:]
                self._ready.extend(Prefetched(shard, more) for shard, more in rest)
        if entries:
            self.handle_batch(
                entries, check_deliveries=suspects, decoded=decoded, stream=stream, scoring=scoring
            )
        self.health.redis_ok = True
        self.metrics.redis_up.set(1)
        return len(entries)

    def drain(self) -> int:
        """Burst mode: handle everything available now (no blocking), then return the count."""
        total = 0
        self._next_claim = self.monotonic()
        while True:
            try:
                handled = self.run_once(block_ms=None)
            except ScoringProcessError as exc:
                self._scoring_failed(exc)  # the batches in hand come back from own pending
                continue
            except ScoringFailed as exc:  # read again one at a time: MAX_DELIVERIES ends each
                self.metrics.unscored_batches.inc()
                log.error("batch not scored error=%s", exc)
                self._forget_in_hand()
                continue
            reclaiming = self.monotonic() >= self._next_claim  # a claim cycle not finished yet
            if (
                handled == 0
                and all(c is None for c in self._pending_cursors)
                and not self._ready
                and not reclaiming
            ):
                return total
            total += handled

    def finish_in_hand(self) -> int:
        """Handle the batches read ahead, if any (at stop: they were delivered to us, so finish them)."""
        handled = 0
        while self._ready:
            handled += self.run_once(block_ms=None)
        return handled

    def close(self) -> None:
        """Stop the scoring thread and the scoring process."""
        if self._scoring_thread is not None:
            self._scoring_thread.shutdown(wait=True)
            self._scoring_thread = None
        if self.scoring_process is not None:
            self.scoring_process.close()

    def _reclaim(self) -> tuple[StreamClient, list[Entry]]:
        index = self._claim_shard
        stream = self.shards.streams[index]
        # One at a time, like own pending: a stale entry may be what killed its last owner.
        found = stream.reclaim_stale(
            self.settings.claim_idle_ms, self._claim_cursors[index], SUSPECTS_AT_A_TIME
        )
        self._claim_cursors[index] = found.cursor
        if _is_zero_id(found.cursor):  # this shard done: the next one, or rest after the last
            self._claim_shard = (index + 1) % len(self.shards)
            if self._claim_shard == 0:
                self._next_claim = self.monotonic() + self._claim_interval
        if found.trimmed:
            self._dead_letter_trimmed(stream, found.trimmed)
        if found.unnamed_trimmed:
            # Redis 6.2: they are ours now, pending; our own pending read names them, and
            # _split_poison dead-letters and acks each (else they would come back at every claim).
            self._pending_cursors[index] = b"0"
        if found.entries:
            self.metrics.reclaimed.inc(len(found.entries))
            log.info("reclaimed stale entries count=%d shard=%d", len(found.entries), stream.shard)
        return stream, found.entries

    def _dead_letter_trimmed(self, stream: StreamClient, trimmed: list[bytes]) -> None:
        """Dead-letter the ids of entries trimmed while pending (their data is lost; the loss is
        visible). Redis >= 7 already dropped them from the group: published without an ack."""
        log.warning("reclaimed entries were trimmed from the stream count=%d", len(trimmed))
        commit = Commit()
        now_ms = int(self.clock() * 1000)
        version = self.model.scorer.model_version
        for entry_id in trimmed:
            fields = dead_letter_fields(Rejected(entry_id, {}, "deleted", DELETED_REASON), now_ms, version)
            commit.records.append((b"", [(DEAD_LETTER, fields)]))
            self.metrics.invalid.labels("deleted").inc()
            self.metrics.messages.labels("unknown", "dead_letter").inc()
        stream.commit_batch(commit)

    def handle_batch(
        self,
        entries: Sequence[Entry],
        check_deliveries: bool = False,
        decoded: DecodedBatch | None = None,
        stream: StreamClient | None = None,
        scoring: InFlight | None = None,
    ) -> None:
        """Decode, score, decide and commit one batch of one shard (default: the first) atomically,
        prefetching the next on a backlog. `scoring`: this batch's scores, already being computed
        (for `decoded`) on the scoring thread."""
        started = self.monotonic()
        now_ms = int(self.clock() * 1000)
        model = self.model
        stream = stream or self.stream
        # A batch comes from one read (new, own pending or reclaimed): its ids ascend.
        id_range = (entries[0][0], entries[-1][0]) if entries else None
        poison: list[Rejected] = []
        if check_deliveries:
            entries, poison = self._split_poison(stream, entries)
        if decoded is None:
            scoring = None  # scores of another decoding, if any, are not this batch's
            decoded = decode_batch(entries, model.scorer.input_dim, self.max_payload, model.uint8_scale)
        decoded.rejected.extend(poison)
        handled = len(entries) + len(poison)
        backlog = len(entries) >= self._prefetch_from and not check_deliveries
        shadow = self.shadow
        if not (backlog and self.settings.prefetch and not self.stop_event.is_set()):
            every_region = bool(self.settings.scores_stream)
            here = decoded
            compute = (
                scoring.result
                if scoring is not None
                else lambda: score_batch(model, shadow, here.images, every_region)
            )
            scored, decoded = score_isolating(compute, model, shadow, decoded, every_region)
            self._commit(stream, model, decoded, scored, handled, started, now_ms, id_range)
            return
        # A backlog: this batch is scored elsewhere (the scoring process or thread) while this one
        # reads and decodes the next; then the next is scored there while this one commits and
        # records this batch.
        # This batch is committed (or has failed) when handle_batch returns; the next one's scores
        # are only held in memory, like its entries, until its turn.
        if scoring is None:
            scoring = self._score_elsewhere(model, shadow, decoded)
        try:
            self._prefetch(model)
        finally:
            # Its error, if any, is this batch's; never leave it running.
            every_region = bool(self.settings.scores_stream)
            scored, decoded = score_isolating(scoring.result, model, shadow, decoded, every_region)
        self._score_next_elsewhere(model, shadow)
        self._commit(stream, model, decoded, scored, handled, started, now_ms, id_range)

    def _score_elsewhere(
        self, model: LoadedModel, shadow: LoadedModel | None, decoded: DecodedBatch
    ) -> InFlight:
        every_region = bool(self.settings.scores_stream)
        if self.scoring_process is not None and self.scoring_process.accepts(model, shadow):
            return self.scoring_process.submit(model, shadow, decoded.pixels, decoded.scale, every_region)
        if self._scoring_thread is None:
            self._scoring_thread = ThreadPoolExecutor(1, thread_name_prefix="scoring")
        return self._scoring_thread.submit(score_batch, model, shadow, decoded.images, every_region)

    def _score_next_elsewhere(self, model: LoadedModel, shadow: LoadedModel | None) -> None:
        """Start scoring the batch read ahead (decoded for this model) while this one commits."""
        if not self._ready or self.stop_event.is_set():
            return
        ready = self._ready[0]
        if ready.model is model and ready.decoded is not None and ready.scoring is None:
            try:
                scoring = self._score_elsewhere(model, shadow, ready.decoded)
            except ScoringProcessError as exc:
                self.metrics.scoring_process_failures.inc()
                # This batch is scored: commit it. The next one is scored in its turn (and fails
                # there, in the loop's hands, if the process still cannot take it).
                log.warning("scoring process could not take the next batch error=%s", exc)
                return
            self._ready[0] = Prefetched(ready.stream, ready.entries, ready.decoded, model, scoring)

    def _commit(
        self,
        stream: StreamClient,
        model: LoadedModel,
        decoded: DecodedBatch,
        scored: Scored,
        handled: int,
        started: float,
        now_ms: int,
        id_range: tuple[bytes, bytes] | None = None,
    ) -> None:
        """Publish, dead-letter and acknowledge the batch in one script, then record its metrics."""
        shadow = scored.shadow
        commit = build_commit(
            decoded,
            scored.scores,
            scored.decisions,
            model_version=model.scorer.model_version,
            threshold=model.rule.threshold,
            now_ms=now_ms,
            with_scores_stream=bool(self.settings.scores_stream),
            shadow=shadow if self.settings.shadow_scores_stream else None,
            regions=scored.regions,
            components=scored.components,
        )
        commit.id_range = id_range
        # The batch's metrics are recorded while Redis runs the commit script. A commit that
        # fails (the batch comes back and is scored again) is then counted twice, as a fenced
        # batch always was: the counters count scoring, the output streams what was published.
        pending = stream.send_commit(commit)
        try:
            sent_ms = self.recorder.scored(decoded, scored.scores, scored.decisions, self.models.drift)
        finally:
            result = pending.result()  # whatever happened meanwhile: never leave the answer unread
        self.recorder.committed(sent_ms, handled, started)
        if result.fenced:
            # Another consumer owns them now (it reclaimed them while we were slow): it publishes.
            self.metrics.fenced.inc(result.fenced)
            log.info("entries fenced count=%d shard=%d", result.fenced, stream.shard)
        if result.replicas is not None and result.replicas < self.settings.wait_replicas:
            self.metrics.unreplicated.inc()
            log.warning(
                "commit not confirmed by enough replicas replicas=%d wanted=%d timeout_ms=%d",
                result.replicas,
                self.settings.wait_replicas,
                self.settings.wait_timeout_ms,
            )
        if shadow is not None:
            self.recorder.shadow(scored.decisions, shadow)
        if scored.shadow_error is not None:
            version = self.shadow.scorer.model_version if self.shadow is not None else "none"
            self.recorder.shadow_failed(scored.shadow_error, version)

    def _prefetch(self, model: LoadedModel) -> None:
        if not self._ready:
            batches = self.shards.read_new(self.settings.batch_size, None)
            self._ready.extend(Prefetched(shard, entries) for shard, entries in batches)
        if self._ready and self._ready[0].model is not model:
            ready = self._ready[0]
            decoded = decode_batch(ready.entries, model.scorer.input_dim, self.max_payload, model.uint8_scale)
            self._ready[0] = Prefetched(ready.stream, ready.entries, decoded, model)

    def _split_poison(
        self, stream: StreamClient, entries: Sequence[Entry]
    ) -> tuple[list[Entry], list[Rejected]]:
        counts = stream.delivery_counts([e[0] for e in entries])
        limit = self.settings.max_deliveries
        keep: list[Entry] = []
        poison: list[Rejected] = []
        for entry_id, fields in entries:
            delivered = counts.get(entry_id, 1)
            if delivered > limit:
                poison.append(
                    Rejected(
                        entry_id,
                        fields,
                        "max_deliveries",
                        f"delivered {delivered} times without being committed, more than the limit "
                        f"of {limit} (ANOMALY_MAX_DELIVERIES); a worker may crash on it",
                    )
                )
            elif not fields:  # Redis 6.2 reports an entry trimmed while pending as a nil entry
                poison.append(Rejected(entry_id, fields, "deleted", DELETED_REASON))
            else:
                keep.append((entry_id, fields))
        return keep, poison

    # -- periodic work ---------------------------------------------------------------------
    def _maybe_sample_group(self) -> None:
        now = self.monotonic()
        if now < self._next_sample:
            return
        self._next_sample = now + self.settings.lag_sample_seconds
        prune = bool(self.settings.dead_consumer_idle_ms) and now >= self._next_prune
        if prune:
            self._next_prune = now + PRUNE_INTERVAL_SECONDS
        for stream in self.shards.streams:
            state = stream.group_state()
            shard = str(stream.shard)
            self.metrics.group_pending.labels(shard).set(state.pending)
            self.metrics.group_lag.labels(shard).set(math.nan if state.lag is None else state.lag)
            self._sample_output_readers(stream)
            if prune and (removed := stream.prune_consumers(self.settings.dead_consumer_idle_ms)):
                log.info(
                    "removed idle consumers with nothing pending count=%d shard=%s names=%s",
                    len(removed),
                    shard,
                    ",".join(removed[:10]),
                )

    def _sample_output_readers(self, stream: StreamClient) -> None:
        """anomaly_output_trimmed_unread of each consumer group of the shard's output stream; the
        label sets of groups that went away are removed."""
        shard = str(stream.shard)
        trimmed = stream.output_trimmed_unread()
        for group in self._output_groups.get(shard, set()) - trimmed.keys():
            self.metrics.output_trimmed_unread.remove(shard, group)
        for group, count in trimmed.items():
            self.metrics.output_trimmed_unread.labels(shard, group).set(count)
        self._output_groups[shard] = set(trimmed)

    # -- the loop --------------------------------------------------------------------------
    def request_stop(self) -> None:
        """Finish the batch in hand, commit it, then leave the loop."""
        self.health.stopping = True
        self.stop_event.set()

    def run(self) -> None:
        """Loop until stopped; Redis faults are retried with capped, jittered backoff."""
        backoff = ExponentialWithJitterBackoff(cap=10.0, base=0.1)
        failures = 0
        redis_state: bool | None = None
        while not self.stop_event.is_set():
            try:
                self.run_once(self.settings.block_ms)
            except (redis.ConnectionError, redis.TimeoutError) as exc:
                failures += 1
                self._redis_failed()
                if redis_state is not False:
                    what = "lost" if redis_state else "unreachable"
                    log.warning("redis %s error=%s; retrying with backoff", what, exc)
                redis_state = False
                self.stop_event.wait(backoff.compute(failures))
                continue
            except redis.ResponseError as exc:
                failures += 1
                self._redis_failed()
                if "NOGROUP" in str(exc):
                    log.warning("consumer group missing (stream deleted or Redis data lost); recreating")
                    self._started = False
                    continue
                log.error("redis refused a command error=%s; retrying with backoff", exc)
                redis_state = False
                self.stop_event.wait(backoff.compute(failures))
                continue
            except ScoringProcessError as exc:
                self._scoring_failed(exc)
                continue
            except ScoringFailed as exc:
                failures += 1
                self.metrics.unscored_batches.inc()
                log.error("batch not scored error=%s; retrying with backoff", exc)
                self._forget_in_hand()
                self.stop_event.wait(backoff.compute(failures))
                continue
            if redis_state is not True:
                log.info(
                    "redis %s url=%s",
                    "back" if redis_state is False else "connected",
                    self.settings.redacted_redis_url(),
                )
            redis_state = True
            failures = 0
        try:
            if handled := self.finish_in_hand():
                log.info("finished the prefetched batch before stopping count=%d", handled)
        except (redis.RedisError, ScoringProcessError) as exc:
            log.warning("prefetched batch left pending (another worker will reclaim it) error=%s", exc)
        log.info("stopping consumer=%s", self.settings.consumer)

    def _scoring_failed(self, error: ScoringProcessError) -> None:
        """The batches in hand were not committed: read them again; after SCORING_PROCESS_ATTEMPTS
        failures in a row, score on the thread from now on."""
        self.metrics.scoring_process_failures.inc()
        self._forget_in_hand()
        process = self.scoring_process
        if process is not None and process.failures >= SCORING_PROCESS_ATTEMPTS:
            process.close()
            self.scoring_process = None
            log.error(
                "scoring process failed %d times in a row, scoring on a thread from now on error=%s",
                process.failures,
                error,
            )
        else:
            log.error("scoring process failed, starting a new one error=%s", error)

    def _redis_failed(self) -> None:
        self.metrics.redis_errors.inc()
        self.metrics.redis_up.set(0)
        self.health.redis_ok = False
        self._forget_in_hand()

    def _forget_in_hand(self) -> None:
        self._started = False  # re-read own pending (after reconnecting): outcomes are unknown
        self._ready.clear()  # still pending in Redis: the own-pending reads bring them back


def _is_zero_id(value: bytes | str) -> bool:
    text = value.decode() if isinstance(value, bytes) else value
    return text in ("0-0", "0")
