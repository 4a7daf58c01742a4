"""A packet that needs more receive buffers (MRG_RXBUF) than the ring offers waits for them.

The buffers taken for it go back to the ring (``unpop``) with a kick armed, so the driver's next
buffers complete it: nothing is dropped, nothing is returned empty, the ring can be stopped
meanwhile. A packet bigger than the whole ring, or one that waited ``SHORT_WAIT``, is dropped
and counted. Split and packed rings, with and without EVENT_IDX, served by the real Daemon.
"""

from __future__ import annotations

import time

import pytest

from pyvhost.devices.net import LoopbackBackend, NetDevice
from pyvhost.driver.net import NetDriver, Received
from pyvhost.virtio import features as vf

from .net_rig import ALL, MAC, connect, exchange, frame, served, wait_for, without


def collect(net: NetDriver, n: int, timeout: float = 5.0) -> list[Received]:
    got: list[Received] = []
    deadline = time.monotonic() + timeout
    while len(got) < n and time.monotonic() < deadline:
        net.reap_tx()
        got += net.receive(timeout=0.1)
    return got


@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
@pytest.mark.parametrize("event_idx", [True, False], ids=["event-idx", "no-event-idx"])
def test_a_packet_waits_for_the_buffers_it_needs(packed: bool, event_idx: bool) -> None:
    dev = NetDevice(LoopbackBackend(), mac=MAC)
    mask = ALL if event_idx else without(vf.F_RING_EVENT_IDX)
    with served(dev) as sock, connect(sock, packed=packed, mask=mask) as session:
        net = NetDriver(session, rx_buffer_size=256)
        net.post_rx(2)  # 512 bytes of buffers for a 1526-byte packet
        big = frame(1, 1514)
        assert exchange(net, [big], timeout=0.5) == []
        assert net.rx_returned == 0, "buffers came back empty instead of waiting"
        net.post_rx(2)  # still short: 1024 bytes
        assert collect(net, 1, timeout=0.3) == []
        net.post_rx(4)  # now 2048 bytes: the packet goes in six buffers
        got = collect(net, 1)
        assert [g.frame for g in got] == [big]
        assert got[0].buffers == 6
        assert net.rx_errors == [] and net.rx_returned == 0
        # the ring is refilled (receive() reposts): the next packets pass as usual
        frames = [frame(i, size) for i, size in enumerate([60, 1514, 700, 1514], 2)]
        assert [g.frame for g in exchange(net, frames)] == frames
    pair = dev.stats.pairs[0]
    assert not pair.drops
    assert pair.rx_frames == 5


def test_stopping_the_ring_while_a_packet_waits_does_not_wait() -> None:
    dev = NetDevice(LoopbackBackend(), mac=MAC)
    with served(dev) as sock:
        session = connect(sock)
        net = NetDriver(session, rx_buffer_size=256)
        net.post_rx(2)
        exchange(net, [frame(1, 1514)], timeout=0.3)
        started = time.monotonic()
        session.close()  # GET_VRING_BASE: no receive chain is held
        assert time.monotonic() - started < 2.0
    assert dev.stats.pairs[0].drops.get("rx_ring_short", 0) == 0


def test_a_packet_bigger_than_the_whole_ring_is_dropped_at_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    dev = NetDevice(LoopbackBackend(), mac=MAC)
    with served(dev) as sock, connect(sock, queue_size=4) as session:
        net = NetDriver(session, rx_buffer_size=256)
        net.post_rx()  # four 256-byte buffers: 1024 bytes, the whole ring
        assert exchange(net, [frame(1, 1514)], timeout=0.5) == []
        assert wait_for(lambda: (net.receive(), net.rx_returned)[1] == 4)
        small = frame(2, 300)
        assert [g.frame for g in exchange(net, [small])] == [small]
    assert dev.stats.pairs[0].drops["rx_ring_short"] == 1
    assert "a 1526-byte packet was dropped: the receive buffers offered hold 1024 bytes" in (
        caplog.text
    )


def test_a_packet_that_waited_too_long_is_dropped_when_retried() -> None:
    dev = NetDevice(LoopbackBackend(), mac=MAC)
    with served(dev) as sock, connect(sock) as session:
        dev.rx[0].short_wait = 0.2
        net = NetDriver(session, rx_buffer_size=256)
        net.post_rx(2)
        assert exchange(net, [frame(1, 1514)], timeout=0.4) == []
        assert net.rx_returned == 0
        small = frame(2, 200)
        net.send(small)  # a new packet retries the head one, which has waited long enough
        net.flush()
        got = collect(net, 1)
        assert [g.frame for g in got] == [small]
        assert net.rx_returned == 2
    assert dev.stats.pairs[0].drops["rx_ring_short"] == 1
    assert dev.stats.pairs[0].rx_frames == 1


def test_a_bad_buffer_amid_a_packet_costs_buffers_not_the_packet(
    caplog: pytest.LogCaptureFixture,
) -> None:
    dev = NetDevice(LoopbackBackend(), mac=MAC)
    with served(dev) as sock, connect(sock) as session:
        net = NetDriver(session)
        rx = net.rx_queue
        gpas = [session.alloc(1024) for _ in range(4)]
        tokens = [
            session.submit(rx, [(g, 64)], []) if k == 1 else session.submit(rx, [], [(g, 1024)])
            for k, g in enumerate(gpas)  # the second one is device-readable: no receive buffer
        ]
        session.kick(rx)
        big = frame(1, 1514)
        net.send(big)
        net.flush()
        used: dict[int, int] = {}
        deadline = time.monotonic() + 5
        while len(used) < 4 and time.monotonic() < deadline:
            used.update(session.wait(rx, 0.2))
        assert [used.get(t) for t in tokens] == [0, 0, 1024, 1526 - 1024]
        header, rest = bytes(session.view(gpas[2], 1024)), bytes(session.view(gpas[3], 502))
        assert int.from_bytes(header[10:12], "little") == 2  # num_buffers
        assert header[12:] + rest == big
    drops = dev.stats.pairs[0].drops
    assert drops["rx_readable_buffer"] == 1 and "rx_ring_short" not in drops
    assert "has 64 device-readable bytes; returned unused" in caplog.text
