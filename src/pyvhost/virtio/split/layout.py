"""The split ring's format (virtio 1.x section 2.7): flag bits, where its parts go, EVENT_IDX.

Layout (little-endian): descriptor table ``16 * size`` bytes (align 16); available ring
``flags, idx, ring[size], used_event`` u16s (align 2); used ring ``flags, idx``, ``size``
elements of ``(u32 id, u32 len)``, ``avail_event`` (align 4). Indices are free-running u16.
Ring indices are loaded and stored through native ``memoryview.cast("H")`` items (single 16-bit
accesses), so the host must be little-endian (checked).
"""

from __future__ import annotations

import struct
import sys

from pyvhost.virtio.ring import (
    DESC_F_INDIRECT,
    DESC_F_NEXT,
    DESC_F_WRITE,
    DESC_SIZE,
    MAX_QUEUE_SIZE,
)

__all__ = [
    "DESC",
    "DESC_SIZE",
    "MAX_QUEUE_SIZE",
    "USED_ELEM",
    "VRING_AVAIL_F_NO_INTERRUPT",
    "VRING_DESC_F_INDIRECT",
    "VRING_DESC_F_NEXT",
    "VRING_DESC_F_WRITE",
    "VRING_USED_F_NO_NOTIFY",
    "check_size",
    "split_layout",
    "vring_need_event",
]

VRING_DESC_F_NEXT = DESC_F_NEXT
VRING_DESC_F_WRITE = DESC_F_WRITE
VRING_DESC_F_INDIRECT = DESC_F_INDIRECT
VRING_AVAIL_F_NO_INTERRUPT = 1
VRING_USED_F_NO_NOTIFY = 1

DESC = struct.Struct("<QIHH")
USED_ELEM = struct.Struct("<II")

if sys.byteorder != "little":  # pragma: no cover - no big-endian CI machine
    raise ImportError("pyvhost.virtio.split needs a little-endian host (native ring index access)")


def vring_need_event(event_idx: int, new_idx: int, old_idx: int) -> bool:
    """The EVENT_IDX rule: notify iff ``event_idx`` lies in ``[old_idx, new_idx)`` (mod 2^16)."""
    return ((new_idx - event_idx - 1) & 0xFFFF) < ((new_idx - old_idx) & 0xFFFF)


def split_layout(size: int, base_gpa: int, *, used_align: int = 4) -> tuple[int, int, int, int]:
    """Place a split ring at ``base_gpa``: ``(desc_gpa, avail_gpa, used_gpa, total_bytes)``.

    Uses the spec's minimum alignments (16 / 2 / 4); pass ``used_align=4096`` for the legacy layout.
    """
    check_size(size)
    if base_gpa % 16:
        raise ValueError(f"descriptor table at {base_gpa:#x} must be 16-byte aligned")
    desc = base_gpa
    avail = desc + DESC_SIZE * size
    avail_end = avail + 6 + 2 * size
    used = (avail_end + used_align - 1) // used_align * used_align
    end = used + 6 + 8 * size
    return desc, avail, used, end - base_gpa


def check_size(size: int) -> None:
    """Refuse a size the split format cannot have: zero, not a power of 2, above 32768."""
    if not 0 < size <= MAX_QUEUE_SIZE or size & (size - 1):
        raise ValueError(f"queue size {size} must be a power of 2 between 1 and {MAX_QUEUE_SIZE}")
