"""TraceProxy between a hand-written front-end and back-end over Unix sockets."""

from __future__ import annotations

import os
import shutil
import socket
import struct
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from pyvhost.cli.trace import format_line
from pyvhost.errors import ConnectionClosedError, ProtocolError
from pyvhost.user import proxy as proxy_module
from pyvhost.user.connection import Connection
from pyvhost.user.frontend import Frontend
from pyvhost.user.messages import (
    U64,
    BackendRequest,
    Inflight,
    Log,
    ProtocolFeature,
    Request,
    VringArea,
    VringState,
    encode_header,
    encode_message,
    encode_reply,
    encode_request,
)
from pyvhost.user.proxy import Direction, TraceEvent, TraceProxy

TIMEOUT = 10.0


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def recv_exact(sock: socket.socket, size: int) -> tuple[bytes, list[int]]:
    """Read exactly ``size`` bytes and every fd that came with them."""
    sock.settimeout(TIMEOUT)
    data = b""
    fds: list[int] = []
    while len(data) < size:
        chunk, more, _, _ = socket.recv_fds(sock, size - len(data), 16)
        if not chunk:
            raise AssertionError(f"EOF after {len(data)} of {size} bytes")
        data += chunk
        fds += more
    return data, fds


def assert_eof(sock: socket.socket) -> None:
    sock.settimeout(TIMEOUT)
    assert sock.recv(1) == b""


def same_file(a: int, b: int) -> bool:
    sa, sb = os.fstat(a), os.fstat(b)
    return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)


def wire(request: Request | BackendRequest, payload: object = None, **kw: object) -> bytes:
    data, _ = encode_message(encode_request(request, payload, **kw))  # type: ignore[arg-type]
    return data


def reply_wire(request: Request | BackendRequest, payload: object) -> bytes:
    data, _ = encode_message(encode_reply(request, payload))  # type: ignore[arg-type]
    return data


class Rig:
    """A TraceProxy serving in a thread, a fake back-end listening, and the recorded events."""

    def __init__(self, tmp: Path, max_sessions: int | None = None) -> None:
        self.listen_path = str(tmp / "trace.sock")
        self.backend_path = str(tmp / "backend.sock")
        self.backend = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.backend.bind(self.backend_path)
        self.backend.listen(4)
        self.backend.settimeout(TIMEOUT)
        self.events: list[TraceEvent] = []
        self._cond = threading.Condition()
        self.proxy = TraceProxy(self.listen_path, self.backend_path, self._record)
        self.proxy.start()
        self.served: int | None = None
        self.thread = threading.Thread(target=self._serve, args=(max_sessions,), daemon=True)
        self.thread.start()

    def _serve(self, max_sessions: int | None) -> None:
        self.served = self.proxy.serve(max_sessions)

    def _record(self, event: TraceEvent) -> None:
        with self._cond:
            self.events.append(event)
            self._cond.notify_all()

    def wait_events(self, count: int) -> list[TraceEvent]:
        with self._cond:
            assert self._cond.wait_for(lambda: len(self.events) >= count, TIMEOUT), self.events
            return list(self.events)

    def connect(self) -> tuple[socket.socket, socket.socket]:
        """A front-end connection through the proxy and the back-end's side of it."""
        front = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        front.connect(self.listen_path)
        back, _ = self.backend.accept()
        return front, back

    def close(self) -> None:
        self.proxy.stop()
        self.thread.join(TIMEOUT)
        assert not self.thread.is_alive()
        self.backend.close()


@pytest.fixture
def tmp() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="pvh-trace-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def rig(tmp: Path) -> Iterator[Rig]:
    r = Rig(tmp)
    yield r
    r.close()


def test_bytes_and_fds_forwarded_exactly(rig: Rig) -> None:
    front, back = rig.connect()
    with front, back, open(__file__, "rb") as f:
        kick = wire(Request.SET_VRING_KICK, U64(1), fds=[f.fileno()])
        socket.send_fds(front, [kick], [f.fileno()])
        data, fds = recv_exact(back, len(kick))
        assert data == kick
        assert len(fds) == 1
        assert fds[0] != f.fileno()
        assert same_file(fds[0], f.fileno())
        os.close(fds[0])

        get = wire(Request.GET_FEATURES, need_reply=True)
        front.sendall(get)
        assert recv_exact(back, len(get)) == (get, [])
        answer = reply_wire(Request.GET_FEATURES, U64(0x1_4000_0000))
        back.sendall(answer)
        assert recv_exact(front, len(answer)) == (answer, [])

        ask = wire(Request.GET_INFLIGHT_FD, Inflight(0, 0, 2, 128))
        front.sendall(ask)
        assert recv_exact(back, len(ask)) == (ask, [])
        region = os.memfd_create("inflight")
        try:
            inflight = reply_wire(Request.GET_INFLIGHT_FD, Inflight(4096, 0, 2, 128))
            socket.send_fds(back, [inflight], [region])
            data, fds = recv_exact(front, len(inflight))
            assert data == inflight and len(fds) == 1
            assert same_file(fds[0], region)
            os.close(fds[0])
        finally:
            os.close(region)

    events = rig.wait_events(5)
    assert [(e.direction, e.request, e.is_reply, e.fds) for e in events] == [
        (Direction.FRONT_TO_BACK, "SET_VRING_KICK", False, 1),
        (Direction.FRONT_TO_BACK, "GET_FEATURES", False, 0),
        (Direction.BACK_TO_FRONT, "GET_FEATURES", True, 0),
        (Direction.FRONT_TO_BACK, "GET_INFLIGHT_FD", False, 0),
        (Direction.BACK_TO_FRONT, "GET_INFLIGHT_FD", True, 1),
    ]
    kick_event, get_event, reply_event = events[:3]
    assert kick_event.fields == {"value": 1}
    assert kick_event.data == kick and kick_event.size == 8 and kick_event.flags == 0x1
    assert get_event.flags == 0x9 and get_event.size == 0
    assert reply_event.fields == {"value": 0x1_4000_0000}
    assert reply_event.flags == 0x5 and reply_event.size == 8
    assert "PROTOCOL_FEATURES" in reply_event.summary
    assert events[4].fields == {
        "mmap_size": 4096,
        "mmap_offset": 0,
        "num_queues": 2,
        "queue_size": 128,
    }
    assert all(e.error is None for e in events)


def test_undecodable_bytes_are_forwarded_and_reported(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(proxy_module, "STALL_TIMEOUT", 0.2)
    front, back = rig.connect()
    with front, back:
        unknown = struct.pack("<III", 999, 0x1, 4) + b"abcd"
        bad_size = struct.pack("<III", Request.SET_VRING_NUM, 0x1, 3) + b"xyz"
        bad_version = struct.pack("<III", Request.GET_FEATURES, 0x2, 0)
        huge = struct.pack("<III", Request.SET_OWNER, 0x1, 0xFFFF_FFFF)
        short = b"\x01\x02\x03\x04\x05"
        for chunk in (unknown, bad_size, bad_version, huge):
            front.sendall(chunk)
            assert recv_exact(back, len(chunk)) == (chunk, [])
        front.sendall(short)
        assert recv_exact(back, len(short)) == (short, [])

        # a reply for a request other than the one outstanding
        get = wire(Request.GET_QUEUE_NUM)
        front.sendall(get)
        recv_exact(back, len(get))
        wrong = reply_wire(Request.GET_FEATURES, U64(1))
        back.sendall(wrong)
        assert recv_exact(front, len(wrong)) == (wrong, [])

    events = rig.wait_events(7)
    garbage = events[:5]
    assert [e.data for e in garbage] == [unknown, bad_size, bad_version, huge, short]
    assert all(e.error for e in garbage), garbage
    assert garbage[0].request == "request 999" and "999" in (garbage[0].error or "")
    assert garbage[1].request == "SET_VRING_NUM" and "size" in (garbage[1].error or "")
    assert "version" in (garbage[2].error or "")
    assert "exceeds" in (garbage[3].error or "")
    assert garbage[4].request == "?" and "incomplete header" in (garbage[4].error or "")
    assert events[5].request == "GET_QUEUE_NUM" and events[5].error is None
    assert events[6].is_reply and "GET_QUEUE_NUM" in (events[6].error or "")


def test_backend_channel_is_proxied_both_ways(rig: Rig) -> None:
    front, back = rig.connect()
    chan_front, chan_given = socket.socketpair()
    with front, back, chan_front, chan_given:
        setup = wire(Request.SET_BACKEND_REQ_FD, need_reply=True, fds=[chan_given.fileno()])
        socket.send_fds(front, [setup], [chan_given.fileno()])
        data, fds = recv_exact(back, len(setup))
        assert data == setup and len(fds) == 1
        chan_back = socket.socket(fileno=fds[0])
        with chan_back:
            assert not same_file(chan_back.fileno(), chan_given.fileno())
            ack = reply_wire(Request.SET_BACKEND_REQ_FD, U64(0))
            back.sendall(ack)
            assert recv_exact(front, len(ack)) == (ack, [])

            change = wire(BackendRequest.CONFIG_CHANGE_MSG, need_reply=True)
            chan_back.sendall(change)
            assert recv_exact(chan_front, len(change)) == (change, [])
            chan_ack = reply_wire(BackendRequest.CONFIG_CHANGE_MSG, U64(0))
            chan_front.sendall(chan_ack)
            assert recv_exact(chan_back, len(chan_ack)) == (chan_ack, [])

            with open(__file__, "rb") as f:
                area = VringArea(1, 0x1000, 0)
                notifier = wire(BackendRequest.VRING_HOST_NOTIFIER_MSG, area, fds=[f.fileno()])
                socket.send_fds(chan_back, [notifier], [f.fileno()])
                data, fds = recv_exact(chan_front, len(notifier))
                assert data == notifier and len(fds) == 1
                assert same_file(fds[0], f.fileno())
                os.close(fds[0])

            # the front-end leaving closes the channel towards the back-end too
            front.close()
            assert_eof(back)
            assert_eof(chan_back)

    events = rig.wait_events(5)
    assert [(e.direction, e.request, e.is_reply) for e in events] == [
        (Direction.FRONT_TO_BACK, "SET_BACKEND_REQ_FD", False),
        (Direction.BACK_TO_FRONT, "SET_BACKEND_REQ_FD", True),
        (Direction.CHANNEL_BACK_TO_FRONT, "BACKEND_CONFIG_CHANGE_MSG", False),
        (Direction.CHANNEL_FRONT_TO_BACK, "BACKEND_CONFIG_CHANGE_MSG", True),
        (Direction.CHANNEL_BACK_TO_FRONT, "BACKEND_VRING_HOST_NOTIFIER_MSG", False),
    ]
    assert events[4].fields == {"u64": 1, "size": 0x1000, "offset": 0}
    assert events[4].fds == 1
    assert all(e.error is None for e in events)


def test_a_new_backend_channel_replaces_the_old_one(rig: Rig) -> None:
    front, back = rig.connect()
    old_front, old_given = socket.socketpair()
    new_front, new_given = socket.socketpair()
    with front, back, old_front, old_given, new_front, new_given:
        channels = []
        for given in (old_given, new_given):
            setup = wire(Request.SET_BACKEND_REQ_FD, fds=[given.fileno()])
            socket.send_fds(front, [setup], [given.fileno()])
            _, fds = recv_exact(back, len(setup))
            channels.append(socket.socket(fileno=fds[0]))
        old_back, new_back = channels
        with old_back, new_back:
            assert_eof(old_back)
            call = wire(BackendRequest.VRING_CALL, VringState(0, 0))
            new_back.sendall(call)
            assert recv_exact(new_front, len(call)) == (call, [])
    events = rig.wait_events(3)
    assert events[2].direction is Direction.CHANNEL_BACK_TO_FRONT
    assert events[2].request == "BACKEND_VRING_CALL"


def test_either_side_closing_closes_the_other(rig: Rig) -> None:
    front, back = rig.connect()
    with front, back:
        back.close()
        assert_eof(front)
    front, back = rig.connect()
    with front, back:
        front.close()
        assert_eof(back)


def test_next_frontend_is_accepted_after_one_leaves(tmp: Path) -> None:
    rig = Rig(tmp, max_sessions=2)
    try:
        for value in (1, 2):
            front, back = rig.connect()
            with front, back:
                msg = wire(Request.SET_FEATURES, U64(value))
                front.sendall(msg)
                assert recv_exact(back, len(msg)) == (msg, [])
                front.close()
                assert_eof(back)
        rig.thread.join(TIMEOUT)
        assert rig.served == 2
        assert not os.path.exists(rig.listen_path)
    finally:
        rig.close()
    assert [(e.session, e.fields) for e in rig.events] == [(1, {"value": 1}), (2, {"value": 2})]


def test_stop_ends_the_session_and_removes_the_socket(rig: Rig) -> None:
    front, back = rig.connect()
    with front, back:
        rig.proxy.stop()
        assert_eof(front)
        assert_eof(back)
        rig.thread.join(TIMEOUT)
        assert not rig.thread.is_alive()
    assert not os.path.exists(rig.listen_path)


def test_stop_before_serve_makes_serve_return_at_once(tmp: Path) -> None:
    """A signal handled between start() and the serving thread's first step is not a failure."""
    proxy = TraceProxy(tmp / "t.sock", tmp / "b.sock", lambda e: None)
    proxy.start()
    proxy.stop()
    assert proxy.serve() == 0
    assert not (tmp / "t.sock").exists()
    with pytest.raises(RuntimeError, match="stopped"):
        proxy.start()


def test_unreachable_backend_drops_the_frontend(tmp: Path) -> None:
    proxy = TraceProxy(tmp / "t.sock", tmp / "missing.sock", lambda e: None, connect_timeout=0.2)
    thread = threading.Thread(target=proxy.serve, args=(1,), daemon=True)
    proxy.start()
    thread.start()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as front:
        front.connect(str(tmp / "t.sock"))
        assert_eof(front)
    thread.join(TIMEOUT)
    assert proxy.sessions == 1


def test_no_fd_leak(tmp: Path, no_fd_leak: None) -> None:
    def sync(front: socket.socket, back: socket.socket) -> None:
        # The proxy forwards one direction in order: once this arrives, earlier fds are closed.
        msg = wire(Request.SET_OWNER)
        front.sendall(msg)
        assert recv_exact(back, len(msg)) == (msg, [])

    rig = Rig(tmp)
    try:
        front, back = rig.connect()
        chan_front, chan_given = socket.socketpair()
        with front, back, chan_front, chan_given, open(__file__, "rb") as f:
            setup = wire(Request.SET_BACKEND_REQ_FD, fds=[chan_given.fileno()])
            socket.send_fds(front, [setup], [chan_given.fileno()])
            _, fds = recv_exact(back, len(setup))
            with socket.socket(fileno=fds[0]):
                sync(front, back)
                before = _open_fds()
                for index in range(20):
                    call = wire(Request.SET_VRING_CALL, U64(index % 2), fds=[f.fileno()])
                    socket.send_fds(front, [call], [f.fileno()])
                    data, fds = recv_exact(back, len(call))
                    assert data == call and len(fds) == 1
                    os.close(fds[0])
                sync(front, back)
                assert _open_fds() == before
    finally:
        rig.close()


def test_event_callback_failure_does_not_stop_forwarding(tmp: Path) -> None:
    calls: list[TraceEvent] = []

    def explode(event: TraceEvent) -> None:
        calls.append(event)
        raise RuntimeError("callback bug")

    rig = Rig(tmp)
    rig.proxy.on_message = explode
    try:
        front, back = rig.connect()
        with front, back:
            for index in range(2):
                msg = wire(Request.SET_VRING_ENABLE, VringState(index, 1))
                front.sendall(msg)
                assert recv_exact(back, len(msg)) == (msg, [])
    finally:
        rig.close()
    assert len(calls) == 2


def test_backend_channel_setup_without_a_socket_is_forwarded_as_is(rig: Rig) -> None:
    """Only a socket can become a back-end channel: any other fd goes through untouched, and
    the next message on the main socket still flows."""
    front, back = rig.connect()
    r, w = os.pipe()
    with front, back:
        try:
            setup = wire(Request.SET_BACKEND_REQ_FD, fds=[r])
            socket.send_fds(front, [setup], [r])
            data, fds = recv_exact(back, len(setup))
            assert data == setup and len(fds) == 1
            assert same_file(fds[0], r)
            os.close(fds[0])
        finally:
            os.close(r)
            os.close(w)
        owner = wire(Request.SET_OWNER)
        front.sendall(owner)
        assert recv_exact(back, len(owner)) == (owner, [])
    events = rig.wait_events(2)
    assert [(e.direction, e.request, e.fds) for e in events] == [
        (Direction.FRONT_TO_BACK, "SET_BACKEND_REQ_FD", 1),
        (Direction.FRONT_TO_BACK, "SET_OWNER", 0),
    ]


# --- SET_LOG_BASE replies as real back-ends send them ------------------------------------------

LOG_BASE_REPLIES = {
    "u64 (spec)": (encode_header(Request.SET_LOG_BASE, 0x5, 8) + U64(0).encode(), "u64=0x0"),
    "empty (DPDK)": (encode_header(Request.SET_LOG_BASE, 0x5, 0), ""),
    "echoed log (rust-vmm)": (
        encode_header(Request.SET_LOG_BASE, 0x5, 16) + Log(0x1000, 0x200).encode(),
        "size=0x1000 offset=0x200",
    ),
}


def _scripted_backend(conn: Connection, log_base_reply: bytes) -> threading.Thread:
    """Offer LOG_SHMFD, answer SET_LOG_BASE with ``log_base_reply`` and GET_FEATURES after."""
    answers = {
        Request.GET_FEATURES: reply_wire(Request.GET_FEATURES, U64(1 << 30)),
        Request.GET_PROTOCOL_FEATURES: reply_wire(
            Request.GET_PROTOCOL_FEATURES, U64(1 << ProtocolFeature.LOG_SHMFD)
        ),
        Request.SET_LOG_BASE: log_base_reply,
    }

    def serve() -> None:
        while True:
            try:
                msg = conn.recv_request(timeout=TIMEOUT)
            except (ConnectionClosedError, ProtocolError, OSError):
                return
            for fd in msg.fds:
                os.close(fd)
            answer = answers.get(Request(msg.request))
            if answer is not None:
                conn.send_bytes(answer)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return thread


def _frontend_through(
    rig: Rig, log_base_reply: bytes
) -> tuple[Frontend, Connection, threading.Thread]:
    """A front-end through the proxy to a scripted back-end and the back-end's thread."""
    front, back = rig.connect()
    backend = Connection(back)
    thread = _scripted_backend(backend, log_base_reply)
    fe = Frontend(Connection(front), reply_timeout=TIMEOUT)
    fe.get_features()
    fe.get_protocol_features()
    fe.set_protocol_features(1 << ProtocolFeature.LOG_SHMFD)
    return fe, backend, thread


def _close(fe: Frontend, backend: Connection, thread: threading.Thread) -> None:
    """Close the front-end, let the back-end's thread see the EOF, then close its socket."""
    fe.close()
    thread.join(TIMEOUT)
    backend.close()


@pytest.mark.parametrize(("raw", "details"), LOG_BASE_REPLIES.values(), ids=LOG_BASE_REPLIES.keys())
def test_every_set_log_base_reply_form_is_relayed_and_decoded(
    rig: Rig, raw: bytes, details: str
) -> None:
    fe, backend, thread = _frontend_through(rig, raw)
    try:
        memfd = os.memfd_create("log")
        try:
            fe.set_log_base(0x1000, 0x200, memfd)
        finally:
            os.close(memfd)
        assert fe.get_features() == 1 << 30  # the session goes on
        assert not fe.closed
    finally:
        _close(fe, backend, thread)
    events = rig.wait_events(9)  # GET_FEATURES, GET/SET_PROTOCOL_FEATURES, then these
    request, reply = events[5], events[6]
    assert (request.request, request.is_reply, request.fds) == ("SET_LOG_BASE", False, 1)
    assert (reply.request, reply.is_reply, reply.error) == ("SET_LOG_BASE", True, None)
    assert reply.data == raw
    assert reply.details == details
    line = format_line(reply)
    assert "SET_LOG_BASE reply" in line and "ERROR" not in line
    assert f"size={len(raw) - 12}" in line
    assert events[7].request == "GET_FEATURES" and events[8].is_reply


def test_set_log_base_reply_of_another_size_is_relayed_and_reported(rig: Rig) -> None:
    raw = encode_header(Request.SET_LOG_BASE, 0x5, 5) + bytes(5)
    fe, backend, thread = _frontend_through(rig, raw)
    try:
        memfd = os.memfd_create("log")
        try:
            with pytest.raises(ProtocolError, match="reply size 5 is wrong"):
                fe.set_log_base(0x1000, 0, memfd)
        finally:
            os.close(memfd)
    finally:
        _close(fe, backend, thread)
    reply = rig.wait_events(7)[6]
    assert reply.is_reply and reply.data == raw
    assert "reply size 5 is wrong" in (reply.error or "")
    assert "ERROR: SET_LOG_BASE: reply size 5" in format_line(reply)
