"""Which shard an image belongs to, and the stream names of a shard (the producers' contract).

With N shards (ANOMALY_SHARDS, the producers' --shards), stream `images` becomes `images:{0}` ..
`images:{N-1}`: the braces are Redis Cluster's hash tag, so one shard's input, output, dead-letter
and scores streams share a hash slot. An image with a producer id goes to shard
CRC-32/IEEE(UTF-8 bytes of the id) mod N (the unsigned 32-bit CRC of zlib, Go's hash/crc32
ChecksumIEEE, Node's zlib.crc32): one source's images stay in one shard, in order. Images without
an id may go to any shard.
"""

from __future__ import annotations

import zlib


def shard_key(name: str, shard: int) -> str:
    """The name of stream `name` in shard `shard`: images -> images:{3} (the braces are the hash tag)."""
    return f"{name}:{{{shard}}}"


def shard_of_id(producer_id: str, shards: int) -> int:
    """The shard of an image with this producer id: CRC-32/IEEE of its UTF-8 bytes, mod `shards`."""
    if shards < 1:
        raise ValueError(f"shards must be 1 or more, found {shards}")
    return zlib.crc32(producer_id.encode("utf-8")) % shards
