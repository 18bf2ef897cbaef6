"""Log lines a machine can read: logfmt that Loki, Vector and Fluent Bit split right, or JSON."""

from __future__ import annotations

import json
import logging
import re

import pytest

from runtime.logs import JsonFormatter, LogfmtFormatter, split_fields

# A logfmt reader as Loki's `| logfmt` reads: key=value, or key="quoted \" value".
PAIR = re.compile(r'([\w.]+)=("(?:[^"\\]|\\.)*"|\S*)')


def parse_logfmt(line: str) -> dict[str, str]:
    fields = {}
    for key, raw in PAIR.findall(line):
        fields[key] = json.loads(raw) if raw.startswith('"') else raw
    assert " ".join(f"{k}={v}" for k, v in PAIR.findall(line)) == line, "text outside key=value pairs"
    return fields


def record(msg: str, *args: object, exc: bool = False, **extra: object) -> logging.LogRecord:
    info = None
    if exc:
        try:
            raise ValueError("bad\nthing")
        except ValueError:
            import sys

            info = sys.exc_info()
    made = logging.LogRecord("worker.runner", logging.WARNING, __file__, 1, msg, args, info)
    for key, value in extra.items():
        setattr(made, key, value)
    return made


def test_fields_come_from_the_format_string_so_values_with_spaces_stay_whole() -> None:
    line = LogfmtFormatter().format(
        record("redis %s error=%s; retrying with backoff", "lost", "Connection refused by 10.0.0.1:6379")
    )
    fields = parse_logfmt(line)
    assert fields["msg"] == "redis lost; retrying with backoff"
    assert fields["error"] == "Connection refused by 10.0.0.1:6379"
    assert (fields["level"], fields["logger"]) == ("warning", "worker.runner")
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", fields["ts"])


def test_printf_conversions_of_fields_are_kept() -> None:
    message, fields = split_fields(
        record("reloaded model_version=%s threshold=%.6g count=%d", "b2", 0.123456789, 7)
    )
    assert message == "reloaded"
    assert fields == {"model_version": "b2", "threshold": "0.123457", "count": "7"}


@pytest.mark.parametrize(
    "value", ['say "hi"', "back\\slash", "two\nlines", "", "tab\there", "key=value", "ünïcode ok"]
)
def test_awkward_values_round_trip_through_a_logfmt_reader(value: str) -> None:
    assert parse_logfmt(LogfmtFormatter().format(record("event error=%s", value)))["error"] == value


def test_a_traceback_is_one_escaped_value_not_lines_of_its_own() -> None:
    for formatter in (LogfmtFormatter(), JsonFormatter()):
        line = formatter.format(record("batch failed error=%s", "x", exc=True))
        assert "\n" not in line
    fields = parse_logfmt(LogfmtFormatter().format(record("batch failed error=%s", "x", exc=True)))
    assert fields["exc"].startswith("Traceback") and "ValueError: bad\nthing" in fields["exc"]


def test_json_lines_carry_ts_level_logger_msg_and_the_fields() -> None:
    line = json.loads(
        JsonFormatter().format(record("stop requested signal=%s grace_seconds=%g", "SIGTERM", 20.0))
    )
    assert line.keys() >= {"ts", "level", "logger", "msg", "signal", "grace_seconds"}
    assert (line["msg"], line["signal"], line["grace_seconds"]) == ("stop requested", "SIGTERM", "20")


def test_fields_given_whole_join_those_of_the_format_string_and_never_clobber_the_envelope() -> None:
    made = record("starting consumer=%s", "w1", fields={"batch_size": 256, "msg": "sneaky"})
    line = json.loads(JsonFormatter().format(made))
    assert (line["msg"], line["consumer"], line["batch_size"], line["field.msg"]) == (
        "starting",
        "w1",
        256,
        "sneaky",
    )


def test_a_message_the_parser_cannot_follow_is_logged_whole() -> None:
    message, fields = split_fields(record("odd %(name)s mapping", {"name": "x"}))
    assert (message, fields) == ("odd x mapping", {})
