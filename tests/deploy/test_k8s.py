"""deploy/k8s/: schema-valid manifests that reference each other correctly."""

from __future__ import annotations

from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlsplit

import jsonschema
import pytest
import yaml

from .conftest import (
    K8S,
    WORKER_JOB,
    container_env_names,
    find_tool,
    generated_configmaps,
    k8s_manifest_files,
    k8s_object,
    k8s_objects,
    kustomize_bases,
    load_yaml,
    pod_spec,
    run,
)

# The oldest Kubernetes minor we support and the newest the validator knows.
K8S_VERSIONS = ("1.28.0", "latest")
# kubernetes-validate knows the built-in API groups only, not these CRDs' (KEDA's ScaledObject and
# TriggerAuthentication, the Prometheus Operator's ServiceMonitor and PrometheusRule): their objects
# are checked against our own structural schemas below instead of skipped.
CRD_GROUPS = {"keda.sh", "monitoring.coreos.com"}


def _is_crd(doc: dict[str, Any]) -> bool:
    return doc["apiVersion"].split("/")[0] in CRD_GROUPS


BUILTIN = [
    pytest.param(doc, id=f"{path.name}:{doc['kind']}/{doc['metadata']['name']}")
    for path, doc in k8s_objects()
    if not _is_crd(doc)
] + [
    pytest.param(doc, id=f"{path.parent.name}/{path.name}:ConfigMap/{doc['metadata']['name']}")
    for path, doc in generated_configmaps()
]


@pytest.mark.deploy
@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("doc", BUILTIN)
def test_builtin_objects_validate_against_the_kubernetes_schema(doc: dict[str, Any], version: str) -> None:
    import kubernetes_validate

    if version == "latest":
        version = kubernetes_validate.latest_version()
    try:
        kubernetes_validate.validate(doc, version, strict=True)
    except kubernetes_validate.ValidationError as exc:
        pytest.fail(f"{doc['kind']}/{doc['metadata']['name']} against {version}: {exc.message} at {exc.path}")


# ---------------------------------------------------------------- CRDs: our own structural schemas
# Only the fields these manifests use, with additionalProperties false, so a misspelt key
# (minReplicas, consumergroup, ...) fails here instead of being ignored by the cluster.

_NAME_REF = {"type": "object", "required": ["name"], "properties": {"name": {"type": "string"}}}
_STR_INT = {"type": "string", "pattern": r"^[0-9]+$"}
_REDIS_STREAMS_METADATA = {
    "type": "object",
    "additionalProperties": False,
    "required": ["stream"],
    "properties": {
        **{
            key: {"type": "string"}
            for key in (
                "address",
                "addressFromEnv",
                "host",
                "hostFromEnv",
                "port",
                "portFromEnv",
                "usernameFromEnv",
                "passwordFromEnv",
                "stream",
                "consumerGroup",
                "enableTLS",
                "unsafeSsl",
            )
        },
        **{
            key: _STR_INT
            for key in (
                "pendingEntriesCount",
                "streamLength",
                "lagCount",
                "activationLagCount",
                "databaseIndex",
            )
        },
    },
}
SCALED_OBJECT_SCHEMA = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "keda.sh/v1alpha1"},
        "spec": {
            "type": "object",
            "additionalProperties": False,
            "required": ["scaleTargetRef", "triggers"],
            "properties": {
                "scaleTargetRef": {
                    "type": "object",
                    "additionalProperties": False,
                    "required": ["name"],
                    "properties": {
                        k: {"type": "string"}
                        for k in ("apiVersion", "kind", "name", "envSourceContainerName")
                    },
                },
                **{
                    k: {"type": "integer", "minimum": 0}
                    for k in (
                        "pollingInterval",
                        "cooldownPeriod",
                        "initialCooldownPeriod",
                        "minReplicaCount",
                        "maxReplicaCount",
                        "idleReplicaCount",
                    )
                },
                "advanced": {"type": "object"},
                "fallback": {"type": "object"},
                "triggers": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "additionalProperties": False,
                        "required": ["type", "metadata"],
                        "properties": {
                            "type": {"type": "string"},
                            "name": {"type": "string"},
                            "metricType": {"enum": ["AverageValue", "Value", "Utilization"]},
                            "useCachedMetrics": {"type": "boolean"},
                            "authenticationRef": {
                                **_NAME_REF,
                                "additionalProperties": False,
                                "properties": {
                                    "name": {"type": "string"},
                                    "kind": {
                                        "enum": ["TriggerAuthentication", "ClusterTriggerAuthentication"]
                                    },
                                },
                            },
                            "metadata": {"type": "object"},
                        },
                        "if": {"properties": {"type": {"const": "redis-streams"}}},
                        "then": {"properties": {"metadata": _REDIS_STREAMS_METADATA}},
                    },
                },
            },
        },
    },
}
TRIGGER_AUTHENTICATION_SCHEMA = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "keda.sh/v1alpha1"},
        "spec": {
            "type": "object",
            "additionalProperties": False,
            "minProperties": 1,
            "properties": {
                "secretTargetRef": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "additionalProperties": False,
                        "required": ["parameter", "name", "key"],
                        "properties": {k: {"type": "string"} for k in ("parameter", "name", "key")},
                    },
                },
                "env": {"type": "array"},
                "podIdentity": {"type": "object"},
                "hashiCorpVault": {"type": "object"},
            },
        },
    },
}
SERVICE_MONITOR_SCHEMA = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "spec": {
            "type": "object",
            "additionalProperties": False,
            "required": ["selector", "endpoints"],
            "properties": {
                "jobLabel": {"type": "string"},
                "selector": {"type": "object", "required": ["matchLabels"]},
                "namespaceSelector": {"type": "object"},
                "endpoints": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "additionalProperties": False,
                        "properties": {
                            "port": {"type": "string"},
                            "path": {"type": "string"},
                            "interval": {"type": "string", "pattern": r"^[0-9]+(ms|s|m|h)$"},
                            "scrapeTimeout": {"type": "string", "pattern": r"^[0-9]+(ms|s|m|h)$"},
                            "scheme": {"enum": ["http", "https"]},
                        },
                    },
                },
            },
        },
    },
}
_STR_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
_DURATION = {"type": "string", "pattern": r"^([0-9]+(ms|s|m|h|d|w|y))+$"}
PROMETHEUS_RULE_SCHEMA = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "spec": {
            "type": "object",
            "additionalProperties": False,
            "required": ["groups"],
            "properties": {
                "groups": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "additionalProperties": False,
                        "required": ["name", "rules"],
                        "properties": {
                            "name": {"type": "string", "minLength": 1},
                            "interval": _DURATION,
                            "rules": {
                                "type": "array",
                                "items": {
                                    "type": "object",
                                    "additionalProperties": False,
                                    "required": ["expr"],
                                    "oneOf": [{"required": ["alert"]}, {"required": ["record"]}],
                                    "properties": {
                                        "alert": {"type": "string"},
                                        "record": {"type": "string"},
                                        "expr": {"type": ["string", "integer"]},
                                        "for": _DURATION,
                                        "keep_firing_for": _DURATION,
                                        "labels": _STR_MAP,
                                        "annotations": _STR_MAP,
                                    },
                                },
                            },
                        },
                    },
                },
            },
        },
    },
}
CRD_SCHEMAS = {
    "ScaledObject": SCALED_OBJECT_SCHEMA,
    "TriggerAuthentication": TRIGGER_AUTHENTICATION_SCHEMA,
    "ServiceMonitor": SERVICE_MONITOR_SCHEMA,
    "PrometheusRule": PROMETHEUS_RULE_SCHEMA,
}


def test_every_custom_resource_is_one_we_check() -> None:
    kinds = {doc["kind"] for _, doc in k8s_objects() if _is_crd(doc)}
    assert kinds == set(CRD_SCHEMAS), (
        f"custom resources without a structural check: {kinds - set(CRD_SCHEMAS)}"
    )


@pytest.mark.parametrize("kind", sorted(CRD_SCHEMAS))
def test_custom_resources_have_the_expected_structure(kind: str) -> None:
    doc = k8s_object(kind)
    errors = list(jsonschema.Draft202012Validator(CRD_SCHEMAS[kind]).iter_errors(doc))
    assert not errors, "\n".join(f"{list(e.absolute_path)}: {e.message}" for e in errors)


def test_crd_schema_rejects_a_misspelt_scaler_key() -> None:
    doc = k8s_object("ScaledObject")
    broken = yaml.safe_load(yaml.safe_dump(doc))
    broken["spec"]["triggers"][0]["metadata"]["consumergroup"] = "typo"
    assert list(jsonschema.Draft202012Validator(SCALED_OBJECT_SCHEMA).iter_errors(broken))


# ---------------------------------------------------------------- kustomize


def test_kustomization_lists_every_manifest_and_nothing_else() -> None:
    kustomization = load_yaml(K8S / "kustomization.yaml")
    listed = kustomization["resources"]
    assert len(listed) == len(set(listed)), "a resource is listed twice"
    files = {item for item in listed if not (K8S / item).is_dir()}
    on_disk = {p.name for p in k8s_manifest_files()}
    assert files == on_disk, (
        f"missing from kustomization: {sorted(on_disk - files)}; listed but absent: {sorted(files - on_disk)}"
    )
    # The other kustomization it includes: the dashboard's ConfigMap, made beside dashboard.json.
    assert [base.relative_to(K8S.parent) for base in kustomize_bases()] == [Path("grafana")]


@pytest.mark.deploy
def test_kustomize_renders_every_object_into_the_namespace(tmp_path: Path) -> None:
    kubectl = find_tool("kubectl")
    kustomize = find_tool("kustomize")
    if kubectl:
        command = [kubectl, "kustomize", str(K8S)]
    elif kustomize:
        command = [kustomize, "build", str(K8S)]
    else:
        pytest.skip("neither kubectl nor kustomize is installed")
    result = run(command)
    assert result.returncode == 0, result.stderr
    rendered = [d for d in yaml.safe_load_all(result.stdout) if d]
    assert len(rendered) == len(k8s_objects()) + len(generated_configmaps())
    namespace = load_yaml(K8S / "kustomization.yaml")["namespace"]
    for doc in rendered:
        if doc["kind"] != "Namespace":
            assert doc["metadata"]["namespace"] == namespace, doc["metadata"]["name"]
    # The generated ConfigMaps are what the Python checks (and kubernetes-validate) were given.
    by_name = {(d["kind"], d["metadata"]["name"]): d for d in rendered}
    for _, expected in generated_configmaps():
        found = by_name[("ConfigMap", expected["metadata"]["name"])]
        assert found["data"] == expected["data"]
        assert expected["metadata"].get("labels", {}).items() <= found["metadata"]["labels"].items()


# ---------------------------------------------------------------- the worker Deployment


def _worker() -> dict[str, Any]:
    return k8s_object("Deployment", "anomaly-worker")


def _worker_container() -> dict[str, Any]:
    containers = pod_spec(_worker())["containers"]
    assert len(containers) == 1
    return containers[0]


def _metrics_port(container: dict[str, Any]) -> dict[str, Any]:
    return next(p for p in container["ports"] if p["name"] == "metrics")


def test_probes_use_healthz_for_liveness_and_readyz_for_readiness(configmap_data: dict[str, str]) -> None:
    container = _worker_container()
    port = _metrics_port(container)
    assert str(port["containerPort"]) == configmap_data["ANOMALY_METRICS_PORT"]
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
        assert container[probe]["httpGet"]["port"] in {port["name"], port["containerPort"]}


def test_resources_follow_the_measured_sizing() -> None:
    resources = _worker_container()["resources"]
    # The slim image: worker 68-71 MB + scoring process 60-64 MB resident; 1.1-1.2 cores at full speed.
    assert resources["requests"] == {"cpu": "1", "memory": "256Mi"}
    assert resources["limits"] == {"cpu": "2", "memory": "512Mi"}


def test_pods_get_longer_to_stop_than_the_worker_grace_time(configmap_data: dict[str, str]) -> None:
    grace = float(configmap_data["ANOMALY_GRACE_SECONDS"])
    assert pod_spec(_worker())["terminationGracePeriodSeconds"] > grace


def test_replica_count_is_left_to_the_autoscaler() -> None:
    assert "replicas" not in _worker()["spec"], "KEDA owns replicas; a fixed count fights it on apply"


PODS = [("Deployment", "anomaly-worker"), ("Job", "anomaly-trainer"), ("Deployment", "anomaly-viewer")]


def test_every_pod_template_turns_service_links_off() -> None:
    """Kubernetes would inject {SERVICE}_SERVICE_HOST, _PORT... for every Service of the namespace;
    with Services named anomaly-*, those look like ANOMALY_* settings."""
    templates = {
        f"{doc['kind']}/{doc['metadata']['name']}": doc["spec"]["template"]["spec"]
        for _, doc in k8s_objects()
        if "template" in doc.get("spec", {})
    }
    assert set(templates) == {f"{kind}/{name}" for kind, name in PODS}, "a workload this file does not know"
    links = {name: spec.get("enableServiceLinks") for name, spec in templates.items()}
    assert all(value is False for value in links.values()), f"enableServiceLinks is not false: {links}"


@pytest.mark.parametrize("kind,name", PODS)
def test_pods_run_locked_down_with_a_writable_tmp(kind: str, name: str) -> None:
    spec = pod_spec(k8s_object(kind, name))
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["runAsUser"] != 0
    assert spec.get("automountServiceAccountToken") is False
    volumes = {v["name"]: v for v in spec["volumes"]}
    for container in spec["containers"]:
        context = container["securityContext"]
        assert context["readOnlyRootFilesystem"] is True
        assert context["allowPrivilegeEscalation"] is False
        assert context["capabilities"]["drop"] == ["ALL"]
        assert not context.get("capabilities", {}).get("add")
        tmp = [m for m in container["volumeMounts"] if m["mountPath"] == "/tmp"]
        assert tmp and "emptyDir" in volumes[tmp[0]["name"]], f"{name}: /tmp is not an emptyDir"


@pytest.mark.parametrize("kind,name", PODS)
def test_every_volume_mount_has_a_volume(kind: str, name: str) -> None:
    spec = pod_spec(k8s_object(kind, name))
    volumes = {v["name"] for v in spec["volumes"]}
    for container in spec["containers"]:
        for mount in container.get("volumeMounts", []):
            assert mount["name"] in volumes, f"{name}: mount {mount['name']} has no volume"


def test_training_job_writes_the_pvc_that_workers_mount_read_only(configmap_data: dict[str, str]) -> None:
    def artifact_mount(spec: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        claims = {v["name"]: v for v in spec["volumes"] if "persistentVolumeClaim" in v}
        mounts = [m for m in spec["containers"][0]["volumeMounts"] if m["name"] in claims]
        assert len(mounts) == 1
        return mounts[0], claims[mounts[0]["name"]]["persistentVolumeClaim"]

    worker_mount, worker_claim = artifact_mount(pod_spec(_worker()))
    job = k8s_object("Job", "anomaly-trainer")
    job_mount, job_claim = artifact_mount(pod_spec(job))
    pvc = k8s_object("PersistentVolumeClaim")
    assert worker_claim["claimName"] == job_claim["claimName"] == pvc["metadata"]["name"]
    assert worker_mount.get("readOnly") is True and worker_claim.get("readOnly") is True
    assert not job_mount.get("readOnly")
    assert set(pvc["spec"]["accessModes"]) & {"ReadWriteMany", "ReadOnlyMany"}, "workers span nodes"

    artifact = PurePosixPath(configmap_data["ANOMALY_ARTIFACT"])
    assert PurePosixPath(worker_mount["mountPath"]) in artifact.parents
    args = pod_spec(job)["containers"][0]["args"]
    out = PurePosixPath(args[args.index("--out") + 1])
    assert out.relative_to(job_mount["mountPath"]) == artifact.relative_to(worker_mount["mountPath"])


def test_secret_references_point_at_existing_keys() -> None:
    secret = k8s_object("Secret", "anomaly-redis")
    keys = set(secret.get("stringData", {})) | set(secret.get("data", {}))
    spec = pod_spec(_worker())
    for item in _worker_container()["env"]:
        ref = item.get("valueFrom", {}).get("secretKeyRef")
        if ref:
            assert ref["name"] == secret["metadata"]["name"] and ref["key"] in keys, item["name"]
    for volume in spec["volumes"]:
        if "secret" in volume:
            assert volume["secret"]["secretName"] == secret["metadata"]["name"]
            assert {i["key"] for i in volume["secret"].get("items", [])} <= keys


def test_keda_logs_in_with_its_own_secret_not_the_workers() -> None:
    keda_secret = k8s_object("Secret", "anomaly-keda-redis")
    keys = set(keda_secret["stringData"])
    refs = k8s_object("TriggerAuthentication")["spec"]["secretTargetRef"]
    assert {ref["parameter"] for ref in refs} == {"username", "password"}
    for ref in refs:
        assert ref["name"] == "anomaly-keda-redis" and ref["key"] in keys, ref
    worker_secret = k8s_object("Secret", "anomaly-redis")["stringData"]
    assert "redis-username" not in worker_secret, "nothing reads the workers' user name from their Secret"
    assert keda_secret["stringData"]["redis-username"] != urlsplit(worker_secret["redis-url"]).username


def test_password_file_setting_points_into_the_mounted_secret() -> None:
    container = _worker_container()
    env = {e["name"]: e for e in container["env"]}
    path = PurePosixPath(env["ANOMALY_REDIS_PASSWORD_FILE"]["value"])
    spec = pod_spec(_worker())
    secret_volumes = {v["name"]: v["secret"] for v in spec["volumes"] if "secret" in v}
    mount = next(m for m in container["volumeMounts"] if m["name"] in secret_volumes)
    items = {i["path"] for i in secret_volumes[mount["name"]].get("items", [])}
    assert path.parent == PurePosixPath(mount["mountPath"]) and path.name in items


def test_secret_holds_placeholders_only() -> None:
    secret = k8s_object("Secret", "anomaly-redis")
    assert "data" not in secret, "use stringData placeholders; real values never go into the repo"
    assert secret["stringData"]["redis-password"] == "CHANGE-ME"


def test_configmap_and_secret_feed_the_worker() -> None:
    container = _worker_container()
    sources = [s["configMapRef"]["name"] for s in container["envFrom"] if "configMapRef" in s]
    assert sources == ["anomaly-worker-config"]
    assert "ANOMALY_REDIS_URL" in container_env_names(container)


# ---------------------------------------------------------------- Service, ServiceMonitor, PDB


def _pod_labels() -> dict[str, str]:
    return _worker()["spec"]["template"]["metadata"]["labels"]


def _selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def test_deployment_selector_matches_its_pods() -> None:
    assert _selects(_worker()["spec"]["selector"]["matchLabels"], _pod_labels())


def test_service_selects_worker_pods_on_the_metrics_port() -> None:
    service = k8s_object("Service", "anomaly-worker")
    assert _selects(service["spec"]["selector"], _pod_labels())
    port = _metrics_port(_worker_container())
    ports = {p["name"]: p for p in service["spec"]["ports"]}
    assert ports["metrics"]["targetPort"] in {port["name"], port["containerPort"]}


def test_scrape_annotations_name_the_metrics_port() -> None:
    port = str(_metrics_port(_worker_container())["containerPort"])
    for scrape in (
        _worker()["spec"]["template"]["metadata"]["annotations"],
        k8s_object("Service", "anomaly-worker")["metadata"]["annotations"],
    ):
        assert scrape["prometheus.io/scrape"] == "true"
        assert scrape["prometheus.io/port"] == port
        assert scrape["prometheus.io/path"] == "/metrics"


def test_service_monitor_scrapes_the_service_as_job_anomaly_worker() -> None:
    monitor = k8s_object("ServiceMonitor")
    service = k8s_object("Service", "anomaly-worker")
    labels = service["metadata"]["labels"]
    assert _selects(monitor["spec"]["selector"]["matchLabels"], labels)
    service_ports = {p["name"] for p in service["spec"]["ports"]}
    for endpoint in monitor["spec"]["endpoints"]:
        assert endpoint["port"] in service_ports
        assert endpoint.get("path", "/metrics") == "/metrics"
    # The operator's job label is the Service's jobLabel label, else the Service's name.
    job = (
        labels[monitor["spec"]["jobLabel"]] if "jobLabel" in monitor["spec"] else service["metadata"]["name"]
    )
    assert job == WORKER_JOB, "alert rules and the dashboard select job=anomaly-worker"


def test_disruption_budget_covers_the_workers_and_never_blocks_a_drain() -> None:
    pdb = k8s_object("PodDisruptionBudget")
    assert _selects(pdb["spec"]["selector"]["matchLabels"], _pod_labels())
    assert pdb["spec"].get("maxUnavailable") == 1, "minAvailable would block drains at one replica"


# ---------------------------------------------------------------- KEDA


def test_scaled_object_scales_the_worker_deployment() -> None:
    scaled = k8s_object("ScaledObject")
    target = scaled["spec"]["scaleTargetRef"]
    assert target["name"] == _worker()["metadata"]["name"]
    assert target.get("kind", "Deployment") == "Deployment"
    assert 1 <= scaled["spec"]["minReplicaCount"] < scaled["spec"]["maxReplicaCount"]


def test_scaler_watches_the_workers_stream_and_consumer_group(configmap_data: dict[str, str]) -> None:
    triggers = k8s_object("ScaledObject")["spec"]["triggers"]
    auth_name = k8s_object("TriggerAuthentication")["metadata"]["name"]
    modes = set()
    for trigger in triggers:
        assert trigger["type"] == "redis-streams"
        metadata = trigger["metadata"]
        assert metadata["stream"] == configmap_data["ANOMALY_INPUT_STREAM"]
        assert metadata["consumerGroup"] == configmap_data["ANOMALY_GROUP"]
        assert trigger["authenticationRef"]["name"] == auth_name
        # KEDA picks one mode per trigger: lagCount wins over pendingEntriesCount, so never both.
        assert not {"lagCount", "pendingEntriesCount"} <= set(metadata)
        if "lagCount" in metadata:
            assert "activationLagCount" in metadata, "KEDA needs activationLagCount with lagCount"
            modes.add("lag")
        elif "pendingEntriesCount" in metadata:
            modes.add("pending")
    assert modes == {"lag", "pending"}, f"scale on both the group's lag and pending entries, found {modes}"


def test_scaler_and_worker_talk_to_the_same_redis() -> None:
    url = urlsplit(k8s_object("Secret", "anomaly-redis")["stringData"]["redis-url"])
    for trigger in k8s_object("ScaledObject")["spec"]["triggers"]:
        assert trigger["metadata"]["address"] == f"{url.hostname}:{url.port or 6379}"


# ---------------------------------------------------------------- the viewer


def _claims(workload: dict[str, Any]) -> dict[str, dict[str, Any]]:
    volumes = pod_spec(workload)["volumes"]
    return {v["name"]: v["persistentVolumeClaim"] for v in volumes if "persistentVolumeClaim" in v}


def test_the_viewer_reads_the_workers_streams_and_artifact(configmap_data: dict[str, str]) -> None:
    viewer, worker = k8s_object("Deployment", "anomaly-viewer"), _worker()
    container = pod_spec(viewer)["containers"][0]
    assert container["envFrom"] == _worker_container()["envFrom"]  # same streams, shards, artifact path
    env = {e["name"]: e for e in container["env"]}
    token = env["ANOMALY_VIEWER_TOKEN"]["valueFrom"]["secretKeyRef"]
    assert token["optional"] is True, "without the token Secret the page must still start, read-only"
    claims, worker_claims = _claims(viewer), _claims(worker)
    assert claims == worker_claims and all(c["readOnly"] for c in claims.values())
    artifact = PurePosixPath(configmap_data["ANOMALY_ARTIFACT"])
    mount = next(m for m in container["volumeMounts"] if m["name"] in claims)
    assert PurePosixPath(mount["mountPath"]) in artifact.parents and mount["readOnly"] is True


def test_the_viewer_logs_in_to_the_workers_redis_as_its_own_user() -> None:
    viewer = k8s_object("Deployment", "anomaly-viewer")
    container = pod_spec(viewer)["containers"][0]
    env = {e["name"]: e for e in container["env"]}
    secret = k8s_object("Secret", "anomaly-viewer-redis")
    keys = set(secret["stringData"])
    assert env["ANOMALY_REDIS_URL"]["valueFrom"]["secretKeyRef"] == {
        "name": "anomaly-viewer-redis",
        "key": "redis-url",
    }
    url = urlsplit(secret["stringData"]["redis-url"])
    worker_url = urlsplit(k8s_object("Secret", "anomaly-redis")["stringData"]["redis-url"])
    assert (url.hostname, url.port, url.path) == (worker_url.hostname, worker_url.port, worker_url.path)
    assert url.username == "anomaly-viewer" != worker_url.username, "the ACL user of deploy/README.md"
    assert url.password is None, "the password is mounted as a file, not written into the URL"
    assert "data" not in secret and secret["stringData"]["redis-password"] == "CHANGE-ME"
    # The password file is the mounted Secret's item.
    path = PurePosixPath(env["ANOMALY_REDIS_PASSWORD_FILE"]["value"])
    volumes = {v["name"]: v["secret"] for v in pod_spec(viewer)["volumes"] if "secret" in v}
    assert {v["secretName"] for v in volumes.values()} == {"anomaly-viewer-redis"}
    mount = next(m for m in container["volumeMounts"] if m["name"] in volumes)
    items = {i["path"] for i in volumes[mount["name"]]["items"]}
    assert {i["key"] for i in volumes[mount["name"]]["items"]} <= keys
    assert path.parent == PurePosixPath(mount["mountPath"]) and path.name in items


def test_the_viewer_service_reaches_its_page_and_probes_use_that_port() -> None:
    viewer = k8s_object("Deployment", "anomaly-viewer")
    service = k8s_object("Service", "anomaly-viewer")
    labels = viewer["spec"]["template"]["metadata"]["labels"]
    assert _selects(service["spec"]["selector"], labels)
    assert not _selects(service["spec"]["selector"], _pod_labels()), "must not select worker pods"
    container = pod_spec(viewer)["containers"][0]
    port = next(p for p in container["ports"] if p["name"] == "http")
    assert port["containerPort"] == 9500  # the image's ENTRYPOINT: anomaly-viewer --port 9500
    [service_port] = service["spec"]["ports"]
    assert service_port["targetPort"] in {"http", 9500}
    probe = container["readinessProbe"]["httpGet"]
    assert (probe["path"], probe["port"]) == ("/", "http")
    assert container["livenessProbe"]["tcpSocket"]["port"] == "http"


def test_the_viewers_probe_and_port_forward_use_host_names_it_allows() -> None:
    from runtime.settings import ViewerSettings

    container = pod_spec(k8s_object("Deployment", "anomaly-viewer"))["containers"][0]
    env = {e["name"]: e.get("value") for e in container["env"]}
    allowed = ViewerSettings(viewer_allowed_hosts=env["ANOMALY_VIEWER_ALLOWED_HOSTS"]).allowed_hosts()
    # Without a Host header the kubelet sends the pod IP, which the viewer answers with 400.
    headers = {h["name"].lower(): h["value"] for h in container["readinessProbe"]["httpGet"]["httpHeaders"]}
    assert headers["host"] in allowed
    assert {"localhost", "127.0.0.1"} <= set(allowed), "kubectl port-forward: http://localhost:9500"


@pytest.mark.deploy
def test_the_tensorflow_overlay_runs_the_workers_on_that_image_with_its_measured_memory() -> None:
    kubectl = find_tool("kubectl")
    kustomize = find_tool("kustomize")
    overlay = K8S.parent / "overlays" / "tensorflow"
    if kubectl:
        command = [kubectl, "kustomize", str(overlay)]
    elif kustomize:
        command = [kustomize, "build", str(overlay)]
    else:
        pytest.skip("neither kubectl nor kustomize is installed")
    result = run(command)
    assert result.returncode == 0, result.stderr
    rendered = {(d["kind"], d["metadata"]["name"]): d for d in yaml.safe_load_all(result.stdout) if d}
    worker = rendered[("Deployment", "anomaly-worker")]["spec"]["template"]["spec"]["containers"][0]
    assert worker["image"] == "anomaly-scorer-worker:0.1.0-tensorflow"
    assert worker["resources"]["requests"]["memory"] == "768Mi"
    assert worker["resources"]["limits"]["memory"] == "1Gi"
    slim = load_yaml(K8S / "deployment.yaml")["spec"]["template"]["spec"]["containers"][0]["resources"]
    assert (slim["requests"]["memory"], slim["limits"]["memory"]) == ("256Mi", "512Mi")
    viewer = rendered[("Deployment", "anomaly-viewer")]["spec"]["template"]["spec"]["containers"][0]
    assert viewer["image"].startswith("anomaly-scorer-viewer:")  # the overlay changes the workers only
