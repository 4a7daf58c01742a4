"""The kernel vhost ioctl interface: numbers from the ``_IOC`` encoding, structs as in
``<linux/vhost.h>`` / ``<linux/vhost_types.h>``.

Every number is computed from (direction, type 0xAF, number, size of its argument), the way the
kernel headers define them, so a wrong struct size shows up as a wrong number in the tests that
compare with the C header; none is typed in as a magic value.
"""

from __future__ import annotations

import enum
import struct
from typing import NamedTuple

__all__ = [
    "BACKEND_F_IOTLB_ASID",
    "BACKEND_F_IOTLB_BATCH",
    "BACKEND_F_IOTLB_MSG_V2",
    "BACKEND_F_RESUME",
    "BACKEND_F_SUSPEND",
    "F_LOG_ALL",
    "IOC_NONE",
    "IOC_READ",
    "IOC_WRITE",
    "IOTLB_MSG",
    "IOTLB_MSG_V2",
    "NET_F_VIRTIO_NET_HDR",
    "SCSI_ABI_VERSION",
    "SCSI_WWPN_SIZE",
    "VHOST_VIRTIO",
    "VRING_F_LOG",
    "Ioctl",
    "IotlbType",
    "io",
    "ioc",
    "ior",
    "iow",
    "iowr",
]

# <asm-generic/ioctl.h>: nr 8 bits, type 8 bits, size 14 bits, direction 2 bits.
_NRSHIFT = 0
_TYPESHIFT = 8
_SIZESHIFT = 16
_DIRSHIFT = 30
_SIZEMASK = (1 << 14) - 1
_NONE = 0
_WRITE = 1
_READ = 2

VHOST_VIRTIO = 0xAF
"""The ioctl type of every vhost request."""


IOC_NONE = _NONE
IOC_WRITE = _WRITE
IOC_READ = _READ


def ioc(direction: int, type_: int, nr: int, size: int) -> int:
    """``_IOC(direction, type, nr, size)`` as ``<asm-generic/ioctl.h>`` encodes it."""
    if not 0 <= size <= _SIZEMASK:
        raise ValueError(f"ioctl argument size {size} does not fit in 14 bits")
    return direction << _DIRSHIFT | size << _SIZESHIFT | type_ << _TYPESHIFT | nr << _NRSHIFT


def _ioc(direction: int, nr: int, size: int) -> int:
    return ioc(direction, VHOST_VIRTIO, nr, size)


def io(nr: int) -> int:
    """``_IO(VHOST_VIRTIO, nr)``: no argument."""
    return _ioc(_NONE, nr, 0)


def ior(nr: int, size: int) -> int:
    """``_IOR(VHOST_VIRTIO, nr, T)``: the kernel writes ``size`` bytes to the argument."""
    return _ioc(_READ, nr, size)


def iow(nr: int, size: int) -> int:
    """``_IOW(VHOST_VIRTIO, nr, T)``: the kernel reads ``size`` bytes from the argument."""
    return _ioc(_WRITE, nr, size)


def iowr(nr: int, size: int) -> int:
    """``_IOWR(VHOST_VIRTIO, nr, T)``: both."""
    return _ioc(_READ | _WRITE, nr, size)


# --- structs (native layout, as the kernel reads them from this process) ----------------------

U64 = struct.Struct("=Q")
U32 = struct.Struct("=I")
U16 = struct.Struct("=H")
U8 = struct.Struct("=B")
INT = struct.Struct("=i")
VRING_STATE = struct.Struct("=II")
"""struct vhost_vring_state {unsigned int index; unsigned int num;}"""
VRING_FILE = struct.Struct("=Ii")
"""struct vhost_vring_file {unsigned int index; int fd;} (fd -1 unbinds)"""
VRING_ADDR = struct.Struct("=IIQQQQ")
"""struct vhost_vring_addr {index, flags, desc_user_addr, used_user_addr, avail_user_addr,
log_guest_addr}"""
MEMORY = struct.Struct("=II")
"""struct vhost_memory {__u32 nregions; __u32 padding; regions[]} (header only)"""
MEMORY_REGION = struct.Struct("=QQQQ")
"""struct vhost_memory_region {guest_phys_addr, memory_size, userspace_addr, flags_padding}"""
WORKER_STATE = struct.Struct("=I")
"""struct vhost_worker_state {unsigned int worker_id;}"""
VRING_WORKER = struct.Struct("=II")
"""struct vhost_vring_worker {unsigned int index; unsigned int worker_id;}"""
SCSI_WWPN_SIZE = 224
SCSI_TARGET = struct.Struct(f"=i{SCSI_WWPN_SIZE}sHH")
"""struct vhost_scsi_target {int abi_version; char vhost_wwpn[224]; u16 vhost_tpgt; u16 reserved}"""
VDPA_CONFIG = struct.Struct("=II")
"""struct vhost_vdpa_config {__u32 off; __u32 len; __u8 buf[]} (header only)"""
IOVA_RANGE = struct.Struct("=QQ")
"""struct vhost_vdpa_iova_range {__u64 first; __u64 last;}"""
IOTLB = struct.Struct("=QQQBB")
"""struct vhost_iotlb_msg {iova, size, uaddr, u8 perm, u8 type} (+6 bytes of tail padding)"""
MSG = struct.Struct("=i4x64s")
"""struct vhost_msg {int type; union {struct vhost_iotlb_msg iotlb; u8 padding[64];}}: the union
is 8-byte aligned, so 4 bytes of padding follow ``type``."""
MSG_V2 = struct.Struct("=II64s")
"""struct vhost_msg_v2 {u32 type; u32 asid; union {iotlb; u8 padding[64];}}"""

VRING_F_LOG = 0
"""Bit number of VHOST_VRING_F_LOG in vhost_vring_addr.flags."""
F_LOG_ALL = 26
NET_F_VIRTIO_NET_HDR = 27
IOTLB_MSG = 1
IOTLB_MSG_V2 = 2
BACKEND_F_IOTLB_MSG_V2 = 1
BACKEND_F_IOTLB_BATCH = 2
BACKEND_F_IOTLB_ASID = 3
BACKEND_F_SUSPEND = 4
BACKEND_F_RESUME = 5
"""VHOST_BACKEND_F_*: bit numbers in the backend feature mask (IOTLB_MSG_V2 is mask 0x2)."""
SCSI_ABI_VERSION = 1


class IotlbType(enum.IntEnum):
    """``vhost_iotlb_msg.type``."""

    MISS = 1
    UPDATE = 2
    INVALIDATE = 3
    ACCESS_FAIL = 4
    BATCH_BEGIN = 5
    BATCH_END = 6


class Ioctl(enum.IntEnum):
    """Every vhost ioctl request number, computed from its ``_IOC`` encoding."""

    GET_FEATURES = ior(0x00, U64.size)
    SET_FEATURES = iow(0x00, U64.size)
    SET_OWNER = io(0x01)
    RESET_OWNER = io(0x02)
    SET_MEM_TABLE = iow(0x03, MEMORY.size)
    SET_LOG_BASE = iow(0x04, U64.size)
    SET_LOG_FD = iow(0x07, INT.size)
    NEW_WORKER = ior(0x08, WORKER_STATE.size)
    FREE_WORKER = iow(0x09, WORKER_STATE.size)
    SET_VRING_NUM = iow(0x10, VRING_STATE.size)
    SET_VRING_ADDR = iow(0x11, VRING_ADDR.size)
    SET_VRING_BASE = iow(0x12, VRING_STATE.size)
    GET_VRING_BASE = iowr(0x12, VRING_STATE.size)
    SET_VRING_ENDIAN = iow(0x13, VRING_STATE.size)
    GET_VRING_ENDIAN = iow(0x14, VRING_STATE.size)  # _IOW in the header, though it reads back
    ATTACH_VRING_WORKER = iow(0x15, VRING_WORKER.size)
    GET_VRING_WORKER = iowr(0x16, VRING_WORKER.size)
    SET_VRING_KICK = iow(0x20, VRING_FILE.size)
    SET_VRING_CALL = iow(0x21, VRING_FILE.size)
    SET_VRING_ERR = iow(0x22, VRING_FILE.size)
    SET_VRING_BUSYLOOP_TIMEOUT = iow(0x23, VRING_STATE.size)
    GET_VRING_BUSYLOOP_TIMEOUT = iow(0x24, VRING_STATE.size)  # _IOW in the header too
    SET_BACKEND_FEATURES = iow(0x25, U64.size)
    GET_BACKEND_FEATURES = ior(0x26, U64.size)
    NET_SET_BACKEND = iow(0x30, VRING_FILE.size)
    SCSI_SET_ENDPOINT = iow(0x40, SCSI_TARGET.size)
    SCSI_CLEAR_ENDPOINT = iow(0x41, SCSI_TARGET.size)
    SCSI_GET_ABI_VERSION = iow(0x42, INT.size)  # _IOW in the header, though it reads back
    SCSI_SET_EVENTS_MISSED = iow(0x43, U32.size)
    SCSI_GET_EVENTS_MISSED = iow(0x44, U32.size)
    VSOCK_SET_GUEST_CID = iow(0x60, U64.size)
    VSOCK_SET_RUNNING = iow(0x61, INT.size)
    VDPA_GET_DEVICE_ID = ior(0x70, U32.size)
    VDPA_GET_STATUS = ior(0x71, U8.size)
    VDPA_SET_STATUS = iow(0x72, U8.size)
    VDPA_GET_CONFIG = ior(0x73, VDPA_CONFIG.size)
    VDPA_SET_CONFIG = iow(0x74, VDPA_CONFIG.size)
    VDPA_SET_VRING_ENABLE = iow(0x75, VRING_STATE.size)
    VDPA_GET_VRING_NUM = ior(0x76, U16.size)
    VDPA_SET_CONFIG_CALL = iow(0x77, INT.size)
    VDPA_GET_IOVA_RANGE = ior(0x78, IOVA_RANGE.size)
    VDPA_GET_CONFIG_SIZE = ior(0x79, U32.size)
    VDPA_GET_AS_NUM = ior(0x7A, U32.size)
    VDPA_GET_VRING_GROUP = iowr(0x7B, VRING_STATE.size)
    VDPA_SET_GROUP_ASID = iow(0x7C, VRING_STATE.size)
    VDPA_SUSPEND = io(0x7D)
    VDPA_RESUME = io(0x7E)
    VDPA_GET_VQS_COUNT = ior(0x80, U32.size)
    VDPA_GET_GROUP_NUM = ior(0x81, U32.size)

    @property
    def spec_name(self) -> str:
        """The header's name: ``VHOST_SET_OWNER``, ``VHOST_NET_SET_BACKEND``, ..."""
        return f"VHOST_{self.name}"


class MemoryRegion(NamedTuple):
    """One ``vhost_memory_region``: guest-physical range and where this process maps it."""

    guest_phys_addr: int
    memory_size: int
    userspace_addr: int

    def encode(self) -> bytes:
        return MEMORY_REGION.pack(self.guest_phys_addr, self.memory_size, self.userspace_addr, 0)


def encode_memory(regions: list[MemoryRegion]) -> bytes:
    """A ``struct vhost_memory`` with its regions, as VHOST_SET_MEM_TABLE reads it."""
    return MEMORY.pack(len(regions), 0) + b"".join(r.encode() for r in regions)
