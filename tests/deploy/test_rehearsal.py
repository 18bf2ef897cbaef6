"""A rehearsal of the Kubernetes deployment, from the built images, as a cluster starts it.

Every pod gets what the kubelet would give it: the environment rendered from deploy/k8s (the
ConfigMap's values, the Secret's, field refs, and the service-link variables of every Service of the
namespace), the Redis password as a mounted file, a read-only root where the manifest says so, /tmp
an empty dir. Redis is a real server started here, with default access off and the ACL users
deploy/README.md documents (worker, viewer, KEDA, producer, retune), each least privilege. Then, as
an operator would check it:

1. the trainer image trains the documented default (the training Job's args) into a volume;
2. two worker containers serve it, from 2 shards (ANOMALY_SHARDS=2, one pod per shard);
3. the producer pushes normal and rotated digits with its own write-only user;
4. every digit is scored once, anomalies land in both shards, rotated ones far more often;
5. the viewer container shows the newest anomalies of both shards, draws them, and labels them;
   anomaly-notify (deploy/k8s-notify, started before the producer) posted every anomaly of both
   shards to a receiver here, once each or counted in a summary past its rate limit;
6. KEDA's user reads what its triggers need (the generator's ScaledObject for 2 shards), nothing else;
7. retune runs in the trainer image with its own user and a password file, the workers reload;
8. every user is refused (NOPERM) what its ACL does not grant; the pods stop cleanly on SIGTERM.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis
import yaml

from contract.shards import shard_of_id
from detector.score import components_of
from producer.client import ImageProducer
from tests.conftest import RedisServer, free_port
from tests.notify_support import Receiver, running_receiver
from tests.support import http_status, log_records, metric_sum, metrics_text

from .conftest import K8S, images_script
from .containers import (
    Container,
    Finished,
    Volume,
    descendants,
    image_config,
    remove_stale_containers,
    rss_bytes,
    run_to_completion,
    running_container,
)
from .pods import (
    Pod,
    documented_users,
    notify_objects,
    objects_of,
    pointed_at,
    render_pod,
    service_links,
    shipped_secrets,
    write_files,
)

pytestmark = [
    pytest.mark.deploy,
    pytest.mark.slow,
    pytest.mark.skipif(
        shutil.which("buildah") is None,
        reason="buildah is not installed; .ci/run installs it (apt-get install buildah debootstrap)",
    ),
    pytest.mark.skipif(os.geteuid() != 0, reason="buildah builds and runs the images as root here"),
    pytest.mark.timeout(1800),
]

SHARDS = 2
NORMAL, ROTATED = 600, 300
VIEWER_TOKEN = secrets.token_hex(16)


def image_of(images: dict[str, str], manifest_image: str) -> str:
    """The locally built image a manifest's `image:` names (kustomize's newTag is the release's)."""
    repository = manifest_image.split(":")[0]
    stage = {
        "anomaly-scorer-worker": "worker",
        "anomaly-scorer-trainer": "trainer",
        "anomaly-scorer-viewer": "viewer",
        "anomaly-scorer-notify": "notify",
    }
    return images[stage[repository]]


@pytest.fixture(scope="module")
def images() -> dict[str, str]:
    remove_stale_containers()
    built = images_script().build(["worker", "trainer", "viewer", "notify"], say=False)
    return {b.target.stage: b.image for b in built}


@pytest.fixture(scope="module")
def redis_acl(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """A Redis 7 with the documented users (shard patterns for 2 shards), an admin for the test's
    own checks, and the default user off."""
    server = RedisServer(free_port(), tmp_path_factory.mktemp("redis-acl")).start()
    users = documented_users(SHARDS)
    admin_password = secrets.token_hex(12)
    client = server.client()
    client.execute_command("ACL", "SETUSER", "admin", "on", f">{admin_password}", "~*", "&*", "+@all")
    for user in users.values():
        client.execute_command(*user.acl_setuser())
    client.execute_command("ACL", "SETUSER", "default", "off")
    admin = server.client(username="admin", password=admin_password)
    yield server, users, admin
    admin.execute_command("ACL", "SETUSER", "default", "on")
    server.stop()


def as_user(server: RedisServer, user: Any) -> redis.Redis:
    return server.client(username=user.name, password=user.password)


def secrets_for(server: RedisServer, users: dict[str, Any]) -> dict[str, dict[str, str]]:
    """The shipped Secrets with their placeholders replaced, as an operator fills them in."""
    data = shipped_secrets()
    for secret in data.values():
        for key, value in list(secret.items()):
            if value.startswith(("redis://", "rediss://")):
                secret[key] = pointed_at(value, "127.0.0.1", server.port)
    for secret in data.values():
        user = secret.get("redis-username") or _url_user(secret.get("redis-url", ""))
        if user in users and "redis-password" in secret:
            secret["redis-password"] = users[user].password
    data.setdefault("anomaly-viewer", {})["viewer-token"] = VIEWER_TOKEN
    return data


def _url_user(url: str) -> str:
    found = re.match(r"rediss?://([^:@/]+)@", url)
    return found.group(1) if found else ""


def start(
    images: dict[str, str],
    pod: Pod,
    tmp: Path,
    volumes: list[Volume],
    env: dict[str, str],
    args: list[str] | None = None,
) -> Any:
    uid, gid = (int(p) for p in image_config(image_of(images, pod.image))["User"].split(":"))
    mounts = [*volumes]
    for mount, host in write_files(tmp, pod.secret_files, uid, gid).items():
        mounts.append(Volume(host, mount, read_only=True))
    return running_container(
        image_of(images, pod.image),
        args if args is not None else pod.args,
        env={**pod.env, **env},
        volumes=mounts,
        read_only_root=pod.read_only_root,
        log_dir=tmp,
    )


def nopermission(call: Any) -> bool:
    try:
        call()
    except redis.exceptions.NoPermissionError:
        return True
    return False


@pytest.fixture
def receiver() -> Any:
    """The webhook receiver anomaly-notify posts to (the Secret's webhook-url points here)."""
    with running_receiver() as running:
        yield running


def test_the_deployment_starts_and_serves_as_a_cluster_starts_it(
    images, redis_acl, receiver: Receiver, tmp_path: Path
) -> None:
    server, users, admin = redis_acl
    data = secrets_for(server, users)
    data["anomaly-notify"]["webhook-url"] = receiver.url
    links = service_links(objects_of("Service").values())
    deployments = objects_of("Deployment")

    # 1. The training Job: the documented default, into the artifacts volume.
    artifacts = tmp_path / "artifacts"
    artifacts.mkdir()
    uid, gid = (int(p) for p in image_config(images["trainer"])["User"].split(":"))
    os.chown(artifacts, uid, gid)  # fsGroup
    job = render_pod(objects_of("Job")["anomaly-trainer"], data, "anomaly-trainer-x7k2p", links)
    assert job.args == ["train", "--dataset", "mnist", "--out", "/artifacts/model"]
    peak = 0.0
    with running_container(
        image_of(images, job.image),
        job.args,
        env=job.env,
        volumes=[Volume(artifacts, "/artifacts")],
        read_only_root=job.read_only_root,
        log_dir=tmp_path,
    ) as training:
        while training.running:  # sampled, for the Job's memory request (pytest -rP shows it)
            with contextlib.suppress(AssertionError, OSError):
                peak = max(peak, container_rss(training) / 2**20)
            with contextlib.suppress(subprocess.TimeoutExpired):
                training.wait(0.5)
        trained = Finished(training.wait(1), training.log_text(), training.writes_to_root())
    print(
        f"rehearsal: training the default took {time.monotonic() - training.started_at:.0f} s, "
        f"peak RSS {peak:.0f} MiB"
    )
    assert trained.returncode == 0, trained.output[-4000:]
    assert trained.writes_to_root == []
    baseline = json.loads((artifacts / "model" / "baseline.json").read_text())
    assert (
        baseline["score"] == "mse+orientation+hidden-knn+hidden-mahalanobis"
        and baseline["threshold"]["policy"] == "p99"
    )

    # 2. Two worker pods, one shard each, from the Deployment and its ConfigMap (ANOMALY_SHARDS
    #    patched to 2, as deploy/README says to shard).
    worker_manifest = deployments["anomaly-worker"]
    pods, ports = [], []
    for shard in range(SHARDS):
        pod = render_pod(worker_manifest, data, f"anomaly-worker-5d9f7-{shard}", links)
        assert "ANOMALY_WORKER_SERVICE_HOST" in pod.env  # a service link a strict check would refuse
        ports.append(free_port())
        pods.append(
            (
                pod,
                {
                    "ANOMALY_SHARDS": str(SHARDS),
                    "ANOMALY_SHARD_IDS": str(shard),
                    "ANOMALY_METRICS_PORT": str(ports[-1]),
                    "ANOMALY_RELOAD_POLL_SECONDS": "1",
                },
            )
        )
    art = Volume(artifacts, "/artifacts", read_only=True)
    # The notifier of deploy/k8s-notify: the workers' ConfigMap (ANOMALY_SHARDS patched as theirs),
    # its own Secret and user; a short summary interval so that the rehearsal need not wait a minute.
    notify_pod = render_pod(
        notify_objects("Deployment")["anomaly-notify"], data, "anomaly-notify-6b8d", links
    )
    notify_port = free_port()
    notify_env = {
        "ANOMALY_SHARDS": str(SHARDS),
        "ANOMALY_NOTIFY_METRICS_PORT": str(notify_port),
        "ANOMALY_NOTIFY_SUMMARY_INTERVAL_SECONDS": "3",
    }
    with (
        start(images, pods[0][0], tmp_path / "w0", [art], pods[0][1]) as w0,
        start(images, pods[1][0], tmp_path / "w1", [art], pods[1][1]) as w1,
        start(images, notify_pod, tmp_path / "notify", [], notify_env) as notifier,
    ):
        workers: list[Container] = [w0, w1]
        for worker, port in zip(workers, ports, strict=True):
            worker.wait_until(lambda p=port: http_status(p, "/readyz") == 200, 90, f"worker on {port} ready")
        # Its groups start at the end of the output streams: ready before the first anomaly.
        notifier.wait_until(lambda: http_status(notify_port, "/readyz") == 200, 60, "anomaly-notify ready")

        # 3. The producer, with its own write-only user, from the trainer image (it ships the digits).
        producer = users["producer"]
        password_dir = tmp_path / "producer-secret"
        password_dir.mkdir()
        (password_dir / "redis-password").write_text(producer.password)
        os.chown(password_dir / "redis-password", uid, gid)
        pushed = run_to_completion(
            images["trainer"],
            ["--count", str(NORMAL + ROTATED), "--rotated-fraction", str(ROTATED / (NORMAL + ROTATED))],
            command=["anomaly-producer"],
            env={
                "ANOMALY_REDIS_URL": f"redis://producer@127.0.0.1:{server.port}/0",
                "ANOMALY_REDIS_PASSWORD_FILE": "/var/run/secrets/producer/redis-password",
                "ANOMALY_SHARDS": str(SHARDS),
                "ANOMALY_INPUT_STREAM": "images",
            },
            volumes=[Volume(password_dir, "/var/run/secrets/producer", read_only=True)],
            read_only_root=True,
            log_dir=tmp_path,
            timeout=300,
        )
        assert pushed.returncode == 0, pushed.output

        # 4. Scored once each, in both shards.
        def drained() -> bool:
            groups = [admin.xinfo_groups(f"images:{{{s}}}") for s in range(SHARDS)]
            return all(g and g[0]["lag"] == 0 and g[0]["pending"] == 0 for g in groups)

        w0.wait_until(drained, 120, "both shards drained and acknowledged")
        scored = sum(metric_sum(metrics_text(p), "anomaly_messages_scored_total") for p in ports)
        assert scored == NORMAL + ROTATED
        flagged = {s: [f for _, f in admin.xrange(f"anomalies:{{{s}}}")] for s in range(SHARDS)}
        assert all(flagged.values()), {s: len(v) for s, v in flagged.items()}
        ids = [f[b"id"].decode() for entries in flagged.values() for f in entries]
        rotated_share = sum(i.startswith("rotated") for i in ids) / ROTATED
        normal_share = sum(i.startswith("normal") for i in ids) / NORMAL
        assert rotated_share > 0.8 and normal_share < 0.05, (rotated_share, normal_share)
        components = components_of(baseline["score"])  # each alert says why: the default's four
        for fields in (f for entries in flagged.values() for f in entries):
            parts = json.loads(fields[b"score_components"])
            assert tuple(parts) == components
            assert abs(sum(parts.values()) - float(fields[b"score"])) < 1e-3, fields
        assert sum(admin.xlen(f"images:dead-letter:{{{s}}}") for s in range(SHARDS)) == 0
        for worker in workers:  # the figures deploy/README's sizing quotes (pytest -rP shows them)
            children = [
                int(r["pid"]) for r in log_records(worker.log_text()) if r["msg"] == "scoring process started"
            ]
            rss = [rss_bytes(worker.main_pid()) / 2**20, *(rss_bytes(pid) / 2**20 for pid in children)]
            print(f"rehearsal: worker RSS after scoring, MiB (worker, scoring process): {rss}")

        # One blank-white frame per shard last (an anomaly to any model of digits), so that the
        # newest alerts of the deployment come from both shards, whichever worker finished last.
        white = ImageProducer(as_user(server, producer), "images", shards=SHARDS)
        last = {}
        for shard in range(SHARDS):
            frame_id = next(f"white-{i}" for i in range(1000) if shard_of_id(f"white-{i}", SHARDS) == shard)
            last[shard] = white.push(np.full(784, 255, np.uint8), frame_id).decode()
        w0.wait_until(
            lambda: all(
                any(
                    f[b"source_id"].decode() == last[s]
                    for _, f in admin.xrevrange(f"anomalies:{{{s}}}", count=5)
                )
                for s in range(SHARDS)
            ),
            60,
            "the two white frames flagged",
        )

        # 5a. Every anomaly of both shards reached the receiver: one by one up to the rate limit,
        #     the rest counted in summaries; each key once; nothing left unacknowledged.
        anomalies = {
            f"images:{{{s}}}/{f[b'source_id'].decode()}"
            for s in range(SHARDS)
            for _, f in admin.xrange(f"anomalies:{{{s}}}")
        }

        def notified(requests: list[Any]) -> bool:
            answered = [r for r in requests if r.status == 200]
            singles = [r for r in answered if r.body.get("kind") != "summary"]
            summarised = sum(r.body["count"] for r in answered if r.body.get("kind") == "summary")
            return len(singles) + summarised >= len(anomalies)

        receiver.wait_for(notified, 90, "every anomaly posted or summarised")
        notifier.wait_until(
            lambda: all(
                admin.xpending(f"anomalies:{{{s}}}", "anomaly-notify")["pending"] == 0 for s in range(SHARDS)
            ),
            30,
            "every anomaly acknowledged by the notifier",
        )
        answered = [r for r in receiver.requests if r.status == 200]
        singles = [r.key for r in answered if r.body.get("kind") != "summary"]
        summarised = sum(r.body["count"] for r in answered if r.body.get("kind") == "summary")
        assert len(singles) == len(set(singles)) and set(singles) <= anomalies, singles[:5]
        assert len(singles) + summarised == len(anomalies), (len(singles), summarised, len(anomalies))
        assert all(
            r.body["source_id"] and tuple(r.body["score_components"]) == components
            for r in answered
            if r.body.get("kind") != "summary"
        )
        print(f"rehearsal: notify posted {len(singles)} anomalies and {summarised} in summaries")

        # 5b. The viewer pod: the newest anomalies of both shards, their pictures, a label each.
        viewer_pod = render_pod(deployments["anomaly-viewer"], data, "anomaly-viewer-7c4b9-q2", links)
        viewer_port = free_port()
        entrypoint = image_config(images["viewer"])["Entrypoint"]
        with start(
            images,
            viewer_pod,
            tmp_path / "viewer",
            [art],
            {"ANOMALY_SHARDS": str(SHARDS)},
            args=[*entrypoint[1:], "--port", str(viewer_port)],
        ) as viewer:
            base = f"http://127.0.0.1:{viewer_port}"
            viewer.wait_until(lambda: _get(base + "/", "localhost")[0] == 200, 60, "the viewer's page")
            _, page = _get(base + "/", "localhost")
            for shard in range(SHARDS):
                newest = admin.xrevrange(f"anomalies:{{{shard}}}", count=1)[0]
                assert newest[1][b"source_id"].decode() == last[shard]
                assert last[shard] in page, f"the newest anomaly of shard {shard} is not on the page"
                picture = f"/image/original/{shard}/{newest[0].decode()}.png"
                assert _get(base + picture, "localhost")[0] == 200
            assert _get(base + "/", "viewer.evil.example")[0] == 400  # the trusted-host check
            labelled = 0
            for shard, entries in flagged.items():
                for fields in entries[:8]:
                    label = "anomaly" if fields[b"id"].startswith(b"rotated") else "normal"
                    assert _label(base, fields[b"source_id"].decode(), shard, label) == 200
                    labelled += 1
            assert admin.xlen("anomaly-labels") == labelled
            assert viewer.terminate(30) == 0, viewer.log_text()[-2000:]

        # 6. KEDA's user: what its triggers read (the generator's ScaledObject for 2 shards).
        keda = as_user(server, users["anomaly-keda"])
        for trigger in keda_triggers(SHARDS):
            meta = trigger["metadata"]
            if "lagCount" in meta:
                assert keda.xinfo_groups(meta["stream"])[0]["lag"] == 0
            else:
                assert keda.xpending(meta["stream"], meta["consumerGroup"])["pending"] == 0
        assert nopermission(lambda: keda.xadd("images:{0}", {"image": b"x"}))
        assert nopermission(lambda: keda.xack("images:{0}", "anomaly-scorer", "0-1"))
        assert nopermission(lambda: keda.xrange("anomalies:{0}", count=1))

        # 7. retune, in the trainer image, with its own user and a password file; the workers reload.
        retune_dir = tmp_path / "retune-secret"
        retune_dir.mkdir()
        (retune_dir / "redis-password").write_text(users["anomaly-retune"].password + "\n")
        os.chown(retune_dir / "redis-password", uid, gid)
        os.chmod(artifacts, 0o775)
        retuned = run_to_completion(
            images["trainer"],
            ["retune", "/artifacts/model", "--target-precision", "0.5", "--out", "/artifacts/model"],
            env={
                "ANOMALY_REDIS_URL": f"redis://anomaly-retune@127.0.0.1:{server.port}/0",
                "ANOMALY_REDIS_PASSWORD_FILE": "/var/run/secrets/retune/redis-password",
                "ANOMALY_SHARDS": str(SHARDS),
            },
            volumes=[
                Volume(artifacts, "/artifacts"),
                Volume(retune_dir, "/var/run/secrets/retune", read_only=True),
            ],
            read_only_root=True,
            log_dir=tmp_path,
            timeout=300,
        )
        # Every label is of a real alert and the current threshold already meets the target: the
        # threshold stays, a new artifact version records where it came from, the workers load it.
        assert retuned.returncode == 0, retuned.output
        assert f"{labelled} entries read from anomaly-labels" in retuned.output, retuned.output
        assert f"{labelled} labels of alerts of model {baseline['model_version']}" in retuned.output
        for port in ports:
            w0.wait_until(lambda p=port: reloads(p) >= 1, 30, "the workers to reload the re-tuned artifact")
        retuned_baseline = json.loads((artifacts / "model" / "baseline.json").read_text())
        assert retuned_baseline["retune"]["labels_used"] == labelled
        assert "RETUNE" not in retuned_baseline["retune"]["labels_redis"]  # no password in the artifact
        print(f"rehearsal: retune\n{retuned.output[-1500:]}")

        # 8. Least privilege: what each documented user may not do.
        worker_user = as_user(server, users["anomaly-worker"])
        viewer_user = as_user(server, users["anomaly-viewer"])
        producer_user = as_user(server, producer)
        retune_user = as_user(server, users["anomaly-retune"])
        assert nopermission(lambda: worker_user.xadd("anomaly-labels", {"label": "anomaly"}))
        assert nopermission(lambda: viewer_user.xadd("images:{0}", {"image": b"x"}))
        assert nopermission(lambda: viewer_user.xdel("anomalies:{0}", "0-1"))
        assert nopermission(lambda: producer_user.xrange("images:{0}", count=1))
        assert nopermission(lambda: retune_user.xadd("anomaly-labels", {"label": "anomaly"}))
        assert nopermission(lambda: retune_user.xrange("images:{0}", count=1))

        for worker in [*workers, notifier]:
            assert worker.terminate(40) == 0, worker.log_text()[-2000:]
            assert worker.writes_to_root() == []
            assert "Traceback" not in worker.log_text()


def container_rss(container: Container) -> int:
    """Resident memory of everything a container runs (buildah's own processes left out)."""
    total = 0
    for pid in descendants(container.process.pid):
        with contextlib.suppress(OSError, AssertionError):
            comm = Path(f"/proc/{pid}/comm").read_text().strip()
            if not comm.startswith(("buildah", "memfd:buildah")):
                total += rss_bytes(pid)
    return total


def reloads(port: int) -> float:
    return metric_sum(metrics_text(port), "anomaly_model_reloads_total", '{result="success"}')


def keda_triggers(shards: int) -> list[dict[str, Any]]:
    """The triggers deploy/k8s/keda_scaledobject.py generates for `shards` shards."""
    done = subprocess.run(
        [sys.executable, str(K8S / "keda_scaledobject.py"), "--shards", str(shards)],
        capture_output=True,
        text=True,
        check=True,
    )
    return list(yaml.safe_load(done.stdout)["spec"]["triggers"])


def _get(url: str, host: str) -> tuple[int, str]:
    request = urllib.request.Request(url, headers={"Host": host})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read().decode("utf-8", "replace")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode("utf-8", "replace")
    except OSError:
        return 0, ""


def _label(base: str, source_id: str, shard: int, label: str) -> int:
    from urllib.parse import urlencode

    body = urlencode({"source_id": source_id, "label": label, "shard": shard}).encode()
    request = urllib.request.Request(
        base + "/label",
        data=body,
        headers={
            "Host": "localhost",
            "Authorization": f"Bearer {VIEWER_TOKEN}",
            "Accept": "application/json",
            "Content-Type": "application/x-www-form-urlencoded",
        },
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)
