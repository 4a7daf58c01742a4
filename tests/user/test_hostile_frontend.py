"""A back-end server process survives hostile front-ends: it logs why it dropped each one,
leaks no fd, and serves the next front-end normally."""

from __future__ import annotations

import os
import socket
import struct
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from peers.qemu import PeerProcess, require, short_tmp
from pyvhost.user.connection import Connection, connect
from pyvhost.user.messages import (
    U64,
    MemoryRegion,
    MemoryTable,
    Request,
    encode_header,
    encode_request,
)

SERVER = """
import logging, os, signal, sys
from pyvhost.daemon import Daemon
from pyvhost.testing import ConfigOnlyDevice

logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(levelname)s %(message)s")
daemon = Daemon(lambda: ConfigOnlyDevice(bytes(60), num_queues=2), sys.argv[1])
with open(sys.argv[2] + ".tmp", "w") as f:
    f.write(str(os.getpid()))
os.rename(sys.argv[2] + ".tmp", sys.argv[2])
daemon.run()
"""

EXPECTED_FEATURES = 1 << 32 | 1 << 30 | 1 << 26


class Server:
    def __init__(self, workdir: Path) -> None:
        self.sock = workdir / "be.sock"
        script = workdir / "server.py"
        script.write_text(SERVER)
        pidfile = workdir / "pid"
        self.proc = PeerProcess(
            [sys.executable, str(script), str(self.sock), str(pidfile)],
            workdir,
            name="backend",
            timeout_s=120,
            socket=self.sock,
        ).start()
        deadline = time.monotonic() + 10
        while not pidfile.exists():
            assert time.monotonic() < deadline, self.proc.stderr
            time.sleep(0.02)
        self.pid = int(pidfile.read_text())

    def fds(self) -> list[str]:
        return sorted(os.listdir(f"/proc/{self.pid}/fd"), key=int)

    def connect(self) -> Connection:
        return connect(self.sock, deadline=5)

    def check_healthy(self) -> None:
        """A well-behaved front-end gets its GET_FEATURES answered."""
        with self.connect() as conn:
            conn.send(encode_request(Request.GET_FEATURES))
            reply = conn.recv_reply(Request.GET_FEATURES, 5)
            assert reply.payload == U64(EXPECTED_FEATURES)

    def idle_fds(self) -> list[str]:
        """The server's fds once they stop changing (the last front-end's are closed)."""
        previous, stable_since = self.fds(), time.monotonic()
        deadline = stable_since + 5
        while time.monotonic() - stable_since < 0.3 and time.monotonic() < deadline:
            time.sleep(0.05)
            current = self.fds()
            if current != previous:
                previous, stable_since = current, time.monotonic()
        return previous

    def settled_fds(self, baseline: list[str]) -> list[str]:
        """The server's fds once it is back to waiting (or after 5 s)."""
        deadline = time.monotonic() + 5
        while (current := self.fds()) != baseline and time.monotonic() < deadline:
            time.sleep(0.05)
        return current


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    require("timeout")
    with short_tmp("pvh-hf-") as workdir:
        srv = Server(workdir)
        try:
            srv.check_healthy()
            yield srv
        finally:
            srv.proc.stop()


def _raw(server: Server) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(str(server.sock))
    return sock


def assert_closed(sock: socket.socket) -> None:
    """The server dropped the connection (EOF, or a reset when our bytes went unread)."""
    sock.settimeout(5)
    try:
        data = sock.recv(100)
    except ConnectionResetError:
        return
    assert data == b"", f"server answered instead of closing: {data!r}"


def garbage(server: Server) -> None:
    with _raw(server) as s:
        s.sendall(os.urandom(3) + b"\xff" * 200)
        assert_closed(s)


def truncated_header(server: Server) -> None:
    with _raw(server) as s:
        s.sendall(encode_header(Request.GET_FEATURES, 1, 0)[:5])


def oversize(server: Server) -> None:
    with _raw(server) as s:
        s.sendall(encode_header(Request.SET_MEM_TABLE, 1, 1 << 20))
        assert_closed(s)


def vanish_mid_payload(server: Server) -> None:
    with _raw(server) as s:
        s.sendall(encode_header(Request.SET_VRING_ADDR, 1, 40) + bytes(10))


def kick_without_fd(server: Server) -> None:
    with _raw(server) as s:
        s.sendall(encode_header(Request.SET_VRING_KICK, 1, 8) + struct.pack("<Q", 0))
        assert_closed(s)


def too_many_fds(server: Server) -> None:
    r, w = os.pipe()
    try:
        with _raw(server) as s:
            table = MemoryTable((MemoryRegion(0, 0x1000, 0x1000, 0),)).encode()
            data = encode_header(Request.SET_MEM_TABLE, 1, len(table)) + table
            socket.send_fds(s, [data], [r, w, r])
            assert_closed(s)
    finally:
        os.close(r)
        os.close(w)


def fds_on_a_request_without_fds(server: Server) -> None:
    r, w = os.pipe()
    try:
        with _raw(server) as s:
            socket.send_fds(s, [encode_header(Request.GET_FEATURES, 1, 0)], [r, w])
            assert_closed(s)
    finally:
        os.close(r)
        os.close(w)


def vring_out_of_range(server: Server) -> None:
    with server.connect() as conn:
        conn.send_bytes(encode_header(Request.SET_VRING_NUM, 1, 8) + struct.pack("<II", 200, 8))
        assert_closed(conn.socket)


def mem_table_bad_fd(server: Server) -> None:
    r, w = os.pipe()
    try:
        with server.connect() as conn:
            table = MemoryTable((MemoryRegion(0, 0x10000, 0x10000, 0),))
            conn.send(encode_request(Request.SET_MEM_TABLE, table, fds=[r]))
            assert_closed(conn.socket)
    finally:
        os.close(r)
        os.close(w)


CASES: dict[str, tuple[Callable[[Server], None], str]] = {
    "garbage": (garbage, "closing the connection"),
    "truncated header": (truncated_header, "in the middle of a header"),
    "oversize size field": (oversize, "exceeds the maximum payload"),
    "vanishes mid-message": (vanish_mid_payload, "in the middle of a payload"),
    "kick without fd": (kick_without_fd, "SET_VRING_KICK: got 0 fds, expected 1"),
    "too many fds": (too_many_fds, "SET_MEM_TABLE: got 3 fds"),
    "fds where none belong": (fds_on_a_request_without_fds, "GET_FEATURES: got 2 fds"),
    "vring out of range": (
        vring_out_of_range,
        "SET_VRING_NUM: vring 200 out of range (device has 2 queues)",
    ),
    "memory fd not mappable": (mem_table_bad_fd, "SET_MEM_TABLE: "),
}


@pytest.mark.parametrize("case", list(CASES))
def test_server_survives_and_serves_the_next_front_end(server: Server, case: str) -> None:
    attack, reason = CASES[case]
    baseline = server.idle_fds()
    logged = len(server.proc.stderr)
    attack(server)
    deadline = time.monotonic() + 5
    while reason not in server.proc.stderr[logged:] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert reason in server.proc.stderr[logged:], server.proc.stderr[logged:]
    server.check_healthy()
    assert server.settled_fds(baseline) == baseline, "server leaked fds"
    assert server.proc.returncode is None
