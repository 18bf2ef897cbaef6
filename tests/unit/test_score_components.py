"""Each alert says why: a flagged image's output entry carries `score_components`, what each
component of the score added to it, so that an operator sees whether the reconstruction, the
orientation or the hidden-layer distance flagged it."""

from __future__ import annotations

import json
from pathlib import Path

import fakeredis
import jsonschema
import numpy as np
import pytest

from contract.schemas import entry_as_json, load_schema
from detector.artifact import load_artifact
from detector.datasets import rotate90
from detector.engines.keras_engine import KerasScorer
from detector.engines.numpy_engine import NumpyScorer
from detector.score import DEFAULT_SCORE, components_of
from producer.client import ImageProducer
from tests.conftest import mnist_sample
from tests.support import build_runner, make_model, push
from worker.loaded_model import LoadedModel
from worker.scoring import DecisionRule

pytestmark = pytest.mark.slow


def served(artifact_path: Path) -> LoadedModel:
    """The numpy engine's model of an artifact with its own decision rule, as the worker loads it."""
    artifact = load_artifact(artifact_path)
    return LoadedModel(
        NumpyScorer(artifact),
        DecisionRule.from_artifact(artifact),
        artifact.baseline.preprocessing.uint8_scale,
        artifact.manifest_digest,
        region_side=28,
    )


def test_a_combined_score_is_the_sum_of_its_components_contributions_in_both_engines_from_one_pass(
    default_artifact: Path,
) -> None:
    artifact = load_artifact(default_artifact)
    x, _ = mnist_sample(48, seed=11)
    for scorer in (NumpyScorer(artifact), KerasScorer(artifact, max_batch=64, jit=False)):
        why = scorer.explain(x)
        names, values = why.names, why.contributions
        assert names == components_of(DEFAULT_SCORE)
        assert values.shape == (48, 4)
        np.testing.assert_allclose(values.sum(axis=1), scorer.score_batch(x), rtol=1e-4, atol=1e-4)
        # The same pass says where: the region's squared errors, without another reconstruction.
        np.testing.assert_allclose(why.squared_error, scorer.squared_error(x), rtol=1e-5, atol=1e-7)


def test_each_contribution_is_its_components_score_standardised_on_held_out_normal_images(
    default_artifact: Path,
) -> None:
    artifact = load_artifact(default_artifact)
    scorer = NumpyScorer(artifact)
    x, _ = mnist_sample(16, seed=12)
    score = artifact.score
    parts = score.parts(scorer.forward(scorer.scaling(x)))
    values = scorer.explain(x).contributions
    for column, (part, mean, std) in enumerate(
        zip(parts, score.combine_mean, score.combine_std, strict=True)
    ):
        np.testing.assert_allclose(values[:, column], (part - mean) / std, rtol=1e-6)


def test_a_one_component_score_contributes_its_whole_score(tiny_artifact: Path) -> None:
    scorer = NumpyScorer(load_artifact(tiny_artifact))
    x, _ = mnist_sample(16, seed=13)
    why = scorer.explain(x)
    names, values = why.names, why.contributions
    assert names == ("mse",)
    np.testing.assert_allclose(values[:, 0], scorer.score_batch(x), rtol=1e-6)


def test_a_flagged_images_output_entry_names_what_flagged_it_and_the_scores_stream_does_not(
    default_artifact: Path,
) -> None:
    r = fakeredis.FakeRedis()
    runner = build_runner(r, model=served(default_artifact), consumer="w1", scores_stream="scores")
    x, _ = mnist_sample(64, seed=14)
    producer = ImageProducer(r, "images")
    producer.push_many(x[:32], [f"normal-{i}" for i in range(32)])
    producer.push_many(rotate90(x[32:]), [f"rotated-{i}" for i in range(32)])
    runner.drain()
    outputs = [fields for _, fields in r.xrange("anomalies")]
    assert len(outputs) >= 4  # rotated digits flagged (a briefly trained model: not all of them)
    schema = load_schema("output-entry")
    for fields in outputs:
        jsonschema.validate(entry_as_json(fields), schema, cls=jsonschema.Draft202012Validator)
        parts = json.loads(fields[b"score_components"])
        assert list(parts) == list(components_of(DEFAULT_SCORE))
        assert sum(parts.values()) == pytest.approx(float(fields[b"score"]), abs=1e-3)
    assert all(b"score_components" not in fields for _, fields in r.xrange("scores"))


def test_the_fake_models_single_component_reaches_the_output_entry() -> None:
    r = fakeredis.FakeRedis()
    runner = build_runner(r, model=make_model(), consumer="w1")
    push(r, 0.9, pid="bright")
    push(r, 0.1, pid="dark")
    runner.drain()
    (entry,) = [fields for _, fields in r.xrange("anomalies")]
    assert json.loads(entry[b"score_components"]) == {"mean-pixel": round(float(entry[b"score"]), 4)}
