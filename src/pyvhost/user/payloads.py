"""Typed vhost-user payloads: one frozen dataclass per wire layout, each with encode/decode.

Decoding checks the layout (exact size for fixed layouts, bounds for variable ones) and the
values whose meaning does not depend on the request (alignment, overflow, reserved bits).
Checks that depend on the request (vring index NOFD bit, fd counts) live in ``messages``.
"""

from __future__ import annotations

import itertools
import struct
import uuid
from dataclasses import dataclass
from typing import ClassVar, Self, TypeAlias

from pyvhost.user.protocol import (
    MAX_CONFIG_SIZE,
    MAX_MEMORY_REGIONS,
    MAX_PAYLOAD_SIZE,
    MAX_SHMEM_REGIONS,
    VRING_F_LOG,
    VRING_INDEX_MASK,
    VRING_NOFD,
    protocol_error,
)

Bytes: TypeAlias = bytes | bytearray | memoryview

_U64 = struct.Struct("<Q")
_U32X2 = struct.Struct("<II")
_VRING_ADDR = struct.Struct("<IIQQQQ")
_REGION = struct.Struct("<QQQQ")
_TABLE_HEAD = struct.Struct("<II")
_MEM_REG = struct.Struct("<Q32x")
_U64X2 = struct.Struct("<QQ")
_IOTLB = struct.Struct("<QQQBB6x")
_CONFIG_HEAD = struct.Struct("<III")
_U64X3 = struct.Struct("<QQQ")
_INFLIGHT = struct.Struct("<QQHH4x")
_MMAP = struct.Struct("<B7xQQQQ")
_SHMEM = struct.Struct(f"<II{MAX_SHMEM_REGIONS}Q")

_U64_LIMIT = 1 << 64


def _check_size(data: Bytes, size: int, request: str, layout: str) -> None:
    if len(data) != size:
        raise protocol_error(
            request, "size", f"size {len(data)} is wrong for a {layout} payload (expected {size})"
        )


def _hex(value: int) -> str:
    return f"{value:#x}"


@dataclass(frozen=True, slots=True)
class Empty:
    """No payload (size 0)."""

    SIZE: ClassVar[int | None] = 0

    def encode(self) -> bytes:
        return b""

    @classmethod
    def decode(cls, data: Bytes, *, request: str) -> Self:
        _check_size(data, 0, request, "empty")
        return cls()

    def describe(self) -> str:
        return ""


@dataclass(frozen=True, slots=True)
class U64:
    """A single 64-bit unsigned integer."""

    value: int
    SIZE: ClassVar[int | None] = 8

    def encode(self) -> bytes:
        return _U64.pack(self.value)

    @classmethod
    def decode(cls, data: Bytes, *, request: str) -> Self:
        _check_size(data, 8, request, "u64")
        return cls(_U64.unpack(data)[0])

    def describe(self) -> str:
        return f"u64={_hex(self.value)}"


@dataclass(frozen=True, slots=True)
class VringState:
    """A vring index and a number (size, base index, enable flag, endianness...)."""

    index: int
    num: int
    SIZE: ClassVar[int | None] = 8

    def encode(self) -> bytes:
        return _U32X2.pack(self.index, self.num)

    @classmethod
    def decode(cls, data: Bytes, *, request: str) -> Self:
        _check_size(data, 8, request, "vring state")
        return cls(*_U32X2.unpack(data))

    def describe(self) -> str:
        return f"index={self.index} num={self.num}"


_VRING_ALIGN = (("desc_user_addr", 16), ("used_user_addr", 4), ("avail_user_addr", 2))


@dataclass(frozen=True, slots=True)
class VringAddr:
    """Ring addresses of one vring (wire order: index, flags, desc, used, avail, log)."""

    index: int
    flags: int
    desc_user_addr: int
    used_user_addr: int
    avail_user_addr: int
    log_guest_addr: int
    SIZE: ClassVar[int | None] = 40

    def encode(self) -> bytes:
        return _VRING_ADDR.pack(
            self.index,
            self.flags,
            self.desc_user_addr,
            self.used_user_addr,
            self.avail_user_addr,
            self.log_guest_addr,
        )

    @classmethod
    def decode(cls, data: Bytes, *, request: str) -> Self:
        _check_size(data, 40, request, "vring address")
        addr = cls(*_VRING_ADDR.unpack(data))
        if addr.flags & ~VRING_F_LOG:
            raise protocol_error(
                request,
                "flags",
                f"vring {addr.index}: flags {_hex(addr.flags)} has bits other than VRING_F_LOG",
            )
        for name, align in _VRING_ALIGN:
            value: int = getattr(addr, name)
            if value % align:
                raise protocol_error(
                    request,
                    name,
                    f"vring {addr.index}: {name} {_hex(value)} is not {align}-byte aligned",
                )
        return addr

    def describe(self) -> str:
        return (
            f"index={self.index} flags={_hex(self.flags)} desc={_hex(self.desc_user_addr)} "
            f"used={_hex(self.used_user_addr)} avail={_hex(self.avail_user_addr)} "
            f"log={_hex(self.log_guest_addr)}"
        )


@dataclass(frozen=True, slots=True)
class MemoryRegion:
    """One guest memory region: guest physical range, its user address and offset in its fd."""

    guest_phys_addr: int
    memory_size: int
    userspace_addr: int
    mmap_offset: int
    SIZE: ClassVar[int | None] = 32

    def encode(self) -> bytes:
        return _REGION.pack(
            self.guest_phys_addr, self.memory_size, self.userspace_addr, self.mmap_offset
        )

    @classmethod
    def decode(cls, data: Bytes, *, request: str) -> Self:
        _check_size(data, 32, request, "memory region")
        region = cls(*_REGION.unpack(data))
        region.check(request, "region")
        return region

    def check(self, request: str, where: str) -> None:
        """Reject a zero size and any range that wraps past 2**64."""
        if self.memory_size == 0:
            raise protocol_error(request, "memory_size", f"{where}: memory_size is 0")
        for name in ("guest_phys_addr", "userspace_addr", "mmap_offset"):
            start: int = getattr(self, name)
            if start + self.memory_size > _U64_LIMIT:
                raise protocol_error(
                    request,
                    name,
                    f"{where}: {name} {_hex(start)} + memory_size {_hex(self.memory_size)} "
                    "overflows 64 bits",
                )

    def describe(self) -> str:
        return (
            f"gpa={_hex(self.guest_phys_addr)} size={_hex(self.memory_size)} "
            f"uaddr={_hex(self.userspace_addr)} offset={_hex(self.mmap_offset)}"
        )


def _check_overlap(regions: tuple[MemoryRegion, ...], request: str, attr: str) -> None:
    ranges = sorted(
        (getattr(r, attr), getattr(r, attr) + r.memory_size, i) for i, r in enumerate(regions)
    )
    for (_, end, i), (start, _, j) in itertools.pairwise(ranges):
        if start < end:
            a, b = sorted((i, j))
            raise protocol_error(
                request, attr, f"regions[{a}] and regions[{b}] overlap in {attr} space"
            )


@dataclass(frozen=True, slots=True)
class MemoryTable:
    """The memory table of SET_MEM_TABLE: nregions, padding, then the regions.

    QEMU sends only the used regions; the spec draws all eight slots, so a full-size table is
    accepted too (its unused slots are ignored). ``encode`` writes the compact form.
    """

    regions: tuple[MemoryRegion, ...]
    SIZE: ClassVar[int | None] = None

    def encode(self) -> bytes:
        head = _TABLE_HEAD.pack(len(self.regions), 0)
        return head + b"".join(r.encode() for r in self.regions)

    @classmethod
    def decode(cls, data: Bytes, *, request: str) -> Self:
        if len(data) < 8:
            raise protocol_error(
                request, "size", f"size {len(data)} is too short for a memory table (minimum 8)"
            )
        nregions = _TABLE_HEAD.unpack_from(data)[0]
        if nregions > MAX_MEMORY_REGIONS:
            raise protocol_error(
                request, "nregions", f"nregions {nregions} exceeds {MAX_MEMORY_REGIONS}"
            )
        if len(data) != 8 + 32 * MAX_MEMORY_REGIONS:
            _check_size(data, 8 + 32 * nregions, request, f"{nregions}-region memory table")
        regions = tuple(
            MemoryRegion(*_REGION.unpack_from(data, 8 + 32 * i)) for i in range(nregions)
        )
        for i, region in enumerate(regions):
            region.check(request, f"regions[{i}]")
        _check_overlap(regions, request, "guest_phys_addr")
        _check_overlap(regions, request, "userspace_addr")
        return cls(regions)

    def describe(self) -> str:
        inner = "; ".join(r.describe() for r in self.regions)
        return f"nregions={len(self.regions)} [{inner}]"


@dataclass(frozen=True, slots=True)
class MemRegMsg:
    """A single memory region (ADD_MEM_REG / REM_MEM_REG): u64 padding, then the region."""

    region: MemoryRegion
    SIZE: ClassVar[int | None] = 40

    def encode(self) -> bytes:
        return _U64.pack(0) + self.region.encode()

    @classmethod
    def decode(cls, data: Bytes, *, request: str) -> Self:
        _check_size(data, 40, request, "single memory region")
        region = MemoryRegion(*_REGION.unpack_from(data, 8))
        region.check(request, "region")
        return cls(region)

    def describe(self) -> str:
        return self.region.describe()


@dataclass(frozen=True, slots=True)
class Log:
    """The dirty log area of SET_LOG_BASE: its size and offset in the passed fd."""

    size: int
    offset: int
    SIZE: ClassVar[int | None] = 16

    def encode(self) -> bytes:
        return _U64X2.pack(self.size, self.offset)

    @classmethod
    def decode(cls, data: Bytes, *, request: str) -> Self:
        _check_size(data, 16, request, "log")
        return cls(*_U64X2.unpack(data))

    def describe(self) -> str:
        return f"size={_hex(self.size)} offset={_hex(self.offset)}"


IOTLB_ACCESS_MAX = 3
IOTLB_TYPE_MIN = 1
IOTLB_TYPE_MAX = 6


@dataclass(frozen=True, slots=True)
class IotlbMsg:
    """``struct vhost_iotlb_msg``: iova, size, uaddr, perm (u8), type (u8), 6 bytes padding."""

    iova: int
    size: int
    uaddr: int
    perm: int
    type: int
    SIZE: ClassVar[int | None] = 32

    def encode(self) -> bytes:
        return _IOTLB.pack(self.iova, self.size, self.uaddr, self.perm, self.type)

    @classmethod
    def decode(cls, data: Bytes, *, request: str) -> Self:
        _check_size(data, 32, request, "IOTLB message")
        msg = cls(*_IOTLB.unpack(data))
        if msg.perm > IOTLB_ACCESS_MAX:
            raise protocol_error(request, "perm", f"perm {msg.perm} is not 0..3")
        if not IOTLB_TYPE_MIN <= msg.type <= IOTLB_TYPE_MAX:
            raise protocol_error(request, "type", f"type {msg.type} is not a VHOST_IOTLB_* type")
        return msg

    def describe(self) -> str:
        return (
            f"iova={_hex(self.iova)} size={_hex(self.size)} uaddr={_hex(self.uaddr)} "
            f"perm={self.perm} type={self.type}"
        )


CONFIG_FLAGS_MAX = 1


@dataclass(frozen=True, slots=True)
class Config:
    """A window of the device config space: offset, size (= len(data)), flags, data."""

    offset: int
    flags: int
    data: bytes
    SIZE: ClassVar[int | None] = None

    def encode(self) -> bytes:
        return _CONFIG_HEAD.pack(self.offset, len(self.data), self.flags) + self.data

    @classmethod
    def decode(cls, data: Bytes, *, request: str) -> Self:
        if len(data) < 12:
            raise protocol_error(
                request, "size", f"size {len(data)} is too short for a config payload (minimum 12)"
            )
        offset, size, flags = _CONFIG_HEAD.unpack_from(data)
        if size > MAX_CONFIG_SIZE:
            raise protocol_error(request, "size", f"config size {size} exceeds {MAX_CONFIG_SIZE}")
        if offset + size > MAX_CONFIG_SIZE:
            raise protocol_error(
                request,
                "offset",
                f"config offset {offset} + size {size} exceeds {MAX_CONFIG_SIZE}",
            )
        if flags > CONFIG_FLAGS_MAX:
            raise protocol_error(request, "flags", f"config flags {flags} is not 0 or 1")
        if len(data) != 12 + size:
            raise protocol_error(
                request,
                "size",
                f"payload size {len(data)} does not match config size {size} (want {12 + size})",
            )
        return cls(offset, flags, bytes(data[12:]))

    def describe(self) -> str:
        return (
            f"offset={self.offset} size={len(self.data)} flags={self.flags} data={self.data.hex()}"
        )


@dataclass(frozen=True, slots=True)
class VringArea:
    """A host notifier area: u64 (vring index | NOFD), size and offset in the passed fd."""

    u64: int
    size: int
    offset: int
    SIZE: ClassVar[int | None] = 24

    @property
    def index(self) -> int:
        return self.u64 & VRING_INDEX_MASK

    @property
    def nofd(self) -> bool:
        return bool(self.u64 & VRING_NOFD)

    def encode(self) -> bytes:
        return _U64X3.pack(self.u64, self.size, self.offset)

    @classmethod
    def decode(cls, data: Bytes, *, request: str) -> Self:
        _check_size(data, 24, request, "vring area")
        area = cls(*_U64X3.unpack(data))
        if area.u64 & ~(VRING_INDEX_MASK | VRING_NOFD):
            raise protocol_error(
                request, "u64", f"u64 {_hex(area.u64)} has bits set above the NOFD bit"
            )
        return area

    def describe(self) -> str:
        nofd = " NOFD" if self.nofd else ""
        return f"index={self.index}{nofd} size={_hex(self.size)} offset={_hex(self.offset)}"


@dataclass(frozen=True, slots=True)
class Inflight:
    """The inflight I/O area: mmap size and offset, number and size of queues (24 bytes)."""

    mmap_size: int
    mmap_offset: int
    num_queues: int
    queue_size: int
    SIZE: ClassVar[int | None] = 24

    def encode(self) -> bytes:
        return _INFLIGHT.pack(self.mmap_size, self.mmap_offset, self.num_queues, self.queue_size)

    @classmethod
    def decode(cls, data: Bytes, *, request: str) -> Self:
        _check_size(data, 24, request, "inflight")
        return cls(*_INFLIGHT.unpack(data))

    def describe(self) -> str:
        return (
            f"mmap_size={_hex(self.mmap_size)} mmap_offset={_hex(self.mmap_offset)} "
            f"num_queues={self.num_queues} queue_size={self.queue_size}"
        )


@dataclass(frozen=True, slots=True)
class SharedObject:
    """A shared object UUID (16 bytes, RFC 4122 byte order)."""

    uuid: uuid.UUID
    SIZE: ClassVar[int | None] = 16

    def encode(self) -> bytes:
        return self.uuid.bytes

    @classmethod
    def decode(cls, data: Bytes, *, request: str) -> Self:
        _check_size(data, 16, request, "shared object")
        return cls(uuid.UUID(bytes=bytes(data)))

    def describe(self) -> str:
        return f"uuid={self.uuid}"


TRANSFER_DIRECTIONS = {0: "SAVE", 1: "LOAD"}
MIGRATION_PHASES = {0: "STOPPED"}


@dataclass(frozen=True, slots=True)
class DeviceStateTransfer:
    """SET_DEVICE_STATE_FD parameters: direction (0 save, 1 load) and phase (0 stopped)."""

    direction: int
    phase: int
    SIZE: ClassVar[int | None] = 8

    def encode(self) -> bytes:
        return _U32X2.pack(self.direction, self.phase)

    @classmethod
    def decode(cls, data: Bytes, *, request: str) -> Self:
        _check_size(data, 8, request, "device state transfer")
        params = cls(*_U32X2.unpack(data))
        if params.direction not in TRANSFER_DIRECTIONS:
            raise protocol_error(
                request, "direction", f"direction {params.direction} is not 0 (save) or 1 (load)"
            )
        if params.phase not in MIGRATION_PHASES:
            raise protocol_error(request, "phase", f"phase {params.phase} is not 0 (stopped)")
        return params

    def describe(self) -> str:
        direction = TRANSFER_DIRECTIONS.get(self.direction, str(self.direction))
        phase = MIGRATION_PHASES.get(self.phase, str(self.phase))
        return f"direction={direction} phase={phase}"


MMAP_FLAGS_MASK = 0x1


@dataclass(frozen=True, slots=True)
class MMapRequest:
    """SHMEM_MAP / SHMEM_UNMAP: shmid (u8, 7 bytes padding), fd_offset, shm_offset, len, flags."""

    shmid: int
    fd_offset: int
    shm_offset: int
    len: int
    flags: int
    SIZE: ClassVar[int | None] = 40

    def encode(self) -> bytes:
        return _MMAP.pack(self.shmid, self.fd_offset, self.shm_offset, self.len, self.flags)

    @classmethod
    def decode(cls, data: Bytes, *, request: str) -> Self:
        _check_size(data, 40, request, "MMAP request")
        req = cls(*_MMAP.unpack(data))
        if req.flags & ~MMAP_FLAGS_MASK:
            raise protocol_error(request, "flags", f"flags {_hex(req.flags)} has unknown bits")
        return req

    def describe(self) -> str:
        return (
            f"shmid={self.shmid} fd_offset={_hex(self.fd_offset)} "
            f"shm_offset={_hex(self.shm_offset)} len={_hex(self.len)} flags={self.flags}"
        )


@dataclass(frozen=True, slots=True)
class ShmemConfig:
    """VIRTIO Shared Memory Region sizes indexed by shmid; trailing zero sizes are dropped.

    On the wire: nregions (count of non-zero sizes), padding, then 256 u64 sizes.
    """

    memory_sizes: tuple[int, ...]
    SIZE: ClassVar[int | None] = _SHMEM.size

    def __post_init__(self) -> None:
        sizes = tuple(self.memory_sizes)
        if len(sizes) > MAX_SHMEM_REGIONS:
            raise ValueError(f"at most {MAX_SHMEM_REGIONS} shared memory regions")
        while sizes and sizes[-1] == 0:
            sizes = sizes[:-1]
        object.__setattr__(self, "memory_sizes", sizes)

    @property
    def nregions(self) -> int:
        return sum(1 for size in self.memory_sizes if size)

    def encode(self) -> bytes:
        padded = self.memory_sizes + (0,) * (MAX_SHMEM_REGIONS - len(self.memory_sizes))
        return _SHMEM.pack(self.nregions, 0, *padded)

    @classmethod
    def decode(cls, data: Bytes, *, request: str) -> Self:
        _check_size(data, _SHMEM.size, request, "shared memory config")
        nregions, _pad, *sizes = _SHMEM.unpack(data)
        config = cls(tuple(sizes))
        if nregions != config.nregions:
            raise protocol_error(
                request,
                "nregions",
                f"nregions {nregions} does not match the {config.nregions} non-zero sizes",
            )
        return config

    def describe(self) -> str:
        sizes = ", ".join(f"{i}:{_hex(s)}" for i, s in enumerate(self.memory_sizes) if s)
        return f"nregions={self.nregions} [{sizes}]"


@dataclass(frozen=True, slots=True)
class RawPayload:
    """Bytes of a layout this codec does not model (e.g. the crypto session description)."""

    data: bytes
    SIZE: ClassVar[int | None] = None

    def encode(self) -> bytes:
        return bytes(self.data)

    @classmethod
    def decode(cls, data: Bytes, *, request: str) -> Self:
        if len(data) > MAX_PAYLOAD_SIZE:
            raise protocol_error(request, "size", f"size {len(data)} exceeds {MAX_PAYLOAD_SIZE}")
        return cls(bytes(data))

    def describe(self) -> str:
        return f"raw[{len(self.data)}]={self.data[:64].hex()}"


Payload: TypeAlias = (
    Empty
    | U64
    | VringState
    | VringAddr
    | MemoryTable
    | MemRegMsg
    | Log
    | IotlbMsg
    | Config
    | VringArea
    | Inflight
    | SharedObject
    | DeviceStateTransfer
    | MMapRequest
    | ShmemConfig
    | RawPayload
)

PAYLOAD_TYPES: tuple[type[Payload], ...] = (
    Empty,
    U64,
    VringState,
    VringAddr,
    MemoryTable,
    MemRegMsg,
    Log,
    IotlbMsg,
    Config,
    VringArea,
    Inflight,
    SharedObject,
    DeviceStateTransfer,
    MMapRequest,
    ShmemConfig,
    RawPayload,
)
