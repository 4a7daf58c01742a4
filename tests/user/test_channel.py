"""Channel (back-end side) <-> BackendRequestHandler (front-end side) over a socketpair: every
back-end request, acks and NACKs, LOOKUP fds, fd hygiene, bad messages and wrong replies."""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import socket
import threading
import uuid
from collections.abc import Iterator
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
from pyvhost.user.messages import (
    U64,
    BackendRequest,
    IotlbMsg,
    MMapRequest,
    encode_header,
)

UUID = uuid.UUID("12345678-1234-5678-9abc-def012345678")
MMAP = MMapRequest(shmid=1, fd_offset=0x1000, shm_offset=0x2000, len=0x3000, flags=1)
IOTLB = IotlbMsg(iova=0x1000, size=0, uaddr=0, perm=1, type=1)


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
    channel = Channel(b, reply_ack=reply_ack, send_fd=send_fd, reply_timeout=5)
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
            ch.vring_call(1)
        with pytest.raises(ReplyError):
            ch.vring_call(2)
        assert calls == [1, 2]
        assert handler.running
    assert "device exploded" in caplog.text


def test_missing_callback_is_a_nack() -> None:
    with (
        channel_pair(BackendRequestHandler()) as ch,
        pytest.raises(ReplyError, match="BACKEND_VRING_ERR"),
    ):
        ch.vring_err(0)


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
                    ch.vring_call(i)
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
    return Channel(a, reply_ack=True, send_fd=True, reply_timeout=0.3), b, thread


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
        ch.vring_call(0)
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
