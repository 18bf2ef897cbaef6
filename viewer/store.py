"""The viewer's Redis reads and its one write (a label), over every shard; every read is bounded.

With ANOMALY_SHARDS=N the workers write `anomalies:{0}` .. `anomalies:{N-1}`, each alert naming its
input entry (`source_id`) in the input stream of the same shard. The page merges the newest alerts
of every shard; a picture is drawn only for an alert that exists (its full entry id in the output
stream of its shard), from the input entry that alert names, in that shard's input stream.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from contract.labels import Label, latest_labels
from contract.score_components import ranked
from runtime.settings.base import StreamSettings

LATEST = 50  # anomalies on the page
SCAN = 1000  # output entries read for a page, over every shard (filtering by model version)
MAX_COMPONENTS_SHOWN = 8  # of an alert's score_components
LABELS_SCAN = 10_000  # label entries read to show what is labelled already
# A full stream entry id: milliseconds and sequence, each an unsigned 64-bit number. Redis reads a
# bare `1700000000000` as a range bound covering that whole millisecond, so it is never an id here.
_ENTRY_ID = re.compile(r"(0|[1-9][0-9]{0,19})-(0|[1-9][0-9]{0,19})")
_U64 = 2**64


def entry_id_key(text: str) -> tuple[int, int] | None:
    """(milliseconds, sequence) of a full stream entry id `ms-seq`; None for anything else."""
    match = _ENTRY_ID.fullmatch(text)
    if match is None:
        return None
    ms, seq = int(match.group(1)), int(match.group(2))
    return (ms, seq) if ms < _U64 and seq < _U64 else None


def _text(value: bytes | str | None) -> str:
    if value is None:
        return ""
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


@dataclass(frozen=True)
class Anomaly:
    """One output entry as the page shows it (every field as the worker or producer wrote it)."""

    entry_id: str  # the alert's own id in its shard's output stream
    id: str
    source_id: str
    score: str
    threshold: str
    z: str
    p_value: str
    model_version: str
    scored_at_ms: str
    region: str
    region_share: str
    shard: int = 0
    label: str = ""  # the latest label, if any
    score_components: str = ""  # the worker's JSON object: component -> its contribution

    @classmethod
    def from_entry(cls, entry_id: bytes | str, fields: Mapping[bytes, bytes], shard: int = 0) -> Anomaly:
        """An output-stream entry of `shard`; missing fields are empty."""

        def get(name: str) -> str:
            return _text(fields.get(name.encode()))

        return cls(
            entry_id=_text(entry_id),
            id=get("id"),
            source_id=get("source_id"),
            score=get("score"),
            threshold=get("threshold"),
            z=get("z"),
            p_value=get("p_value"),
            model_version=get("model_version"),
            scored_at_ms=get("scored_at_ms"),
            region=get("region"),
            region_share=get("region_share"),
            shard=shard,
            score_components=get("score_components"),
        )

    def number(self, name: str, digits: int = 4) -> str:
        """A numeric field rounded for people; the raw text when it is not a number."""
        raw = getattr(self, name)
        try:
            return f"{float(raw):.{digits}g}"
        except ValueError:
            return raw

    @property
    def components(self) -> list[tuple[str, str]]:
        """(component, its contribution rounded for people), largest first: which view of "not
        normal" flagged the image; at most MAX_COMPONENTS_SHOWN, none for an entry without the
        field or with one that is not ours (`contract.score_components.parse` is total)."""
        shown = ranked(self.score_components)[:MAX_COMPONENTS_SHOWN]
        return [(name, f"{value:.3g}") for name, value in shown]

    @property
    def scored_at(self) -> str:
        """UTC time of scoring, or the raw field."""
        try:
            return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(int(self.scored_at_ms) / 1000))
        except (ValueError, OverflowError, OSError):
            return self.scored_at_ms

    def labelled(self, labels: Mapping[tuple[int | None, str], Label]) -> Anomaly:
        """This anomaly with its latest label among `labels`, if it has one (one of its shard, or
        one that names no shard)."""
        found = labels.get((self.shard, self.source_id)) or labels.get((None, self.source_id))
        return replace(self, label=found.label) if found is not None else self


class ViewerStore:
    """Reads the output and input streams of every shard and the labels stream; writes labels only."""

    def __init__(
        self,
        client: Any,
        input_streams: Sequence[str],
        output_streams: Sequence[str],
        labels_stream: str,
    ) -> None:
        if len(input_streams) != len(output_streams) or not input_streams:
            raise ValueError(
                f"expected one input and one output stream per shard, found {len(input_streams)} input "
                f"and {len(output_streams)} output streams"
            )
        self.client = client
        self.input_streams = list(input_streams)
        self.output_streams = list(output_streams)
        self.labels_stream = labels_stream

    @classmethod
    def from_settings(cls, client: Any, settings: StreamSettings) -> ViewerStore:
        """The streams of every shard of a deployment (`images:{i}`, `anomalies:{i}` with N shards)."""
        return cls(
            client,
            settings.every_shard(settings.input_stream),
            settings.every_shard(settings.output_stream),
            settings.labels_stream,
        )

    @property
    def shards(self) -> int:
        """How many shards the store reads."""
        return len(self.output_streams)

    def per_shard(self) -> int:
        """Output entries read from each shard for a page: the page's LATEST from each (so the newest
        LATEST overall are exact), and SCAN in all when there are few shards (the model filter's window)."""
        return max(LATEST, math.ceil(SCAN / self.shards))

    def recent(self, per_shard: int | None = None) -> list[Anomaly]:
        """The newest alerts of every shard, merged newest first: at most `per_shard` of each,
        read in one round trip."""
        count = self.per_shard() if per_shard is None else per_shard
        pipe = self.client.pipeline(transaction=False)
        for stream in self.output_streams:
            pipe.xrevrange(stream, count=count)
        replies = pipe.execute()
        anomalies = [
            Anomaly.from_entry(entry_id, fields, shard)
            for shard, entries in enumerate(replies)
            for entry_id, fields in entries
        ]
        # Entry ids are times: one order across shards. An id Redis wrote always parses.
        anomalies.sort(key=lambda a: (entry_id_key(a.entry_id) or (0, 0), -a.shard), reverse=True)
        return anomalies

    def alert(self, shard: int, entry_id: str) -> Anomaly | None:
        """The alert with this full entry id in the output stream of `shard`, if it exists."""
        if not 0 <= shard < self.shards or entry_id_key(entry_id) is None:
            return None
        found = self.client.xrange(self.output_streams[shard], min=entry_id, max=entry_id, count=1)
        if not found or entry_id_key(_text(found[0][0])) != entry_id_key(entry_id):
            return None
        return Anomaly.from_entry(found[0][0], found[0][1], shard)

    def alert_of(self, source_id: str, shard: int | None = None) -> Anomaly | None:
        """The newest alert for input entry `source_id` among the entries a page reads (of one
        shard, or of every shard); None when there is none."""
        if entry_id_key(source_id) is None:
            return None
        if shard is not None:
            if not 0 <= shard < self.shards:
                return None
            entries = self.client.xrevrange(self.output_streams[shard], count=SCAN)
            candidates = [Anomaly.from_entry(entry_id, fields, shard) for entry_id, fields in entries]
        else:
            candidates = self.recent()
        return next((a for a in candidates if a.source_id == source_id), None)

    def original(self, shard: int, source_id: str) -> tuple[bytes, Mapping[bytes, bytes]] | None:
        """The input entry `source_id` (a full entry id) of `shard`, while the input stream still
        holds it."""
        key = entry_id_key(source_id)
        if key is None or not 0 <= shard < self.shards:
            return None
        found = self.client.xrange(self.input_streams[shard], min=source_id, max=source_id, count=1)
        if not found:
            return None
        entry_id, fields = found[0]
        raw_id = entry_id if isinstance(entry_id, bytes) else str(entry_id).encode()
        return (raw_id, fields) if entry_id_key(_text(entry_id)) == key else None

    def labels(self) -> dict[tuple[int | None, str], Label]:
        """The latest label per (shard, source_id) among the last LABELS_SCAN label entries."""
        entries = list(reversed(self.client.xrevrange(self.labels_stream, count=LABELS_SCAN)))
        return {(label.shard, label.source_id): label for label in latest_labels(entries).labels}

    def add_label(self, label: Label) -> str:
        """XADD the label; returns its entry id."""
        return _text(self.client.xadd(self.labels_stream, label.fields()))
