"""One exception hierarchy for the whole package, rooted in :class:`VhostError`."""

from __future__ import annotations


class VhostError(Exception):
    """Base class of every error pyvhost raises on purpose."""


class ProtocolError(VhostError):
    """A vhost-user message or a device packet (a virtio-vsock header) is malformed or breaks the
    protocol.

    ``request`` names the request or packet operation (spec name) when it is known; ``field`` names
    the offending field.
    """

    def __init__(
        self, message: str, *, request: str | None = None, field: str | None = None
    ) -> None:
        prefix = f"{request}: " if request else ""
        super().__init__(prefix + message)
        self.request = request
        self.field = field


class ConnectionClosedError(VhostError):
    """The peer closed the connection (possibly in the middle of a message)."""


class ReplyError(VhostError):
    """The peer answered a request with a failure (a non-zero ack, an empty config, ...)."""


class UnsupportedRequestError(VhostError):
    """The request is valid but this endpoint or device does not support it."""


class GuestMemoryError(VhostError):
    """A guest address or length does not fall inside the mapped memory regions."""

    def __init__(
        self, message: str, *, address: int | None = None, length: int | None = None
    ) -> None:
        super().__init__(message)
        self.address = address
        self.length = length


class VirtqueueError(VhostError):
    """The driver put something invalid in a virtqueue; the queue must stop."""

    def __init__(self, message: str, *, queue: int | None = None) -> None:
        prefix = f"queue {queue}: " if queue is not None else ""
        super().__init__(prefix + message)
        self.queue = queue


class InflightError(VhostError):
    """The shared inflight-tracking region is inconsistent or of the wrong size."""


class ScsiFormatError(VhostError):
    """A virtio-scsi or SCSI structure is malformed: ``structure`` and ``field`` name the part.

    Raised when decoding what a device (or driver) wrote: a response, sense data, INQUIRY data.
    """

    def __init__(self, structure: str, field: str, message: str) -> None:
        if field not in message:
            message = f"{field}: {message}"
        super().__init__(f"{structure}: {message}")
        self.structure = structure
        self.field = field


class VsockError(VhostError):
    """The local caller asked a virtio-vsock connection or endpoint for something its state does
    not allow (send before connect, listen on a port twice); never raised for a peer's packet."""
