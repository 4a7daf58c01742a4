"""The host's sockets in ``exercise vsock``: one connection to a guest listener, one listener the
guest connects to, both non-blocking and stepped by the exercise's loop.

- :class:`KernelHost`: ``AF_VSOCK`` sockets, for the kernel's vhost-vsock;
- :class:`UnixHost`: a hybrid vhost-user device's Unix sockets: ``CONNECT <port>`` on
  ``UDS_PATH`` (the ``OK`` line first) and a listener at ``UDS_PATH_<port>``.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
from collections.abc import Callable
from typing import Protocol

from pyvhost.cli.vsock_streams import Stream
from pyvhost.devices.vsock import parse_connect
from pyvhost.devices.vsock.bridge import bind_unix

__all__ = ["GUEST_PORT", "HOST_PORT", "HostSide", "KernelHost", "UnixHost", "parse_ok"]

GUEST_PORT = 5201
HOST_PORT = 5202
_RECV = 65536
_MAX_OK = 64


class HostSide(Protocol):
    """The host's end of both streams."""

    def start(self, guest_cid: int) -> None:
        """Listen, and connect to the guest's listener (which must be up)."""

    def step(self, h2g: Stream, g2h: Stream) -> int:
        """Accept, read and write what can be without blocking; returns bytes moved (+1 per
        accept), 0 when nothing happened."""

    def sockets(self) -> list[socket.socket]:
        """What to wait on for reading."""

    def close(self) -> None: ...


def _send(sock: socket.socket, h2g: Stream) -> int:
    if h2g.sent >= h2g.total:
        return 0
    with contextlib.suppress(BlockingIOError, OSError):
        n = sock.send(h2g.next_chunk())
        h2g.sent += n
        return n
    return 0


def _receive(sock: socket.socket, g2h: Stream) -> int:
    if g2h.done:
        return 0
    with contextlib.suppress(BlockingIOError):
        data = sock.recv(_RECV)
        g2h.arrived(data)
        return len(data)
    return 0


def parse_ok(line: bytes) -> int:
    """The host port in the device's ``OK <port>`` line (no newline); ValueError otherwise."""
    words = line.split()
    if len(words) != 2 or words[0] != b"OK":
        raise ValueError(f"{line!r} is not 'OK <port>'")
    return parse_connect(b"CONNECT " + words[1])


class _Accepting:
    """A listener and the one connection it accepts."""

    def __init__(self) -> None:
        self.listener: socket.socket | None = None
        self.accepted: socket.socket | None = None

    def accept(self) -> int:
        if self.accepted is not None or self.listener is None:
            return 0
        with contextlib.suppress(BlockingIOError):
            self.accepted, _ = self.listener.accept()
            self.accepted.setblocking(False)
            return 1
        return 0

    def all(self) -> list[socket.socket]:
        return [s for s in (self.listener, self.accepted) if s is not None]


class KernelHost(_Accepting):
    """A host ``AF_VSOCK`` listener on :data:`HOST_PORT` and a client to the guest."""

    def __init__(self) -> None:
        super().__init__()
        self.client: socket.socket | None = None

    def start(self, guest_cid: int) -> None:
        self.listener = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
        self.listener.bind((socket.VMADDR_CID_ANY, HOST_PORT))
        self.listener.listen(1)
        self.listener.setblocking(False)
        self.client = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
        self.client.setblocking(False)
        err = self.client.connect_ex((guest_cid, GUEST_PORT))
        if err not in (0, errno.EINPROGRESS, errno.EAGAIN):
            raise OSError(err, f"host connect to {guest_cid}:{GUEST_PORT}")

    def step(self, h2g: Stream, g2h: Stream) -> int:
        moved = self.accept()
        if self.accepted is not None:
            moved += _receive(self.accepted, g2h)
        if self.client is not None:
            moved += _send(self.client, h2g)
        return moved

    def sockets(self) -> list[socket.socket]:
        return self.all() + ([self.client] if self.client is not None else [])

    def close(self) -> None:
        for sock in self.sockets():
            sock.close()


class UnixHost(_Accepting):
    """A host program of a hybrid device at ``uds_path``: it listens at ``uds_path``_HOST_PORT
    and asks for the guest's port with ``CONNECT``; a bad or missing ``OK`` goes to ``error``."""

    def __init__(self, uds_path: str, error: Callable[[str], None]) -> None:
        super().__init__()
        self.uds_path = uds_path
        self.error = error
        self.client: socket.socket | None = None
        self.greeting = bytearray()
        self.host_port: int | None = None
        """The host port the device gave the CONNECT connection (from its OK line)."""
        self._listen_path = f"{uds_path}_{HOST_PORT}"
        self._failed = False

    def start(self, guest_cid: int) -> None:
        self.listener = bind_unix(self._listen_path)
        self.client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.client.connect(self.uds_path)
        self.client.sendall(b"CONNECT %d\n" % GUEST_PORT)
        self.client.setblocking(False)

    def step(self, h2g: Stream, g2h: Stream) -> int:
        moved = self.accept()
        if self.accepted is not None:
            moved += _receive(self.accepted, g2h)
        if self.client is None or self._failed:
            return moved
        if self.host_port is None:
            return moved + self._read_ok()
        return moved + _send(self.client, h2g)

    def _read_ok(self) -> int:
        """Collect the device's answer to CONNECT; 1 when it completed or failed."""
        assert self.client is not None
        try:
            data = self.client.recv(_MAX_OK - len(self.greeting))
        except BlockingIOError:
            return 0
        if not data:
            return self._fail(f"{self.uds_path}: closed before OK (CONNECT {GUEST_PORT} refused)")
        self.greeting += data
        line, newline, _ = bytes(self.greeting).partition(b"\n")
        if not newline and len(self.greeting) < _MAX_OK:
            return len(data)
        try:
            self.host_port = parse_ok(line)
        except ValueError:
            return self._fail(f"{self.uds_path}: {bytes(self.greeting)!r} is not 'OK <port>\\n'")
        return len(data)

    def _fail(self, message: str) -> int:
        self.error(message)
        self._failed = True
        return 1

    def sockets(self) -> list[socket.socket]:
        return self.all() + ([self.client] if self.client is not None else [])

    def close(self) -> None:
        for sock in self.sockets():
            sock.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._listen_path)
