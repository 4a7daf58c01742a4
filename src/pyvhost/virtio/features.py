"""virtio feature bit numbers (common and per device type), virtio device ids, bit-to-name
tables, bit helpers.

Plain constants so that vhost code and device code share one spelling; knows nothing of vhost
beyond naming the two vhost-user bits (26 LOG_ALL, 30 PROTOCOL_FEATURES) for readable traces.
Device bits are those of the virtio 1.3 spec's "Feature bits" sections (legacy ones included),
checked against Linux's ``include/uapi/linux/virtio_*.h`` where those define them; bits past 63
(net's RSS_CONTEXT, UDP_TUNNEL_GSO...) are left out, as a vhost feature word has 64 bits.
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
NET_F_HASH_TUNNEL = 51
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

# virtio-vsock.
VSOCK_F_STREAM = 0
VSOCK_F_SEQPACKET = 1
VSOCK_F_NO_IMPLIED_STREAM = 2

# virtio-console.
CONSOLE_F_SIZE = 0
CONSOLE_F_MULTIPORT = 1
CONSOLE_F_EMERG_WRITE = 2

# virtio-fs.
FS_F_NOTIFICATION = 0

# virtio-gpio.
GPIO_F_IRQ = 0

# virtio-i2c.
I2C_F_ZERO_LENGTH_REQUEST = 0

# virtio-sound.
SND_F_CTLS = 0

# virtio-gpu.
GPU_F_VIRGL = 0
GPU_F_EDID = 1
GPU_F_RESOURCE_UUID = 2
GPU_F_RESOURCE_BLOB = 3
GPU_F_CONTEXT_INIT = 4

# virtio-crypto.
CRYPTO_F_REVISION_1 = 0
CRYPTO_F_CIPHER_STATELESS_MODE = 1
CRYPTO_F_HASH_STATELESS_MODE = 2
CRYPTO_F_MAC_STATELESS_MODE = 3
CRYPTO_F_AEAD_STATELESS_MODE = 4
CRYPTO_F_AKCIPHER_STATELESS_MODE = 5


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

_NO_BITS: Mapping[int, str] = MappingProxyType({})

DEVICE_FEATURES: Mapping[str, Mapping[int, str]] = MappingProxyType(
    {
        "net": _table("NET_F_"),
        "blk": _table("BLK_F_"),
        "scsi": _table("SCSI_F_"),
        "vsock": _table("VSOCK_F_"),
        "rng": _NO_BITS,
        "console": _table("CONSOLE_F_"),
        "fs": _table("FS_F_"),
        "gpio": _table("GPIO_F_"),
        "i2c": _table("I2C_F_"),
        "input": _NO_BITS,
        "sound": _table("SND_F_"),
        "gpu": _table("GPU_F_"),
        "crypto": _table("CRYPTO_F_"),
    }
)
"""Device-specific bits by device type name (rng and input define none)."""

DEVICE_IDS: Mapping[int, str] = MappingProxyType(
    {
        1: "net",
        2: "blk",
        3: "console",
        4: "rng",
        8: "scsi",
        16: "gpu",
        18: "input",
        19: "vsock",
        20: "crypto",
        25: "sound",
        26: "fs",
        34: "i2c",
        41: "gpio",
    }
)
"""The virtio device id (spec "Device ID", vhost-vdpa's GET_DEVICE_ID) of each device type above."""


def feature_names(bits: int, device: str | None = None) -> list[str]:
    """Name every set bit; device bits need ``device`` (a :data:`DEVICE_FEATURES` key), else
    they are ``bit<N>``."""
    device_table = DEVICE_FEATURES.get(device, {}) if device else {}
    names: list[str] = []
    bit = 0
    while bits >> bit:
        if bits >> bit & 1:
            name = COMMON_FEATURES.get(bit) or device_table.get(bit)
            names.append(name or f"bit{bit}")
        bit += 1
    return names
