"""A driver that breaks the rules on the net device's data queues: each bad chain is given back,
counted under its reason and logged with it; the device carries on with the next frame."""

from __future__ import annotations

import errno
from collections.abc import Sequence

import pytest

from pyvhost.devices.net import LoopbackBackend, NetBackend, NetDevice
from pyvhost.driver.net import NetDriver
from pyvhost.driver.session import DriverSession
from pyvhost.virtio import features as vf
from pyvhost.virtio.net import HDR_F_NEEDS_CSUM, NetHeader

from .net_rig import MAC, connect, exchange, frame, served, without

TX = 1


def _transmit_raw(
    session: DriverSession,
    readable: list[bytes],
    writable: list[int] = (),  # type: ignore[assignment]
) -> int:
    """One hand-made transmit chain; the length the device reported."""
    bufs = []
    for data in readable:
        gpa = session.alloc(max(len(data), 1))
        session.view(gpa, len(data))[:] = data
        bufs.append((gpa, len(data)))
    outs = [(session.alloc(n), n) for n in writable]
    session.submit(TX, bufs, outs)
    session.kick(TX)
    [(_, written)] = session.wait(TX, 5.0)
    return written


HDR = NetHeader().encode()

BAD_TX = [
    (
        "shorter than the header",
        [b"\0" * 5],
        [],
        "tx_short",
        "5 bytes, shorter than the 12-byte header",
    ),
    ("header only", [HDR + b"\0" * 10], [], "tx_short", "22 bytes, shorter than"),
    ("writable part", [HDR + frame(1)], [64], "tx_writable", "64 device-writable bytes"),
    (
        "absurd length",
        [HDR + bytes(40000), bytes(40000)],
        [],
        "tx_too_long",
        "80012 bytes, longer than the header and the largest frame",
    ),
    (
        "unknown flags",
        [NetHeader(flags=0x80).encode() + frame(2)],
        [],
        "tx_bad_header",
        "flags 0x80",
    ),
    (
        "checksum not negotiated",
        [NetHeader(flags=HDR_F_NEEDS_CSUM).encode() + frame(3)],
        [],
        "tx_bad_header",
        "NEEDS_CSUM without VIRTIO_NET_F_CSUM",
    ),
    (
        "segmentation not offered",
        [NetHeader(gso_type=1, gso_size=1000).encode() + frame(4)],
        [],
        "tx_bad_header",
        "gso_type 0x1 without VIRTIO_NET_F_HOST_TSO4",
    ),
    (
        "unknown segmentation",
        [NetHeader(gso_type=5).encode() + frame(5)],
        [],
        "tx_bad_header",
        "gso_type 0x5, a segmentation this device does not offer",
    ),
]


@pytest.mark.parametrize(
    ("readable", "writable", "kind", "message"),
    [case[1:] for case in BAD_TX],
    ids=[case[0] for case in BAD_TX],
)
def test_bad_transmit_chain_is_dropped_with_its_reason(
    readable: list[bytes],
    writable: list[int],
    kind: str,
    message: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    dev = NetDevice(LoopbackBackend(), mac=MAC)
    with served(dev) as sock, connect(sock) as session:
        assert _transmit_raw(session, readable, writable) == 0
        net = NetDriver(session)
        net.post_rx()
        assert [g.frame for g in exchange(net, [frame(9)])] == [frame(9)]
    assert dev.stats.pairs[0].drops == {kind: 1}
    assert "queue 1: transmit chain" in caplog.text and message in caplog.text


def test_bad_receive_buffers_are_returned_unused(caplog: pytest.LogCaptureFixture) -> None:
    dev = NetDevice(LoopbackBackend(), mac=MAC)
    with served(dev) as sock, connect(sock, mask=without(vf.NET_F_MRG_RXBUF)) as session:
        ro = session.alloc(64)
        session.submit(0, [(ro, 8)], [(session.alloc(2048), 2048)])  # readable part on receive
        session.submit(0, [], [(session.alloc(8), 8)])  # smaller than the header
        session.submit(0, [], [(session.alloc(100), 100)])  # too small for the frame, no MRG_RXBUF
        session.kick(0)
        net = NetDriver(session)
        net.send(frame(1, 500))
        net.flush()
        used: list[tuple[int, int]] = []
        while len(used) < 3:
            used += session.wait(0, 5.0)
        assert sorted(w for _, w in used) == [0, 0, 0]
    drops = dev.stats.pairs[0].drops
    assert drops == {"rx_readable_buffer": 1, "rx_short_buffer": 1, "rx_buffer_too_small": 1}
    assert "has 8 device-readable bytes; returned unused" in caplog.text
    assert "holds 8 bytes, less than a header" in caplog.text
    assert "one buffer per packet without MRG_RXBUF" in caplog.text


def test_a_flood_of_mistakes_is_counted_not_logged(caplog: pytest.LogCaptureFixture) -> None:
    dev = NetDevice(LoopbackBackend(), mac=MAC)
    with served(dev) as sock, connect(sock) as session:
        for _ in range(12):
            assert _transmit_raw(session, [b"\0" * 5]) == 0
    assert dev.stats.pairs[0].drops["tx_short"] == 12
    assert caplog.text.count("shorter than the 12-byte header") == 5
    assert "further ones are counted, not logged" in caplog.text


class _Refusing(NetBackend):
    """A back end whose host side refuses every packet."""

    def transmit(self, pair: int, packet: Sequence[memoryview]) -> None:
        raise OSError(errno.EIO, "Input/output error")


def test_a_refusing_back_end_is_counted_and_logged(caplog: pytest.LogCaptureFixture) -> None:
    dev = NetDevice(_Refusing(), mac=MAC)
    with served(dev) as sock, connect(sock) as session:
        net = NetDriver(session)
        for i in range(3):
            net.send(frame(i))
        net.flush()
        while net.tx_in_flight:
            assert net.reap_tx(2.0)
    assert dev.stats.pairs[0].drops == {"tx_backend_error": 3}
    assert dev.stats.pairs[0].tx_frames == 0
    assert "sink refused a 212-byte packet: [Errno 5] Input/output error" in caplog.text
