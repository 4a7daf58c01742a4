"""Daemon.run's signal handling in this process: a stop by SIGTERM survives a repeat of it."""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
from collections.abc import Iterator
from types import FrameType

import pytest

from peers.qemu import short_tmp
from pyvhost.daemon import Daemon

from .toy import Upper


@pytest.fixture
def handlers() -> Iterator[None]:
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)


def test_repeated_sigterm_while_stopping_does_not_kill(handlers: None) -> None:
    """``timeout`` signals its child and then its whole process group: the second SIGTERM
    must find a handler, not the default action, however late it comes."""
    with short_tmp("pvh-sig-") as d:
        daemon = Daemon(Upper(), d / "s.sock")

        def send_sigterm() -> None:
            daemon.ready.wait(10)
            os.kill(os.getpid(), signal.SIGTERM)

        thread = threading.Thread(target=send_sigterm)
        thread.start()
        daemon.run()
        thread.join()
        assert daemon.stopping
        assert signal.getsignal(signal.SIGTERM) not in (signal.SIG_DFL, None)
        os.kill(os.getpid(), signal.SIGTERM)  # the late repeat: ignored, we are still here
        os.kill(os.getpid(), signal.SIGINT)


def test_handlers_come_back_after_a_stop_without_a_signal(handlers: None) -> None:
    previous = signal.getsignal(signal.SIGTERM)
    with short_tmp("pvh-sig-") as d:
        daemon = Daemon(Upper(), d / "s.sock")
        threading.Timer(0.2, daemon.shutdown).start()
        daemon.run()
    assert signal.getsignal(signal.SIGTERM) is previous


def test_a_signal_while_the_main_thread_holds_the_daemons_locks_still_stops_it(
    handlers: None,
) -> None:
    """Python runs the handler in the main thread between two bytecodes, which may be inside the
    daemon's own critical sections: the stop must not wait there for a lock that thread holds."""
    with short_tmp("pvh-sig-") as d:
        sock = d / "s.sock"

        def device_in_a_critical_section() -> Upper:
            with daemon._lock, daemon._stopping._cond:  # type: ignore[attr-defined]
                signal.raise_signal(signal.SIGTERM)
                time.sleep(0.05)  # the handler has run by now, under both locks
            return Upper()

        deadlocked: list[bool] = []

        def alarm(signum: int, frame: FrameType | None) -> None:
            # Break the deadlock (a blocked acquire runs handlers) and end the run.
            deadlocked.append(True)
            threading.Timer(0.5, daemon.shutdown).start()
            raise TimeoutError("the SIGTERM handler deadlocked in the main thread")

        daemon = Daemon(device_in_a_critical_section, sock)
        front = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)

        def connect() -> None:
            daemon.ready.wait(10)
            front.connect(str(sock))

        threading.Thread(target=connect, daemon=True).start()
        previous_alarm = signal.signal(signal.SIGALRM, alarm)
        signal.setitimer(signal.ITIMER_REAL, 5)
        try:
            daemon.run()
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous_alarm)
            front.close()
        assert not deadlocked, "the SIGTERM handler waited for a lock its own thread held"
        assert daemon.stopping
        assert daemon.connections == 1
