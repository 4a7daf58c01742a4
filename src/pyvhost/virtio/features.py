"""virtio feature bit numbers (common, virtio-blk, -net, -scsi), a bit-to-name table, bit helpers.

Plain constants so that vhost code and device code share one spelling; knows nothing of vhost
beyond naming the two vhost-user bits (26 LOG_ALL, 30 PROTOCOL_FEATURES) for readable traces.
:func:`bit_mask` and :func:`has_bit` are the one spelling of "these bits" and "is this bit set"
for every feature word (virtio and vhost-user protocol features alike).
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

# Common (device-independent) bits.
F_NOTIFY_ON_EMPTY = 24
F_ANY_LAYOUT = 27
F_RING_INDIRECT_DESC = 28
F_RING_EVENT_IDX = 29
F_VERSION_1 = 32
F_ACCESS_PLATFORM = 33
F_RING_PACKED = 34
F_IN_ORDER = 35
F_ORDER_PLATFORM = 36
F_SR_IOV = 37
F_NOTIFICATION_DATA = 38
F_NOTIF_CONFIG_DATA = 39
F_RING_RESET = 40
F_ADMIN_VQ = 41

# Bits the vhost(-user) protocol reuses inside the virtio feature word.
F_LOG_ALL = 26
F_PROTOCOL_FEATURES = 30

# virtio-blk.
BLK_F_BARRIER = 0
BLK_F_SIZE_MAX = 1
BLK_F_SEG_MAX = 2
BLK_F_GEOMETRY = 4
BLK_F_RO = 5
BLK_F_BLK_SIZE = 6
BLK_F_SCSI = 7
BLK_F_FLUSH = 9
BLK_F_TOPOLOGY = 10
BLK_F_CONFIG_WCE = 11
BLK_F_MQ = 12
BLK_F_DISCARD = 13
BLK_F_WRITE_ZEROES = 14
BLK_F_LIFETIME = 15
BLK_F_SECURE_ERASE = 16
BLK_F_ZONED = 17

# virtio-net.
NET_F_CSUM = 0
NET_F_GUEST_CSUM = 1
NET_F_CTRL_GUEST_OFFLOADS = 2
NET_F_MTU = 3
NET_F_MAC = 5
NET_F_GSO = 6
NET_F_GUEST_TSO4 = 7
NET_F_GUEST_TSO6 = 8
NET_F_GUEST_ECN = 9
NET_F_GUEST_UFO = 10
NET_F_HOST_TSO4 = 11
NET_F_HOST_TSO6 = 12
NET_F_HOST_ECN = 13
NET_F_HOST_UFO = 14
NET_F_MRG_RXBUF = 15
NET_F_STATUS = 16
NET_F_CTRL_VQ = 17
NET_F_CTRL_RX = 18
NET_F_CTRL_VLAN = 19
NET_F_CTRL_RX_EXTRA = 20
NET_F_GUEST_ANNOUNCE = 21
NET_F_MQ = 22
NET_F_CTRL_MAC_ADDR = 23
NET_F_DEVICE_STATS = 50
NET_F_VQ_NOTF_COAL = 52
NET_F_NOTF_COAL = 53
NET_F_GUEST_USO4 = 54
NET_F_GUEST_USO6 = 55
NET_F_HOST_USO = 56
NET_F_HASH_REPORT = 57
NET_F_GUEST_HDRLEN = 59
NET_F_RSS = 60
NET_F_RSC_EXT = 61
NET_F_STANDBY = 62
NET_F_SPEED_DUPLEX = 63

# virtio-scsi.
SCSI_F_INOUT = 0
SCSI_F_HOTPLUG = 1
SCSI_F_CHANGE = 2
SCSI_F_T10_PI = 3


def bit_mask(*bits: int) -> int:
    """The feature word with exactly ``bits`` set."""
    value = 0
    for bit in bits:
        value |= 1 << bit
    return value


def has_bit(value: int, bit: int) -> bool:
    """Whether bit number ``bit`` is set in the feature word ``value``."""
    return bool(value >> bit & 1)


def _table(prefix: str) -> Mapping[int, str]:
    return MappingProxyType(
        {
            value: name.removeprefix(prefix)
            for name, value in globals().items()
            if name.startswith(prefix) and isinstance(value, int)
        }
    )


COMMON_FEATURES: Mapping[int, str] = _table("F_")
"""Device-independent bits, including the vhost-user LOG_ALL and PROTOCOL_FEATURES."""

DEVICE_FEATURES: Mapping[str, Mapping[int, str]] = MappingProxyType(
    {"blk": _table("BLK_F_"), "net": _table("NET_F_"), "scsi": _table("SCSI_F_")}
)
"""Device-specific bits by device name."""


def feature_names(bits: int, device: str | None = None) -> list[str]:
    """Name every set bit; device bits need ``device`` ("blk", "net", "scsi"), else ``bit<N>``."""
    device_table = DEVICE_FEATURES.get(device, {}) if device else {}
    names: list[str] = []
    bit = 0
    while bits >> bit:
        if bits >> bit & 1:
            name = COMMON_FEATURES.get(bit) or device_table.get(bit)
            names.append(name or f"bit{bit}")
        bit += 1
    return names
