"""What the daemon's loop does not watch for a device: sockets becoming writable, and a deadline.

The loop's watches fire on readability only. An epoll set is readable while one of its fds is
ready, so the device watches one such set: Unix sockets it could not finish writing to are in it
for EPOLLOUT, and a timerfd for the vsock connections' next deadline (connect and close timeouts).
"""

from __future__ import annotations

import contextlib
import ctypes
import math
import os
import select

__all__ = ["Waits"]

_CLOCK_MONOTONIC = 1
_TFD_TIMER_ABSTIME = 1


class _Timespec(ctypes.Structure):
    _fields_ = (("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long))


class _Itimerspec(ctypes.Structure):
    _fields_ = (("it_interval", _Timespec), ("it_value", _Timespec))


_libc = ctypes.CDLL(None, use_errno=True)


def _check(result: int, what: str) -> int:
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return result


class Waits:
    """An epoll set of sockets waited on for writing plus one timer; :meth:`fileno` is the fd
    to watch for readability, :meth:`collect` says what happened."""

    def __init__(self) -> None:
        self._epoll = select.epoll()
        try:
            flags = os.O_NONBLOCK | os.O_CLOEXEC
            self._timer = _check(_libc.timerfd_create(_CLOCK_MONOTONIC, flags), "timerfd_create")
        except BaseException:
            self._epoll.close()
            raise
        self._epoll.register(self._timer, select.EPOLLIN)
        self._writers: set[int] = set()
        self.deadline: float | None = None

    def fileno(self) -> int:
        return self._epoll.fileno()

    def want_write(self, fd: int) -> None:
        """Report ``fd`` once it is writable (until :meth:`forget`)."""
        if fd not in self._writers:
            self._epoll.register(fd, select.EPOLLOUT)
            self._writers.add(fd)

    def forget(self, fd: int) -> None:
        """Stop waiting for ``fd`` (before it is closed)."""
        if fd in self._writers:
            self._writers.discard(fd)
            with contextlib.suppress(OSError, ValueError):
                self._epoll.unregister(fd)

    def arm(self, deadline: float | None) -> None:
        """Fire at ``deadline`` (``time.monotonic()`` seconds), or never if None."""
        if deadline == self.deadline:
            return
        self.deadline = deadline
        spec = _Itimerspec()
        if deadline is not None:
            frac, whole = math.modf(deadline)
            spec.it_value.tv_sec = int(whole)
            spec.it_value.tv_nsec = int(frac * 1e9) or (0 if whole else 1)  # all zero: disarmed
        _check(
            _libc.timerfd_settime(self._timer, _TFD_TIMER_ABSTIME, ctypes.byref(spec), None),
            "timerfd_settime",
        )

    def collect(self) -> tuple[list[int], bool]:
        """The waited-on fds now writable (no longer waited on) and whether the timer fired."""
        writable: list[int] = []
        fired = False
        for fd, _ in self._epoll.poll(0):
            if fd == self._timer:
                with contextlib.suppress(BlockingIOError):
                    os.read(self._timer, 8)
                fired = True
                self.deadline = None
            elif fd in self._writers:
                self.forget(fd)
                writable.append(fd)
        return writable, fired

    def close(self) -> None:
        self._writers.clear()
        self._epoll.close()
        os.close(self._timer)
