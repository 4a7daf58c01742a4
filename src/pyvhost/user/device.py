"""The interface a vhost-user device implements, and what it gets to drive its rings.

:class:`~pyvhost.user.backend.BackendHandler` speaks the protocol; a :class:`BackendDevice` only
sees its consequences: features agreed, config space read and written, rings started with a
:class:`~pyvhost.virtio.queue.DeviceQueue` and a :class:`VringNotifier`, rings stopped, reset.
Device authors do not implement this: they subclass :class:`pyvhost.daemon.Device`, which the
daemon serves through an adapter of its own.
Optional hooks raise :class:`~pyvhost.errors.UnsupportedRequestError`; the handler turns that
into a NACK (with REPLY_ACK) or a logged close of the connection.

Threading: the handler calls every hook from its own (connection) thread. A device that
processes rings in worker threads must make ``queue_stopped`` wait until its worker no longer
touches the queue: the handler reads the ring index and may unmap guest memory right after.
"""

from __future__ import annotations

import abc
import contextlib
import os
import select
import threading
import uuid
from typing import TYPE_CHECKING

from pyvhost.errors import UnsupportedRequestError
from pyvhost.user.protocol import BASE_PROTOCOL_FEATURES
from pyvhost.virtio.features import F_VERSION_1

if TYPE_CHECKING:
    from pyvhost.user.channel import Channel
    from pyvhost.virtio.inflight import InflightRegion
    from pyvhost.virtio.memory import DirtyLog, GuestMemory
    from pyvhost.virtio.queue import DeviceQueue

__all__ = [
    "BackendDevice",
    "VringNotifier",
    "unsupported",
]


class VringNotifier:
    """The signalling side of one vring: kick fd to wait on, call and err to notify the driver.

    The handler owns the fds and may swap them while the ring runs (SET_VRING_CALL on the fly);
    ``call`` / ``error`` are safe to use from any thread. A call on a ring without a call fd goes
    in-band (``BACKEND_VRING_CALL``) when INBAND_NOTIFICATIONS was negotiated, else nowhere:
    the front-end polls. In-band notifications are fire-and-forget, as eventfd writes are: the
    caller never waits for the front-end (see :meth:`Channel.vring_call`).
    """

    def __init__(self, index: int) -> None:
        self.index = index
        self._lock = threading.Lock()
        self._kick_fd: int | None = None
        self._call_fd: int | None = None
        self._err_fd: int | None = None
        self._inband: Channel | None = None
        self.kick_polling = False
        """True when the front-end sent SET_VRING_KICK with NOFD: poll the ring instead."""

    @property
    def kick_fd(self) -> int | None:
        """An eventfd that becomes readable when the driver kicks; None means poll the ring."""
        return self._kick_fd

    @property
    def err_fd(self) -> int | None:
        """The eventfd signalled on a ring error (SET_VRING_ERR), if any."""
        return self._err_fd

    @property
    def call_fd(self) -> int | None:
        """The eventfd ``call`` writes to, if any (for devices that poll it themselves)."""
        return self._call_fd

    def drain_kick(self) -> int:
        """Consume pending kicks without blocking; return the eventfd counter read (0 if none)."""
        fd = self._kick_fd
        if fd is None:
            return 0
        try:
            ready, _, _ = select.select([fd], [], [], 0)
            if not ready:
                return 0
            return int.from_bytes(os.read(fd, 8), "little")
        except (OSError, ValueError):
            return 0

    def call(self, *, sync: bool = False) -> None:
        """Tell the driver that used buffers are ready (used-buffer notification).

        ``sync`` only matters in-band: wait until the front-end has processed the call.
        """
        with self._lock:
            if self._call_fd is not None:
                _signal(self._call_fd)
                return
            channel = self._inband
        if channel is not None:
            channel.vring_call(self.index, sync=sync)

    def error(self) -> None:
        """Tell the front-end this ring hit an error (err eventfd or BACKEND_VRING_ERR)."""
        with self._lock:
            if self._err_fd is not None:
                _signal(self._err_fd)
                return
            channel = self._inband
        if channel is not None:
            channel.vring_err(self.index)

    def kick(self) -> None:
        """Signal the kick fd ourselves (an in-band VRING_KICK): the device wakes as on a kick."""
        with self._lock:
            if self._kick_fd is not None:
                _signal(self._kick_fd)

    # -- handler side -----------------------------------------------------------------------

    def set_kick_fd(self, fd: int | None, *, polling: bool = False) -> None:
        """Install a new kick fd (closing the previous one)."""
        with self._lock:
            old, self._kick_fd = self._kick_fd, fd
            self.kick_polling = polling
        _close(old)

    def set_call_fd(self, fd: int | None) -> None:
        """Install a new call fd (closing the previous one)."""
        with self._lock:
            old, self._call_fd = self._call_fd, fd
        _close(old)

    def set_err_fd(self, fd: int | None) -> None:
        """Install a new err fd (closing the previous one)."""
        with self._lock:
            old, self._err_fd = self._err_fd, fd
        _close(old)

    def set_inband(self, channel: Channel | None) -> None:
        """Channel for in-band calls and errors (INBAND_NOTIFICATIONS), or None."""
        with self._lock:
            self._inband = channel

    def close(self) -> None:
        """Close every fd held."""
        self.set_kick_fd(None)
        self.set_call_fd(None)
        self.set_err_fd(None)
        self.set_inband(None)


def _signal(fd: int) -> None:
    # BlockingIOError: the counter is saturated, so a notification is pending anyway.
    with contextlib.suppress(BlockingIOError):
        os.write(fd, (1).to_bytes(8, "little"))


def _close(fd: int | None) -> None:
    if fd is not None:
        with contextlib.suppress(OSError):
            os.close(fd)


def unsupported(what: str) -> UnsupportedRequestError:
    """The error an optional hook raises for a request the device does not implement."""
    return UnsupportedRequestError(f"{what}: not supported by this device")


class BackendDevice(abc.ABC):
    """A virtio device behind a vhost-user back-end, as the protocol handler sees it.

    Class attributes (or properties) describe what it offers; hooks are called by the
    handler as the front-end drives the protocol. Subclasses implement ``queue_started`` and
    ``queue_stopped``; everything else has a sensible default.
    """

    num_queues: int = 1
    """Queues the device has (GET_QUEUE_NUM); vring indices run 0..num_queues-1."""

    max_queue_size: int = 1024
    """Largest SET_VRING_NUM accepted (a power of two)."""

    features: int = 1 << F_VERSION_1
    """Virtio feature bits offered; the handler adds PROTOCOL_FEATURES (30) and LOG_ALL (26)."""

    protocol_features: int = BASE_PROTOCOL_FEATURES
    """Protocol features the device wants offered; the handler offers those it supports too."""

    channel: Channel | None = None
    """The back-end request channel, once the front-end gave one (SET_BACKEND_REQ_FD)."""

    acked_features: int = 0
    """Features the driver accepted (set by the default ``set_features``)."""

    status: int = 0
    """Last device status written (set by the default ``set_status``)."""

    needs_memory_fds: bool = False
    """True: the handler keeps a duplicate of every guest-memory and dirty-log fd
    (``Region.fd``, ``DirtyLog.fd``) for the device to hand on (worker processes)."""

    # -- configuration ------------------------------------------------------------------------

    def get_config(self, offset: int, size: int) -> bytes:
        """``size`` bytes of config space at ``offset`` (GET_CONFIG)."""
        raise unsupported("GET_CONFIG")

    def set_config(self, offset: int, data: bytes, flags: int) -> None:
        """Write config space (SET_CONFIG); flags 1: live migration, read-only fields too."""
        raise unsupported("SET_CONFIG")

    def set_features(self, features: int) -> None:
        """The virtio features the driver accepted (bits 26 and 30 removed)."""
        self.acked_features = features

    def set_status(self, status: int) -> None:
        """The virtio device status the driver wrote (SET_STATUS)."""
        self.status = status

    def reset(self) -> None:  # noqa: B027 (optional hook)
        """Back to the initial state (RESET_DEVICE, or the front-end left)."""

    def memory_changed(self, mem: GuestMemory) -> None:  # noqa: B027 (optional hook)
        """The memory table changed; views taken from the old table must not be used any more."""

    # -- rings ----------------------------------------------------------------------------------

    @abc.abstractmethod
    def queue_started(self, index: int, queue: DeviceQueue, notifier: VringNotifier) -> None:
        """Ring ``index`` started: process ``queue`` when ``notifier.kick_fd`` is readable."""

    @abc.abstractmethod
    def queue_stopped(self, index: int) -> int | None:
        """Ring ``index`` stopped: stop touching its queue before returning.

        A device whose rings something else runs (the kernel's vhost) returns where the ring
        stopped (GET_VRING_BASE's answer); None means the handler's queue knows.
        """

    def queue_notifier_changed(self, index: int, notifier: VringNotifier) -> None:  # noqa: B027
        """The call or error eventfd of started ring ``index`` changed (SET_VRING_CALL / ERR);
        only a device that handed the old one to someone else (the kernel) needs to act."""

    def dirty_log_changed(self, log: DirtyLog | None) -> None:  # noqa: B027 (optional hook)
        """Logging of writes to guest memory started (LOG_ALL acked and a log given) or stopped.

        The handler's rings and chains log by themselves; a device that writes guest memory by
        other means (the kernel's vhost) must hand the log on.
        """

    def inflight_changed(self, region: InflightRegion | None) -> None:  # noqa: B027
        """The inflight region changed (GET_INFLIGHT_FD / SET_INFLIGHT_FD; no ring is started).

        The handler's rings track inflight I/O by themselves; a device that runs rings
        elsewhere (worker processes) must hand the region (``region.fd``) on.
        """

    def queue_enabled(self, index: int, enabled: bool) -> None:  # noqa: B027 (optional hook)
        """Ring ``index`` was enabled or disabled (a disabled ring is processed without effects)."""

    def set_channel(self, channel: Channel | None) -> None:
        """The back-end request channel (config change, in-band calls...); None when it goes."""
        self.channel = channel

    # -- optional requests ----------------------------------------------------------------------

    def save_state(self) -> bytes:
        """Serialized device state for migration (SET_DEVICE_STATE_FD, direction save)."""
        raise unsupported("SET_DEVICE_STATE_FD save")

    def load_state(self, data: bytes) -> None:
        """Restore the state ``save_state`` produced (direction load)."""
        raise unsupported("SET_DEVICE_STATE_FD load")

    def shmem_config(self) -> tuple[int, ...]:
        """Sizes of the VIRTIO Shared Memory Regions, indexed by shmid (GET_SHMEM_CONFIG)."""
        raise unsupported("GET_SHMEM_CONFIG")

    def get_shared_object(self, object_uuid: uuid.UUID) -> int | None:
        """A new fd (the caller closes it) for an exported object, or None if unknown."""
        raise unsupported("GET_SHARED_OBJECT")

    def net_set_mtu(self, mtu: int) -> None:
        """The host MTU to expose to the guest (NET_SET_MTU)."""
        raise unsupported("NET_SET_MTU")

    def send_rarp(self, mac: bytes) -> None:
        """Broadcast a RARP for ``mac`` after migration (SEND_RARP)."""
        raise unsupported("SEND_RARP")

    def create_crypto_session(self, request: bytes) -> bytes:
        """Create a crypto session from the raw description; return the reply payload."""
        raise unsupported("CREATE_CRYPTO_SESSION")

    def close_crypto_session(self, session_id: int) -> None:
        """Close a crypto session."""
        raise unsupported("CLOSE_CRYPTO_SESSION")

    def gpu_set_socket(self, fd: int) -> None:
        """The vhost-user-gpu protocol socket; the device owns ``fd`` when this returns."""
        raise unsupported("GPU_SET_SOCKET")
