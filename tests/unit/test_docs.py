"""The README is the operators' contract: it must list every setting and every metric."""

from __future__ import annotations

from prometheus_client import CollectorRegistry

from notify.metrics import NotifyMetrics
from runtime.settings import NotifySettings, StreamSettings, WorkerSettings
from tests.conftest import ROOT
from worker.metrics import WorkerMetrics

README = (ROOT / "README.md").read_text()


def test_readme_documents_every_setting() -> None:
    missing = [
        f"ANOMALY_{n.upper()}" for n in WorkerSettings.model_fields if f"ANOMALY_{n.upper()}" not in README
    ]
    assert missing == []


def test_readme_documents_every_worker_metric() -> None:
    registry = CollectorRegistry()
    WorkerMetrics(registry, with_process=False)
    names = {m.name for m in registry.collect()}
    missing = [n for n in names if n not in README]
    assert missing == []


def test_readme_documents_every_notify_setting_and_metric() -> None:
    own = set(NotifySettings.model_fields) - set(StreamSettings.model_fields)
    assert [f"ANOMALY_{n.upper()}" for n in sorted(own) if f"`ANOMALY_{n.upper()}`" not in README] == []
    registry = CollectorRegistry()
    NotifyMetrics(registry, with_process=False)
    assert [m.name for m in registry.collect() if m.name not in README] == []


def test_readme_gives_the_two_commands() -> None:
    assert "make demo" in README and "make test" in README
