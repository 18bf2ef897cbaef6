"""Run a built image's command the way a pod's container runs it, with buildah (no engine here).

`buildah run` runs a command in a working container made from the image (`buildah from`), with
chroot isolation and the host's network. What a pod gives, and how this module gives it:

- **command and args**: the image's ENTRYPOINT followed by its CMD, or by the `args` given (a pod
  spec's `args`); `command` replaces the ENTRYPOINT. `buildah run` applies neither itself.
- **environment**: the image's ENV plus `env` (a container's `env:`), as `buildah run -e`.
- **volumes**: bind mounts (`-v host:path[:ro]`). A path under a symlink of the image (Debian's
  /var/run -> /run, where the manifests mount the password) is resolved inside the image first:
  buildah 1.28 resolves it on the host instead and mounts (and creates) the host's /run/...
  Host directories the image's user (uid 10001) must write need its ownership, as fsGroup gives.
- **emptyDir /tmp**: `empty_dirs` are fresh host directories, world-writable like an emptyDir.
- **readOnlyRootFilesystem**: `buildah run` has no read-only root. The closest equivalent: each
  top-level directory of the image is bind-mounted read-only over itself, so a write fails with
  EROFS as in a pod, except /run (buildah writes /run/.containerenv there at each run), /dev,
  /proc, /sys (buildah's own) and the volumes' paths. / itself stays writable by root only (the
  images run as uid 10001). `writes_to_root()` lists what reached the container's writable layer
  (/ and /run included): a test asserts it is empty, which is what a read-only root guarantees.
- **SIGTERM**: the kubelet signals the container's main process. `buildah run` itself answers
  SIGTERM by SIGKILLing its command ("subprocess exited on killed"), so `terminate()` signals the
  image's process (the first process under buildah that is not buildah) directly; buildah then
  exits with that process's exit code (1 when the signal killed it).
- **PID namespace**: none under chroot isolation (`--pid private` is ignored): the command is not
  PID 1 and its host PID is the one a test reads in /proc (RSS) or in the worker's log.

Every working container is removed (`buildah rm`) when the context manager exits, also when the
test fails; containers left by a killed test run are removed by `remove_stale_containers()`.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

NAME_PREFIX = "anomaly-test-"
# Top-level directories buildah provides itself or writes into at every run.
NOT_READ_ONLY = {"dev", "proc", "sys", "run"}
_counter = itertools.count()


class ContainerExited(AssertionError):
    """The container's command exited while a test waited for something else; carries its log."""


@dataclass(frozen=True)
class Volume:
    """A host directory (or file) mounted at `path` in the container."""

    host: Path
    path: str
    read_only: bool = False


def buildah(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """`buildah ARGS`, output captured as text; raises with buildah's message on a non-zero exit."""
    done = subprocess.run(["buildah", *args], capture_output=True, text=True, timeout=timeout, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"buildah {' '.join(args)} exited {done.returncode}: {done.stderr.strip()}")
    return done


def image_config(image: str) -> dict[str, Any]:
    """The image's OCI config (Entrypoint, Cmd, Env, User, WorkingDir, ...)."""
    inspected = json.loads(buildah("inspect", "--type", "image", image).stdout)
    config: dict[str, Any] = inspected["OCIv1"].get("config", {})
    return config


def resolve_in_root(root: Path, path: str) -> str:
    """`path` inside the image rooted at `root`, every symlink on the way followed within the image
    (an absolute link target is relative to the image's /, never the host's)."""
    parts = [p for p in path.split("/") if p]
    resolved: list[str] = []
    for _ in range(64):  # at most this many links followed, as the kernel limits loops
        if not parts:
            return "/" + "/".join(resolved)
        part = parts.pop(0)
        if part == "..":
            resolved = resolved[:-1]
            continue
        candidate = root.joinpath(*resolved, part)
        if candidate.is_symlink():
            target = os.readlink(candidate)
            if target.startswith("/"):
                resolved = []
            parts = [p for p in target.split("/") if p] + parts
            continue
        resolved.append(part)
    raise ValueError(f"too many symbolic links resolving {path} in {root}")


def _process_table() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, comm) of every process, from /proc/*/stat."""
    table = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:  # exited meanwhile
            continue
        comm = text[text.index("(") + 1 : text.rindex(")")]
        table[int(stat.parent.name)] = (int(text[text.rindex(")") + 2 :].split()[1]), comm)
    return table


def descendants(pid: int) -> list[int]:
    """The processes below `pid`, nearest first."""
    table = _process_table()
    found, frontier = [], [pid]
    while frontier:
        children = sorted(p for p, (ppid, _) in table.items() if ppid in frontier)
        found += children
        frontier = children
    return found


def rss_bytes(pid: int) -> int:
    """Resident set size of a process (VmRSS in /proc/PID/status)."""
    match = re.search(r"^VmRSS:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text(), re.MULTILINE)
    assert match, f"no VmRSS for process {pid}"
    return int(match.group(1)) * 1024


def process_gone(pid: int) -> bool:
    """The process has exited (a zombie nobody reaped yet counts as exited)."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return text[text.rindex(")") + 2 :].split()[0] in ("Z", "X")


def wait_until(condition: Callable[[], T], timeout: float, what: str, interval: float = 0.1) -> T:
    """Poll `condition` until it returns a truthy value; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)


@dataclass
class Container:
    """One `buildah run` of an image, started by `running_container`."""

    image: str
    name: str
    root: Path  # the working container's file tree on the host (`buildah mount`)
    log: Path
    process: subprocess.Popen[bytes]
    started_at: float  # time.monotonic() when buildah run was started
    created_mountpoints: list[str] = field(default_factory=list)
    _main_pid: int | None = None

    @property
    def running(self) -> bool:
        return self.process.poll() is None

    def log_text(self) -> str:
        """Everything the command (and buildah) wrote to stdout and stderr so far."""
        return self.log.read_text(encoding="utf-8", errors="replace")

    def main_pid(self, timeout: float = 30) -> int:
        """The host PID of the image's command: the first process under buildah that is not buildah."""
        if self._main_pid is None:

            def found() -> int | None:
                if not self.running:
                    raise ContainerExited(self._exited_message("before its command started"))
                table = _process_table()
                for pid in descendants(self.process.pid):
                    comm = table.get(pid, (0, "buildah"))[1]
                    if comm != "buildah" and not comm.startswith("memfd:buildah"):
                        return pid
                return None

            self._main_pid = wait_until(found, timeout, f"the command of {self.image} to start", 0.02)
        return self._main_pid

    def wait_until(self, condition: Callable[[], T], timeout: float, what: str, interval: float = 0.1) -> T:
        """Poll `condition` until it returns a truthy value; fail at once, with the log, if the
        command exits first, and after `timeout` seconds."""

        def check() -> T | None:
            value = condition()
            if not value and not self.running:
                raise ContainerExited(self._exited_message(f"while waiting for {what}"))
            return value

        try:
            return wait_until(check, timeout, what, interval)
        except ContainerExited:
            raise
        except AssertionError as exc:
            raise AssertionError(f"{exc}; {self.image} log:\n{self.log_text()[-4000:]}") from None

    def wait(self, timeout: float) -> int:
        """Wait for the command to exit; its exit code (buildah run passes it on)."""
        return self.process.wait(timeout)

    def terminate(self, timeout: float = 30) -> int:
        """SIGTERM to the image's process, as the kubelet sends it; its exit code. A process the
        signal kills (no handler) gives 1, not 143: buildah run reports "subprocess exited on
        terminated" and exits 1."""
        os.kill(self.main_pid(), signal.SIGTERM)
        return self.wait(timeout)

    def kill(self) -> None:
        """SIGKILL to everything under buildah, then to buildah."""
        for pid in reversed(descendants(self.process.pid)):
            with suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if self.running:
            self.process.kill()
        self.process.wait(30)

    def writes_to_root(self) -> list[str]:
        """Paths the command created or changed in the container's own file tree, outside its
        volumes: what a read-only root filesystem would have refused. Reads the overlay driver's
        upper directory; buildah's /run/.containerenv and the volumes' mountpoints are left out."""
        upper = self.root.parent / "diff"
        assert self.root.name == "merged" and upper.is_dir(), (
            f"{self.root} is not an overlay mount: writes_to_root needs buildah's overlay driver"
        )
        ignored = {"run", "run/.containerenv"}
        for path in self.created_mountpoints:  # and the folders holding them, copied up by the mkdir
            ignored |= {str(p).strip("/") for p in [Path(path), *Path(path).parents] if str(p) != "/"}
        written = [str(p.relative_to(upper)) for p in sorted(upper.rglob("*"))]
        return [p for p in written if p not in ignored]

    def _exited_message(self, when: str) -> str:
        return f"{self.image} exited with {self.process.poll()} {when}; its log:\n{self.log_text()[-4000:]}"


@contextmanager
def running_container(
    image: str,
    args: Sequence[str] | None = None,
    *,
    command: Sequence[str] | None = None,
    env: Mapping[str, str] | None = None,
    volumes: Sequence[Volume] = (),
    empty_dirs: Sequence[str] = ("/tmp",),
    read_only_root: bool = False,
    log_dir: Path | None = None,
) -> Iterator[Container]:
    """Start the image's command in a new working container; remove the container on exit (the
    command is killed first if it still runs)."""
    name = f"{NAME_PREFIX}{os.getpid()}-{next(_counter)}-{re.sub(r'[^a-z0-9]+', '-', image.lower())}"
    config = image_config(image)
    argv = [*(command if command is not None else config.get("Entrypoint") or [])]
    argv += list(args) if args is not None else list(config.get("Cmd") or [])
    assert argv, f"{image} has neither ENTRYPOINT nor CMD, and no command was given"
    scratch = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=log_dir))
    buildah("from", "--pull=never", "--name", name, image)
    container = None
    try:
        root = Path(buildah("mount", name).stdout.strip())
        mounts: list[tuple[str, str, bool]] = []  # (host, path in the container, read-only)
        for volume in volumes:
            mounts.append((str(volume.host), resolve_in_root(root, volume.path), volume.read_only))
        for path in empty_dirs:
            directory = scratch / f"empty{len(mounts)}"
            directory.mkdir(mode=0o777)
            directory.chmod(0o1777)  # like /tmp: any user writes, only the owner deletes
            mounts.append((str(directory), resolve_in_root(root, path), False))
        created = _create_mountpoints(root, [(Path(host), path) for host, path, _ in mounts])
        if read_only_root:
            tops = {path.strip("/").split("/")[0] for _, path, _ in mounts if path.count("/") == 1}
            for entry in sorted(root.iterdir()):
                if entry.is_dir() and not entry.is_symlink() and entry.name not in NOT_READ_ONLY | tops:
                    mounts.insert(0, (str(entry), f"/{entry.name}", True))
        options = ["--isolation", "chroot", "--network", "host"]
        for host, path, read_only in mounts:
            options += ["--volume", f"{host}:{path}{':ro' if read_only else ''}"]
        for key, value in (env or {}).items():
            options += ["--env", f"{key}={value}"]
        log = scratch / "output.log"
        with log.open("wb") as sink:  # a file, not a pipe: a full pipe would block the command
            process = subprocess.Popen(
                ["buildah", "run", *options, name, "--", *argv], stdout=sink, stderr=subprocess.STDOUT
            )
            container = Container(image, name, root, log, process, time.monotonic(), created)
        yield container
    finally:
        if container is not None and container.running:
            container.kill()
        subprocess.run(["buildah", "rm", name], capture_output=True, check=False, timeout=120)
        if log_dir is None:
            shutil.rmtree(scratch, ignore_errors=True)


@dataclass(frozen=True)
class Finished:
    """A container's command run to its end."""

    returncode: int
    output: str
    writes_to_root: list[str]


def run_to_completion(
    image: str, args: Sequence[str] | None = None, timeout: float = 600, **options: Any
) -> Finished:
    """Run the image's command (a Job's container) until it exits; its exit code and output."""
    with running_container(image, args, **options) as container:
        try:
            returncode = container.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"{image} {args} still ran after {timeout:g} s; its log:\n{container.log_text()[-4000:]}"
            ) from None
        return Finished(returncode, container.log_text(), container.writes_to_root())


def remove_stale_containers() -> list[str]:
    """Remove the working containers of earlier test runs whose process is gone (a test run that
    was killed cannot clean up); the names removed."""
    names = buildah("containers", "--format", "{{.ContainerName}}").stdout.split()
    stale = []
    for name in names:
        match = re.match(rf"{re.escape(NAME_PREFIX)}(\d+)-", name)
        if match and not Path(f"/proc/{match.group(1)}").exists():
            subprocess.run(["buildah", "rm", name], capture_output=True, check=False, timeout=120)
            stale.append(name)
    return stale


def _create_mountpoints(root: Path, mounts: Sequence[tuple[Path, str]]) -> list[str]:
    """Create the mountpoints missing in the image (a directory, or an empty file for a file), as
    the container runtime does before it makes the root read-only; every path created."""
    created = []
    for host, path in mounts:
        target = root / path.lstrip("/")
        missing = [target, *(p for p in target.parents if p != root and root in p.parents)]
        missing = [p for p in missing if not p.exists()]
        if not missing:
            continue
        if host.is_dir():
            target.mkdir(parents=True)
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            target.touch()
        created += ["/" + str(p.relative_to(root)) for p in missing]
    return created
