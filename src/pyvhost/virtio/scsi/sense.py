"""How a SCSI command ended: the SAM status byte and sense data (SPC fixed and descriptor formats).

:func:`parse_sense` reads what a device left in a response's sense area (or what REQUEST SENSE
returned) into :class:`Sense`: sense key, additional sense code and qualifier, with names for the
common ones (:func:`asc_name`), so an error can say ``ILLEGAL REQUEST: Invalid field in CDB
(24h/00h)`` instead of three numbers.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass
from types import MappingProxyType
from typing import TypeAlias

from pyvhost.errors import ScsiFormatError

__all__ = [
    "ASC_NAMES",
    "Sense",
    "SenseKey",
    "Status",
    "asc_name",
    "parse_sense",
]

Bytes: TypeAlias = bytes | bytearray | memoryview

FIXED_CURRENT = 0x70
FIXED_DEFERRED = 0x71
DESCRIPTOR_CURRENT = 0x72
DESCRIPTOR_DEFERRED = 0x73
_HEADER = 8
"""Both formats have an 8-byte header; byte 7 is the additional sense length."""
_FIXED_ASCQ_END = 14
"""Fixed format: ASC at byte 12, ASCQ at byte 13."""
_INFORMATION_DESCRIPTOR = 0x00
_U32_BE = struct.Struct(">I")
_U64_BE = struct.Struct(">Q")


class Status(enum.IntEnum):
    """SAM status codes (the ``status`` byte of a virtio-scsi response)."""

    GOOD = 0x00
    CHECK_CONDITION = 0x02
    CONDITION_MET = 0x04
    BUSY = 0x08
    RESERVATION_CONFLICT = 0x18
    TASK_SET_FULL = 0x28
    ACA_ACTIVE = 0x30
    TASK_ABORTED = 0x40


class SenseKey(enum.IntEnum):
    """SPC sense keys: all 16 values of the 4-bit field (0xC is SCSI-2's EQUAL, now reserved)."""

    NO_SENSE = 0x0
    RECOVERED_ERROR = 0x1
    NOT_READY = 0x2
    MEDIUM_ERROR = 0x3
    HARDWARE_ERROR = 0x4
    ILLEGAL_REQUEST = 0x5
    UNIT_ATTENTION = 0x6
    DATA_PROTECT = 0x7
    BLANK_CHECK = 0x8
    VENDOR_SPECIFIC = 0x9
    COPY_ABORTED = 0xA
    ABORTED_COMMAND = 0xB
    EQUAL = 0xC
    VOLUME_OVERFLOW = 0xD
    MISCOMPARE = 0xE
    COMPLETED = 0xF

    @property
    def text(self) -> str:
        """``ILLEGAL REQUEST``, as SPC spells it."""
        return self.name.replace("_", " ")


ASC_NAMES = MappingProxyType(
    {
        (0x00, 0x00): "No additional sense information",
        (0x04, 0x00): "Logical unit not ready, cause not reportable",
        (0x04, 0x01): "Logical unit is in process of becoming ready",
        (0x04, 0x02): "Logical unit not ready, initializing command required",
        (0x04, 0x03): "Logical unit not ready, manual intervention required",
        (0x08, 0x00): "Logical unit communication failure",
        (0x0C, 0x00): "Write error",
        (0x10, 0x01): "Logical block guard check failed",
        (0x11, 0x00): "Unrecovered read error",
        (0x1A, 0x00): "Parameter list length error",
        (0x20, 0x00): "Invalid command operation code",
        (0x21, 0x00): "Logical block address out of range",
        (0x24, 0x00): "Invalid field in CDB",
        (0x25, 0x00): "Logical unit not supported",
        (0x26, 0x00): "Invalid field in parameter list",
        (0x27, 0x00): "Write protected",
        (0x28, 0x00): "Not ready to ready change, medium may have changed",
        (0x29, 0x00): "Power on, reset, or bus device reset occurred",
        (0x29, 0x01): "Power on occurred",
        (0x29, 0x02): "SCSI bus reset occurred",
        (0x29, 0x03): "Bus device reset function occurred",
        (0x29, 0x07): "I_T nexus loss occurred",
        (0x2A, 0x01): "Mode parameters changed",
        (0x2A, 0x09): "Capacity data has changed",
        (0x3A, 0x00): "Medium not present",
        (0x3F, 0x03): "Inquiry data has changed",
        (0x3F, 0x0E): "Reported LUNs data has changed",
        (0x44, 0x00): "Internal target failure",
        (0x47, 0x00): "SCSI parity error",
        (0x4B, 0x00): "Data phase error",
        (0x55, 0x03): "Insufficient resources",
    }
)
"""Names of the additional sense codes a block device commonly returns (T10 asc-num list)."""


def asc_name(asc: int, ascq: int) -> str | None:
    """The T10 name of ``(asc, ascq)``, if it is one of :data:`ASC_NAMES`."""
    return ASC_NAMES.get((asc, ascq))


@dataclass(frozen=True, slots=True)
class Sense:
    """Parsed sense data: the parts every caller looks at, and the raw bytes for the rest."""

    response_code: int
    key: SenseKey
    asc: int
    ascq: int
    information: int | None = None
    """The INFORMATION field (fixed: when VALID is set; descriptor: its information descriptor),
    for a medium error the failing LBA."""
    raw: bytes = b""

    @property
    def descriptor_format(self) -> bool:
        return self.response_code in (DESCRIPTOR_CURRENT, DESCRIPTOR_DEFERRED)

    @property
    def deferred(self) -> bool:
        """The error belongs to an earlier command (a write-behind that failed, for example)."""
        return self.response_code in (FIXED_DEFERRED, DESCRIPTOR_DEFERRED)

    @property
    def asc_text(self) -> str | None:
        return asc_name(self.asc, self.ascq)

    def describe(self) -> str:
        """``ILLEGAL REQUEST: Invalid field in CDB (24h/00h)``."""
        codes = f"{self.asc:02X}h/{self.ascq:02X}h"
        text = self.asc_text
        detail = f"{text} ({codes})" if text else f"ASC/ASCQ {codes}"
        return f"{'deferred ' if self.deferred else ''}{self.key.text}: {detail}"


def parse_sense(data: Bytes) -> Sense:
    """Parse fixed (70h/71h) or descriptor (72h/73h) sense data; ScsiFormatError naming the
    field when it is neither or ends before its sense key, ASC and ASCQ."""
    raw = bytes(data)
    if len(raw) < _HEADER:
        raise ScsiFormatError(
            "sense data", "length", f"length {len(raw)}, shorter than the 8-byte header"
        )
    code = raw[0] & 0x7F
    if code in (FIXED_CURRENT, FIXED_DEFERRED):
        return _fixed(raw, code)
    if code in (DESCRIPTOR_CURRENT, DESCRIPTOR_DEFERRED):
        return _descriptor(raw, code)
    raise ScsiFormatError(
        "sense data", "response_code", f"response_code {code:#04x} is not 70h, 71h, 72h or 73h"
    )


def _fixed(raw: bytes, code: int) -> Sense:
    """Fixed format: key in byte 2, INFORMATION in bytes 3..6 (if VALID), ASC/ASCQ at 12/13."""
    end = min(len(raw), _HEADER + raw[7])
    if end < _FIXED_ASCQ_END:
        raise ScsiFormatError(
            "fixed sense data",
            "additional_length",
            f"additional_length {raw[7]} with {len(raw)} bytes ends before ASC/ASCQ (byte 13)",
        )
    information = _U32_BE.unpack_from(raw, 3)[0] if raw[0] & 0x80 else None
    return Sense(code, SenseKey(raw[2] & 0x0F), raw[12], raw[13], information, raw[:end])


def _descriptor(raw: bytes, code: int) -> Sense:
    """Descriptor format: key, ASC, ASCQ in bytes 1..3; descriptors after the header."""
    end = min(len(raw), _HEADER + raw[7])
    information = None
    offset = _HEADER
    while offset + 2 <= end:
        kind, length = raw[offset], raw[offset + 1]
        if offset + 2 + length > end:
            raise ScsiFormatError(
                "descriptor sense data",
                "descriptor",
                f"descriptor {kind:#04x} at byte {offset} runs past the sense data ({end} bytes)",
            )
        if kind == _INFORMATION_DESCRIPTOR and length >= 10 and raw[offset + 2] & 0x80:
            information = _U64_BE.unpack_from(raw, offset + 4)[0]
        offset += 2 + length
    return Sense(code, SenseKey(raw[1] & 0x0F), raw[2], raw[3], information, raw[:end])
