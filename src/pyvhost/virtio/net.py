"""The virtio-net header that precedes every frame in the rings (virtio spec 5.1.6).

Shared by the driver side (exercise, tests) and device side (a net back-end); knows nothing of
vhost. With VIRTIO_F_VERSION_1 or VIRTIO_NET_F_MRG_RXBUF the header is 12 bytes and ends with
``num_buffers`` (how many receive buffers one frame spans); a legacy device without either uses
the first 10 bytes only.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Self

from pyvhost.errors import ProtocolError
from pyvhost.virtio import features as vf

__all__ = [
    "ETH_HEADER_LEN",
    "GSO_ECN",
    "GSO_NONE",
    "GSO_TCPV4",
    "GSO_TCPV6",
    "GSO_UDP",
    "GSO_UDP_L4",
    "HDR_F_DATA_VALID",
    "HDR_F_NEEDS_CSUM",
    "HDR_F_RSC_INFO",
    "NetHeader",
    "header_size",
]

HDR_F_NEEDS_CSUM = 1
HDR_F_DATA_VALID = 2
HDR_F_RSC_INFO = 4

GSO_NONE = 0
GSO_TCPV4 = 1
GSO_UDP = 3
GSO_TCPV6 = 4
GSO_UDP_L4 = 5
GSO_ECN = 0x80

ETH_HEADER_LEN = 14
"""Destination MAC, source MAC, EtherType."""

_HDR = struct.Struct("<BBHHHHH")
_LEGACY_SIZE = 10
_KNOWN_FLAGS = HDR_F_NEEDS_CSUM | HDR_F_DATA_VALID | HDR_F_RSC_INFO
_KNOWN_GSO = {GSO_NONE, GSO_TCPV4, GSO_UDP, GSO_TCPV6, GSO_UDP_L4}


def header_size(features: int) -> int:
    """The header's size in the rings for the negotiated ``features`` (12 or 10 bytes)."""
    if vf.has_bit(features, vf.F_VERSION_1) or vf.has_bit(features, vf.NET_F_MRG_RXBUF):
        return _HDR.size
    return _LEGACY_SIZE


@dataclass(frozen=True)
class NetHeader:
    """``struct virtio_net_hdr_mrg_rxbuf``: offload hints and, on receive, the buffer count."""

    flags: int = 0
    gso_type: int = GSO_NONE
    hdr_len: int = 0
    gso_size: int = 0
    csum_start: int = 0
    csum_offset: int = 0
    num_buffers: int = 0

    def encode(self, size: int = _HDR.size) -> bytes:
        """The header as ``size`` (12 or 10) bytes, little-endian (VERSION_1)."""
        if size not in (_HDR.size, _LEGACY_SIZE):
            raise ValueError(f"virtio-net header size {size}: must be 12 or 10")
        raw = _HDR.pack(
            self.flags,
            self.gso_type,
            self.hdr_len,
            self.gso_size,
            self.csum_start,
            self.csum_offset,
            self.num_buffers,
        )
        return raw[:size]

    @classmethod
    def decode(cls, data: bytes | memoryview, size: int = _HDR.size) -> Self:
        """Parse the first ``size`` bytes of ``data``; unknown flags or GSO types are refused."""
        if size not in (_HDR.size, _LEGACY_SIZE):
            raise ValueError(f"virtio-net header size {size}: must be 12 or 10")
        if len(data) < size:
            raise ProtocolError(f"virtio-net header: {len(data)} bytes, need {size}")
        raw = bytes(data[:size]).ljust(_HDR.size, b"\0")
        flags, gso_type, hdr_len, gso_size, csum_start, csum_offset, num_buffers = _HDR.unpack(raw)
        if flags & ~_KNOWN_FLAGS:
            raise ProtocolError(f"virtio-net header: flags {flags:#x} has unknown bits")
        if gso_type & ~GSO_ECN not in _KNOWN_GSO:
            raise ProtocolError(f"virtio-net header: gso_type {gso_type:#x} is not defined")
        return cls(flags, gso_type, hdr_len, gso_size, csum_start, csum_offset, num_buffers)
