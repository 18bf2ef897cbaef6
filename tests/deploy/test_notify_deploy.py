"""anomaly-notify in deploy/: the compose service (profile notify) and the Kubernetes overlay
deploy/k8s-notify/ (the stack plus its Deployment): valid, accepted by NotifySettings, probed on
its own port, locked down like the other pods, and its Secret references resolve."""

from __future__ import annotations

import os
import re
from typing import Any

import pytest

from .conftest import DEPLOY, ENV_PREFIX, find_tool, k8s_object, load_yaml, load_yaml_documents, pod_spec, run

OVERLAY = DEPLOY / "k8s-notify"


def _clear_anomaly_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith(ENV_PREFIX):
            monkeypatch.delenv(name)


def _interpolated(value: str, given: dict[str, str]) -> str:
    """Compose's ${NAME:-default}, with `given` as the shell's variables."""
    return re.sub(r"\$\{(\w+):-([^}]*)\}", lambda m: given.get(m.group(1), m.group(2)), value)


def _overlay_objects() -> list[dict[str, Any]]:
    return [
        doc for name in ("notify.yaml", "notify-secret.yaml") for doc in load_yaml_documents(OVERLAY / name)
    ]


def _notify_deployment() -> dict[str, Any]:
    (deployment,) = [d for d in _overlay_objects() if d["kind"] == "Deployment"]
    return deployment


def _notify_container() -> dict[str, Any]:
    (container,) = pod_spec(_notify_deployment())["containers"]
    return container


def _secret() -> dict[str, str]:
    (secret,) = [d for d in _overlay_objects() if d["kind"] == "Secret"]
    return secret["stringData"]


# ---------------------------------------------------------------- compose
def test_compose_notify_starts_only_with_its_profile_and_is_accepted_by_notify_settings(
    compose: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    from runtime.settings import NotifySettings

    notify = compose["services"]["notify"]
    assert notify["profiles"] == ["notify"]  # `up` without --profile notify leaves it out
    assert notify["build"]["target"] == "notify"
    _clear_anomaly_env(monkeypatch)
    shell = {"ANOMALY_NOTIFY_WEBHOOK_URL": "https://hooks.example.com/x"}
    for name, value in notify["environment"].items():
        monkeypatch.setenv(name, _interpolated(str(value), shell))
    settings = NotifySettings()
    assert settings.notify_webhook_url is not None and settings.notify_format == "webhook"
    check = " ".join(notify["healthcheck"]["test"])
    assert f"127.0.0.1:{settings.notify_metrics_port}/healthz" in check
    grace = int(notify["stop_grace_period"].rstrip("s"))
    assert grace > settings.notify_grace_seconds


# ---------------------------------------------------------------- Kubernetes overlay
@pytest.mark.deploy
@pytest.mark.parametrize("version", ["1.28.0", "latest"])
def test_the_notify_objects_validate_against_the_kubernetes_schema(version: str) -> None:
    import kubernetes_validate

    if version == "latest":
        version = kubernetes_validate.latest_version()
    for doc in _overlay_objects():
        kubernetes_validate.validate(doc, version, strict=True)


def test_the_overlay_adds_notify_to_the_whole_stack() -> None:
    kustomization = load_yaml(OVERLAY / "kustomization.yaml")
    assert kustomization["resources"] == ["../k8s", "notify-secret.yaml", "notify.yaml"]
    assert kustomization["namespace"] == load_yaml(DEPLOY / "k8s" / "kustomization.yaml")["namespace"]


@pytest.mark.deploy
def test_kustomize_renders_the_stack_with_notify() -> None:
    kubectl, kustomize = find_tool("kubectl"), find_tool("kustomize")
    if kubectl:
        command = [kubectl, "kustomize", str(OVERLAY)]
    elif kustomize:
        command = [kustomize, "build", str(OVERLAY)]
    else:
        pytest.skip("neither kubectl nor kustomize is installed")
    result = run(command, timeout=60)
    assert result.returncode == 0, result.stderr
    names = re.findall(r"^kind: (\w+)\nmetadata:\n(?:  .*\n)*?  name: (\S+)", result.stdout, re.MULTILINE)
    assert ("Deployment", "anomaly-notify") in names and ("Deployment", "anomaly-worker") in names


def test_the_notify_pod_settings_are_accepted_by_notify_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    from runtime.settings import NotifySettings

    _clear_anomaly_env(monkeypatch)
    environment = dict(k8s_object("ConfigMap", "anomaly-worker-config")["data"])
    for item in _notify_container()["env"]:
        if "value" in item:
            environment[item["name"]] = item["value"]
        else:
            environment[item["name"]] = _secret()[item["valueFrom"]["secretKeyRef"]["key"]]
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    settings = NotifySettings()
    assert settings.notify_consumer == "anomaly-notify" and settings.notify_webhook_url is not None
    ports = {p["name"]: p["containerPort"] for p in _notify_container()["ports"]}
    assert ports["metrics"] == settings.notify_metrics_port
    assert _notify_deployment()["spec"]["template"]["metadata"]["annotations"]["prometheus.io/port"] == str(
        settings.notify_metrics_port
    )
    assert pod_spec(_notify_deployment())["terminationGracePeriodSeconds"] > settings.notify_grace_seconds


def test_one_notifier_under_one_name_replaced_not_overlapped() -> None:
    spec = _notify_deployment()["spec"]
    assert spec["replicas"] == 1 and spec["strategy"]["type"] == "Recreate"


def test_the_notify_probes_ask_healthz_and_readyz() -> None:
    container = _notify_container()
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}


def test_the_notify_pod_runs_locked_down() -> None:
    spec = pod_spec(_notify_deployment())
    assert spec["securityContext"]["runAsNonRoot"] is True and spec["securityContext"]["runAsUser"] != 0
    assert spec["automountServiceAccountToken"] is False
    context = _notify_container()["securityContext"]
    assert context["readOnlyRootFilesystem"] is True and context["allowPrivilegeEscalation"] is False
    assert context["capabilities"]["drop"] == ["ALL"]


def test_the_notify_secret_references_resolve_and_the_password_is_a_mounted_file() -> None:
    container = _notify_container()
    secret = _secret()
    for item in container["env"]:
        ref = item.get("valueFrom", {}).get("secretKeyRef")
        if ref:
            assert ref["name"] == "anomaly-notify" and ref["key"] in secret
    password_file = next(i["value"] for i in container["env"] if i["name"] == "ANOMALY_REDIS_PASSWORD_FILE")
    volumes = {v["name"]: v for v in pod_spec(_notify_deployment())["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    directory, _, file = password_file.rpartition("/")
    source = volumes[mounts[directory]]["secret"]
    assert source["secretName"] == "anomaly-notify"
    assert {"key": "redis-password", "path": file} in source["items"]
    assert secret["redis-url"].startswith("redis://anomaly-notify@")  # its own ACL user
    assert "CHANGE-ME" in secret["webhook-url"] and secret["redis-password"] == "CHANGE-ME"
