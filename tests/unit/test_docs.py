"""The README is the operators' contract: it must list every setting and every metric."""

from __future__ import annotations

from prometheus_client import CollectorRegistry

from runtime.settings import WorkerSettings
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


def test_readme_gives_the_two_commands() -> None:
    assert "make demo" in README and "make test" in README
