"""deploy/compose.yaml: valid for Docker Compose, and its services fit together."""

from __future__ import annotations

import json
import re
from importlib import resources
from pathlib import Path
from typing import Any

import pytest

from .conftest import (
    COMPOSE_FILE,
    DEPLOY,
    GRAFANA,
    PROMETHEUS,
    dockerfile_stages,
    find_tool,
    load_yaml,
    run,
)


def _docker_engine_answers(docker: str) -> bool:
    try:
        return run([docker, "info", "--format", "{{.ServerVersion}}"], timeout=20).returncode == 0
    except OSError:
        return False


@pytest.mark.deploy
def test_docker_compose_config_accepts_the_file() -> None:
    docker = find_tool("docker")
    if docker is None or not _docker_engine_answers(docker):
        pytest.skip("no Docker engine on this machine")
    if run([docker, "compose", "version"]).returncode != 0:
        pytest.skip("the docker compose plugin is not installed")
    result = run([docker, "compose", "-f", str(COMPOSE_FILE), "config", "--quiet"])
    assert result.returncode == 0, result.stderr


@pytest.mark.deploy
def test_compose_file_matches_the_compose_specification_schema(compose: dict[str, Any]) -> None:
    """The JSON schema of the Compose specification, as vendored by check-jsonschema (offline)."""
    import jsonschema

    schema_file = resources.files("check_jsonschema.builtin_schemas.vendor") / "compose-spec.json"
    schema = json.loads(schema_file.read_text(encoding="utf-8"))
    validator_class = jsonschema.validators.validator_for(schema)
    errors = sorted(validator_class(schema).iter_errors(compose), key=lambda e: list(e.absolute_path))
    assert not errors, "\n".join(f"{list(e.absolute_path)}: {e.message}" for e in errors)


# ---------------------------------------------------------------- structure (always runs)

EXPECTED_SERVICES = {"redis", "trainer", "worker", "producer", "prometheus", "grafana"}


def _service(compose: dict[str, Any], name: str) -> dict[str, Any]:
    assert name in compose["services"], f"compose has no service {name!r}"
    return compose["services"][name]


def _volume_specs(service: dict[str, Any]) -> list[tuple[str, str, bool]]:
    """(source, target, read_only) of a service's short- or long-syntax volumes."""
    specs = []
    for volume in service.get("volumes", []):
        if isinstance(volume, str):
            parts = volume.split(":")
            source, target = parts[0], parts[1]
            specs.append((source, target, len(parts) > 2 and "ro" in parts[2].split(",")))
        else:
            specs.append((volume.get("source", ""), volume["target"], bool(volume.get("read_only"))))
    return specs


def _environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment", {})
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: str(v) for k, v in env.items()}


def _duration_seconds(text: str) -> float:
    units = {"h": 3600, "m": 60, "s": 1, "ms": 0.001}
    total = 0.0
    for number, unit in re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)", text):
        total += float(number) * units[unit]
    return total


def test_compose_defines_the_whole_stack(compose: dict[str, Any]) -> None:
    assert set(compose["services"]) >= EXPECTED_SERVICES


def test_worker_service_can_be_scaled_without_name_or_port_clashes(compose: dict[str, Any]) -> None:
    worker = _service(compose, "worker")
    assert "container_name" not in worker, "a fixed container_name breaks --scale worker=N"
    assert "ports" not in worker, "a published host port clashes between replicas; use expose"
    assert "9400" in [str(p) for p in worker.get("expose", [])]


def test_redis_keeps_streams_in_an_append_only_file_on_a_named_volume(compose: dict[str, Any]) -> None:
    redis = _service(compose, "redis")
    command = redis["command"] if isinstance(redis["command"], str) else " ".join(redis["command"])
    assert re.search(r"--appendonly\s+yes", command), command
    assert any(
        target == "/data" and source in compose["volumes"] for source, target, _ in _volume_specs(redis)
    )


def test_trainer_writes_the_artifact_volume_that_workers_mount_read_only(compose: dict[str, Any]) -> None:
    trainer = _service(compose, "trainer")
    worker = _service(compose, "worker")
    trainer_mounts = {source: (target, ro) for source, target, ro in _volume_specs(trainer)}
    worker_mounts = {source: (target, ro) for source, target, ro in _volume_specs(worker)}
    shared = set(trainer_mounts) & set(worker_mounts) & set(compose["volumes"])
    assert shared, "trainer and worker share no named volume"
    volume = shared.pop()
    trainer_target, trainer_ro = trainer_mounts[volume]
    worker_target, worker_ro = worker_mounts[volume]
    assert not trainer_ro and worker_ro, "the trainer writes the volume, workers only read it"
    artifact = _environment(worker)["ANOMALY_ARTIFACT"]
    assert artifact.startswith(worker_target.rstrip("/") + "/")
    command = " ".join(trainer["command"]) if isinstance(trainer["command"], list) else trainer["command"]
    out = re.search(r"--out\s+(\S+)", command)
    assert out and out.group(1) == artifact.replace(worker_target, trainer_target, 1)
    assert trainer.get("restart", "no") == "no", "the trainer is a one-shot job"


def test_services_start_in_order_on_health_and_completion(compose: dict[str, Any]) -> None:
    worker = _service(compose, "worker")
    assert worker["depends_on"]["redis"]["condition"] == "service_healthy"
    assert worker["depends_on"]["trainer"]["condition"] == "service_completed_successfully"
    for name, service in compose["services"].items():
        for dependency, spec in (service.get("depends_on") or {}).items():
            assert dependency in compose["services"], f"{name} depends on unknown service {dependency}"
            if spec.get("condition") == "service_healthy":
                assert "healthcheck" in compose["services"][dependency], (
                    f"{name} waits for {dependency} to be healthy, but {dependency} has no healthcheck"
                )


def test_worker_healthcheck_asks_healthz_on_the_metrics_port(compose: dict[str, Any]) -> None:
    worker = _service(compose, "worker")
    test = " ".join(worker["healthcheck"]["test"])
    port = _environment(worker).get("ANOMALY_METRICS_PORT", "9400")
    assert f":{port}/healthz" in test


def test_worker_is_given_longer_to_stop_than_its_grace_time(compose: dict[str, Any]) -> None:
    worker = _service(compose, "worker")
    grace = float(_environment(worker).get("ANOMALY_GRACE_SECONDS", "20"))
    assert _duration_seconds(worker.get("stop_grace_period", "10s")) > grace


def test_worker_memory_limit_matches_the_sizing(compose: dict[str, Any]) -> None:
    resources_ = _service(compose, "worker")["deploy"]["resources"]
    # The slim image (compose builds target: worker): like the Deployment's 256Mi/512Mi.
    assert str(resources_["limits"]["memory"]).lower() in {"512m", "512mb"}
    assert str(resources_["reservations"]["memory"]).lower() in {"256m", "256mb"}


def test_named_volumes_are_declared_and_bind_mounted_files_exist(compose: dict[str, Any]) -> None:
    declared = set(compose.get("volumes") or {})
    for name, service in compose["services"].items():
        for source, target, _ in _volume_specs(service):
            if source.startswith((".", "/")):
                assert (DEPLOY / source).resolve().exists(), f"{name}: bind source {source} does not exist"
            else:
                assert source in declared, f"{name}: volume {source} (for {target}) is not declared"


def test_build_targets_are_stages_of_the_dockerfile(compose: dict[str, Any]) -> None:
    stages = dockerfile_stages()
    built = [s for s in compose["services"].values() if "build" in s]
    assert built
    for service in built:
        build = service["build"]
        context = (COMPOSE_FILE.parent / build["context"]).resolve()
        assert (context / build["dockerfile"]).resolve() == (DEPLOY / "Dockerfile").resolve()
        assert build["target"] in stages


def test_prometheus_service_loads_the_config_and_the_alert_rules(compose: dict[str, Any]) -> None:
    prometheus = _service(compose, "prometheus")
    mounts = {Path(source).name: target for source, target, _ in _volume_specs(prometheus)}
    config_target = mounts["prometheus.yml"]
    assert f"--config.file={config_target}" in prometheus["command"]
    config = load_yaml(PROMETHEUS / "prometheus.yml")
    for rule_file in config["rule_files"]:
        in_container = Path(config_target).parent / rule_file
        assert str(in_container) in mounts.values(), f"{rule_file} is not mounted at {in_container}"


def test_grafana_is_provisioned_with_the_datasource_and_the_dashboard(compose: dict[str, Any]) -> None:
    grafana = _service(compose, "grafana")
    mounts = {str((DEPLOY / source).resolve()): target for source, target, _ in _volume_specs(grafana)}
    dashboard_target = mounts[str((GRAFANA / "dashboard.json").resolve())]
    provisioning = GRAFANA / "provisioning"
    for kind in ("datasources", "dashboards"):
        assert mounts[str((provisioning / kind).resolve())] == f"/etc/grafana/provisioning/{kind}"
    providers = [
        p for f in sorted((provisioning / "dashboards").glob("*.yaml")) for p in load_yaml(f)["providers"]
    ]
    assert any(str(Path(dashboard_target).parent) == p["options"]["path"] for p in providers)
    datasources = [
        d for f in (provisioning / "datasources").glob("*.yaml") for d in load_yaml(f)["datasources"]
    ]
    prometheus_port = _service(compose, "prometheus")["ports"][0].split(":")[-1]
    assert f"http://prometheus:{prometheus_port}" in [d["url"] for d in datasources]


def test_producer_targets_the_workers_input_stream(compose: dict[str, Any]) -> None:
    producer = _service(compose, "producer")
    worker_env = _environment(_service(compose, "worker"))
    command = producer["command"]
    assert command[command.index("--stream") + 1] == worker_env.get("ANOMALY_INPUT_STREAM", "images")
    redis_url = command[command.index("--redis-url") + 1]
    assert redis_url == worker_env["ANOMALY_REDIS_URL"]
