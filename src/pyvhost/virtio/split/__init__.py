"""The split virtqueue (virtio 1.x section 2.7): its format, device side and driver side.

:mod:`.layout` has the format (flags, placement, the EVENT_IDX rule), :mod:`.device` the
:class:`SplitQueue` a back-end pops from, :mod:`.driver` the :class:`SplitDriver` that plays the
guest.
"""

from pyvhost.virtio.split.device import SplitQueue
from pyvhost.virtio.split.driver import SplitDriver
from pyvhost.virtio.split.layout import (
    VRING_AVAIL_F_NO_INTERRUPT,
    VRING_DESC_F_INDIRECT,
    VRING_DESC_F_NEXT,
    VRING_DESC_F_WRITE,
    VRING_USED_F_NO_NOTIFY,
    split_layout,
    vring_need_event,
)

__all__ = [
    "VRING_AVAIL_F_NO_INTERRUPT",
    "VRING_DESC_F_INDIRECT",
    "VRING_DESC_F_NEXT",
    "VRING_DESC_F_WRITE",
    "VRING_USED_F_NO_NOTIFY",
    "SplitDriver",
    "SplitQueue",
    "split_layout",
    "vring_need_event",
]
