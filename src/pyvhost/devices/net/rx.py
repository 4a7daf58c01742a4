"""Receive: packets for the guest wait in a bounded backlog and go into receive buffers.

Buffers are popped only when a packet is there to fill them, and every popped buffer is pushed
back in the same call (filled, or empty when it cannot be used), so the device never holds a
receive chain: stopping the ring never waits for it. With MRG_RXBUF a packet spans as many
buffers as it needs and the first one's header says how many (``num_buffers``); without it one
buffer must hold the whole packet. Writes go through the chain's views and ``push`` reports
their length, which is what the ring's dirty logging marks.
"""

from __future__ import annotations

from collections import deque

from pyvhost.devices.net.stats import Complaints, PairStats
from pyvhost.virtio.chain import DescriptorChain
from pyvhost.virtio.queue import DeviceQueue

__all__ = ["BACKLOG", "RxPath"]

BACKLOG = 256
"""Packets that may wait for receive buffers on one pair; more are dropped (and counted)."""

_NUM_BUFFERS_AT = 10
"""Offset of ``num_buffers`` in the 12-byte header."""


class RxPath:
    """One receive queue's backlog and the filling of its buffers."""

    def __init__(
        self, index: int, stats: PairStats, complain: Complaints, backlog: int = BACKLOG
    ) -> None:
        self.index = index
        self.stats = stats
        self.complain = complain
        self.limit = backlog
        self.backlog: deque[bytes] = deque()

    def enqueue(self, packet: bytes) -> bool:
        """Keep ``packet`` (header + frame) for the guest; False (dropped, counted) when full."""
        if len(self.backlog) >= self.limit:
            self.stats.drop("rx_backlog_full")
            return False
        self.backlog.append(packet)
        return True

    def clear(self) -> None:
        """Forget waiting packets (the driver reset the device): they are counted as dropped."""
        n = len(self.backlog)
        self.backlog.clear()
        if n:
            self.stats.drop("rx_reset", n)

    def deliver(self, queue: DeviceQueue, hdr_size: int, mergeable: bool) -> bool:
        """Fill buffers with waiting packets; True when the backlog is empty (nothing to do until
        more packets come), False when the ring ran out of buffers first."""
        done: list[tuple[int, int]] = []
        try:
            while self.backlog:
                if not self._one(queue, self.backlog[0], hdr_size, mergeable, done):
                    return False
                self.backlog.popleft()
            return True
        finally:
            if done:
                queue.push_batch(done)

    def _one(
        self,
        queue: DeviceQueue,
        packet: bytes,
        hdr_size: int,
        mergeable: bool,
        done: list[tuple[int, int]],
    ) -> bool:
        """Put one packet in buffers; False if the ring is empty (the packet stays waiting)."""
        chains: list[DescriptorChain] = []
        room = 0
        need = len(packet)
        while room < need and (mergeable or not chains):
            chain = queue.pop()
            if chain is None:
                break
            if not self._usable(chain, hdr_size, done):
                continue
            chains.append(chain)
            room += chain.write_len
        if not chains:
            return False
        if room < need:
            done.extend((c.head, 0) for c in chains)
            reason = "rx_ring_short" if mergeable else "rx_buffer_too_small"
            self.stats.drop(reason)
            self.complain(
                reason,
                f"queue {self.index}: a {need}-byte packet was dropped: the receive buffers "
                f"offered hold {room} bytes"
                + ("" if mergeable else " (one buffer per packet without MRG_RXBUF)"),
            )
            return True
        self._fill(chains, packet, hdr_size, done)
        self.stats.rx_frames += 1
        self.stats.rx_bytes += need - hdr_size
        return True

    def _usable(self, chain: DescriptorChain, hdr_size: int, done: list[tuple[int, int]]) -> bool:
        """A receive buffer must be device-writable only and hold at least a header."""
        if chain.read_len == 0 and chain.write_len >= hdr_size:
            return True
        done.append((chain.head, 0))
        if chain.read_len:
            kind, why = "rx_readable_buffer", f"has {chain.read_len} device-readable bytes"
        else:
            kind, why = "rx_short_buffer", f"holds {chain.write_len} bytes, less than a header"
        self.stats.drop(kind)
        self.complain(
            kind,
            f"queue {self.index}: receive buffer {chain.head} {why}; returned unused",
        )
        return False

    @staticmethod
    def _fill(
        chains: list[DescriptorChain], packet: bytes, hdr_size: int, done: list[tuple[int, int]]
    ) -> None:
        view = memoryview(packet)
        offset = 0
        for chain in chains:
            n = chain.write_at(0, view[offset : offset + chain.write_len])
            done.append((chain.head, n))
            offset += n
        if hdr_size > _NUM_BUFFERS_AT:
            chains[0].write_at(_NUM_BUFFERS_AT, len(chains).to_bytes(2, "little"))
