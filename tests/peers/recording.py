"""A VhostNet that records its ioctls instead of making them: for host-side unit tests of code
that drives kernel vhost (the host has no /dev/vhost-net; tests/kernel proves the real thing)."""

from __future__ import annotations

import struct

from pyvhost.kernel.devices import VhostNet
from pyvhost.kernel.ioctl import Ioctl
from pyvhost.virtio import features as vf

OFFERED = vf.bit_mask(vf.F_VERSION_1, vf.F_RING_EVENT_IDX, vf.F_LOG_ALL, vf.NET_F_MRG_RXBUF)
"""What the recording device offers on VHOST_GET_FEATURES."""


class RecordingNet(VhostNet):
    """A VhostNet whose ioctls are recorded instead of made (on /dev/null, never issued)."""

    def __init__(self, offered: int = OFFERED) -> None:
        super().__init__("/dev/null")
        self.offered = offered
        self.calls: list[tuple[Ioctl, bytes]] = []

    def _plain(self, request: Ioctl) -> None:
        self.calls.append((request, b""))

    def _call(self, request: Ioctl, arg: bytes) -> bytes:
        self.calls.append((request, arg))
        if request == Ioctl.GET_FEATURES:
            return struct.pack("<Q", self.offered)
        return arg

    def requests(self) -> list[str]:
        return [r.spec_name for r, _ in self.calls]

    def args(self, request: Ioctl) -> list[bytes]:
        return [a for r, a in self.calls if r == request]
