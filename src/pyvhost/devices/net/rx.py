"""Receive: packets for the guest wait in a bounded backlog and go into receive buffers.

Buffers are popped only when a packet is there to fill them, and every popped buffer is pushed
back in the same call (filled, or empty when it cannot be used), so the device never holds a
receive chain: stopping the ring never waits for it. With MRG_RXBUF a packet spans as many
buffers as it needs and the first one's header says how many (``num_buffers``); when the ring
runs out in the middle of a packet the buffers taken for it are given back (``unpop``) with a
kick armed for more, and the packet waits, as QEMU's virtio-net does, for at most
:data:`SHORT_WAIT` (at once dropped when it needs more than the whole ring). Without MRG_RXBUF one
buffer must hold the whole packet. Writes go through the chain's views and ``push`` reports
their length, which is what the ring's dirty logging marks.
"""

from __future__ import annotations

import time
from collections import deque

from pyvhost.devices.net.stats import Complaints, PairStats
from pyvhost.virtio.chain import DescriptorChain
from pyvhost.virtio.queue import DeviceQueue

__all__ = ["BACKLOG", "SHORT_WAIT", "RxPath"]

BACKLOG = 256
"""Packets that may wait for receive buffers on one pair; more are dropped (and counted)."""

SHORT_WAIT = 1.0
"""Seconds a packet that needs more receive buffers than the ring offers may wait for the driver
to add some (it is retried on every kick and every new packet) before it is dropped."""

_TAKEN, _EMPTY, _SHORT = object(), object(), object()

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
        self.short_wait = SHORT_WAIT
        self.short_since: float | None = None
        """When the head packet first found the ring short of buffers (None: it has not)."""

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
        self.short_since = None
        if n:
            self.stats.drop("rx_reset", n)

    def deliver(self, queue: DeviceQueue, hdr_size: int, mergeable: bool) -> bool:
        """Fill buffers with waiting packets; True when there is nothing to do until an event
        (the backlog is empty, or the head packet waits for more buffers with a kick armed),
        False when the ring ran out of buffers (the caller re-enables kicks and looks again)."""
        done: list[tuple[int, int]] = []
        try:
            while self.backlog:
                outcome = self._one(queue, self.backlog[0], hdr_size, mergeable, done)
                if outcome is not _TAKEN:
                    return outcome is _SHORT
                self.backlog.popleft()
                self.short_since = None
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
    ) -> object:
        """Put one packet in buffers: :data:`_TAKEN` (delivered, or dropped and counted),
        :data:`_EMPTY` (no buffer at all) or :data:`_SHORT` (buffers given back until more)."""
        need = len(packet)
        while True:
            chains, room, ran_out = self._gather(queue, need, hdr_size, mergeable, done)
            if not chains:
                return _EMPTY
            if room >= need:
                self._fill(chains, packet, hdr_size, done)
                self.stats.rx_frames += 1
                self.stats.rx_bytes += need - hdr_size
                return _TAKEN
            if not (mergeable and ran_out) or self._hopeless(queue, chains):
                self._drop_short(chains, need, room, mergeable, done)
                return _TAKEN
            if self.short_since is None:
                self.short_since = time.monotonic()
            if not queue.unpop(chains):
                return _SHORT

    def _gather(
        self,
        queue: DeviceQueue,
        need: int,
        hdr_size: int,
        mergeable: bool,
        done: list[tuple[int, int]],
    ) -> tuple[list[DescriptorChain], int, bool]:
        """Pop buffers for ``need`` bytes (one without MRG_RXBUF): the usable ones, the room
        they hold, and whether the ring ran out first. They are always the last ones popped."""
        chains: list[DescriptorChain] = []
        room = 0
        while room < need and (mergeable or not chains):
            chain = queue.pop()
            if chain is None:
                return chains, room, True
            if self._usable(chain, hdr_size, done):
                chains.append(chain)
                room += chain.write_len
            elif chains:  # a bad buffer amid this packet's: those before it go back unused
                done.extend((c.head, 0) for c in chains)
                chains, room = [], 0
        return chains, room, False

    def _hopeless(self, queue: DeviceQueue, chains: list[DescriptorChain]) -> bool:
        """Whether waiting for more buffers is pointless: these fill the whole ring, or the
        packet has waited :data:`SHORT_WAIT` seconds already."""
        since = self.short_since
        return len(chains) >= queue.size or (
            since is not None and time.monotonic() - since >= self.short_wait
        )

    def _drop_short(
        self,
        chains: list[DescriptorChain],
        need: int,
        room: int,
        mergeable: bool,
        done: list[tuple[int, int]],
    ) -> None:
        done.extend((c.head, 0) for c in chains)
        reason = "rx_ring_short" if mergeable else "rx_buffer_too_small"
        self.stats.drop(reason)
        self.complain(
            reason,
            f"queue {self.index}: a {need}-byte packet was dropped: the receive buffers "
            f"offered hold {room} bytes"
            + (
                f" (the whole ring, or all it offered in {self.short_wait:g} s)"
                if mergeable
                else " (one buffer per packet without MRG_RXBUF)"
            ),
        )

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
