"""What the parts of the back-end handler share: the connection's negotiated state, the rings'
records, reply values and the handler's constants."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple

from pyvhost.errors import ProtocolError
from pyvhost.user.channel import Channel
from pyvhost.user.connection import Connection
from pyvhost.user.device import BackendDevice, VringNotifier
from pyvhost.user.messages import (
    F_LOG_ALL,
    F_PROTOCOL_FEATURES,
    Message,
    Negotiation,
    Payload,
    ProtocolFeature,
    VringAddr,
)
from pyvhost.user.postcopy import Userfaultfd
from pyvhost.user.protocol import HANDLER_PROTOCOL_FEATURES
from pyvhost.virtio import features as vf
from pyvhost.virtio.features import has_bit
from pyvhost.virtio.inflight import InflightRegion
from pyvhost.virtio.memory import DirtyLog, GuestMemory

if TYPE_CHECKING:
    from pyvhost.user.backend.state import StateTransfer
    from pyvhost.virtio.queue import DeviceQueue

log = logging.getLogger("pyvhost.backend")

MAX_MEM_SLOTS = 32
"""GET_MAX_MEM_SLOTS answer (why 32: the docstring of :mod:`pyvhost.user.backend.handler`)."""


PF = ProtocolFeature


class FatalProtocolError(ProtocolError):
    """An error the spec answers by closing the connection, even with REPLY_ACK."""


class Reply(NamedTuple):
    """A reply body, the fds to pass with it, and whether to close those fds once sent."""

    payload: Payload
    fds: tuple[int, ...] = ()
    close_fds: bool = False


@dataclass(eq=False)
class Vring:
    """What the handler knows about one ring (the device sees only queue and notifier)."""

    index: int
    notifier: VringNotifier
    num: int = 0
    addr: VringAddr | None = None
    base: int | None = None
    enabled: bool = False
    kick_set: bool = False
    queue: DeviceQueue | None = None

    @property
    def started(self) -> bool:
        return self.queue is not None


def power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


class HandlerCore:
    """The state of one connection and the lookups every group of requests needs."""

    def __init__(
        self,
        device: BackendDevice,
        conn: Connection,
        *,
        name: str = "vhost-user",
        max_mem_slots: int = MAX_MEM_SLOTS,
        trace: Callable[[Message], None] | None = None,
    ) -> None:
        self.device = device
        self.conn = conn
        self.name = name
        self.max_mem_slots = max_mem_slots
        self.trace = trace
        self.mem = GuestMemory(keep_fds=bool(device.needs_memory_fds))
        self.repeated_regions: dict[tuple[int, int, int], int] = {}
        """ADD_MEM_REG of a region already mapped, counted by (gpa, size, userspace address):
        QEMU 7.2 sends its memory once per vhost device, and a multiqueue net device has one
        per queue pair on the same connection; as many REM_MEM_REG then only count down."""
        self.owned = False
        self.features = 0
        """Virtio features acked by SET_FEATURES (bit 30 included if the front-end sent it)."""
        self.protocol_features = 0
        """Protocol features acked by SET_PROTOCOL_FEATURES."""
        self.status = 0
        self.vrings = [Vring(i, VringNotifier(i)) for i in range(device.num_queues)]
        self.channel: Channel | None = None
        self.inflight: InflightRegion | None = None
        self.uffd: Userfaultfd | None = None
        self.postcopy_listening = False
        self._dirty_log: DirtyLog | None = None
        self._log_fd: int | None = None
        self._transfer: StateTransfer | None = None
        self.closed = False
        self._logged: BaseException | None = None

    @property
    def offered_features(self) -> int:
        """GET_FEATURES: the device's features plus PROTOCOL_FEATURES and LOG_ALL.

        LOG_ALL is offered when the device offers LOG_SHMFD (the handler does the dirty logging).
        VIRTIO_F_ACCESS_PLATFORM is never offered: the rings would have to translate every
        descriptor address through the IOTLB (with IOTLB miss requests on the back-end channel),
        and they do not; offering it would have them read guest-physical memory at IOVAs.
        """
        offered = self.device.features & ~(1 << vf.F_ACCESS_PLATFORM) | 1 << F_PROTOCOL_FEATURES
        if has_bit(self.device.protocol_features, PF.LOG_SHMFD):
            offered |= 1 << F_LOG_ALL
        return offered

    @property
    def offered_protocol_features(self) -> int:
        """GET_PROTOCOL_FEATURES: what both this handler and the device support."""
        return self.device.protocol_features & HANDLER_PROTOCOL_FEATURES

    @property
    def negotiation(self) -> Negotiation:
        """What was offered and acked so far: the input of the request gates."""
        return Negotiation(self.offered_features, self.features, self.protocol_features)

    def negotiated(self, feature: ProtocolFeature) -> bool:
        """Whether protocol feature ``feature`` was acked by SET_PROTOCOL_FEATURES."""
        return has_bit(self.protocol_features, feature)

    @property
    def packed(self) -> bool:
        """Whether VIRTIO_F_RING_PACKED was negotiated (rings use the packed layout)."""
        return has_bit(self.features, vf.F_RING_PACKED)

    def _vring(self, request: str, index: int) -> Vring:
        if not 0 <= index < len(self.vrings):
            raise ProtocolError(
                f"vring {index} out of range (device has {len(self.vrings)} queues)",
                request=request,
                field="index",
            )
        return self.vrings[index]

    @staticmethod
    def _take_fd(msg: Message) -> int:
        """Move the message's one fd out of it (the caller now owns it)."""
        if len(msg.fds) != 1:
            raise ProtocolError(f"expected 1 fd, got {len(msg.fds)}", request=msg.name)
        return msg.fds.pop()

    def _safe(self, fn: Callable[..., object], *args: Any) -> None:
        try:
            fn(*args)
        except Exception:
            log.exception("%s: %s failed during close", self.name, getattr(fn, "__name__", fn))

    def _send(self, reply: Message) -> None:
        if log.isEnabledFor(logging.DEBUG):
            log.debug("%s: -> %s", self.name, reply.describe())
        self.conn.send(reply)
