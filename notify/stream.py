"""The notifier's Redis side: its consumer group on each shard's output stream (read new, read its
own pending, take over stale ones, renew what it holds, acknowledge) and its dead-letter stream.

Entries are (id, fields) with bytes keys and values (decode_responses=False); this module is the
one place of the notifier that speaks Redis Streams.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import redis

from runtime.groups import ConsumerPruner

Entry = tuple[bytes, Mapping[bytes, bytes]]
ACK_CHUNK = 1000  # ids per XACK (a summary may acknowledge thousands)


@dataclass(frozen=True)
class Reclaimed:
    """One XAUTOCLAIM call: the next cursor, the entries taken over, and (Redis >= 7) the ids of
    pending entries that were trimmed from the stream (Redis has removed them from the group)."""

    cursor: bytes
    entries: list[Entry]
    trimmed: list[bytes]


class OutputGroup:
    """The notifier's group on one shard's output stream, and that shard's notifier dead letters."""

    def __init__(
        self,
        client: Any,
        *,
        shard: int,
        output_stream: str,
        input_stream: str,
        dead_letter_stream: str,
        dead_letter_maxlen: int,
        group: str,
        consumer: str,
    ) -> None:
        self.redis = client
        self.shard = shard
        self.output_stream = output_stream
        self.input_stream = input_stream
        self.dead_letter_stream = dead_letter_stream
        self.dead_letter_maxlen = dead_letter_maxlen
        self.group = group
        self.consumer = consumer
        self._pruner = ConsumerPruner(client)

    def ensure_group(self, start_id: str) -> bool:
        """Create the group (and the stream) if missing; True when this call created it."""
        try:
            self.redis.xgroup_create(self.output_stream, self.group, id=start_id, mkstream=True)
        except redis.ResponseError as exc:
            if "BUSYGROUP" in str(exc):
                return False
            raise
        return True

    def read_own_pending(self, after: bytes, count: int) -> list[Entry]:
        """Entries delivered to this consumer and not acknowledged, after id `after` (from 0). An
        entry trimmed since comes back with no fields."""
        reply = self.redis.xreadgroup(self.group, self.consumer, {self.output_stream: after}, count=count)
        return _entries(reply)

    def reclaim_stale(self, min_idle_ms: int, cursor: bytes, count: int) -> Reclaimed:
        """XAUTOCLAIM up to `count` entries idle longer than `min_idle_ms` (a notifier that died)."""
        reply = self.redis.xautoclaim(
            self.output_stream, self.group, self.consumer, min_idle_ms, start_id=cursor, count=count
        )
        claimed = [(entry_id, fields or {}) for entry_id, fields in reply[1] if entry_id is not None]
        trimmed = list(reply[2]) if len(reply) > 2 else []
        return Reclaimed(_as_bytes(reply[0]), claimed, trimmed)

    def renew(self, ids: Sequence[str]) -> None:
        """Reset the idle time of entries this consumer holds (XCLAIM JUSTID to itself), so no other
        notifier takes them over while a summary is gathered or a delivery retried."""
        for first in range(0, len(ids), ACK_CHUNK):
            chunk = list(ids[first : first + ACK_CHUNK])
            self.redis.xclaim(self.output_stream, self.group, self.consumer, 0, chunk, justid=True)

    def ack(self, ids: Sequence[str]) -> int:
        """Acknowledge delivered entries; the number Redis removed from the pending list."""
        acked = 0
        for first in range(0, len(ids), ACK_CHUNK):
            acked += int(self.redis.xack(self.output_stream, self.group, *ids[first : first + ACK_CHUNK]))
        return acked

    def prune_consumers(self, min_idle_ms: int) -> list[str]:
        """Delete the group's consumers idle longer than `min_idle_ms` with nothing pending (never
        this one); returns their names."""
        return self._pruner.prune(self.output_stream, self.group, min_idle_ms, self.consumer)

    def dead_letter(
        self, records: Sequence[tuple[str, Mapping[str | bytes, str | bytes]]], ack: bool = True
    ) -> None:
        """Write each (entry id, dead-letter fields) to the dead-letter stream and acknowledge the
        entry in one MULTI/EXEC, so a crash never acknowledges an anomaly without its dead letter
        nor leaves a dead letter of one still pending (it would be delivered and dead-lettered
        twice). `ack=False` for entries Redis already removed from the group (trimmed)."""
        if not records:
            return
        pipe = self.redis.pipeline(transaction=True)
        maxlen = self.dead_letter_maxlen or None
        for _, fields in records:
            pipe.xadd(self.dead_letter_stream, dict(fields), maxlen=maxlen, approximate=True)
        if ack:
            ids = [entry_id for entry_id, _ in records]
            for first in range(0, len(ids), ACK_CHUNK):
                pipe.xack(self.output_stream, self.group, *ids[first : first + ACK_CHUNK])
        pipe.execute()


def read_new(
    groups: Sequence[OutputGroup], count: int, block_ms: int | None
) -> list[tuple[OutputGroup, list[Entry]]]:
    """Entries never delivered to the group, up to `count` of each shard: one XREADGROUP over every
    shard's output stream (one server), waiting up to `block_ms` while all are empty."""
    first = groups[0]
    by_name = {g.output_stream.encode(): g for g in groups}
    reply = first.redis.xreadgroup(
        first.group, first.consumer, {g.output_stream: ">" for g in groups}, count=count, block=block_ms
    )
    out = []
    for name, items in _pairs(reply):
        if items:
            out.append((by_name[_as_bytes(name)], [(i, f or {}) for i, f in items]))
    return out


def _pairs(reply: Any) -> list[tuple[bytes | str, list[Any]]]:
    """[[stream, [(id, fields), ...]], ...] (RESP2) or {stream: [[...]]} (RESP3) as pairs."""
    if not reply:
        return []
    if isinstance(reply, dict):
        return [(name, value[0]) for name, value in reply.items()]
    return [(name, items) for name, items in reply]


def _entries(reply: Any) -> list[Entry]:
    return [(entry_id, fields or {}) for _, items in _pairs(reply) for entry_id, fields in items]


def _as_bytes(value: bytes | str) -> bytes:
    return value if isinstance(value, bytes) else value.encode()
