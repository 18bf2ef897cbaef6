"""What every process of the fleet reads from ANOMALY_* variables: logging, the Redis connection
and the stream names. Each application's settings class extends these (worker, viewer, tools)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from contract.shards import shard_key
from runtime.logs import LogFormat
from runtime.redact import redact_url

ENV_PREFIX = "ANOMALY_"
StreamKey = Annotated[str, Field(min_length=1, max_length=512)]


class AnomalySettings(BaseSettings):
    """ANOMALY_<FIELD> variables, typed and described; a misspelt one fails (runtime.settings.environment)."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="forbid", validate_default=True)

    log_level: str = Field("INFO", description="DEBUG, INFO, WARNING or ERROR")
    log_format: LogFormat = Field(
        "logfmt",
        description="logfmt (key=value, quoted where needed) or json (one object per line: ts, level, "
        "logger, msg and the fields)",
    )

    @field_validator("log_level")
    @classmethod
    def _level(cls, value: str) -> str:
        upper = value.upper()
        if upper not in {"DEBUG", "INFO", "WARNING", "ERROR"}:
            raise ValueError(f"expected DEBUG, INFO, WARNING or ERROR, found {value!r}")
        return upper


class RedisSettings(AnomalySettings):
    """How to reach Redis: one node, a Cluster, or the primary that Sentinels name."""

    redis_url: SecretStr = Field(
        SecretStr("redis://localhost:6379/0"),
        description="redis://[user:password@]host:port/db, rediss:// for TLS, or unix:///path",
    )
    redis_cluster: bool = Field(
        False,
        description="speak the Redis Cluster protocol; every stream name must hash to one slot, "
        "e.g. {cams}:images, {cams}:anomalies, {cams}:dead-letter",
    )
    redis_sentinels: str = Field(
        "",
        description="host:port,host:port of Redis Sentinels; set, the process asks them for the "
        "primary of REDIS_SENTINEL_SERVICE and follows it through failovers (REDIS_URL then only "
        "gives the database, user and TLS)",
    )
    redis_sentinel_service: str = Field("mymaster", description="the service name the Sentinels monitor")
    redis_sentinel_password: SecretStr | None = Field(
        None,
        description="password of the Sentinels themselves (their requirepass), not of the data "
        "nodes; with a rediss:// REDIS_URL the Sentinels are reached over TLS too, with its ssl_* options",
    )
    redis_sentinel_password_file: Path | None = Field(
        None,
        description="file holding that Sentinel password (a mounted secret), instead of "
        "REDIS_SENTINEL_PASSWORD",
    )
    redis_password_file: Path | None = Field(
        None, description="file holding the Redis password (a mounted secret); overrides the URL's"
    )

    @field_validator("redis_url")
    @classmethod
    def _known_scheme(cls, value: SecretStr) -> SecretStr:
        scheme = urlsplit(value.get_secret_value()).scheme
        if scheme not in {"redis", "rediss", "unix"}:
            raise ValueError(f"scheme {scheme!r} is not supported; expected redis://, rediss:// or unix://")
        return value

    @field_validator("redis_sentinels")
    @classmethod
    def _sentinel_addresses(cls, value: str) -> str:
        for address in filter(None, (a.strip() for a in value.split(","))):
            host, _, port = address.rpartition(":")
            if not host or not port.isdigit():
                raise ValueError(f"expected host:port[,host:port...], found {address!r}")
        return value

    @model_validator(mode="after")
    def _one_topology(self) -> RedisSettings:
        if self.redis_cluster and self.redis_sentinels:
            raise ValueError("ANOMALY_REDIS_CLUSTER and ANOMALY_REDIS_SENTINELS exclude each other")
        if self.redis_sentinel_password is not None and self.redis_sentinel_password_file is not None:
            raise ValueError(
                "ANOMALY_REDIS_SENTINEL_PASSWORD and ANOMALY_REDIS_SENTINEL_PASSWORD_FILE are both set; "
                "expected at most one"
            )
        return self

    def redis_password(self) -> str | None:
        """The password from redis_password_file, if set (trailing newline stripped)."""
        if self.redis_password_file is None:
            return None
        return self.redis_password_file.read_text().rstrip("\r\n")

    def sentinel_password(self) -> str | None:
        """The Sentinels' own password: REDIS_SENTINEL_PASSWORD, or read from its file (trailing
        newline stripped); None when neither is set."""
        if self.redis_sentinel_password_file is not None:
            return self.redis_sentinel_password_file.read_text().rstrip("\r\n")
        if self.redis_sentinel_password is not None:
            return self.redis_sentinel_password.get_secret_value()
        return None

    def redacted_redis_url(self) -> str:
        """The Redis URL without its password, for logs and files."""
        return redact_url(self.redis_url.get_secret_value())


class StreamSettings(RedisSettings):
    """The streams of one deployment, shared by every process: what each reads and writes."""

    input_stream: StreamKey = Field("images", description="stream producers write images to")
    output_stream: StreamKey = Field("anomalies", description="stream of flagged images")
    dead_letter_stream: StreamKey = Field("images:dead-letter", description="rejected entries, with reason")
    scores_stream: str = Field("", description="optional stream of every score (empty: off)")
    labels_stream: StreamKey = Field(
        "anomaly-labels", description="stream of operators' labels of alerts (anomaly-viewer writes it)"
    )
    shards: int = Field(
        1,
        ge=1,
        le=1024,
        description="number of shards; above 1, shard i uses every stream name with the suffix :{i} "
        "(images:{0}, anomalies:{0}, ...), so each shard's streams share one hash slot; the labels "
        "stream is not sharded",
    )

    @model_validator(mode="after")
    def _shard_names(self) -> StreamSettings:
        # Shard i appends :{i}; a name with its own braces would pick another hash tag (or none).
        if self.shards > 1:
            braced = [name for name in self.sharded_names() if "{" in name or "}" in name]
            if braced:
                raise ValueError(
                    f"with ANOMALY_SHARDS={self.shards} stream names get the hash tag :{{shard}} and "
                    f"may not contain braces, found {braced}"
                )
        return self

    def sharded_names(self) -> list[str]:
        """The stream names that exist once per shard (unset optional ones left out)."""
        optional = [self.scores_stream]
        return [self.input_stream, self.output_stream, self.dead_letter_stream, *filter(None, optional)]

    def in_shard(self, name: str, shard: int) -> str:
        """Stream `name` of shard `shard` (unchanged with one shard)."""
        return name if self.shards == 1 else shard_key(name, shard)

    def every_shard(self, name: str) -> list[str]:
        """Stream `name` in each shard, shard 0 first (a one-element list with one shard)."""
        return [self.in_shard(name, shard) for shard in range(self.shards)]
