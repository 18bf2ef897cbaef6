"""A long-running program's signals, handled from the first line of its `main` until it exits
(the worker's, anomaly-notify's).

SIGTERM and SIGINT ask for a warm stop: the loop finishes the work in hand (the worker its batch,
the notifier its delivery) and leaves; if that takes longer than the grace time, or a second
signal comes, the process exits at once (code 1). SIGHUP, for a program that reloads (the
worker), asks for a reload between batches. A signal that arrives while the program is still
starting (loading the model can take seconds) is remembered: a stop ends the start-up with exit 0
before the first read, a reload is applied as soon as the loop exists. The handlers only set
flags and start a timer: the loop acts on them between iterations.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Callable
from types import FrameType
from typing import Protocol, runtime_checkable

EXIT_FORCED = 1


class Stoppable(Protocol):
    """What the signals act on: the loop (`worker.runner.Runner`, `notify.notifier.Notifier`), or a
    fake in tests."""

    def request_stop(self) -> None:
        """Finish the work in hand, then leave the loop."""
        ...


@runtime_checkable
class Reloadable(Protocol):
    """A loop that also reloads between iterations when its event is set (the worker's runner)."""

    reload_event: threading.Event


class Signals:
    """SIGTERM/SIGINT/SIGHUP as flags; `attach` hands them, and any that came early, to the runner.
    Logs go to the program's logger (`logger`)."""

    def __init__(
        self,
        grace_seconds: float = 20.0,
        exit_now: Callable[[int], None] = os._exit,
        logger: str = "worker",
    ) -> None:
        self.grace_seconds = grace_seconds
        self.log = logging.getLogger(logger)
        self.stop_requested = threading.Event()
        self.reload_requested = threading.Event()
        self._exit_now = exit_now
        self._runner: Stoppable | None = None
        self._stops = 0
        self._lock = threading.Lock()

    def install(self, reload: bool = True) -> Signals:
        """Take over SIGTERM and SIGINT for this process, and SIGHUP with `reload` (a program that
        does not reload keeps SIGHUP's default)."""
        signal.signal(signal.SIGTERM, self.on_stop)
        signal.signal(signal.SIGINT, self.on_stop)
        if reload:
            signal.signal(signal.SIGHUP, self.on_reload)
        return self

    def attach(self, runner: Stoppable) -> None:
        """From now on signals reach `runner`; a stop or reload that came before is passed on."""
        with self._lock:
            self._runner = runner
            if self.reload_requested.is_set() and isinstance(runner, Reloadable):
                self.log.info("applying the reload requested during start-up signal=%s", "SIGHUP")
                runner.reload_event.set()
            if self.stop_requested.is_set():
                runner.request_stop()

    def on_stop(self, signum: int, _frame: FrameType | None) -> None:
        """SIGTERM or SIGINT: a warm stop, forced after the grace time; the second one: exit now."""
        name = signal.Signals(signum).name
        with self._lock:
            self._stops += 1
            if self._stops > 1:
                self._hard_exit(f"second signal {name}")
                return
            self.stop_requested.set()
            runner = self._runner
        self.log.info("stop requested signal=%s grace_seconds=%g", name, self.grace_seconds)
        if runner is not None:
            runner.request_stop()
        timer = threading.Timer(self.grace_seconds, self._hard_exit, args=("grace time exceeded",))
        timer.daemon = True
        timer.start()

    def on_reload(self, _signum: int, _frame: FrameType | None) -> None:
        """SIGHUP: reload the artifact between batches (remembered until the runner exists)."""
        with self._lock:
            self.reload_requested.set()
            runner = self._runner
        if runner is None:
            self.log.info("reload requested during start-up, applied once serving signal=%s", "SIGHUP")
            return
        if not isinstance(runner, Reloadable):
            self.log.info("reload requested but this program does not reload signal=%s", "SIGHUP")
            return
        self.log.info("reload requested signal=%s", "SIGHUP")
        runner.reload_event.set()

    def _hard_exit(self, reason: str) -> None:
        self.log.error("exiting now reason=%s", reason)
        logging.shutdown()
        self._exit_now(EXIT_FORCED)
