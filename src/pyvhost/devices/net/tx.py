"""Transmit: every chain of a transmit queue is checked, handed to the back end (or looped back
to the pair's receive backlog) and completed with nothing written.

What a driver can get wrong is checked before anything is sent, each with its own reason in the
log and in the drop counters: a chain with device-writable buffers, one shorter than the header
and an Ethernet header, one longer than any frame, a header with unknown bits or asking for an
offload the driver did not negotiate.
"""

from __future__ import annotations

from pyvhost.devices.net.backends import NetBackend
from pyvhost.devices.net.rx import RxPath
from pyvhost.devices.net.stats import Complaints, PairStats
from pyvhost.errors import ProtocolError
from pyvhost.virtio import features as vf
from pyvhost.virtio.chain import DescriptorChain
from pyvhost.virtio.columns import ReadColumns, gather
from pyvhost.virtio.net import (
    ETH_HEADER_LEN,
    GSO_ECN,
    GSO_NONE,
    GSO_TCPV4,
    GSO_TCPV6,
    GSO_UDP,
    HDR_F_NEEDS_CSUM,
    NetHeader,
)
from pyvhost.virtio.queue import DeviceQueue
from pyvhost.virtio.split import SplitQueue

__all__ = ["BATCH", "MAX_PACKET", "TxPath", "check_header"]

BATCH = 64
MAX_PACKET = 65535 + ETH_HEADER_LEN + 4
"""The largest frame (a 64 KiB GSO packet, Ethernet header, a VLAN tag) after the header."""

_GSO_FEATURE = {
    GSO_TCPV4: vf.NET_F_HOST_TSO4,
    GSO_TCPV6: vf.NET_F_HOST_TSO6,
    GSO_UDP: vf.NET_F_HOST_UFO,
}


def check_header(header: NetHeader, features: int) -> str | None:
    """Why a transmit header asks for what the driver did not negotiate, or None if it may."""
    if header.flags & HDR_F_NEEDS_CSUM and not vf.has_bit(features, vf.NET_F_CSUM):
        return "NEEDS_CSUM without VIRTIO_NET_F_CSUM"
    gso = header.gso_type & ~GSO_ECN
    if gso != GSO_NONE:
        bit = _GSO_FEATURE.get(gso)
        if bit is None:
            return f"gso_type {header.gso_type:#x}, a segmentation this device does not offer"
        if not vf.has_bit(features, bit):
            name = vf.DEVICE_FEATURES["net"][bit]
            return f"gso_type {header.gso_type:#x} without VIRTIO_NET_F_{name}"
        if header.gso_type & GSO_ECN and not vf.has_bit(features, vf.NET_F_HOST_ECN):
            return "GSO_ECN without VIRTIO_NET_F_HOST_ECN"
    return None


class TxPath:
    """One transmit queue: packets to the back end, or back to the pair's receive backlog.

    The ring is worked in batches: every available chain per wake-up (``pop_batch`` of the
    ring's size), the checks of an ordinary chain inline (its header's flags and GSO type looked
    up in the set of those already found valid for these features, without a header object),
    the packets handed to the back end in one :meth:`~NetBackend.transmit_batch`, the counters
    added once and the used entries published in one ``push_batch``. Anything unusual (a bad
    chain, a header not seen before, a header split across buffers) takes :meth:`_accept`, which
    checks and reports it in full.

    On a split ring (not to a loopback) a batch of one-descriptor packets in one memory region
    comes as columns instead (:meth:`_columns`): no chain object or view per packet, the checks
    made for the whole batch, nothing handed to a sink; anything else falls back to the above.
    """

    def __init__(
        self,
        index: int,
        backend: NetBackend,
        rx: RxPath,
        stats: PairStats,
        complain: Complaints,
    ) -> None:
        self.index = index
        self.pair = index // 2
        self.backend = backend
        self.rx = rx
        self.stats = stats
        self.complain = complain
        self._valid_headers: set[int] = set()
        """``flags | gso_type << 8`` of headers :func:`check_header` accepted for ..."""
        self._valid_for: tuple[int, int] | None = None
        """... these ``(features, hdr_size)``."""
        self._views = backend.wants_views
        """The back end looks at the packets (else the columns path hands it none)."""

    def process(self, queue: DeviceQueue, hdr_size: int, features: int) -> int:
        """Send every available chain; returns how many packets went to the receive backlog."""
        if self._valid_for != (features, hdr_size):
            self._valid_headers = set()
            self._valid_for = (features, hdr_size)
        batch = max(queue.size, BATCH)
        if isinstance(queue, SplitQueue) and not self.backend.loops_back:
            self._process_columns(queue, batch, hdr_size, features)
            return 0
        looped = 0
        while chains := queue.pop_batch(batch):
            looped += self._batch(chains, hdr_size, features)
            queue.push_batch([(c.head, 0) for c in chains])
        return looped

    def _process_columns(self, queue: SplitQueue, batch: int, hdr_size: int, features: int) -> None:
        """The split ring's fast path: a batch whose chains are all one readable descriptor
        comes as columns (:meth:`SplitQueue.pop_columns`) and is completed with one
        ``push_heads``; any other batch is popped as chains and goes through :meth:`_batch`."""
        while True:
            columns = queue.pop_columns(batch)
            if columns is None:
                chains = queue.pop_batch(batch)
                if not chains:
                    return
                self._batch(chains, hdr_size, features)
                queue.push_batch([(c.head, 0) for c in chains])
                continue
            if not columns.heads:
                return
            self._columns(columns, hdr_size, features)
            queue.push_heads(columns.heads)

    def _columns(self, columns: ReadColumns, hdr_size: int, features: int) -> None:
        """Check and send a batch of one-buffer packets given as columns.

        The checks of :meth:`_batch`'s inline path, made for the whole run at once: every
        length within bounds, every header's flags and GSO type among those already accepted.
        A sink is handed nothing (only counted); other back ends get one view per packet. A
        batch that fails a check goes through :meth:`_batch` as chains, which sorts it out one
        by one.
        """
        if not (
            hdr_size + ETH_HEADER_LEN <= columns.min_len
            and columns.max_len <= hdr_size + MAX_PACKET
            and self._known_headers(columns)
        ):
            self._batch(columns.chains(), hdr_size, features)
            return
        n = len(columns.heads)
        lengths = columns.lengths
        total = sum(lengths)
        sent = n
        if self._views:
            refused = self.backend.transmit_batch(self.pair, columns.buffers())
            for k, exc in refused:
                total -= lengths[k]
                self._refused(lengths[k], exc)
            sent -= len(refused)
        stats = self.stats
        stats.tx_frames += sent
        stats.tx_bytes += total - sent * hdr_size

    def _known_headers(self, columns: ReadColumns) -> bool:
        """Whether every packet's header flags and GSO type (its first two bytes) are among
        those already accepted: two gathers from the region, no object per packet."""
        get = gather(columns.offsets)
        region = columns.region
        flags = get(region)
        gso = get(region[1:])
        valid = self._valid_headers
        n = len(flags)
        if flags.count(0) == n and gso.count(0) == n:
            return 0 in valid
        return all(f | g << 8 in valid for f, g in set(zip(flags, gso, strict=True)))

    def _refused(self, length: int, exc: OSError) -> None:
        """The back end refused a ``length``-byte packet: a drop, counted and logged."""
        self.stats.drop("tx_backend_error")
        self.complain(
            "tx_backend_error",
            f"queue {self.index}: {self.backend.name} refused a {length}-byte packet: {exc}",
        )

    def _batch(self, chains: list[DescriptorChain], hdr_size: int, features: int) -> int:
        """Check and send one batch; returns how many packets were looped back."""
        shortest = hdr_size + ETH_HEADER_LEN
        longest = hdr_size + MAX_PACKET
        valid = self._valid_headers
        good: list[DescriptorChain] = []
        keep = good.append
        accept = self._accept
        total = 0
        for chain in chains:
            n = chain.read_len
            if not chain.write_len and shortest <= n <= longest:
                first = chain.readable[0]
                if len(first) >= 2 and (first[0] | first[1] << 8) in valid:
                    keep(chain)
                    total += n
                    continue
            if accept(chain, hdr_size, features):
                keep(chain)
                total += n
        if not good:
            return 0
        stats = self.stats
        if self.backend.loops_back:
            enqueue = self.rx.enqueue
            pad = bytes(hdr_size)
            looped = 0
            for chain in good:
                looped += enqueue(pad + chain.read_at(hdr_size, chain.read_len - hdr_size))
            stats.tx_frames += len(good)
            stats.tx_bytes += total - len(good) * hdr_size
            return looped
        refused = self.backend.transmit_batch(self.pair, [c.readable for c in good])
        for k, exc in refused:
            length = good[k].read_len
            total -= length
            self._refused(length, exc)
        sent = len(good) - len(refused)
        stats.tx_frames += sent
        stats.tx_bytes += total - sent * hdr_size
        return 0

    def _accept(self, chain: DescriptorChain, hdr_size: int, features: int) -> bool:
        """The full check of one chain: True if it may be sent; else dropped, counted, logged.
        A valid header's flags and GSO type join the set the fast path accepts."""
        problem = self._check(chain, hdr_size, features)
        if problem is not None:
            kind, why = problem
            self.stats.drop(kind)
            self.complain(kind, f"queue {self.index}: transmit chain {chain.head} dropped: {why}")
            return False
        first = chain.readable[0]
        if len(first) >= 2:
            self._valid_headers.add(first[0] | first[1] << 8)
        return True

    @staticmethod
    def _check(chain: DescriptorChain, hdr_size: int, features: int) -> tuple[str, str] | None:
        if chain.write_len:
            return "tx_writable", f"{chain.write_len} device-writable bytes in a transmit chain"
        if chain.read_len < hdr_size + ETH_HEADER_LEN:
            return (
                "tx_short",
                f"{chain.read_len} bytes, shorter than the {hdr_size}-byte header and an "
                "Ethernet header",
            )
        if chain.read_len > hdr_size + MAX_PACKET:
            return (
                "tx_too_long",
                f"{chain.read_len} bytes, longer than the header and the largest frame "
                f"({MAX_PACKET} bytes)",
            )
        try:
            header = NetHeader.decode(chain.read_at(0, hdr_size), hdr_size)
        except ProtocolError as exc:
            return "tx_bad_header", str(exc)
        why = check_header(header, features)
        return None if why is None else ("tx_bad_header", why)
