"""The host side of the hybrid vsock device: Unix sockets to and from the guest's connections.

A guest connection to host port P becomes a connection to the Unix socket ``UDS_PATH_P`` (made by
the device; if nothing listens there the guest gets RST). A host program that connects to
``UDS_PATH`` (where the device listens) and writes ``CONNECT <port>\\n`` gets a connection to that
guest port and reads ``OK <host port>\\n`` first; if the guest refuses, its socket is closed.

Every socket is non-blocking and served by the daemon's loop through the :class:`Host` calls; all
of them run on one worker, as do the device's queues, and :attr:`UnixBridge.lock` keeps the
connection thread (reset, close) out while they do.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import socket
import stat
import threading
import time
from collections.abc import Callable, Collection, Iterable
from typing import Protocol

from pyvhost.devices.vsock.handshake import ConnectLine, HandshakeError
from pyvhost.devices.vsock.link import Link
from pyvhost.devices.vsock.waits import Waits
from pyvhost.errors import VsockError
from pyvhost.virtio.vsock import ConnectionKey, VsockConnection, VsockEndpoint

__all__ = ["MAX_GREETERS", "Host", "UnixBridge", "bind_unix"]

log = logging.getLogger("pyvhost.devices.vsock")

MAX_GREETERS = 64
"""Host connections allowed to be still writing their CONNECT line; more are closed at once."""
_READ = 4096


class Host(Protocol):
    """What the bridge needs from the device (the daemon's watch API and the rx queue)."""

    def watch(self, fd: int, callback: Callable[[int], None], *, queue: int = 0) -> None: ...

    def unwatch(self, fd: int) -> None: ...

    def packets_ready(self) -> None:
        """The endpoint has packets for the guest: serve the rx queue soon."""


def bind_unix(path: str) -> socket.socket:
    """A non-blocking listening Unix socket at ``path``; a stale socket file there is replaced,
    any other file is left alone (FileExistsError)."""
    with contextlib.suppress(FileNotFoundError):
        if not stat.S_ISSOCK(os.lstat(path).st_mode):
            raise FileExistsError(errno.EEXIST, f"{path} exists and is not a socket")
        os.unlink(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
    try:
        sock.bind(path)
        sock.listen(128)
    except BaseException:
        sock.close()
        raise
    return sock


class _Greeter:
    """A host connection still writing its CONNECT line."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.line = ConnectLine()


class UnixBridge:
    """Listens at ``uds_path`` and bridges each connection of ``endpoint`` to a Unix socket."""

    def __init__(self, endpoint: VsockEndpoint, guest_cid: int, uds_path: str, host: Host) -> None:
        self.endpoint = endpoint
        self.guest_cid = guest_cid
        self.uds_path = uds_path
        self.host = host
        self.lock = threading.Lock()
        self.links: dict[int, Link] = {}
        self.by_key: dict[ConnectionKey, Link] = {}
        self.greeters: dict[int, _Greeter] = {}
        self._reading: set[int] = set()
        self.listener = bind_unix(uds_path)
        self._ino = os.stat(uds_path).st_ino
        try:
            self.waits = Waits()
        except BaseException:
            self.listener.close()
            raise
        host.watch(self.listener.fileno(), self._on_listener)
        host.watch(self.waits.fileno(), self._on_waits)

    # -- what the device's queues report -------------------------------------------------------

    def guest_spoke(self, keys: Iterable[ConnectionKey]) -> None:
        """The guest's packets went to these connections (new ones wait in accept())."""
        while (conn := self.endpoint.accept()) is not None:
            self._open_to_host(conn)
        self._service_keys(keys)

    def guest_listened(self, keys: Iterable[ConnectionKey]) -> None:
        """Data packets of these connections went into the rx queue (room for more)."""
        self._service_keys(keys)

    def arm_timer(self) -> None:
        """Wake up at the connections' next deadline (connect and close timeouts)."""
        self.waits.arm(self.endpoint.next_deadline)

    def settle(self) -> None:
        """After a round: arm the timer, ask for the rx queue if packets wait."""
        self.arm_timer()
        if self.endpoint.has_packets:
            self.host.packets_ready()

    # -- guest to host -----------------------------------------------------------------------------

    def _open_to_host(self, conn: VsockConnection) -> None:
        port = conn.key.local_port
        path = f"{self.uds_path}_{port}"
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
        try:
            sock.connect(path)
        except OSError as exc:
            sock.close()
            log.info("%s: refused, %s: %s", conn.key, path, exc.strerror or exc)
            conn.reset()
            return
        log.info("%s: the guest connected to %s", conn.key, path)
        self._add(Link(conn, sock))

    # -- host to guest -----------------------------------------------------------------------------

    def _on_listener(self, fd: int) -> None:
        with self.lock:
            while True:
                try:
                    sock, _ = self.listener.accept()
                except (BlockingIOError, InterruptedError):
                    return
                except OSError as exc:
                    log.warning("%s: accept failed: %s", self.uds_path, exc)
                    return
                if len(self.greeters) >= MAX_GREETERS:
                    log.warning(
                        "%s: %d CONNECT lines pending, closed a new one",
                        self.uds_path,
                        MAX_GREETERS,
                    )
                    sock.close()
                    continue
                sock.setblocking(False)
                self.greeters[sock.fileno()] = _Greeter(sock)
                self.host.watch(sock.fileno(), self._on_greeter)

    def _on_greeter(self, fd: int) -> None:
        with self.lock:
            greeter = self.greeters.get(fd)
            if greeter is None:
                return
            try:
                data = greeter.sock.recv(_READ)
                got = greeter.line.feed(data) if data else None
            except BlockingIOError:
                return
            except (OSError, HandshakeError) as exc:
                self._drop_greeter(fd, f"{exc}")
                return
            if not data:
                self._drop_greeter(fd, "closed before its CONNECT line")
            elif got is not None:
                self._connect_guest(fd, *got)

    def _connect_guest(self, fd: int, port: int, early: bytes) -> None:
        greeter = self.greeters.pop(fd)
        self.host.unwatch(fd)
        try:
            conn = self.endpoint.connect(self.guest_cid, port, now=time.monotonic())
        except (ValueError, VsockError) as exc:
            log.info("%s: CONNECT %d refused: %s", self.uds_path, port, exc)
            greeter.sock.close()
            return
        log.info("%s: host CONNECT %d", conn.key, port)
        self._add(Link(conn, greeter.sock, greet=True, early=early))
        self.settle()

    def _drop_greeter(self, fd: int, why: str) -> None:
        log.info("%s: host connection closed: %s", self.uds_path, why)
        greeter = self.greeters.pop(fd)
        self.host.unwatch(fd)
        greeter.sock.close()

    # -- links -------------------------------------------------------------------------------------

    def _add(self, link: Link) -> None:
        self.links[link.fd] = link
        self.by_key[link.conn.key] = link
        self._service(link, time.monotonic())

    def _on_link(self, fd: int) -> None:
        with self.lock:
            link = self.links.get(fd)
            if link is None:
                return
            link.read_host()
            self._service(link, time.monotonic())
            self.settle()

    def _on_waits(self, fd: int) -> None:
        with self.lock:
            writable, fired = self.waits.collect()
            now = time.monotonic()
            if fired:
                self.endpoint.tick(now)
                targets = list(self.links.values())
            else:
                targets = [self.links[fd] for fd in writable if fd in self.links]
            for link in targets:
                self._service(link, now)
            self.settle()

    def _service_keys(self, keys: Iterable[ConnectionKey]) -> None:
        now = time.monotonic()
        for key in keys:
            link = self.by_key.get(key)
            if link is not None:
                self._service(link, now)

    def _service(self, link: Link, now: float) -> None:
        """Move what can move on ``link``; then watch it for what it waits for, or end it."""
        blocked, done = link.service(now)
        if done:
            self._remove(link)
            return
        if blocked:
            self.waits.want_write(link.fd)
        self._read_when(link, link.room > 0)

    def _read_when(self, link: Link, wanted: bool) -> None:
        if wanted and link.fd not in self._reading:
            self._reading.add(link.fd)
            self.host.watch(link.fd, self._on_link)
        elif not wanted and link.fd in self._reading:
            self._reading.discard(link.fd)
            self.host.unwatch(link.fd)

    def _remove(self, link: Link) -> None:
        del self.links[link.fd]
        self.by_key.pop(link.conn.key, None)
        why = link.error or link.conn.reason or "closed"
        log.info("%s: Unix socket closed (%s)", link.conn.key, why)
        self._read_when(link, False)
        self.waits.forget(link.fd)
        link.sock.close()

    # -- reset and close ---------------------------------------------------------------------------

    def detach_all(self) -> list[tuple[socket.socket, bool]]:
        """Under the lock: forget every bridged and greeting socket; returns each with whether it
        is watched, for :meth:`release` to unwatch and close without the lock held."""
        found = self.detach_except(())
        found += [(g.sock, True) for g in self.greeters.values()]
        self.greeters.clear()
        return found

    def detach_except(self, keep: Collection[ConnectionKey]) -> list[tuple[socket.socket, bool]]:
        """Under the lock: forget the bridged sockets of connections not in ``keep`` (sockets
        still greeting stay), returned as :meth:`detach_all` does."""
        found = []
        for fd, link in list(self.links.items()):
            if link.conn.key in keep:
                continue
            found.append((link.sock, fd in self._reading))
            self.waits.forget(fd)
            self._reading.discard(fd)
            del self.links[fd]
            if self.by_key.get(link.conn.key) is link:
                del self.by_key[link.conn.key]
        return found

    def release(self, sockets: list[tuple[socket.socket, bool]]) -> None:
        """Unwatch and close what :meth:`detach_all` returned (a callback running for one of
        them finds nothing and returns; unwatch waits for it)."""
        for sock, watched in sockets:
            if watched:
                self.host.unwatch(sock.fileno())
            sock.close()

    def close(self) -> None:
        """Close every socket, the listener (removing its file if still ours) and the timer."""
        with self.lock:
            sockets = self.detach_all()
        self.release(sockets)
        self.host.unwatch(self.listener.fileno())
        self.host.unwatch(self.waits.fileno())
        self.listener.close()
        self.waits.close()
        with contextlib.suppress(FileNotFoundError):
            if os.stat(self.uds_path).st_ino == self._ino:
                os.unlink(self.uds_path)
