"""The packed ring's format (virtio 1.1+ "Packed Virtqueues"): flags, placement, base, events.

One ring of 16-byte descriptors ``{le64 addr, le32 len, le16 id, le16 flags}`` (align 16) carries
both directions, followed here by two 4-byte event-suppression structures ``{le16 off_wrap,
le16 flags}`` (align 4): the driver area (written by the driver, governs used-buffer
notifications) and the device area (written by the device, governs kicks). Flags words and event
structures are loaded and stored through native ``memoryview.cast`` items (single 16- or 32-bit
accesses, no tearing), so the host must be little-endian (checked).
"""

from __future__ import annotations

import struct
import sys
from typing import NamedTuple

from pyvhost.virtio.ring import (
    DESC_F_INDIRECT,
    DESC_F_NEXT,
    DESC_F_WRITE,
    DESC_SIZE,
    MAX_QUEUE_SIZE,
)

__all__ = [
    "BOTH",
    "DESC",
    "DESC_BODY",
    "DESC_F_AVAIL",
    "DESC_F_INDIRECT",
    "DESC_F_NEXT",
    "DESC_F_USED",
    "DESC_F_WRITE",
    "DESC_SIZE",
    "EVENT_SIZE",
    "EVENT_WRAP_SHIFT",
    "FLAGS",
    "MAX_QUEUE_SIZE",
    "RING_EVENT_FLAGS_DESC",
    "RING_EVENT_FLAGS_DISABLE",
    "RING_EVENT_FLAGS_ENABLE",
    "USED_BODY",
    "PackedLayout",
    "advance",
    "check_size",
    "decode_packed_base",
    "encode_packed_base",
    "event_crossed",
    "need_event",
    "packed_layout",
]

DESC_F_AVAIL = 1 << 7
DESC_F_USED = 1 << 15

RING_EVENT_FLAGS_ENABLE = 0
RING_EVENT_FLAGS_DISABLE = 1
RING_EVENT_FLAGS_DESC = 2
EVENT_WRAP_SHIFT = 15

EVENT_SIZE = 4

DESC = struct.Struct("<QIHH")  # addr, len, id, flags
DESC_BODY = struct.Struct("<QIH")  # addr, len, id: all but the flags
USED_BODY = struct.Struct("<IH")  # len, id, at offset 8 of a used descriptor
FLAGS = 7  # index of a descriptor's flags in the ring cast to u16
BOTH = DESC_F_AVAIL | DESC_F_USED

if sys.byteorder != "little":  # pragma: no cover - no big-endian CI machine
    raise ImportError("pyvhost.virtio.packed needs a little-endian host (native flags access)")


def check_size(size: int) -> None:
    """Refuse a size the packed format cannot have (any size from 1 to 32768 is valid)."""
    if not 1 <= size <= MAX_QUEUE_SIZE:
        raise ValueError(f"packed queue size {size} out of range (1..{MAX_QUEUE_SIZE})")


def need_event(event: int, new: int, old: int) -> bool:
    """virtio's vring_need_event: did moving from ``old`` to ``new`` pass ``event``? (mod 2^16)."""
    return ((new - event - 1) & 0xFFFF) < ((new - old) & 0xFFFF)


def event_crossed(off_wrap: int, size: int, wrap: bool, new: int, count: int) -> bool:
    """Whether the ``count`` descriptors just before ring position ``new`` include ``off_wrap``.

    ``off_wrap`` is a ring offset (bits 0-14) plus the wrap counter it refers to (bit 15); an
    offset with the other wrap value lies one lap back and is moved ``size`` below zero, as in
    Linux's ``virtqueue_kick_prepare_packed`` and QEMU's ``vring_packed_need_event``.
    """
    if count <= 0:
        return False
    if count >= size:
        return True
    event = off_wrap & 0x7FFF
    if bool(off_wrap >> EVENT_WRAP_SHIFT) != wrap:
        event -= size
    return need_event(event & 0xFFFF, new, (new - count) & 0xFFFF)


def encode_packed_base(
    last_avail_idx: int, avail_wrap: bool, used_idx: int, used_wrap: bool
) -> int:
    """GET_VRING_BASE value of a packed ring.

    Bits 0-14 avail index, bit 15 avail wrap counter, bits 16-30 used index, bit 31 used wrap.
    """
    for name, value in (("last_avail_idx", last_avail_idx), ("used_idx", used_idx)):
        if not 0 <= value <= 0x7FFF:
            raise ValueError(f"packed vring base: {name} {value} does not fit in 15 bits")
    return last_avail_idx | int(avail_wrap) << 15 | used_idx << 16 | int(used_wrap) << 31


def decode_packed_base(value: int) -> tuple[int, bool, int, bool]:
    """SET_VRING_BASE value -> ``(last_avail_idx, avail_wrap, used_idx, used_wrap)``."""
    if not 0 <= value <= 0xFFFFFFFF:
        raise ValueError(f"packed vring base {value:#x} does not fit in 32 bits")
    return value & 0x7FFF, bool(value >> 15 & 1), value >> 16 & 0x7FFF, bool(value >> 31 & 1)


class PackedLayout(NamedTuple):
    """Where the three parts of a packed ring go, and how many bytes they span in all."""

    desc_gpa: int
    driver_event_gpa: int
    device_event_gpa: int
    size_bytes: int


def packed_layout(size: int, base_gpa: int) -> PackedLayout:
    """Place a packed ring at ``base_gpa`` (16-aligned): ring, then driver and device areas."""
    check_size(size)
    if base_gpa % 16:
        raise ValueError(f"descriptor ring at {base_gpa:#x} must be 16-byte aligned")
    driver = base_gpa + DESC_SIZE * size
    return PackedLayout(base_gpa, driver, driver + EVENT_SIZE, DESC_SIZE * size + 2 * EVENT_SIZE)


def advance(pos: int, wrap: bool, count: int, size: int) -> tuple[int, bool]:
    """Ring position and wrap counter ``count`` descriptors past ``(pos, wrap)``."""
    pos += count
    while pos >= size:
        pos -= size
        wrap = not wrap
    return pos, wrap
