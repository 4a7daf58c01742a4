"""vhost-user framing over a Unix stream socket, with fds passed as SCM_RIGHTS.

A :class:`Connection` sends whole messages (fds ride with the first byte) and receives
whole frames (header, then exactly ``size`` payload bytes). Decoding is left to
:mod:`pyvhost.user.messages`; ``recv_request`` / ``recv_reply`` are thin wrappers.
"""

from __future__ import annotations

import array
import errno
import math
import os
import select
import socket
import stat
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from pyvhost.closing import Closing
from pyvhost.errors import ConnectionClosedError, ProtocolError
from pyvhost.user.messages import (
    HEADER_SIZE,
    MAX_FDS,
    AnyRequest,
    Header,
    Message,
    close_fds,
    decode_header,
    decode_reply,
    decode_request,
    encode_message,
)

_ANC_SIZE = socket.CMSG_SPACE(MAX_FDS * array.array("i").itemsize)


@dataclass(slots=True)
class Frame:
    """One undecoded message: a checked header, its payload bytes and the fds it carried."""

    header: Header
    payload: bytes
    fds: list[int] = field(default_factory=list)


def fds_from_ancdata(ancdata: list[tuple[int, int, bytes]]) -> list[int]:
    """The fds carried by SCM_RIGHTS control messages (``socket.recvmsg`` ancillary data)."""
    fds = array.array("i")
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(data[: len(data) - len(data) % fds.itemsize])
    return list(fds)


class Connection(Closing):
    """A connected AF_UNIX SOCK_STREAM socket speaking vhost-user; owns the socket.

    Sends are serialised by a lock so two threads never interleave a message; receiving is
    meant for a single reader (also locked, so concurrent readers cannot split a frame).
    After a timeout or a protocol error in the middle of a frame the stream is out of
    sync: later receives raise ProtocolError and the connection should be closed.
    """

    def __init__(self, sock: socket.socket) -> None:
        if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM:
            raise ValueError("vhost-user needs a connected AF_UNIX SOCK_STREAM socket")
        sock.setblocking(True)
        self._sock = sock
        self._send_lock = threading.Lock()
        self._recv_lock = threading.Lock()
        self._desync: str | None = None
        self._consumed = 0

    @property
    def socket(self) -> socket.socket:
        return self._sock

    def fileno(self) -> int:
        return self._sock.fileno()

    @property
    def closed(self) -> bool:
        return self._sock.fileno() < 0

    def close(self) -> None:
        self._sock.close()

    # --- sending -------------------------------------------------------------------------

    def send(self, msg: Message) -> None:
        """Send one message; its fds go with the first byte. The caller keeps its fds."""
        data, fds = encode_message(msg)
        self.send_bytes(data, fds)

    def send_bytes(self, data: bytes, fds: Sequence[int] = ()) -> None:
        """Send raw bytes (one or more messages, or garbage) with ``fds`` on the first byte."""
        if len(fds) > MAX_FDS:
            raise ProtocolError(f"{len(fds)} fds exceed the maximum of {MAX_FDS}", field="fds")
        view = memoryview(data)
        with self._send_lock:
            try:
                if fds:
                    sent = socket.send_fds(self._sock, [view], list(fds))
                    if sent == 0 and view:
                        raise ConnectionClosedError("peer closed the connection")
                    view = view[sent:]
                if view:
                    self._sock.sendall(view)
            except (BrokenPipeError, ConnectionResetError) as exc:
                raise ConnectionClosedError(f"peer closed the connection ({exc})") from exc

    # --- receiving -----------------------------------------------------------------------

    def _wait(self, deadline: float | None) -> None:
        if deadline is None:
            return
        remaining = deadline - time.monotonic()
        if remaining > 0:
            poller = select.poll()
            poller.register(self._sock, select.POLLIN)
            if poller.poll(max(1, math.ceil(remaining * 1000))):
                return
        raise TimeoutError("timed out waiting for a vhost-user message")

    def _recv_exact(self, buf: bytearray, deadline: float | None, fds: list[int], what: str) -> int:
        """Fill ``buf``; collect fds into ``fds``; return bytes read (short only at EOF)."""
        view = memoryview(buf)
        got = 0
        while got < len(buf):
            self._wait(deadline)
            try:
                n, ancdata, flags, _ = self._sock.recvmsg_into([view[got:]], _ANC_SIZE)
            except ConnectionResetError:
                n, ancdata, flags = 0, [], 0
            fds.extend(fds_from_ancdata(ancdata))
            if flags & socket.MSG_CTRUNC:
                raise ProtocolError(
                    f"control data truncated in the {what}: more than {MAX_FDS} fds sent",
                    field="fds",
                )
            if len(fds) > MAX_FDS:
                raise ProtocolError(f"{len(fds)} fds exceed {MAX_FDS}", field="fds")
            if n == 0:
                return got
            got += n
            self._consumed += n
        return got

    def recv_frame(self, timeout: float | None = None, *, backend_channel: bool = False) -> Frame:
        """Receive one whole frame: 12-byte header (checked), then exactly ``size`` bytes.

        EOF before any byte: ConnectionClosedError("peer closed the connection"); EOF inside
        a frame: ConnectionClosedError naming the missing byte count; ``timeout`` seconds
        for the whole frame, then TimeoutError. Fds are closed on every error.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._recv_lock:
            if self._desync is not None:
                raise ProtocolError(f"stream out of sync after {self._desync}; close it")
            fds: list[int] = []
            self._consumed = 0
            try:
                return self._recv_frame(deadline, fds, backend_channel)
            except ConnectionClosedError:
                close_fds(fds)
                raise
            except BaseException as exc:
                close_fds(fds)
                if self._consumed or not isinstance(exc, TimeoutError):
                    self._desync = f"{type(exc).__name__} in the middle of a message"
                raise

    def _recv_frame(self, deadline: float | None, fds: list[int], backend_channel: bool) -> Frame:
        head = bytearray(HEADER_SIZE)
        got = self._recv_exact(head, deadline, fds, "header")
        if got == 0:
            raise ConnectionClosedError("peer closed the connection")
        if got < HEADER_SIZE:
            raise ConnectionClosedError(
                f"peer closed the connection in the middle of a header: "
                f"{HEADER_SIZE - got} of {HEADER_SIZE} bytes missing"
            )
        header = decode_header(head, backend_channel=backend_channel)
        payload = bytearray(header.size)
        got = self._recv_exact(payload, deadline, fds, "payload")
        if got < header.size:
            raise ConnectionClosedError(
                f"peer closed the connection in the middle of a payload: "
                f"{header.size - got} of {header.size} bytes missing"
            )
        return Frame(header, bytes(payload), fds)

    def recv_request(
        self, timeout: float | None = None, *, backend_channel: bool = False
    ) -> Message:
        """Receive and decode one request (``backend_channel``: a back-end request)."""
        frame = self.recv_frame(timeout, backend_channel=backend_channel)
        return decode_request(
            frame.header, frame.payload, frame.fds, backend_channel=backend_channel
        )

    def recv_reply(
        self, request: AnyRequest, timeout: float | None = None, *, backend_channel: bool = False
    ) -> Message:
        """Receive and decode the reply to ``request``."""
        frame = self.recv_frame(timeout, backend_channel=backend_channel)
        return decode_reply(
            request, frame.header, frame.payload, frame.fds, backend_channel=backend_channel
        )


class Listener(Closing):
    """A listening Unix socket at ``path``; accepts vhost-user connections.

    A stale socket file at ``path`` is removed first; any other kind of file is left alone
    and FileExistsError raised. ``close()`` removes the socket file if it is still ours.
    """

    def __init__(self, path: str | os.PathLike[str], backlog: int = 1) -> None:
        self.path = os.fspath(path)
        try:
            st = os.lstat(self.path)
        except FileNotFoundError:
            pass
        else:
            if not stat.S_ISSOCK(st.st_mode):
                raise FileExistsError(
                    errno.EEXIST, f"{self.path} exists and is not a socket; not removing it"
                )
            os.unlink(self.path)
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self._sock.bind(self.path)
            self._sock.listen(backlog)
            self._ino = os.stat(self.path).st_ino
        except BaseException:
            self._sock.close()
            raise

    def fileno(self) -> int:
        return self._sock.fileno()

    def accept(self, timeout: float | None = None) -> Connection:
        """Wait for one front-end (or back-end) to connect; TimeoutError after ``timeout``."""
        if timeout is not None:
            poller = select.poll()
            poller.register(self._sock, select.POLLIN)
            if not poller.poll(max(0, math.ceil(timeout * 1000))):
                raise TimeoutError(f"no connection on {self.path} within {timeout}s")
        sock, _ = self._sock.accept()
        return Connection(sock)

    def close(self) -> None:
        if self._sock.fileno() < 0:
            return
        self._sock.close()
        try:
            if os.stat(self.path).st_ino == self._ino:
                os.unlink(self.path)
        except FileNotFoundError:
            pass


_RETRY_ERRNOS = (errno.ENOENT, errno.ECONNREFUSED)


def connect(
    path: str | os.PathLike[str], *, deadline: float = 10.0, interval: float = 0.05
) -> Connection:
    """Connect to ``path``, retrying while it is missing or refusing, for ``deadline`` seconds."""
    target = os.fspath(path)
    end = time.monotonic() + deadline
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(target)
        except OSError as exc:
            sock.close()
            if exc.errno not in _RETRY_ERRNOS:
                raise
            if time.monotonic() + interval > end:
                name = errno.errorcode.get(exc.errno or 0, str(exc.errno))
                raise ConnectionError(
                    f"cannot connect to {target} within {deadline}s: last error {name} "
                    f"({exc.strerror})"
                ) from exc
            time.sleep(interval)
        else:
            return Connection(sock)


def socketpair() -> tuple[Connection, Connection]:
    """Two connected Connections (for tests and in-process peers)."""
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    return Connection(a), Connection(b)
