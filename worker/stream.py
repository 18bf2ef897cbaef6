"""The consumer group: read, reclaim, commit (publish + ack atomically), inspect.

Entries are (id, fields) with bytes keys and values: the client is created with
decode_responses=False and this module is the one place that speaks Redis Streams.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import redis
from redis.backoff import ExponentialWithJitterBackoff

from contract.codec import Entry
from runtime.groups import ConsumerPruner

if TYPE_CHECKING:
    from runtime.settings import WorkerSettings

log = logging.getLogger(__name__)

# Up to this many ids the commit script reads each one's owner with its own XPENDING call; above,
# with one XPENDING over the batch's id range (the same number is in COMMIT_SCRIPT).
FENCE_PER_ID_UP_TO = 16

# While a shard's slot is half migrated (MIGRATING on one node, IMPORTING on another), the commit
# script, which names all the shard's streams, is refused with TRYAGAIN whenever they are not all
# on the node that answers (some moved, some not, or one not created yet). Nothing ran, so the
# commit is retried, with backoff, for this long before the batch is given up (left pending).
SLOT_MIGRATION_RETRY_SECONDS = 10.0

# The target streams a commit can write to. KEYS[1] is the input stream; the configured targets
# follow in this order (the optional ones only when set), and commit_batch maps each to its key.
OUTPUT, DEAD_LETTER, SCORES, SHADOW_SCORES = 2, 3, 4, 5

# Fencing: an entry is acked, and its results published, only if it is pending to this consumer
# (ARGV[2]) when the script runs. Another consumer that reclaimed it from us while we were slow (a
# paused process, a lost connection), or a group that lost our delivery in a failover, owns it now:
# our copy is fenced (counted, nothing written or acked) and the owner publishes. That holds for
# plain ids (scored normal, nothing to publish) too: a stale worker's ack would otherwise take an
# entry off the pending list while its owner flagged it, and the owner's anomaly would be fenced.
# Ownership is read with XPENDING filtered by consumer: one call per id for a few ids, else one
# range call over the batch's ids (ARGV[4], ARGV[5]; pages of 1000).
# One script call is atomic, so a crash never acks an unpublished result nor publishes an
# unacked one. Scripts are not rolled back on error, so every key's type is checked before
# the first write: a command that could fail midway fails here, with nothing done.
# Owned plain ids are acked in chunks (unpack has a stack limit). A record with an empty id is
# published without an ack: XAUTOCLAIM on Redis >= 7 already removed the trimmed entries it
# reports from the group, and only the one consumer that claimed them sees their ids.
COMMIT_SCRIPT = """
for _, key in ipairs(KEYS) do
  local t = redis.call('TYPE', key)['ok']
  if t ~= 'stream' and t ~= 'none' then
    return redis.error_reply(
      'WRONGTYPE key ' .. key .. ' is a ' .. t .. ', expected a stream; nothing was committed')
  end
end
local group, consumer = ARGV[1], ARGV[2]
local nchecked = tonumber(ARGV[3])
local owned = {}
local function owns(id)
  if nchecked <= 16 then
    return #redis.call('XPENDING', KEYS[1], group, id, id, 1, consumer) == 1
  end
  return owned[id] == true
end
if nchecked > 16 then
  local from = ARGV[4]
  while true do
    local page = redis.call('XPENDING', KEYS[1], group, from, ARGV[5], 1000, consumer)
    for _, row in ipairs(page) do owned[row[1]] = true end
    if #page < 1000 then break end
    from = '(' .. page[#page][1]
  end
end
local ntargets = tonumber(ARGV[6])
local maxlen = {0}
for t = 1, ntargets do maxlen[t + 1] = tonumber(ARGV[6 + t]) end
local nplain = tonumber(ARGV[7 + ntargets])
local i = 8 + ntargets
local acked, published, fenced = 0, 0, 0
local last = i + nplain - 1
local mine = {}
for p = i, last do
  if owns(ARGV[p]) then mine[#mine + 1] = ARGV[p] else fenced = fenced + 1 end
end
i = last + 1
for first = 1, #mine, 1000 do
  acked = acked + redis.call('XACK', KEYS[1], group, unpack(mine, first, math.min(first + 999, #mine)))
end
while i <= #ARGV do
  local id = ARGV[i]
  local nadds = tonumber(ARGV[i + 1])
  i = i + 2
  local ok = 1
  if id ~= '' then
    if owns(id) then
      acked = acked + redis.call('XACK', KEYS[1], group, id)
    else
      ok = 0
      fenced = fenced + 1
    end
  end
  for _ = 1, nadds do
    local k = tonumber(ARGV[i])
    local nf = tonumber(ARGV[i + 1])
    i = i + 2
    if ok == 1 then
      local args = {KEYS[k]}
      if maxlen[k] > 0 then
        args[#args + 1] = 'MAXLEN'
        args[#args + 1] = '~'
        args[#args + 1] = maxlen[k]
      end
      args[#args + 1] = '*'
      for f = i, i + nf - 1 do args[#args + 1] = ARGV[f] end
      redis.call('XADD', unpack(args))
      published = published + 1
    end
    i = i + nf
  end
end
return {acked, published, fenced}
"""


class SlotMigrating(redis.exceptions.ResponseError):
    """A commit did not run because the shard's hash slot is being migrated (TRYAGAIN)."""


@dataclass
class Commit:
    """What one batch writes: ids to ack only, and ids whose ack publishes entries."""

    plain_ids: list[bytes] = field(default_factory=list)
    # (entry id, [(target OUTPUT|DEAD_LETTER|SCORES|SHADOW_SCORES, flat [k1, v1, k2, v2, ...])])
    records: list[tuple[bytes, list[tuple[int, list[bytes | str]]]]] = field(default_factory=list)
    # The lowest and highest id of the batch, when the caller knows them (one read returns its
    # entries in id order); else commit_batch finds them (about 1.4 us per id in Python).
    id_range: tuple[bytes, bytes] | None = None

    def __len__(self) -> int:
        return len(self.plain_ids) + len(self.records)


@dataclass(frozen=True)
class CommitResult:
    """Counts returned by the commit script."""

    acked: int
    published: int
    fenced: int  # entries not pending to this consumer: another one owns (or already acked) them
    replicas: int | None = None  # replicas WAIT confirmed (None: WAIT_REPLICAS is off)


def _commit_result(counts: Any, replicas: int | None) -> CommitResult:
    """The commit script's answer (acked, published, fenced) as a CommitResult."""
    acked, published, fenced = counts
    return CommitResult(int(acked), int(published), int(fenced), replicas)


class PendingCommit:
    """A commit script call on its way: `result()` waits for Redis's answer (call it once).

    Sent on a connection of its own, taken from the client's pool until the answer is read, so
    the caller can do other work meanwhile (the runner records the batch's metrics while Redis
    runs the script). If the connection fails before the answer, the call is made again through
    the client, with its retries: the commit script is safe to repeat, as those retries already
    assume (an entry the first call acked is no longer pending to us, so the second fences it and
    publishes nothing)."""

    def __init__(self, answer: Callable[[], Any], again: Callable[[], Any]) -> None:
        self._answer = answer
        self._again = again

    @classmethod
    def answered(cls, result: CommitResult) -> PendingCommit:
        """A commit already made (no split: a cluster, WAIT_REPLICAS, or nothing to commit)."""
        return cls(lambda: result, lambda: result)

    def result(self) -> CommitResult:
        """The script's counts, once Redis has answered."""
        try:
            answer = self._answer()
        except redis.exceptions.NoScriptError:  # the server lost its scripts: nothing ran
            answer = self._again()
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            log.info("commit connection failed before the answer, committing again error=%s", exc)
            answer = self._again()
        if isinstance(answer, CommitResult):
            return answer
        return _commit_result(answer, None)


@dataclass(frozen=True)
class Reclaimed:
    """What one XAUTOCLAIM call returned: the next cursor, the entries claimed, and the entries
    trimmed from the stream while pending. Redis >= 7 names those (`trimmed`) and has removed them
    from the group; 6.2 answers a nil without the id (`unnamed_trimmed` counts them) and keeps them
    pending, now to us: reading our own pending names them."""

    cursor: bytes | str
    entries: list[Entry]
    trimmed: list[bytes]
    unnamed_trimmed: int = 0


@dataclass(frozen=True)
class GroupState:
    """Sampled consumer-group figures; lag is None on Redis < 7."""

    pending: int
    lag: int | None


class StreamClient:
    """One worker's view of the input stream's consumer group."""

    def __init__(
        self,
        client: redis.Redis,
        *,
        input_stream: str,
        output_stream: str,
        dead_letter_stream: str,
        scores_stream: str,
        group: str,
        consumer: str,
        output_maxlen: int,
        dead_letter_maxlen: int,
        scores_maxlen: int,
        shadow_scores_stream: str = "",
        shadow_scores_maxlen: int = 0,
        shard: int = 0,
        wait_replicas: int = 0,
        wait_timeout_ms: int = 100,
    ) -> None:
        self.redis: Any = client  # redis-py's return types are unions; this module checks shapes
        self.shard = shard
        self.wait_replicas = wait_replicas
        self.wait_timeout_ms = wait_timeout_ms
        self.input_stream = input_stream
        self.output_stream = output_stream
        self.group = group
        self.consumer = consumer
        targets = {
            OUTPUT: (output_stream, output_maxlen),
            DEAD_LETTER: (dead_letter_stream, dead_letter_maxlen),
            SCORES: (scores_stream, scores_maxlen),
            SHADOW_SCORES: (shadow_scores_stream, shadow_scores_maxlen),
        }
        configured = [(target, name, maxlen) for target, (name, maxlen) in targets.items() if name]
        self.keys = [input_stream, *(name for _, name, _ in configured)]
        self.maxlens = [maxlen for _, _, maxlen in configured]
        self._key_of = {target: index for index, (target, _, _) in enumerate(configured, start=2)}
        self._commit = client.register_script(COMMIT_SCRIPT)
        self._pruner = ConsumerPruner(client)

    @classmethod
    def from_settings(cls, client: redis.Redis, settings: WorkerSettings, shard: int = 0) -> StreamClient:
        """The stream client of `shard` for a worker with these settings."""
        names = settings.for_shard(shard)
        return cls(
            client,
            input_stream=names.input_stream,
            output_stream=names.output_stream,
            dead_letter_stream=names.dead_letter_stream,
            scores_stream=names.scores_stream,
            group=settings.group,
            consumer=settings.consumer,
            output_maxlen=settings.output_maxlen,
            dead_letter_maxlen=settings.dead_letter_maxlen,
            scores_maxlen=settings.scores_maxlen,
            shadow_scores_stream=names.shadow_scores_stream,
            shadow_scores_maxlen=settings.shadow_scores_maxlen,
            shard=shard,
            wait_replicas=settings.wait_replicas,
            wait_timeout_ms=settings.wait_timeout_ms,
        )

    def ensure_group(self, start_id: str) -> bool:
        """Create the group (and the stream) if missing; True when this call created it."""
        try:
            self.redis.xgroup_create(self.input_stream, self.group, id=start_id, mkstream=True)
        except redis.ResponseError as exc:
            if "BUSYGROUP" in str(exc):
                return False
            raise
        return True

    def read_new(self, count: int, block_ms: int | None) -> list[Entry]:
        """Entries never delivered to the group, up to `count`, waiting up to `block_ms`."""
        return self._read(">", count, block_ms)

    def read_own_pending(self, after: bytes | str, count: int) -> list[Entry]:
        """Entries delivered to this consumer and not acked, after id `after` (start with 0)."""
        return self._read(after, count, None)

    def _read(self, stream_id: bytes | str, count: int, block_ms: int | None) -> list[Entry]:
        reply = _read_group(self, {self.input_stream: stream_id}, count, block_ms)
        if not reply:
            return []
        # redis-py gives [[stream, [(id, fields), ...]]] (RESP2) or {stream: [[...]]} (RESP3).
        items = reply[0][1] if isinstance(reply, list) else next(iter(reply.values()))[0]
        return [(entry_id, fields or {}) for entry_id, fields in items]

    def reclaim_stale(self, min_idle_ms: int, start: bytes | str, count: int) -> Reclaimed:
        """XAUTOCLAIM up to `count` entries idle longer than `min_idle_ms`, from cursor `start`."""
        reply = self.redis.xautoclaim(
            self.input_stream, self.group, self.consumer, min_idle_ms, start_id=start, count=count
        )
        cursor, claimed = reply[0], reply[1]
        trimmed = list(reply[2]) if len(reply) > 2 else []  # Redis >= 7 reports trimmed entries
        entries = [(entry_id, fields) for entry_id, fields in claimed if entry_id is not None and fields]
        return Reclaimed(cursor, entries, trimmed, len(claimed) - len(entries))

    def delivery_counts(self, ids: Sequence[bytes]) -> dict[bytes, int]:
        """How often each of `ids` has been delivered (from XPENDING)."""
        if not ids:
            return {}
        as_int = sorted(ids, key=_id_key)
        rows = self.redis.xpending_range(
            self.input_stream, self.group, min=as_int[0], max=as_int[-1], count=len(ids) + 1000
        )
        wanted = set(ids)
        return {
            _as_bytes(row["message_id"]): int(row["times_delivered"])
            for row in rows
            if _as_bytes(row["message_id"]) in wanted
        }

    def commit_batch(self, commit: Commit) -> CommitResult:
        """Ack the batch and publish its results in one atomic script call."""
        return self.send_commit(commit).result()

    def send_commit(self, commit: Commit) -> PendingCommit:
        """Send the batch's commit script call and return before Redis answers (`PendingCommit`).

        On one server without WAIT_REPLICAS; on a cluster (redirects, slot migrations) or with
        WAIT (a pipeline) the call is made here and the result is already in."""
        if not len(commit):
            return PendingCommit.answered(CommitResult(0, 0, 0, None))
        args = self._commit_args(commit)
        if self.wait_replicas or hasattr(self.redis, "get_node_from_key"):
            return PendingCommit.answered(_commit_result(*self._run_commit(args)))
        pool = self.redis.connection_pool
        connection = pool.get_connection()
        try:
            connection.send_command("EVALSHA", self._commit.sha, len(self.keys), *self.keys, *args)
        except BaseException as exc:
            connection.disconnect()  # part of a command may have gone: never reuse this socket as is
            pool.release(connection)
            if not isinstance(exc, redis.ConnectionError | redis.TimeoutError):
                raise
            # A connection that died while idle (a restarted server): the client's retries
            # reconnect, as they did for every commit before the split.
            log.info("commit connection failed before sending, committing through the client error=%s", exc)
            return PendingCommit.answered(_commit_result(*self._run_commit(args)))

        def answer() -> Any:
            try:
                return connection.read_response()
            except BaseException:
                connection.disconnect()  # an unread answer must not reach the pool's next user
                raise
            finally:
                pool.release(connection)

        return PendingCommit(answer, lambda: self._run_commit(args)[0])

    def _commit_args(self, commit: Commit) -> list[bytes | str | int]:
        """The commit script's ARGV for `commit` (its layout is described above COMMIT_SCRIPT)."""
        checked = len(commit.plain_ids) + sum(1 for entry_id, _ in commit.records if entry_id)
        low, high = (commit.id_range or _id_range(commit)) if checked > FENCE_PER_ID_UP_TO else ("", "")
        args: list[bytes | str | int] = [self.group, self.consumer, checked, low, high]
        args.extend((len(self.maxlens), *self.maxlens, len(commit.plain_ids)))
        args.extend(commit.plain_ids)
        for entry_id, adds in commit.records:
            args.append(entry_id)
            args.append(len(adds))
            for target, flat in adds:
                if target not in self._key_of:
                    raise ValueError(
                        f"commit targets stream {target} but no such stream is configured; "
                        f"configured: {sorted(self._key_of)}"
                    )
                args.append(self._key_of[target])
                args.append(len(flat))
                args.extend(flat)
        return args

    def _run_commit(self, args: list[bytes | str | int]) -> tuple[Any, int | None]:
        """The commit script (with WAIT_REPLICAS, followed by WAIT), retried while the shard's slot
        is half migrated: a TRYAGAIN or redirect means the script did not run, so running it again
        publishes and acks each entry once. Past SLOT_MIGRATION_RETRY_SECONDS, SlotMigrating."""
        deadline = time.monotonic() + SLOT_MIGRATION_RETRY_SECONDS
        backoff = ExponentialWithJitterBackoff(cap=0.5, base=0.02)
        for attempt in itertools.count():
            try:
                result = self._run_commit_once(args)
            except SlotMigrating:
                if time.monotonic() >= deadline:
                    raise
                if attempt == 0:
                    log.warning(
                        "commit deferred: the slot of shard %d is being migrated, retrying stream=%s",
                        self.shard,
                        self.input_stream,
                    )
                time.sleep(backoff.compute(attempt + 1))
                continue
            if attempt:
                log.info("commit ran after the slot migration shard=%d attempts=%d", self.shard, attempt + 1)
            return result
        raise AssertionError("unreachable")

    def _run_commit_once(self, args: list[bytes | str | int]) -> tuple[Any, int | None]:
        if not self.wait_replicas:
            try:
                return self._commit(keys=self.keys, args=args), None
            except redis.exceptions.ClusterError as exc:
                # RedisCluster follows ASK and MOVED and retries TRYAGAIN itself, 16 times, then
                # gives up with a plain ClusterError("TTL exhausted.") (redis-py 8.1, no own type):
                # every one of those replies meant nothing ran. Other ClusterErrors (CLUSTERDOWN)
                # take the usual path.
                if type(exc) is not redis.exceptions.ClusterError or "TTL exhausted" not in str(exc):
                    raise
                raise self._slot_migrating(exc) from exc
        # WAIT counts the replicas that have this connection's writes, so it must follow the script
        # on the same connection: both go in one pipeline (one connection, one round trip). On a
        # cluster that is a pipeline on the node serving the shard's slot, so this follows the
        # redirects itself: MOVED refreshes the slot map, ASK sends ASKING before the script on the
        # importing node (ASKING lets the next command only in).
        node, asking = self._node_client(), False
        for _ in range(5):
            pipe = node.pipeline(transaction=False)
            if asking:
                pipe.execute_command("ASKING")
            self._commit(keys=self.keys, args=args, client=pipe)
            pipe.execute_command("WAIT", self.wait_replicas, self.wait_timeout_ms)
            try:
                *_, reply, replicas = pipe.execute()
            except redis.exceptions.MovedError:
                self.redis.nodes_manager.initialize()
                node, asking = self._node_client(), False
                continue
            except redis.exceptions.AskError as exc:
                target = self.redis.get_node(host=exc.host, port=exc.port)
                if target is None:  # a node the slot map does not know yet
                    self.redis.nodes_manager.initialize()
                    target = self.redis.get_node(host=exc.host, port=exc.port)
                node, asking = self.redis.get_redis_connection(target), True
                continue
            except redis.exceptions.TryAgainError as exc:
                raise self._slot_migrating(exc) from exc
            return reply, int(replicas)
        raise self._slot_migrating(redis.exceptions.ClusterError("5 redirects in a row"))

    def _slot_migrating(self, cause: Exception) -> SlotMigrating:
        return SlotMigrating(
            f"the commit of shard {self.shard} did not run: the hash slot of {', '.join(self.keys)} "
            f"is being migrated between nodes and those keys are not all on one node yet ({cause}); "
            "its entries stay pending"
        )

    def _node_client(self) -> Any:
        if hasattr(self.redis, "get_node_from_key"):  # redis.cluster.RedisCluster
            return self.redis.get_redis_connection(self.redis.get_node_from_key(self.input_stream))
        return self.redis

    def prune_consumers(self, min_idle_ms: int) -> list[str]:
        """Delete idle consumers with no pending entries (never this one); returns their names."""
        return self._pruner.prune(self.input_stream, self.group, min_idle_ms, self.consumer)

    def group_state(self) -> GroupState:
        """Pending count and (Redis >= 7) lag of our group."""
        for info in self.redis.xinfo_groups(self.input_stream):
            name = info.get("name")
            if _as_bytes(name) == self.group.encode():
                lag = info.get("lag")
                return GroupState(int(info.get("pending", 0)), None if lag is None else int(lag))
        return GroupState(0, None)

    def output_trimmed_unread(self) -> dict[str, float]:
        """Per consumer group of the output stream (a notifier, a user's consumer): how many anomalies
        OUTPUT_MAXLEN trimmed before the group read them. Nonzero only while the group is behind the
        stream's first entry; NaN where Redis cannot tell (6.2 has no lag). Empty without groups."""
        try:
            groups = self.redis.xinfo_groups(self.output_stream)
        except redis.ResponseError as exc:  # no such key yet: nothing published, nobody reading
            if "no such key" in str(exc).lower():
                return {}
            raise
        if not groups:
            return {}
        info = self.redis.xinfo_stream(self.output_stream)
        first = info.get("first-entry")
        length = int(info.get("length", 0))
        found: dict[str, float] = {}
        for group in groups:
            name = _as_bytes(group["name"]).decode("utf-8", "replace")
            last = group.get("last-delivered-id", b"0-0")
            if first is not None and _id_key(last) >= _id_key(first[0]):
                found[name] = 0.0  # everything after what it read is still in the stream
                continue
            lag = group.get("lag")
            found[name] = float("nan") if lag is None else float(max(0, int(lag) - length))
        return found


def read_new_many(
    streams: Sequence[StreamClient], count: int, block_ms: int | None
) -> list[tuple[StreamClient, list[Entry]]]:
    """One XREADGROUP over the input streams of several shards on one server: up to `count` new
    entries of each, waiting up to `block_ms` only while every one of them is empty."""
    first = streams[0]
    by_name = {s.input_stream.encode(): s for s in streams}
    reply = _read_group(first, {s.input_stream: ">" for s in streams}, count, block_ms)
    if not reply:
        return []
    # [[stream, [(id, fields), ...]], ...] (RESP2) or {stream: [[...]]} (RESP3).
    pairs = reply if isinstance(reply, list) else [(name, value[0]) for name, value in reply.items()]
    out = []
    for name, items in pairs:
        if items:
            out.append((by_name[_as_bytes(name)], [(entry_id, fields or {}) for entry_id, fields in items]))
    return out


def _read_group(
    client: StreamClient, streams: Mapping[str, bytes | str], count: int, block_ms: int | None
) -> Any:
    """XREADGROUP as `client`'s consumer; None when a blocking read was ended by UNBLOCKED.

    Redis >= 7 ends a blocking XREADGROUP whose stream was deleted with UNBLOCKED; MIGRATE deletes
    it from the old node when it moves to another. Nothing was delivered: the next read follows
    the key (ASK or MOVED) or, if it is really gone, gets NOGROUP and the group is recreated."""
    try:
        return client.redis.xreadgroup(client.group, client.consumer, streams, count=count, block=block_ms)
    except redis.ResponseError as exc:
        if not str(exc).startswith("UNBLOCKED"):
            raise
        return None


def _id_range(commit: Commit) -> tuple[bytes | str, bytes | str]:
    ids = [*commit.plain_ids, *(entry_id for entry_id, _ in commit.records if entry_id)]
    return (min(ids, key=_id_key), max(ids, key=_id_key)) if ids else ("", "")


def _as_bytes(value: bytes | str) -> bytes:
    return value if isinstance(value, bytes) else value.encode()


def _id_key(entry_id: bytes | str) -> tuple[int, int]:
    ms, _, seq = _as_bytes(entry_id).partition(b"-")
    return int(ms), int(seq or 0)


def entry_timestamps_ms(entry_ids: Sequence[bytes]) -> np.ndarray:
    """The milliseconds part of each stream id (producers use '*' so it is the time of XADD), as
    float64: one join and split for the batch, half the time of a conversion per id."""
    return np.array(b" ".join(entry_ids).replace(b"-", b" ").split()[::2], dtype=np.float64)


def flat_fields(fields: Mapping[str, bytes | str | int | float]) -> list[bytes | str]:
    """dict -> [k1, v1, k2, v2, ...] with values as Redis strings."""
    out: list[bytes | str] = []
    for key, value in fields.items():
        out.append(key)
        out.append(value if isinstance(value, bytes | str) else repr(value))
    return out
