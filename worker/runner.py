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
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import redis
from redis.backoff import ExponentialWithJitterBackoff

from contract.codec import DTYPES, DecodedBatch, Entry, Rejected, decode_batch, default_max_payload_bytes
from detector.artifact import manifest_digest
from detector.errors import AnomalyScorerError
from runtime.http import Health
from runtime.settings import WorkerSettings
from worker.batch import Scored, concatenate, score_batch, select_rows
from worker.commit import DELETED_REASON, ShadowBatch, build_commit, dead_letter_fields
from worker.drift import ScoreDrift
from worker.loaded_model import LoadedModel, ModelLoader, check_shadow_fits
from worker.metrics import DetectionWindow, WorkerMetrics
from worker.scoring import Decisions
from worker.scoring_process import PendingScores, ScoringProcess, ScoringProcessError
from worker.shards import ShardSet
from worker.stream import (
    DEAD_LETTER,
    Commit,
    StreamClient,
    entry_timestamps_ms,
)

log = logging.getLogger(__name__)

PRUNE_INTERVAL_SECONDS = 60.0
SHADOW_FAILURE_LOG_SECONDS = 60.0
# A read that filled this share of the batch means entries arrive faster than single batches
# are handled: read the next one while this one is scored. Below it, the read ahead would
# mostly come back empty (one wasted round trip per small batch at low rates).
PREFETCH_FROM_SHARE = 0.25
KNOWN_DTYPES = frozenset(d.encode() for d in DTYPES)
# After this many scoring-process failures in a row (it died, hung, or would not start), the worker
# scores on its thread instead: slower, but it keeps serving.
SCORING_PROCESS_ATTEMPTS = 3
# Entries delivered before and never committed are handled this many at a time (see run_once).
SUSPECTS_AT_A_TIME = 1

InFlight = Future[Scored] | PendingScores  # a batch's scores being computed elsewhere


class ScoringFailed(AnomalyScorerError):
    """The model could not score any image of a batch: nothing was committed, the entries stay
    pending and are read again (one at a time, so MAX_DELIVERIES ends each)."""


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


def declared_dtype(fields: Mapping[bytes, bytes]) -> str:
    """The entry's dtype for metric labels: a known name, else 'unknown' (keeps the label set bounded)."""
    raw = fields.get(b"dtype", b"uint8")
    return raw.decode() if raw in KNOWN_DTYPES else "unknown"


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
        self.model = model
        self.shadow = shadow
        if shadow is not None:
            check_shadow_fits(model, shadow)
        self.metrics = metrics
        self.health = health or Health()
        self.loader = loader
        self.shadow_loader = shadow_loader
        self.scoring_process = scoring_process  # where backlog batches are scored; closed by close()
        self.clock = clock
        self.monotonic = monotonic
        self.stop_event = threading.Event()
        self.reload_event = threading.Event()
        self.window = DetectionWindow(settings.detection_window_seconds, monotonic)
        self.shadow_window = DetectionWindow(settings.detection_window_seconds, monotonic)
        self.drift = self._new_drift(model)
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
        self._next_reload_check = monotonic() + settings.reload_poll_seconds
        self._ready: deque[Prefetched] = deque()
        self._prefetch_from = max(1, math.ceil(settings.batch_size * PREFETCH_FROM_SHARE))
        self._scoring_thread: ThreadPoolExecutor | None = None
        self._shadow_failures = 0
        self._next_shadow_failure_log = 0.0
        self._output_groups: dict[str, set[str]] = {}  # shard -> groups of its output stream seen
        self._publish_model()
        self.health.model_loaded = True

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
        self._maybe_reload()
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
            scored, decoded = self._scored(compute, model, shadow, decoded)
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
            scored, decoded = self._scored(scoring.result, model, shadow, decoded)
        self._score_next_elsewhere(model, shadow)
        self._commit(stream, model, decoded, scored, handled, started, now_ms, id_range)

    def _scored(
        self,
        compute: Callable[[], Scored],
        model: LoadedModel,
        shadow: LoadedModel | None,
        decoded: DecodedBatch,
    ) -> tuple[Scored, DecodedBatch]:
        """The batch's scores, and the batch without the images its model could not score: those
        raised (when the whole batch raised, each image is scored alone to find which) or got a
        score that is not finite; they go to the dead-letter stream (reason_code score_error).
        When no image of the batch can be scored, the model is at fault, not its input:
        ScoringFailed, nothing is committed and the entries stay pending."""
        try:
            scored = compute()
        except (redis.RedisError, ScoringProcessError):
            raise
        except Exception as exc:  # the model raised on this batch: which of its images?
            scored, failures = self._score_rows_alone(model, shadow, decoded, exc)
        else:
            failures = {}
        finite = np.isfinite(scored.scores)
        if not finite.all():
            if not finite.any() and not failures:
                raise ScoringFailed(
                    f"model {model.scorer.model_version} scored none of the {len(finite)} images of "
                    f"the batch finitely (scores like {float(scored.scores[0])!r}); its entries stay pending"
                )
            kept = np.flatnonzero(finite)
            bad = {
                int(row): f"the model's score is {float(scored.scores[row])!r}, expected a finite number"
                for row in np.flatnonzero(~finite)
            }
            rows_left = [row for row in range(len(decoded.ids)) if row not in failures]
            failures.update({rows_left[row]: reason for row, reason in bad.items()})
            scored = select_rows(scored, kept)
        if failures:  # counted with the other rejects: anomaly_messages_invalid_total{reason="score_error"}
            log.warning(
                "images the model could not score go to the dead-letter stream count=%d first=%s",
                len(failures),
                next(iter(failures.values())),
            )
        return scored, decoded.reject_rows(failures, "score_error")

    def _score_rows_alone(
        self, model: LoadedModel, shadow: LoadedModel | None, decoded: DecodedBatch, error: Exception
    ) -> tuple[Scored, dict[int, str]]:
        """Score each image of a batch whose scoring raised `error` on its own, on this thread."""
        if len(decoded.ids) <= 1:
            raise ScoringFailed(
                f"model {model.scorer.model_version} failed to score the batch: "
                f"{type(error).__name__}: {error}; its entries stay pending"
            ) from error
        every_region = bool(self.settings.scores_stream)
        images = decoded.images
        parts: list[Scored] = []
        failures: dict[int, str] = {}
        for row in range(len(decoded.ids)):
            try:
                parts.append(score_batch(model, shadow, images[row : row + 1], every_region))
            except Exception as exc:
                failures[row] = (
                    f"the model failed to score this image: {type(exc).__name__}: {str(exc)[:300]}"
                )
        if not parts:
            raise ScoringFailed(
                f"model {model.scorer.model_version} failed to score every image of the batch alone "
                f"({len(failures)}): {type(error).__name__}: {error}; its entries stay pending"
            ) from error
        return concatenate(parts), failures

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
        )
        commit.id_range = id_range
        # The batch's metrics are recorded while Redis runs the commit script. A commit that
        # fails (the batch comes back and is scored again) is then counted twice, as a fenced
        # batch always was: the counters count scoring, the output streams what was published.
        pending = stream.send_commit(commit)
        try:
            sent_ms = self._record(decoded, scored.scores, scored.decisions)
        finally:
            result = pending.result()  # whatever happened meanwhile: never leave the answer unread
        self._record_committed(sent_ms, handled, started)
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
            self._record_shadow(scored.decisions, shadow)
        if scored.shadow_error is not None:
            self._shadow_failed(scored.shadow_error)

    def _shadow_failed(self, error: str) -> None:
        self.metrics.shadow_errors.inc()
        self._shadow_failures += 1
        now = self.monotonic()
        if now >= self._next_shadow_failure_log:  # at most one line a minute, with the count
            self._next_shadow_failure_log = now + SHADOW_FAILURE_LOG_SECONDS
            log.error(
                "shadow model failed to score; its results are skipped, serving goes on "
                "shadow_version=%s failed_batches=%d error=%s",
                self.shadow.scorer.model_version if self.shadow is not None else "none",
                self._shadow_failures,
                error,
            )

    def _record_shadow(self, decisions: Decisions, shadow: ShadowBatch) -> None:
        n = len(shadow.scores)
        agreed = int(np.count_nonzero(shadow.decisions.flagged == decisions.flagged))
        self.metrics.shadow_scored.inc(n)
        self.metrics.shadow_flagged.inc(int(np.count_nonzero(shadow.decisions.flagged)))
        ratio = self.shadow_window.add(n, agreed)
        if not math.isnan(ratio):
            self.metrics.shadow_agreement.set(ratio)

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

    def _record(self, decoded: DecodedBatch, scores: np.ndarray, decisions: Decisions) -> np.ndarray:
        """The batch's counts and score metrics; returns when its entries were sent (ms), for
        `_record_committed`."""
        m = self.metrics
        flagged = int(np.count_nonzero(decisions.flagged))
        scored = len(decoded.ids)
        m.scored.inc(scored)
        m.flagged.inc(flagged)
        for rejected in decoded.rejected:
            m.invalid.labels(rejected.code).inc()
            m.messages.labels(declared_dtype(rejected.fields), "dead_letter").inc()
        if scored:
            kinds = set(decoded.dtypes)
            if len(kinds) == 1:  # the usual batch: one dtype, no masks
                (dtype,) = kinds
                m.messages.labels(dtype, "flagged").inc(flagged)
                m.messages.labels(dtype, "normal").inc(scored - flagged)
            else:
                dtypes = np.asarray(decoded.dtypes)
                for dtype in kinds:
                    mask = dtypes == dtype
                    n_flag = int(np.count_nonzero(decisions.flagged[mask]))
                    m.messages.labels(dtype, "flagged").inc(n_flag)
                    m.messages.labels(dtype, "normal").inc(int(mask.sum()) - n_flag)
            m.observe_scores(scores)
            if self.drift is not None:
                m.score_drift.set(self.drift.add(scores))
        rate = self.window.add(scored, flagged)
        if not math.isnan(rate):
            m.detection_rate.set(rate)
        return entry_timestamps_ms(decoded.ids) if scored else np.empty(0)

    def _record_committed(self, sent_ms: np.ndarray, n: int, started: float) -> None:
        """What the commit ends: the batch's duration, the time of the last batch, and each
        entry's latency from XADD to its commit."""
        m = self.metrics
        m.batch_size.observe(n)
        now = self.clock()
        m.batch_duration.observe(self.monotonic() - started)
        m.last_batch.set(now)
        if sent_ms.size:
            m.observe_latencies(np.maximum(0.0, (now * 1000.0 - sent_ms) / 1000.0))

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

    def _maybe_reload(self) -> None:
        if self.loader is None:
            return
        requested = self.reload_event.is_set()
        if not requested:
            if not self.settings.reload_poll_seconds or self.monotonic() < self._next_reload_check:
                return
            self._next_reload_check = self.monotonic() + self.settings.reload_poll_seconds
            if self.settings.artifact is None:
                return
            try:
                changed = manifest_digest(self.settings.artifact) != self.model.manifest_digest
                if self.shadow is not None and self.settings.shadow_artifact is not None:
                    changed |= manifest_digest(self.settings.shadow_artifact) != self.shadow.manifest_digest
            except OSError as exc:
                log.debug("artifact check failed error=%s", exc)
                return
            if not changed:
                return
        self.reload_event.clear()
        self.reload()

    def reload(self) -> bool:
        """Load, verify and swap in a new model (and shadow) between batches; keep both old ones
        when either fails."""
        if self.loader is None:
            return False
        try:
            new = self.loader()
            new_shadow = self.shadow_loader() if self.shadow_loader is not None else None
            if new_shadow is not None:
                check_shadow_fits(new, new_shadow)
        except (AnomalyScorerError, OSError, ValueError) as exc:
            self.metrics.reloads.labels("failure").inc()
            log.error(
                "reload refused, keeping model_version=%s error=%s",
                self.model.scorer.model_version,
                exc,
            )
            return False
        old = self.model.scorer.model_version
        if new.manifest_digest != self.model.manifest_digest:
            self.drift = self._new_drift(new)  # a new baseline: start the window afresh
            self.metrics.score_drift.set(math.nan)
        self.model = new
        if new_shadow is not None:
            if self.shadow is None or new_shadow.manifest_digest != self.shadow.manifest_digest:
                log.info("shadow model loaded model_version=%s", new_shadow.scorer.model_version)
            self.shadow = new_shadow
        self._publish_model()
        self.metrics.reloads.labels("success").inc()
        log.info(
            "reloaded old_model_version=%s model_version=%s threshold=%.6g",
            old,
            new.scorer.model_version,
            new.rule.threshold,
        )
        return True

    def _publish_model(self) -> None:
        rule = self.model.rule
        self.metrics.set_model(
            self.model.scorer.model_version,
            rule.policy,
            rule.threshold,
            rule.expected_flag_rate,
            engine=self.model.scorer.engine,
            score_buckets=self.model.score_buckets,
        )
        if self.shadow is not None:
            shadow_rule = self.shadow.rule
            self.metrics.set_shadow_model(
                self.shadow.scorer.model_version,
                shadow_rule.policy,
                shadow_rule.threshold,
                self.shadow.scorer.engine,
            )

    def _new_drift(self, model: LoadedModel) -> ScoreDrift | None:
        if not self.settings.drift_window_scores:
            return None
        return ScoreDrift(model.rule.sorted_errors, self.settings.drift_window_scores)

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
