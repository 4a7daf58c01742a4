"""One vsock stream connection bridged to one Unix stream socket, moved without blocking.

Host to guest: bytes are read from the Unix socket only while the guest has credit for them and
the connection holds fewer than :data:`MAX_UNSENT` bytes not yet in a packet, so a guest that
takes no rx buffers (or advertises a huge buffer) cannot make the device buffer without bound.
Guest to host: bytes leave the connection's receive buffer only as fast as the Unix socket takes
them; what stays there is not counted in ``fwd_cnt``, so the guest runs out of credit for this
connection alone and the tx queue keeps flowing for the others.
"""

from __future__ import annotations

import contextlib
import logging
import socket

from pyvhost.devices.vsock.handshake import ok_line
from pyvhost.virtio.vsock import ConnectionState, Shutdown, VsockConnection

__all__ = ["CHUNK", "MAX_UNSENT", "Link"]

log = logging.getLogger("pyvhost.devices.vsock")

CHUNK = 64 * 1024
"""Bytes moved per Unix socket call."""
MAX_UNSENT = 256 * 1024
"""Host bytes a connection may hold for packets not yet in the rx queue."""

_EMPTY = memoryview(b"")


class Link:
    """``conn`` and its Unix socket ``sock``; ``greet``: the host asked with CONNECT and gets its
    ``OK <port>`` line once the guest accepts (``early``: bytes it wrote after the line)."""

    def __init__(
        self, conn: VsockConnection, sock: socket.socket, *, greet: bool = False, early: bytes = b""
    ) -> None:
        self.conn = conn
        self.sock = sock
        self.fd = sock.fileno()
        self.greet = greet
        self.early = early
        self.out = _EMPTY
        """Guest bytes taken from the connection that the Unix socket has not taken yet."""
        self.host_eof = False
        self.write_shut = False
        self.error: str | None = None

    def __repr__(self) -> str:
        return f"Link({self.conn.key}, fd {self.fd})"

    @property
    def room(self) -> int:
        """Bytes the Unix socket may be read for now (0: do not watch it)."""
        conn = self.conn
        if self.greet or self.early or self.host_eof or self.error or not conn.writable:
            return 0
        return max(0, min(conn.credit, MAX_UNSENT - conn.unsent))

    def read_host(self) -> int:
        """Read the Unix socket into the connection while there is room; returns bytes read."""
        total = 0
        conn = self.conn
        while (room := self.room) > 0:
            try:
                data = self.sock.recv(min(room, CHUNK))
            except BlockingIOError:
                break
            except OSError as exc:
                self.error = f"reading the Unix socket: {exc}"
                break
            if not data:
                self.host_eof = True
                if conn.state is ConnectionState.CONNECTED:
                    conn.shutdown(Shutdown.SEND)
                break
            conn.send(data)
            total += len(data)
        return total

    def write_host(self) -> bool:
        """Write what the guest sent to the Unix socket; True if the socket is full."""
        conn = self.conn
        while True:
            if not self.out:
                if not conn.readable:
                    return False
                self.out = memoryview(conn.receive(CHUNK))
            try:
                sent = self.sock.send(self.out, socket.MSG_NOSIGNAL)
            except BlockingIOError:
                return True
            except OSError as exc:
                self.error = f"writing the Unix socket: {exc}"
                self.out = _EMPTY
                return False
            self.out = self.out[sent:]

    def service(self, now: float) -> tuple[bool, bool]:
        """Move what can move after anything happened; returns ``(blocked, done)``: wait for the
        Unix socket to be writable, and close it (the link is over)."""
        conn = self.conn
        if self.greet and not self._greeted():
            return False, conn.state is not ConnectionState.CONNECTING
        if self.early and conn.writable:
            self.early = self.early[conn.send(self.early) :]
        blocked = self.write_host()
        if self.error:
            conn.reset()
            return False, True
        drained = not self.out and not conn.readable
        if drained and conn.peer_shutdown & Shutdown.SEND and not self.write_shut:
            self.write_shut = True
            with contextlib.suppress(OSError):
                self.sock.shutdown(socket.SHUT_WR)
        if conn.state is ConnectionState.CLOSED:
            return blocked, drained
        if self.host_eof and drained and conn.peer_shutdown & Shutdown.SEND:
            conn.close(now)
            return False, True
        return blocked, False

    def _greeted(self) -> bool:
        """A CONNECT from the host: once the guest accepted, the OK line goes first."""
        conn = self.conn
        if conn.state is not ConnectionState.CONNECTED:
            if conn.state is not ConnectionState.CONNECTING:
                self.error = f"guest port {conn.key.peer_port}: {conn.reason}"
            return False
        self.greet = False
        self.out = memoryview(ok_line(conn.key.local_port))
        log.info("%s: the guest accepted the host's CONNECT", conn.key)
        return True
