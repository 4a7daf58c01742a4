"""virtio-scsi on the wire (virtio 1.x, ``<linux/virtio_scsi.h>``): little-endian, packed.

A command is a chain of a :class:`CmdReq` (device-readable, then any data-out) and a
:class:`CmdResp` (device-writable, then any data-in); the CDB and sense areas are sized by the
config space (:class:`ScsiConfig`, 32 and 96 bytes unless the device says otherwise). The
control queue carries :class:`TmfReq`/:class:`TmfResp` and :class:`AnReq`/:class:`AnResp`; the
event queue returns :class:`Event`. Queues: 0 control, 1 event, 2.. requests. Every ``decode``
checks sizes and enumerated values and raises :class:`~pyvhost.errors.ScsiFormatError` naming
the structure and field; every ``encode`` refuses out-of-range arguments with ValueError.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass
from typing import ClassVar, Self, TypeAlias, TypeVar

from pyvhost.errors import ScsiFormatError

__all__ = [
    "CDB_DEFAULT_SIZE",
    "CONTROL_QUEUE",
    "EVENTS_MISSED",
    "EVENT_QUEUE",
    "FIRST_REQUEST_QUEUE",
    "MAX_LUN",
    "MAX_TARGET",
    "SENSE_DEFAULT_SIZE",
    "AnReq",
    "AnResp",
    "AsyncEvent",
    "CmdReq",
    "CmdResp",
    "ControlType",
    "Event",
    "EventType",
    "Lun",
    "ResetReason",
    "Response",
    "ScsiConfig",
    "TaskAttr",
    "TmfReq",
    "TmfResp",
    "TmfSubtype",
]

Bytes: TypeAlias = bytes | bytearray | memoryview

CDB_DEFAULT_SIZE = 32
"""VIRTIO_SCSI_CDB_DEFAULT_SIZE: the config's ``cdb_size`` at reset."""
SENSE_DEFAULT_SIZE = 96
"""VIRTIO_SCSI_SENSE_DEFAULT_SIZE: the config's ``sense_size`` at reset."""
CONTROL_QUEUE = 0
EVENT_QUEUE = 1
FIRST_REQUEST_QUEUE = 2
MAX_TARGET = 255
"""The LUN field has one byte for the target."""
MAX_LUN = 16383
"""The LUN field has a 14-bit flat-space LUN."""
EVENTS_MISSED = 0x8000_0000
"""VIRTIO_SCSI_T_EVENTS_MISSED: or-ed into an event's type when the device dropped events."""

_LUN = struct.Struct("8s")
_CMD_REQ = struct.Struct("<8sQBBB")
_CMD_RESP = struct.Struct("<IIHBB")
_TMF_REQ = struct.Struct("<II8sQ")
_TMF_RESP = struct.Struct("<B")
_AN_REQ = struct.Struct("<I8sI")
_AN_RESP = struct.Struct("<IB")
_EVENT = struct.Struct("<I8sI")
_CONFIG = struct.Struct("<IIIIIIIHHI")
_U8_MAX = 0xFF
_U16_MAX = 0xFFFF
_U32_MAX = 0xFFFF_FFFF
_U64_MAX = (1 << 64) - 1


class _Named(enum.IntEnum):
    """An enum whose members also know their ``<linux/virtio_scsi.h>`` name."""

    @property
    def spec_name(self) -> str:
        """``VIRTIO_SCSI_S_BAD_TARGET``, ``VIRTIO_SCSI_T_TMF_ABORT_TASK``, ..."""
        return f"{_PREFIXES[type(self).__name__]}{self.name}"


class Response(_Named):
    """VIRTIO_SCSI_S_*: how the transport (not the SCSI target) ended a request."""

    OK = 0
    OVERRUN = 1
    ABORTED = 2
    BAD_TARGET = 3
    RESET = 4
    BUSY = 5
    TRANSPORT_FAILURE = 6
    TARGET_FAILURE = 7
    NEXUS_FAILURE = 8
    FAILURE = 9
    FUNCTION_SUCCEEDED = 10
    FUNCTION_REJECTED = 11
    INCORRECT_LUN = 12


class TaskAttr(_Named):
    """VIRTIO_SCSI_S_SIMPLE, ..._ORDERED, ..._HEAD, ..._ACA: a command's task attribute."""

    SIMPLE = 0
    ORDERED = 1
    HEAD = 2
    ACA = 3


class ControlType(_Named):
    """VIRTIO_SCSI_T_TMF, ..._AN_QUERY, ..._AN_SUBSCRIBE: the first field of a control request."""

    TMF = 0
    AN_QUERY = 1
    AN_SUBSCRIBE = 2


class TmfSubtype(_Named):
    """VIRTIO_SCSI_T_TMF_*: which task management function."""

    ABORT_TASK = 0
    ABORT_TASK_SET = 1
    CLEAR_ACA = 2
    CLEAR_TASK_SET = 3
    I_T_NEXUS_RESET = 4
    LOGICAL_UNIT_RESET = 5
    QUERY_TASK = 6
    QUERY_TASK_SET = 7


class EventType(_Named):
    """VIRTIO_SCSI_T_*: what an event reports (without the EVENTS_MISSED bit)."""

    NO_EVENT = 0
    TRANSPORT_RESET = 1
    ASYNC_NOTIFY = 2
    PARAM_CHANGE = 3


class ResetReason(_Named):
    """VIRTIO_SCSI_EVT_RESET_*: the reason of a TRANSPORT_RESET event."""

    HARD = 0
    RESCAN = 1
    REMOVED = 2


_PREFIXES = {
    "Response": "VIRTIO_SCSI_S_",
    "TaskAttr": "VIRTIO_SCSI_S_",
    "ControlType": "VIRTIO_SCSI_T_",
    "TmfSubtype": "VIRTIO_SCSI_T_TMF_",
    "EventType": "VIRTIO_SCSI_T_",
    "ResetReason": "VIRTIO_SCSI_EVT_RESET_",
}


class AsyncEvent(enum.IntFlag):
    """VIRTIO_SCSI_EVT_ASYNC_* (virtio spec, not in the Linux header): asynchronous
    notification classes, as bits of ``event_requested`` / ``event_actual`` / an event's reason."""

    OPERATIONAL_CHANGE = 2
    POWER_MGMT = 4
    EXTERNAL_REQUEST = 8
    MEDIA_CHANGE = 16
    MULTI_HOST = 32
    DEVICE_BUSY = 64


_E = TypeVar("_E", bound=enum.IntEnum)


def _member(kind: type[_E], value: int, structure: str, field: str) -> _E:
    """``kind(value)``, or ScsiFormatError naming the field when the value is not one of them."""
    try:
        return kind(value)
    except ValueError:
        raise ScsiFormatError(
            structure, field, f"{field} {value} is not a {kind.__name__} value"
        ) from None


def _need(data: Bytes, size: int, structure: str, *, exact: bool = True) -> None:
    """ScsiFormatError (field ``length``) unless ``data`` is ``size`` bytes (at least, if not
    ``exact``)."""
    if len(data) < size or (exact and len(data) != size):
        wanted = f"{size}" if exact else f"at least {size}"
        raise ScsiFormatError(structure, "length", f"length {len(data)}, expected {wanted}")


def _check_range(name: str, value: int, top: int) -> None:
    if not 0 <= value <= top:
        raise ValueError(f"{name} {value} is not in 0..{top}")


@dataclass(frozen=True, slots=True)
class Lun:
    """The 8-byte LUN field: ``[1, target, 0x40 | lun >> 8, lun & 0xff, 0, 0, 0, 0]``.

    A single-level flat-space LUN (SAM) behind byte 1's target; on Linux vhost-scsi the target
    is the LIO portal group's tag. Decoding also takes peripheral addressing (byte 2 zero) for
    LUNs below 256, as devices write in events; other addressing methods are refused.
    """

    target: int
    lun: int
    SIZE: ClassVar[int] = 8

    def __post_init__(self) -> None:
        _check_range("target", self.target, MAX_TARGET)
        _check_range("LUN", self.lun, MAX_LUN)

    def encode(self) -> bytes:
        return bytes((1, self.target, 0x40 | self.lun >> 8, self.lun & 0xFF)) + bytes(4)

    @classmethod
    def decode(cls, data: Bytes, structure: str = "lun") -> Self:
        raw = bytes(data)
        _need(raw, cls.SIZE, structure)
        if raw[0] != 1:
            raise ScsiFormatError(structure, "lun", f"lun byte 0 is {raw[0]}, expected 1")
        if any(raw[4:]):
            raise ScsiFormatError(structure, "lun", f"lun bytes 4..7 are {raw[4:].hex()}, not 0")
        method = raw[2] >> 6
        if method == 1:
            return cls(raw[1], (raw[2] & 0x3F) << 8 | raw[3])
        if raw[2] == 0:
            return cls(raw[1], raw[3])
        raise ScsiFormatError(
            structure, "lun", f"lun bytes 2..3 {raw[2:4].hex()} are not a flat or peripheral LUN"
        )


def _optional_lun(data: bytes, structure: str) -> Lun | None:
    """An event's LUN, or None when the device left it zero (NO_EVENT)."""
    return None if not any(data) else Lun.decode(data, structure)


@dataclass(frozen=True, slots=True)
class CmdReq:
    """``struct virtio_scsi_cmd_req``: the device-readable header of a command.

    ``cdb`` holds the command's own bytes; on the wire it is zero-padded to the config's
    ``cdb_size``. A decoded request keeps the whole padded field (the CDB's length is the
    opcode's business, not the transport's).
    """

    lun: Lun
    cdb: bytes
    tag: int = 0
    task_attr: TaskAttr = TaskAttr.SIMPLE
    prio: int = 0
    crn: int = 0
    HEADER_SIZE: ClassVar[int] = _CMD_REQ.size

    @staticmethod
    def size(cdb_size: int = CDB_DEFAULT_SIZE) -> int:
        """Bytes on the wire for a config ``cdb_size``."""
        return _CMD_REQ.size + cdb_size

    def encode(self, cdb_size: int = CDB_DEFAULT_SIZE) -> bytes:
        if len(self.cdb) > cdb_size:
            raise ValueError(f"CDB of {len(self.cdb)} bytes does not fit cdb_size {cdb_size}")
        _check_range("tag", self.tag, _U64_MAX)
        _check_range("prio", self.prio, _U8_MAX)
        _check_range("crn", self.crn, _U8_MAX)
        head = _CMD_REQ.pack(self.lun.encode(), self.tag, self.task_attr, self.prio, self.crn)
        return head + self.cdb.ljust(cdb_size, b"\0")

    @classmethod
    def decode(cls, data: Bytes, cdb_size: int = CDB_DEFAULT_SIZE) -> Self:
        name = "virtio_scsi_cmd_req"
        _need(data, cls.size(cdb_size), name)
        lun, tag, attr, prio, crn = _CMD_REQ.unpack_from(data)
        return cls(
            Lun.decode(lun, name),
            bytes(data[_CMD_REQ.size :]),
            tag,
            _member(TaskAttr, attr, name, "task_attr"),
            prio,
            crn,
        )


@dataclass(frozen=True, slots=True)
class CmdResp:
    """``struct virtio_scsi_cmd_resp``: what the device wrote back for a command.

    ``status`` is the SAM status byte of the target (see :class:`~.sense.Status`); ``sense``
    holds the first ``sense_len`` bytes of the sense area. ``resid`` is how many data bytes
    were not transferred.
    """

    response: Response
    status: int = 0
    sense: bytes = b""
    resid: int = 0
    status_qualifier: int = 0
    HEADER_SIZE: ClassVar[int] = _CMD_RESP.size

    @staticmethod
    def size(sense_size: int = SENSE_DEFAULT_SIZE) -> int:
        """Bytes on the wire for a config ``sense_size``."""
        return _CMD_RESP.size + sense_size

    @property
    def ok(self) -> bool:
        """The transport delivered the command and the target answered GOOD."""
        return self.response == Response.OK and self.status == 0

    def encode(self, sense_size: int = SENSE_DEFAULT_SIZE) -> bytes:
        if len(self.sense) > sense_size:
            raise ValueError(
                f"sense of {len(self.sense)} bytes does not fit sense_size {sense_size}"
            )
        _check_range("resid", self.resid, _U32_MAX)
        _check_range("status_qualifier", self.status_qualifier, _U16_MAX)
        _check_range("status", self.status, _U8_MAX)
        head = _CMD_RESP.pack(
            len(self.sense), self.resid, self.status_qualifier, self.status, self.response
        )
        return head + self.sense.ljust(sense_size, b"\0")

    @classmethod
    def decode(
        cls, data: Bytes, sense_size: int | None = None, *, data_in_length: int | None = None
    ) -> Self:
        """Parse ``data`` (header and sense area; the sense area is ``sense_size`` bytes, or the
        rest of ``data``). With ``data_in_length``, a residual larger than the data-in buffer is
        refused too."""
        name = "virtio_scsi_cmd_resp"
        _need(data, _CMD_RESP.size, name, exact=False)
        sense_len, resid, qualifier, status, response = _CMD_RESP.unpack_from(data)
        area = bytes(data[_CMD_RESP.size :])
        if sense_size is not None:
            area = area[:sense_size]
        if sense_len > len(area):
            raise ScsiFormatError(
                name, "sense_len", f"sense_len {sense_len} exceeds the {len(area)}-byte sense area"
            )
        if data_in_length is not None and resid > data_in_length:
            raise ScsiFormatError(
                name, "resid", f"resid {resid} exceeds the {data_in_length}-byte data-in buffer"
            )
        kind = _member(Response, response, name, "response")
        return cls(kind, status, area[:sense_len], resid, qualifier)


@dataclass(frozen=True, slots=True)
class TmfReq:
    """``struct virtio_scsi_ctrl_tmf_req`` (type TMF): a task management function on the
    control queue; ``tag`` names the command for ABORT_TASK and QUERY_TASK."""

    subtype: TmfSubtype
    lun: Lun
    tag: int = 0
    SIZE: ClassVar[int] = _TMF_REQ.size

    def encode(self) -> bytes:
        _check_range("tag", self.tag, _U64_MAX)
        return _TMF_REQ.pack(ControlType.TMF, self.subtype, self.lun.encode(), self.tag)

    @classmethod
    def decode(cls, data: Bytes) -> Self:
        name = "virtio_scsi_ctrl_tmf_req"
        _need(data, cls.SIZE, name)
        kind, subtype, lun, tag = _TMF_REQ.unpack(data)
        if kind != ControlType.TMF:
            raise ScsiFormatError(name, "type", f"type {kind}, expected VIRTIO_SCSI_T_TMF (0)")
        return cls(_member(TmfSubtype, subtype, name, "subtype"), Lun.decode(lun, name), tag)


@dataclass(frozen=True, slots=True)
class TmfResp:
    """``struct virtio_scsi_ctrl_tmf_resp``: FUNCTION_SUCCEEDED, FUNCTION_REJECTED, ..."""

    response: Response
    SIZE: ClassVar[int] = _TMF_RESP.size

    def encode(self) -> bytes:
        return _TMF_RESP.pack(self.response)

    @classmethod
    def decode(cls, data: Bytes) -> Self:
        name = "virtio_scsi_ctrl_tmf_resp"
        _need(data, cls.SIZE, name)
        return cls(_member(Response, data[0], name, "response"))


_AN_TYPES = (ControlType.AN_QUERY, ControlType.AN_SUBSCRIBE)


@dataclass(frozen=True, slots=True)
class AnReq:
    """``struct virtio_scsi_ctrl_an_req``: query (AN_QUERY) or subscribe to (AN_SUBSCRIBE)
    asynchronous notifications of the classes in ``event_requested``."""

    type: ControlType
    lun: Lun
    event_requested: AsyncEvent
    SIZE: ClassVar[int] = _AN_REQ.size

    def __post_init__(self) -> None:
        if self.type not in _AN_TYPES:
            raise ValueError(f"an AN request's type is AN_QUERY or AN_SUBSCRIBE, not {self.type}")

    def encode(self) -> bytes:
        _check_range("event_requested", self.event_requested, _U32_MAX)
        return _AN_REQ.pack(self.type, self.lun.encode(), self.event_requested)

    @classmethod
    def decode(cls, data: Bytes) -> Self:
        name = "virtio_scsi_ctrl_an_req"
        _need(data, cls.SIZE, name)
        kind, lun, requested = _AN_REQ.unpack(data)
        if kind not in _AN_TYPES:
            raise ScsiFormatError(
                name, "type", f"type {kind} is not AN_QUERY (1) or AN_SUBSCRIBE (2)"
            )
        return cls(ControlType(kind), Lun.decode(lun, name), AsyncEvent(requested))


@dataclass(frozen=True, slots=True)
class AnResp:
    """``struct virtio_scsi_ctrl_an_resp``: the classes the device supports (or subscribed)."""

    event_actual: AsyncEvent
    response: Response
    SIZE: ClassVar[int] = _AN_RESP.size

    def encode(self) -> bytes:
        _check_range("event_actual", self.event_actual, _U32_MAX)
        return _AN_RESP.pack(self.event_actual, self.response)

    @classmethod
    def decode(cls, data: Bytes) -> Self:
        name = "virtio_scsi_ctrl_an_resp"
        _need(data, cls.SIZE, name)
        actual, response = _AN_RESP.unpack(data)
        return cls(AsyncEvent(actual), _member(Response, response, name, "response"))


@dataclass(frozen=True, slots=True)
class Event:
    """``struct virtio_scsi_event``, written by the device into an event-queue buffer.

    ``lun`` is None when the device left the field zero (NO_EVENT). ``reason`` is a
    :class:`ResetReason` for TRANSPORT_RESET, :class:`AsyncEvent` bits for ASYNC_NOTIFY, and
    ``asc | ascq << 8`` for PARAM_CHANGE. ``missed``: the device had dropped events before this.
    """

    type: EventType
    lun: Lun | None = None
    reason: int = 0
    missed: bool = False
    SIZE: ClassVar[int] = _EVENT.size

    def encode(self) -> bytes:
        _check_range("reason", self.reason, _U32_MAX)
        event = self.type | (EVENTS_MISSED if self.missed else 0)
        lun = self.lun.encode() if self.lun is not None else bytes(Lun.SIZE)
        return _EVENT.pack(event, lun, self.reason)

    @classmethod
    def decode(cls, data: Bytes) -> Self:
        name = "virtio_scsi_event"
        _need(data, cls.SIZE, name)
        event, lun, reason = _EVENT.unpack(data)
        kind = _member(EventType, event & ~EVENTS_MISSED, name, "event")
        return cls(kind, _optional_lun(lun, name), reason, bool(event & EVENTS_MISSED))


@dataclass(frozen=True, slots=True)
class ScsiConfig:
    """``struct virtio_scsi_config`` (36 bytes). Defaults are QEMU's virtio-scsi values for a
    128-entry ring; ``num_queues`` counts request queues only (control and event come first)."""

    num_queues: int = 1
    seg_max: int = 126
    max_sectors: int = 0xFFFF
    cmd_per_lun: int = 128
    event_info_size: int = Event.SIZE
    sense_size: int = SENSE_DEFAULT_SIZE
    cdb_size: int = CDB_DEFAULT_SIZE
    max_channel: int = 0
    max_target: int = MAX_TARGET
    max_lun: int = MAX_LUN
    SIZE: ClassVar[int] = _CONFIG.size

    @property
    def queue_count(self) -> int:
        """All virtqueues: control, event and the request queues."""
        return FIRST_REQUEST_QUEUE + self.num_queues

    def encode(self) -> bytes:
        return _CONFIG.pack(
            self.num_queues,
            self.seg_max,
            self.max_sectors,
            self.cmd_per_lun,
            self.event_info_size,
            self.sense_size,
            self.cdb_size,
            self.max_channel,
            self.max_target,
            self.max_lun,
        )

    @classmethod
    def decode(cls, data: Bytes) -> Self:
        name = "virtio_scsi_config"
        _need(data, cls.SIZE, name)
        config = cls(*_CONFIG.unpack(data))
        if config.num_queues == 0:
            raise ScsiFormatError(name, "num_queues", "num_queues is 0: no request queue")
        return config
