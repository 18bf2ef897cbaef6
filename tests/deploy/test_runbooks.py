"""Every alert links its own runbook: one section per alert in deploy/README.md ("Runbooks"), a
`runbook_url` of one base plus that section's GitHub anchor, and the two documented ways of setting
the base (sed, a kustomize overlay) rewrite every link and keep the PrometheusRule in step."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from .conftest import DEPLOY, K8S, PROMETHEUS, alerting_rules, find_tool, load_yaml, run
from .conftest import prometheus_rule_generator as generator

README = DEPLOY / "README.md"
RULE_FILES = (PROMETHEUS / "rules.yml", K8S / "prometheusrule.yaml")
NEW_BASE = "https://git.test/acme/anomaly-scorer/blob/v9.9.9/deploy/README.md"


def github_anchor(heading: str) -> str:
    """The anchor GitHub gives a heading: its text lower-cased, punctuation but - and _ dropped,
    spaces made hyphens (github-slugger)."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip())  # a link's text
    return re.sub(r"[^\w\- ]", "", text.lower()).replace(" ", "-")


def markdown_headings(text: str) -> list[tuple[int, str]]:
    """(level, text) of every ATX heading outside fenced code blocks."""
    headings, fenced = [], False
    for line in text.splitlines():
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and (match := re.match(r"(#{1,6}) (.+?)\s*#*\s*$", line)):
            headings.append((len(match.group(1)), match.group(2)))
    return headings


def anchors(text: str) -> set[str]:
    """Every heading's anchor; GitHub suffixes repeated ones with -1, -2, ..."""
    seen: dict[str, int] = {}
    found = set()
    for _, heading in markdown_headings(text):
        anchor = github_anchor(heading)
        found.add(f"{anchor}-{seen[anchor]}" if anchor in seen else anchor)
        seen[anchor] = seen.get(anchor, 0) + 1
    return found


def runbooks_section(text: str) -> str:
    """deploy/README.md's "Runbooks" section, up to the next section of its level."""
    match = re.search(r"^## Runbooks\n(.*?)(?=^## |\Z)", text, re.M | re.S)
    assert match, "deploy/README.md has no '## Runbooks' section"
    return match.group(1)


def documented_base() -> str:
    """The runbook_url base the Runbooks section names (its first link, without the anchor)."""
    match = re.search(r"https://\S+?#", runbooks_section(README.read_text(encoding="utf-8")))
    assert match, "the Runbooks section shows no runbook link"
    return match.group(0)[:-1]


def runbook_urls(rule_file: Path) -> dict[str, str]:
    """Alert name -> its runbook_url, from a rule file or a PrometheusRule."""
    doc = load_yaml(rule_file)
    groups = doc["spec"]["groups"] if "spec" in doc else doc["groups"]
    return {
        rule["alert"]: rule.get("annotations", {}).get("runbook_url", "")
        for group in groups
        for rule in group["rules"]
        if "alert" in rule
    }


def test_anchors_follow_githubs_rules() -> None:
    assert github_anchor("What to alert on, and why") == "what-to-alert-on-and-why"
    assert github_anchor("The operator's loop: `anomaly-viewer`, labels, `retune`") == (
        "the-operators-loop-anomaly-viewer-labels-retune"
    )
    assert github_anchor("AnomalyWorkerDown") == "anomalyworkerdown"
    assert anchors("# A\n```\n# not a heading\n```\n## A\n") == {"a", "a-1"}


def test_the_base_is_a_url_of_this_file_that_cannot_resolve_by_accident() -> None:
    base = urlsplit(documented_base())
    assert base.scheme == "https" and base.path.endswith("/deploy/README.md") and not base.fragment
    # Reserved by RFC 6761 to never resolve: an unset base fails visibly, it opens nobody's page.
    assert base.hostname is not None and base.hostname.endswith(".invalid")


@pytest.mark.parametrize("rule_file", RULE_FILES, ids=lambda p: p.name)
def test_every_alert_links_its_own_runbook_section(rule_file: Path) -> None:
    text = README.read_text(encoding="utf-8")
    headings = anchors(text)
    urls = runbook_urls(rule_file)
    assert set(urls) == {rule["alert"] for rule in alerting_rules()}
    for alert, url in urls.items():
        assert url == f"{documented_base()}#{github_anchor(alert)}", f"{alert}: runbook_url {url!r}"
        assert urlsplit(url).fragment in headings, f"{alert}: no heading of deploy/README.md has its anchor"


def test_one_runbook_section_per_alert() -> None:
    sections = [h for level, h in markdown_headings(runbooks_section(README.read_text())) if level == 3]
    assert sorted(sections) == sorted(rule["alert"] for rule in alerting_rules())
    for section in re.split(r"^### ", runbooks_section(README.read_text()), flags=re.M)[1:]:
        name = section.split("\n", 1)[0]
        for part in ("**Means.**", "**Check first.**", "**Fix.**"):
            assert part in section, f"the runbook of {name} has no {part}"


def test_every_link_within_deploy_readme_names_a_heading() -> None:
    text = README.read_text(encoding="utf-8")
    links = set(re.findall(r"\]\(#([^)]+)\)", text))
    assert links, "no in-page links found"
    assert not links - anchors(text), f"links to missing headings: {sorted(links - anchors(text))}"


def _sed_line() -> tuple[str, str, list[str]]:
    """(old, new, files) of the documented `sed -i 's|old|new|' files` command."""
    section = runbooks_section(README.read_text(encoding="utf-8")).replace("\\\n", " ")
    match = re.search(r"sed -i 's\|([^|]+)\|([^|]+)\|' +([^\n]+)", section)
    assert match, "the Runbooks section shows no sed command"
    return match.group(1), match.group(2), match.group(3).split()


def test_the_documented_sed_sets_every_link_and_keeps_the_prometheus_rule_in_step() -> None:
    old, new, files = _sed_line()
    assert old == documented_base()
    assert [DEPLOY.parent / f for f in files] == list(RULE_FILES)
    rules, rule = (p.read_text(encoding="utf-8").replace(old, new) for p in RULE_FILES)
    assert generator().prometheus_rule(rules) == rule, "after the sed, the generator's check still passes"
    for text in (rules, rule):
        doc = yaml.safe_load(text)
        groups = doc["spec"]["groups"] if "spec" in doc else doc["groups"]
        links = [r["annotations"]["runbook_url"] for g in groups for r in g["rules"] if "alert" in r]
        assert links and all(link.startswith(new + "#") for link in links)


def _overlay_snippet() -> dict[str, Any]:
    """The kustomize overlay fragment of the Runbooks section."""
    blocks = re.findall(r"```yaml\n(.*?)```", runbooks_section(README.read_text(encoding="utf-8")), re.S)
    (snippet,) = [b for b in blocks if "replacements:" in b]
    return yaml.safe_load(snippet)


@pytest.mark.deploy
def test_the_documented_overlay_rewrites_every_runbook_url(tmp_path: Path) -> None:
    kubectl, kustomize = find_tool("kubectl"), find_tool("kustomize")
    if not kubectl and not kustomize:
        pytest.skip("neither kubectl nor kustomize is installed")
    overlay = _overlay_snippet()
    (literal,) = overlay["configMapGenerator"][0]["literals"]
    key = literal.split("=", 1)[0]
    overlay["configMapGenerator"][0]["literals"] = [f"{key}={NEW_BASE}"]
    overlay["resources"] = [os.path.relpath(K8S, tmp_path)]
    (tmp_path / "kustomization.yaml").write_text(yaml.safe_dump(overlay))
    command = [kubectl, "kustomize", str(tmp_path)] if kubectl else [str(kustomize), "build", str(tmp_path)]
    result = run(command)
    assert result.returncode == 0, result.stderr
    rendered = [d for d in yaml.safe_load_all(result.stdout) if d]
    (rule,) = [d for d in rendered if d["kind"] == "PrometheusRule"]
    links = {
        r["alert"]: r["annotations"]["runbook_url"]
        for g in rule["spec"]["groups"]
        for r in g["rules"]
        if "alert" in r
    }
    assert links == {alert: f"{NEW_BASE}#{github_anchor(alert)}" for alert in links}
    assert set(links) == {r["alert"] for r in alerting_rules()}
    names = {d["metadata"]["name"] for d in rendered if d["kind"] == "ConfigMap"}
    assert overlay["configMapGenerator"][0]["name"] not in names, "the local-config source is never applied"


def test_the_alert_table_lists_every_alert_with_a_link_to_its_runbook() -> None:
    text = README.read_text(encoding="utf-8")
    rows = re.findall(r"^\| \[`(Anomaly\w+)`\]\(#(\w+)\)", text, re.M)
    assert sorted(name for name, _ in rows) == sorted(rule["alert"] for rule in alerting_rules())
    assert all(anchor == github_anchor(name) for name, anchor in rows)
