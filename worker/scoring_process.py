"""The forward pass in a child process, beside the loop rather than under its GIL.

The loop's thread holds Python's GIL for most of a batch: parsing the read, building the commit,
recording the metrics. A scoring thread in the same process had to take the GIL back after each of
its numpy calls, so the two barely overlapped and a worker used about one core. A child process
scores in parallel for real. The pixels of a batch go through shared memory (one copy; raw uint8
ones are scaled to float32 there, not in the loop); the models are pickled to the child once per
(re)load; the scores come back over a socket (a few KB).
Measured on 2 cores with the default detector (uint8, batch 256): 1.31-1.52 times the msg/s of
the scoring thread.

The child is `python -P -c CHILD_BOOT SYS_PATH SOCKET_FD BUFFER_FD ...`, in a session of its own
(a Ctrl-C in a terminal reaches the worker, which finishes the batches in hand, not the child).
SOCKET_FD is its end of a socket pair; BUFFER_FD the shared buffer, a file in /dev/shm unlinked
before the child starts: only the two processes' descriptors and mappings hold it, so nothing is
left behind whatever kills either of them. The child ignores SIGINT and SIGTERM and exits when
the socket closes, including when the parent was killed.

One batch is scored at a time. `submit` collects the previous batch's result first, so the shared
buffer is never rewritten while the child reads it. Only the numpy engine's models that pickle go
to the child (`accepts`); the runner scores the others on its thread. A child that does not answer
within `score_timeout` seconds is killed: its batch fails like one whose child died.
"""

from __future__ import annotations

import contextlib
import json
import logging
import mmap
import os
import pickle
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Callable
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import numpy as np

from contract.codec import scale_pixels
from detector.errors import AnomalyScorerError
from worker.batch import Scored, score_batch
from worker.loaded_model import LoadedModel

log = logging.getLogger(__name__)

START_TIMEOUT_SECONDS = 120.0  # importing numpy and the detector on a busy, slow node
SCORE_TIMEOUT_SECONDS = 60.0  # a batch takes milliseconds; this long means the child is stuck
STOP_TIMEOUT_SECONDS = 5.0
SHARED_DIR = Path("/dev/shm")  # memory-backed where it exists; else the temporary directory


# What the child runs (`python -P -c CHILD_BOOT SYS_PATH SOCKET_FD ...`): the parent's sys.path,
# then the functions of the importable module, so that an exception it sends back unpickles in the
# parent as worker.scoring_process.ScoringProcessError.
CHILD_BOOT = (
    "import json, sys; sys.path[:] = json.loads(sys.argv[1]); "
    "from worker.scoring_process import main; raise SystemExit(main(sys.argv[2:]))"
)


class ScoringProcessError(AnomalyScorerError):
    """The scoring process died, hung, or could not be started: the batch was not scored."""


class PendingScores:
    """The scores of one submitted batch, received when `result()` is first called."""

    def __init__(self, owner: ScoringProcess) -> None:
        self._owner = owner
        self._scored: Scored | None = None
        self._error: BaseException | None = None
        self.done = False

    def result(self) -> Scored:
        """The batch's `Scored`; raises what scoring raised, or ScoringProcessError."""
        if not self.done:
            self._owner._receive(self)
        if self._error is not None:
            raise self._error
        assert self._scored is not None
        return self._scored

    def _settle(self, scored: Scored | None, error: BaseException | None) -> None:
        self._scored, self._error, self.done = scored, error, True


class ScoringProcess:
    """A child process that scores batches of up to `rows` rows; started by `start` or the first
    batch, and again by the next batch after it died."""

    def __init__(
        self,
        rows: int,
        blas_threads: int = 1,
        tune_malloc: bool = True,
        start_timeout: float = START_TIMEOUT_SECONDS,
        score_timeout: float = SCORE_TIMEOUT_SECONDS,
        python: str = sys.executable,
    ) -> None:
        if rows < 1:
            raise ValueError(f"a scoring process needs room for at least 1 row, found {rows}")
        self.rows = rows
        self.blas_threads = blas_threads
        self.tune_malloc = tune_malloc
        self.start_timeout = start_timeout
        self.score_timeout = score_timeout
        self.python = python
        self._child: subprocess.Popen[bytes] | None = None
        self._conn: Connection | None = None
        self._buffer: mmap.mmap | None = None
        self._width = 0
        self._models: tuple[LoadedModel, LoadedModel | None] | None = None  # what `_payload` holds
        self._payload = b""  # those models pickled, sent after every (re)start
        self._refused: tuple[LoadedModel, LoadedModel | None] | None = None  # did not pickle
        self._sent = False  # the child has the current models
        self._pending: PendingScores | None = None
        self.failures = 0  # in a row: failed starts, deaths and timeouts since a batch came back

    @property
    def pid(self) -> int | None:
        """The child's process id, while one runs (also read by the metrics' HTTP thread)."""
        child = self._child
        return child.pid if child is not None and child.poll() is None else None

    def accepts(self, model: LoadedModel, shadow: LoadedModel | None) -> bool:
        """Whether the child can score for these models: numpy engines (a TensorFlow model is
        neither cheap to pickle nor safe to run in a second copy) that pickle (tried once per
        pair of models)."""
        if model.scorer.engine != "numpy" or (shadow is not None and shadow.scorer.engine != "numpy"):
            return False
        pair = (model, shadow)
        if self._refused is not None and self._refused[0] is model and self._refused[1] is shadow:
            return False
        if self._models is None or self._models[0] is not model or self._models[1] is not shadow:
            try:
                payload = pickle.dumps(("models", model, shadow), protocol=pickle.HIGHEST_PROTOCOL)
            except (pickle.PicklingError, TypeError, AttributeError) as exc:
                log.warning(
                    "model cannot be sent to the scoring process, scoring it on a thread "
                    "model_version=%s error=%s",
                    model.scorer.model_version,
                    exc,
                )
                self._refused = pair
                return False
            self._models, self._payload, self._sent = pair, payload, False
        return True

    def start(self, width: int) -> None:
        """Start the child with room for `rows` x `width` float32 values; ScoringProcessError if
        it cannot be, or does not answer within the start timeout."""
        self.close()
        try:
            child, conn, buffer = self._spawn(width)
        except ScoringProcessError:
            self.failures += 1
            raise
        self._child, self._conn, self._buffer, self._width = child, conn, buffer, width
        self._sent, self._pending = False, None
        log.info("scoring process started pid=%d rows=%d width=%d", child.pid, self.rows, width)

    def _spawn(self, width: int) -> tuple[subprocess.Popen[bytes], Connection, mmap.mmap]:
        size = self.rows * width * 4
        with contextlib.ExitStack() as undo:  # unwound on failure; emptied once the child answered
            try:
                where = SHARED_DIR if SHARED_DIR.is_dir() else None
                fd, path = tempfile.mkstemp(prefix="anomaly-scoring-", dir=where)
                undo.callback(os.close, fd)  # the child has its own copy once started
                os.unlink(path)  # only descriptors and mappings hold it from now on
                if hasattr(os, "posix_fallocate"):  # reserved now: a full /dev/shm fails here,
                    os.posix_fallocate(fd, 0, size)  # not as SIGBUS on a later write
                else:
                    os.ftruncate(fd, size)
                buffer = undo.enter_context(mmap.mmap(fd, size))
                parent_end, child_end = socket.socketpair()
                undo.callback(parent_end.close)
                with child_end:
                    # -P and the parent's own sys.path: the child imports the modules the parent
                    # imported (the models it is sent are pickled against them), never a `worker`
                    # package that happens to sit in the working directory.
                    path = json.dumps([entry or os.getcwd() for entry in sys.path])
                    argv = [self.python, "-P", "-c", CHILD_BOOT, path, str(child_end.fileno()), str(fd)]
                    argv += [str(self.rows), str(width), str(self.blas_threads), str(int(self.tune_malloc))]
                    child = subprocess.Popen(
                        argv,
                        pass_fds=(child_end.fileno(), fd),
                        stdin=subprocess.DEVNULL,
                        start_new_session=True,
                    )
            except OSError as exc:
                raise ScoringProcessError(
                    f"the scoring process could not be started ({self.python}, a {size}-byte buffer "
                    f"in {where or tempfile.gettempdir()}): {exc}"
                ) from exc
            undo.callback(_stop, child)
            conn = Connection(parent_end.detach())
            undo.callback(conn.close)
            try:
                if not conn.poll(self.start_timeout):
                    raise ScoringProcessError(
                        f"the scoring process (pid {child.pid}) did not answer within "
                        f"{self.start_timeout:g} s of its start"
                    )
                conn.recv()  # "ready": it has mapped the buffer
            except (EOFError, OSError) as exc:
                try:
                    code: int | str = child.wait(STOP_TIMEOUT_SECONDS)
                except subprocess.TimeoutExpired:
                    code = "unknown"
                raise ScoringProcessError(
                    f"the scoring process exited with code {code} while starting; its output above says why"
                ) from exc
            undo.pop_all()
        os.close(fd)
        return child, conn, buffer

    def submit(
        self,
        model: LoadedModel,
        shadow: LoadedModel | None,
        pixels: np.ndarray,
        scale: float | None,
        every_region: bool,
    ) -> PendingScores:
        """Score a batch's (n, D) `pixels` with `model` (and `shadow`; `accepts` them first) in
        the child: float32 images, or uint8 ones that the child multiplies by `scale`
        (codec.scale_pixels). The result is collected later, by `result()` of what this returns."""
        expected = np.uint8 if scale is not None else np.float32
        if pixels.dtype != expected:
            raise ValueError(f"pixels are {pixels.dtype}, expected {np.dtype(expected)} with scale {scale}")
        if len(pixels) > self.rows:
            raise ValueError(f"a batch of {len(pixels)} rows does not fit the scoring process's {self.rows}")
        if not self.accepts(model, shadow):
            raise ValueError(f"model {model.scorer.model_version} cannot be scored in a child process")
        if self._pending is not None and not self._pending.done:
            with contextlib.suppress(Exception):  # its owner dropped it; its error was not this batch's
                self._pending.result()
        if self.pid is None or self._width != pixels.shape[1]:
            self.start(pixels.shape[1])
        assert self._conn is not None and self._buffer is not None
        pending = PendingScores(self)
        try:
            if not self._sent:
                self._conn.send_bytes(self._payload)
                self._sent = True
            rows = len(pixels)
            np.ndarray((rows, self._width), pixels.dtype, buffer=self._buffer)[...] = pixels
            self._conn.send(("score", rows, scale, every_region))
        except OSError as exc:
            raise self._died("receiving a batch") from exc
        self._pending = pending
        return pending

    def _receive(self, pending: PendingScores) -> None:
        if pending is not self._pending or self._conn is None:
            stale = ScoringProcessError("the scoring process was restarted before this batch was scored")
            pending._settle(None, stale)
            return
        try:
            if not self._conn.poll(self.score_timeout):
                assert self._child is not None
                self._child.kill()  # stuck: a new one scores the next batch
                error = self._died(f"scoring a batch: no answer within {self.score_timeout:g} s, killed")
                pending._settle(None, error)
                raise error
            kind, value = self._conn.recv()
        except (EOFError, OSError) as exc:
            error = self._died("scoring a batch")
            pending._settle(None, error)
            raise error from exc
        if kind == "unloadable":  # counts as a failure of the process: after a few, the thread scores
            self.failures += 1
            error = ScoringProcessError(f"the scoring process cannot load the model it was sent: {value}")
            pending._settle(None, error)
            raise error
        self.failures = 0
        pending._settle(value if kind == "scored" else None, None if kind == "scored" else value)

    def _died(self, doing: str) -> ScoringProcessError:
        self.failures += 1
        child = self._child
        pid = child.pid if child is not None else None
        self._release()  # first: a child still alive exits when its socket closes
        code = _stop(child) if child is not None else None
        return ScoringProcessError(
            f"the scoring process (pid {pid}) exited with code {code} while {doing}; "
            "the batches in hand were not committed and stay pending"
        )

    def close(self) -> None:
        """Stop the child (it exits when its socket closes) and free the buffer."""
        child = self._child
        self._release()
        if child is not None:
            _stop(child)

    def _release(self) -> None:
        if self._conn is not None:
            self._conn.close()
        if self._buffer is not None:
            with contextlib.suppress(BufferError):  # a view of it still alive: the GC frees it later
                self._buffer.close()
        self._child, self._conn, self._buffer, self._pending = None, None, None, None
        self._sent = False


def _stop(child: subprocess.Popen[bytes]) -> int:
    """Its exit code, after waiting a little for it to leave on its own and killing it if not."""
    try:
        return child.wait(STOP_TIMEOUT_SECONDS)
    except subprocess.TimeoutExpired:
        child.kill()
        return child.wait()


# -- the child -----------------------------------------------------------------------------------
def serve(conn: Connection, buffer: mmap.mmap, rows: int, width: int) -> None:
    """Answer ("models", model, shadow) and ("score", n, scale, every_region) until the socket
    closes."""
    floats = np.ndarray((rows, width), np.float32, buffer=buffer)
    raw = np.ndarray((rows, width), np.uint8, buffer=buffer)
    model: LoadedModel | None = None
    shadow: LoadedModel | None = None
    unloadable: str | None = None  # why the last models sent could not be unpickled here
    while True:
        try:
            data = conn.recv_bytes()
        except (EOFError, OSError):
            return
        try:
            message = pickle.loads(data)
        except Exception as exc:  # models whose modules this process cannot import
            model, shadow, unloadable = None, None, f"{type(exc).__name__}: {exc}"
            continue
        if message[0] == "models":
            model, shadow, unloadable = message[1], message[2], None
            continue
        _, n, scale, every_region = message
        if unloadable is not None:
            if not _reply(conn, ("unloadable", unloadable)):
                return
            continue
        try:
            if model is None:
                raise ScoringProcessError("the scoring process was sent a batch before a model")
            images = floats[:n] if scale is None else scale_pixels(raw[:n], scale)
            reply: tuple[str, Any] = ("scored", score_batch(model, shadow, images, every_region))
        except Exception as exc:  # the batch's error: the parent raises it where the thread would have
            reply = ("failed", _sendable(exc))
        if not _reply(conn, reply):
            return


def _reply(conn: Connection, reply: tuple[str, Any]) -> bool:
    """Send `reply`; False when the parent is gone (the child then leaves quietly)."""
    try:
        conn.send(reply)
    except OSError:  # BrokenPipeError, ConnectionResetError: the parent died
        return False
    return True


def _sendable(exc: Exception) -> Exception:
    try:
        pickle.loads(pickle.dumps(exc))
    except Exception:  # one that does not survive pickling: keep its text
        return RuntimeError(f"{type(exc).__name__}: {exc}")
    return exc


def main(argv: list[str], configure: Callable[[int, bool], None] | None = None) -> int:
    """Entry point of the child: SOCKET_FD BUFFER_FD ROWS WIDTH BLAS_THREADS TUNE_MALLOC."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when scoring ends
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    socket_fd, buffer_fd, rows, width, blas_threads, tune_malloc = argv
    (configure or _configure)(int(blas_threads), tune_malloc == "1")
    conn = Connection(int(socket_fd))
    buffer = mmap.mmap(int(buffer_fd), int(rows) * int(width) * 4)
    os.close(int(buffer_fd))  # the mapping keeps the memory
    try:
        conn.send("ready")
    except OSError:  # the parent died while this process started: nothing to say, nobody to say it to
        return 0
    serve(conn, buffer, int(rows), int(width))
    return 0


def _configure(blas_threads: int, tune_malloc: bool) -> None:
    from threadpoolctl import threadpool_limits

    from worker.allocator import keep_freed_memory

    threadpool_limits(blas_threads, user_api="blas")
    if tune_malloc:
        keep_freed_memory()
