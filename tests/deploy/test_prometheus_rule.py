"""deploy/k8s/prometheusrule.yaml is deploy/prometheus/rules.yml as a PrometheusRule: the committed
file is deploy/k8s/prometheus_rule.py's output and carries exactly the groups of rules.yml."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from .conftest import K8S, PROMETHEUS, k8s_object, load_yaml, require_tool, run
from .conftest import prometheus_rule_generator as generator

RULE_FILE = K8S / "prometheusrule.yaml"


def test_committed_prometheus_rule_is_the_generators_output() -> None:
    done = subprocess.run(
        [sys.executable, str(K8S / "prometheus_rule.py")], capture_output=True, text=True, check=True
    )
    assert RULE_FILE.read_text(encoding="utf-8") == done.stdout, (
        "deploy/k8s/prometheusrule.yaml differs from rules.yml: "
        "python deploy/k8s/prometheus_rule.py > deploy/k8s/prometheusrule.yaml"
    )


def test_prometheus_rule_carries_exactly_the_groups_of_rules_yml() -> None:
    rule = k8s_object("PrometheusRule")
    assert rule["spec"] == {"groups": load_yaml(PROMETHEUS / "rules.yml")["groups"]}


def test_a_changed_rule_changes_the_generated_file() -> None:
    """What makes the committed-output test fail when rules.yml moves on without it."""
    text = (PROMETHEUS / "rules.yml").read_text(encoding="utf-8")
    changed = text.replace("for: 2m", "for: 3m", 1)
    assert changed != text
    rule = yaml.safe_load(generator().prometheus_rule(changed))
    assert rule["spec"]["groups"] == yaml.safe_load(changed)["groups"]
    assert generator().prometheus_rule(changed) != RULE_FILE.read_text(encoding="utf-8")


def test_generator_refuses_a_rule_file_with_more_than_groups() -> None:
    with pytest.raises(ValueError, match="holds groups only"):
        generator().prometheus_rule("groups: []\nnamespace: x\n")


@pytest.mark.deploy
def test_promtool_accepts_the_rules_of_the_prometheus_rule(tmp_path: Path) -> None:
    """The operator hands spec to Prometheus as a rule file: promtool reads it as one."""
    promtool = require_tool("promtool", "apt-get install prometheus")
    rule_file = tmp_path / "from-prometheusrule.yml"
    rule_file.write_text(yaml.safe_dump(k8s_object("PrometheusRule")["spec"], sort_keys=False))
    result = run([promtool, "check", "rules", str(rule_file)])
    assert result.returncode == 0, result.stdout + result.stderr
