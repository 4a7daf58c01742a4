"""virtio-vsock STREAM sockets as a sans-I/O core, shared by a device back-end and a driver.

``wire`` is the packet header and its numbers, ``connection`` one connection's state machine with
credit flow control, ``endpoint`` every connection of one CID. None of them touches a ring, a
socket or a clock; see docs/vsock.md.
"""

from pyvhost.virtio.vsock.connection import (
    CLOSE_TIMEOUT,
    CONNECT_TIMEOUT,
    ConnectionKey,
    ConnectionOptions,
    ConnectionState,
    VsockConnection,
)
from pyvhost.virtio.vsock.endpoint import VsockEndpoint
from pyvhost.virtio.vsock.wire import (
    DEFAULT_BUF_ALLOC,
    EVENT_QUEUE,
    HEADER_SIZE,
    HOST_CID,
    MAX_PKT_BUF_SIZE,
    RX_QUEUE,
    SHUTDOWN_BOTH,
    TX_QUEUE,
    VMADDR_CID_ANY,
    VMADDR_CID_HOST,
    VMADDR_PORT_ANY,
    EventId,
    Op,
    Packet,
    Shutdown,
    Type,
    VsockConfig,
    VsockEvent,
    VsockHeader,
    check_packet,
)

__all__ = [
    "CLOSE_TIMEOUT",
    "CONNECT_TIMEOUT",
    "DEFAULT_BUF_ALLOC",
    "EVENT_QUEUE",
    "HEADER_SIZE",
    "HOST_CID",
    "MAX_PKT_BUF_SIZE",
    "RX_QUEUE",
    "SHUTDOWN_BOTH",
    "TX_QUEUE",
    "VMADDR_CID_ANY",
    "VMADDR_CID_HOST",
    "VMADDR_PORT_ANY",
    "ConnectionKey",
    "ConnectionOptions",
    "ConnectionState",
    "EventId",
    "Op",
    "Packet",
    "Shutdown",
    "Type",
    "VsockConfig",
    "VsockConnection",
    "VsockEndpoint",
    "VsockEvent",
    "VsockHeader",
    "check_packet",
]
