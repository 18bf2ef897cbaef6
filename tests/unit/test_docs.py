"""The reference pages are the operators' contract: every setting, every metric and every trainer
flag is documented there, and the README still gives the two commands."""

from __future__ import annotations

import argparse

from prometheus_client import CollectorRegistry

from notify.metrics import NotifyMetrics
from runtime.settings import NotifySettings, StreamSettings, ViewerSettings, WorkerSettings
from tests.conftest import ROOT
from trainer.cli import build_parser
from worker.metrics import WorkerMetrics

README = (ROOT / "README.md").read_text()
REFERENCE = ROOT / "docs" / "reference"
SETTINGS = (REFERENCE / "settings.md").read_text()
METRICS = (REFERENCE / "metrics.md").read_text()
TRAINER = (REFERENCE / "trainer.md").read_text()


def test_settings_reference_documents_every_worker_setting() -> None:
    names = [f"ANOMALY_{n.upper()}" for n in WorkerSettings.model_fields]
    assert [n for n in names if f"`{n}`" not in SETTINGS] == []


def test_settings_reference_documents_every_notify_and_viewer_setting() -> None:
    own = set(NotifySettings.model_fields) | set(ViewerSettings.model_fields)
    own -= set(StreamSettings.model_fields)
    assert [f"ANOMALY_{n.upper()}" for n in sorted(own) if f"`ANOMALY_{n.upper()}`" not in SETTINGS] == []


def test_metrics_reference_documents_every_worker_metric() -> None:
    registry = CollectorRegistry()
    WorkerMetrics(registry, with_process=False)
    missing = [m.name for m in registry.collect() if m.name not in METRICS]
    assert missing == []


def test_metrics_reference_documents_every_notify_metric() -> None:
    registry = CollectorRegistry()
    NotifyMetrics(registry, with_process=False)
    assert [m.name for m in registry.collect() if m.name not in METRICS] == []


def subcommand_parsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    """Each subcommand's parser of `anomaly-trainer`, by name."""
    found: dict[str, argparse.ArgumentParser] = {}
    for action in parser._actions:  # argparse keeps its subparsers nowhere public
        if isinstance(action, argparse._SubParsersAction):
            found.update(action.choices)
    return found


def test_trainer_reference_documents_every_option_of_every_subcommand() -> None:
    parsers = subcommand_parsers(build_parser())
    assert {"train", "evaluate", "report", "benchmark", "retune"} <= set(parsers)
    missing = [
        f"{name} {option}"
        for name, parser in sorted(parsers.items())
        for action in parser._actions
        for option in action.option_strings
        if option not in ("-h", "--help") and f"`{option}" not in TRAINER
    ]
    assert missing == []


def test_readme_gives_the_two_commands() -> None:
    assert "make demo" in README and "make test" in README


def test_readme_keeps_a_reliability_section_that_links_operations() -> None:
    assert "## Reliability" in README and "docs/operations.md#reliability" in README
