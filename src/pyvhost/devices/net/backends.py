"""Where the net device's frames go and come from: a TAP, a loopback, or a sink.

A back end knows nothing of rings: it takes a transmitted packet (virtio-net header then frame,
as guest-memory pieces) and, for a TAP, gives received packets in the same form. The header
size and offloads follow the features the driver acked (:meth:`NetBackend.configure`).
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Sequence

from pyvhost.devices.net.config import OFFLOAD_FEATURES
from pyvhost.kernel.tap import Tap, offload_flags
from pyvhost.virtio import features as vf

__all__ = [
    "BACKENDS",
    "READ_SIZE",
    "LoopbackBackend",
    "NetBackend",
    "SinkBackend",
    "TapBackend",
    "apply_mtu",
    "interface_exists",
    "tun_offloads",
]

log = logging.getLogger("pyvhost.devices.net")

READ_SIZE = 65536 + 64
"""Enough for the largest GSO frame a TAP hands out (64 KiB) and its virtio-net header."""


def interface_exists(name: str) -> bool:
    """Whether this network namespace has an interface ``name`` (``/sys/class/net`` may show
    another namespace's, after ``unshare -n`` without a fresh sysfs)."""
    try:
        socket.if_nametoindex(name)
    except OSError:
        return False
    return True


def apply_mtu(tap: Tap, mtu: int, owned: bool) -> None:
    """Give the TAP the MTU the guest is offered: set on a TAP this process created (it is
    ours), only compared on one it attached to (the host's), with a warning when it is lower."""
    current = tap.mtu
    if current == mtu:
        return
    if owned:
        tap.set_mtu(mtu)
        log.info("TAP %s: MTU %d", tap.name, mtu)
    elif current < mtu:
        log.warning(
            "TAP %s has MTU %d, below the guest's %d: larger frames from the guest may be "
            "dropped on the host (ip link set %s mtu %d)",
            tap.name,
            current,
            mtu,
            tap.name,
            mtu,
        )
    else:
        log.info("TAP %s keeps its MTU %d (the guest's is %d)", tap.name, current, mtu)


def tun_offloads(features: int) -> int:
    """TUNSETOFFLOAD flags for what the driver takes on receive (its GUEST_* features), keeping
    the kernel's rules: segmentation needs checksum offload, ECN needs TSO4 or TSO6."""
    csum = vf.has_bit(features, vf.NET_F_GUEST_CSUM)
    tso4 = csum and vf.has_bit(features, vf.NET_F_GUEST_TSO4)
    tso6 = csum and vf.has_bit(features, vf.NET_F_GUEST_TSO6)
    return offload_flags(
        csum=csum,
        tso4=tso4,
        tso6=tso6,
        ecn=(tso4 or tso6) and vf.has_bit(features, vf.NET_F_GUEST_ECN),
        ufo=csum and vf.has_bit(features, vf.NET_F_GUEST_UFO),
    )


class NetBackend:
    """The host side of the device. The default is a sink: frames sent are consumed."""

    kind = "sink"
    features = 0
    """Device feature bits this back end adds to the offer (offloads)."""
    loops_back = False
    """Frames the guest transmits come back on the same pair's receive queue."""

    def __init__(self, pairs: int = 1) -> None:
        self.pairs = pairs

    @property
    def name(self) -> str:
        return self.kind

    @property
    def wants_views(self) -> bool:
        """Whether :meth:`transmit_batch` looks at the packets. False for a sink (neither
        transmit method overridden): the transmit path then hands it nothing and only counts."""
        cls = type(self)
        return (
            cls.transmit is not NetBackend.transmit
            or cls.transmit_batch is not NetBackend.transmit_batch
        )

    def fds(self) -> list[int]:
        """One fd per queue pair, readable when frames from the host wait (none: no host side)."""
        return []

    def transmit(self, pair: int, packet: Sequence[memoryview]) -> None:
        """Send one packet (header + frame); an OSError is a drop the caller counts."""

    def transmit_batch(
        self, pair: int, packets: Sequence[Sequence[memoryview]]
    ) -> list[tuple[int, OSError]]:
        """Send several packets in order; the ``(index, error)`` of each one refused.

        The default sends each with :meth:`transmit`, and consumes them without a call when
        :meth:`transmit` is this class's own (a sink: nothing per packet)."""
        transmit = self.transmit
        if type(self).transmit is NetBackend.transmit:
            return []
        refused: list[tuple[int, OSError]] = []
        for k, packet in enumerate(packets):
            try:
                transmit(pair, packet)
            except OSError as exc:
                refused.append((k, exc))
        return refused

    def read(self, pair: int) -> bytes | None:
        """One packet (header + frame) from the host for ``pair``, or None when none waits."""
        return None

    def configure(self, hdr_size: int, offloads: int) -> None:
        """The header size of the packets and the TUN_F_* offloads the driver can take."""

    def set_attached(self, pair: int, attached: bool) -> None:
        """Whether frames from the host may be steered to ``pair`` (a multiqueue TAP's queue)."""

    def announce(self, packet: bytes) -> bool:
        """Send ``packet`` to the network (a RARP after migration); False where there is none."""
        return False

    def set_mtu(self, mtu: int) -> None:
        """The MTU the guest is offered changed (NET_SET_MTU); nothing where there is no link."""

    def close(self) -> None:
        """Release what the back end holds."""


class SinkBackend(NetBackend):
    """Transmitted frames are counted and consumed; nothing is ever received."""


class LoopbackBackend(NetBackend):
    """Every frame the guest transmits is received back on the same queue pair."""

    kind = "loopback"
    loops_back = True


class TapBackend(NetBackend):
    """A TAP interface, created or attached, with one queue per pair (IFF_MULTI_QUEUE above one).

    The TAP carries the same virtio-net header as the rings (IFF_VNET_HDR with the ring's header
    size), so packets pass between guest memory and the TAP unchanged.
    """

    kind = "tap"
    features = OFFLOAD_FEATURES

    def __init__(self, name: str, pairs: int = 1, mtu: int | None = None) -> None:
        super().__init__(pairs)
        existed = interface_exists(name)
        self.owned = not existed
        """Whether this back end created the TAP (then its MTU and link state are ours to set)."""
        self.tap = Tap.open(name, queues=pairs)
        self._hdr_size = 12
        self._offloads = 0
        self._attached = [True] * pairs
        log.info(
            "TAP %s %s, %d queue(s)", self.tap.name, "attached" if existed else "created", pairs
        )
        try:
            if mtu is not None:
                apply_mtu(self.tap, mtu, self.owned)
            if self.owned:
                self.tap.set_up()
        except BaseException:
            self.tap.close()
            raise

    @property
    def name(self) -> str:
        return f"tap {self.tap.name}"

    def fds(self) -> list[int]:
        return list(self.tap.fds)

    def transmit(self, pair: int, packet: Sequence[memoryview]) -> None:
        os.writev(self.tap.fds[pair], packet)

    def transmit_batch(
        self, pair: int, packets: Sequence[Sequence[memoryview]]
    ) -> list[tuple[int, OSError]]:
        """One ``writev`` per packet (a TAP takes one packet per write), no call in between."""
        fd = self.tap.fds[pair]
        writev = os.writev
        refused: list[tuple[int, OSError]] = []
        for k, packet in enumerate(packets):
            try:
                writev(fd, packet)
            except OSError as exc:
                refused.append((k, exc))
        return refused

    def read(self, pair: int) -> bytes | None:
        try:
            return os.read(self.tap.fds[pair], READ_SIZE)
        except BlockingIOError:
            return None

    def configure(self, hdr_size: int, offloads: int) -> None:
        if hdr_size != self._hdr_size:
            self.tap.set_vnet_hdr_size(hdr_size)
            self._hdr_size = hdr_size
        if offloads != self._offloads:
            self.tap.set_offload(offloads)
            self._offloads = offloads
            log.info("TAP %s: offloads %#x (TUN_F_*)", self.tap.name, offloads)

    def set_attached(self, pair: int, attached: bool) -> None:
        if self.pairs == 1 or self._attached[pair] == attached:
            return
        self.tap.set_queue_attached(pair, attached)
        self._attached[pair] = attached

    def announce(self, packet: bytes) -> bool:
        os.write(self.tap.fds[0], packet)
        return True

    def set_mtu(self, mtu: int) -> None:
        apply_mtu(self.tap, mtu, self.owned)

    def close(self) -> None:
        self.tap.close()


BACKENDS = {"loopback": LoopbackBackend, "sink": SinkBackend}
"""The back ends ``--backend`` names (a TAP is ``--tap NAME``)."""
