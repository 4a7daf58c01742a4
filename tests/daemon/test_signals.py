"""Daemon.run's signal handling in this process: a stop by SIGTERM survives a repeat of it."""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Iterator

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
