"""The virtio-vsock wire format: packet header, operation and type numbers, config and event.

Numbers as in Linux's ``include/uapi/linux/virtio_vsock.h`` and ``linux/vm_sockets.h`` (the tests
compile them against this machine's headers) and the virtio spec, section "Socket Device".
Decoding checks only the layout; :func:`check_packet` judges what a packet means, so that a
receiver can still answer a packet it refuses (an RST needs the addresses of what it answers).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum, IntFlag
from typing import ClassVar, Self, TypeAlias

from pyvhost.errors import ProtocolError
from pyvhost.virtio.features import VSOCK_F_SEQPACKET

Bytes: TypeAlias = bytes | bytearray | memoryview

RX_QUEUE = 0
TX_QUEUE = 1
EVENT_QUEUE = 2

VMADDR_CID_HYPERVISOR = 0
VMADDR_CID_LOCAL = 1
VMADDR_CID_HOST = 2
VMADDR_CID_ANY = 0xFFFF_FFFF
VMADDR_PORT_ANY = 0xFFFF_FFFF
HOST_CID = VMADDR_CID_HOST
LAST_RESERVED_PORT = 1023
"""Ports up to this one are privileged in Linux; local ports are allocated above it."""

F_SEQPACKET = VSOCK_F_SEQPACKET
"""VIRTIO_VSOCK_F_SEQPACKET: the only feature bit in the uapi header; this module speaks STREAM."""

MAX_PKT_BUF_SIZE = 64 * 1024
"""Linux's VIRTIO_VSOCK_MAX_PKT_BUF_SIZE: the largest payload it puts in one packet."""

DEFAULT_BUF_ALLOC = 256 * 1024
"""Linux's default socket buffer size (VSOCK_DEFAULT_BUFFER_SIZE), advertised as buf_alloc."""

U32_MASK = 0xFFFF_FFFF
"""buf_alloc, fwd_cnt and the byte counters they are compared with wrap at 2**32."""

_HEADER = struct.Struct("<QQIIIHHIII")
_CONFIG = struct.Struct("<Q")
_EVENT = struct.Struct("<I")
HEADER_SIZE = _HEADER.size


class Type(IntEnum):
    """virtio_vsock_type: the socket type a packet belongs to."""

    STREAM = 1
    SEQPACKET = 2


class Op(IntEnum):
    """virtio_vsock_op: what a packet does."""

    INVALID = 0
    REQUEST = 1
    RESPONSE = 2
    RST = 3
    SHUTDOWN = 4
    RW = 5
    CREDIT_UPDATE = 6
    CREDIT_REQUEST = 7


class Shutdown(IntFlag):
    """virtio_vsock_shutdown: the SHUTDOWN flags; a set bit is permanent for the connection."""

    RCV = 1
    SEND = 2


SHUTDOWN_BOTH = Shutdown.RCV | Shutdown.SEND


class EventId(IntEnum):
    """virtio_vsock_event_id: what the device reports on the event queue."""

    TRANSPORT_RESET = 0


SEQ_EOM = 1
"""RW flag of a SEQPACKET message's last packet (known, not used: only STREAM is spoken)."""
SEQ_EOR = 2
"""RW flag of a SEQPACKET record's end (known, not used)."""

_HEADER_FIELDS = (
    ("src_cid", 64),
    ("dst_cid", 64),
    ("src_port", 32),
    ("dst_port", 32),
    ("len", 32),
    ("type", 16),
    ("op", 16),
    ("flags", 32),
    ("buf_alloc", 32),
    ("fwd_cnt", 32),
)


_OPS = frozenset(int(op) for op in Op)


def _error(field: str, message: str, op: int | None = None) -> ProtocolError:
    """A ProtocolError whose text names the layout and the field, and whose request is the op."""
    request = op_name(op) if op is not None else None
    return ProtocolError(f"virtio_vsock_hdr: {field}: {message}", request=request, field=field)


def op_name(op: int) -> str:
    """The spec name of ``op`` (``RW``), or ``op<N>`` for a number the spec does not define."""
    return Op(op).name if op in _OPS else f"op{op}"


def _check_fields(instance: object, fields: tuple[tuple[str, int], ...], layout: str) -> None:
    for name, bits in fields:
        value = getattr(instance, name)
        if not isinstance(value, int) or not 0 <= value < 1 << bits:
            raise ProtocolError(f"{layout}: {name}: {value!r} does not fit in u{bits}", field=name)


@dataclass(frozen=True, slots=True)
class VsockHeader:
    """struct virtio_vsock_hdr: 44 little-endian bytes in front of every packet's payload."""

    src_cid: int
    dst_cid: int
    src_port: int
    dst_port: int
    len: int
    type: int
    op: int
    flags: int
    buf_alloc: int
    fwd_cnt: int
    SIZE: ClassVar[int] = HEADER_SIZE

    def __post_init__(self) -> None:
        _check_fields(self, _HEADER_FIELDS, "virtio_vsock_hdr")

    def encode(self) -> bytes:
        return _HEADER.pack(
            self.src_cid,
            self.dst_cid,
            self.src_port,
            self.dst_port,
            self.len,
            self.type,
            self.op,
            self.flags,
            self.buf_alloc,
            self.fwd_cnt,
        )

    @classmethod
    def decode(cls, data: Bytes) -> Self:
        """The header in exactly ``HEADER_SIZE`` bytes; any field value is accepted here."""
        if len(data) != HEADER_SIZE:
            raise _error("size", f"{len(data)} bytes, expected {HEADER_SIZE}")
        return cls(*_HEADER.unpack(data))

    def describe(self) -> str:
        """One line for logs: addresses, op, type and every counter."""
        return (
            f"{self.src_cid}:{self.src_port} -> {self.dst_cid}:{self.dst_port} "
            f"{op_name(self.op)} type={self.type} len={self.len} flags={self.flags:#x} "
            f"buf_alloc={self.buf_alloc} fwd_cnt={self.fwd_cnt}"
        )


def rst_reply(header: VsockHeader) -> VsockHeader:
    """The RST that answers ``header`` for a connection the receiver does not have."""
    return VsockHeader(
        header.dst_cid,
        header.src_cid,
        header.dst_port,
        header.src_port,
        0,
        header.type,
        Op.RST,
        0,
        0,
        0,
    )


def check_packet(header: VsockHeader, payload: Bytes) -> None:
    """Raise ProtocolError naming the field if the packet is not a valid STREAM packet.

    Checked in this order: type, op, then len against the payload (only RW carries one).
    """
    if header.type == Type.SEQPACKET:
        raise _error("type", "SEQPACKET is not supported (only STREAM)", header.op)
    if header.type != Type.STREAM:
        raise _error("type", f"{header.type} is not a socket type (STREAM is 1)", header.op)
    if header.op not in _OPS or header.op == Op.INVALID:
        raise _error("op", f"{header.op} is not an operation", header.op)
    if header.len != len(payload):
        raise _error("len", f"{header.len} but the payload is {len(payload)} bytes", header.op)
    if header.len and header.op != Op.RW:
        raise _error("len", f"{header.len}: only RW carries a payload", header.op)


@dataclass(frozen=True, slots=True)
class Packet:
    """A header and its payload, as one packet on the rx or tx queue."""

    header: VsockHeader
    payload: bytes | memoryview = b""

    def encode(self) -> bytes:
        return self.header.encode() + bytes(self.payload)

    @classmethod
    def decode(cls, data: Bytes) -> Self:
        """Header and payload from one buffer; the payload is what follows the header, whatever
        ``len`` says (:func:`check_packet` compares them)."""
        if len(data) < HEADER_SIZE:
            raise _error("size", f"{len(data)} bytes, shorter than the {HEADER_SIZE}-byte header")
        view = memoryview(data)
        return cls(VsockHeader.decode(view[:HEADER_SIZE]), bytes(view[HEADER_SIZE:]))


_RESERVED_GUEST_CIDS = frozenset({0, 1, 2, 0xFFFF_FFFF, 0xFFFF_FFFF_FFFF_FFFF})


@dataclass(frozen=True, slots=True)
class VsockConfig:
    """struct virtio_vsock_config: the guest's CID, the device's only configuration field."""

    guest_cid: int
    SIZE: ClassVar[int] = _CONFIG.size

    def __post_init__(self) -> None:
        _check_fields(self, (("guest_cid", 64),), "virtio_vsock_config")
        if self.guest_cid in _RESERVED_GUEST_CIDS:
            raise ProtocolError(
                f"virtio_vsock_config: guest_cid: {self.guest_cid:#x} is reserved",
                field="guest_cid",
            )
        if self.guest_cid > U32_MASK:
            raise ProtocolError(
                f"virtio_vsock_config: guest_cid: {self.guest_cid:#x} sets the reserved upper"
                " 32 bits",
                field="guest_cid",
            )

    def encode(self) -> bytes:
        return _CONFIG.pack(self.guest_cid)

    @classmethod
    def decode(cls, data: Bytes) -> Self:
        if len(data) != _CONFIG.size:
            raise ProtocolError(
                f"virtio_vsock_config: size: {len(data)} bytes, expected {_CONFIG.size}",
                field="size",
            )
        return cls(_CONFIG.unpack(data)[0])


@dataclass(frozen=True, slots=True)
class VsockEvent:
    """struct virtio_vsock_event: one entry of the event queue (an id the reader may not know)."""

    id: int
    SIZE: ClassVar[int] = _EVENT.size

    def __post_init__(self) -> None:
        _check_fields(self, (("id", 32),), "virtio_vsock_event")

    def encode(self) -> bytes:
        return _EVENT.pack(self.id)

    @classmethod
    def decode(cls, data: Bytes) -> Self:
        if len(data) != _EVENT.size:
            raise ProtocolError(
                f"virtio_vsock_event: size: {len(data)} bytes, expected {_EVENT.size}",
                field="size",
            )
        return cls(_EVENT.unpack(data)[0])
