"""Log lines a machine can read: logfmt (the default) or JSON, one line per record, in every program.

Call sites keep the project's style, a message and key=%s placeholders:

    log.info("reloaded old_model_version=%s model_version=%s threshold=%.6g", old, new, t)

The formatters read the fields from the format string and its arguments, so a value with spaces is
one quoted value, not three words: `ts=... level=info logger=worker.runner msg=reloaded
old_model_version=a1 model_version=b2 threshold=0.31`. Fields can also be given whole, as
`extra={"fields": {...}}`. A traceback is one escaped value (`exc=...`), never lines of its own.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import re
import sys
from collections.abc import Mapping
from typing import Any, Literal

LogFormat = Literal["logfmt", "json"]
LOG_FORMATS: tuple[LogFormat, ...] = ("logfmt", "json")
# A `key=%s`-style field in a format string: the key, and the printf conversion of its value.
_FIELD = re.compile(r"(?<![\w.])([A-Za-z_][\w.]*)=(%[-#0 +]*(?:\d+|\*)?(?:\.\d+)?[sdiufFeEgGxXoc%r])")
_CONVERSION = re.compile(r"%[-#0 +]*(?:\d+|\*)?(?:\.\d+)?[sdiufFeEgGxXocr%]")
_RESERVED = ("ts", "level", "logger", "msg", "exc")


def split_fields(record: logging.LogRecord) -> tuple[str, dict[str, Any]]:
    """The record's message without its key=value fields, and those fields with their values."""
    fields: dict[str, Any] = {}
    template = record.msg if isinstance(record.msg, str) else str(record.msg)
    args = record.args if isinstance(record.args, tuple) else ((record.args,) if record.args else ())
    try:
        message, fields = _parse(template, args)
    except (TypeError, ValueError, IndexError):  # a format the parser does not follow: the whole line
        message, fields = record.getMessage(), {}
    extra = getattr(record, "fields", None)
    if isinstance(extra, Mapping):
        fields.update({str(k): v for k, v in extra.items()})
    return message.strip(), fields


def _parse(template: str, args: tuple[Any, ...]) -> tuple[str, dict[str, Any]]:
    fields: dict[str, Any] = {}
    text: list[str] = []
    text_args: list[Any] = []
    position = 0  # in the template
    used = 0  # arguments consumed
    for match in _FIELD.finditer(template):
        literal = template[position : match.start()]
        used = _take_literal(literal, args, used, text, text_args)
        conversion = match.group(2)
        if conversion == "%%":
            text.append(match.group(0))
        else:
            fields[match.group(1)] = conversion % (args[used],)
            used += 1
        position = match.end()
    used = _take_literal(template[position:], args, used, text, text_args)
    if used != len(args):
        raise ValueError(f"{len(args)} arguments for {used} placeholders")
    message = "".join(text)
    message = message % tuple(text_args) if text_args or "%" in message else message
    # Punctuation left where fields were cut out ("error=%s; retrying") reads better trimmed.
    message = re.sub(r"\s+([;,])", r"\1", re.sub(r"\s+", " ", message)).strip(" ;,")
    return message, fields


def _take_literal(
    literal: str, args: tuple[Any, ...], used: int, text: list[str], text_args: list[Any]
) -> int:
    for conversion in _CONVERSION.findall(literal):
        if conversion != "%%":
            text_args.append(args[used])
            used += 1
    text.append(literal)
    return used


def _value(value: Any) -> str:
    text = value if isinstance(value, str) else str(value)
    if text and not any(c in text for c in ' ="\\\n\r\t') and text.isprintable():
        return text
    escaped = text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\r", "\\r")
    return f'"{escaped.replace(chr(9), chr(92) + "t")}"'


def _timestamp(record: logging.LogRecord) -> str:
    when = dt.datetime.fromtimestamp(record.created, dt.UTC)
    return when.strftime("%Y-%m-%dT%H:%M:%S.") + f"{int(record.msecs):03d}Z"


class LogfmtFormatter(logging.Formatter):
    """ts=... level=... logger=... msg=... key=value ..., every value quoted where it must be."""

    def format(self, record: logging.LogRecord) -> str:
        """One logfmt line."""
        message, fields = split_fields(record)
        pairs = [("ts", _timestamp(record)), ("level", record.levelname.lower()), ("logger", record.name)]
        pairs.append(("msg", message))
        pairs.extend((_safe_key(key), value) for key, value in fields.items())
        if record.exc_info:
            pairs.append(("exc", self.formatException(record.exc_info)))
        return " ".join(f"{key}={_value(value)}" for key, value in pairs)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, msg, the fields, and exc for a traceback."""

    def format(self, record: logging.LogRecord) -> str:
        """One JSON line."""
        message, fields = split_fields(record)
        line: dict[str, Any] = {
            "ts": _timestamp(record),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": message,
        }
        line.update({_safe_key(key): _jsonable(value) for key, value in fields.items()})
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return json.dumps(line, ensure_ascii=False, default=str)


def _safe_key(key: str) -> str:
    return f"field.{key}" if key in _RESERVED else key


def _jsonable(value: Any) -> Any:
    return value if isinstance(value, str | int | float | bool) or value is None else str(value)


class _StderrHandler(logging.StreamHandler):
    """The handler `configure` installs (and replaces when called again; others are left alone)."""


def configure(level: str, log_format: LogFormat = "logfmt") -> None:
    """Every record of the process to stderr, at `level`, in `log_format`."""
    handler = _StderrHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format == "json" else LogfmtFormatter())
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _StderrHandler)]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
