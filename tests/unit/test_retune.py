"""Re-tuning the threshold from labelled alerts and held-out normal errors (pure), and the artifact
`retune` writes: the same model, the new threshold, where the labels came from."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import fakeredis
import numpy as np
import pytest

from contract.labels import Label
from detector.artifact import load_artifact
from detector.retune import (
    BOUND_FINITE,
    BOUND_FLAG_RATE,
    BOUND_RANGE,
    MIN_LABELS,
    Target,
    TargetUnreachable,
    TooFewLabels,
    bound_violations,
    retune,
    threshold_change,
    wilson,
)
from runtime.settings import StreamSettings
from tests.support import publish_alert
from trainer.alerts import OTHER_MODEL
from trainer.cli import main as trainer_main
from trainer.retune import plan_retune, read_verified_labels, write_retuned

HELDOUT = np.linspace(0.0, 1.0, 1001)  # held-out normal errors, threshold 0.9 flags 10%


def labelled(normal_scores: list[float], anomaly_scores: list[float]) -> tuple[np.ndarray, np.ndarray]:
    scores = np.array(normal_scores + anomaly_scores)
    return scores, np.array([False] * len(normal_scores) + [True] * len(anomaly_scores))


def test_wilson_intervals_hold_the_estimate_and_stay_in_0_1() -> None:
    i = wilson(9, 10)
    assert i.value == 0.9 and 0.59 < i.low < 0.6 and 0.98 < i.high < 0.99
    assert wilson(0, 5).low == 0.0 and wilson(5, 5).high == 1.0
    assert np.isnan(wilson(0, 0).value)


def test_a_precision_target_raises_the_threshold_past_the_false_positives() -> None:
    # Alerts above 0.9: false positives score 0.91-0.95, true anomalies 0.96 and up.
    scores, is_anomaly = labelled([0.91, 0.92, 0.93, 0.94, 0.95], [0.96 + 0.01 * i for i in range(15)])
    result = retune(scores, is_anomaly, HELDOUT, current=0.9, target=Target("precision", 0.9))
    assert result.before.precision.value == pytest.approx(15 / 20)
    assert result.threshold == pytest.approx(0.94)  # the lowest with precision >= 0.9: 15 / 16
    assert result.after.precision.value == pytest.approx(15 / 16)
    assert result.after.recall.value == 1.0  # every anomaly labelled is still caught
    assert result.after.fpr.value < result.before.fpr.value


def test_a_precision_target_keeps_the_current_threshold_when_it_is_met_already() -> None:
    scores, is_anomaly = labelled([0.91], [0.92 + 0.01 * i for i in range(19)])
    result = retune(scores, is_anomaly, HELDOUT, current=0.9, target=Target("precision", 0.9))
    assert result.threshold == 0.9


def test_an_fpr_target_counts_the_alerts_labelled_normal_as_normal_images() -> None:
    scores, is_anomaly = labelled([0.995] * 10, [2.0] * 10)
    without_labels = float(np.quantile(HELDOUT, 0.99, method="higher"))
    result = retune(scores, is_anomaly, HELDOUT, current=0.9, target=Target("fpr", 0.01))
    # 1011 normal scores, 10 allowed above: the ten false positives at 0.995 push it above them.
    assert result.threshold >= without_labels
    assert result.after.fpr.successes <= 10
    assert result.after.recall.value == 1.0


def test_too_few_labels_for_the_target_is_refused_with_the_rule() -> None:
    scores, is_anomaly = labelled([0.95], [1.0] * (MIN_LABELS - 2))
    with pytest.raises(
        TooFewLabels, match=r"needs labelled alerts .* at least max\(10, 1/\(1-P\)\) = 10 .* found 9"
    ):
        retune(scores, is_anomaly, HELDOUT, 0.9, Target("precision", 0.9))
    scores, is_anomaly = labelled([0.95] * 5, [1.0] * 45)
    with pytest.raises(TooFewLabels, match=r"= 100 for precision 0\.99; found 50"):
        retune(scores, is_anomaly, HELDOUT, 0.9, Target("precision", 0.99))


def test_a_target_the_labels_cannot_support_is_refused() -> None:
    scores, is_anomaly = labelled([1.5] * 10, [1.0] * 10)  # every false positive scores highest
    with pytest.raises(TargetUnreachable, match="best the labels support is precision"):
        retune(scores, is_anomaly, HELDOUT, 0.9, Target("precision", 0.9))


def test_a_target_outside_0_1_is_refused() -> None:
    with pytest.raises(ValueError, match="between 0 and 1"):
        Target("precision", 1.0)


# -- the bounds a new threshold must keep ------------------------------------------------------
ERRORS = np.arange(1000, dtype=np.float64)  # held-out errors 0..999: 899.5 flags 100 of them
ALERTS = np.array([950.0, 990.0, 1200.0, 1400.0])  # verified alerts' scores


def violations(new: float, current: float = 899.5) -> dict[str, str]:
    found = bound_violations(threshold_change(current, new, ERRORS), ALERTS, ERRORS)
    return {v.bound: v.message for v in found}


def test_the_change_counts_the_held_out_images_each_threshold_flags() -> None:
    change = threshold_change(899.5, 949.5, ERRORS)
    assert (change.old_flagged, change.new_flagged, change.heldout) == (100, 50, 1000)
    assert change.text() == (
        "threshold 899.5 (flags 10.00% of held-out normal images, 100/1000) -> 949.5 (5.00%, 50/1000)"
    )


def test_a_threshold_within_range_and_flag_rate_bounds_may_be_written() -> None:
    assert violations(949.5) == {}
    assert violations(989.5) == {}  # 10 of 1000 flagged, from 100: 10x fewer, the bound itself
    assert violations(0.0) == {}  # 999 of 1000 flagged: 9.99x more


@pytest.mark.parametrize("value", [float("inf"), float("-inf"), float("nan")])
def test_a_threshold_that_is_not_finite_breaks_the_finite_bound(value: float) -> None:
    assert violations(value) == {
        BOUND_FINITE: f"bound finite: the new threshold is {value}, expected a finite number"
    }


def test_a_threshold_above_every_error_and_alert_breaks_the_range_and_flags_nothing() -> None:
    found = violations(1e299)
    assert found[BOUND_RANGE] == (
        "bound range: the new threshold 1e+299 lies outside [0, 1400], expected within the range of the "
        "1000 held-out errors and the 4 labelled alerts' scores"
    )
    assert found[BOUND_FLAG_RATE] == (
        "bound flag rate: the new threshold 1e+299 flags none of the 1000 held-out normal images, expected "
        "at least one (a threshold that flags nothing silences the detector); found 0.00% (0/1000)"
    )


def test_a_threshold_below_every_error_breaks_the_range_bound() -> None:
    found = violations(-1e300)
    assert set(found) == {BOUND_RANGE}  # 1000 of 1000 flagged, from 100: 10x, within the rate bound
    assert found[BOUND_RANGE].startswith("bound range: the new threshold -1e+300 lies outside [0, 1400]")


def test_flagging_no_held_out_image_breaks_the_flag_rate_bound_even_within_range() -> None:
    found = violations(1200.0)  # above every held-out error, below an alert
    assert set(found) == {BOUND_FLAG_RATE}
    assert "flags none of the 1000 held-out normal images, expected at least one" in found[BOUND_FLAG_RATE]


def test_a_flag_rate_change_of_more_than_10x_either_way_breaks_the_bound() -> None:
    assert violations(991.5) == {  # from 100 to 8 of 1000 flagged: 12.5x fewer
        BOUND_FLAG_RATE: "bound flag rate: the new threshold 991.5 changes the share of held-out normal "
        "images flagged more than 10x: expected 1.00% to 100.00% (the current 10.00%, 100/1000, within "
        "10x), found 0.80% (8/1000)"
    }
    higher = violations(499.5, current=989.5)  # from 10 to 500 of 1000: 50x more
    assert set(higher) == {BOUND_FLAG_RATE}
    assert higher[BOUND_FLAG_RATE].endswith(
        "expected 0.10% to 10.00% (the current 1.00%, 10/1000, within 10x), found 50.00% (500/1000)"
    )


def test_moving_off_a_threshold_that_flags_nothing_breaks_the_flag_rate_bound() -> None:
    found = violations(989.5, current=1200.0)
    assert set(found) == {BOUND_FLAG_RATE}
    assert found[BOUND_FLAG_RATE].endswith(
        "expected within 10x of the current threshold's, which flags none of them (0/1000), found 1.00% "
        "(10/1000)"
    )


# -- the artifact retune writes ----------------------------------------------------------------
def alerts_and_labels(
    r: fakeredis.FakeRedis, version: str, scores: np.ndarray, is_anomaly: np.ndarray
) -> None:
    """Each score an alert in the output stream, labelled without a score (retune uses the alert's)."""
    for i, (score, anomaly) in enumerate(zip(scores, is_anomaly, strict=True)):
        publish_alert(r, "anomalies", f"{i + 1}-0", float(score), version)
        label = Label(f"{i + 1}-0", "anomaly" if anomaly else "normal", version, None, 1, "test")
        r.xadd("anomaly-labels", label.fields())  # type: ignore[arg-type]
    r.xadd("anomaly-labels", Label("99-0", "normal", "another-model", 0.1, 1, "test").fields())  # type: ignore[arg-type]


def test_retune_writes_the_same_model_with_the_new_threshold_and_where_it_came_from(
    tiny_artifact: Path, tmp_path: Path
) -> None:
    source = load_artifact(tiny_artifact)
    t0 = source.baseline.threshold.value
    version = source.baseline.model_version
    scores, is_anomaly = labelled([t0 * 1.1] * 4, [t0 * 2 + i * 1e-3 for i in range(16)])
    r = fakeredis.FakeRedis()
    alerts_and_labels(r, version, scores, is_anomaly)
    read = read_verified_labels(r, StreamSettings(), version)
    plan = plan_retune(source, read.verified, Target("precision", 0.95))
    out = tmp_path / "retuned"
    write_retuned(
        plan, out, read, labels_stream="anomaly-labels", redis_url="redis://:secret@labels:6379/0?password=s2"
    )
    new = load_artifact(out)  # checksums recomputed: it verifies
    assert new.model_bytes == source.model_bytes
    assert new.baseline.model_version == version
    assert new.baseline.threshold.value == pytest.approx(t0 * 1.1)
    assert new.baseline.threshold.policy == "retuned precision>=0.95"
    assert new.baseline.threshold.expected_flag_rate == plan.change.new_rate
    record = json.loads((out / "baseline.json").read_text())["retune"]
    assert record["labels_stream"] == "anomaly-labels"
    assert record["labels_redis"] == "redis://:***@labels:6379/0?password=***"
    assert record["labels_read"] == 21 and record["labels_used"] == 20
    assert record["labels_last_id"] == r.xrevrange("anomaly-labels", count=1)[0][0].decode()
    assert record["before"]["precision"]["value"] == pytest.approx(0.8)
    assert record["after"]["precision"]["value"] == 1.0
    assert record["previous_threshold"]["value"] == t0
    assert read.verified.skipped[OTHER_MODEL] == 1
    assert (
        "secret" not in (out / "baseline.json").read_text()
        and "s2" not in (out / "baseline.json").read_text()
    )


def test_an_artifact_never_retuned_has_no_retune_record(tiny_artifact: Path) -> None:
    assert "retune" not in json.loads((tiny_artifact / "baseline.json").read_text())


def test_the_cli_refuses_too_few_labels_and_leaves_the_artifact_alone(
    tiny_artifact: Path, tmp_path: Path, redis_server, redis_client, capsys: pytest.CaptureFixture[str]
) -> None:
    version = load_artifact(tiny_artifact).baseline.model_version
    for i in range(3):
        publish_alert(redis_client, "anomalies", f"{i + 1}-0", 1.0, version)
        redis_client.xadd("few-labels", Label(f"{i + 1}-0", "normal", version, None, 1, "t").fields())  # type: ignore[arg-type]
    served = tmp_path / "served"
    shutil.copytree(tiny_artifact, served)
    before = (served / "manifest.json").read_bytes()
    argv = ["retune", str(served), "--labels", redis_server.url, "--labels-stream", "few-labels"]
    code = trainer_main([*argv, "--target-precision", "0.9", "--out", str(served)])
    assert code == 2
    out, err = capsys.readouterr()
    assert "3 labels of alerts of model" in out and "verified and used (0 anomaly, 3 normal)" in out
    assert "needs labelled alerts of this model, at least max(10, 1/(1-P)) = 10" in err
    assert "found 3 (0 anomaly, 3 normal)" in err
    assert (served / "manifest.json").read_bytes() == before
