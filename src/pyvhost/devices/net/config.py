"""The virtio-net config space (virtio 1.2 section 5.1.4), the MAC address and the feature bits
the device offers for each kind of back end."""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass

from pyvhost.virtio import features as vf

__all__ = [
    "CONFIG_SIZE",
    "DEFAULT_MTU",
    "MAX_MTU",
    "MIN_MTU",
    "OFFLOAD_FEATURES",
    "S_ANNOUNCE",
    "S_LINK_UP",
    "NetConfig",
    "base_features",
    "format_mac",
    "parse_mac",
    "random_mac",
]

S_LINK_UP = 1
S_ANNOUNCE = 2
DEFAULT_MTU = 1500
MIN_MTU = 68
"""The smallest IPv4 MTU (RFC 791); the spec asks the device for at least this."""
MAX_MTU = 65535

_CONFIG = struct.Struct("<6sHHH")
CONFIG_SIZE = _CONFIG.size
"""mac, status, max_virtqueue_pairs, mtu: the fields this device has (no speed/duplex, no RSS)."""

OFFLOAD_FEATURES = vf.bit_mask(
    vf.NET_F_CSUM,
    vf.NET_F_GUEST_CSUM,
    vf.NET_F_HOST_TSO4,
    vf.NET_F_HOST_TSO6,
    vf.NET_F_HOST_ECN,
    vf.NET_F_HOST_UFO,
    vf.NET_F_GUEST_TSO4,
    vf.NET_F_GUEST_TSO6,
    vf.NET_F_GUEST_ECN,
    vf.NET_F_GUEST_UFO,
)
"""Checksum and segmentation offloads: offered with a TAP, which does them (or lets the host
stack do them); loopback and sink offer none, so every frame they see is complete."""


def base_features(pairs: int) -> int:
    """Device-type features every back end offers; MQ only with more than one queue pair."""
    bits = vf.bit_mask(
        vf.NET_F_MAC,
        vf.NET_F_STATUS,
        vf.NET_F_MTU,
        vf.NET_F_MRG_RXBUF,
        vf.NET_F_CTRL_VQ,
        vf.NET_F_CTRL_RX,
        vf.NET_F_CTRL_RX_EXTRA,
        vf.NET_F_CTRL_MAC_ADDR,
        vf.NET_F_CTRL_GUEST_OFFLOADS,
        vf.NET_F_GUEST_ANNOUNCE,
    )
    if pairs > 1:
        bits |= 1 << vf.NET_F_MQ
    return bits


def parse_mac(text: str) -> bytes:
    """``52:54:00:12:34:56`` (or with ``-``) as 6 bytes; a multicast address is refused."""
    parts = text.replace("-", ":").split(":")
    if len(parts) != 6 or not all(len(p) == 2 for p in parts):
        raise ValueError(f"MAC address {text!r}: six two-digit hex bytes separated by ':'")
    try:
        mac = bytes(int(p, 16) for p in parts)
    except ValueError:
        raise ValueError(f"MAC address {text!r}: not hexadecimal") from None
    if mac[0] & 1:
        raise ValueError(f"MAC address {text!r} is a multicast address (bit 0 of the first byte)")
    return mac


def format_mac(mac: bytes) -> str:
    return ":".join(f"{b:02x}" for b in mac)


def random_mac() -> bytes:
    """A random locally administered unicast address (first byte ``x2``, ``x6``, ``xa``, ``xe``)."""
    raw = bytearray(os.urandom(6))
    raw[0] = (raw[0] & 0xFC) | 0x02
    return bytes(raw)


@dataclass
class NetConfig:
    """The config space as it reads now; ``status`` and ``mac`` change at run time."""

    mac: bytes
    max_pairs: int = 1
    mtu: int = DEFAULT_MTU
    status: int = S_LINK_UP

    def __post_init__(self) -> None:
        if len(self.mac) != 6:
            raise ValueError(f"MAC address of {len(self.mac)} bytes, need 6")
        if not 1 <= self.max_pairs <= 0x8000:
            raise ValueError(f"queue pairs {self.max_pairs}: must be 1..32768")
        check_mtu(self.mtu)

    def encode(self) -> bytes:
        return _CONFIG.pack(self.mac, self.status, self.max_pairs, self.mtu)


def check_mtu(mtu: int) -> int:
    """``mtu`` if it is one the config space may carry (68..65535), else ValueError."""
    if not MIN_MTU <= mtu <= MAX_MTU:
        raise ValueError(f"MTU {mtu}: must be {MIN_MTU}..{MAX_MTU}")
    return mtu
