"""The author-facing device base class: a vhost-user device in a page of Python.

A device says what it is (queues, features, config space) and what to do with a request;
the framework (:mod:`pyvhost.daemon.adapter`, :mod:`pyvhost.daemon.loop`,
:mod:`pyvhost.daemon.server`) does the rest: the protocol, guest memory, kicks and calls,
notification suppression, inflight recovery, dirty logging, reconnection. A complete device that
echoes what the driver sends::

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

A :class:`Device` is not the protocol-level :class:`~pyvhost.user.device.BackendDevice`: the
daemon wraps it in a :class:`~pyvhost.daemon.adapter.DeviceAdapter` that answers the protocol
(config bounds, status, features, memory, rings) and calls the hooks below, each of which has one
name and none of which needs ``super()``.

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

A device with fds of its own (a TAP, a listening socket) has them served by the same loop:
``watch(fd, callback, queue=i)`` calls ``callback(fd)`` on the worker thread of queue ``i``
whenever ``fd`` is readable, so the callback never runs at the same time as that queue's handler.

Virtio features: ``device_features`` are the device-type bits (e.g. VIRTIO_BLK_F_*);
``ring_features`` (VERSION_1, INDIRECT_DESC, EVENT_IDX by default) are implemented by the
framework's rings. ``features`` is their union; override ``features`` itself to take full control.
Protocol features (REPLY_ACK, CONFIG, MQ, CONFIGURE_MEM_SLOTS, LOG_SHMFD, RESET_DEVICE, STATUS,
BACKEND_REQ, and INFLIGHT_SHMFD with ``uses_inflight = True``) are offered without effort.

Threading: hooks run on the connection thread; ``handle_queue`` / ``handle_chain`` run on the
worker thread that owns the queue (one thread for all queues unless the daemon has
``workers > 1``; ``worker_for_queue`` chooses). Queue ``i`` is always handled by the same thread,
never two at once.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

from pyvhost.errors import UnsupportedRequestError
from pyvhost.user.device import unsupported
from pyvhost.user.protocol import FRAMEWORK_PROTOCOL_FEATURES, ProtocolFeature
from pyvhost.virtio import features as vf

if TYPE_CHECKING:
    from pyvhost.user.channel import Channel
    from pyvhost.virtio.chain import DescriptorChain
    from pyvhost.virtio.memory import GuestMemory
    from pyvhost.virtio.queue import DeviceQueue

__all__ = [
    "BATCH",
    "DEFAULT_RING_FEATURES",
    "Device",
    "DeviceHost",
    "DeviceSpec",
    "WatchCallback",
    "attach",
    "detach",
]

log = logging.getLogger("pyvhost.daemon")

DEFAULT_RING_FEATURES = vf.bit_mask(vf.F_VERSION_1, vf.F_RING_INDIRECT_DESC, vf.F_RING_EVENT_IDX)
"""Ring features every device gets: the framework's rings implement them."""

BATCH = 64
"""Chains the default ``handle_queue`` pops at a time."""

WatchCallback = Callable[[int], None]
"""Called with the watched fd when it is readable (see :meth:`Device.watch`)."""

_watch_lock = threading.Lock()
"""Orders watch / unwatch against a host arriving or leaving (rare, so one lock for all). Never
held while waiting for a callback: a callback may watch or unwatch."""


class DeviceSpec(NamedTuple):
    """How a worker process builds its own twin of a device (``worker_mode="process"``).

    ``factory`` names an importable callable as ``"module:qualified.name"``; the worker calls it
    with ``kwargs`` (JSON values: str, int, float, bool, None, lists and objects of them) and
    must get a :class:`Device` back, one that serves the same queues the same way (for the block
    device: the image path, read-only, serial, queue count and size; the worker opens the image
    itself).
    """

    factory: str
    kwargs: dict[str, Any]


class DeviceHost(Protocol):
    """What serves a :class:`Device` (the daemon's adapter), as the device sees it."""

    @property
    def acked_features(self) -> int: ...

    @property
    def status(self) -> int: ...

    @property
    def mem(self) -> GuestMemory | None: ...

    @property
    def channel(self) -> Channel | None: ...

    def notify(self, index: int) -> None: ...

    def schedule(self, index: int) -> None: ...

    def add_watch(self, fd: int, callback: WatchCallback, queue: int) -> None: ...

    def remove_watch(self, fd: int) -> None: ...


class Device:
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

    _host: DeviceHost | None = None
    _watches: dict[int, tuple[WatchCallback, int]] | None = None

    # -- what the framework reads -----------------------------------------------------------------

    @property
    def features(self) -> int:
        """Virtio features offered: ``device_features | ring_features``."""
        return self.device_features | self.ring_features

    @property
    def protocol_features(self) -> int:
        """Protocol features offered (framework set, inflight if asked, extras)."""
        bits = FRAMEWORK_PROTOCOL_FEATURES | self.extra_protocol_features
        if self.uses_inflight:
            bits |= 1 << ProtocolFeature.INFLIGHT_SHMFD
        return bits

    # -- what the framework keeps for the device (read-only here) --------------------------------

    @property
    def acked_features(self) -> int:
        """Virtio features the driver accepted (0 while no front-end is connected)."""
        host = self._host
        return 0 if host is None else host.acked_features

    @property
    def status(self) -> int:
        """The virtio device status the driver last wrote."""
        host = self._host
        return 0 if host is None else host.status

    @property
    def mem(self) -> GuestMemory | None:
        """The guest memory of the current connection (set before the first queue starts)."""
        host = self._host
        return None if host is None else host.mem

    @property
    def channel(self) -> Channel | None:
        """The back-end request channel, once the front-end gave one (SET_BACKEND_REQ_FD)."""
        host = self._host
        return None if host is None else host.channel

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
        """The memory table changed (``self.mem`` is already ``mem``); views into the old table
        are invalid."""

    def queue_enabled(self, index: int, enabled: bool) -> None:
        """The front-end enabled or disabled queue ``index`` (SET_VRING_ENABLE); a disabled
        queue's chains wait (a net device stops feeding that receive queue)."""

    def send_rarp(self, mac: bytes) -> None:
        """Announce ``mac`` (6 bytes) after a migration (SEND_RARP; offer the RARP protocol
        feature in ``extra_protocol_features``); default: not supported."""
        raise unsupported("SEND_RARP")

    def net_set_mtu(self, mtu: int) -> None:
        """The MTU the front-end gives the guest (NET_SET_MTU; offer the MTU protocol feature);
        default: not supported."""
        raise unsupported("NET_SET_MTU")

    def process_spec(self) -> DeviceSpec | None:
        """How a worker process builds its twin of this device, or None (the default): the
        device cannot be served with ``worker_mode="process"``.

        In process mode the daemon's instance answers the protocol (config space, status and
        the hooks) and each worker process serves its queues on a twin built from this spec: the
        twin gets ``handle_queue`` / ``handle_chain``, its watches, and the ``memory_changed``,
        ``queue_enabled``, ``status_changed`` and ``on_reset`` hooks too. The two share nothing
        but what both open (an image file) and guest memory.
        """
        return None

    def worker_for_queue(self, index: int, workers: int) -> int:
        """The worker thread (``0 .. workers-1``) that serves queue ``index``; default round robin.

        Asked once per queue when a front-end connects; queues that share state (a net device's
        RX queue and its TAP watch) belong on one worker.
        """
        return index % workers

    def handle_queue(self, index: int, queue: DeviceQueue, mem: GuestMemory) -> bool | None:
        """Queue ``index`` has work: process every available chain (default: ``handle_chain``).

        Return True to leave the available chains for later on purpose (a device that takes
        them only when it has input of its own to put in them): the loop then keeps the
        driver's kicks off until :meth:`schedule` asks for this queue again.
        """
        while chains := queue.pop_batch(BATCH):
            queue.push_batch([(c.head, self.handle_chain(index, c, mem)) for c in chains])
        return None

    def handle_chain(self, index: int, chain: DescriptorChain, mem: GuestMemory) -> int:
        """Process one chain; return the number of bytes written into its writable part."""
        raise NotImplementedError(
            f"{type(self).__name__} implements neither handle_chain nor handle_queue"
        )

    # -- what a device can call -------------------------------------------------------------------

    def notify(self, index: int) -> None:
        """Signal queue ``index``'s call eventfd now (devices completing chains on their own)."""
        host = self._host
        if host is not None:
            host.notify(index)

    def schedule(self, index: int) -> None:
        """Have ``handle_queue`` run for queue ``index`` soon on its worker, kicked or not (new
        input for a queue that waits for it); nothing happens while that queue is not started."""
        host = self._host
        if host is not None:
            host.schedule(index)

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

    def watch(self, fd: int, callback: WatchCallback, *, queue: int = 0) -> None:
        """Call ``callback(fd)`` on queue ``queue``'s worker thread whenever ``fd`` is readable.

        For the device's own fds (a TAP, a listening socket); the device keeps owning ``fd``.
        Level-triggered: read what is there (at end of file, unwatch), or the callback comes
        again. The watch is served while a front-end is connected and lasts until
        :meth:`unwatch`; a callback that raises is logged and its watch removed. May be called
        from any thread, before the device is served too.
        """
        if not 0 <= queue < self.num_queues:
            raise ValueError(
                f"watch: queue {queue} out of range (device has {self.num_queues} queues)"
            )
        with _watch_lock:
            watches = self._watches
            if watches is None:
                watches = self._watches = {}
            if fd in watches:
                raise ValueError(f"watch: fd {fd} is already watched")
            host = self._host
            if host is not None:
                host.add_watch(fd, callback, queue)
            watches[fd] = (callback, queue)

    def unwatch(self, fd: int) -> None:
        """Stop watching ``fd`` (a no-op if it is not watched); once this returns the callback is
        not running and will not be called again, unless this is called from the callback."""
        with _watch_lock:
            if self._watches is None or self._watches.pop(fd, None) is None:
                return
            host = self._host
        if host is not None:
            host.remove_watch(fd)


def attach(device: Device, host: DeviceHost) -> None:
    """Framework side: ``host`` serves ``device`` from now on; the device's watches go live."""
    with _watch_lock:
        if device._host is not None:
            raise RuntimeError(f"{type(device).__name__} is already served by another connection")
        added: list[int] = []
        try:
            for fd, (callback, queue) in (device._watches or {}).items():
                host.add_watch(fd, callback, queue)
                added.append(fd)
        except BaseException:
            for fd in added:
                host.remove_watch(fd)
            raise
        device._host = host


def detach(device: Device, host: DeviceHost) -> None:
    """Framework side: ``host`` no longer serves ``device``; its watches stay declared."""
    with _watch_lock:
        if device._host is not host:
            return
        device._host = None
        fds = list(device._watches or {})
    for fd in fds:
        host.remove_watch(fd)
