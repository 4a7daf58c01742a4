"""Receive filtering: the RX modes and MAC tables the driver sets on the control queue decide
which frames from the host reach its receive buffers; the others are counted as ``rx_filtered``.

Frames come from a back end whose host side is a socket pair, so the test says exactly which
frames the host sent; the guest side is our driver session on the device's real rings.
"""

from __future__ import annotations

import socket
import struct
import time

import pytest

from pyvhost.devices.net import OK, NetBackend, NetDevice
from pyvhost.devices.net.ctrl import RxModes, rx_filter
from pyvhost.driver.net import NetDriver

from .net_rig import MAC, connect, ctrl_command, served

OTHER = bytes.fromhex("02aabbccdd99")
BCAST = b"\xff" * 6
ALL_NODES = bytes.fromhex("333300000001")
SOLICITED = bytes.fromhex("3333ff123456")
DESTS = {"own": MAC, "other": OTHER, "bcast": BCAST, "all-nodes": ALL_NODES, "solicited": SOLICITED}


class _Injecting(NetBackend):
    """Frames the test writes to ``host`` arrive as packets from the host on pair 0."""

    kind = "inject"

    def __init__(self) -> None:
        super().__init__(1)
        self.host, self._dev = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self._dev.setblocking(False)

    def fds(self) -> list[int]:
        return [self._dev.fileno()]

    def read(self, pair: int) -> bytes | None:
        try:
            return self._dev.recv(65536)
        except BlockingIOError:
            return None

    def close(self) -> None:
        self.host.close()
        self._dev.close()


def _table(*macs: bytes) -> bytes:
    return struct.pack("<I", len(macs)) + b"".join(macs)


def _delivered(dev: NetDevice, backend: _Injecting, net: NetDriver) -> set[str]:
    """Send one frame to each destination; the names of those the driver received."""
    stats = dev.stats.pairs[0]
    rx_before, filtered_before = stats.rx_frames, stats.drops["rx_filtered"]
    for name, dest in DESTS.items():
        body = name.encode().ljust(50, b".")
        backend.host.send(bytes(12) + dest + OTHER + b"\x88\xb5" + body)
    got: set[str] = set()
    deadline = time.monotonic() + 5.0
    while time.monotonic() < deadline:
        got |= {f.frame[14:].rstrip(b".").decode() for f in net.receive(timeout=0.05)}
        delivered = stats.rx_frames - rx_before
        seen = delivered + stats.drops["rx_filtered"] - filtered_before
        if seen == len(DESTS) and len(got) == delivered:
            break
    assert stats.rx_frames - rx_before + stats.drops["rx_filtered"] - filtered_before == len(DESTS)
    return got


def test_rx_modes_and_mac_tables_filter_frames_from_the_host() -> None:
    backend = _Injecting()
    dev = NetDevice(backend, mac=MAC)
    with served(dev) as sock, connect(sock) as session:
        net = NetDriver(session)
        net.post_rx()
        assert _delivered(dev, backend, net) == set(DESTS)  # promiscuous until told otherwise
        assert ctrl_command(session, 2, bytes([0, 0, 0])) == OK  # PROMISC off
        assert _delivered(dev, backend, net) == {"own", "bcast"}
        table = bytes([1, 0]) + _table(OTHER) + _table(ALL_NODES)
        assert ctrl_command(session, 2, table) == OK
        assert _delivered(dev, backend, net) == {"own", "other", "bcast", "all-nodes"}
        assert ctrl_command(session, 2, bytes([0, 1, 1])) == OK  # ALLMULTI
        assert _delivered(dev, backend, net) == {"own", "other", "bcast", "all-nodes", "solicited"}
        assert ctrl_command(session, 2, bytes([0, 3, 1])) == OK  # NOMULTI beats ALLMULTI
        assert ctrl_command(session, 2, bytes([0, 5, 1])) == OK  # NOBCAST
        assert _delivered(dev, backend, net) == {"own", "other"}
        assert ctrl_command(session, 2, bytes([0, 4, 1])) == OK  # NOUNI: not even our own
        assert _delivered(dev, backend, net) == set()
        assert ctrl_command(session, 2, bytes([0, 4, 0])) == OK
        assert ctrl_command(session, 2, bytes([1, 1]) + OTHER) == OK  # MAC_ADDR_SET
        assert ctrl_command(session, 2, bytes([1, 0]) + _table() + _table()) == OK
        assert _delivered(dev, backend, net) == {"other"}
        assert ctrl_command(session, 2, bytes([0, 2, 1])) == OK  # ALLUNI
        assert _delivered(dev, backend, net) == {"own", "other"}
        assert ctrl_command(session, 2, bytes([0, 0, 1])) == OK  # PROMISC beats everything
        assert _delivered(dev, backend, net) == set(DESTS)
        filtered = dev.stats.pairs[0].drops["rx_filtered"]
        assert filtered == 3 + 1 + 0 + 3 + 5 + 4 + 3
        assert "rx_filtered" in dev.stats.line()


def test_a_reset_makes_the_device_promiscuous_again() -> None:
    backend = _Injecting()
    dev = NetDevice(backend, mac=MAC)
    with served(dev) as sock:
        with connect(sock) as session:
            net = NetDriver(session)
            net.post_rx()
            assert ctrl_command(session, 2, bytes([0, 0, 0])) == OK
            assert _delivered(dev, backend, net) == {"own", "bcast"}
        with connect(sock) as session:
            net = NetDriver(session)
            net.post_rx()
            assert _delivered(dev, backend, net) == set(DESTS)


@pytest.mark.parametrize("dest", [b"", b"\x02\x00", MAC + b"x"])
def test_a_destination_that_is_not_six_bytes_is_refused(dest: bytes) -> None:
    modes = RxModes()
    modes.modes["promisc"] = False
    accepts = rx_filter(modes, MAC)
    assert accepts is not None
    assert not accepts(dest)
    assert accepts(MAC)
