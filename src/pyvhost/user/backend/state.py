"""Device-state transfer: SET_DEVICE_STATE_FD runs the transfer in a thread, CHECK_DEVICE_STATE
collects it."""

from __future__ import annotations

import contextlib
import os
import select
import stat
import threading
from dataclasses import dataclass, field

from pyvhost.errors import ProtocolError
from pyvhost.user.backend.base import HandlerCore, Reply
from pyvhost.user.messages import (
    DEVICE_STATE_NOFD,
    U64,
    DeviceStateTransfer,
    Message,
)

DEVICE_STATE_TIMEOUT = 60.0
"""How long CHECK_DEVICE_STATE waits for a state transfer to finish."""

_DEVICE_STATE_SAVE = 0


@dataclass(eq=False)
class StateTransfer:
    """A SET_DEVICE_STATE_FD transfer running in a thread; CHECK_DEVICE_STATE collects it."""

    direction: int
    thread: threading.Thread | None = None
    data: bytes = b""
    error: BaseException | None = None
    done: threading.Event = field(default_factory=threading.Event)
    cancel_fd: int = field(default_factory=lambda: os.eventfd(0, os.EFD_CLOEXEC))
    """Written by :meth:`cancel`: wakes the thread out of a pipe the front-end never serves."""

    def cancel(self, timeout: float) -> None:
        """Stop the transfer (the connection is closing), wait for the thread, free the eventfd."""
        with contextlib.suppress(OSError):
            os.eventfd_write(self.cancel_fd, 1)
        if self.thread is not None:
            self.thread.join(timeout)
        if self.thread is None or not self.thread.is_alive():
            with contextlib.suppress(OSError):
                os.close(self.cancel_fd)


class StateTransferRequests(HandlerCore):
    """SET_DEVICE_STATE_FD and CHECK_DEVICE_STATE."""

    def _set_device_state_fd(self, msg: Message) -> Reply:
        params = msg.payload_as(DeviceStateTransfer)
        fd = self._take_fd(msg)
        try:
            kind = stat.S_IFMT(os.fstat(fd).st_mode)
            if kind not in (stat.S_IFIFO, stat.S_IFSOCK):
                raise ProtocolError(
                    f"the fd is not a pipe (file type {kind:#o}): the state is streamed "
                    "through a pipe",
                    request=msg.name,
                    field="fds",
                )
            started = [v.index for v in self.vrings if v.started]
            if started:
                raise ProtocolError(
                    f"vrings {started} are started: the device is not suspended",
                    request=msg.name,
                )
            if self._transfer is not None and not self._transfer.done.is_set():
                raise ProtocolError("a state transfer is already running", request=msg.name)
            if self._transfer is not None:
                self._transfer.cancel(1.0)
                self._transfer = None
            data = self.device.save_state() if params.direction == _DEVICE_STATE_SAVE else b""
        except BaseException:
            os.close(fd)
            raise
        transfer = StateTransfer(params.direction)
        transfer.thread = threading.Thread(
            target=_run_transfer,
            args=(transfer, fd, data),
            name=f"{self.name}-device-state",
            daemon=True,
        )
        self._transfer = transfer
        transfer.thread.start()
        return Reply(U64(DEVICE_STATE_NOFD))

    def _check_device_state(self, msg: Message) -> Reply:
        transfer, self._transfer = self._transfer, None
        if transfer is None:
            raise ProtocolError("no state transfer to check", request=msg.name)
        if not transfer.done.wait(DEVICE_STATE_TIMEOUT):
            transfer.cancel(1.0)
            raise ProtocolError(
                f"state transfer still running after {DEVICE_STATE_TIMEOUT:g} s",
                request=msg.name,
            )
        transfer.cancel(1.0)
        if transfer.error is not None:
            raise ProtocolError(f"state transfer failed: {transfer.error}", request=msg.name)
        if transfer.direction != _DEVICE_STATE_SAVE:
            self.device.load_state(transfer.data)
        return Reply(U64(0))


class _CancelledError(Exception):
    """The connection closed while the state transfer was waiting on its pipe."""


def _wait_ready(transfer: StateTransfer, fd: int, event: int) -> None:
    poller = select.poll()
    poller.register(fd, event)
    poller.register(transfer.cancel_fd, select.POLLIN)
    while True:
        ready = dict(poller.poll())
        if transfer.cancel_fd in ready:
            raise _CancelledError("state transfer cancelled: the connection closed")
        if fd in ready:
            return


def _run_transfer(transfer: StateTransfer, fd: int, data: bytes) -> None:
    """Thread body: write ``data`` to ``fd`` (save) or read ``fd`` to EOF (load); close it.

    Waits in poll() with the cancel eventfd, so a front-end that never reads or never closes
    the pipe cannot keep the thread (and the fd) alive past the connection.
    """
    try:
        os.set_blocking(fd, False)
        if transfer.direction == _DEVICE_STATE_SAVE:
            view = memoryview(data)
            while view:
                _wait_ready(transfer, fd, select.POLLOUT)
                with contextlib.suppress(BlockingIOError):
                    view = view[os.write(fd, view) :]
        else:
            chunks = []
            while True:
                _wait_ready(transfer, fd, select.POLLIN)
                try:
                    chunk = os.read(fd, 65536)
                except BlockingIOError:
                    continue
                if not chunk:
                    break
                chunks.append(chunk)
            transfer.data = b"".join(chunks)
    except BaseException as exc:
        transfer.error = exc
    finally:
        os.close(fd)
        transfer.done.set()
