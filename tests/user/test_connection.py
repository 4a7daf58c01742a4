"""The socket transport over real Unix sockets: framing, fd passing, EOF, timeouts, listeners."""

from __future__ import annotations

import os
import shutil
import socket
import struct
import tempfile
import threading
import time
from collections.abc import Iterator

import pytest

from pyvhost.errors import ConnectionClosedError, ProtocolError
from pyvhost.user.connection import Connection, Listener, connect, socketpair
from pyvhost.user.messages import (
    U64,
    VERSION,
    MemoryRegion,
    MemoryTable,
    Request,
    VringState,
    encode_message,
    encode_reply,
    encode_request,
)


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.fixture
def pair() -> Iterator[tuple[Connection, Connection]]:
    a, b = socketpair()
    with a, b:
        yield a, b


@pytest.fixture
def sock_path() -> Iterator[str]:
    folder = tempfile.mkdtemp(prefix="pyvhost-", dir="/tmp")
    yield os.path.join(folder, "vu.sock")
    shutil.rmtree(folder, ignore_errors=True)


def same_file(a: int, b: int) -> bool:
    sa, sb = os.fstat(a), os.fstat(b)
    return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)


def test_message_with_fds_arrives_with_the_same_files(pair: tuple[Connection, Connection]) -> None:
    a, b = pair
    r1, w1 = os.pipe()
    r2, w2 = os.pipe()
    table = MemoryTable(
        (MemoryRegion(0, 0x1000, 0x10000, 0), MemoryRegion(0x1000, 0x1000, 0x20000, 0))
    )
    msg = encode_request(Request.SET_MEM_TABLE, table, fds=[r1, r2], need_reply=True)
    a.send(msg)
    got = b.recv_request(timeout=5)
    assert got.payload == table and got.need_reply
    assert len(got.fds) == 2
    assert same_file(got.fds[0], r1) and same_file(got.fds[1], r2)
    os.write(w2, b"x")
    assert os.read(got.fds[1], 1) == b"x"
    for fd in (r1, w1, r2, w2, *got.fds):
        os.close(fd)


def test_reply_round_trip(pair: tuple[Connection, Connection]) -> None:
    a, b = pair
    a.send(encode_request(Request.GET_FEATURES))
    assert b.recv_request(timeout=5).request is Request.GET_FEATURES
    b.send(encode_reply(Request.GET_FEATURES, U64(1 << 32)))
    assert a.recv_reply(Request.GET_FEATURES, timeout=5).payload == U64(1 << 32)


def test_message_sent_one_byte_at_a_time(pair: tuple[Connection, Connection]) -> None:
    a, b = pair
    efd = os.eventfd(0)
    data, fds = encode_message(encode_request(Request.SET_VRING_CALL, U64(3), fds=[efd]))

    def trickle() -> None:
        socket.send_fds(a.socket, [data[:1]], fds)
        for i in range(1, len(data)):
            time.sleep(0.002)
            a.socket.send(data[i : i + 1])

    thread = threading.Thread(target=trickle)
    thread.start()
    msg = b.recv_request(timeout=10)
    thread.join()
    assert msg.payload == U64(3)
    assert len(msg.fds) == 1 and same_file(msg.fds[0], efd)
    os.close(efd)
    os.close(msg.fds[0])


def test_back_to_back_messages_keep_their_own_fds(pair: tuple[Connection, Connection]) -> None:
    a, b = pair
    kick, call = os.eventfd(0), os.eventfd(0)
    a.send(encode_request(Request.SET_VRING_KICK, U64(0), fds=[kick]))
    a.send(encode_request(Request.SET_VRING_NUM, VringState(0, 256)))
    a.send(encode_request(Request.SET_VRING_CALL, U64(0), fds=[call]))
    first, second, third = (b.recv_request(timeout=5) for _ in range(3))
    assert len(first.fds) == 1 and same_file(first.fds[0], kick)
    assert second.fds == []
    assert len(third.fds) == 1 and same_file(third.fds[0], call)
    for fd in (kick, call, first.fds[0], third.fds[0]):
        os.close(fd)


def test_send_bytes_sends_several_messages_at_once(pair: tuple[Connection, Connection]) -> None:
    a, b = pair
    one, _ = encode_message(encode_request(Request.SET_OWNER))
    two, _ = encode_message(encode_request(Request.SET_FEATURES, U64(5)))
    a.send_bytes(one + two)
    assert b.recv_request(timeout=5).request is Request.SET_OWNER
    assert b.recv_request(timeout=5).payload == U64(5)


def test_eof_before_any_byte(pair: tuple[Connection, Connection]) -> None:
    a, b = pair
    a.close()
    with pytest.raises(ConnectionClosedError, match=r"^peer closed the connection$"):
        b.recv_frame(timeout=5)


def test_eof_mid_header_closes_fds(pair: tuple[Connection, Connection]) -> None:
    a, b = pair
    before = open_fds()
    efd = os.eventfd(0)
    socket.send_fds(a.socket, [b"\x0c\x00\x00\x00\x01"], [efd])
    os.close(efd)
    a.close()
    with pytest.raises(ConnectionClosedError, match="header: 7 of 12 bytes missing"):
        b.recv_frame(timeout=5)
    assert open_fds() == before - 1  # a's socket is gone too


def test_eof_mid_payload(pair: tuple[Connection, Connection]) -> None:
    a, b = pair
    a.send_bytes(struct.pack("<III", Request.SET_VRING_NUM, VERSION, 8) + b"\x00\x00\x00")
    a.close()
    with pytest.raises(ConnectionClosedError, match="payload: 5 of 8 bytes missing"):
        b.recv_frame(timeout=5)


def test_oversize_size_field_rejected_and_fds_closed(pair: tuple[Connection, Connection]) -> None:
    a, b = pair
    before = open_fds()
    efd = os.eventfd(0)
    a.send_bytes(struct.pack("<III", Request.SET_MEM_TABLE, VERSION, 5000), [efd])
    os.close(efd)
    with pytest.raises(ProtocolError) as info:
        b.recv_frame(timeout=5)
    assert info.value.request == "SET_MEM_TABLE" and info.value.field == "size"
    assert open_fds() == before
    with pytest.raises(ProtocolError, match="out of sync"):
        b.recv_frame(timeout=5)


def test_garbage_bytes_rejected(pair: tuple[Connection, Connection]) -> None:
    a, b = pair
    a.send_bytes(b"GET / HTTP/1.1\r\n\r\n")
    with pytest.raises(ProtocolError) as info:
        b.recv_frame(timeout=5)
    assert info.value.field == "flags"


def test_decode_error_closes_fds(pair: tuple[Connection, Connection]) -> None:
    a, b = pair
    before = open_fds()
    fds = [os.eventfd(0) for _ in range(2)]
    a.send_bytes(struct.pack("<III", Request.SET_FEATURES, VERSION, 8) + bytes(8), fds)
    for fd in fds:
        os.close(fd)
    with pytest.raises(ProtocolError) as info:
        b.recv_request(timeout=5)
    assert info.value.field == "fds"
    assert open_fds() == before


def test_too_many_fds_truncated_control_data(pair: tuple[Connection, Connection]) -> None:
    a, b = pair
    before = open_fds()
    fds = [os.eventfd(0) for _ in range(12)]
    socket.send_fds(a.socket, [struct.pack("<III", Request.SET_OWNER, VERSION, 0)], fds)
    for fd in fds:
        os.close(fd)
    with pytest.raises(ProtocolError, match="truncated") as info:
        b.recv_frame(timeout=5)
    assert info.value.field == "fds"
    assert open_fds() == before


def test_send_refuses_more_than_8_fds(pair: tuple[Connection, Connection]) -> None:
    a, _ = pair
    with pytest.raises(ProtocolError):
        a.send_bytes(b"x", list(range(9)))


def test_timeout_before_a_message_leaves_the_connection_usable(
    pair: tuple[Connection, Connection],
) -> None:
    a, b = pair
    start = time.monotonic()
    with pytest.raises(TimeoutError):
        b.recv_frame(timeout=0.2)
    assert time.monotonic() - start >= 0.19
    a.send(encode_request(Request.SET_OWNER))
    assert b.recv_request(timeout=5).request is Request.SET_OWNER


def test_timeout_mid_message(pair: tuple[Connection, Connection]) -> None:
    a, b = pair
    a.send_bytes(b"\x01\x00\x00")
    with pytest.raises(TimeoutError):
        b.recv_frame(timeout=0.1)
    a.send_bytes(b"\x00" + struct.pack("<II", VERSION, 0))
    with pytest.raises(ProtocolError, match="out of sync"):
        b.recv_frame(timeout=5)


def test_concurrent_senders_never_interleave(pair: tuple[Connection, Connection]) -> None:
    a, b = pair
    count = 200
    big = MemoryTable(tuple(MemoryRegion(i << 20, 0x1000, i << 20, 0) for i in range(8)))

    efds = [os.eventfd(0) for _ in range(8)]
    data, _ = encode_message(encode_request(Request.SET_FEATURES, U64(7)))

    def sender_fds() -> None:
        for _ in range(count):
            a.send(encode_request(Request.SET_MEM_TABLE, big, fds=efds))

    def sender_plain() -> None:
        for _ in range(count):
            a.send_bytes(data)

    threads = [threading.Thread(target=sender_fds), threading.Thread(target=sender_plain)]
    for t in threads:
        t.start()
    seen = {Request.SET_MEM_TABLE: 0, Request.SET_FEATURES: 0}
    for _ in range(2 * count):
        msg = b.recv_request(timeout=10)
        seen[Request(msg.request)] += 1
        for fd in msg.fds:
            os.close(fd)
    for t in threads:
        t.join()
    for fd in efds:
        os.close(fd)
    assert seen == {Request.SET_MEM_TABLE: count, Request.SET_FEATURES: count}


# --- Listener and connect -----------------------------------------------------------------


def test_listener_accepts_again_after_a_client_leaves(sock_path: str) -> None:
    with Listener(sock_path) as listener:
        for value in (1, 2):
            with connect(sock_path, deadline=2) as client:
                server = listener.accept(timeout=5)
                client.send(encode_request(Request.SET_FEATURES, U64(value)))
                assert server.recv_request(timeout=5).payload == U64(value)
            with pytest.raises(ConnectionClosedError):
                server.recv_frame(timeout=5)
            server.close()
    assert not os.path.exists(sock_path)


def test_listener_accept_timeout(sock_path: str) -> None:
    with Listener(sock_path) as listener, pytest.raises(TimeoutError):
        listener.accept(timeout=0.1)


def test_listener_replaces_a_stale_socket(sock_path: str) -> None:
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(sock_path)
    stale.close()
    with Listener(sock_path) as listener, connect(sock_path, deadline=2):
        listener.accept(timeout=5).close()


def test_listener_refuses_to_remove_a_regular_file(sock_path: str) -> None:
    with open(sock_path, "w") as f:
        f.write("keep me")
    with pytest.raises(FileExistsError, match="not a socket"):
        Listener(sock_path)
    with open(sock_path) as f:
        assert f.read() == "keep me"


def test_connect_retries_until_the_listener_appears(sock_path: str) -> None:
    holder: list[Listener] = []

    def late_listener() -> None:
        time.sleep(0.3)
        holder.append(Listener(sock_path))

    thread = threading.Thread(target=late_listener)
    thread.start()
    try:
        with connect(sock_path, deadline=5, interval=0.02) as client:
            thread.join()
            server = holder[0].accept(timeout=5)
            server.send(encode_reply(Request.GET_QUEUE_NUM, U64(2)))
            assert client.recv_reply(Request.GET_QUEUE_NUM, timeout=5).payload == U64(2)
            server.close()
    finally:
        thread.join()
        for listener in holder:
            listener.close()


def test_connect_fails_at_the_deadline(sock_path: str) -> None:
    start = time.monotonic()
    with pytest.raises(ConnectionError, match="ENOENT") as info:
        connect(sock_path, deadline=0.3, interval=0.05)
    assert sock_path in str(info.value)
    assert 0.2 <= time.monotonic() - start < 2


def test_connect_refused_names_econnrefused(sock_path: str) -> None:
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(sock_path)
    try:
        with pytest.raises(ConnectionError, match="ECONNREFUSED"):
            connect(sock_path, deadline=0.1, interval=0.05)
    finally:
        stale.close()
