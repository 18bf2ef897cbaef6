"""Settings names in deploy files are fields of runtime.settings.WorkerSettings, so they cannot drift."""

from __future__ import annotations

from typing import Any

import pytest

from .conftest import (
    ENV_PREFIX,
    container_env_names,
    env_assignments,
    instructions_of,
    k8s_object,
    pod_spec,
)


def _prefixed(names: set[str] | dict[str, Any]) -> set[str]:
    return {name for name in names if name.startswith(ENV_PREFIX)}


def _worker_container() -> dict[str, Any]:
    return pod_spec(k8s_object("Deployment", "anomaly-worker"))["containers"][0]


def _compose_worker_env(compose: dict[str, Any]) -> dict[str, str]:
    return {k: str(v) for k, v in compose["services"]["worker"]["environment"].items()}


def _dockerfile_worker_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for keyword, args in instructions_of("worker"):
        if keyword == "ENV":
            env.update(env_assignments(args))
    return env


def _unknown(names: set[str], fields: set[str]) -> list[str]:
    return sorted(names - fields)


def test_configmap_names_are_worker_settings_fields(
    configmap_data: dict[str, str], worker_settings_env_names: set[str]
) -> None:
    assert set(configmap_data) == _prefixed(configmap_data), "the worker ConfigMap holds only ANOMALY_* keys"
    assert not _unknown(set(configmap_data), worker_settings_env_names)


def test_deployment_env_names_are_worker_settings_fields(worker_settings_env_names: set[str]) -> None:
    names = _prefixed(container_env_names(_worker_container()))
    assert names, "the Deployment sets no ANOMALY_* variable"
    assert not _unknown(names, worker_settings_env_names)


def test_compose_worker_env_names_are_worker_settings_fields(
    compose: dict[str, Any], worker_settings_env_names: set[str]
) -> None:
    assert not _unknown(_prefixed(_compose_worker_env(compose)), worker_settings_env_names)


def test_dockerfile_worker_env_names_are_worker_settings_fields(worker_settings_env_names: set[str]) -> None:
    names = _prefixed(_dockerfile_worker_env())
    assert names, "the worker stage sets no ANOMALY_* variable"
    assert not _unknown(names, worker_settings_env_names)


def test_field_name_check_catches_a_misspelt_variable(worker_settings_env_names: set[str]) -> None:
    assert _unknown({"ANOMALY_BATCHSIZE", "ANOMALY_BATCH_SIZE"}, worker_settings_env_names) == [
        "ANOMALY_BATCHSIZE"
    ]


def _clear_anomaly_env(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for name in list(os.environ):
        if name.startswith(ENV_PREFIX):
            monkeypatch.delenv(name)


def test_kubernetes_worker_settings_are_accepted_by_the_worker(
    configmap_data: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from runtime.settings import WorkerSettings

    _clear_anomaly_env(monkeypatch)
    secret = k8s_object("Secret", "anomaly-redis")["stringData"]
    environment = dict(configmap_data)
    for item in _worker_container()["env"]:
        if "value" in item:
            environment[item["name"]] = item["value"]
        elif "secretKeyRef" in item.get("valueFrom", {}):
            environment[item["name"]] = secret[item["valueFrom"]["secretKeyRef"]["key"]]
        else:  # fieldRef: the pod name
            environment[item["name"]] = "anomaly-worker-5d9c7b-x2x9q"
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    settings = WorkerSettings()
    assert settings.input_stream == configmap_data["ANOMALY_INPUT_STREAM"]
    assert settings.metrics_port == int(configmap_data["ANOMALY_METRICS_PORT"])


def test_compose_worker_settings_are_accepted_by_the_worker(
    compose: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    from runtime.settings import WorkerSettings

    _clear_anomaly_env(monkeypatch)
    for name, value in {**_dockerfile_worker_env(), **_compose_worker_env(compose)}.items():
        if name.startswith(ENV_PREFIX):
            monkeypatch.setenv(name, value)
    settings = WorkerSettings()
    assert str(settings.artifact) == "/artifacts/model"
