"""pyvhost's device framework (Daemon, DeviceAdapter, event loop, split and packed device rings)
under DPDK's virtio-user front-end: testpmd's net_virtio_user port sends frames to a minimal net
device written here, and what the device counts must match testpmd's counters."""

from __future__ import annotations

import os
import struct
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from pathlib import Path

import pytest

from peers.dpdk import DEFAULT_PEER_MAC, require_testpmd, virtio_user_frontend
from pyvhost.daemon import Daemon, Device
from pyvhost.daemon.device import BATCH, DEFAULT_RING_FEATURES
from pyvhost.virtio import features as vf
from pyvhost.virtio.chain import DescriptorChain
from pyvhost.virtio.memory import GuestMemory
from pyvhost.virtio.net import NetHeader, header_size
from pyvhost.virtio.queue import DeviceQueue

pytestmark = pytest.mark.dpdk

RX, TX = 0, 1
PORT_MAC = "02:70:76:68:00:09"
TXONLY_LEN = 64
"""testpmd's txonly frame length (``--txpkts`` not given)."""
BURST = 32
"""testpmd's default burst: ``start tx_first N`` sends N of them."""


def mac_bytes(text: str) -> bytes:
    return bytes.fromhex(text.replace(":", ""))


class LoopbackNet(Device):
    """Just enough virtio-net for testpmd's virtio_user port: counts every frame on the transmit
    queue by (destination, source, length) and, with ``loop``, puts it in a receive buffer.

    Receive buffers are popped as they come and held until a frame needs one. pyvhost's daemon
    waits for every popped chain when a ring stops, so :meth:`release_rx` hands the held ones
    back (empty) before the front-end stops the rings; testpmd has stopped reading by then.
    """

    device_id = 1
    num_queues = 2
    queue_size = 256

    def __init__(self, *, loop: bool, packed: bool = False, mergeable: bool = False) -> None:
        self.loop = loop
        self.ring_features = DEFAULT_RING_FEATURES | (
            vf.bit_mask(vf.F_RING_PACKED) if packed else 0
        )
        self.device_features = vf.bit_mask(vf.NET_F_MRG_RXBUF) if mergeable else 0
        self.negotiated = 0
        """The virtio features testpmd acknowledged, kept after it leaves."""
        self.tx_frames = 0
        self.tx_bytes = 0
        self.kinds: Counter[tuple[bytes, bytes, int]] = Counter()
        self.looped = 0
        self.dropped = 0
        self._rx: deque[DescriptorChain] = deque()
        self._rx_queue: DeviceQueue | None = None
        self._release_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._released = threading.Event()
        self.watch(self._release_fd, self._release, queue=RX)

    def config_bytes(self) -> bytes:
        return mac_bytes(PORT_MAC) + struct.pack("<HHH", 1, 1, 1500)

    def handle_queue(self, index: int, queue: DeviceQueue, mem: GuestMemory) -> None:
        self.negotiated = self.acked_features
        if index == RX:
            self._rx_queue = queue
            self._rx.extend(queue.pop_batch(queue.size))
            return
        hdr = header_size(self.acked_features)
        delivered: list[tuple[int, int]] = []
        while chains := queue.pop_batch(BATCH):
            for chain in chains:
                frame = chain.read_all()[hdr:]
                self.tx_frames += 1
                self.tx_bytes += len(frame)
                self.kinds[frame[0:6], frame[6:12], len(frame)] += 1
                if self.loop:
                    self._loop_back(frame, hdr, delivered)
            queue.push_batch([(c.head, 0) for c in chains])
        rx = self._rx_queue
        if delivered and rx is not None:
            rx.push_batch(delivered)
            if rx.needs_notification():
                self.notify(RX)

    def _loop_back(self, frame: bytes, hdr: int, delivered: list[tuple[int, int]]) -> None:
        if not self._rx:
            self.dropped += 1
            return
        chain = self._rx.popleft()
        delivered.append(
            (chain.head, chain.write_at(0, NetHeader(num_buffers=1).encode(hdr) + frame))
        )
        self.looped += 1

    def _release(self, fd: int) -> None:
        os.eventfd_read(fd)
        if self._rx_queue is not None and self._rx:
            self._rx_queue.push_batch([(c.head, 0) for c in self._rx])
        self._rx.clear()
        self._released.set()

    def release_rx(self, timeout: float = 5) -> None:
        """Give back the held receive buffers, on the receive queue's worker thread."""
        os.eventfd_write(self._release_fd, 1)
        assert self._released.wait(timeout), "receive buffers not released"

    def on_reset(self) -> None:
        self._rx.clear()
        self._rx_queue = None

    def close(self) -> None:
        self.unwatch(self._release_fd)
        os.close(self._release_fd)


def wait_for(what: str, done: Callable[[], bool], timeout: float = 10) -> None:
    """Poll ``done()`` until true; fail naming ``what``."""
    deadline = time.monotonic() + timeout
    while not done():
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not within {timeout} s")
        time.sleep(0.01)


@pytest.fixture
def sock(peer_dir: Path) -> Path:
    require_testpmd()
    return peer_dir / "net.sock"


@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
def test_txonly_frames_are_all_counted_by_the_device(
    peer_dir: Path, sock: Path, packed: bool
) -> None:
    device = LoopbackNet(loop=False, packed=packed)
    with Daemon(device, sock).run_in_thread():
        with virtio_user_frontend(
            peer_dir, sock, packed=packed, mac=PORT_MAC, forward_mode="txonly"
        ) as pmd:
            assert pmd.mac() == mac_bytes(PORT_MAC)
            pmd.start_forwarding()
            wait_for("10000 frames at the device", lambda: device.tx_frames >= 10000)
            fwd = pmd.stop_forwarding()[0]
            stats = pmd.stats()
            wait_for(
                f"the device to count {stats.opackets} frames (has {device.tx_frames})",
                lambda: device.tx_frames == stats.opackets,
            )
            device.release_rx()
        device.close()

    assert vf.has_bit(device.negotiated, vf.F_RING_PACKED) == packed
    assert device.tx_bytes == stats.obytes == TXONLY_LEN * stats.opackets
    assert fwd.tx_packets == stats.opackets
    assert stats.oerrors == 0
    assert device.kinds == {
        (mac_bytes(DEFAULT_PEER_MAC), mac_bytes(PORT_MAC), TXONLY_LEN): stats.opackets
    }


@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
@pytest.mark.parametrize("mergeable", [True, False], ids=["mrg_rxbuf", "no_mrg_rxbuf"])
def test_frames_looped_back_reach_testpmd(
    peer_dir: Path, sock: Path, packed: bool, mergeable: bool
) -> None:
    bursts = 4
    sent = bursts * BURST
    device = LoopbackNet(loop=True, packed=packed, mergeable=mergeable)
    with Daemon(device, sock).run_in_thread():
        with virtio_user_frontend(
            peer_dir, sock, packed=packed, mac=PORT_MAC, forward_mode="rxonly"
        ) as pmd:
            pmd.start_forwarding(tx_first=bursts)
            stats = pmd.wait_stats(lambda s: s.ipackets >= sent)
            fwd = pmd.stop_forwarding()[0]
            device.release_rx()
        device.close()

    assert vf.has_bit(device.negotiated, vf.F_RING_PACKED) == packed
    assert vf.has_bit(device.negotiated, vf.NET_F_MRG_RXBUF) == mergeable
    assert (device.tx_frames, device.looped, device.dropped) == (sent, sent, 0)
    assert (stats.opackets, stats.ipackets) == (sent, sent)
    assert stats.ibytes == stats.obytes == sent * TXONLY_LEN
    assert (stats.ierrors, stats.imissed, stats.rx_nombuf) == (0, 0, 0)
    assert (fwd.rx_packets, fwd.rx_dropped) == (sent, 0)
