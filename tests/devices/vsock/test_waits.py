"""Waits: the timerfd deadline and EPOLLOUT on full sockets, seen through one readable fd."""

from __future__ import annotations

import select
import socket
import time

from pyvhost.devices.vsock.waits import Waits


def _readable(fd: int, timeout: float) -> bool:
    return bool(select.select([fd], [], [], timeout)[0])


def test_the_timer_fires_at_its_deadline_and_can_be_disarmed() -> None:
    waits = Waits()
    try:
        assert waits.collect() == ([], False)
        waits.arm(time.monotonic() + 0.05)
        assert not _readable(waits.fileno(), 0.01)
        assert _readable(waits.fileno(), 1.0)
        assert waits.collect() == ([], True)
        assert waits.deadline is None
        waits.arm(time.monotonic() + 0.05)
        waits.arm(None)
        assert not _readable(waits.fileno(), 0.15)
    finally:
        waits.close()


def test_a_full_socket_is_reported_once_writable() -> None:
    waits = Waits()
    a, b = socket.socketpair()
    try:
        a.setblocking(False)
        while True:
            try:
                a.send(bytes(65536))
            except BlockingIOError:
                break
        waits.want_write(a.fileno())
        waits.want_write(a.fileno())
        assert not _readable(waits.fileno(), 0.05)
        while b.recv(1 << 20, socket.MSG_DONTWAIT):
            if _readable(waits.fileno(), 0.01):
                break
        assert waits.collect() == ([a.fileno()], False)
        assert waits.collect() == ([], False)  # reported once: wanted again if still needed
        waits.want_write(a.fileno())
        waits.forget(a.fileno())
        assert waits.collect() == ([], False)
    finally:
        waits.close()
        a.close()
        b.close()
