"""NetDriver against a device side we play with the split ring's device half, on the session's own
memory: transmit framing, receive buffers, MRG_RXBUF merging and malformed receive headers.

(The kernel's vhost-net plays the device in tests/kernel/test_exercise_net.py.)
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from peers.recording import RecordingNet
from pyvhost.driver.net import MAX_FRAME, NetDriver
from pyvhost.driver.session import DriverSession, QueueFullError
from pyvhost.virtio import features as vf
from pyvhost.virtio.chain import DescriptorChain
from pyvhost.virtio.net import HDR_F_DATA_VALID, NetHeader
from pyvhost.virtio.split import SplitQueue

MERGEABLE = vf.bit_mask(vf.F_VERSION_1, vf.NET_F_MRG_RXBUF)
PLAIN = vf.bit_mask(vf.F_VERSION_1)


class Rig:
    def __init__(self, offered: int, rx_buffer_size: int | None = None) -> None:
        self.session = DriverSession.kernel(RecordingNet(offered), num_queues=2, queue_size=16)
        self.net = NetDriver(self.session, rx_buffer_size=rx_buffer_size)
        self.rx, self.tx = (self._device(i) for i in (0, 1))

    def _device(self, index: int) -> SplitQueue:
        q = self.session.queues[index]
        assert q.ring is not None
        return SplitQueue(self.session.mem, q.size, q.ring.desc, q.ring.driver, q.ring.device)

    def pop_rx(self) -> DescriptorChain:
        chain = self.rx.pop()
        assert chain is not None
        return chain

    def deliver(self, chain: DescriptorChain, data: bytes) -> None:
        (buf,) = chain.writable
        buf[: len(data)] = data
        self.rx.push(chain.head, len(data))

    def close(self) -> None:
        self.session.close()


@pytest.fixture
def merged() -> Iterator[Rig]:
    rig = Rig(MERGEABLE, rx_buffer_size=256)
    yield rig
    rig.close()


def test_transmit_puts_header_and_frame_in_one_buffer(merged: Rig) -> None:
    frame = bytes(range(14)) + b"payload" * 30
    merged.net.send(frame, NetHeader(flags=HDR_F_DATA_VALID))
    merged.net.flush()
    chain = merged.tx.pop()
    assert chain is not None and not chain.writable
    data = chain.read_all()
    assert NetHeader.decode(data) == NetHeader(flags=HDR_F_DATA_VALID)
    assert data[12:] == frame
    merged.tx.push(chain.head, 0)
    assert merged.net.reap_tx() == 1
    assert merged.net.tx_in_flight == 0


def test_transmit_queue_full_is_a_clear_error(merged: Rig) -> None:
    for _ in range(16):
        merged.net.send(bytes(60))
    with pytest.raises(QueueFullError, match="transmit queue full"):
        merged.net.send(bytes(60))
    with pytest.raises(ValueError, match="shorter than an Ethernet header"):
        merged.net.send(bytes(13))


def test_receive_merges_buffers_by_num_buffers(merged: Rig) -> None:
    assert merged.net.post_rx() == 16
    frame = bytes((i * 3) & 0xFF for i in range(600))
    first, second, third = (merged.pop_rx() for _ in range(3))
    merged.deliver(first, NetHeader(num_buffers=3).encode() + frame[:244])
    merged.deliver(second, frame[244:500])
    assert merged.net.receive() == [], "a frame is whole only with its last buffer"
    merged.deliver(third, frame[500:])
    (got,) = merged.net.receive()
    assert got.frame == frame
    assert got.buffers == 3 and len(got.addresses) == 3
    assert merged.net.rx_posted == 16, "every used buffer is posted again"


def test_malformed_receive_headers_are_dropped_with_a_reason(merged: Rig) -> None:
    merged.net.post_rx()
    merged.deliver(merged.pop_rx(), NetHeader(num_buffers=0).encode() + bytes(60))
    merged.deliver(merged.pop_rx(), b"\xf0" + bytes(11) + bytes(60))
    merged.deliver(merged.pop_rx(), bytes(5))
    good = NetHeader(num_buffers=1).encode() + b"\x01" * 60
    merged.deliver(merged.pop_rx(), good)
    (got,) = merged.net.receive()
    assert got.frame == b"\x01" * 60
    assert len(merged.net.rx_errors) == 3
    assert "num_buffers 0" in merged.net.rx_errors[0]
    assert "flags 0xf0" in merged.net.rx_errors[1]
    assert "5 bytes, need 12" in merged.net.rx_errors[2]


def test_overlong_used_length_is_refused(merged: Rig) -> None:
    merged.net.post_rx()
    chain = merged.pop_rx()
    merged.rx.push(chain.head, 4096)
    assert merged.net.receive() == []
    assert "wrote 4096 bytes into a 256-byte buffer" in merged.net.rx_errors[0]


def test_without_mrg_rxbuf_a_buffer_holds_a_whole_frame() -> None:
    rig = Rig(PLAIN)
    try:
        assert rig.net.rx_buffer_size == 12 + MAX_FRAME
        rig.net.post_rx(1)
        frame = b"\x07" * MAX_FRAME
        # num_buffers is ignored without MRG_RXBUF
        rig.deliver(rig.pop_rx(), NetHeader(num_buffers=0).encode() + frame)
        (got,) = rig.net.receive()
        assert got.frame == frame
        with pytest.raises(ValueError, match="MRG_RXBUF was not negotiated"):
            NetDriver(rig.session, rx_buffer_size=1024)
    finally:
        rig.close()
