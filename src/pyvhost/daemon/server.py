"""Daemon: serve one device on a vhost-user socket, one front-end at a time, until told to stop.

Server mode (the default) listens at the socket path, as QEMU's ``-chardev socket,path=...``
expects; client mode connects to a front-end that listens (``server=on``), retrying until it
is there. Either way, when the front-end goes away the daemon waits for the next one. A device
with ``uses_inflight`` that is restarted under a running front-end picks up the chains its
predecessor left in flight (see ``DeviceQueue.recover_inflight``).

SIGTERM and SIGINT (when :meth:`Daemon.run` installs the handlers) stop the daemon cleanly:
the connection is closed, the rings stopped, and the socket file removed.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from types import FrameType
from typing import Any

from pyvhost.daemon.adapter import DeviceAdapter
from pyvhost.daemon.device import Device
from pyvhost.daemon.loop import EventLoop
from pyvhost.daemon.procloop import WORKER_MODES, ProcessAdapter, ProcessLoop
from pyvhost.user.backend import BackendHandler
from pyvhost.user.connection import Connection, Listener, connect
from pyvhost.user.device import BackendDevice

__all__ = ["Daemon"]

log = logging.getLogger("pyvhost.daemon")

ACCEPT_POLL = 0.2
"""Seconds between checks for shutdown while waiting for a front-end."""

CONNECT_RETRY = 0.2
"""Seconds between connection attempts in client mode."""


class Daemon:
    """Serve ``device`` (an instance, reused across connections, or a factory called per
    connection) on ``socket_path``.

    A :class:`pyvhost.daemon.Device` is served through a
    :class:`~pyvhost.daemon.adapter.DeviceAdapter` (one per connection) on the daemon's event
    loop; any other :class:`pyvhost.user.device.BackendDevice` is handed to the protocol handler
    as it is.

    ``worker_mode="process"`` serves the queues from ``workers`` worker processes instead of
    threads (:mod:`pyvhost.daemon.procloop`); the device must say how a worker builds its twin
    (:meth:`Device.process_spec`), or the daemon refuses to start (ValueError) when it is given
    the device (or its class) and drops each front-end when a factory makes one that cannot.
    """

    def __init__(
        self,
        device: Device | BackendDevice | Callable[[], Device | BackendDevice],
        socket_path: str | os.PathLike[str],
        *,
        client: bool = False,
        workers: int = 1,
        worker_mode: str = "thread",
        poll_us: int = 0,
        **handler_options: Any,
    ) -> None:
        if worker_mode not in WORKER_MODES:
            raise ValueError(f"worker_mode {worker_mode!r} is not one of {', '.join(WORKER_MODES)}")
        if worker_mode == "process":
            _check_process_mode(device)
        if isinstance(device, Device | BackendDevice):
            instance = device
            self.device_factory: Callable[[], Device | BackendDevice] = lambda: instance
            self.device_name = type(device).__name__
        else:
            self.device_factory = device
            self.device_name = getattr(device, "__name__", type(device).__name__)
        self.socket_path = os.fspath(socket_path)
        self.client = client
        self.workers = workers
        self.worker_mode = worker_mode
        self.poll_us = poll_us
        """Busy-poll window of the queue workers after work (see :class:`EventLoop`)."""
        self.handler_options = handler_options
        self.connections = 0
        """Front-ends served so far."""
        self.device: Device | BackendDevice | None = None
        """The device of the current (or last) connection."""
        self.ready = threading.Event()
        """Set once the socket listens (server) or the first connection attempt was made."""
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._conn: Connection | None = None
        self._listener: Listener | None = None
        self._loop: EventLoop | ProcessLoop | None = None

    @property
    def name(self) -> str:
        return os.path.basename(self.socket_path)

    # -- running ---------------------------------------------------------------------------------

    def serve_forever(self) -> None:
        """Serve front-ends one after the other until :meth:`shutdown`."""
        if self.worker_mode == "process":
            self._loop = ProcessLoop(self.workers, name=self.device_name, poll_us=self.poll_us)
        else:
            self._loop = EventLoop(self.workers, name=self.device_name, poll_us=self.poll_us)
        try:
            if self.client:
                self._client_loop()
            else:
                self._server_loop()
        finally:
            self._loop.stop()
            self._loop = None
            self.ready.set()
            log.info("%s: daemon stopped", self.name)

    def _server_loop(self) -> None:
        self._listener = listener = Listener(self.socket_path)
        try:
            log.info(
                "%s: listening on %s (%s, %d worker %s)",
                self.name,
                self.socket_path,
                self.device_name,
                self.workers,
                {"thread": "thread", "process": "process"}[self.worker_mode]
                + ("" if self.workers == 1 else "es" if self.worker_mode == "process" else "s"),
            )
            self.ready.set()
            while not self._stopping.is_set():
                try:
                    conn = listener.accept(ACCEPT_POLL)
                except TimeoutError:
                    continue
                except OSError as exc:
                    if self._stopping.is_set():
                        break
                    log.error("%s: accept failed: %s", self.name, exc)
                    time.sleep(ACCEPT_POLL)
                    continue
                self._serve(conn)
        finally:
            self._listener = None
            listener.close()
            log.info("%s: socket %s removed", self.name, self.socket_path)

    def _client_loop(self) -> None:
        waiting_logged = False
        while not self._stopping.is_set():
            try:
                conn = connect(self.socket_path, deadline=CONNECT_RETRY, interval=0.05)
            except (ConnectionError, OSError) as exc:
                if not waiting_logged:
                    log.info(
                        "%s: waiting for a front-end at %s (%s)", self.name, self.socket_path, exc
                    )
                    waiting_logged = True
                self.ready.set()
                self._stopping.wait(CONNECT_RETRY)
                continue
            self.ready.set()
            waiting_logged = False
            self._serve(conn)

    def _serve(self, conn: Connection) -> None:
        """Serve one front-end until it leaves (or shutdown closes its connection)."""
        self.connections += 1
        name = f"{self.name}#{self.connections}"
        try:
            device = self.device_factory()
        except Exception:
            log.exception("%s: cannot create the device; dropping the front-end", name)
            conn.close()
            return
        loop = self._loop
        assert loop is not None
        backend: BackendDevice
        if isinstance(device, Device):
            try:
                if isinstance(loop, ProcessLoop):
                    backend = ProcessAdapter(device, loop)
                else:
                    backend = DeviceAdapter(device, loop)
            except (ValueError, RuntimeError) as exc:
                log.error("%s: cannot serve the device: %s; dropping the front-end", name, exc)
                conn.close()
                return
            except Exception:
                log.exception("%s: cannot serve the device; dropping the front-end", name)
                conn.close()
                return
        elif isinstance(loop, ProcessLoop):
            log.error(
                "%s: %s is not a pyvhost.daemon.Device: it cannot be served by worker "
                "processes; dropping the front-end",
                name,
                type(device).__name__,
            )
            conn.close()
            return
        else:
            backend = device
        self.device = device
        handler = BackendHandler(backend, conn, name=name, **self.handler_options)
        with self._lock:
            self._conn = conn
        if self._stopping.is_set():
            _wake(conn)
        try:
            handler.serve()
        finally:
            with self._lock:
                self._conn = None
            if isinstance(backend, DeviceAdapter):
                backend.close()
            loop.idle()

    def shutdown(self) -> None:
        """Stop: close the current connection, stop accepting; serve_forever then returns."""
        if not self._stopping.is_set():
            log.info("%s: shutting down", self.name)
        self._stopping.set()
        with self._lock:
            conn = self._conn
        if conn is not None:
            _wake(conn)

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    def run(self) -> None:
        """serve_forever with SIGTERM / SIGINT handlers installed (main thread only).

        The handler only writes the signal's number to a pipe; a thread reads it and calls
        :meth:`shutdown`. Python runs a handler in the main thread between two bytecodes, maybe
        while that thread holds a lock shutdown() needs (the daemon's, an Event's), so a handler
        that stopped the daemon itself could wait forever for its own thread.

        The previous handlers come back when the daemon stops on its own; after a stop by signal
        the signals stay ignored, so that a repeat (``timeout`` sends SIGTERM to its child and
        then to the whole process group) cannot kill the process while it exits cleanly.
        """
        read_fd, write_fd = os.pipe()
        os.set_blocking(write_fd, False)
        signalled: list[int] = []

        def on_signal(signum: int, frame: FrameType | None) -> None:
            signalled.append(signum)
            with contextlib.suppress(OSError):  # a full pipe already holds a stop
                os.write(write_fd, bytes([signum]))

        watcher = threading.Thread(
            target=self._watch_signals, args=(read_fd,), name=f"signals-{self.name}", daemon=True
        )
        watcher.start()
        previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            self.serve_forever()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, _ignore_signal if signalled else handler)
            os.close(write_fd)
            watcher.join()
            os.close(read_fd)

    def _watch_signals(self, read_fd: int) -> None:
        """Stop the daemon on the first signal run() recorded; until run() closes the pipe."""
        seen = 0
        while data := os.read(read_fd, 16):
            for signum in data:
                name = signal.Signals(signum).name
                if seen:
                    log.debug("%s: %s again while stopping", self.name, name)
                else:
                    log.info("%s: %s received", self.name, name)
                    self.shutdown()
                seen += 1

    @contextlib.contextmanager
    def run_in_thread(self, timeout: float = 10.0) -> Iterator[Daemon]:
        """Serve in a background thread for the ``with`` block; ready when it is entered."""
        thread = threading.Thread(
            target=self.serve_forever, name=f"daemon-{self.name}", daemon=True
        )
        thread.start()
        if not self.ready.wait(timeout):
            self.shutdown()
            raise TimeoutError(f"daemon on {self.socket_path} not ready within {timeout}s")
        try:
            yield self
        finally:
            self.shutdown()
            thread.join(timeout)
            if thread.is_alive():
                log.error("%s: daemon thread did not stop within %gs", self.name, timeout)


def _ignore_signal(signum: int, frame: FrameType | None) -> None:
    """What SIGTERM / SIGINT do once a signal has stopped the daemon: nothing."""


def _check_process_mode(device: object) -> None:
    """Refuse, at construction, a device (or device class) that worker processes cannot serve."""
    if isinstance(device, type):
        if not issubclass(device, Device):
            raise ValueError(f"{device.__name__} is not a pyvhost.daemon.Device: worker "
                             "processes cannot serve it")  # fmt: skip
        if device.process_spec is Device.process_spec:
            raise ValueError(f"{device.__name__} does not support worker processes (no "
                             "process_spec()): use worker_mode='thread'")  # fmt: skip
        return
    if isinstance(device, BackendDevice) and not isinstance(device, Device):
        raise ValueError(
            f"{type(device).__name__} is not a pyvhost.daemon.Device: worker processes cannot "
            "serve it"
        )
    if isinstance(device, Device) and device.process_spec() is None:
        raise ValueError(
            f"{type(device).__name__} does not support worker processes (its process_spec() "
            "is None): use worker_mode='thread'"
        )


def _wake(conn: Connection) -> None:
    """Make a blocked receive on ``conn`` return (EOF), from any thread."""
    with contextlib.suppress(OSError):
        conn.socket.shutdown(socket.SHUT_RDWR)
