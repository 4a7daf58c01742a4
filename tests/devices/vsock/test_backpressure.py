"""Back-pressure: a Unix reader that does not read and a guest that does not read hold up their
own connection only, the device's buffers stay bounded, and nothing is lost once they read."""

from __future__ import annotations

import os
import time

from pyvhost.devices.vsock import CHUNK, MAX_UNSENT
from pyvhost.virtio.vsock import DEFAULT_BUF_ALLOC, ConnectionState, VsockConnection

from .support import Guest, Host, Served, read_exactly, send_while_reading

BIG = 4 << 20


def _device_side(served: Served, port: int) -> tuple[int, int, int]:
    """(bytes received from the guest and not yet written out, bytes waiting for the Unix
    socket, host bytes not yet in a packet) for the device's connection on host port ``port``."""
    with served.device.bridge.lock:
        for key, link in served.device.bridge.by_key.items():
            if port in (key.local_port, key.peer_port):
                return link.conn.readable, len(link.out), link.conn.unsent
    raise AssertionError(f"no device connection on port {port}")


def _settle(guest: Guest, seconds: float) -> None:
    """Pump for a while (until nothing moves for 0.2 s, or ``seconds``)."""
    deadline = time.monotonic() + seconds
    quiet_since = time.monotonic()
    while time.monotonic() < deadline and time.monotonic() - quiet_since < 0.2:
        if guest.pump(0.02):
            quiet_since = time.monotonic()


def test_a_slow_unix_reader_holds_up_only_its_connection(
    served: Served, guest: Guest, host: Host
) -> None:
    data = os.urandom(BIG)
    slow = host.listen(5000)
    conn = guest.connect(5000)
    reader = host.accept(slow)
    sent = 0
    deadline = time.monotonic() + 10
    progress = time.monotonic()
    while time.monotonic() - progress < 0.5 < deadline - time.monotonic():
        n = conn.send(data[sent : sent + 65536])  # until the credit is gone for a while
        sent += n
        if guest.pump(0.01) or n:
            progress = time.monotonic()
    assert sent < BIG
    assert conn.credit == 0 and conn.state is ConnectionState.CONNECTED
    readable, out, _ = _device_side(served, 5000)
    assert readable <= DEFAULT_BUF_ALLOC and out <= CHUNK

    other = host.listen(5001)
    fast = host.run(lambda: read_exactly(host.accept(other), 100_000))
    second = guest.connect(5001)
    guest.send_all(second, data[:100_000])
    guest.until(fast.done, what="the other connection, meanwhile")
    assert fast.result() == data[:100_000]

    result = host.run(read_exactly, reader, BIG)
    guest.send_all(conn, data[sent:], timeout=60)
    guest.until(result.done, timeout=60, what="the slow reader catching up")
    assert result.result() == data


def test_a_guest_that_does_not_read_stops_the_device_reading_the_host(
    served: Served, guest: Guest, host: Host
) -> None:
    data = os.urandom(BIG)
    guest.endpoint.listen(6000)

    def program() -> bytes:
        sock, line = host.connect(6000)
        with sock:
            assert line.startswith(b"OK ")
            return send_while_reading(sock, data, 5)

    result = host.run(program)
    conn: VsockConnection = guest.accept()
    _settle(guest, 5)
    assert not result.done()  # its sendall is blocked: the device stopped reading it
    assert conn.readable <= DEFAULT_BUF_ALLOC and conn.state is ConnectionState.CONNECTED
    assert served.device.bridge.by_key and _device_side(served, 6000)[2] <= MAX_UNSENT
    link = next(iter(served.device.bridge.by_key.values()))
    assert link.room == 0

    got = guest.receive(conn, BIG, timeout=60)
    guest.send_all(conn, b"done.")
    guest.until(result.done, what="the host program")
    assert got == data
    assert result.result() == b"done."
