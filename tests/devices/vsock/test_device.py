"""The vsock device with pyvhost's own guest driver: config space, streams both ways in both
directions of connection, several connections at once, graceful close, refused connections."""

from __future__ import annotations

import logging
import os
import socket

import pytest

from pyvhost.virtio.vsock import ConnectionState, VsockConfig

from .support import GUEST_CID, Guest, Host, Served, read_exactly, read_to_eof, send_while_reading

MIB = 1 << 20


def test_config_space_is_the_guest_cid(guest: Guest) -> None:
    assert guest.session.config(0, 8) == VsockConfig(GUEST_CID).encode()
    assert guest.driver.transport_resets == 0


def test_guest_to_host_listener_both_ways(served: Served, guest: Guest, host: Host) -> None:
    up, down = os.urandom(MIB), os.urandom(MIB)
    listener = host.listen(5000)

    def program() -> bytes:
        conn = host.accept(listener)
        with conn:
            got = send_while_reading(conn, down, len(up))
            conn.shutdown(socket.SHUT_WR)
            assert read_to_eof(conn) == b""
        return got

    result = host.run(program)
    conn = guest.connect(5000)
    assert conn.state is ConnectionState.CONNECTED
    assert guest.exchange(conn, up, len(down)) == down
    guest.until(lambda: conn.at_eof, what="the host's SHUTDOWN")
    conn.close()
    guest.until(lambda: not guest.endpoint.connections, what="the close handshake")
    assert conn.reason == "closed"
    assert result.result(20) == up
    guest.until(lambda: not served.device.bridge.links, what="the device forgets the link")


def test_host_connect_reaches_a_guest_listener(served: Served, guest: Guest, host: Host) -> None:
    up, down = os.urandom(MIB), os.urandom(MIB)
    guest.endpoint.listen(6000)

    def program() -> tuple[bytes, bytes]:
        sock, line = host.connect(6000, early=b"early bytes ")
        with sock:
            got = send_while_reading(sock, down, len(up))
            sock.shutdown(socket.SHUT_WR)
            assert read_to_eof(sock) == b""
            return line, got

    result = host.run(program)
    conn = guest.accept()
    assert guest.exchange(conn, up, len(down) + 12) == b"early bytes " + down
    guest.until(lambda: conn.at_eof, what="the host's SHUTDOWN")
    conn.close()
    guest.until(lambda: not guest.endpoint.connections, what="the close handshake")
    line, got = result.result(20)
    assert line == b"OK %d\n" % conn.key.peer_port
    assert got == up


def test_several_connections_at_once(guest: Guest, host: Host) -> None:
    """Three guest connections to host echo programs and three host programs to guest echoes,
    all moving at once, every stream compared."""
    size = 256 * 1024
    data = {port: os.urandom(size) for port in (5001, 5002, 5003, 6001, 6002, 6003)}
    listeners = {port: host.listen(port) for port in (5001, 5002, 5003)}

    def echo(port: int) -> bytes:
        conn = host.accept(listeners[port])
        with conn:
            got = read_exactly(conn, size)
            conn.sendall(got)
        return got

    def ask(port: int) -> bytes:
        sock, line = host.connect(port)
        with sock:
            assert line.startswith(b"OK ")
            return send_while_reading(sock, data[port], size)

    echoes = {port: host.run(echo, port) for port in (5001, 5002, 5003)}
    for port in (6001, 6002, 6003):
        guest.endpoint.listen(port)
    asks = {port: host.run(ask, port) for port in (6001, 6002, 6003)}
    conns = {port: guest.endpoint.connect(2, port) for port in (5001, 5002, 5003)}
    sent = dict.fromkeys(data, 0)
    got = {port: bytearray() for port in data}

    def step() -> bool:
        while (conn := guest.endpoint.accept()) is not None:
            conns[conn.key.local_port] = conn
        for port, conn in conns.items():
            got[port] += conn.receive()
            source = data[port] if port < 6000 else got[port]
            if conn.writable and sent[port] < len(source):
                sent[port] += conn.send(memoryview(source)[sent[port] : sent[port] + 65536])
        return all(len(got[p]) == size and sent[p] == size for p in data)

    guest.until(step, timeout=30, what="six streams")
    programs = [*echoes.values(), *asks.values()]
    guest.until(lambda: all(f.done() for f in programs), what="the host programs")
    assert {p: f.result(20) for p, f in echoes.items()} == {p: data[p] for p in echoes}
    assert {p: f.result(20) for p, f in asks.items()} == {p: data[p] for p in asks}
    assert {p: bytes(b) for p, b in got.items()} == data


def test_guest_connect_with_no_host_listener_gets_rst_only(
    guest: Guest, served: Served, caplog: pytest.LogCaptureFixture
) -> None:
    """Refused, not accepted and then reset: one packet comes back, an RST."""
    caplog.set_level(logging.INFO, "pyvhost.devices.vsock")
    before = guest.driver.rx_packets
    conn = guest.connect(5999)
    assert conn.state is ConnectionState.CLOSED
    assert conn.reason == "refused by the peer"
    assert guest.driver.rx_packets - before == 1
    assert "uds_5999: No such file or directory" in caplog.text
    assert not served.device.bridge.links


def test_guest_connect_to_a_closed_listener_socket_is_refused(
    guest: Guest, served: Served, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "pyvhost.devices.vsock")
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(f"{served.uds}_5997")
    stale.close()
    conn = guest.connect(5997)
    assert conn.reason == "refused by the peer"
    assert "uds_5997: Connection refused" in caplog.text
