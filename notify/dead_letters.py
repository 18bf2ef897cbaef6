"""The notifier's dead-letter entry (pure): why an anomaly was not delivered, then the output entry's
own fields (a clashing name kept as `original:<name>`, as in the worker's dead letters).

Fields: reason (what the receiver or the notifier said), reason_code (refused: a 4xx or a redirect;
summary_refused: the summary it was part of was refused; bad_entry: an output entry the notifier
cannot describe; trimmed: the output entry was trimmed before it was delivered), status (the HTTP
status, empty when there was none), failed_at_ms, output_id (the output entry's id), shard,
idempotency_key (empty when the entry has no valid source_id).
"""

from __future__ import annotations

from collections.abc import Mapping

from contract.dead_letters import ORIGINAL_PREFIX

NOTIFY_DEAD_LETTER_FIELDS = (
    "reason",
    "reason_code",
    "status",
    "failed_at_ms",
    "output_id",
    "shard",
    "idempotency_key",
)
_OURS = frozenset(NOTIFY_DEAD_LETTER_FIELDS)


def dead_letter_fields(
    *,
    reason_code: str,
    reason: str,
    status: int | None,
    failed_at_ms: int,
    output_id: str,
    shard: int,
    key: str,
    original: Mapping[bytes, bytes] | None = None,
) -> dict[str | bytes, str | bytes]:
    """The dead-letter entry of one anomaly (fields in the order of NOTIFY_DEAD_LETTER_FIELDS)."""
    fields: dict[str | bytes, str | bytes] = {
        "reason": reason,
        "reason_code": reason_code,
        "status": "" if status is None else str(status),
        "failed_at_ms": str(failed_at_ms),
        "output_id": output_id,
        "shard": str(shard),
        "idempotency_key": key,
    }
    for name, value in (original or {}).items():
        text = name.decode("utf-8", "replace")
        fields[f"{ORIGINAL_PREFIX}{text}" if text in _OURS else name] = value
    return fields
