"""Channel (back-end side) <-> BackendRequestHandler (front-end side) over a socketpair: every
back-end request, acks and NACKs, LOOKUP fds, fd hygiene, bad messages and wrong replies."""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from pyvhost.errors import (
    ConnectionClosedError,
    ProtocolError,
    ReplyError,
    UnsupportedRequestError,
)
from pyvhost.user.channel import BackendRequestHandler, Channel
from pyvhost.user.connection import Connection, socketpair
from pyvhost.user.device import VringNotifier
from pyvhost.user.messages import (
    U64,
    BackendRequest,
    IotlbMsg,
    Message,
    MMapRequest,
    Negotiation,
    ProtocolFeature,
    VringState,
    encode_header,
    encode_message,
    encode_reply,
)
from pyvhost.virtio.features import F_ACCESS_PLATFORM

UUID = uuid.UUID("12345678-1234-5678-9abc-def012345678")
MMAP = MMapRequest(shmid=1, fd_offset=0x1000, shm_offset=0x2000, len=0x3000, flags=1)
IOTLB = IotlbMsg(iova=0x1000, size=0, uaddr=0, perm=1, type=1)


def allowing(reply_ack: bool, send_fd: bool) -> Negotiation:
    """A negotiation that opens every back-end request's gate, with or without these two."""
    protocol = ALL_BACKEND_CHANNEL
    protocol &= ~(0 if reply_ack else 1 << ProtocolFeature.REPLY_ACK)
    protocol &= ~(0 if send_fd else 1 << ProtocolFeature.BACKEND_SEND_FD)
    return Negotiation(features=1 << F_ACCESS_PLATFORM, protocol_features=protocol)


ALL_BACKEND_CHANNEL = sum(
    1 << f
    for f in (
        ProtocolFeature.REPLY_ACK,
        ProtocolFeature.BACKEND_REQ,
        ProtocolFeature.BACKEND_SEND_FD,
        ProtocolFeature.CONFIG,
        ProtocolFeature.HOST_NOTIFIER,
        ProtocolFeature.INBAND_NOTIFICATIONS,
        ProtocolFeature.SHARED_OBJECT,
        ProtocolFeature.SHMEM,
    )
)


class Recorder:
    """Callbacks that record (name, args) and answer a configurable status."""

    def __init__(self) -> None:
        self.calls: queue.Queue[tuple[str, tuple[Any, ...]]] = queue.Queue()
        self.status: int | None = 0

    def cb(self, name: str) -> Any:
        def record(*args: Any) -> int | None:
            self.calls.put((name, args))
            return self.status

        return record

    def next(self) -> tuple[str, tuple[Any, ...]]:
        return self.calls.get(timeout=5)

    def handler(self, **extra: Any) -> BackendRequestHandler:
        names = (
            "config_change",
            "vring_host_notifier",
            "vring_call",
            "vring_err",
            "iotlb",
            "shared_object_add",
            "shared_object_remove",
            "shmem_map",
            "shmem_unmap",
        )
        callbacks = {f"on_{n}": self.cb(n) for n in names}
        callbacks.update(extra)
        return BackendRequestHandler(**callbacks)


@contextlib.contextmanager
def channel_pair(
    handler: BackendRequestHandler, *, reply_ack: bool = True, send_fd: bool = True
) -> Iterator[Channel]:
    a, b = socketpair()
    handler.start(a)
    channel = Channel(b, negotiation=allowing(reply_ack, send_fd), reply_timeout=5)
    try:
        yield channel
    finally:
        channel.close()
        handler.close()


def test_every_request_reaches_its_callback_with_acks(no_fd_leak: None) -> None:
    rec = Recorder()
    r, w = os.pipe()
    with channel_pair(rec.handler()) as ch:
        ch.config_change()
        assert rec.next() == ("config_change", ())
        ch.vring_call(3)
        assert rec.next() == ("vring_call", (3,))
        ch.vring_err(4)
        assert rec.next() == ("vring_err", (4,))
        ch.iotlb(IOTLB)
        assert rec.next() == ("iotlb", (IOTLB,))
        ch.shared_object_add(UUID)
        assert rec.next() == ("shared_object_add", (UUID,))
        ch.shared_object_remove(UUID)
        assert rec.next() == ("shared_object_remove", (UUID,))
        ch.shmem_unmap(MMAP)
        assert rec.next() == ("shmem_unmap", (MMAP,))
        ch.vring_host_notifier(5, None, 0x1000, 0)
        assert rec.next() == ("vring_host_notifier", (5, None, 0x1000, 0))
        ch.vring_host_notifier(6, r, 0x1000, 0x2000)
        name, (index, fd, size, offset) = rec.next()
        assert (name, index, size, offset) == ("vring_host_notifier", 6, 0x1000, 0x2000)
        assert fd is not None and fd != r
        ch.shmem_map(MMAP, w)
        name, (req, fd2) = rec.next()
        assert (name, req) == ("shmem_map", MMAP)
        assert isinstance(fd2, int)
    os.close(r)
    os.close(w)


def test_fds_given_to_callbacks_are_usable_then_closed(no_fd_leak: None) -> None:
    seen: list[tuple[int, bool]] = []

    def notifier(index: int, fd: int | None, size: int, offset: int) -> int:
        assert fd is not None
        seen.append((fd, os.fstat(fd).st_size == 4096))
        return 0

    memfd = os.memfd_create("notify")
    os.ftruncate(memfd, 4096)
    handler = BackendRequestHandler(on_vring_host_notifier=notifier)
    with channel_pair(handler) as ch:
        ch.vring_host_notifier(0, memfd, 4096, 0)
        fd, ok = seen[0]
        assert ok
        with pytest.raises(OSError):
            os.fstat(fd)  # closed by the handler once the callback returned (ack came after)
    os.close(memfd)


@pytest.mark.parametrize("status", [3, -1, "bad"])
def test_callback_failure_status_is_a_nack(status: object) -> None:
    handler = BackendRequestHandler(on_config_change=lambda: status)  # type: ignore[arg-type,return-value]
    with channel_pair(handler) as ch:
        with pytest.raises(ReplyError, match=r"BACKEND_CONFIG_CHANGE_MSG.*status"):
            ch.config_change()
        assert not ch.closed


def test_callback_exception_is_a_nack_and_handler_survives(
    caplog: pytest.LogCaptureFixture,
) -> None:
    calls = []

    def boom(index: int) -> None:
        calls.append(index)
        raise RuntimeError("device exploded")

    handler = BackendRequestHandler(on_vring_call=boom)
    with channel_pair(handler) as ch, caplog.at_level(logging.ERROR):
        with pytest.raises(ReplyError, match="status 1"):
            ch.vring_call(1, sync=True)
        with pytest.raises(ReplyError):
            ch.vring_call(2, sync=True)
        assert calls == [1, 2]
        assert handler.running
    assert "device exploded" in caplog.text


def test_missing_callback_is_a_nack() -> None:
    with (
        channel_pair(BackendRequestHandler()) as ch,
        pytest.raises(ReplyError, match="BACKEND_VRING_ERR"),
    ):
        ch.vring_err(0, sync=True)


def test_without_reply_ack_nothing_is_awaited() -> None:
    rec = Recorder()
    rec.status = 9  # would be a NACK, but nobody asks
    with channel_pair(rec.handler(), reply_ack=False) as ch:
        ch.vring_call(1)
        ch.config_change()
        assert rec.next() == ("vring_call", (1,))
        assert rec.next() == ("config_change", ())


def test_lookup_returns_a_copy_of_the_callbacks_fd(no_fd_leak: None) -> None:
    r, w = os.pipe()
    table = {UUID: r}
    handler = BackendRequestHandler(on_shared_object_lookup=table.get)
    with channel_pair(handler, reply_ack=False) as ch:
        got = ch.shared_object_lookup(UUID)
        assert got not in (r, w)
        os.write(w, b"dmabuf")
        assert os.read(got, 6) == b"dmabuf"
        os.close(got)
        other = uuid.UUID(int=7)
        with pytest.raises(ReplyError, match=f"{other} not found"):
            ch.shared_object_lookup(other)
        assert not ch.closed
    os.close(r)
    os.close(w)


def test_lookup_without_callback_fails_cleanly() -> None:
    with channel_pair(BackendRequestHandler()) as ch, pytest.raises(ReplyError):
        ch.shared_object_lookup(UUID)


def test_fd_requests_need_send_fd() -> None:
    with channel_pair(BackendRequestHandler(), send_fd=False) as ch:
        with pytest.raises(UnsupportedRequestError, match="BACKEND_SEND_FD"):
            ch.shmem_map(MMAP, 0)
        with pytest.raises(UnsupportedRequestError, match="BACKEND_SEND_FD"):
            ch.vring_host_notifier(0, 0, 4096, 0)


def test_index_checked() -> None:
    with channel_pair(BackendRequestHandler()) as ch, pytest.raises(ValueError, match=r"0\.\.255"):
        ch.vring_call(300)


def test_thread_safe_acks() -> None:
    count = 0
    lock = threading.Lock()

    def on_call(index: int) -> int:
        nonlocal count
        with lock:
            count += 1
        return 0

    handler = BackendRequestHandler(on_vring_call=on_call)
    errors: list[BaseException] = []
    with channel_pair(handler) as ch:

        def worker(i: int) -> None:
            try:
                for _ in range(50):
                    ch.vring_call(i, sync=True)
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
    assert errors == []
    assert count == 200


# --- bad input on either side ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "error"),
    [
        (encode_header(BackendRequest.VRING_CALL, 0x2, 8) + bytes(8), "version"),
        (encode_header(99, 0x1, 0), "unknown back-end request"),
        (encode_header(BackendRequest.VRING_CALL, 0x1, 4) + bytes(4), "size"),
        (encode_header(BackendRequest.VRING_CALL, 0x1, 8) + bytes(4) + b"\1\0\0\0", "num"),
    ],
)
def test_bad_message_is_logged_and_drops_the_channel(
    raw: bytes, error: str, caplog: pytest.LogCaptureFixture, no_fd_leak: None
) -> None:
    rec = Recorder()
    handler = rec.handler()
    a, b = socketpair()
    with caplog.at_level(logging.WARNING):
        handler.start(a)
        b.send_bytes(raw)
        assert handler.join(5)
    assert isinstance(handler.error, ProtocolError)
    assert error in str(handler.error)
    assert "dropping the channel" in caplog.text
    assert rec.calls.empty()
    with pytest.raises(ConnectionClosedError):
        b.recv_frame(timeout=5)
    b.close()
    handler.close()


def test_unexpected_fd_is_closed(no_fd_leak: None) -> None:
    handler = BackendRequestHandler(on_config_change=lambda: 0)
    a, b = socketpair()
    handler.start(a)
    r, w = os.pipe()
    b.send_bytes(encode_header(BackendRequest.CONFIG_CHANGE_MSG, 0x1, 0), [r])
    assert handler.join(5)
    assert "fds" in str(handler.error)
    os.close(r)
    # the handler's copy of the pipe's read end is gone: writing with no reader fails
    with pytest.raises(BrokenPipeError):
        os.write(w, b"x")
    os.close(w)
    b.close()
    handler.close()


def _raw_frontend(reply: bytes | None) -> tuple[Channel, Connection, threading.Thread]:
    a, b = socketpair()

    def serve() -> None:
        with contextlib.suppress(ConnectionClosedError, OSError, ProtocolError):
            b.recv_frame(timeout=5)
            if reply is not None:
                b.send_bytes(reply)
            b.recv_frame(timeout=5)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return Channel(a, negotiation=allowing(True, True), reply_timeout=0.3), b, thread


@pytest.mark.parametrize(
    "reply",
    [
        encode_header(BackendRequest.VRING_CALL, 0x1, 8) + bytes(8),  # REPLY bit missing
        encode_header(BackendRequest.VRING_ERR, 0x5, 8) + bytes(8),  # wrong request
        encode_header(BackendRequest.VRING_CALL, 0x5, 2) + bytes(2),  # wrong size
    ],
)
def test_wrong_reply_closes_the_channel(reply: bytes) -> None:
    ch, peer, thread = _raw_frontend(reply)
    with pytest.raises(ProtocolError, match="BACKEND_VRING_CALL"):
        ch.vring_call(0, sync=True)
    assert ch.closed
    with pytest.raises(ConnectionClosedError):
        ch.vring_call(0)
    thread.join(5)
    peer.close()


def test_timeout_closes_the_channel() -> None:
    ch, peer, thread = _raw_frontend(None)
    with pytest.raises(TimeoutError, match="BACKEND_CONFIG_CHANGE_MSG"):
        ch.config_change()
    assert ch.closed
    thread.join(5)
    peer.close()


def test_lookup_success_without_fd_is_wrong() -> None:
    ok = encode_header(BackendRequest.SHARED_OBJECT_LOOKUP, 0x5, 8) + U64(0).encode()
    ch, peer, thread = _raw_frontend(ok)
    with pytest.raises(ProtocolError, match="no fd"):
        ch.shared_object_lookup(UUID)
    assert ch.closed
    thread.join(5)
    peer.close()


def test_handler_close_stops_an_idle_thread() -> None:
    handler = BackendRequestHandler()
    a, b = socketpair()
    handler.start(a)
    assert handler.running
    handler.close()
    assert not handler.running
    with pytest.raises(ConnectionClosedError):
        b.recv_frame(timeout=5)
    b.close()


def test_handler_start_twice_refused() -> None:
    handler = BackendRequestHandler()
    a, b = socketpair()
    c, d = socket.socketpair()
    handler.start(a)
    with pytest.raises(RuntimeError, match="already started"):
        handler.start(Connection(c))
    handler.close()
    b.close()
    d.close()


# --- in-band notifications: fire-and-forget ----------------------------------------------------

SMALL_BUFFER = 4096
"""Socket buffer size that makes a burst of notifications fill the socket (back-pressure)."""


def _small_socketpair() -> tuple[Connection, Connection]:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    for sock in (a, b):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SMALL_BUFFER)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SMALL_BUFFER)
    return Connection(a), Connection(b)


def _never_receives(channel: Channel) -> list[str]:
    """Make every receive on the channel's connection fail loudly; returns the list of tries."""
    tries: list[str] = []

    def refuse(*args: object, **kwargs: object) -> Any:
        tries.append("recv_frame")
        raise AssertionError("a notification waited for a reply")

    channel.conn.recv_frame = refuse  # type: ignore[method-assign]
    return tries


def test_notifications_carry_no_need_reply_and_wait_for_nothing() -> None:
    front, back = socketpair()
    ch = Channel(back, negotiation=allowing(True, True), reply_timeout=0.1)
    tries = _never_receives(ch)
    try:
        ch.vring_call(3)
        ch.vring_err(4)
        call = front.recv_request(5, backend_channel=True)
        err = front.recv_request(5, backend_channel=True)
    finally:
        ch.close()
        front.close()
    assert (call.request, call.payload, call.flags) == (
        BackendRequest.VRING_CALL,
        VringState(3, 0),
        0x1,
    )
    assert (err.request, err.payload, err.flags) == (
        BackendRequest.VRING_ERR,
        VringState(4, 0),
        0x1,
    )
    assert tries == []


def test_sync_notification_waits_for_the_front_end() -> None:
    rec = Recorder()
    with channel_pair(rec.handler()) as ch:
        ch.vring_call(7, sync=True)
        assert rec.calls.get_nowait() == ("vring_call", (7,))  # processed before the return
        ch.vring_err(8, sync=True)
        assert rec.calls.get_nowait() == ("vring_err", (8,))


def test_sync_without_reply_ack_cannot_wait() -> None:
    front, back = socketpair()
    ch = Channel(back, negotiation=allowing(False, True), reply_timeout=0.1)
    try:
        ch.vring_call(1, sync=True)
        assert not front.recv_request(5, backend_channel=True).need_reply
    finally:
        ch.close()
        front.close()


def test_burst_from_two_threads_while_the_front_end_reads_slowly() -> None:
    """Two workers notify while the front-end is not reading, then reads slowly: the senders
    only wait for room in the socket, never for a reply, and every frame arrives whole and in
    each sender's order."""
    per_thread = 2000
    front, back = _small_socketpair()
    ch = Channel(back, negotiation=allowing(True, True), reply_timeout=0.1)
    tries = _never_receives(ch)
    errors: list[BaseException] = []
    senders: dict[BackendRequest, Callable[[int], None]] = {
        BackendRequest.VRING_CALL: ch.vring_call,
        BackendRequest.VRING_ERR: ch.vring_err,
    }

    def worker(notify: Callable[[int], None]) -> None:
        try:
            for i in range(per_thread):
                notify(i % 256)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(f,)) for f in senders.values()]
    for t in threads:
        t.start()
    time.sleep(0.3)  # longer than the reply timeout: nobody reads, nobody replies
    assert any(t.is_alive() for t in threads), "the burst should fill the small socket"
    received: list[Message] = []
    try:
        while len(received) < 2 * per_thread:
            received.append(front.recv_request(5, backend_channel=True))
            if len(received) % 200 == 0:
                time.sleep(0.005)
    finally:
        for t in threads:
            t.join(10)
        ch_closed = ch.closed
        ch.close()
        front.close()
    assert errors == []
    assert not ch_closed
    assert tries == []
    assert not any(m.need_reply for m in received)
    for request in senders:
        indices = [m.payload_as(VringState).index for m in received if m.request is request]
        assert indices == [i % 256 for i in range(per_thread)], request.name


def test_reply_ack_request_works_after_a_burst_of_calls() -> None:
    calls = 0
    lock = threading.Lock()

    def on_call(index: int) -> None:
        nonlocal calls
        with lock:
            calls += 1

    changed = threading.Event()
    handler = BackendRequestHandler(on_vring_call=on_call, on_config_change=changed.set)
    with channel_pair(handler) as ch:
        for i in range(1000):
            ch.vring_call(i % 4)
        ch.config_change()  # NEED_REPLY: its ack, and only its ack, is read
        assert changed.is_set()
        assert calls == 1000  # the front-end handles the channel in order
        ch.vring_call(0, sync=True)
        assert calls == 1001
        assert not ch.closed


def _ack_bytes(request: BackendRequest, status: int = 0) -> bytes:
    data, _ = encode_message(encode_reply(request, U64(status)))
    return data


def test_stray_notification_acks_are_not_taken_for_a_reply() -> None:
    front, back = socketpair()
    ch = Channel(back, negotiation=allowing(True, True), reply_timeout=5)
    try:
        ch.vring_call(1)
        ch.vring_err(2)
        for _ in range(2):
            assert not front.recv_request(5, backend_channel=True).need_reply
        # a front-end that acks them anyway: the acks wait in the socket
        front.send_bytes(
            _ack_bytes(BackendRequest.VRING_CALL) + _ack_bytes(BackendRequest.VRING_ERR, 1)
        )

        def answer() -> None:
            msg = front.recv_request(5, backend_channel=True)
            assert msg.request is BackendRequest.CONFIG_CHANGE_MSG and msg.need_reply
            front.send(encode_reply(msg.request, U64(3)))

        thread = threading.Thread(target=answer)
        thread.start()
        with pytest.raises(ReplyError, match=r"CONFIG_CHANGE_MSG.*status 3"):
            ch.config_change()  # the status is the one of its own ack
        thread.join(5)
        assert not ch.closed
    finally:
        ch.close()
        front.close()


def test_an_ack_to_a_notification_never_sent_is_still_a_wrong_reply() -> None:
    front, back = socketpair()
    ch = Channel(back, negotiation=allowing(True, True), reply_timeout=5)
    try:
        front.send_bytes(_ack_bytes(BackendRequest.VRING_CALL))
        with pytest.raises(ProtocolError, match="reply is for BACKEND_VRING_CALL"):
            ch.config_change()
        assert ch.closed
    finally:
        ch.close()
        front.close()


def test_front_end_that_acks_every_notification_does_not_jam_the_channel() -> None:
    """A front-end that answers even notifications without NEED_REPLY: its acks are drained as
    the notifications go out, so it never blocks writing them, and later replies stay in step."""
    front, back = _small_socketpair()
    ch = Channel(back, negotiation=allowing(True, True), reply_timeout=5)
    seen: list[Message] = []

    def ack_everything() -> None:
        with contextlib.suppress(ConnectionClosedError, OSError, ProtocolError):
            while True:
                msg = front.recv_request(backend_channel=True)
                seen.append(msg)
                front.send(encode_reply(msg.request, U64(0)))

    responder = threading.Thread(target=ack_everything, daemon=True)
    responder.start()
    errors: list[BaseException] = []

    def burst() -> None:
        try:
            for i in range(5000):  # 100 kB of acks: far more than the small sockets hold
                ch.vring_call(i % 256)
            ch.config_change()
            ch.vring_err(0, sync=True)
        except BaseException as exc:
            errors.append(exc)

    sender = threading.Thread(target=burst, daemon=True)
    sender.start()
    sender.join(30)
    try:
        assert not sender.is_alive(), "the channel jammed"
        assert errors == []
        assert not ch.closed
        assert len(seen) == 5002
    finally:
        ch.close()
        front.close()
        responder.join(5)


def test_vring_notifier_calls_in_band_without_waiting() -> None:
    rec = Recorder()
    with channel_pair(rec.handler()) as ch:
        notifier = VringNotifier(2)
        notifier.set_inband(ch)
        tries = _never_receives(ch)
        notifier.call()
        notifier.error()
        assert rec.next() == ("vring_call", (2,))
        assert rec.next() == ("vring_err", (2,))
        assert tries == []
        notifier.set_inband(None)
