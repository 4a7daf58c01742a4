"""Starts and restarts: a new driver gets no TRANSPORT_RESET; a driver whose back-end was
restarted under it does (on the event queue) and its new connections work; rings stopped and
started again where they were (a VM stop and cont) keep every connection; rings started again at
0 (a new driver) end the old ones; a front-end that leaves ends the Unix connections; stopping
the rx ring never waits for the device."""

from __future__ import annotations

import logging
import os
import time
from concurrent.futures import Future
from pathlib import Path

import pytest

from pyvhost.control import start_ring
from pyvhost.virtio.vsock import RX_QUEUE, ConnectionState

from .support import Guest, Host, Served, read_exactly, read_to_eof, serve_vsock


def test_a_new_driver_gets_no_transport_reset(served: Served, guest: Guest) -> None:
    for _ in range(20):
        guest.pump(0.01)
    assert guest.driver.transport_resets == 0
    assert served.device.resets_sent == 0


def test_back_end_restart_sends_transport_reset(
    folder: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "pyvhost.devices.vsock")
    host = Host(str(folder / "uds"))
    guest: Guest | None = None
    try:
        with serve_vsock(folder) as first:
            guest = Guest(first.sock, reconnect=20)
            old_listener = host.listen(5000)
            old_program = host.run(lambda: read_to_eof(host.accept(old_listener)))
            old = guest.connect(5000)
            guest.send_all(old, b"before the restart")
            guest.flush()
        assert old_program.result(10) == b"before the restart"  # ended with that back-end
        with serve_vsock(folder) as second:
            guest.until(lambda: guest.driver.transport_resets == 1, what="TRANSPORT_RESET")
            assert guest.session.reconnects == 1
            assert old.state is ConnectionState.CLOSED and old.reason == "transport reset"
            assert second.device.resets_sent == 1
            assert "a driver this device did not serve; transport reset" in caplog.text
            _new_connection_works(guest, host)
    finally:
        if guest is not None:
            guest.close()
        host.close()


def _new_connection_works(guest: Guest, host: Host) -> None:
    listener = host.listen(5001)
    program = host.run(lambda: read_exactly(host.accept(listener), 100_000))
    new = guest.connect(5001)
    data = os.urandom(100_000)
    guest.send_all(new, data)
    guest.until(program.done, what="a new connection after the reset")
    assert program.result() == data


def test_a_front_end_that_leaves_ends_the_unix_connections(
    served: Served, host: Host, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "pyvhost.devices.vsock")
    listener = host.listen(5000)
    program = host.run(lambda: read_to_eof(host.accept(listener)))
    with Guest(served.sock) as guest:
        conn = guest.connect(5000)
        guest.send_all(conn, b"bye")
        guest.flush()
    assert program.result(10) == b"bye"
    deadline = time.monotonic() + 5
    while "reset: 1 connection(s) closed" not in caplog.text and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not served.device.bridge.links and not served.device.endpoint.connections


def test_stopping_the_rx_ring_does_not_wait(guest: Guest, caplog: pytest.LogCaptureFixture) -> None:
    """Posted rx chains stay in the ring while the device has nothing to send: GET_VRING_BASE
    answers at once (the framework would wait for chains the device held)."""
    for _ in range(10):
        guest.pump(0.01)
    posted = guest.session.in_flight(RX_QUEUE)
    assert posted > 0
    started = time.monotonic()
    base = guest.session.frontend.get_vring_base(RX_QUEUE)
    assert time.monotonic() - started < 1.0
    assert base == 0  # nothing was ever popped
    assert "in flight" not in caplog.text


def _restart_rings(guest: Guest, *, keep: bool) -> None:
    """GET_VRING_BASE on every ring, then start them again on the same connection: where they
    were (``keep``, as QEMU does around a VM stop) or from 0 with a new driver side."""
    _stop_rings(guest)
    _start_rings(guest, keep=keep)


def _stop_rings(guest: Guest) -> None:
    fe = guest.session.frontend
    for q in guest.session.queues:
        fe.get_vring_base(q.index)


def _start_rings(guest: Guest, *, keep: bool) -> None:
    """Start every ring again, rx first (as QEMU does)."""
    session = guest.session
    fe = session.frontend
    for q in session.queues:
        base = session._prepare_ring(q, keep=keep)
        assert q.ring is not None
        start_ring(fe, q.index, q.size, q.ring, base, q.kick_fd, q.call_fd)
    for q in session.queues:
        session.kick(q.index, force=True)


def test_rings_restarted_where_they_were_keep_the_connections(
    served: Served, guest: Guest, host: Host
) -> None:
    listener = host.listen(5000)
    program = host.run(lambda: read_exactly(host.accept(listener), 200_000))
    conn = guest.connect(5000)
    data = os.urandom(200_000)
    guest.send_all(conn, data[:100_000])
    guest.flush()
    _restart_rings(guest, keep=True)
    guest.send_all(conn, data[100_000:])
    guest.until(program.done, what="the rest after the restart")
    assert program.result() == data
    assert conn.state is ConnectionState.CONNECTED
    assert guest.driver.transport_resets == 0 and served.device.resets_sent == 0


def _old_drivers_connection(guest: Guest, host: Host) -> Future[bytes]:
    """A guest connection to a host program that reads until end of file; it has b"old driver"
    to read."""
    listener = host.listen(5000)
    program = host.run(lambda: read_to_eof(host.accept(listener)))
    conn = guest.connect(5000)
    guest.send_all(conn, b"old driver")
    guest.flush()
    return program


def test_rings_restarted_at_zero_end_the_old_drivers_connections(
    served: Served, guest: Guest, host: Host, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "pyvhost.devices.vsock")
    program = _old_drivers_connection(guest, host)
    _restart_rings(guest, keep=False)
    guest.until(program.done, what="the old connection's end")
    assert program.result() == b"old driver"
    assert "a new driver; the old one's connections end" in caplog.text
    assert not served.device.bridge.links and served.device.resets_sent == 0
    _new_connection_works(guest, host)


def test_a_host_connect_made_between_drivers_reaches_the_new_one(
    served: Served, guest: Guest, host: Host, caplog: pytest.LogCaptureFixture
) -> None:
    """The old driver's connections end when the rings start again at 0, but a host CONNECT
    made while no driver ran is the new driver's: its request, handed over on the rx ring before
    the tx ring starts, is answered and the bytes flow."""
    caplog.set_level(logging.INFO, "pyvhost.devices.vsock")
    old_program = _old_drivers_connection(guest, host)
    guest.endpoint.listen(6000)
    _stop_rings(guest)
    new_program = host.run(lambda: host.connect(6000, b"from the host"))
    deadline = time.monotonic() + 5
    while not any(
        c.state is ConnectionState.CONNECTING for c in served.device.endpoint.connections.values()
    ):
        assert time.monotonic() < deadline, "the CONNECT never became a connection"
        time.sleep(0.01)
    _start_rings(guest, keep=False)
    conn = guest.accept()
    assert guest.receive(conn, len(b"from the host")) == b"from the host"
    sock, line = new_program.result(10)
    assert line.startswith(b"OK ")
    guest.send_all(conn, b"to the host")
    guest.flush()
    assert read_exactly(sock, len(b"to the host")) == b"to the host"
    assert old_program.result(10) == b"old driver"  # the old driver's connection ended
    assert "the old one's connections end (1 kept: connecting)" in caplog.text
