"""virtio-net for a vhost-user front-end, with the kernel's vhost-net as the data path.

The daemon speaks vhost-user; the rings it is given are handed to ``/dev/vhost-net``: the memory
table as this process's own mappings of the front-end's regions, the ring areas translated in
them, the kick and call eventfds as they came, the TAP as the backend. No frame passes through
Python. Dirty logging (the front-end's log mapped here and handed on, rings re-addressed with
their log flag), a stopped ring's position (GET_VRING_BASE from the kernel) and a new front-end
(a fresh kernel session) go through the same hooks as any device's.

One queue pair (ring 0 receive, ring 1 transmit). The TAP carries the 12-byte virtio-net header
(IFF_VNET_HDR), so the kernel passes headers through unchanged and
VHOST_NET_F_VIRTIO_NET_HDR is not offered. The config space is the front-end's (QEMU emulates
virtio-net's config for vhost-user-net itself).
"""

from __future__ import annotations

import logging
import os

from pyvhost.devices.net.backends import apply_mtu
from pyvhost.devices.net.rarp import rarp_frame
from pyvhost.errors import UnsupportedRequestError
from pyvhost.kernel.devices import VHOST_NET_F_VIRTIO_NET_HDR, VhostNet
from pyvhost.kernel.tap import Tap
from pyvhost.user.device import BackendDevice, VringNotifier
from pyvhost.user.protocol import BASE_PROTOCOL_FEATURES, ProtocolFeature
from pyvhost.virtio import features as vf
from pyvhost.virtio.memory import DirtyLog, GuestMemory
from pyvhost.virtio.net import NetHeader, header_size
from pyvhost.virtio.queue import DeviceQueue

__all__ = ["KernelNetDevice"]

log = logging.getLogger(__name__)

_NOT_OFFERED = vf.bit_mask(
    vf.F_ACCESS_PLATFORM, VHOST_NET_F_VIRTIO_NET_HDR, vf.F_LOG_ALL, vf.F_PROTOCOL_FEATURES
)
"""Kernel bits the front-end never sees: no IOMMU, the TAP's own header, vhost-user's own bits."""


class KernelNetDevice(BackendDevice):
    """One queue pair served by vhost-net from ``tap`` (see the module docstring)."""

    num_queues = 2
    max_queue_size = 1024

    def __init__(
        self, tap: Tap, vhost_path: str = "/dev/vhost-net", *, owns_tap: bool = False
    ) -> None:
        self.tap = tap
        self.owns_tap = owns_tap
        """Whether this process created the TAP: NET_SET_MTU then sets its MTU."""
        self.vhost_path = vhost_path
        with VhostNet(vhost_path) as probe:
            self.kernel_features = probe.get_features()
        self.features = self.kernel_features & ~_NOT_OFFERED
        self.protocol_features = BASE_PROTOCOL_FEATURES | 1 << ProtocolFeature.RARP
        self._dev: VhostNet | None = None
        self._log: DirtyLog | None = None
        self.rarps = 0

    def _device(self) -> VhostNet:
        """The kernel session of the current front-end, opened and owned on first use."""
        if self._dev is None:
            dev = VhostNet(self.vhost_path)
            try:
                dev.set_owner()
                dev.set_features(self._kernel_acked())
            except BaseException:
                dev.close()
                raise
            self._dev = dev
            log.info("%s: kernel vhost-net session opened", self.vhost_path)
        return self._dev

    def _kernel_acked(self) -> int:
        acked = self.acked_features & self.kernel_features
        return acked | (1 << vf.F_LOG_ALL if self._log is not None else 0)

    def set_features(self, features: int) -> None:
        self.acked_features = features
        self.tap.set_vnet_hdr_size(header_size(features))
        self._device().set_features(self._kernel_acked())

    def memory_changed(self, mem: GuestMemory) -> None:
        self._device().set_memory(mem)

    def queue_started(self, index: int, queue: DeviceQueue, notifier: VringNotifier) -> None:
        if notifier.kick_fd is None:
            raise UnsupportedRequestError(
                f"vring {index}: the kernel's vhost-net needs a kick eventfd (SET_VRING_KICK "
                "with NOFD asks the back-end to poll)"
            )
        dev = self._device()
        dev.set_vring_num(index, queue.size)
        dev.set_vring_base(index, queue.get_base())
        dev.set_ring_addresses(index, queue.areas)
        dev.set_vring_call(index, notifier.call_fd)
        dev.set_vring_err(index, notifier.err_fd)
        dev.set_vring_kick(index, notifier.kick_fd)
        dev.set_backend(index, self.tap.fd)
        log.info("vring %d handed to %s (size %d)", index, self.vhost_path, queue.size)

    def queue_stopped(self, index: int) -> int | None:
        dev = self._dev
        if dev is None:
            return None
        dev.set_backend(index, None)
        base = dev.get_vring_base(index)
        log.info("vring %d taken back from %s at base %d", index, self.vhost_path, base)
        return base

    def queue_notifier_changed(self, index: int, notifier: VringNotifier) -> None:
        if self._dev is not None:
            self._dev.set_vring_call(index, notifier.call_fd)
            self._dev.set_vring_err(index, notifier.err_fd)

    def dirty_log_changed(self, log_area: DirtyLog | None) -> None:
        self._log = log_area
        dev = self._device()
        if log_area is not None:
            dev.set_log_base(log_area.host_address)
        dev.set_features(self._kernel_acked())

    def reset(self) -> None:
        """The front-end left or reset the device: the kernel session goes with it."""
        dev, self._dev = self._dev, None
        self._log = None
        if dev is not None:
            dev.close()
            log.info("%s: kernel vhost-net session closed", self.vhost_path)

    def send_rarp(self, mac: bytes) -> None:
        """Announce ``mac`` after a migration: a broadcast RARP request out of the TAP."""
        header = NetHeader().encode(header_size(self.acked_features))
        os.write(self.tap.fd, header + rarp_frame(mac))
        self.rarps += 1

    def net_set_mtu(self, mtu: int) -> None:
        """The front-end's MTU: a TAP this process created takes it; the host's is compared."""
        log.info("front-end MTU %d", mtu)
        apply_mtu(self.tap, mtu, self.owns_tap)

    def close(self) -> None:
        self.reset()
        self.tap.close()
