#!/usr/bin/env python3
"""Builds the images of deploy/Dockerfile with buildah: no Docker daemon, no registry needed.

    python3 deploy/images.py build                    # every target (`make images`), then the sizes
    python3 deploy/images.py build worker trainer     # some targets
    python3 deploy/images.py exists anomaly-scorer-worker:dev   # exit 0 when the image is stored
    python3 deploy/images.py sizes                    # the table, for images already built
    python3 deploy/images.py base                     # make the stand-in base image (again)

The Dockerfile's base is the official python:3.11.14-slim-bookworm (its `BASE_IMAGE` build
argument's default), which machines with a registry pull. Where none is reachable, `build` makes a
stand-in when it is absent and builds on it (`--registry-base` builds on the official one instead):
Debian bookworm's own python3 (3.11) installed by debootstrap, `python` on PATH at /usr/local/bin
as in the official image, and this machine's CA bundle, so pip inside the build trusts whatever
TLS interception sits between this machine and PyPI (Debian's pip reads the system bundle).

Up to date means built from the same inputs: after each build a stamp (build/images/*.stamp.json)
records the image's ID and a digest of everything the build reads (the Dockerfile, the ignore
file, the base image's ID, every file the COPYs take from the context), and `build` skips a target
whose stamp matches without running buildah (`--force` runs it anyway). Builds use buildah's layer
cache (`--layers`), so a changed tree rebuilds from the first changed step only. The context is
filtered by deploy/Dockerfile.dockerignore, passed explicitly (`--ignorefile`). `--isolation
chroot`: it needs no OCI runtime (podman's cannot set rlimits on this machine); `--format docker`
keeps the HEALTHCHECK instructions, which the OCI format has no field for.

Standalone on purpose: only the standard library, nothing from the project (it runs before any
venv exists; tests load it by its path).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = REPO_ROOT / "deploy" / "Dockerfile"
DOCKERIGNORE = REPO_ROOT / "deploy" / "Dockerfile.dockerignore"
DEFAULT_LOG_DIR = REPO_ROOT / "build" / "images"

STAND_IN_BASE = "localhost/anomaly-scorer-base:bookworm"
DEBIAN_SUITE = "bookworm"
DEBIAN_PACKAGES = ("python3", "python3-venv", "ca-certificates")
DEFAULT_MIRROR = "http://deb.debian.org/debian"
CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
# Left out of the stand-in as the official slim image leaves them out: apt's downloaded packages
# and lists, manuals, translations and docs (copyright files stay).
TRIMMED = ("var/cache/apt/archives/*.deb", "var/lib/apt/lists/*", "usr/share/man/*", "usr/share/locale/*")


@dataclass(frozen=True)
class Target:
    """One stage of deploy/Dockerfile and the image name it is tagged with."""

    stage: str
    repository: str
    suffix: str = ""

    def image(self, tag: str = "dev") -> str:
        """The image name for a tag: anomaly-scorer-worker:dev-tensorflow."""
        return f"{self.repository}:{tag}{self.suffix}"


# Build order: the slim ones first (their layers are small), then the TensorFlow builders; the baked
# worker last, as its artifact is trained in the trainer image's layers.
TARGETS = (
    Target("worker", "anomaly-scorer-worker"),
    Target("viewer", "anomaly-scorer-viewer"),
    Target("notify", "anomaly-scorer-notify"),
    Target("worker-tensorflow", "anomaly-scorer-worker", "-tensorflow"),
    Target("trainer", "anomaly-scorer-trainer"),
    Target("worker-baked", "anomaly-scorer-worker", "-baked"),
)
TARGETS_BY_STAGE = {target.stage: target for target in TARGETS}


class BuildError(RuntimeError):
    """A buildah or debootstrap command failed; the message ends with its output's last lines."""


@dataclass(frozen=True)
class Built:
    """One target built (or found up to date: `reused`): its image, the build's time, its size."""

    target: Target
    image: str
    seconds: float
    size_bytes: int
    reused: bool = False


# ---------------------------------------------------------------- buildah queries


def buildah_installed() -> bool:
    """Whether the buildah command is on PATH."""
    return shutil.which("buildah") is not None


def _buildah(*args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    """Run `buildah ARGS`, capture its output as text, never raise on a non-zero exit."""
    return subprocess.run(["buildah", *args], capture_output=True, text=True, timeout=timeout, check=False)


def image_exists(image: str) -> bool:
    """Whether buildah's storage holds `image` (a name or an ID)."""
    return _buildah("inspect", "--type", "image", image).returncode == 0


def image_id(image: str) -> str | None:
    """The full ID of `image`, or None when buildah's storage does not hold it."""
    done = _buildah("inspect", "--type", "image", "--format", "{{.FromImageID}}", image)
    return done.stdout.strip() or None if done.returncode == 0 else None


def inspect_image(image: str) -> dict[str, object]:
    """`buildah inspect --type image` of `image`, parsed."""
    done = _buildah("inspect", "--type", "image", image)
    if done.returncode != 0:
        raise BuildError(f"no image {image} in buildah's storage: {done.stderr.strip()}")
    inspected: dict[str, object] = json.loads(done.stdout)
    return inspected


def image_size_bytes(image: str) -> int:
    """The image's size unpacked: the sum of its layers as buildah stores them (uncompressed tars),
    what `docker image ls` reports for the same layers."""
    manifest = inspect_image(image)["Manifest"]
    layers = json.loads(manifest if isinstance(manifest, str) else json.dumps(manifest))["layers"]
    return sum(int(layer["size"]) for layer in layers)


def storage_bytes() -> int:
    """Disk used by buildah's storage (images, layers, build cache): `du` of its graph root."""
    info = json.loads(_buildah("info").stdout)
    root = info["store"]["GraphRoot"]
    done = subprocess.run(["du", "-sb", root], capture_output=True, text=True, check=True)
    return int(done.stdout.split()[0])


# ---------------------------------------------------------------- the stand-in base


def debian_mirror(sources: Path = Path("/etc/apt/sources.list.d/debian.sources")) -> str:
    """The Debian mirror this machine's apt uses for the suite (deb822 or one-line format)."""
    candidates = [sources, Path("/etc/apt/sources.list")]
    for path in candidates:
        if not path.is_file():
            continue
        text = path.read_text(encoding="utf-8")
        for stanza in re.split(r"\n\s*\n", text):
            uris = re.search(r"^URIs:\s*(\S+)", stanza, re.MULTILINE)
            suites = re.search(r"^Suites:\s*(.+)$", stanza, re.MULTILINE)
            if uris and suites and DEBIAN_SUITE in suites.group(1).split():
                return uris.group(1)
        for line in text.splitlines():
            words = line.split()
            if len(words) >= 3 and words[0] == "deb" and words[2] == DEBIAN_SUITE:
                return words[1] if not words[1].startswith("[") else words[2]
    return DEFAULT_MIRROR


def make_base(
    name: str = STAND_IN_BASE, mirror: str | None = None, ca_bundle: Path = CA_BUNDLE, log: Path | None = None
) -> float:
    """Make the stand-in base image `name` with debootstrap; return the seconds it took."""
    if shutil.which("debootstrap") is None:
        raise BuildError("debootstrap is not installed (apt-get install debootstrap)")
    started = time.monotonic()
    container = _buildah("from", "scratch").stdout.strip()
    if not container:
        raise BuildError("buildah from scratch gave no container")
    try:
        mounted = _buildah("mount", container)
        _check(mounted)
        root = Path(mounted.stdout.strip())
        if not root.is_absolute() or not root.is_dir():
            raise BuildError(f"buildah mount {container} gave no directory: {mounted.stdout!r}")
        # Straight into the container's root: no copy of the tree.
        _stream(
            [
                "debootstrap",
                "--variant=minbase",
                f"--include={','.join(DEBIAN_PACKAGES)}",
                DEBIAN_SUITE,
                str(root),
                mirror or debian_mirror(),
            ],
            log,
        )
        for pattern in TRIMMED:
            for path in root.glob(pattern):
                shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
        for path in sorted((root / "usr/share/doc").rglob("*"), reverse=True):
            if path.is_symlink() or (path.is_file() and path.name != "copyright"):
                path.unlink()
            elif path.is_dir() and not any(path.iterdir()):
                path.rmdir()
        shutil.copyfile(ca_bundle, root / "etc/ssl/certs/ca-certificates.crt")
        (root / "usr/local/bin/python").symlink_to("/usr/bin/python3")
        _check(_buildah("umount", container))
        _check(
            _buildah(
                "config",
                "--env",
                "LANG=C.UTF-8",
                "--env",
                "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                "--cmd",
                "python3",
                "--label",
                "org.opencontainers.image.description=stand-in for python:3.11.14-slim-bookworm: "
                f"Debian {DEBIAN_SUITE} python3 by debootstrap (deploy/images.py), this machine's CA bundle",
                container,
            )
        )
        _check(_buildah("commit", "--rm", "--format", "docker", container, name))
    except BaseException:
        _buildah("rm", container)
        raise
    return time.monotonic() - started


# ---------------------------------------------------------------- build context


def dockerignore_patterns(path: Path = DOCKERIGNORE) -> list[tuple[bool, re.Pattern[str]]]:
    """(is_exception, regex) in file order, Docker's matching rules (* stays within a path part)."""
    patterns = []
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pattern = (line[1:] if negate else line).strip("/")
        regex = ""
        i = 0
        while i < len(pattern):
            if pattern.startswith("**", i):
                regex += ".*"
                i += 2
                if pattern.startswith("/", i):
                    regex += "/?"
                    i += 1
            elif pattern[i] == "*":
                regex += "[^/]*"
                i += 1
            elif pattern[i] == "?":
                regex += "[^/]"
                i += 1
            else:
                regex += re.escape(pattern[i])
                i += 1
        patterns.append((negate, re.compile(regex + "$")))
    return patterns


def in_build_context(path: str, patterns: list[tuple[bool, re.Pattern[str]]] | None = None) -> bool:
    """Whether deploy/Dockerfile.dockerignore lets `path` (relative to the repo) into the context:
    the last pattern matching the path or one of its parent folders wins."""
    parts = path.strip("/").split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    included = True
    for negate, regex in dockerignore_patterns() if patterns is None else patterns:
        if any(regex.match(p) for p in prefixes):
            included = negate
    return included


def copied_sources(dockerfile: Path = DOCKERFILE) -> list[str]:
    """The build-context paths the Dockerfile's COPY instructions read (COPY --from excluded)."""
    text = re.sub(r"\\\n", " ", dockerfile.read_text(encoding="utf-8"))
    sources: list[str] = []
    for line in text.splitlines():
        words = line.split()
        if not words or words[0].upper() != "COPY" or any(w.startswith("--from=") for w in words):
            continue
        sources += [w for w in words[1:-1] if not w.startswith("--")]
    return sources


def context_files(root: Path = REPO_ROOT) -> list[Path]:
    """Every file a build reads from the context: what the COPYs name, less what the ignore file drops."""
    patterns = dockerignore_patterns()
    files: set[Path] = set()
    for source in copied_sources():
        start = root / source
        candidates = [start] if start.is_file() else [p for p in start.rglob("*") if p.is_file()]
        files.update(p for p in candidates if in_build_context(str(p.relative_to(root)), patterns))
    return sorted(files)


def inputs_digest(stage: str, base_image: str | None) -> str:
    """A digest of everything a target's build reads: the Dockerfile, the ignore file, the base
    image (its ID when local), the target and every context file's path, mode and content. Equal
    digests build equal images, so a target whose image was built from this digest is up to date."""
    digest = hashlib.sha256()
    base = (image_id(base_image) or base_image) if base_image else "(the Dockerfile's default)"
    for part in (DOCKERFILE.read_bytes(), DOCKERIGNORE.read_bytes(), base.encode(), stage.encode()):
        digest.update(hashlib.sha256(part).digest())
    for path in context_files():
        digest.update(f"{path.relative_to(REPO_ROOT)}\0{path.stat().st_mode & 0o777:o}\0".encode())
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()


def _stamp(image: str, stamp_dir: Path) -> Path:
    return stamp_dir / (re.sub(r"[^\w.-]", "_", image) + ".stamp.json")


def up_to_date(
    stage: str, tag: str = "dev", base_image: str | None = STAND_IN_BASE, stamp_dir: Path = DEFAULT_LOG_DIR
) -> bool:
    """Whether the target's image is stored, is the one this script built last, and was built from
    the current inputs (its stamp, written after the build, says which digest and image ID)."""
    image = TARGETS_BY_STAGE[stage].image(tag)
    stamp = _stamp(image, stamp_dir)
    if not stamp.is_file():
        return False
    recorded = json.loads(stamp.read_text(encoding="utf-8"))
    current = image_id(image)
    return current is not None and recorded == {
        "image_id": current,
        "inputs": inputs_digest(stage, base_image),
    }


# ---------------------------------------------------------------- builds


def bud_command(target: Target, image: str, base_image: str | None) -> list[str]:
    """The `buildah bud` command line for one target (base_image None: the Dockerfile's default)."""
    command = [
        "buildah",
        "bud",
        "--isolation",
        "chroot",
        "--network",
        "host",
        "--layers",
        "--format",
        "docker",
        "--file",
        str(DOCKERFILE),
        "--ignorefile",
        str(DOCKERIGNORE),
        "--target",
        target.stage,
        "--tag",
        image,
    ]
    if base_image is not None:
        # A local stand-in: never ask a registry for it.
        command += ["--build-arg", f"BASE_IMAGE={base_image}", "--pull=never"]
    return [*command, str(REPO_ROOT)]


def build_target(
    stage: str,
    tag: str = "dev",
    base_image: str | None = STAND_IN_BASE,
    log: Path | None = None,
    stamp_dir: Path = DEFAULT_LOG_DIR,
) -> Built:
    """Build one target of deploy/Dockerfile (buildah's layer cache reuses every unchanged step),
    then stamp it with its inputs' digest."""
    target = TARGETS_BY_STAGE[stage]
    image = target.image(tag)
    inputs = inputs_digest(stage, base_image)  # before the build: a file edited meanwhile restamps
    started = time.monotonic()
    _stream(bud_command(target, image, base_image), log)
    seconds = time.monotonic() - started
    stamp_dir.mkdir(parents=True, exist_ok=True)
    _stamp(image, stamp_dir).write_text(json.dumps({"image_id": image_id(image), "inputs": inputs}), "utf-8")
    return Built(target, image, seconds, image_size_bytes(image))


def ensure_base(base_image: str | None, log_dir: Path = DEFAULT_LOG_DIR, say: bool = True) -> None:
    """Make the stand-in base when it is the one asked for and absent."""
    if base_image != STAND_IN_BASE or image_exists(base_image):
        return
    seconds = make_base(base_image, log=log_dir / "base.log")
    if say:
        print(f"made {base_image} in {seconds:.0f} s", flush=True)


def build(
    stages: Iterable[str],
    tag: str = "dev",
    base_image: str | None = STAND_IN_BASE,
    log_dir: Path = DEFAULT_LOG_DIR,
    force: bool = False,
    say: bool = True,
) -> list[Built]:
    """Build the targets in turn, the base first when it is absent, skipping those up to date
    (unless `force`); one log file and one stamp per target in `log_dir`."""
    log_dir.mkdir(parents=True, exist_ok=True)
    ensure_base(base_image, log_dir, say)
    built = []
    for stage in stages:
        image = TARGETS_BY_STAGE[stage].image(tag)
        if not force and up_to_date(stage, tag, base_image, log_dir):
            built.append(Built(TARGETS_BY_STAGE[stage], image, 0.0, image_size_bytes(image), reused=True))
            if say:
                print(f"{image} is up to date", flush=True)
            continue
        if say:
            print(f"building {stage} ...", flush=True)
        result = build_target(stage, tag, base_image, log_dir / f"{stage}.log", log_dir)
        if say:
            print(f"built {result.image} in {result.seconds:.1f} s", flush=True)
        built.append(result)
    return built


def size_table(rows: Sequence[tuple[str, str, int, str]]) -> str:
    """A plain-text table of (target, image, size in bytes, what the build did)."""
    header = ("target", "image", "size MB", "build")
    lines = [(stage, image, f"{size / 1e6:,.0f}", build) for stage, image, size, build in rows]
    widths = [max(len(row[i]) for row in [header, *lines]) for i in range(4)]
    out = []
    for row in [header, *lines]:
        cells = [cell.ljust(w) for cell, w in zip(row[:2], widths, strict=False)]
        cells += [cell.rjust(w) for cell, w in zip(row[2:], widths[2:], strict=True)]
        out.append("  ".join(cells).rstrip())
    return "\n".join(out)


# ---------------------------------------------------------------- plumbing


def _check(done: subprocess.CompletedProcess[str]) -> None:
    if done.returncode != 0:
        raise BuildError(f"{' '.join(map(str, done.args))} exited {done.returncode}:\n{done.stderr[-4000:]}")


def _stream(command: list[str], log: Path | None) -> None:
    """Run a long command, each output line prefixed with the seconds since its start (into `log`,
    or discarded); on failure raise with the last lines."""
    started = time.monotonic()
    tail: list[str] = []
    with open(log, "w", encoding="utf-8") if log else open(os.devnull, "w") as sink:
        sink.write(f"$ {' '.join(command)}\n")
        with subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace"
        ) as process:
            assert process.stdout is not None
            for line in process.stdout:
                sink.write(f"{time.monotonic() - started:7.1f} {line}")
                tail = [*tail[-59:], line]
        if process.returncode != 0:
            where = f" (log: {log})" if log else ""
            raise BuildError(
                f"{command[0]} {command[1]} exited {process.returncode}{where}:\n{''.join(tail)}"
            )


def main(argv: Sequence[str] | None = None) -> int:
    """The command line (see the module docstring)."""
    parser = argparse.ArgumentParser(prog="deploy/images.py", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    build_cmd = commands.add_parser("build", help="build targets (all by default), then print the sizes")
    build_cmd.add_argument(
        "targets", nargs="*", metavar="TARGET", help=f"any of {', '.join(TARGETS_BY_STAGE)}"
    )
    build_cmd.add_argument("--tag", default="dev", help="tag of the images, suffixes added (default: dev)")
    build_cmd.add_argument(
        "--registry-base",
        action="store_true",
        help=f"build on the Dockerfile's default base (from a registry), not on {STAND_IN_BASE}",
    )
    build_cmd.add_argument(
        "--log-dir", type=Path, default=DEFAULT_LOG_DIR, help="logs and stamps (default: build/images)"
    )
    build_cmd.add_argument(
        "--force", action="store_true", help="run buildah for up-to-date targets too (its cache applies)"
    )
    exists_cmd = commands.add_parser("exists", help="exit 0 if buildah's storage has the image, else 1")
    exists_cmd.add_argument("image")
    sizes_cmd = commands.add_parser("sizes", help="the size of every target's image already built")
    sizes_cmd.add_argument("--tag", default="dev")
    base_cmd = commands.add_parser("base", help=f"make the stand-in base {STAND_IN_BASE} (replacing it)")
    base_cmd.add_argument("--mirror", help="Debian mirror (default: the one this machine's apt uses)")
    args = parser.parse_args(argv)
    unknown = sorted(set(getattr(args, "targets", [])) - set(TARGETS_BY_STAGE))
    if unknown:
        parser.error(f"unknown target {', '.join(unknown)}; expected any of {', '.join(TARGETS_BY_STAGE)}")

    if not buildah_installed():
        print("buildah is not installed (apt-get install buildah debootstrap)", file=sys.stderr)
        return 2
    try:
        if args.command == "exists":
            return 0 if image_exists(args.image) else 1
        if args.command == "base":
            DEFAULT_LOG_DIR.mkdir(parents=True, exist_ok=True)
            seconds = make_base(mirror=args.mirror, log=DEFAULT_LOG_DIR / "base.log")
            print(f"made {STAND_IN_BASE} in {seconds:.0f} s")
            return 0
        if args.command == "sizes":
            rows = [
                (t.stage, t.image(args.tag), image_size_bytes(t.image(args.tag)), "")
                for t in TARGETS
                if image_exists(t.image(args.tag))
            ]
            print(size_table(rows))
            return 0
        base = None if args.registry_base else STAND_IN_BASE
        built = build(args.targets or list(TARGETS_BY_STAGE), args.tag, base, args.log_dir, args.force)
    except BuildError as exc:
        print(f"deploy/images.py: {exc}", file=sys.stderr)
        return 1
    print()
    rows = [
        (b.target.stage, b.image, b.size_bytes, "up to date" if b.reused else f"{b.seconds:.1f} s")
        for b in built
    ]
    print(size_table(rows))
    print(f"buildah storage: {storage_bytes() / 1e9:.1f} GB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
