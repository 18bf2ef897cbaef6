"""The shards a worker consumes, read fairly.

With ANOMALY_SHARDS=N every stream name of shard i ends in :{i}, so one shard's input, output,
dead-letter and scores streams share a hash slot and its commit stays one atomic script. A worker
consumes some or all shards; each has its own `StreamClient` (group, reclaim, commit).

Fair reading: no shard starves while another has a backlog, and a blocking read never waits on an
empty shard while another has entries.
- One server: one XREADGROUP over all input streams (COUNT applies to each), blocking only when
  all are empty; every shard with entries gets a batch in every round.
- Redis Cluster: keys of different slots cannot share a command, so shards are read one at a time
  without blocking, starting one past the shard served last (round robin); only when all were
  empty does the worker block, on one shard for a short slice (CLUSTER_BLOCK_SLICE_MS), so an
  entry arriving on another shard waits at most that slice.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from contract.codec import Entry
from runtime.settings import WorkerSettings
from worker.stream import StreamClient, read_new_many

CLUSTER_BLOCK_SLICE_MS = 50


class ShardSet:
    """The stream clients of the shards one worker consumes, and the fair read over them."""

    def __init__(self, streams: Sequence[StreamClient], one_server: bool = True) -> None:
        if not streams:
            raise ValueError("a worker needs at least one shard")
        self.streams = list(streams)
        self.one_server = one_server
        self._next = 0  # round-robin start of the per-shard reads (cluster)

    @classmethod
    def from_settings(cls, client: Any, settings: WorkerSettings) -> ShardSet:
        """One stream client per shard in ANOMALY_SHARD_IDS (default: all ANOMALY_SHARDS)."""
        streams = [StreamClient.from_settings(client, settings, shard) for shard in settings.shard_list()]
        return cls(streams, one_server=not settings.redis_cluster)

    def __len__(self) -> int:
        return len(self.streams)

    def read_new(self, count: int, block_ms: int | None) -> list[tuple[StreamClient, list[Entry]]]:
        """New entries as (shard, entries) batches, each shard's at most `count`, fairly."""
        if len(self.streams) == 1:
            entries = self.streams[0].read_new(count, block_ms)
            return [(self.streams[0], entries)] if entries else []
        if self.one_server:
            return read_new_many(self.streams, count, block_ms)
        n = len(self.streams)
        for step in range(n):
            shard = self.streams[(self._next + step) % n]
            if entries := shard.read_new(count, None):
                self._next = (self._next + step + 1) % n
                return [(shard, entries)]
        if not block_ms:
            return []
        shard = self.streams[self._next]
        self._next = (self._next + 1) % n
        entries = shard.read_new(count, min(block_ms, CLUSTER_BLOCK_SLICE_MS))
        return [(shard, entries)] if entries else []
