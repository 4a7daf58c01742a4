"""A transparent vhost-user man-in-the-middle that reports every message it forwards.

:class:`TraceProxy` listens for a front-end, connects to the back-end for each front-end it
accepts, and copies every message both ways byte for byte with its fds, decoding a copy with
the codec for the trace. It never changes what flows: undecodable bytes are reported and still
forwarded. The one thing it rewrites is the socket of ``SET_BACKEND_REQ_FD``, which it replaces
by one end of its own socket pair so that the back-end channel is traced too.
"""

from __future__ import annotations

import array
import contextlib
import dataclasses
import enum
import logging
import os
import select
import socket
import stat
import struct
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import Self

from pyvhost.user.connection import Listener, connect, fds_from_ancdata
from pyvhost.user.frontend import decode_log_base_reply
from pyvhost.user.messages import (
    FLAG_REPLY,
    HEADER_SIZE,
    MAX_PAYLOAD_SIZE,
    AnyRequest,
    BackendRequest,
    Message,
    Request,
    close_fds,
    decode_header,
    decode_reply,
    decode_request,
    request_name,
)

log = logging.getLogger(__name__)

SCM_MAX_FD = 253
"""The most fds Linux passes in one SCM_RIGHTS message: the proxy accepts all of them."""

STALL_TIMEOUT = 1.0
"""Seconds a peer may pause inside a message before the bytes so far are forwarded as they are."""

_ANC_SIZE = socket.CMSG_SPACE(SCM_MAX_FD * array.array("i").itemsize)
_RAW_HEADER = struct.Struct("<III")


class Direction(enum.StrEnum):
    """Which way a message travels, and on which connection."""

    FRONT_TO_BACK = "front->back"
    BACK_TO_FRONT = "back->front"
    CHANNEL_BACK_TO_FRONT = "backend-channel back->front"
    CHANNEL_FRONT_TO_BACK = "backend-channel front->back"

    @property
    def backend_channel(self) -> bool:
        return self in (Direction.CHANNEL_BACK_TO_FRONT, Direction.CHANNEL_FRONT_TO_BACK)

    @property
    def opposite(self) -> Direction:
        return _OPPOSITE[self]


_OPPOSITE = {
    Direction.FRONT_TO_BACK: Direction.BACK_TO_FRONT,
    Direction.BACK_TO_FRONT: Direction.FRONT_TO_BACK,
    Direction.CHANNEL_BACK_TO_FRONT: Direction.CHANNEL_FRONT_TO_BACK,
    Direction.CHANNEL_FRONT_TO_BACK: Direction.CHANNEL_BACK_TO_FRONT,
}


@dataclass(frozen=True, slots=True)
class TraceEvent:
    """One forwarded message as the trace reports it.

    ``request`` is the spec name (``"request N"`` when unknown, ``"?"`` without a whole header);
    ``flags`` and ``size`` come from the header as sent; ``summary`` is ``Message.describe()`` and
    ``details`` the payload part of it; ``fields`` the decoded payload as JSON-ready values;
    ``error`` says why decoding failed (the bytes were forwarded all the same); ``data`` holds
    the exact bytes forwarded.
    """

    timestamp: float
    direction: Direction
    request: str
    is_reply: bool
    flags: int
    size: int
    fds: int
    summary: str = ""
    details: str = ""
    fields: Mapping[str, object] = field(default_factory=dict)
    error: str | None = None
    data: bytes = b""
    session: int = 0


OnMessage = Callable[[TraceEvent], None]


def payload_fields(payload: object) -> dict[str, object]:
    """The fields of a decoded payload dataclass as JSON-ready values (bytes become hex)."""
    value = _jsonable(payload)
    return value if isinstance(value, dict) else {"value": value}


def _jsonable(value: object) -> object:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, bool | int | float | str) or value is None:
        return int(value) if isinstance(value, enum.IntEnum) else value
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value).hex()
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, list | tuple):
        return [_jsonable(item) for item in value]
    return str(value)


def _details(msg: Message) -> str:
    """``msg.describe()`` without the request name, reply markers and fd count (shown apart)."""
    tokens = msg.describe().split(" ")
    while tokens and tokens[0] in (msg.name, "reply", "need_reply"):
        tokens.pop(0)
    if tokens and tokens[-1].startswith("fds="):
        tokens.pop()
    return " ".join(tokens)


@dataclass(slots=True)
class _RawFrame:
    """Bytes of one message as received (possibly incomplete), the fds and framing trouble."""

    data: bytes
    fds: list[int]
    problem: str | None = None


def _recv_into(sock: socket.socket, buf: bytearray, fds: list[int], notes: list[str]) -> int:
    """Fill ``buf`` from ``sock``; return the byte count (short at EOF or after a stall)."""
    view = memoryview(buf)
    got = 0
    while got < len(buf):
        if got or fds:
            ready, _, _ = select.select([sock], [], [], STALL_TIMEOUT)
            if not ready:
                notes.append(f"peer stalled for {STALL_TIMEOUT}s inside a message")
                return got
        try:
            n, ancdata, flags, _ = sock.recvmsg_into([view[got:]], _ANC_SIZE)
        except OSError:
            return got
        fds.extend(fds_from_ancdata(ancdata))
        if flags & socket.MSG_CTRUNC:
            notes.append("control data truncated: some fds were lost before the proxy")
        if n == 0:
            return got
        got += n
    return got


def _recv_raw_frame(sock: socket.socket) -> _RawFrame | None:
    """Read one message by its header's size; None at EOF between messages.

    Framing never blocks the stream: a header whose size is too large is returned alone,
    and a message that stops arriving is returned with what came so far.
    """
    fds: list[int] = []
    notes: list[str] = []
    head = bytearray(HEADER_SIZE)
    got = _recv_into(sock, head, fds, notes)
    if got < HEADER_SIZE:
        if got == 0 and not fds and not notes:
            return None
        notes.append(f"incomplete header: {got} of {HEADER_SIZE} bytes")
        return _RawFrame(bytes(head[:got]), fds, "; ".join(notes))
    size = _RAW_HEADER.unpack(head)[2]
    if size > MAX_PAYLOAD_SIZE:
        notes.append(f"size {size} exceeds {MAX_PAYLOAD_SIZE}: header forwarded alone")
        return _RawFrame(bytes(head), fds, "; ".join(notes))
    payload = bytearray(size)
    got = _recv_into(sock, payload, fds, notes)
    if got < size:
        notes.append(f"incomplete payload: {got} of {size} bytes")
    return _RawFrame(bytes(head) + bytes(payload[:got]), fds, "; ".join(notes) or None)


def _send_raw(sock: socket.socket, data: bytes, fds: list[int]) -> None:
    """Send ``data`` with ``fds`` on its first byte, all of it."""
    view = memoryview(data)
    if fds:
        sent = socket.send_fds(sock, [view], fds)
        view = view[sent:]
    if view:
        sock.sendall(view)


def _is_socket(fd: int) -> bool:
    try:
        return stat.S_ISSOCK(os.fstat(fd).st_mode)
    except OSError:
        return False


def _shutdown(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)


class _Session:
    """One front-end connection and its back-end connection, pumped by one thread per direction."""

    def __init__(
        self, proxy: TraceProxy, number: int, front: socket.socket, back: socket.socket
    ) -> None:
        self.proxy = proxy
        self.number = number
        self.front = front
        self.back = back
        self._lock = threading.Lock()
        self._closing = False
        self._sockets: list[socket.socket] = [front, back]
        self._channel: tuple[socket.socket, socket.socket] | None = None
        self._threads: list[threading.Thread] = []
        self._last_request: dict[Direction, AnyRequest] = {}

    def run(self) -> None:
        """Pump both directions until either side closes, then close everything."""
        main = [
            self._start(self.front, self.back, Direction.FRONT_TO_BACK),
            self._start(self.back, self.front, Direction.BACK_TO_FRONT),
        ]
        try:
            for thread in main:
                thread.join()
        finally:
            self.shutdown()
            while True:
                with self._lock:
                    pending = [t for t in self._threads if t.is_alive()]
                if not pending:
                    break
                for thread in pending:
                    thread.join()
            for sock in self._sockets:
                sock.close()

    def shutdown(self) -> None:
        """Wake every pump of this session; they exit and run() closes the sockets."""
        with self._lock:
            self._closing = True
            sockets = list(self._sockets)
        for sock in sockets:
            _shutdown(sock)

    def _start(
        self, src: socket.socket, dst: socket.socket, direction: Direction
    ) -> threading.Thread:
        thread = threading.Thread(
            target=self._pump,
            args=(src, dst, direction),
            name=f"trace-{self.number}-{direction.value}",
            daemon=True,
        )
        with self._lock:
            self._threads.append(thread)
        thread.start()
        return thread

    def _pump(self, src: socket.socket, dst: socket.socket, direction: Direction) -> None:
        try:
            while self._forward_one(src, dst, direction):
                pass
        except Exception:
            log.exception("trace: session %d %s failed", self.number, direction.value)
        finally:
            if direction.backend_channel:
                _shutdown(src)
                _shutdown(dst)
            else:
                self.shutdown()

    def _forward_one(self, src: socket.socket, dst: socket.socket, direction: Direction) -> bool:
        """Forward one message; False once the source or the destination is gone."""
        frame = _recv_raw_frame(src)
        if frame is None:
            return False
        owned = frame.fds
        try:
            event, msg = self._decode(frame, direction)
            out_fds = list(owned)
            if msg is not None and self._is_channel_setup(msg, direction, owned):
                out_fds = [self._interpose_channel(owned.pop())]
                owned.extend(out_fds)
            self.proxy._emit(event)
            try:
                _send_raw(dst, frame.data, out_fds)
            except OSError as exc:
                log.info("trace: %s: cannot forward (%s)", direction.value, exc)
                return False
        finally:
            close_fds(owned)
        return True

    def _decode(self, frame: _RawFrame, direction: Direction) -> tuple[TraceEvent, Message | None]:
        """Decode a copy of the frame for the trace; never raises, never touches its fds."""
        data = frame.data
        channel = direction.backend_channel
        event = TraceEvent(
            timestamp=time.time(),
            direction=direction,
            request="?",
            is_reply=False,
            flags=0,
            size=0,
            fds=len(frame.fds),
            error=frame.problem,
            data=data,
            session=self.number,
        )
        if len(data) < HEADER_SIZE:
            return event, None
        number, flags, size = _RAW_HEADER.unpack_from(data)
        is_reply = bool(flags & FLAG_REPLY)
        event = dataclasses.replace(
            event,
            request=request_name(number, backend_channel=channel),
            is_reply=is_reply,
            flags=flags,
            size=size,
        )
        if not is_reply:
            self._remember_request(number, direction)
        try:
            msg = self._decode_message(frame, direction)
        except Exception as exc:
            return dataclasses.replace(event, error=str(exc)), None
        event = dataclasses.replace(
            event,
            request=msg.name,
            summary=msg.describe(),
            details=_details(msg),
            fields=payload_fields(msg.payload),
        )
        return event, msg

    def _remember_request(self, number: int, direction: Direction) -> None:
        """Note the request a later reply in the other direction answers (even if malformed)."""
        enum_type = BackendRequest if direction.backend_channel else Request
        try:
            self._last_request[direction] = enum_type(number)
        except ValueError:
            self._last_request.pop(direction, None)

    def _decode_message(self, frame: _RawFrame, direction: Direction) -> Message:
        if frame.problem is not None:
            raise ValueError(frame.problem)
        channel = direction.backend_channel
        header = decode_header(frame.data[:HEADER_SIZE], backend_channel=channel)
        payload = frame.data[HEADER_SIZE:]
        placeholders = [-1] * len(frame.fds)
        if not header.flags & FLAG_REPLY:
            return decode_request(header, payload, placeholders, backend_channel=channel)
        request = self._last_request.get(direction.opposite)
        if request is None:
            name = request_name(header.request, backend_channel=channel)
            raise ValueError(f"{name}: a reply with no request before it")
        if request is Request.SET_LOG_BASE:
            return decode_log_base_reply(header, payload, placeholders)
        return decode_reply(request, header, payload, placeholders, backend_channel=channel)

    @staticmethod
    def _is_channel_setup(msg: Message, direction: Direction, fds: list[int]) -> bool:
        return (
            direction is Direction.FRONT_TO_BACK
            and msg.request is Request.SET_BACKEND_REQ_FD
            and not msg.is_reply
            and len(fds) == 1
            and _is_socket(fds[0])
        )

    def _interpose_channel(self, fd: int) -> int:
        """Keep the front-end's channel socket ``fd``; return our socket to give the back-end."""
        try:
            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        except OSError:
            os.close(fd)
            raise
        front_chan = socket.socket(fileno=fd)
        with self._lock:
            old = self._channel
            self._channel = (ours, front_chan)
            self._sockets += [ours, front_chan]
            closing = self._closing
        if old is not None:
            for sock in old:
                _shutdown(sock)
        self._last_request.pop(Direction.CHANNEL_BACK_TO_FRONT, None)
        self._last_request.pop(Direction.CHANNEL_FRONT_TO_BACK, None)
        self._start(ours, front_chan, Direction.CHANNEL_BACK_TO_FRONT)
        self._start(front_chan, ours, Direction.CHANNEL_FRONT_TO_BACK)
        if closing:
            _shutdown(ours)
            _shutdown(front_chan)
        return theirs.detach()


class TraceProxy:
    """Listen on ``listen_path`` for front-ends, relay each to ``connect_path``, report messages.

    One front-end at a time, as qemu-storage-daemon serves them: the next is accepted once the
    current one (or its back-end) has gone. ``on_message`` is called for every message before
    it is forwarded, from the proxy's threads but never concurrently.
    """

    def __init__(
        self,
        listen_path: str | os.PathLike[str],
        connect_path: str | os.PathLike[str],
        on_message: OnMessage,
        *,
        connect_timeout: float = 10.0,
    ) -> None:
        self.listen_path = os.fspath(listen_path)
        self.connect_path = os.fspath(connect_path)
        self.on_message = on_message
        self.connect_timeout = connect_timeout
        self.sessions = 0
        self._lock = threading.Lock()
        self._emit_lock = threading.Lock()
        self._listener: Listener | None = None
        self._wake: tuple[int, int] | None = None
        self._session: _Session | None = None
        self._stopping = False
        self._serving = False

    def start(self) -> None:
        """Create the listening socket (removing a stale one); serve() calls this if needed."""
        with self._lock:
            if self._stopping:
                raise RuntimeError("trace proxy is stopped")
            self._open_locked()

    def _open_locked(self) -> None:
        if self._listener is None:
            self._listener = Listener(self.listen_path)
            self._wake = os.pipe()

    def serve(self, max_sessions: int | None = None) -> int:
        """Relay front-ends until stop() or ``max_sessions`` have ended; return how many did.

        A stop() that comes before serve() (a signal while its thread starts) makes it return at
        once. The listening socket is removed when this returns.
        """
        with self._lock:
            if self._stopping:
                return self.sessions
            self._open_locked()
            self._serving = True
        try:
            while max_sessions is None or self.sessions < max_sessions:
                front = self._accept()
                if front is None:
                    break
                self._relay(front)
                self.sessions += 1
        finally:
            with self._lock:
                self._serving = False
            self._teardown()
        return self.sessions

    def stop(self) -> None:
        """Stop serving: close the current session, wake serve(), remove the socket. Idempotent."""
        with self._lock:
            self._stopping = True
            session = self._session
            wake = self._wake
            serving = self._serving
        if wake is not None:
            with contextlib.suppress(OSError):
                os.write(wake[1], b"x")
        if session is not None:
            session.shutdown()
        if not serving:
            self._teardown()

    def close(self) -> None:
        """The same as stop()."""
        self.stop()

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def _accept(self) -> socket.socket | None:
        """Wait for a front-end; None when stop() was called."""
        listener, wake = self._listener, self._wake
        assert listener is not None and wake is not None
        poller = select.poll()
        poller.register(listener.fileno(), select.POLLIN)
        poller.register(wake[0], select.POLLIN)
        while True:
            with self._lock:
                if self._stopping:
                    return None
            ready = {fd for fd, _ in poller.poll()}
            if wake[0] in ready:
                return None
            if listener.fileno() in ready:
                return listener.accept(timeout=0).socket

    def _relay(self, front: socket.socket) -> None:
        number = self.sessions + 1
        try:
            back = connect(self.connect_path, deadline=self.connect_timeout).socket
        except OSError as exc:
            log.error("trace: front-end %d: cannot reach the back-end: %s", number, exc)
            front.close()
            return
        log.info("trace: front-end %d connected, relaying to %s", number, self.connect_path)
        session = _Session(self, number, front, back)
        with self._lock:
            self._session = session
            stopping = self._stopping
        if stopping:
            session.shutdown()
        try:
            session.run()
        finally:
            with self._lock:
                self._session = None
        log.info("trace: front-end %d left", number)

    def _emit(self, event: TraceEvent) -> None:
        with self._emit_lock:
            try:
                self.on_message(event)
            except Exception:
                log.exception("trace: on_message callback failed")

    def _teardown(self) -> None:
        with self._lock:
            listener, self._listener = self._listener, None
            wake, self._wake = self._wake, None
            self._stopping = True
        if listener is not None:
            listener.close()
        if wake is not None:
            os.close(wake[0])
            os.close(wake[1])


__all__ = [
    "SCM_MAX_FD",
    "STALL_TIMEOUT",
    "Direction",
    "OnMessage",
    "TraceEvent",
    "TraceProxy",
    "payload_fields",
]
