"""The host's ``CONNECT <port>`` line: parsed on its own, and what the device does with bad ones,
with a port nobody listens on, with a guest that never answers and with a host that leaves."""

from __future__ import annotations

import logging
import socket
import time
from pathlib import Path

import pytest

from pyvhost.devices.vsock import HandshakeError, parse_connect
from pyvhost.devices.vsock.bridge import MAX_GREETERS
from pyvhost.devices.vsock.handshake import MAX_LINE, ConnectLine
from pyvhost.virtio.vsock import ConnectionOptions

from .support import Guest, Host, Served, read_line, read_to_eof, serve_vsock


@pytest.mark.parametrize(
    ("line", "port"),
    [(b"CONNECT 5000", 5000), (b"connect 0", 0), (b"  Connect\t4294967294 ", 0xFFFF_FFFE)],
)
def test_good_lines(line: bytes, port: int) -> None:
    assert parse_connect(line) == port


@pytest.mark.parametrize(
    ("line", "why"),
    [
        (b"", "is not 'CONNECT <port>'"),
        (b"HELLO 5000", "is not 'CONNECT <port>'"),
        (b"CONNECT", "is not 'CONNECT <port>'"),
        (b"CONNECT 1 2", "is not 'CONNECT <port>'"),
        (b"CONNECT x", "'x' is not a port"),
        (b"CONNECT -1", "'-1' is not a port"),
        (b"CONNECT 4294967295", "'4294967295' is not a port"),
        (b"CONNECT \xff", "is not ASCII"),
    ],
)
def test_bad_lines(line: bytes, why: str) -> None:
    with pytest.raises(HandshakeError, match=why):
        parse_connect(line)


def test_the_line_may_come_in_pieces_and_keeps_what_follows() -> None:
    line = ConnectLine()
    assert line.feed(b"CONN") is None
    assert line.feed(b"ECT 77\r") is None
    assert line.feed(b"\nhello") == (77, b"hello")


def test_a_line_without_newline_is_refused_at_the_limit() -> None:
    line = ConnectLine()
    assert line.feed(b"C" * (MAX_LINE - 1)) is None
    with pytest.raises(HandshakeError, match="no newline"):
        line.feed(b"C")


# -- through the device (served while a front-end is connected: hence the guest fixture) -------


def _closed_without_ok(host: Host, data: bytes) -> bytes:
    """Send ``data`` as the first bytes; what the device answers before closing."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(10)
    host.sockets.append(sock)
    with sock:
        sock.connect(host.uds)
        sock.sendall(data)
        return read_to_eof(sock)


@pytest.mark.parametrize(
    ("data", "logged"),
    [
        (b"HELLO 5000\n", "is not 'CONNECT <port>'"),
        (b"CONNECT 4294967295\n", "is not a port"),
        (b"C" * 200, "no newline"),
    ],
)
@pytest.mark.usefixtures("guest")
def test_a_bad_line_closes_the_connection(
    served: Served, host: Host, caplog: pytest.LogCaptureFixture, data: bytes, logged: str
) -> None:
    caplog.set_level(logging.INFO, "pyvhost.devices.vsock")
    assert _closed_without_ok(host, data) == b""
    assert logged in caplog.text
    assert not served.device.bridge.greeters


@pytest.mark.usefixtures("guest")
def test_a_host_that_leaves_before_its_line(
    served: Served, host: Host, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "pyvhost.devices.vsock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.connect(host.uds)
        sock.sendall(b"CONN")
        deadline = time.monotonic() + 5
        while not served.device.bridge.greeters and time.monotonic() < deadline:
            time.sleep(0.01)
    while served.device.bridge.greeters and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not served.device.bridge.greeters
    assert "closed before its CONNECT line" in caplog.text


def test_connect_to_a_port_nobody_listens_on(served: Served, guest: Guest, host: Host) -> None:
    result = host.run(host.connect, 7000)
    guest.until(result.done, what="the device's answer")
    sock, line = result.result()
    with sock:
        assert line == b""  # closed, no OK: the guest answered RST
    guest.until(lambda: not served.device.bridge.links, what="the device forgets it")


def test_a_guest_that_never_answers_times_out(folder: Path) -> None:
    """The connect timeout runs on the device's own timer: nothing else happens meanwhile."""
    options = ConnectionOptions(connect_timeout=0.3)
    with serve_vsock(folder, options=options) as served, Guest(served.sock) as guest:
        host = Host(served.uds)
        try:
            started = time.monotonic()
            sock, line = host.connect(7001)  # the guest is never pumped: silence
            with sock:
                assert line == b""
            assert 0.25 < time.monotonic() - started < 3
            assert not served.device.bridge.links
            guest.pump()
        finally:
            host.close()


@pytest.mark.usefixtures("guest")
def test_too_many_pending_lines(served: Served, host: Host) -> None:
    socks = []
    try:
        for _ in range(MAX_GREETERS):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            socks.append(sock)
            sock.connect(host.uds)
        deadline = time.monotonic() + 5
        while len(served.device.bridge.greeters) < MAX_GREETERS and time.monotonic() < deadline:
            time.sleep(0.01)
        one_more = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        socks.append(one_more)
        one_more.settimeout(5)
        one_more.connect(host.uds)
        assert read_line(one_more) == b""
    finally:
        for sock in socks:
            sock.close()
