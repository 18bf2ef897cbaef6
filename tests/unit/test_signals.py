"""The worker's signals, handled from the first line of main: a warm stop, forced after the grace
time or by a second signal; a reload; and any of them during start-up remembered, never fatal."""

from __future__ import annotations

import signal
import threading

from runtime.signals import EXIT_FORCED, Signals


class FakeRunner:
    def __init__(self) -> None:
        self.stopped = 0
        self.reload_event = threading.Event()

    def request_stop(self) -> None:
        self.stopped += 1


def test_first_signal_asks_for_a_warm_stop_and_the_second_exits_at_once() -> None:
    exits: list[int] = []
    signals, runner = Signals(grace_seconds=60, exit_now=exits.append), FakeRunner()
    signals.attach(runner)
    signals.on_stop(signal.SIGTERM, None)
    assert runner.stopped == 1 and exits == []
    signals.on_stop(signal.SIGINT, None)
    assert exits == [EXIT_FORCED]


def test_warm_stop_is_forced_after_the_grace_time() -> None:
    exited = threading.Event()
    signals = Signals(grace_seconds=0.2, exit_now=lambda code: exited.set())
    signals.attach(FakeRunner())
    signals.on_stop(signal.SIGTERM, None)
    assert exited.wait(5)


def test_sighup_asks_the_runner_to_reload() -> None:
    signals, runner = Signals(exit_now=lambda code: None), FakeRunner()
    signals.attach(runner)
    signals.on_reload(signal.SIGHUP, None)
    assert runner.reload_event.is_set()


def test_a_sighup_during_start_up_is_applied_once_the_runner_exists() -> None:
    signals, runner = Signals(exit_now=lambda code: None), FakeRunner()
    signals.on_reload(signal.SIGHUP, None)  # the model is still loading: nobody to tell yet
    assert not runner.reload_event.is_set()
    signals.attach(runner)
    assert runner.reload_event.is_set() and runner.stopped == 0


def test_a_sigterm_during_start_up_is_remembered_and_stops_the_runner_when_it_exists() -> None:
    exits: list[int] = []
    signals, runner = Signals(grace_seconds=60, exit_now=exits.append), FakeRunner()
    signals.on_stop(signal.SIGTERM, None)
    assert signals.stop_requested.is_set() and exits == []
    signals.attach(runner)
    assert runner.stopped == 1


def test_install_takes_over_the_three_signals() -> None:
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
    try:
        signals = Signals().install()
        assert signal.getsignal(signal.SIGTERM) == signals.on_stop
        assert signal.getsignal(signal.SIGINT) == signals.on_stop
        assert signal.getsignal(signal.SIGHUP) == signals.on_reload
    finally:
        for number, handler in before.items():
            signal.signal(number, handler)


class FakeLoop:
    """A loop that does not reload (anomaly-notify's): it only stops."""

    def __init__(self) -> None:
        self.stopped = 0

    def request_stop(self) -> None:
        self.stopped += 1


def test_a_loop_that_does_not_reload_is_only_stopped() -> None:
    signals, loop = Signals(exit_now=lambda code: None, logger="notify"), FakeLoop()
    signals.on_reload(signal.SIGHUP, None)
    signals.attach(loop)  # a SIGHUP that came early has nothing to apply to
    signals.on_reload(signal.SIGHUP, None)
    assert loop.stopped == 0
    signals.on_stop(signal.SIGTERM, None)
    assert loop.stopped == 1


def test_install_without_reload_leaves_sighup_alone() -> None:
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
    try:
        signals = Signals().install(reload=False)
        assert signal.getsignal(signal.SIGTERM) == signals.on_stop
        assert signal.getsignal(signal.SIGHUP) == before[signal.SIGHUP]
    finally:
        for number, handler in before.items():
            signal.signal(number, handler)
