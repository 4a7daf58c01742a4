"""The virtio-blk config space (``struct virtio_blk_config``), request limits and the device ID.

What the driver reads before any request: capacity, segment limits, block size, queue count,
discard / write-zeroes limits (:func:`encode_config`, :class:`BlkLimits`), and the serial
returned by GET_ID (:func:`default_serial`, :func:`check_serial`).
"""

from __future__ import annotations

import hashlib
import os
import struct
from dataclasses import dataclass

__all__ = [
    "CONFIG_SIZE",
    "DEFAULT_LIMITS",
    "SECTOR_SIZE",
    "VIRTIO_BLK_ID_BYTES",
    "BlkLimits",
    "check_serial",
    "default_serial",
    "encode_config",
]

VIRTIO_BLK_ID_BYTES = 20
SECTOR_SIZE = 512

CONFIG_SIZE = 96
"""``sizeof(struct virtio_blk_config)`` up to and including the zoned fields (Linux uapi)."""

# capacity, size_max, seg_max, cylinders, heads, sectors, blk_size,
# physical_block_exp, alignment_offset, min_io_size, opt_io_size, writeback, unused0,
# num_queues, max_discard_sectors, max_discard_seg, discard_sector_alignment,
# max_write_zeroes_sectors, max_write_zeroes_seg, write_zeroes_may_unmap
_CONFIG = struct.Struct("<QIIHBBIBBHIBBHIIIIIB3x")
assert _CONFIG.size == 60


@dataclass(frozen=True, slots=True)
class BlkLimits:
    """Request limits the device advertises in its config space and enforces."""

    seg_max: int = 126
    """Data segments per request (config ``seg_max``), as qemu-storage-daemon says.

    Read by the guest before any ring exists, so it must hold for every ring size: Linux sizes its
    scatter lists from it and sends them as indirect tables, which the rings accept up to
    :data:`~pyvhost.virtio.chain.MAX_INDIRECT_DESCRIPTORS` whatever the ring size; 126 data
    segments plus header and status also fit a 128-entry ring (QEMU's default) without indirect.
    """
    size_max: int = 1 << 20
    """Largest data segment the driver should use (config ``size_max``); advisory."""
    max_discard_sectors: int = 1 << 22
    max_discard_seg: int = 32
    discard_sector_alignment: int = 8
    max_write_zeroes_sectors: int = 1 << 22
    max_write_zeroes_seg: int = 32


DEFAULT_LIMITS = BlkLimits()
"""The limits a backend has unless given others."""


def encode_config(
    capacity_sectors: int,
    *,
    limits: BlkLimits = DEFAULT_LIMITS,
    blk_size: int = SECTOR_SIZE,
    num_queues: int = 1,
    writeback: bool = True,
    write_zeroes_may_unmap: bool = True,
) -> bytes:
    """The ``virtio_blk_config`` bytes (little-endian), zero where a feature is not offered."""
    head = _CONFIG.pack(
        capacity_sectors,
        limits.size_max,
        limits.seg_max,
        0,
        0,
        0,
        blk_size,
        0,
        0,
        0,
        0,
        int(writeback),
        0,
        num_queues,
        limits.max_discard_sectors,
        limits.max_discard_seg,
        limits.discard_sector_alignment,
        limits.max_write_zeroes_sectors,
        limits.max_write_zeroes_seg,
        int(write_zeroes_may_unmap),
    )
    return head + bytes(CONFIG_SIZE - len(head))


def default_serial(path: str | os.PathLike[str]) -> bytes:
    """A 20-byte-at-most device ID from the image path: name prefix plus a hash of the real path."""
    real = os.path.realpath(path)
    digest = hashlib.sha256(real.encode("utf-8", "surrogateescape")).hexdigest()[:8]
    name = os.path.basename(real).encode("ascii", "replace")[:11]
    return name + b"-" + digest.encode()


def check_serial(serial: bytes | str) -> bytes:
    """``serial`` as bytes, checked to fit the 20-byte virtio-blk ID."""
    data = serial.encode("utf-8") if isinstance(serial, str) else bytes(serial)
    if len(data) > VIRTIO_BLK_ID_BYTES:
        raise ValueError(
            f"serial {data!r} is {len(data)} bytes; virtio-blk IDs are at most "
            f"{VIRTIO_BLK_ID_BYTES}"
        )
    return data
