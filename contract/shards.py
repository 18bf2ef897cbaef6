"""Which shard an image belongs to, and the stream names of a shard (the producers' contract).

With N shards (ANOMALY_SHARDS, the producers' --shards), stream `images` becomes `images:{0}` ..
`images:{N-1}`: the braces are Redis Cluster's hash tag, so one shard's input, output, dead-letter
and scores streams share a hash slot. An image with a producer id goes to shard
CRC-32/IEEE(UTF-8 bytes of the id) mod N (the unsigned 32-bit CRC of zlib, Go's hash/crc32
ChecksumIEEE, Node's zlib.crc32): one source's images stay in one shard, in order. Images without
an id may go to any shard.

A reader of every shard (the viewer, `anomaly-compare`) merges them by entry id: Redis makes an id
from the time of XADD, `<milliseconds>-<sequence>`, so ids order entries across shards too.
"""

from __future__ import annotations

import heapq
import itertools
import zlib
from collections.abc import Sequence
from typing import TypeVar

Fields = TypeVar("Fields")


def shard_key(name: str, shard: int) -> str:
    """The name of stream `name` in shard `shard`: images -> images:{3} (the braces are the hash tag)."""
    return f"{name}:{{{shard}}}"


def shard_of_id(producer_id: str, shards: int) -> int:
    """The shard of an image with this producer id: CRC-32/IEEE of its UTF-8 bytes, mod `shards`."""
    if shards < 1:
        raise ValueError(f"shards must be 1 or more, found {shards}")
    return zlib.crc32(producer_id.encode("utf-8")) % shards


def entry_time(entry_id: bytes | str) -> tuple[int, int]:
    """(milliseconds, sequence) of a stream entry id as Redis writes it: b"1700000000000-3"."""
    text = entry_id.decode("ascii") if isinstance(entry_id, bytes) else entry_id
    ms, _, seq = text.partition("-")
    return int(ms), int(seq or 0)


def newest_across_shards(
    per_shard: Sequence[Sequence[tuple[bytes | str, Fields]]], count: int
) -> list[tuple[int, bytes | str, Fields]]:
    """The `count` newest of several shards' entries, each shard's newest first (as XREVRANGE
    returns them), merged newest first as (shard, entry id, fields); an id two shards share goes
    to the lower shard first."""
    tagged = [
        [(shard, entry_id, fields) for entry_id, fields in entries] for shard, entries in enumerate(per_shard)
    ]
    merged = heapq.merge(*tagged, key=lambda entry: entry_time(entry[1]), reverse=True)
    return list(itertools.islice(merged, max(count, 0)))
