"""virtio-rng (entropy device, type 4) from ``os.getrandom``: QEMU's ``vhost-user-rng-pci``.

One request queue; each chain's writable buffers are filled with random bytes (at most
:data:`MAX_REQUEST` per chain: the spec lets the device write fewer than offered) and the
number written is returned in the used ring. No config space, no device feature bits. The ring
features EVENT_IDX and INDIRECT_DESC come from the framework: QEMU 7.2 turns them on towards the
guest whatever the back-end offers, so a back-end must implement them.
"""

from __future__ import annotations

import os

from pyvhost.daemon.device import Device
from pyvhost.virtio.chain import DescriptorChain
from pyvhost.virtio.memory import GuestMemory

__all__ = ["MAX_REQUEST", "RngDevice"]

MAX_REQUEST = 1 << 20
"""Most random bytes given for one chain (bounds the work one request can ask for)."""

_CHUNK = 1 << 16


class RngDevice(Device):
    """The entropy device: fills every writable buffer the driver offers with random bytes."""

    device_id = 4
    num_queues = 1
    queue_size = 1024

    def handle_chain(self, index: int, chain: DescriptorChain, mem: GuestMemory) -> int:
        budget = MAX_REQUEST
        written = 0
        for piece in chain.iter_writable():
            offset = 0
            size = min(len(piece), budget - written)
            while offset < size:
                data = os.getrandom(min(size - offset, _CHUNK))
                piece[offset : offset + len(data)] = data
                offset += len(data)
            written += size
            if written >= budget:
                break
        return written
