"""The author-facing device base class: a vhost-user device in a page of Python.

A device says what it is (queues, features, config space) and what to do with a request;
the framework (:mod:`pyvhost.daemon.loop`, :mod:`pyvhost.daemon.server`) does the rest:
the protocol, guest memory, kicks and calls, notification suppression, inflight recovery,
dirty logging, reconnection. A complete device that echoes what the driver sends::

    from pyvhost.daemon import Daemon, Device

    class Echo(Device):
        num_queues = 1
        queue_size = 256
        device_id = 0  # not a real virtio type: for tests and examples

        def config_bytes(self) -> bytes:
            return b"echo"

        def handle_chain(self, index, chain, mem):
            data = chain.read_all()          # what the driver made readable
            return chain.write_at(0, data)   # bytes written into the writable part

    Daemon(Echo, "/tmp/echo.sock").serve_forever()

Two levels of request handling, choose one:

- ``handle_chain(index, chain, mem) -> written``: one descriptor chain at a time; the default
  ``handle_queue`` pops batches, calls it for each chain and pushes them back.
- ``handle_queue(index, queue, mem)``: the whole queue when it has work; pop and push yourself
  (``queue.pop_batch`` / ``queue.push_batch``) to batch, reorder or complete later.

Either way the loop drains the kick, turns driver notifications off while the device works,
writes the call eventfd when the ring's rules say so (``queue.needs_notification()``), and
re-checks the ring after turning notifications back on. A chain the driver got wrong raises
:class:`~pyvhost.errors.VirtqueueError` from ``pop``: that queue stops (its error eventfd is
signalled), the others and the connection carry on.

Virtio features: ``device_features`` are the device-type bits (e.g. VIRTIO_BLK_F_*);
``ring_features`` (VERSION_1, INDIRECT_DESC, EVENT_IDX by default) are implemented by the
framework's rings. ``features`` is their union; set ``features`` itself to take full control.
Protocol features (REPLY_ACK, CONFIG, MQ, CONFIGURE_MEM_SLOTS, LOG_SHMFD, RESET_DEVICE, STATUS,
BACKEND_REQ, and INFLIGHT_SHMFD with ``uses_inflight = True``) are offered without effort.

Threading: hooks run on the connection thread; ``handle_queue`` / ``handle_chain`` run on the
worker thread that owns the queue (one thread for all queues unless the daemon has
``workers > 1``). Queue ``i`` is always handled by the same thread, never two at once.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from pyvhost.errors import ProtocolError, UnsupportedRequestError
from pyvhost.user.device import BackendDevice, VringNotifier
from pyvhost.user.protocol import FRAMEWORK_PROTOCOL_FEATURES, ProtocolFeature
from pyvhost.virtio import features as vf

if TYPE_CHECKING:
    from pyvhost.daemon.loop import EventLoop
    from pyvhost.virtio.chain import DescriptorChain
    from pyvhost.virtio.memory import GuestMemory
    from pyvhost.virtio.queue import DeviceQueue

__all__ = [
    "DEFAULT_RING_FEATURES",
    "Device",
]

log = logging.getLogger("pyvhost.daemon")

DEFAULT_RING_FEATURES = vf.bit_mask(vf.F_VERSION_1, vf.F_RING_INDIRECT_DESC, vf.F_RING_EVENT_IDX)
"""Ring features every device gets: the framework's rings implement them."""

BATCH = 64
"""Chains the default ``handle_queue`` pops at a time."""


class Device(BackendDevice):
    """Subclass this: declare queues, features and config; implement ``handle_chain`` or
    ``handle_queue``. See the module docstring for an example."""

    device_id: int = 0
    """Virtio device type (2 block, 4 entropy, ...): informative, for logs and tools."""

    num_queues: int = 1
    """Number of virtqueues."""

    queue_size: int = 256
    """Largest ring the driver may set up (a power of two; SET_VRING_NUM above it is refused)."""

    device_features: int = 0
    """Device-type virtio feature bits offered (VIRTIO_BLK_F_*, ...)."""

    ring_features: int = DEFAULT_RING_FEATURES
    """Transport/ring feature bits offered; clear a bit to keep the driver from using it."""

    extra_protocol_features: int = 0
    """Protocol features to offer on top of the framework's (the handler must support them)."""

    uses_inflight: bool = False
    """Offer INFLIGHT_SHMFD: in-flight chains survive a back-end restart and are redone first."""

    mem: GuestMemory | None = None
    """The guest memory of the current connection (set before the first queue starts)."""

    _loop: EventLoop | None = None
    _protocol_override: int | None = None
    _owns_loop: bool = False

    # -- what the handler reads -----------------------------------------------------------------

    @property
    def features(self) -> int:
        """Virtio features offered: ``device_features | ring_features``."""
        return self.device_features | self.ring_features

    @features.setter
    def features(self, value: int) -> None:
        self.device_features, self.ring_features = value, 0

    @property
    def max_queue_size(self) -> int:
        """SET_VRING_NUM limit: ``queue_size``."""
        return self.queue_size

    @max_queue_size.setter
    def max_queue_size(self, value: int) -> None:
        self.queue_size = value

    @property
    def protocol_features(self) -> int:
        """Protocol features offered (framework set, inflight if asked, extras)."""
        if self._protocol_override is not None:
            return self._protocol_override
        bits = FRAMEWORK_PROTOCOL_FEATURES | self.extra_protocol_features
        if self.uses_inflight:
            bits |= 1 << ProtocolFeature.INFLIGHT_SHMFD
        return bits

    @protocol_features.setter
    def protocol_features(self, value: int) -> None:
        self._protocol_override = value

    def has_feature(self, bit: int) -> bool:
        """Whether the driver accepted virtio feature ``bit``."""
        return vf.has_bit(self.acked_features, bit)

    # -- hooks for device authors (all optional) ------------------------------------------------

    def config_bytes(self) -> bytes:
        """The whole config space as it reads now (GET_CONFIG reads slices of it)."""
        return b""

    def config_written(self, offset: int, data: bytes) -> None:
        """The driver wrote ``data`` at ``offset`` of the config space; default: read-only."""
        raise UnsupportedRequestError(
            f"SET_CONFIG: {type(self).__name__} config space is read-only "
            f"({len(data)} bytes at offset {offset})"
        )

    def status_changed(self, status: int) -> None:
        """The driver wrote the virtio device status (SET_STATUS)."""

    def on_reset(self) -> None:
        """Back to the initial state: the front-end reset the device or left."""

    def memory_changed(self, mem: GuestMemory) -> None:
        """The memory table changed; views into the old table are invalid. Call super()."""
        self.mem = mem

    def handle_queue(self, index: int, queue: DeviceQueue, mem: GuestMemory) -> None:
        """Queue ``index`` has work: process every available chain (default: ``handle_chain``)."""
        while chains := queue.pop_batch(BATCH):
            queue.push_batch([(c.head, self.handle_chain(index, c, mem)) for c in chains])

    def handle_chain(self, index: int, chain: DescriptorChain, mem: GuestMemory) -> int:
        """Process one chain; return the number of bytes written into its writable part."""
        raise NotImplementedError(
            f"{type(self).__name__} implements neither handle_chain nor handle_queue"
        )

    # -- what a device can call -------------------------------------------------------------------

    def notify(self, index: int) -> None:
        """Signal queue ``index``'s call eventfd now (devices completing chains on their own)."""
        loop = self._loop
        if loop is not None:
            loop.notify(self, index)

    def notify_config_change(self) -> bool:
        """Tell the driver the config space changed (BACKEND_REQ CONFIG_CHANGE_MSG).

        Returns False (and logs) when the front-end gave no back-end channel.
        """
        channel = self.channel
        if channel is None:
            log.warning("%s: config change not sent: no back-end channel", type(self).__name__)
            return False
        channel.config_change()
        return True

    # -- framework plumbing (the handler calls these; override the hooks above instead) --------

    def attach_loop(self, loop: EventLoop) -> None:
        """Run this device's queues on ``loop`` (the Daemon's); else a private one is made."""
        self._loop, self._owns_loop = loop, False

    def _ensure_loop(self) -> EventLoop:
        if self._loop is None:
            from pyvhost.daemon.loop import EventLoop

            self._loop = EventLoop(workers=1, name=type(self).__name__)
            self._owns_loop = True
        return self._loop

    def get_config(self, offset: int, size: int) -> bytes:
        data = self.config_bytes()
        if offset < 0 or size < 0 or offset + size > len(data):
            raise ProtocolError(
                f"offset {offset} + size {size} is beyond the {len(data)}-byte config space",
                request="GET_CONFIG",
                field="size",
            )
        return bytes(data[offset : offset + size])

    def set_config(self, offset: int, data: bytes, flags: int) -> None:
        space = len(self.config_bytes())
        if offset < 0 or offset + len(data) > space:
            raise ProtocolError(
                f"offset {offset} + size {len(data)} is beyond the {space}-byte config space",
                request="SET_CONFIG",
                field="size",
            )
        self.config_written(offset, bytes(data))

    def set_status(self, status: int) -> None:
        self.status = status
        self.status_changed(status)

    def reset(self) -> None:
        loop = self._loop
        if loop is not None:
            loop.remove_device(self)
            if self._owns_loop:
                loop.stop()
                self._loop, self._owns_loop = None, False
        self.acked_features = 0
        self.status = 0
        self.on_reset()

    def queue_started(self, index: int, queue: DeviceQueue, notifier: VringNotifier) -> None:
        mem = self.mem if self.mem is not None else getattr(queue, "_mem", None)
        if mem is None:
            raise ProtocolError(f"vring {index} started before any memory table")
        self._ensure_loop().add_queue(self, index, queue, notifier, mem)

    def queue_stopped(self, index: int) -> None:
        loop = self._loop
        if loop is not None:
            loop.remove_queue(self, index)

    def queue_enabled(self, index: int, enabled: bool) -> None:
        self._ensure_loop().set_enabled(self, index, enabled)
