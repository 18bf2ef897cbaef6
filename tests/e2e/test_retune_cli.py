"""`anomaly-trainer retune` as an operator runs it, against a real redis-server started by the
tests: labels are used only when they name an alert of the artifact's model, with the alert's
score; a threshold out of bounds is refused unless --force; it connects like every program
(ANOMALY_* settings, shards, a password file, a least-privilege ACL user)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import redis

from contract.labels import Label
from detector.artifact import load_artifact
from detector.retune import Target, retune
from tests.conftest import ROOT, RedisServer
from tests.support import publish_alert, write_retunable_artifact

pytestmark = pytest.mark.e2e

HELDOUT = np.arange(1000) / 1000  # held-out normal errors 0 .. 0.999
THRESHOLD = 0.8995  # the served threshold: flags 100 of them (10%)
# The operator's labels of the alerts: five false positives just above the threshold, then anomalies.
FALSE_POSITIVES = [0.9 + i / 1000 for i in range(5)]
ANOMALIES = [0.95 + i / 1000 for i in range(20)]


@pytest.fixture
def served(tmp_path: Path) -> Path:
    return write_retunable_artifact(tmp_path / "served", HELDOUT, THRESHOLD)


@pytest.fixture
def version(served: Path) -> str:
    return load_artifact(served).baseline.model_version


def label_alerts(
    client: redis.Redis,
    version: str,
    stream: str = "anomalies",
    normal: list[float] = FALSE_POSITIVES,
    anomalies: list[float] = ANOMALIES,
    prefix: str = "1796000000000",
    label_score: float | None = None,
) -> None:
    """Each score an alert of `version` in `stream`, labelled (without a score unless given)."""
    for i, score in enumerate([*normal, *anomalies]):
        source_id = f"{prefix}-{i}"
        publish_alert(client, stream, source_id, score, version)
        value = "normal" if i < len(normal) else "anomaly"
        client.xadd("anomaly-labels", Label(source_id, value, version, label_score, 1, "op").fields())  # type: ignore[arg-type]


def expected_threshold(target: Target, normal: list[float] = FALSE_POSITIVES) -> float:
    """What the genuine labels alone give (detector.retune, pure)."""
    scores = np.array([*normal, *ANOMALIES])
    is_anomaly = np.array([False] * len(normal) + [True] * len(ANOMALIES))
    return retune(scores, is_anomaly, HELDOUT, THRESHOLD, target).threshold


def run_retune(
    served: Path, server: RedisServer, *args: str, env: dict[str, str] | None = None, url: bool = True
) -> subprocess.CompletedProcess[str]:
    """`python -m trainer retune SERVED --out SERVED ARGS` with only the ANOMALY_* variables given."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("ANOMALY_")}
    environment = clean | {"PYTHONPATH": str(ROOT)} | (env or {})
    if url:
        environment.setdefault("ANOMALY_REDIS_URL", server.url)
    return subprocess.run(
        [sys.executable, "-m", "trainer", "retune", str(served), "--out", str(served), *args],
        env=environment,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def written_threshold(served: Path) -> float:
    return float(json.loads((served / "baseline.json").read_text())["threshold"]["value"])


@pytest.mark.parametrize(
    ("forged_score", "forged_label", "target"),
    [
        ("1e299", "normal", ["--target-fpr", "0.01"]),
        ("-1e300", "anomaly", ["--target-precision", "0.9"]),
        ("Infinity", "normal", ["--target-fpr", "0.01"]),
    ],
)
def test_forged_labels_with_made_up_ids_are_never_used(
    served: Path,
    version: str,
    redis_client: redis.Redis,
    redis_server: RedisServer,
    forged_score: str,
    forged_label: str,
    target: list[str],
) -> None:
    label_alerts(redis_client, version)
    for i in range(12):
        forged = {"source_id": f"9999999999999-{i}", "label": forged_label, "model_version": version}
        redis_client.xadd(
            "anomaly-labels", forged | {"score": forged_score, "labelled_at_ms": "1", "by": "x"}
        )
    done = run_retune(served, redis_server, *target)
    assert done.returncode == 0, done.stderr
    reason = "12 invalid" if forged_score == "Infinity" else "12 not an alert"  # the contract refuses inf
    assert f"skipped (never used): {reason}" in done.stdout
    assert "25 labels of alerts of model" in done.stdout
    kind = "fpr" if target[0] == "--target-fpr" else "precision"
    assert written_threshold(served) == pytest.approx(expected_threshold(Target(kind, float(target[1]))))


def test_only_forged_labels_are_too_few_verified_labels_and_nothing_is_written(
    served: Path, version: str, redis_client: redis.Redis, redis_server: RedisServer
) -> None:
    for i in range(12):
        forged = Label(f"9999999999999-{i}", "normal", version, 1e299, 1, "x")
        redis_client.xadd("anomaly-labels", forged.fields())  # type: ignore[arg-type]
    before = (served / "manifest.json").read_bytes()
    done = run_retune(served, redis_server, "--target-fpr", "0.01")
    assert done.returncode == 2
    assert (
        "0 labels of alerts of model" in done.stdout
        and "skipped (never used): 12 not an alert" in done.stdout
    )
    assert "needs labelled alerts of this model, at least 10; found 0" in done.stderr
    assert (served / "manifest.json").read_bytes() == before


def test_labels_without_a_score_are_used_with_the_alerts_score(
    served: Path, version: str, redis_client: redis.Redis, redis_server: RedisServer
) -> None:
    label_alerts(redis_client, version, label_score=None)
    done = run_retune(served, redis_server, "--target-precision", "0.9")
    assert done.returncode == 0, done.stderr
    assert (
        "25 labels of alerts of model" in done.stdout
        and "verified and used (20 anomaly, 5 normal)" in done.stdout
    )
    assert written_threshold(served) == pytest.approx(expected_threshold(Target("precision", 0.9)))


def test_a_labels_own_score_is_ignored_for_the_alerts(
    served: Path, version: str, redis_client: redis.Redis, redis_server: RedisServer
) -> None:
    label_alerts(redis_client, version, label_score=1e299)  # every label lies about its score
    done = run_retune(served, redis_server, "--target-precision", "0.9")
    assert done.returncode == 0, done.stderr
    assert written_threshold(served) == pytest.approx(expected_threshold(Target("precision", 0.9)))


def test_labels_of_another_model_version_are_skipped(
    served: Path, version: str, redis_client: redis.Redis, redis_server: RedisServer
) -> None:
    label_alerts(redis_client, version)
    # An older model's alerts labelled as such, and labels that claim this model for those alerts.
    label_alerts(redis_client, "0000000000000000", normal=[0.999] * 10, anomalies=[], prefix="1795000000000")
    for i in range(3):
        claim = Label(f"1795000000000-{i}", "normal", version, None, 1, "x")
        redis_client.xadd("anomaly-labels", claim.fields())  # type: ignore[arg-type]
    done = run_retune(served, redis_server, "--target-fpr", "0.01")
    assert done.returncode == 0, done.stderr
    assert "skipped (never used): 10 of another model version" in done.stdout
    assert written_threshold(served) == pytest.approx(expected_threshold(Target("fpr", 0.01)))


def test_a_threshold_out_of_bounds_exits_2_naming_the_bound_and_force_writes_it(
    served: Path, version: str, redis_client: redis.Redis, redis_server: RedisServer
) -> None:
    # False positives above every held-out error: precision 0.9 needs a threshold that flags none.
    label_alerts(redis_client, version, normal=[1.5 + i / 1000 for i in range(5)], anomalies=[])
    label_alerts(redis_client, version, normal=[], anomalies=[1.6 + i / 1000 for i in range(20)], prefix="17")
    before = (served / "manifest.json").read_bytes()
    refused = run_retune(served, redis_server, "--target-precision", "0.9")
    assert refused.returncode == 2
    assert (
        "change (p90 -> retuned precision>=0.9): threshold 0.8995 (flags 10.00% of held-out normal images, "
        "100/1000) -> 1.502 (0.00%, 0/1000)"
    ) in refused.stdout
    assert "anomaly-trainer retune: refused, nothing written:" in refused.stderr
    assert (
        "anomaly-trainer retune: bound flag rate: the new threshold 1.502 flags none of the 1000 held-out "
        "normal images, expected at least one"
    ) in refused.stderr
    assert refused.stderr.rstrip().endswith("give --force to write it anyway")
    assert (served / "manifest.json").read_bytes() == before

    forced = run_retune(served, redis_server, "--target-precision", "0.9", "--force")
    assert forced.returncode == 0, forced.stderr
    assert "--force: written past bound flag rate" in forced.stderr
    threshold = load_artifact(served).baseline.threshold  # verifies
    assert threshold.value == pytest.approx(1.502) and threshold.expected_flag_rate == 0.0


def test_with_two_shards_alerts_in_both_output_streams_are_found(
    served: Path, version: str, redis_client: redis.Redis, redis_server: RedisServer
) -> None:
    label_alerts(redis_client, version, "anomalies:{0}", normal=FALSE_POSITIVES, anomalies=[], prefix="16")
    label_alerts(redis_client, version, "anomalies:{1}", normal=[], anomalies=ANOMALIES, prefix="17")
    one_shard = run_retune(served, redis_server, "--target-precision", "0.9")
    assert one_shard.returncode == 2  # only `anomalies` is read: nothing is verified
    assert "skipped (never used): 25 not an alert" in one_shard.stdout
    done = run_retune(served, redis_server, "--target-precision", "0.9", env={"ANOMALY_SHARDS": "2"})
    assert done.returncode == 0, done.stderr
    assert "25 labels of alerts of model" in done.stdout
    assert (
        "alerts looked up in: anomalies:{0} (5 entries read), anomalies:{1} (20 entries read)" in done.stdout
    )
    assert written_threshold(served) == pytest.approx(expected_threshold(Target("precision", 0.9)))


def test_a_label_of_an_image_scored_normal_in_the_scores_stream_is_not_used(
    served: Path, version: str, redis_client: redis.Redis, redis_server: RedisServer
) -> None:
    label_alerts(redis_client, version)
    publish_alert(redis_client, "scores", "1797000000000-0", 0.999, version, flagged=True)  # trimmed alert
    publish_alert(redis_client, "scores", "1797000000000-1", 0.1, version, flagged=False)
    for i, value in enumerate(("anomaly", "anomaly")):
        label = Label(f"1797000000000-{i}", value, version, None, 1, "op")  # type: ignore[arg-type]
        redis_client.xadd("anomaly-labels", label.fields())  # type: ignore[arg-type]
    done = run_retune(
        served, redis_server, "--target-precision", "0.9", env={"ANOMALY_SCORES_STREAM": "scores"}
    )
    assert done.returncode == 0, done.stderr
    assert (
        "26 labels of alerts of model" in done.stdout
        and "skipped (never used): 1 scored normal" in done.stdout
    )
    assert "alerts looked up in: anomalies (25 entries read), scores (2 entries read)" in done.stdout


def test_an_unknown_anomaly_setting_is_refused(served: Path, redis_server: RedisServer) -> None:
    done = run_retune(served, redis_server, "--target-precision", "0.9", env={"ANOMALY_OUTPUT_STRAEM": "x"})
    assert done.returncode == 2
    assert (
        "anomaly-trainer retune: unknown setting ANOMALY_OUTPUT_STRAEM; did you mean ANOMALY_OUTPUT_STREAM?"
        in done.stderr
    )


# -- connecting as the documented least-privilege user ------------------------------------------
PASSWORD = "retune-acl-pw"


@pytest.fixture
def retune_user(redis_client: redis.Redis) -> Iterator[str]:
    """deploy/README.md's `anomaly-retune` ACL line, with PASSWORD."""
    lines = (ROOT / "deploy" / "README.md").read_text().splitlines()
    line = next(ln for ln in lines if ln.startswith("ACL SETUSER anomaly-retune "))
    redis_client.execute_command(*re.sub(r">[A-Z]+-PASSWORD", f">{PASSWORD}", line).split())
    try:
        yield "anomaly-retune"
    finally:
        redis_client.acl_deluser("anomaly-retune")


def test_the_documented_acl_user_with_a_password_file_retunes_and_may_not_write(
    served: Path,
    version: str,
    redis_client: redis.Redis,
    redis_server: RedisServer,
    retune_user: str,
    tmp_path: Path,
) -> None:
    label_alerts(redis_client, version)
    secret = tmp_path / "redis-password"
    secret.write_text(PASSWORD + "\n")
    env = {
        "ANOMALY_REDIS_URL": f"redis://{retune_user}@127.0.0.1:{redis_server.port}/0",
        "ANOMALY_REDIS_PASSWORD_FILE": str(secret),
    }
    done = run_retune(served, redis_server, "--target-precision", "0.9", env=env)
    assert done.returncode == 0, done.stderr
    assert written_threshold(served) == pytest.approx(expected_threshold(Target("precision", 0.9)))
    assert PASSWORD not in (served / "baseline.json").read_text() + done.stdout + done.stderr
    limited = redis.Redis(port=redis_server.port, username=retune_user, password=PASSWORD)
    try:
        for stream in ("anomaly-labels", "anomalies"):
            with pytest.raises(redis.exceptions.NoPermissionError):
                limited.xadd(stream, {"forged": "1"})
            with pytest.raises(redis.exceptions.NoPermissionError):
                limited.xtrim(stream, maxlen=0)
        with pytest.raises(redis.exceptions.NoPermissionError):
            limited.delete("anomaly-labels")
    finally:
        limited.close()


def test_a_password_in_the_urls_query_is_neither_printed_nor_recorded(
    served: Path, version: str, redis_client: redis.Redis, redis_server: RedisServer, retune_user: str
) -> None:
    label_alerts(redis_client, version)
    url = f"redis://{retune_user}@127.0.0.1:{redis_server.port}/0?password={PASSWORD}"
    done = run_retune(served, redis_server, "--labels", url, "--target-precision", "0.9", url=False)
    assert done.returncode == 0, done.stderr
    record = json.loads((served / "baseline.json").read_text())["retune"]
    assert record["labels_redis"] == f"redis://{retune_user}@127.0.0.1:{redis_server.port}/0?password=***"
    assert PASSWORD not in (served / "baseline.json").read_text() + done.stdout + done.stderr
    wrong = url.replace(PASSWORD, "not-the-password")
    refused = run_retune(served, redis_server, "--labels", wrong, "--target-precision", "0.9", url=False)
    assert refused.returncode == 2
    assert "cannot read anomaly-labels and the alerts it names from" in refused.stderr
    assert "password=***" in refused.stderr and "not-the-password" not in refused.stderr
