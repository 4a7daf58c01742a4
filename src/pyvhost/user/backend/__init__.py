"""The vhost-user back-end: one :class:`BackendHandler` per front-end connection.

``handler`` dispatches requests and applies the error policy; ``vrings``, ``memory`` and
``state`` hold the requests of each kind; ``base`` the state they share.
"""

from pyvhost.user.backend.base import MAX_MEM_SLOTS, FatalProtocolError
from pyvhost.user.backend.handler import BackendHandler
from pyvhost.user.backend.memory import POSTCOPY_ACK_TIMEOUT
from pyvhost.user.backend.state import DEVICE_STATE_TIMEOUT

__all__ = [
    "DEVICE_STATE_TIMEOUT",
    "MAX_MEM_SLOTS",
    "POSTCOPY_ACK_TIMEOUT",
    "BackendHandler",
    "FatalProtocolError",
]
