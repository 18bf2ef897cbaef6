"""Settings: ANOMALY_* environment variables, CLI flags win, bad values fail naming the variable."""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydantic import ValidationError

from runtime.cli import explain, load_settings
from runtime.settings import WorkerSettings
from worker.cli import build_parser


def test_defaults_match_the_documented_contract(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(__import__("os").environ):
        if name.startswith("ANOMALY_"):
            monkeypatch.delenv(name)
    s = WorkerSettings()
    assert s.redis_url.get_secret_value() == "redis://localhost:6379/0"
    assert (s.input_stream, s.output_stream, s.dead_letter_stream) == (
        "images",
        "anomalies",
        "images:dead-letter",
    )
    assert (s.group, s.batch_size, s.start_id, s.scores_stream) == ("anomaly-scorer", 256, "0", "")
    assert "-" in s.consumer  # hostname-pid


def test_environment_variables_use_the_anomaly_prefix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ANOMALY_BATCH_SIZE", "32")
    monkeypatch.setenv("ANOMALY_INPUT_STREAM", "cams")
    monkeypatch.setenv("ANOMALY_START_ID", "$")
    s = WorkerSettings()
    assert (s.batch_size, s.input_stream, s.start_id) == (32, "cams", "$")


def test_cli_flags_override_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ANOMALY_BATCH_SIZE", "32")
    s = load_settings(WorkerSettings, build_parser().parse_args(["--batch-size", "64", "--group", "g2"]))
    assert (s.batch_size, s.group) == (64, "g2")


@pytest.mark.parametrize(
    ("env", "value", "message"),
    [
        ("ANOMALY_BATCH_SIZE", "zero", "invalid setting ANOMALY_BATCH_SIZE"),
        (
            "ANOMALY_BATCH_SIZE",
            "0",
            "invalid setting ANOMALY_BATCH_SIZE: Input should be greater than or equal to 1",
        ),
        ("ANOMALY_REDIS_URL", "http://x", "invalid setting ANOMALY_REDIS_URL: Value error, scheme 'http'"),
        ("ANOMALY_START_ID", "latest", "invalid setting ANOMALY_START_ID"),
        ("ANOMALY_THRESHOLD", "p200", "invalid setting ANOMALY_THRESHOLD"),
        ("ANOMALY_LOG_LEVEL", "LOUD", "invalid setting ANOMALY_LOG_LEVEL"),
        ("ANOMALY_METRICS_PORT", "70000", "invalid setting ANOMALY_METRICS_PORT"),
    ],
)
def test_invalid_setting_fails_naming_the_variable(
    monkeypatch: pytest.MonkeyPatch, env: str, value: str, message: str
) -> None:
    monkeypatch.setenv(env, value)
    with pytest.raises(ValidationError) as info:
        WorkerSettings()
    assert message in explain(info.value, WorkerSettings)


def test_invalid_redis_url_is_not_echoed_because_it_may_hold_a_password(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("ANOMALY_REDIS_URL", "http://user:hunter2@host")
    with pytest.raises(ValidationError) as info:
        WorkerSettings()
    assert "hunter2" not in explain(info.value, WorkerSettings)


def test_streams_must_differ() -> None:
    with pytest.raises(ValidationError, match="must differ"):
        WorkerSettings(output_stream="images")


def test_unknown_field_in_code_or_config_is_refused() -> None:
    with pytest.raises(ValidationError, match="batchsize"):
        WorkerSettings(batchsize=3)  # type: ignore[call-arg]


def test_password_never_appears_in_the_log_summary(tmp_path: Path) -> None:
    s = WorkerSettings(redis_url="rediss://worker:s3cret@redis:6380/0")  # type: ignore[arg-type]
    assert "s3cret" not in s.summary() and "worker:***@redis:6380" in s.summary()
    assert "s3cret" not in repr(s)


def test_password_file_is_read_without_trailing_newline(tmp_path: Path) -> None:
    secret = tmp_path / "password"
    secret.write_text("s3cret\n")
    assert WorkerSettings(redis_password_file=secret).redis_password() == "s3cret"


def test_help_lists_a_flag_for_every_setting() -> None:
    text = build_parser().format_help()
    for name in WorkerSettings.model_fields:
        assert "--" + name.replace("_", "-") in text
        assert f"ANOMALY_{name.upper()}" in text


def test_misspelt_variable_is_reported_with_a_suggestion() -> None:
    from runtime.settings import KNOWN_VARIABLES, unknown_variables

    found = unknown_variables(
        {"ANOMALY_BATCHSIZE": "8", "ANOMALY_DATA_DIR": "/d", "ANOMALY_GROUP": "g", "HOME": "/"},
        KNOWN_VARIABLES,
    )
    assert found == ["unknown setting ANOMALY_BATCHSIZE; did you mean ANOMALY_BATCH_SIZE?"]


def test_artifact_outside_the_configured_root_is_refused(tmp_path: Path) -> None:
    root, elsewhere = tmp_path / "artifacts", tmp_path / "elsewhere"
    (root / "model").mkdir(parents=True)
    elsewhere.mkdir()
    (root / "link").symlink_to(elsewhere)
    assert WorkerSettings(artifact=root / "model", artifact_root=root).artifact == root / "model"
    for bad in (root / "link", root / ".." / "elsewhere"):
        with pytest.raises(ValidationError, match="outside ANOMALY_ARTIFACT_ROOT"):
            WorkerSettings(artifact=bad, artifact_root=root)


def test_a_password_in_the_urls_query_never_reaches_the_log_summary() -> None:
    s = WorkerSettings(redis_url="redis://redis:6379/0?password=s3cret&socket_timeout=5")  # type: ignore[arg-type]
    assert "s3cret" not in s.summary()
    assert "redis://redis:6379/0?password=***&socket_timeout=5" in s.summary()


def test_every_cli_answers_version_and_the_worker_names_its_artifacts_model(capsys, monkeypatch) -> None:
    from notify.cli import build_parser as notify_parser
    from producer.cli import build_parser as producer_parser
    from runtime.version import package_version
    from tools.compare import build_parser as compare_parser
    from tools.dlq import build_parser as dlq_parser
    from trainer.cli import build_parser as trainer_parser
    from viewer.cli import build_parser as viewer_parser

    artifact = Path(__file__).parents[1] / "fixtures" / "artifact-1.2" / "artifact"
    monkeypatch.setenv("ANOMALY_ARTIFACT", str(artifact))
    parsers = (build_parser(), viewer_parser(), trainer_parser(), producer_parser(), compare_parser())
    for parser in (*parsers, dlq_parser(), notify_parser()):
        with pytest.raises(SystemExit) as done:
            parser.parse_args(["--version"])
        assert done.value.code == 0
        out = capsys.readouterr().out
        assert out.startswith(f"{parser.prog} {package_version()}\n")
        if parser.prog in ("anomaly-worker", "anomaly-viewer"):
            assert "model_version=7d31431e51955ec5 schema=1.2" in out


def test_build_info_names_the_package_version() -> None:
    from prometheus_client import CollectorRegistry

    from runtime.version import package_version
    from worker.metrics import WorkerMetrics

    registry = CollectorRegistry()
    WorkerMetrics(registry, with_process=False)
    labels = {"version": package_version(), "python": __import__("platform").python_version()}
    assert registry.get_sample_value("anomaly_build_info", labels) == 1


# ------------------------------------------------------------------- switches on every command line
CLI_PARSERS = (
    "trainer.cli",
    "worker.cli",
    "viewer.cli",
    "notify.cli",
    "producer.cli",
    "tools.compare",
    "tools.dlq",
)


def _options(parser: argparse.ArgumentParser) -> Iterator[argparse.Action]:
    """Every option of `parser` and of its subcommands."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from _options(sub)
        elif action.option_strings:
            yield action


@pytest.mark.parametrize("module", CLI_PARSERS)
def test_every_switch_that_can_be_turned_off_is_spelled_flag_and_no_flag(module: str) -> None:
    parser = importlib.import_module(module).build_parser()
    negatives = [
        option
        for action in _options(parser)
        if not isinstance(action, argparse.BooleanOptionalAction)
        for option in action.option_strings
        if option.startswith("--no-")
    ]
    assert negatives == [], f"{module}: a --no-x without its --x (use BooleanOptionalAction)"
