"""The vsock device served in a thread and a guest played by the test thread (DriverSession,
VsockDriver, an endpoint at the guest's CID); host programs are plain Unix sockets, run in
threads of their own where they block."""

from __future__ import annotations

import contextlib
import os
import random
import select
import socket
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from pyvhost.daemon import Daemon
from pyvhost.devices.vsock import VsockDevice
from pyvhost.driver.session import DriverSession
from pyvhost.driver.vsock import VsockDriver
from pyvhost.virtio.vsock import (
    EVENT_QUEUE,
    HOST_CID,
    ConnectionOptions,
    ConnectionState,
    VsockConnection,
    VsockEndpoint,
)

GUEST_CID = 3
T = TypeVar("T")


@dataclass
class Served:
    device: VsockDevice
    daemon: Daemon
    sock: str
    uds: str


@contextlib.contextmanager
def serve_vsock(
    folder: Path, *, guest_cid: int = GUEST_CID, options: ConnectionOptions | None = None
) -> Iterator[Served]:
    """``VsockDevice`` at ``folder``/v.sock with its Unix sockets at ``folder``/uds[_PORT]."""
    sock, uds = str(folder / "v.sock"), str(folder / "uds")
    device = VsockDevice(guest_cid, uds, options=options)
    daemon = Daemon(device, sock)
    try:
        with daemon.run_in_thread():
            yield Served(device, daemon, sock, uds)
    finally:
        device.close()


class Guest:
    """The guest's vsock stack over a vhost-user session, pumped by the calling thread."""

    def __init__(
        self,
        sock: str,
        *,
        cid: int = GUEST_CID,
        options: ConnectionOptions | None = None,
        reconnect: float = 0.0,
        queue_size: int = 64,
    ) -> None:
        self.session = DriverSession.connect(
            sock, num_queues=EVENT_QUEUE + 1, queue_size=queue_size, reconnect=reconnect
        )
        self.endpoint = VsockEndpoint(
            cid, peer_cid=HOST_CID, options=options, first_port=random.randrange(2000, 1 << 30)
        )
        self.driver = VsockDriver(self.session, self.endpoint)
        self.driver.post_rx()

    def pump(self, wait: float = 0.01) -> int:
        """One round of the driver (and the endpoint's timers); waits ``wait`` if idle."""
        moved = self.driver.pump()
        self.endpoint.tick(time.monotonic())
        self.session.check_backend()
        if not moved and wait:
            fds = [q.call_fd for q in self.session.queues]
            select.select(fds, [], [], wait)
            for q in range(len(self.session.queues)):
                self.session.notifications(q)
        return moved

    def until(self, cond: Callable[[], bool], timeout: float = 10.0, what: str = "") -> None:
        """Pump until ``cond()``; TimeoutError naming ``what`` otherwise."""
        deadline = time.monotonic() + timeout
        while not cond():
            if time.monotonic() > deadline:
                raise TimeoutError(f"not within {timeout:g} s: {what or cond}")
            self.pump()

    def connect(self, port: int) -> VsockConnection:
        """A connection to host port ``port``, pumped until it is no longer connecting."""
        conn = self.endpoint.connect(HOST_CID, port, now=time.monotonic())
        self.until(lambda: conn.state is not ConnectionState.CONNECTING, what=f"connect {port}")
        return conn

    def accept(self, timeout: float = 10.0) -> VsockConnection:
        got: list[VsockConnection] = []

        def accepted() -> bool:
            conn = self.endpoint.accept()
            if conn is not None:
                got.append(conn)
            return bool(got)

        self.until(accepted, timeout, "accept")
        return got[0]

    def exchange(self, conn: VsockConnection, data: bytes, n: int, timeout: float = 20.0) -> bytes:
        """Send ``data`` as credit allows while reading ``n`` bytes (fewer if the connection
        ends first), as a program that writes and reads at once does."""
        view = memoryview(data)
        sent = 0
        got = bytearray()

        def done() -> bool:
            nonlocal sent
            if sent < len(view) and conn.writable:
                sent += conn.send(view[sent : sent + 65536])
            got.extend(conn.receive())
            return sent >= len(view) and (len(got) >= n or conn.at_eof)

        self.until(done, timeout, f"sending {len(data)} bytes, receiving {n}")
        return bytes(got)

    def flush(self, timeout: float = 10.0) -> None:
        """Pump until every packet queued was taken by the device."""
        self.until(
            lambda: not self.endpoint.has_packets and self.driver.tx_in_flight == 0,
            timeout,
            "the packets sent",
        )

    def send_all(self, conn: VsockConnection, data: bytes, timeout: float = 20.0) -> None:
        """Send every byte as credit allows."""
        self.exchange(conn, data, 0, timeout)

    def receive(self, conn: VsockConnection, n: int, timeout: float = 20.0) -> bytes:
        """Read ``n`` bytes (fewer if the connection ends first)."""
        return self.exchange(conn, b"", n, timeout)

    def close(self) -> None:
        self.session.close()

    def __enter__(self) -> Guest:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Host:
    """Blocking Unix-socket programs run in threads while the test thread pumps the guest."""

    def __init__(self, uds: str) -> None:
        self.uds = uds
        self.pool = ThreadPoolExecutor(8)
        self.listeners: list[socket.socket] = []
        self.sockets: list[socket.socket] = []
        """Every connection made or accepted here: shut down at close, so that a program still
        blocked in a failed test returns at once."""

    def run(self, fn: Callable[..., T], *args: Any) -> Future[T]:
        return self.pool.submit(fn, *args)

    def listen(self, port: int) -> socket.socket:
        """A listener at ``UDS_PORT`` (where the device connects the guest's port ``port``)."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(f"{self.uds}_{port}")
        sock.listen(8)
        sock.settimeout(20)
        self.listeners.append(sock)
        return sock

    def accept(self, listener: socket.socket) -> socket.socket:
        conn, _ = listener.accept()
        conn.settimeout(20)
        self.sockets.append(conn)
        return conn

    def connect(self, port: int, early: bytes = b"") -> tuple[socket.socket, bytes]:
        """CONNECT to guest port ``port``; the socket and the device's answer line (b"" when
        it closed the connection instead)."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(20)
        self.sockets.append(sock)
        sock.connect(self.uds)
        sock.sendall(b"CONNECT %d\n" % port + early)
        return sock, read_line(sock)

    def close(self) -> None:
        for sock in self.sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        self.pool.shutdown(wait=True, cancel_futures=True)
        for sock in self.listeners:
            path = sock.getsockname()
            sock.close()
            with contextlib.suppress(OSError):
                os.unlink(path)


def read_line(sock: socket.socket) -> bytes:
    """Bytes up to and including a newline, read one at a time (what follows stays unread)."""
    line = b""
    while not line.endswith(b"\n"):
        byte = sock.recv(1)
        if not byte:
            break
        line += byte
    return line


def read_exactly(sock: socket.socket, n: int) -> bytes:
    """``n`` bytes, or fewer at end of file."""
    got = bytearray()
    while len(got) < n:
        data = sock.recv(min(n - len(got), 1 << 16))
        if not data:
            break
        got += data
    return bytes(got)


def send_while_reading(sock: socket.socket, data: bytes, n: int) -> bytes:
    """``sendall(data)`` in a thread while reading ``n`` bytes here (neither side may wait for
    the other to read first: the buffers between them are bounded)."""
    writer = threading.Thread(target=sock.sendall, args=(data,), daemon=True)
    writer.start()
    got = read_exactly(sock, n)
    writer.join(20)
    return got


def read_to_eof(sock: socket.socket) -> bytes:
    got = bytearray()
    while data := sock.recv(1 << 16):
        got += data
    return bytes(got)
