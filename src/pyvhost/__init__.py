"""pyvhost: vhost and vhost-user for Python."""

from pyvhost.errors import (
    ConnectionClosedError,
    GuestMemoryError,
    InflightError,
    ProtocolError,
    ReplyError,
    ScsiFormatError,
    UnsupportedRequestError,
    VhostError,
    VirtqueueError,
    VsockError,
)

__version__ = "0.1.0"

__all__ = [
    "ConnectionClosedError",
    "GuestMemoryError",
    "InflightError",
    "ProtocolError",
    "ReplyError",
    "ScsiFormatError",
    "UnsupportedRequestError",
    "VhostError",
    "VirtqueueError",
    "VsockError",
    "__version__",
]
