"""Command lines written in deploy files are accepted by the CLIs they call, so a renamed flag
fails here rather than in a crash-looping container."""

from __future__ import annotations

import json
import re
import shlex
from typing import Any

import pytest

from .conftest import dockerfile_instructions, instructions_of, k8s_object, pod_spec


def _trainer_parse(argv: list[str]) -> Any:
    from trainer.cli import build_parser

    return build_parser().parse_args(argv)


def _producer_parse(argv: list[str]) -> Any:
    from producer.cli import build_parser

    return build_parser().parse_args(argv)


def _after(words: list[str], program: str) -> list[str]:
    """The arguments that follow `program` in a command line."""
    assert program in words, f"{program} not in {words}"
    return words[words.index(program) + 1 :]


def test_compose_trainer_command_is_accepted_by_the_trainer(compose: dict[str, Any]) -> None:
    script = compose["services"]["trainer"]["command"]
    script = script[-1] if isinstance(script, list) else script
    args = _trainer_parse(_after(shlex.split(script), "anomaly-trainer"))
    assert args.dataset == "mnist"


def test_compose_producer_command_is_accepted_by_the_producer(compose: dict[str, Any]) -> None:
    producer = compose["services"]["producer"]
    assert producer["entrypoint"] == ["anomaly-producer"]
    args = _producer_parse([str(word) for word in producer["command"]])
    assert args.count > 0


def test_kubernetes_training_job_args_are_accepted_by_the_trainer() -> None:
    container = pod_spec(k8s_object("Job", "anomaly-trainer"))["containers"][0]
    assert "command" not in container, "the image's ENTRYPOINT (anomaly-trainer) must run"
    args = _trainer_parse([str(word) for word in container["args"]])
    assert str(args.out) == "/artifacts/model"


def test_trainer_image_default_command_is_accepted_by_the_trainer() -> None:
    steps = instructions_of("trainer")
    entrypoint = json.loads([args for kw, args in steps if kw == "ENTRYPOINT"][-1])
    assert entrypoint == ["anomaly-trainer"]
    _trainer_parse(json.loads([args for kw, args in steps if kw == "CMD"][-1]))


def test_build_time_training_command_is_accepted_by_the_trainer() -> None:
    defaults = {}
    runs = []
    for stage, keyword, args in dockerfile_instructions():
        if stage != "trained":
            continue
        if keyword == "ARG" and "=" in args:
            name, value = args.split("=", 1)
            defaults[name] = value
        if keyword == "RUN" and "anomaly-trainer" in args:
            runs.append(args)
    assert len(runs) == 1, "the `trained` stage runs anomaly-trainer once"
    command = re.sub(r"\$\{(\w+)\}", lambda m: defaults[m.group(1)], runs[0].split("&&")[-1])
    args = _trainer_parse(_after(shlex.split(command), "anomaly-trainer"))
    assert args.dataset == "mnist"


def _build_time_training_argv() -> list[str]:
    """The trained stage's anomaly-trainer arguments with the build args' defaults."""
    defaults = {}
    runs = []
    for stage, keyword, args in dockerfile_instructions():
        if stage == "trained" and keyword == "ARG":
            name, _, value = args.partition("=")
            defaults[name] = value
        if stage == "trained" and keyword == "RUN" and "anomaly-trainer" in args:
            runs.append(args)
    command = re.sub(r"\$\{(\w+)\}", lambda m: defaults[m.group(1)], runs[-1].split("&&")[-1])
    return _after(shlex.split(command), "anomaly-trainer")


def test_every_shipped_training_command_trains_the_documented_default(compose: dict[str, Any]) -> None:
    """The Job, compose's trainer and the baked image pass no flag that changes what is trained
    (epochs, threshold, score, ...): what `anomaly-trainer train --help` documents as the default."""
    job = [str(word) for word in pod_spec(k8s_object("Job", "anomaly-trainer"))["containers"][0]["args"]]
    script = compose["services"]["trainer"]["command"]
    script = script[-1] if isinstance(script, list) else script
    commands = {
        "deploy/k8s/job-train.yaml": job,
        "deploy/compose.yaml trainer": _after(shlex.split(script), "anomaly-trainer"),
        "deploy/Dockerfile trained stage": _build_time_training_argv(),
    }
    for where, argv in commands.items():
        parsed = vars(_trainer_parse(argv))
        default = vars(_trainer_parse(["train", "--dataset", "mnist", "--out", str(parsed["out"])]))
        changed = {name: value for name, value in parsed.items() if default[name] != value}
        assert not changed, f"{where} trains with {changed}, not the documented default"


def test_trainer_parser_rejects_an_unknown_flag() -> None:
    with pytest.raises(SystemExit):
        _trainer_parse(["train", "--dataset", "mnist", "--out", "/tmp/x", "--epocs", "3"])


def test_viewer_image_entrypoint_is_accepted_by_the_viewer() -> None:
    from viewer.cli import build_parser

    steps = instructions_of("viewer")
    entrypoint = json.loads([args for kw, args in steps if kw == "ENTRYPOINT"][-1])
    assert entrypoint[0] == "anomaly-viewer"
    args = build_parser().parse_args(entrypoint[1:])
    assert (args.host, args.port) == ("0.0.0.0", 9500)
    assert "9500" in [a for kw, a in steps if kw == "EXPOSE"]


def test_compose_viewer_publishes_the_viewer_port_on_localhost_only(compose: dict[str, Any]) -> None:
    viewer = compose["services"]["viewer"]
    assert viewer["build"]["target"] == "viewer"
    assert viewer["ports"] == ["127.0.0.1:9500:9500"]
    assert (
        viewer["environment"]["ANOMALY_OUTPUT_STREAM"]
        == compose["services"]["worker"]["environment"]["ANOMALY_OUTPUT_STREAM"]
    )
