"""SCSI commands a block driver needs: CDB builders (SPC, SBC) and parsers of what they return.

Each builder returns a :class:`Command`: the CDB, the data-out bytes and how many data-in bytes
to expect, which is all a transport needs to lay out a request. Parsers take the data-in bytes
(trimmed by the residual) and raise :class:`~pyvhost.errors.ScsiFormatError` naming the field
when they are malformed. Multi-byte fields are big-endian, as everywhere in SCSI.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass
from typing import TypeAlias

from pyvhost.errors import ScsiFormatError
from pyvhost.virtio.scsi.sense import parse_sense

__all__ = [
    "SAI_READ_CAPACITY_16",
    "Capacity",
    "Command",
    "Inquiry",
    "Opcode",
    "ReportLuns",
    "inquiry",
    "parse_inquiry",
    "parse_read_capacity_10",
    "parse_read_capacity_16",
    "parse_report_luns",
    "parse_request_sense",
    "read_10",
    "read_16",
    "read_capacity_10",
    "read_capacity_16",
    "report_luns",
    "request_sense",
    "synchronize_cache_10",
    "test_unit_ready",
    "write_10",
    "write_16",
]

Bytes: TypeAlias = bytes | bytearray | memoryview


class Opcode(enum.IntEnum):
    """Operation codes (SPC, SBC; as in Linux ``<scsi/scsi_proto.h>``)."""

    TEST_UNIT_READY = 0x00
    REQUEST_SENSE = 0x03
    INQUIRY = 0x12
    READ_CAPACITY_10 = 0x25
    READ_10 = 0x28
    WRITE_10 = 0x2A
    SYNCHRONIZE_CACHE_10 = 0x35
    READ_16 = 0x88
    WRITE_16 = 0x8A
    SERVICE_ACTION_IN_16 = 0x9E
    REPORT_LUNS = 0xA0


SAI_READ_CAPACITY_16 = 0x10
"""The SERVICE ACTION IN(16) service action of READ CAPACITY(16)."""
DEFAULT_BLOCK_SIZE = 512
INQUIRY_STANDARD_SIZE = 36
"""Standard INQUIRY data up to the product revision level."""
CAPACITY_10_SIZE = 8
CAPACITY_16_SIZE = 32
REPORT_LUNS_HEADER = 8
REPORT_LUNS_MIN_ALLOCATION = 16
"""SPC: an allocation length below 16 is an error for REPORT LUNS."""
FUA = 0x08
"""Byte 1 of READ/WRITE(10/16): force unit access."""
IMMED = 0x02
"""Byte 1 of SYNCHRONIZE CACHE(10): return before the cache is flushed."""

_U16_MAX = 0xFFFF
_U32_MAX = 0xFFFF_FFFF
_U64_MAX = (1 << 64) - 1
_RW10 = struct.Struct(">BBIBHB")
_RW16 = struct.Struct(">BBQIBB")
_CAPACITY_10 = struct.Struct(">II")
_CAPACITY_16 = struct.Struct(">QIBBH")


@dataclass(frozen=True, slots=True)
class Command:
    """One SCSI command: its CDB, the data it sends and how many bytes it may receive."""

    name: str
    cdb: bytes
    data_out: bytes = b""
    data_in_length: int = 0


def _check(name: str, value: int, top: int, low: int = 0) -> None:
    if not low <= value <= top:
        raise ValueError(f"{name} {value} is not in {low}..{top}")


def test_unit_ready() -> Command:
    """TEST UNIT READY: GOOD when the logical unit can take media-access commands."""
    return Command("TEST UNIT READY", bytes(6))


def inquiry(allocation_length: int = 96, *, page: int | None = None) -> Command:
    """INQUIRY: standard data, or the vital product data ``page`` (EVPD)."""
    _check("allocation_length", allocation_length, _U16_MAX)
    evpd, code = (0, 0) if page is None else (1, page)
    if page is not None:
        _check("page", page, 0xFF)
    cdb = bytes((Opcode.INQUIRY, evpd, code)) + allocation_length.to_bytes(2, "big") + b"\0"
    return Command("INQUIRY", cdb, data_in_length=allocation_length)


def request_sense(allocation_length: int = 96, *, descriptor: bool = False) -> Command:
    """REQUEST SENSE: the sense data of the last command (fixed format unless ``descriptor``)."""
    _check("allocation_length", allocation_length, 0xFF)
    cdb = bytes((Opcode.REQUEST_SENSE, int(descriptor), 0, 0, allocation_length, 0))
    return Command("REQUEST SENSE", cdb, data_in_length=allocation_length)


def read_capacity_10() -> Command:
    """READ CAPACITY(10): last LBA (0xFFFFFFFF: too large, use (16)) and block size."""
    cdb = bytes((Opcode.READ_CAPACITY_10,)) + bytes(9)
    return Command("READ CAPACITY(10)", cdb, data_in_length=CAPACITY_10_SIZE)


def read_capacity_16(allocation_length: int = CAPACITY_16_SIZE) -> Command:
    """READ CAPACITY(16) (SERVICE ACTION IN(16)): last LBA, block size, provisioning bits."""
    _check("allocation_length", allocation_length, _U32_MAX)
    cdb = (
        bytes((Opcode.SERVICE_ACTION_IN_16, SAI_READ_CAPACITY_16))
        + bytes(8)
        + allocation_length.to_bytes(4, "big")
        + bytes(2)
    )
    return Command("READ CAPACITY(16)", cdb, data_in_length=allocation_length)


def report_luns(allocation_length: int = 4096, *, select_report: int = 0) -> Command:
    """REPORT LUNS: the LUN inventory (``select_report`` 0: the logical units of the target)."""
    _check("allocation_length", allocation_length, _U32_MAX, REPORT_LUNS_MIN_ALLOCATION)
    _check("select_report", select_report, 0xFF)
    cdb = (
        bytes((Opcode.REPORT_LUNS, 0, select_report))
        + bytes(3)
        + allocation_length.to_bytes(4, "big")
        + bytes(2)
    )
    return Command("REPORT LUNS", cdb, data_in_length=allocation_length)


def _blocks_of(data: Bytes, block_size: int) -> int:
    if block_size <= 0 or len(data) % block_size:
        raise ValueError(f"data of {len(data)} bytes is not whole blocks of {block_size}")
    return len(data) // block_size


def _rw10(opcode: Opcode, lba: int, blocks: int, fua: bool) -> bytes:
    _check("lba", lba, _U32_MAX)
    _check("blocks", blocks, _U16_MAX)
    return _RW10.pack(opcode, FUA if fua else 0, lba, 0, blocks, 0)


def _rw16(opcode: Opcode, lba: int, blocks: int, fua: bool) -> bytes:
    _check("lba", lba, _U64_MAX)
    _check("blocks", blocks, _U32_MAX)
    return _RW16.pack(opcode, FUA if fua else 0, lba, blocks, 0, 0)


def read_10(
    lba: int, blocks: int, *, block_size: int = DEFAULT_BLOCK_SIZE, fua: bool = False
) -> Command:
    """READ(10): ``blocks`` blocks from ``lba`` (32-bit LBA, up to 65535 blocks)."""
    cdb = _rw10(Opcode.READ_10, lba, blocks, fua)
    return Command("READ(10)", cdb, data_in_length=blocks * block_size)


def read_16(
    lba: int, blocks: int, *, block_size: int = DEFAULT_BLOCK_SIZE, fua: bool = False
) -> Command:
    """READ(16): ``blocks`` blocks from ``lba`` (64-bit LBA, 32-bit count)."""
    cdb = _rw16(Opcode.READ_16, lba, blocks, fua)
    return Command("READ(16)", cdb, data_in_length=blocks * block_size)


def write_10(
    lba: int, data: Bytes, *, block_size: int = DEFAULT_BLOCK_SIZE, fua: bool = False
) -> Command:
    """WRITE(10): ``data`` (whole blocks) at ``lba``."""
    cdb = _rw10(Opcode.WRITE_10, lba, _blocks_of(data, block_size), fua)
    return Command("WRITE(10)", cdb, bytes(data))


def write_16(
    lba: int, data: Bytes, *, block_size: int = DEFAULT_BLOCK_SIZE, fua: bool = False
) -> Command:
    """WRITE(16): ``data`` (whole blocks) at ``lba``."""
    cdb = _rw16(Opcode.WRITE_16, lba, _blocks_of(data, block_size), fua)
    return Command("WRITE(16)", cdb, bytes(data))


def synchronize_cache_10(lba: int = 0, blocks: int = 0, *, immed: bool = False) -> Command:
    """SYNCHRONIZE CACHE(10): write the cached range (``blocks`` 0: from ``lba`` to the end)."""
    _check("lba", lba, _U32_MAX)
    _check("blocks", blocks, _U16_MAX)
    cdb = _RW10.pack(Opcode.SYNCHRONIZE_CACHE_10, IMMED if immed else 0, lba, 0, blocks, 0)
    return Command("SYNCHRONIZE CACHE(10)", cdb)


# --- what comes back ---------------------------------------------------------------------------


def _need(data: Bytes, size: int, structure: str) -> None:
    if len(data) < size:
        raise ScsiFormatError(
            structure, "length", f"length {len(data)}, shorter than the {size} bytes it needs"
        )


def _ascii(raw: bytes, structure: str, field: str) -> str:
    """An SPC ASCII field: printable characters, trailing spaces dropped."""
    if any(b < 0x20 or b > 0x7E for b in raw):
        raise ScsiFormatError(structure, field, f"{field} {raw!r} is not printable ASCII")
    return raw.decode("ascii").rstrip(" ")


@dataclass(frozen=True, slots=True)
class Inquiry:
    """Standard INQUIRY data (SPC): who the logical unit is."""

    peripheral_qualifier: int
    device_type: int
    """0 direct-access block device (a disk), 5 CD/DVD, 0x1F unknown or no device."""
    removable: bool
    version: int
    """The SPC version claimed (5 SPC-3, 6 SPC-4, 7 SPC-5)."""
    response_data_format: int
    additional_length: int
    vendor: str
    product: str
    revision: str


def parse_inquiry(data: Bytes) -> Inquiry:
    """The first 36 bytes of standard INQUIRY data."""
    name = "INQUIRY data"
    raw = bytes(data)
    _need(raw, INQUIRY_STANDARD_SIZE, name)
    return Inquiry(
        peripheral_qualifier=raw[0] >> 5,
        device_type=raw[0] & 0x1F,
        removable=bool(raw[1] & 0x80),
        version=raw[2],
        response_data_format=raw[3] & 0x0F,
        additional_length=raw[4],
        vendor=_ascii(raw[8:16], name, "vendor"),
        product=_ascii(raw[16:32], name, "product"),
        revision=_ascii(raw[32:36], name, "revision"),
    )


@dataclass(frozen=True, slots=True)
class Capacity:
    """READ CAPACITY data: the last LBA and the logical block size (and, from (16), more)."""

    last_lba: int
    block_size: int
    protection: bool = False
    protection_type: int = 0
    blocks_per_physical_exponent: int = 0
    lowest_aligned_lba: int = 0
    thin_provisioned: bool = False
    unmapped_reads_zero: bool = False

    @property
    def blocks(self) -> int:
        return self.last_lba + 1

    @property
    def size(self) -> int:
        """Bytes of the logical unit."""
        return self.blocks * self.block_size


def _block_size(value: int, structure: str) -> int:
    if value == 0:
        raise ScsiFormatError(structure, "block_length", "block_length is 0")
    return value


def parse_read_capacity_10(data: Bytes) -> Capacity:
    """READ CAPACITY(10) data; a last LBA of 0xFFFFFFFF means: ask READ CAPACITY(16)."""
    name = "READ CAPACITY(10) data"
    _need(data, CAPACITY_10_SIZE, name)
    last_lba, block_size = _CAPACITY_10.unpack_from(data)
    return Capacity(last_lba, _block_size(block_size, name))


def parse_read_capacity_16(data: Bytes) -> Capacity:
    """READ CAPACITY(16) parameter data (32 bytes)."""
    name = "READ CAPACITY(16) data"
    _need(data, CAPACITY_16_SIZE, name)
    last_lba, block_size, prot, exponents, aligned = _CAPACITY_16.unpack_from(data)
    return Capacity(
        last_lba,
        _block_size(block_size, name),
        protection=bool(prot & 0x01),
        protection_type=(prot >> 1) & 0x07,
        blocks_per_physical_exponent=exponents & 0x0F,
        lowest_aligned_lba=aligned & 0x3FFF,
        thin_provisioned=bool(aligned & 0x8000),
        unmapped_reads_zero=bool(aligned & 0x4000),
    )


@dataclass(frozen=True, slots=True)
class ReportLuns:
    """REPORT LUNS data: the 8-byte LUN entries, and whether the list was cut short."""

    list_length: int
    """What the device has, in bytes (8 per LUN), whatever the allocation length was."""
    entries: tuple[bytes, ...]

    @property
    def truncated(self) -> bool:
        """The allocation length was too small: ask again with ``8 + list_length``."""
        return len(self.entries) * 8 < self.list_length

    def numbers(self) -> list[int]:
        """The LUN numbers, for single-level peripheral (bus 0) or flat-space entries."""
        return [_lun_number(entry) for entry in self.entries]


def _lun_number(entry: bytes) -> int:
    method = entry[0] >> 6
    if any(entry[2:]) or method > 1 or (method == 0 and entry[0] != 0):
        raise ScsiFormatError(
            "REPORT LUNS data", "lun", f"lun {entry.hex()} is not a single-level LUN"
        )
    return (entry[0] & 0x3F) << 8 | entry[1]


def parse_report_luns(data: Bytes) -> ReportLuns:
    """The LUN list header and as many whole entries as ``data`` holds."""
    name = "REPORT LUNS data"
    raw = bytes(data)
    _need(raw, REPORT_LUNS_HEADER, name)
    list_length = int.from_bytes(raw[:4], "big")
    if list_length % 8:
        raise ScsiFormatError(
            name, "list_length", f"list_length {list_length} is not a multiple of 8"
        )
    end = min(len(raw), REPORT_LUNS_HEADER + list_length)
    count = (end - REPORT_LUNS_HEADER) // 8
    entries = tuple(raw[8 + 8 * i : 16 + 8 * i] for i in range(count))
    return ReportLuns(list_length, entries)


parse_request_sense = parse_sense
"""REQUEST SENSE returns sense data: :func:`~pyvhost.virtio.scsi.sense.parse_sense`."""
