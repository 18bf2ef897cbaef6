"""anomaly-dlq: look at, redrive and purge the worker's dead letters, on every shard.

    anomaly-dlq list                          reason codes counted, the newest entries with their reasons
    anomaly-dlq show ID                       one dead letter, every field
    anomaly-dlq redrive --reason CODE [--apply]   back on the input stream, with the original fields
    anomaly-dlq purge --older-than 7d [--apply]   delete them

With ANOMALY_SHARDS=N every shard's dead-letter stream is read (`images:dead-letter:{i}`), and a
redriven entry goes back to its own shard's input stream (`images:{i}`). `redrive` and `purge`
only print what they would do unless given --apply.

A redrive is exactly once: one Lua script per entry checks that the dead letter is still there,
XADDs its original fields (contract.dead_letters: the worker's fields dropped, `original:<name>`
restored) to the input stream and XDELs it, atomically. Killed at any moment, the tool has moved
each entry wholly or not at all; run again, it finds only what is left.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import redis

from contract.dead_letters import original_fields
from runtime.cli import (
    SettingsRefused,
    add_settings_flags,
    add_version_flag,
    configure_logging,
    load_settings,
    refuse,
)
from runtime.connection import make_redis
from runtime.settings import StreamSettings

PROG = "anomaly-dlq"
EXIT_FAILED = 1  # no such dead letter, or Redis refused; 2 (runtime.cli.EXIT_CONFIG): a setting or flag
PAGE = 1000
# Settings of the shared base that have nothing to do with dead letters: no flags for them.
UNUSED_SETTINGS = ("output_stream", "scores_stream", "labels_stream")

# KEYS[1]: a shard's dead-letter stream, KEYS[2]: the same shard's input stream; ARGV[1]: the dead
# letter's id, ARGV[2..]: the original entry's fields (name, value, ...). One script, so a crash
# never leaves an entry both redriven and still dead, nor deleted and not redriven; an entry
# already gone (redriven or purged by an earlier run) is left alone: false.
REDRIVE_SCRIPT = """
if #redis.call('XRANGE', KEYS[1], ARGV[1], ARGV[1]) == 0 then
  return false
end
local id = redis.call('XADD', KEYS[2], '*', unpack(ARGV, 2))
redis.call('XDEL', KEYS[1], ARGV[1])
return id
"""

_DURATION = re.compile(r"(\d+(?:\.\d+)?)([smhdw])")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86_400, "w": 604_800}


# -- what a dead letter is (pure) ------------------------------------------------------------------
def _text(value: bytes | None) -> str:
    return "" if value is None else value.decode("utf-8", "replace")


@dataclass(frozen=True)
class DeadLetter:
    """One entry of one shard's dead-letter stream."""

    shard: int
    stream: str
    id: str
    fields: Mapping[bytes, bytes]

    @property
    def reason_code(self) -> str:
        return _text(self.fields.get(b"reason_code")) or "(none)"

    @property
    def reason(self) -> str:
        return _text(self.fields.get(b"reason"))

    @property
    def source_id(self) -> str:
        return _text(self.fields.get(b"source_id"))

    @property
    def failed_at_ms(self) -> int:
        """When the worker refused it: its failed_at_ms, else the time in its own id."""
        text = _text(self.fields.get(b"failed_at_ms"))
        return int(text) if text.isdigit() else int(self.id.split("-", 1)[0])

    def original(self) -> dict[bytes, bytes]:
        """The refused input entry's own fields (what a redrive puts back)."""
        return original_fields(self.fields)

    @property
    def of_the_notifier(self) -> bool:
        """A dead letter of anomaly-notify (an anomaly the receiver refused), read through
        --dead-letter-stream: it is no input entry and never goes to the input stream."""
        return b"idempotency_key" in self.fields and b"output_id" in self.fields

    def why_not_redriven(self) -> str | None:
        """Why this dead letter cannot be redriven, or None."""
        if self.of_the_notifier:
            return "a dead letter of anomaly-notify (an anomaly, not an input entry)"
        if not self.original():
            return f"no original fields to put back (reason_code {self.reason_code})"
        return None


def parse_duration(text: str) -> float:
    """'90s', '15m', '12h', '7d', '2w' -> seconds; ValueError naming what was expected."""
    match = _DURATION.fullmatch(text.strip())
    if match is None:
        raise ValueError(f"expected a duration like 90s, 15m, 12h, 7d or 2w, found {text!r}")
    return float(match.group(1)) * _UNITS[match.group(2)]


@dataclass(frozen=True)
class Selection:
    """Which dead letters a redrive or purge takes: all the given conditions hold (ids: any of them)."""

    reasons: frozenset[str] = frozenset()
    ids: frozenset[str] = frozenset()
    older_than_seconds: float | None = None

    def __bool__(self) -> bool:
        return bool(self.reasons or self.ids or self.older_than_seconds is not None)

    def matches(self, letter: DeadLetter, now_ms: int) -> bool:
        """Whether `letter` is selected at `now_ms`."""
        if self.reasons and letter.reason_code not in self.reasons:
            return False
        if self.ids and letter.id not in self.ids:
            return False
        if self.older_than_seconds is not None:
            return now_ms - letter.failed_at_ms >= self.older_than_seconds * 1000
        return True

    def describe(self) -> str:
        parts = []
        if self.reasons:
            parts.append("reason_code " + " or ".join(sorted(self.reasons)))
        if self.ids:
            parts.append("id " + " or ".join(sorted(self.ids)))
        if self.older_than_seconds is not None:
            parts.append(f"older than {self.older_than_seconds:g} s")
        return ", ".join(parts)


def reason_counts(letters: Iterable[DeadLetter]) -> dict[int, Counter[str]]:
    """Per shard, how many dead letters have each reason code."""
    counts: dict[int, Counter[str]] = {}
    for letter in letters:
        counts.setdefault(letter.shard, Counter())[letter.reason_code] += 1
    return counts


def _when(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _shown(value: bytes, limit: int = 120) -> str:
    """A field's value for people: the text if it is short printable UTF-8, else its size."""
    try:
        text = value.decode("utf-8")
    except UnicodeDecodeError:
        return f"<{len(value)} bytes>"
    if not text.isprintable() or len(text) > limit:
        return f"<{len(value)} bytes>" if not text.isprintable() else text[: limit - 1] + "…"
    return text


# -- Redis ----------------------------------------------------------------------------------------
class DeadLetters:
    """The dead-letter streams of every shard, and the redrive script."""

    def __init__(self, client: Any, settings: StreamSettings) -> None:
        self.redis = client
        self.settings = settings
        self.streams = settings.every_shard(settings.dead_letter_stream)
        self.inputs = settings.every_shard(settings.input_stream)
        self._redrive = client.register_script(REDRIVE_SCRIPT)

    def shards(self, only: int | None) -> list[int]:
        if only is None:
            return list(range(self.settings.shards))
        if not 0 <= only < self.settings.shards:
            shards = self.settings.shards
            raise ValueError(f"--shard {only}: expected 0..{shards - 1} (ANOMALY_SHARDS={shards})")
        return [only]

    def scan(self, shards: Sequence[int]) -> Iterator[DeadLetter]:
        """Every dead letter of these shards, oldest first, read in pages."""
        for shard in shards:
            stream = self.streams[shard]
            start = "-"
            while True:
                page = self.redis.xrange(stream, start, "+", count=PAGE)
                for entry_id, fields in page:
                    yield DeadLetter(shard, stream, _text(entry_id), fields)
                if len(page) < PAGE:
                    break
                start = "(" + _text(page[-1][0])

    def newest(self, shards: Sequence[int], count: int) -> list[DeadLetter]:
        """The `count` newest dead letters over these shards, newest first."""
        found = []
        for shard in shards:
            stream = self.streams[shard]
            for entry_id, fields in self.redis.xrevrange(stream, "+", "-", count=count):
                found.append(DeadLetter(shard, stream, _text(entry_id), fields))
        found.sort(key=lambda letter: tuple(int(p) for p in letter.id.split("-")), reverse=True)
        return found[:count]

    def find(self, entry_id: str, shards: Sequence[int]) -> list[DeadLetter]:
        """The dead letter with this id in each of these shards (ids are per shard)."""
        found = []
        for shard in shards:
            stream = self.streams[shard]
            for got_id, fields in self.redis.xrange(stream, entry_id, entry_id):
                found.append(DeadLetter(shard, stream, _text(got_id), fields))
        return found

    def redrive(self, letter: DeadLetter) -> str | None:
        """Move one dead letter back to its shard's input stream (exactly once); the new input
        entry's id, or None when it was no longer there."""
        flat: list[bytes] = [part for pair in letter.original().items() for part in pair]
        new_id = self._redrive(keys=[letter.stream, self.inputs[letter.shard]], args=[letter.id, *flat])
        return None if new_id is None else _text(new_id)

    def delete(self, letters: Sequence[DeadLetter]) -> int:
        """XDEL these dead letters; how many were still there."""
        deleted = 0
        by_stream: dict[str, list[str]] = {}
        for letter in letters:
            by_stream.setdefault(letter.stream, []).append(letter.id)
        for stream, ids in by_stream.items():
            for first in range(0, len(ids), PAGE):
                deleted += int(self.redis.xdel(stream, *ids[first : first + PAGE]))
        return deleted


# -- commands -------------------------------------------------------------------------------------
Out = Callable[[str], None]


def list_letters(store: DeadLetters, shards: Sequence[int], limit: int, out: Out) -> int:
    """Reason codes counted per shard, then the newest `limit` entries with their reasons."""
    counts = reason_counts(store.scan(shards))
    total = sum(sum(c.values()) for c in counts.values())
    out(f"{total} dead letters in {', '.join(store.streams[s] for s in shards)}")
    overall: Counter[str] = Counter()
    for shard in shards:
        overall.update(counts.get(shard, Counter()))
    for code, n in overall.most_common():
        per_shard = "" if len(shards) == 1 else "  (" + ", ".join(
            f"shard {s}: {counts.get(s, Counter())[code]}" for s in shards) + ")"  # fmt: skip
        out(f"  {n:>8}  {code}{per_shard}")
    newest = store.newest(shards, limit)
    if newest:
        out(f"newest {len(newest)}:")
    for letter in newest:
        out(
            f"  shard {letter.shard}  {letter.id}  {_when(letter.failed_at_ms)}  {letter.reason_code}  "
            f"source_id={letter.source_id or '-'}  {letter.reason[:160]}"
        )
    return 0


def show_letter(store: DeadLetters, entry_id: str, shards: Sequence[int], out: Out) -> int:
    """Every field of the dead letter `entry_id` (in each shard that has one by that id)."""
    found = store.find(entry_id, shards)
    if not found:
        out(f"no dead letter {entry_id} in {', '.join(store.streams[s] for s in shards)}")
        return EXIT_FAILED
    for letter in found:
        out(f"{letter.stream} {letter.id} (shard {letter.shard}, failed {_when(letter.failed_at_ms)})")
        for name, value in letter.fields.items():
            out(f"  {_text(name)}: {_shown(value, 1000 if name == b'reason' else 120)}")
        original = letter.original()
        names = ", ".join(_text(n) for n in original) or "none: the entry's data was lost"
        out(f"  redrive would put back: {names} -> {store.inputs[letter.shard]}")
    return 0


def redrive_letters(
    store: DeadLetters, selection: Selection, shards: Sequence[int], apply: bool, limit: int | None, out: Out
) -> int:
    """Put the selected dead letters back on their shards' input streams (dry run without `apply`)."""
    now_ms = int(time.time() * 1000)
    chosen = [letter for letter in store.scan(shards) if selection.matches(letter, now_ms)]
    if limit is not None:
        chosen = chosen[:limit]
    movable = [letter for letter in chosen if letter.why_not_redriven() is None]
    for letter in chosen:
        if (why := letter.why_not_redriven()) is not None:
            out(f"skip {letter.stream} {letter.id}: {why}")
    verb = "redriving" if apply else "would redrive"
    out(f"{verb} {len(movable)} dead letters ({selection.describe()})")
    moved = gone = 0
    for letter in movable:
        target = store.inputs[letter.shard]
        fields = ",".join(_text(name) for name in letter.original())
        if not apply:
            out(f"  {letter.stream} {letter.id} -> {target}  [{letter.reason_code}; fields {fields}]")
            continue
        new_id = store.redrive(letter)
        if new_id is None:
            gone += 1
            out(f"  {letter.stream} {letter.id}: no longer there (redriven or purged already), skipped")
        else:
            moved += 1
            out(f"  {letter.stream} {letter.id} -> {target} {new_id}")
    if apply:
        out(f"redriven {moved}" + (f", {gone} already gone" if gone else ""))
    else:
        out("dry run: nothing changed; add --apply to redrive")
    return 0


def purge_letters(
    store: DeadLetters, selection: Selection, shards: Sequence[int], apply: bool, out: Out
) -> int:
    """Delete the selected dead letters (dry run without `apply`)."""
    now_ms = int(time.time() * 1000)
    chosen = [letter for letter in store.scan(shards) if selection.matches(letter, now_ms)]
    by_code = Counter(letter.reason_code for letter in chosen)
    detail = ", ".join(f"{code}: {n}" for code, n in by_code.most_common())
    if not apply:
        out(
            f"would purge {len(chosen)} dead letters ({selection.describe()})"
            + (f": {detail}" if detail else "")
        )
        out("dry run: nothing changed; add --apply to purge")
        return 0
    deleted = store.delete(chosen)
    out(f"purged {deleted} dead letters ({selection.describe()})" + (f": {detail}" if detail else ""))
    return 0


# -- command line ---------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    """anomaly-dlq's commands; the connection and stream names come from ANOMALY_* (or the flags)."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Look at, redrive and purge the worker's dead letters, on every shard. The "
        "connection and the stream names are the ANOMALY_* settings every program reads (or these "
        "flags). redrive and purge print what they would do unless given --apply.",
    )
    add_settings_flags(parser, StreamSettings, exclude=UNUSED_SETTINGS)
    add_version_flag(parser)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    listing = commands.add_parser(
        "list", help="reason codes counted, and the newest entries with their reasons"
    )
    listing.add_argument("--limit", type=int, default=10, help="how many of the newest to show (default 10)")

    show = commands.add_parser("show", help="one dead letter, every field")
    show.add_argument("id", help="the dead letter's entry id, e.g. 1700000000000-0")

    redrive = commands.add_parser(
        "redrive",
        help="put chosen dead letters back on their shard's input stream, with their original fields, "
        "exactly once, and delete them from the dead-letter stream",
    )
    purge = commands.add_parser("purge", help="delete chosen dead letters")
    for command in (listing, show, redrive, purge):
        command.add_argument(
            "--shard",
            type=int,
            default=None,
            help="only this shard (default: every shard; ids are per shard)",
        )
    for command in (redrive, purge):
        command.add_argument("--reason", action="append", default=[], metavar="CODE",
                             help="those with this reason_code (repeat for several)")  # fmt: skip
        command.add_argument("--id", action="append", default=[], metavar="ID",
                             help="the dead letter with this entry id (repeat for several)")  # fmt: skip
        command.add_argument(
            "--older-than", metavar="AGE", help="refused longer ago than AGE: 90s, 15m, 12h, 7d, 2w"
        )
        command.add_argument("--apply", action="store_true", help="do it (without: print what would be done)")
    redrive.add_argument("--limit", type=int, default=None, help="at most this many, oldest first")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of anomaly-dlq."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        settings = load_settings(StreamSettings, args)
    except SettingsRefused as exc:
        return refuse(PROG, str(exc))
    configure_logging(settings)
    selection = Selection()
    if args.command in ("redrive", "purge"):
        try:
            older = None if args.older_than is None else parse_duration(args.older_than)
        except ValueError as exc:
            parser.error(f"--older-than: {exc}")
        selection = Selection(frozenset(args.reason), frozenset(args.id), older)
        if not selection:
            parser.error(f"{args.command} needs --reason, --id or --older-than (which dead letters?)")
    client = make_redis(settings, PROG)
    try:
        store = DeadLetters(client, settings)
        shards = store.shards(args.shard)
        out = print
        if args.command == "list":
            return list_letters(store, shards, args.limit, out)
        if args.command == "show":
            return show_letter(store, args.id, shards, out)
        if args.command == "redrive":
            return redrive_letters(store, selection, shards, args.apply, args.limit, out)
        return purge_letters(store, selection, shards, args.apply, out)
    except ValueError as exc:
        return refuse(PROG, str(exc))
    except redis.RedisError as exc:
        print(
            f"{PROG}: Redis at {settings.redacted_redis_url()} refused: {type(exc).__name__}: {exc}",
            file=sys.stderr,
        )
        return EXIT_FAILED
    finally:
        client.close()
