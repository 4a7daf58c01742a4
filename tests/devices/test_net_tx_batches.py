"""The net device's transmit path works the ring in batches: many chains popped at once, checked,
handed to the back end in one call and completed in one push. Good and bad chains mixed in one
batch keep their order and their reasons; a header is accepted without a full check only for the
features it was checked under; a refused packet is counted and the rest of the batch goes on."""

from __future__ import annotations

import errno
from collections.abc import Sequence

import pytest

from pyvhost.devices.net import LoopbackBackend, NetBackend, NetDevice, SinkBackend
from pyvhost.devices.net.config import OFFLOAD_FEATURES
from pyvhost.driver.session import DriverSession
from pyvhost.virtio import features as vf
from pyvhost.virtio.net import GSO_TCPV4, HDR_F_NEEDS_CSUM, NetHeader

from .net_rig import MAC, connect, frame, served, without

TX = 1
HDR = NetHeader().encode()
CSUM = NetHeader(flags=HDR_F_NEEDS_CSUM, csum_start=34, csum_offset=16).encode()


class Recording(NetBackend):
    """Keeps every packet it is given; refuses those whose frame is in ``refuse``. Offers the
    TAP's offloads, so headers asking for them can be valid."""

    features = OFFLOAD_FEATURES

    def __init__(self, refuse: Sequence[bytes] = ()) -> None:
        super().__init__()
        self.sent: list[bytes] = []
        self.refuse = set(refuse)

    def transmit(self, pair: int, packet: Sequence[memoryview]) -> None:
        data = b"".join(packet)
        if data[12:] in self.refuse:
            raise OSError(errno.ENOBUFS, "No buffer space available")
        self.sent.append(data)


def _submit_all(session: DriverSession, chains: list[list[bytes]]) -> list[int]:
    """All ``chains`` made available at once (one kick): the device pops them as one batch.
    Returns the lengths the device reported, in order."""
    tokens = []
    for pieces in chains:
        bufs = []
        for data in pieces:
            gpa = session.alloc(max(len(data), 1))
            session.view(gpa, len(data))[:] = data
            bufs.append((gpa, len(data)))
        tokens.append(session.submit(TX, bufs, []))
    session.kick(TX)
    done: dict[int, int] = {}
    while len(done) < len(tokens):
        done.update(session.wait(TX, 5.0))
    return [done[t] for t in tokens]


def test_good_and_bad_chains_in_one_batch_keep_order_and_reasons(
    caplog: pytest.LogCaptureFixture,
) -> None:
    backend = Recording()
    dev = NetDevice(backend, mac=MAC)
    good = [frame(i, 60 + 40 * i) for i in range(5)]
    chains = [
        [HDR + good[0]],
        [b"\0" * 5],  # shorter than the header
        [HDR[:1], HDR[1:] + good[1]],  # header split after one byte: the full check
        [HDR + good[2][:6], good[2][6:]],  # frame in two buffers
        [NetHeader(flags=0x80).encode() + good[3]],  # unknown flag
        [NetHeader(gso_type=GSO_TCPV4).encode() + good[3]],  # TSO4 not negotiated here
        [HDR + good[3]],
        [HDR + good[4]],
    ]
    mask = without(vf.NET_F_HOST_TSO4)
    with served(dev) as sock, connect(sock, mask=mask) as session:
        assert _submit_all(session, chains) == [0] * len(chains)
    assert backend.sent == [HDR + f for f in good]
    stats = dev.stats.pairs[0]
    assert stats.tx_frames == 5 and stats.tx_bytes == sum(len(f) for f in good)
    assert stats.drops == {"tx_short": 1, "tx_bad_header": 2}
    assert "flags 0x80 has unknown bits" in caplog.text
    assert "without VIRTIO_NET_F_HOST_TSO4" in caplog.text


def test_a_header_accepted_once_is_checked_again_under_other_features() -> None:
    """NEEDS_CSUM passes while CSUM is negotiated; a new driver without CSUM must not inherit
    that verdict."""
    backend = Recording()
    dev = NetDevice(backend, mac=MAC)
    with served(dev) as sock:
        with connect(sock) as session:
            assert vf.has_bit(session.features, vf.NET_F_CSUM)
            _submit_all(session, [[CSUM + frame(1)], [CSUM + frame(2)]])
        with connect(sock, mask=without(vf.NET_F_CSUM)) as session:
            _submit_all(session, [[CSUM + frame(3)], [HDR + frame(4)]])
    assert backend.sent == [CSUM + frame(1), CSUM + frame(2), HDR + frame(4)]
    assert dev.stats.pairs[0].drops == {"tx_bad_header": 1}


def test_a_refused_packet_is_counted_and_the_batch_goes_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    frames = [frame(i) for i in range(4)]
    backend = Recording(refuse=[frames[1]])
    dev = NetDevice(backend, mac=MAC)
    with served(dev) as sock, connect(sock) as session:
        _submit_all(session, [[HDR + f] for f in frames])
    assert backend.sent == [HDR + frames[k] for k in (0, 2, 3)]
    stats = dev.stats.pairs[0]
    assert (stats.tx_frames, stats.tx_bytes) == (3, 3 * len(frames[0]))
    assert stats.drops == {"tx_backend_error": 1}
    assert "refused a 212-byte packet: [Errno 105] No buffer space available" in caplog.text


def test_a_full_ring_is_taken_in_one_wake_up() -> None:
    """More chains than the old 64-chain batch, all available at once: every one is sent (in
    order) and completed."""
    backend = Recording()
    dev = NetDevice(backend, mac=MAC, queue_size=256)
    frames = [frame(i, 64) for i in range(200)]
    with served(dev) as sock, connect(sock, queue_size=256) as session:
        assert _submit_all(session, [[HDR + f] for f in frames]) == [0] * 200
    assert backend.sent == [HDR + f for f in frames]
    assert dev.stats.pairs[0].tx_frames == 200


def test_loopback_batch_counts_and_returns_in_order() -> None:
    dev = NetDevice(LoopbackBackend(), mac=MAC)
    frames = [frame(i, 100) for i in range(10)]
    with served(dev) as sock, connect(sock) as session:
        _submit_all(session, [[HDR + f] for f in frames])
        assert [p[12:] for p in dev.rx[0].backlog] == frames
    assert dev.stats.pairs[0].tx_frames == 10
    assert dev.stats.pairs[0].tx_bytes == 1000


def test_a_sink_consumes_a_batch_without_a_call_per_packet() -> None:
    class Counting(SinkBackend):
        calls = 0

        def transmit(self, pair: int, packet: Sequence[memoryview]) -> None:
            Counting.calls += 1

    packets = [[memoryview(b"x" * 30)]] * 3
    assert SinkBackend().transmit_batch(0, packets) == []
    assert Counting().transmit_batch(0, packets) == [] and Counting.calls == 3
