"""The packed virtqueue (virtio 1.1+ "Packed Virtqueues"): its format, device and driver side.

:mod:`.layout` has the format (flags, placement, the vring base encoding, event suppression),
:mod:`.device` the :class:`PackedQueue` a back-end pops from, :mod:`.driver` the
:class:`PackedDriver` that plays the guest.
"""

from pyvhost.virtio.inflight import PackedInflightHooks
from pyvhost.virtio.packed.device import PackedQueue
from pyvhost.virtio.packed.driver import PackedDriver
from pyvhost.virtio.packed.layout import (
    DESC_F_AVAIL,
    DESC_F_INDIRECT,
    DESC_F_NEXT,
    DESC_F_USED,
    DESC_F_WRITE,
    RING_EVENT_FLAGS_DESC,
    RING_EVENT_FLAGS_DISABLE,
    RING_EVENT_FLAGS_ENABLE,
    PackedLayout,
    decode_packed_base,
    encode_packed_base,
    packed_layout,
)

__all__ = [
    "DESC_F_AVAIL",
    "DESC_F_INDIRECT",
    "DESC_F_NEXT",
    "DESC_F_USED",
    "DESC_F_WRITE",
    "RING_EVENT_FLAGS_DESC",
    "RING_EVENT_FLAGS_DISABLE",
    "RING_EVENT_FLAGS_ENABLE",
    "PackedDriver",
    "PackedInflightHooks",
    "PackedLayout",
    "PackedQueue",
    "decode_packed_base",
    "encode_packed_base",
    "packed_layout",
]
