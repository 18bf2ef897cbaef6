"""The forward pass in a child process, beside the loop rather than under its GIL.

The loop's thread holds Python's GIL for most of a batch: parsing the read, building the commit,
recording the metrics. A scoring thread in the same process had to take the GIL back after each of
its numpy calls, so the two barely overlapped and a worker used about one core. A child process
scores in parallel for real. The pixels of a batch go through shared memory (one copy; raw uint8
ones are scaled to float32 there, not in the loop); the models are pickled to the child once per
(re)load; the scores come back over a socket (a few KB).
Measured on 2 cores with the default detector (uint8, batch 256): 1.33 times the msg/s of the
scoring thread.

The child is `python -m worker.scoring_process FD PATH`. FD is its end of a socket pair and PATH
the shared buffer, a file in /dev/shm that the parent unlinks once the child has mapped it, so
nothing is left behind whatever kills either process. The child ignores SIGINT and SIGTERM: the
parent finishes the batches in hand at a warm stop, then closes the socket. It exits when the
socket closes, including when the parent was killed.

One batch is scored at a time. `submit` collects the previous batch's result first, so the shared
buffer is never rewritten while the child reads it. Only the numpy engine's models go to the
child (`can_score`); the runner scores the others, and any model it cannot send, on its thread.
"""

from __future__ import annotations

import contextlib
import logging
import mmap
import os
import pickle
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import numpy as np

from detector.errors import AnomalyScorerError
from worker.batch import Scored, score_batch
from worker.codec import scale_pixels
from worker.loaded_model import LoadedModel

log = logging.getLogger(__name__)

START_TIMEOUT_SECONDS = 120.0  # importing numpy and the detector on a busy, slow node
STOP_TIMEOUT_SECONDS = 5.0
SHARED_DIR = Path("/dev/shm")  # memory-backed where it exists; else the temporary directory


class ScoringProcessError(AnomalyScorerError):
    """The scoring process died, or could not be started: the batch was not scored."""


def can_score(model: LoadedModel, shadow: LoadedModel | None) -> bool:
    """Whether the child can score for these models: numpy engines only (a TensorFlow model is
    neither cheap to pickle nor safe to run in a second copy)."""
    return model.scorer.engine == "numpy" and (shadow is None or shadow.scorer.engine == "numpy")


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
    """A child process that scores batches of up to `rows` rows; started on the first batch (or
    `start`), restarted on the next batch after it died."""

    def __init__(
        self,
        rows: int,
        blas_threads: int = 1,
        tune_malloc: bool = True,
        start_timeout: float = START_TIMEOUT_SECONDS,
        python: str = sys.executable,
    ) -> None:
        if rows < 1:
            raise ValueError(f"a scoring process needs room for at least 1 row, found {rows}")
        self.rows = rows
        self.blas_threads = blas_threads
        self.tune_malloc = tune_malloc
        self.start_timeout = start_timeout
        self.python = python
        self._child: subprocess.Popen[bytes] | None = None
        self._conn: Connection | None = None
        self._buffer: mmap.mmap | None = None
        self._width = 0
        self._sent: tuple[LoadedModel, LoadedModel | None] | None = None
        self._pending: PendingScores | None = None
        self.failures = 0  # in a row: failed starts and deaths since a batch last came back

    @property
    def pid(self) -> int | None:
        """The child's process id, while one runs."""
        return self._child.pid if self._child is not None and self._child.poll() is None else None

    def start(self, width: int) -> None:
        """Start the child with room for `rows` x `width` float32 values; ScoringProcessError if
        it cannot be, or does not answer within the start timeout."""
        self.close()
        self.failures += 1  # until it has scored a batch
        size = self.rows * width * 4
        where = SHARED_DIR if SHARED_DIR.is_dir() else None
        try:
            fd, path = tempfile.mkstemp(prefix="anomaly-scoring-", dir=where)
        except OSError as exc:
            raise ScoringProcessError(f"no file for the scoring process's shared buffer: {exc}") from exc
        parent_end, child_end = socket.socketpair()
        with contextlib.ExitStack() as undo:  # unwound on failure; emptied once the child answered
            # Unlinked whatever happens: once the child has mapped it (it says "ready"), or never.
            undo.callback(_unlink, path)
            undo.callback(parent_end.close)
            try:
                # Reserved now: a full /dev/shm fails here, not as SIGBUS on a later write.
                os.posix_fallocate(fd, 0, size)
                buffer = undo.enter_context(mmap.mmap(fd, size))
                argv = [self.python, "-m", "worker.scoring_process", str(child_end.fileno()), path]
                argv += [str(self.rows), str(width), str(self.blas_threads), str(int(self.tune_malloc))]
                child = subprocess.Popen(argv, pass_fds=(child_end.fileno(),), stdin=subprocess.DEVNULL)
            except OSError as exc:
                raise ScoringProcessError(
                    f"the scoring process could not be started ({self.python}, a {size}-byte buffer "
                    f"in {path}): {exc}"
                ) from exc
            finally:
                os.close(fd)
                child_end.close()
            undo.callback(child.wait)
            undo.callback(child.kill)
            conn = Connection(parent_end.detach())
            undo.callback(conn.close)
            try:
                if not conn.poll(self.start_timeout):
                    waited = f"{self.start_timeout:g} s"
                    raise ScoringProcessError(
                        f"the scoring process (pid {child.pid}) did not answer within {waited}"
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
            _unlink(path)
        self._child, self._conn, self._buffer, self._width = child, conn, buffer, width
        self._sent, self._pending = None, None
        log.info("scoring process started pid=%d rows=%d width=%d", child.pid, self.rows, width)

    def submit(
        self,
        model: LoadedModel,
        shadow: LoadedModel | None,
        pixels: np.ndarray,
        scale: float | None,
        every_region: bool,
    ) -> PendingScores:
        """Score a batch's (n, D) `pixels` with `model` (and `shadow`) in the child: float32
        images, or uint8 ones that the child multiplies by `scale` (codec.scale_pixels). The result
        is collected later, by `result()` of what this returns."""
        expected = np.uint8 if scale is not None else np.float32
        if pixels.dtype != expected:
            raise ValueError(f"pixels are {pixels.dtype}, expected {np.dtype(expected)} with scale {scale}")
        images = pixels
        if len(images) > self.rows:
            raise ValueError(f"a batch of {len(images)} rows does not fit the scoring process's {self.rows}")
        if self._pending is not None and not self._pending.done:
            with contextlib.suppress(Exception):  # its owner dropped it; its error was not this batch's
                self._pending.result()
        if self.pid is None or self._width != images.shape[1]:
            self.start(images.shape[1])
        assert self._conn is not None and self._buffer is not None
        pending = PendingScores(self)
        try:
            if self._sent is None or self._sent[0] is not model or self._sent[1] is not shadow:
                try:
                    self._conn.send(("models", model, shadow))  # pickled whole before anything is sent
                except (pickle.PicklingError, TypeError, AttributeError) as exc:
                    raise ScoringProcessError(
                        f"the models cannot be sent to the scoring process: {exc}"
                    ) from exc
                self._sent = (model, shadow)
            rows = len(images)
            shared = np.ndarray((rows, self._width), images.dtype, buffer=self._buffer)
            shared[...] = images
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
            kind, value = self._conn.recv()
        except (EOFError, OSError) as exc:
            error = self._died("scoring a batch")
            pending._settle(None, error)
            raise error from exc
        self.failures = 0
        if kind == "scored":
            pending._settle(value, None)
        else:
            pending._settle(None, value)

    def _died(self, doing: str) -> ScoringProcessError:
        self.failures += 1
        child = self._child
        code = None
        if child is not None:
            try:
                code = child.wait(STOP_TIMEOUT_SECONDS)
            except subprocess.TimeoutExpired:
                child.kill()
                code = child.wait()
        pid = child.pid if child is not None else None
        self._release()
        return ScoringProcessError(
            f"the scoring process (pid {pid}) exited with code {code} while {doing}; "
            "the batches in hand were not committed and stay pending"
        )

    def close(self) -> None:
        """Stop the child (it exits when its socket closes) and free the buffer."""
        child = self._child
        self._release()
        if child is not None:
            try:
                child.wait(STOP_TIMEOUT_SECONDS)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()

    def _release(self) -> None:
        if self._conn is not None:
            self._conn.close()
        if self._buffer is not None:
            with contextlib.suppress(BufferError):  # a view of it still alive: the GC frees it later
                self._buffer.close()
        self._child, self._conn, self._buffer, self._sent, self._pending = None, None, None, None, None


def _unlink(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


# -- the child -----------------------------------------------------------------------------------
def serve(conn: Connection, buffer: mmap.mmap, rows: int, width: int) -> None:
    """Answer ("models", model, shadow) and ("score", n, scale, every_region) until the socket
    closes."""
    floats = np.ndarray((rows, width), np.float32, buffer=buffer)
    raw = np.ndarray((rows, width), np.uint8, buffer=buffer)
    model: LoadedModel | None = None
    shadow: LoadedModel | None = None
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            return
        if message[0] == "models":
            model, shadow = message[1], message[2]
            continue
        _, n, scale, every_region = message
        try:
            if model is None:
                raise ScoringProcessError("the scoring process was sent a batch before a model")
            images = floats[:n] if scale is None else scale_pixels(raw[:n], scale)
            reply: tuple[str, Any] = ("scored", score_batch(model, shadow, images, every_region))
        except Exception as exc:  # the batch's error: the parent raises it where the thread would have
            reply = ("failed", _sendable(exc))
        try:
            conn.send(reply)
        except OSError:
            return


def _sendable(exc: Exception) -> Exception:
    try:
        pickle.loads(pickle.dumps(exc))
    except Exception:  # one that does not survive pickling: keep its text
        return RuntimeError(f"{type(exc).__name__}: {exc}")
    return exc


def main(argv: list[str], configure: Callable[[int, bool], None] | None = None) -> int:
    """Entry point of the child: FD PATH ROWS WIDTH BLAS_THREADS TUNE_MALLOC."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when scoring ends
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    fd, path, rows, width, blas_threads, tune_malloc = argv
    (configure or _configure)(int(blas_threads), tune_malloc == "1")
    conn = Connection(int(fd))
    with open(path, "r+b") as handle:
        buffer = mmap.mmap(handle.fileno(), int(rows) * int(width) * 4)
    conn.send("ready")
    started = time.monotonic()
    serve(conn, buffer, int(rows), int(width))
    log.debug("scoring process done after %.0f s", time.monotonic() - started)
    return 0


def _configure(blas_threads: int, tune_malloc: bool) -> None:
    from threadpoolctl import threadpool_limits

    from worker.allocator import keep_freed_memory

    threadpool_limits(blas_threads, user_api="blas")
    if tune_malloc:
        keep_freed_memory()


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
