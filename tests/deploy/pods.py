"""What a pod of deploy/k8s gets, rendered as the kubelet would: its container's environment (the
ConfigMap's and the Secret's values, field refs, and a service-link variable set for every Service
of the namespace), its secret files, and the Redis users deploy/README.md documents.

Placeholders of the shipped Secrets (passwords, the Redis host) are replaced by the test's own, as an
operator replaces them when deploying; everything else is read from the manifests themselves.
"""

from __future__ import annotations

import ipaddress
import re
import secrets
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from .conftest import DEPLOY, k8s_objects, load_yaml_documents


def objects_of(kind: str) -> dict[str, dict[str, Any]]:
    """name -> object of every `kind` in deploy/k8s."""
    return {doc["metadata"]["name"]: doc for _, doc in k8s_objects() if doc.get("kind") == kind}


def notify_objects(kind: str) -> dict[str, dict[str, Any]]:
    """name -> object of every `kind` that deploy/k8s-notify adds to deploy/k8s."""
    docs = [
        doc for path in sorted((DEPLOY / "k8s-notify").glob("*.yaml")) for doc in load_yaml_documents(path)
    ]
    return {doc["metadata"]["name"]: doc for doc in docs if doc and doc.get("kind") == kind}


def service_links(services: Iterable[Mapping[str, Any]]) -> dict[str, str]:
    """The variables Kubernetes injects for these Services (enableServiceLinks), with made-up
    cluster IPs: {SVC}_SERVICE_HOST, _SERVICE_PORT, _SERVICE_PORT_<NAME>, _PORT, _PORT_<p>_TCP(...)."""
    env: dict[str, str] = {}
    for index, service in enumerate(services):
        prefix = service["metadata"]["name"].upper().replace("-", "_")
        host = str(ipaddress.ip_address("10.96.0.10") + index)
        ports = service["spec"]["ports"]
        first = ports[0]
        env[f"{prefix}_SERVICE_HOST"] = host
        env[f"{prefix}_SERVICE_PORT"] = str(first["port"])
        env[f"{prefix}_PORT"] = f"{first.get('protocol', 'TCP').lower()}://{host}:{first['port']}"
        for port in ports:
            protocol = port.get("protocol", "TCP")
            if "name" in port:
                env[f"{prefix}_SERVICE_PORT_{port['name'].upper().replace('-', '_')}"] = str(port["port"])
            base = f"{prefix}_PORT_{port['port']}_{protocol}"
            env[base] = f"{protocol.lower()}://{host}:{port['port']}"
            env[f"{base}_PROTO"] = protocol.lower()
            env[f"{base}_PORT"] = str(port["port"])
            env[f"{base}_ADDR"] = host
    return env


@dataclass
class Pod:
    """One container of a workload: its image, args, environment, secret files, and whether its
    root is read-only."""

    image: str
    args: list[str] | None
    env: dict[str, str]
    secret_files: dict[str, dict[str, str]] = field(default_factory=dict)  # mount path -> name -> text
    read_only_root: bool = False


def render_pod(
    workload: Mapping[str, Any],
    secrets_data: Mapping[str, Mapping[str, str]],
    pod_name: str,
    service_env: Mapping[str, str],
) -> Pod:
    """The first container of `workload` (Deployment or Job) as its pod would run it."""
    spec = workload["spec"]["template"]["spec"]
    container = spec["containers"][0]
    configmaps = {name: doc.get("data", {}) for name, doc in objects_of("ConfigMap").items()}
    # Given even where the manifest turns them off (enableServiceLinks: false): a cluster whose
    # admission adds them back, or a copy of the manifest without the line, must still start.
    env: dict[str, str] = dict(service_env)
    for source in container.get("envFrom", []):
        env.update({k: str(v) for k, v in configmaps[source["configMapRef"]["name"]].items()})
    for item in container.get("env", []):
        if "value" in item:
            env[item["name"]] = str(item["value"])
            continue
        ref = item["valueFrom"]
        if "secretKeyRef" in ref:
            key = ref["secretKeyRef"]
            data = secrets_data.get(key["name"])
            if data is None or key["key"] not in data:
                assert key.get("optional"), f"{item['name']} needs Secret {key['name']}/{key['key']}"
                continue
            env[item["name"]] = data[key["key"]]
        elif "fieldRef" in ref:
            assert ref["fieldRef"]["fieldPath"] == "metadata.name", ref
            env[item["name"]] = pod_name
        else:
            raise AssertionError(f"unhandled valueFrom {ref}")
    volumes = {v["name"]: v for v in spec.get("volumes", [])}
    files: dict[str, dict[str, str]] = {}
    for mount in container.get("volumeMounts", []):
        volume = volumes[mount["name"]]
        if "secret" in volume:
            data = secrets_data[volume["secret"]["secretName"]]
            items = volume["secret"].get("items") or [{"key": k, "path": k} for k in data]
            files[mount["mountPath"]] = {item["path"]: data[item["key"]] for item in items}
    read_only = bool(container.get("securityContext", {}).get("readOnlyRootFilesystem"))
    image = container["image"]
    return Pod(image, container.get("args"), env, files, read_only)


def shipped_secrets() -> dict[str, dict[str, str]]:
    """The Secrets of deploy/k8s and deploy/k8s-notify as shipped (placeholder values)."""
    shipped = {**objects_of("Secret"), **notify_objects("Secret")}
    return {name: dict(doc.get("stringData", {})) for name, doc in shipped.items()}


def pointed_at(url: str, host: str, port: int) -> str:
    """A Secret's Redis URL with the cluster DNS name replaced by where the test's Redis listens."""
    parts = urlsplit(url)
    user = f"{parts.username}@" if parts.username else ""
    return urlunsplit(parts._replace(netloc=f"{user}{host}:{port}"))


@dataclass(frozen=True)
class RedisUser:
    """One ACL line of deploy/README.md, with its password."""

    name: str
    password: str
    rules: str  # everything after the password, as documented

    def acl_setuser(self) -> list[str]:
        """The ACL SETUSER command's arguments."""
        return ["ACL", "SETUSER", self.name, "on", f">{self.password}", *self.rules.split()]


SHARDED_STREAMS = ("images", "anomalies", "images:dead-letter")


def documented_users(shards: int = 1) -> dict[str, RedisUser]:
    """The Redis users of deploy/README.md's least-privilege section, each with a fresh password;
    with shards, their stream key patterns take the shard suffix, as the section says."""
    text = (DEPLOY / "README.md").read_text()
    users = {}
    for line in re.findall(r"^ACL SETUSER .*$", text, re.MULTILINE):
        found = re.fullmatch(r"ACL SETUSER (\S+) on >\S+ (.*)", line)
        assert found, f"an ACL line of deploy/README.md that the rehearsal cannot read: {line}"
        name, rules = found.groups()
        if shards > 1:
            names = "|".join(re.escape(s) for s in sorted(SHARDED_STREAMS, key=len, reverse=True))
            rules = re.sub(rf"((?:^|\s)(?:%R|%RW|%W)?~)({names})(?=\s)", r"\1\2:{*}", rules)
        users[name] = RedisUser(name, secrets.token_hex(12), rules)
    return users


def write_files(root: Path, files: Mapping[str, Mapping[str, str]], uid: int, gid: int) -> dict[str, Path]:
    """Each secret mount's files under `root`, readable by the pod's user (as defaultMode 0440 and
    fsGroup give); mount path -> host directory."""
    import os

    hosts = {}
    for index, (mount, items) in enumerate(files.items()):
        directory = root / f"secret-{index}"
        directory.mkdir(parents=True)
        for name, value in items.items():
            path = directory / name
            path.write_text(value)
            os.chown(path, uid, gid)
            path.chmod(0o440)
        os.chown(directory, uid, gid)
        hosts[mount] = directory
    return hosts
