"""anomaly-worker's settings: the shared connection and streams, plus the loop's own knobs."""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator
from redis.crc import key_slot

from detector.errors import ThresholdPolicyError
from detector.thresholds import parse_policy
from runtime.settings.base import StreamKey, StreamSettings


def _default_consumer() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


class WorkerSettings(StreamSettings):
    """Every knob of the worker, typed, defaulted and described (env name: ANOMALY_<FIELD>)."""

    shard_ids: str = Field(
        "", description="comma-separated shards this worker consumes, e.g. 0,2,4 (empty: all SHARDS)"
    )
    wait_replicas: int = Field(
        0,
        ge=0,
        description="after each commit, WAIT until this many replicas have it (0: off; asynchronous "
        "replication may lose the last results when a primary fails)",
    )
    wait_timeout_ms: int = Field(
        100, ge=0, description="longest WAIT for WAIT_REPLICAS after a commit (0: wait forever)"
    )
    artifact: Path | None = Field(None, description="artifact directory written by anomaly-trainer")
    artifact_root: Path | None = Field(
        None, description="if set, the artifact must resolve (symlinks followed) inside this directory"
    )
    group: StreamKey = Field("anomaly-scorer", description="consumer group shared by all workers")
    consumer: StreamKey = Field(
        default_factory=_default_consumer, description="this worker's name in the group"
    )
    batch_size: int = Field(256, ge=1, le=4096, description="entries read per XREADGROUP")
    block_ms: int = Field(1000, ge=1, le=60_000, description="how long one read waits for entries")
    metrics_host: str = Field("0.0.0.0", description="address of the /metrics, /healthz, /readyz server")
    metrics_port: int = Field(9400, ge=0, le=65535, description="port of that server (0: any free port)")
    start_id: str = Field("0", description="where a new group starts: 0 (whole backlog) or $ (new only)")
    claim_idle_ms: int = Field(60_000, ge=100, description="reclaim entries pending longer than this")
    max_deliveries: int = Field(5, ge=1, description="an entry delivered more often is dead-lettered")
    dead_consumer_idle_ms: int = Field(
        3_600_000,
        ge=0,
        description="remove group consumers idle this long with no pending entries (0: never)",
    )
    output_maxlen: int = Field(100_000, ge=0, description="approximate cap of the output stream (0: none)")
    dead_letter_maxlen: int = Field(100_000, ge=0, description="approximate cap of the dead-letter stream")
    scores_maxlen: int = Field(1_000_000, ge=0, description="approximate cap of the scores stream")
    max_payload_bytes: int = Field(0, ge=0, description="largest accepted image field (0: 24*D+64)")
    threshold: str = Field("", description="threshold policy overriding the artifact's, e.g. p99, fpr=0.01")
    grace_seconds: float = Field(20.0, gt=0, description="time allowed to finish the batch on SIGTERM")
    lag_sample_seconds: float = Field(5.0, gt=0, description="how often group lag/pending are sampled")
    detection_window_seconds: float = Field(60.0, gt=0, description="window of anomaly_detection_rate")
    reload_poll_seconds: float = Field(
        10.0,
        ge=0,
        description="how often the artifact is checked for a new version (0: SIGHUP only)",
    )
    prefetch: bool = Field(
        True,
        description="with a backlog (a read that filled a quarter of the batch or more), score "
        "elsewhere (the scoring process, or a second thread): this batch while the next is read "
        "and decoded, then the next while this one is committed",
    )
    scoring_process: bool = Field(
        True,
        description="with ANOMALY_PREFETCH and the numpy engine, do that scoring in a child process "
        "instead of a thread: the loop holds Python's GIL for most of a batch, so only another "
        "process scores in parallel with it",
    )
    scoring_threads: int = Field(
        1,
        ge=1,
        le=64,
        description="BLAS threads of the numpy engine; 1 leaves the other cores to Redis and to "
        "the reading thread (scale out with more workers)",
    )
    tune_malloc: bool = Field(
        True,
        description="keep the memory a batch frees for the next one (glibc malloc thresholds) "
        "instead of returning it to the system and faulting it back in every batch",
    )
    engine: Literal["auto", "numpy", "tensorflow"] = Field(
        "auto",
        description="scoring engine: numpy (dense models, no TensorFlow loaded), tensorflow (any "
        "model), auto (numpy when the artifact has dense_stack.npz)",
    )
    jit: bool = Field(True, description="compile the forward pass with XLA (tensorflow engine)")
    drift_window_scores: int = Field(
        2000,
        ge=0,
        description="anomaly_score_drift is the population stability index of this many most recent "
        "scores against the artifact's held-out normal scores (0: off)",
    )
    shadow_artifact: Path | None = Field(
        None,
        description="a candidate artifact scored on every batch beside the served one; it publishes "
        "nothing to the output stream (anomaly_shadow_* metrics, optional SHADOW_SCORES_STREAM)",
    )
    shadow_scores_stream: str = Field(
        "", description="optional stream of the shadow model's decision on every scored image (empty: off)"
    )
    shadow_scores_maxlen: int = Field(
        1_000_000, ge=0, description="approximate cap of the shadow scores stream"
    )

    @field_validator("start_id")
    @classmethod
    def _start_id(cls, value: str) -> str:
        if value not in {"0", "$"} and not value.replace("-", "").isdigit():
            raise ValueError(f"expected 0, $ or a stream id like 1700000000000-0, found {value!r}")
        return value

    @field_validator("threshold")
    @classmethod
    def _policy(cls, value: str) -> str:
        if value:
            try:
                parse_policy(value)
            except ThresholdPolicyError as exc:
                raise ValueError(str(exc)) from exc
        return value

    @model_validator(mode="after")
    def _artifact_inside_root(self) -> WorkerSettings:
        self.check_artifact_path()
        return self

    def check_artifact_path(self) -> None:
        """Refuse an artifact (or shadow artifact) that resolves outside artifact_root (a swapped
        symlink, a typo)."""
        if self.artifact_root is None:
            return
        root = self.artifact_root.resolve()
        for what, path in (("artifact", self.artifact), ("shadow artifact", self.shadow_artifact)):
            if path is not None and not path.resolve().is_relative_to(root):
                raise ValueError(
                    f"{what} {path} resolves to {path.resolve()}, outside ANOMALY_ARTIFACT_ROOT {root}"
                )

    @model_validator(mode="after")
    def _shards_and_streams(self) -> WorkerSettings:
        if self.shards > 1 and self.shadow_scores_stream and "{" in self.shadow_scores_stream:
            raise ValueError(
                f"with ANOMALY_SHARDS={self.shards} stream names get the hash tag :{{shard}} and may "
                f"not contain braces, found {[self.shadow_scores_stream]}"
            )
        self.shard_list()
        names = self.stream_names()
        if len(set(names)) != len(names):
            raise ValueError(
                f"input, output, dead-letter, scores and shadow scores streams must differ, found {names}"
            )
        if self.shadow_scores_stream and self.shadow_artifact is None:
            raise ValueError("ANOMALY_SHADOW_SCORES_STREAM is set but ANOMALY_SHADOW_ARTIFACT is not")
        # The commit script touches every stream of a shard at once: on a cluster they must share
        # a slot (with several shards the :{i} suffix gives them one).
        if self.redis_cluster and self.shards == 1:
            slots = {name: key_slot(name.encode()) for name in names}
            if len(set(slots.values())) > 1:
                found = ", ".join(f"{name} (slot {slot})" for name, slot in slots.items())
                raise ValueError(
                    f"with ANOMALY_REDIS_CLUSTER the streams must share one hash slot, found {found}; "
                    "give them one hash tag, e.g. {cams}:images, {cams}:anomalies, {cams}:dead-letter"
                )
        return self

    def shard_list(self) -> list[int]:
        """The shards this worker consumes: SHARD_IDS, or all of 0..SHARDS-1."""
        if not self.shard_ids.strip():
            return list(range(self.shards))
        try:
            ids = [int(part) for part in self.shard_ids.split(",") if part.strip()]
        except ValueError:
            found = self.shard_ids
            raise ValueError(f"ANOMALY_SHARD_IDS: expected numbers like 0,2,4, found {found!r}") from None
        wrong = [i for i in ids if not 0 <= i < self.shards]
        if wrong or not ids or len(set(ids)) != len(ids):
            raise ValueError(
                f"ANOMALY_SHARD_IDS: expected distinct shards in 0..{self.shards - 1} (ANOMALY_SHARDS="
                f"{self.shards}), found {self.shard_ids!r}"
            )
        return ids

    def for_shard(self, shard: int) -> WorkerSettings:
        """These settings with every stream name of `shard` (unchanged with one shard)."""
        if self.shards == 1:
            return self
        names = ("input_stream", "output_stream", "dead_letter_stream", "scores_stream")
        update = {
            name: self.in_shard(getattr(self, name), shard)
            for name in (*names, "shadow_scores_stream")
            if getattr(self, name)
        }
        return self.model_copy(update=update)

    def stream_names(self) -> list[str]:
        """Every stream the worker reads or writes, in commit-script key order (unset ones left out)."""
        return [*self.sharded_names(), *filter(None, [self.shadow_scores_stream])]

    def summary(self) -> str:
        """key=value config line for the start-up log, without secrets."""
        return " ".join(f"{k}={v}" for k, v in self.summary_fields().items())

    def summary_fields(self) -> dict[str, object]:
        """The start-up log's fields: what this worker reads, writes and how, without secrets."""
        return {
            "redis": self.redacted_redis_url(),
            "artifact": self.artifact,
            "input": self.input_stream,
            "output": self.output_stream,
            "dead_letter": self.dead_letter_stream,
            "scores": self.scores_stream or "off",
            "group": self.group,
            "consumer": self.consumer,
            "batch_size": self.batch_size,
            "block_ms": self.block_ms,
            "metrics": f"{self.metrics_host}:{self.metrics_port}",
            "threshold": self.threshold or "artifact",
            "engine": self.engine,
            "shadow": self.shadow_artifact or "off",
            "shards": ",".join(map(str, self.shard_list())) + f"/{self.shards}",
            "sentinels": self.redis_sentinels or "off",
            "wait_replicas": self.wait_replicas,
        }
