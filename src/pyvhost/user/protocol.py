"""vhost-user request numbers, protocol feature bits and sets, wire constants (``vhost-user.rst``).

The protocol-feature sets saying who implements or offers what live here and nowhere else. The two
vhost-user bits of the virtio feature word (LOG_ALL, PROTOCOL_FEATURES) are in
:mod:`pyvhost.virtio.features` with the other feature bits.
"""

from __future__ import annotations

import enum

from pyvhost.errors import ProtocolError
from pyvhost.virtio.features import bit_mask

HEADER_SIZE = 12
VERSION = 1
FLAG_VERSION_MASK = 0x3
FLAG_REPLY = 0x4
FLAG_NEED_REPLY = 0x8
FLAGS_KNOWN_MASK = FLAG_VERSION_MASK | FLAG_REPLY | FLAG_NEED_REPLY
MAX_PAYLOAD_SIZE = 4096
MAX_FDS = 8
VRING_INDEX_MASK = 0xFF
VRING_NOFD = 0x100
MAX_MEMORY_REGIONS = 8
MAX_CONFIG_SIZE = 256
MAX_SHMEM_REGIONS = 256
DEVICE_STATE_NOFD = 0x100
VRING_F_LOG = 0x1
"""``VHOST_VRING_F_LOG`` as a mask of ``VringAddr.flags`` (the only defined vring address flag)."""


class Request(enum.IntEnum):
    """Requests the front-end sends to the back-end (``VHOST_USER_*``)."""

    GET_FEATURES = 1
    SET_FEATURES = 2
    SET_OWNER = 3
    RESET_OWNER = 4
    SET_MEM_TABLE = 5
    SET_LOG_BASE = 6
    SET_LOG_FD = 7
    SET_VRING_NUM = 8
    SET_VRING_ADDR = 9
    SET_VRING_BASE = 10
    GET_VRING_BASE = 11
    SET_VRING_KICK = 12
    SET_VRING_CALL = 13
    SET_VRING_ERR = 14
    GET_PROTOCOL_FEATURES = 15
    SET_PROTOCOL_FEATURES = 16
    GET_QUEUE_NUM = 17
    SET_VRING_ENABLE = 18
    SEND_RARP = 19
    NET_SET_MTU = 20
    SET_BACKEND_REQ_FD = 21
    IOTLB_MSG = 22
    SET_VRING_ENDIAN = 23
    GET_CONFIG = 24
    SET_CONFIG = 25
    CREATE_CRYPTO_SESSION = 26
    CLOSE_CRYPTO_SESSION = 27
    POSTCOPY_ADVISE = 28
    POSTCOPY_LISTEN = 29
    POSTCOPY_END = 30
    GET_INFLIGHT_FD = 31
    SET_INFLIGHT_FD = 32
    GPU_SET_SOCKET = 33
    RESET_DEVICE = 34
    VRING_KICK = 35
    GET_MAX_MEM_SLOTS = 36
    ADD_MEM_REG = 37
    REM_MEM_REG = 38
    SET_STATUS = 39
    GET_STATUS = 40
    GET_SHARED_OBJECT = 41
    SET_DEVICE_STATE_FD = 42
    CHECK_DEVICE_STATE = 43
    GET_SHMEM_CONFIG = 44


class BackendRequest(enum.IntEnum):
    """Requests the back-end sends on the ``BACKEND_REQ`` channel (``VHOST_USER_BACKEND_*``)."""

    IOTLB_MSG = 1
    CONFIG_CHANGE_MSG = 2
    VRING_HOST_NOTIFIER_MSG = 3
    VRING_CALL = 4
    VRING_ERR = 5
    SHARED_OBJECT_ADD = 6
    SHARED_OBJECT_REMOVE = 7
    SHARED_OBJECT_LOOKUP = 8
    SHMEM_MAP = 9
    SHMEM_UNMAP = 10


class ProtocolFeature(enum.IntEnum):
    """Bit numbers of the vhost-user protocol features (``VHOST_USER_PROTOCOL_F_*``)."""

    MQ = 0
    LOG_SHMFD = 1
    RARP = 2
    REPLY_ACK = 3
    MTU = 4
    BACKEND_REQ = 5
    CROSS_ENDIAN = 6
    CRYPTO_SESSION = 7
    PAGEFAULT = 8
    CONFIG = 9
    BACKEND_SEND_FD = 10
    HOST_NOTIFIER = 11
    INFLIGHT_SHMFD = 12
    RESET_DEVICE = 13
    INBAND_NOTIFICATIONS = 14
    CONFIGURE_MEM_SLOTS = 15
    STATUS = 16
    XEN_MMAP = 17
    SHARED_OBJECT = 18
    DEVICE_STATE = 19
    GET_VRING_BASE_INFLIGHT = 20
    RESERVED_21 = 21
    SHMEM = 22


PF = ProtocolFeature

FRONTEND_PROTOCOL_FEATURES = bit_mask(
    *(f for f in PF if f not in (PF.XEN_MMAP, PF.GET_VRING_BASE_INFLIGHT, PF.RESERVED_21))
)
"""Protocol features :class:`~pyvhost.user.frontend.Frontend` implements (all but XEN_MMAP and
the unconfirmed 20/21): what it accepts of a back-end's offer unless told otherwise."""

HANDLER_PROTOCOL_FEATURES = bit_mask(
    PF.MQ,
    PF.LOG_SHMFD,
    PF.RARP,
    PF.REPLY_ACK,
    PF.MTU,
    PF.BACKEND_REQ,
    PF.CRYPTO_SESSION,
    PF.PAGEFAULT,
    PF.CONFIG,
    PF.BACKEND_SEND_FD,
    PF.HOST_NOTIFIER,
    PF.INFLIGHT_SHMFD,
    PF.RESET_DEVICE,
    PF.INBAND_NOTIFICATIONS,
    PF.CONFIGURE_MEM_SLOTS,
    PF.STATUS,
    PF.SHARED_OBJECT,
    PF.DEVICE_STATE,
    PF.SHMEM,
)
"""Protocol features :class:`~pyvhost.user.backend.BackendHandler` implements, offered when its
device asks for them (not CROSS_ENDIAN: big-endian rings are not supported; not XEN_MMAP; not the
bits above DEVICE_STATE whose meaning is unsettled but SHMEM)."""

BASE_PROTOCOL_FEATURES = bit_mask(
    PF.MQ,
    PF.LOG_SHMFD,
    PF.REPLY_ACK,
    PF.BACKEND_REQ,
    PF.BACKEND_SEND_FD,
    PF.CONFIGURE_MEM_SLOTS,
    PF.RESET_DEVICE,
)
"""What a :class:`~pyvhost.user.device.BackendDevice` offers unless it says otherwise: the
features that need nothing from the device."""

FRAMEWORK_PROTOCOL_FEATURES = BASE_PROTOCOL_FEATURES | bit_mask(PF.CONFIG, PF.STATUS)
"""What every :class:`pyvhost.daemon.Device` offers (INFLIGHT_SHMFD is added by
``uses_inflight``): the daemon answers config and status requests for it."""


def protocol_feature_names(bits: int) -> list[str]:
    """Name every set bit of a protocol feature mask; unknown bits appear as ``bit<N>``."""
    names: list[str] = []
    bit = 0
    while bits >> bit:
        if bits >> bit & 1:
            try:
                names.append(ProtocolFeature(bit).name)
            except ValueError:
                names.append(f"bit{bit}")
        bit += 1
    return names


def protocol_error(request: str | None, field: str, message: str) -> ProtocolError:
    """Build a ProtocolError whose text and attributes name the request and the field."""
    if field not in message:
        message = f"{field}: {message}"
    return ProtocolError(message, request=request, field=field)
