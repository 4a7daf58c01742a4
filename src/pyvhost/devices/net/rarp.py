"""The RARP frame a back-end broadcasts for a migrated guest (QEMU's ``qemu_announce_self``)."""

from __future__ import annotations

import struct

__all__ = ["ETHERTYPE_RARP", "rarp_frame"]

ETHERTYPE_RARP = 0x8035
_BROADCAST = b"\xff" * 6
_RARP = struct.Struct(">HHBBH6s4s6s4s")
_OP_REVERSE_REQUEST = 3
_MIN_FRAME = 60
"""The shortest Ethernet frame without its FCS: the rest is padding."""


def rarp_frame(mac: bytes) -> bytes:
    """A broadcast RARP reverse request from ``mac`` about ``mac``, padded to 60 bytes."""
    if len(mac) != 6:
        raise ValueError(f"RARP: a MAC address is 6 bytes, got {len(mac)}")
    body = _RARP.pack(1, 0x0800, 6, 4, _OP_REVERSE_REQUEST, mac, bytes(4), mac, bytes(4))
    frame = _BROADCAST + mac + ETHERTYPE_RARP.to_bytes(2, "big") + body
    return frame.ljust(_MIN_FRAME, b"\0")
