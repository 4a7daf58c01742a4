"""DeviceAdapter: serves an author's :class:`~pyvhost.daemon.device.Device` to the protocol.

The :class:`~pyvhost.user.backend.BackendHandler` drives a
:class:`~pyvhost.user.device.BackendDevice`; an author writes a
:class:`~pyvhost.daemon.device.Device`. The adapter is the one between them, one per front-end
connection: it keeps the protocol state the device reads (acked features, status, guest memory,
back-end channel), bounds-checks config access, turns each protocol hook into the author's one
hook, and puts the device's queues and watched fds on the event loop, which talks only to it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

from pyvhost.closing import Closing
from pyvhost.daemon.device import Device, WatchCallback, attach, detach
from pyvhost.daemon.loop import EventLoop, QueueOwner
from pyvhost.errors import ProtocolError
from pyvhost.user.device import BackendDevice

if TYPE_CHECKING:
    from pyvhost.user.device import VringNotifier
    from pyvhost.virtio.memory import GuestMemory
    from pyvhost.virtio.queue import DeviceQueue

__all__ = ["DeviceAdapter", "QueueLoop"]

log = logging.getLogger("pyvhost.daemon")


class QueueLoop(Protocol):
    """What serves an adapter's queues and watches: an :class:`EventLoop` (worker threads) or a
    :class:`~pyvhost.daemon.procloop.ProcessLoop` (worker processes)."""

    @property
    def workers(self) -> int: ...

    def add_queue(
        self,
        device: QueueOwner,
        index: int,
        queue: DeviceQueue,
        notifier: VringNotifier,
        mem: GuestMemory,
        *,
        worker: int | None = None,
    ) -> None: ...

    def remove_queue(self, device: QueueOwner, index: int) -> int | None:
        """Stop the queue; its base if the loop knows it better than the handler's queue."""
        ...

    def remove_device(self, device: QueueOwner) -> None: ...

    def set_enabled(self, device: QueueOwner, index: int, enabled: bool) -> None: ...

    def schedule(self, device: QueueOwner, index: int) -> None: ...

    def notify(self, device: QueueOwner, index: int) -> None: ...

    def add_watch(
        self,
        owner: object,
        fd: int,
        callback: Callable[[int], None],
        *,
        worker: int = 0,
        on_error: Callable[[int], None] | None = None,
    ) -> None: ...

    def remove_watch(self, owner: object, fd: int) -> None: ...

    def idle(self) -> None: ...

    def stop(self) -> None: ...


class DeviceAdapter(Closing, BackendDevice):
    """The :class:`BackendDevice` for ``device``, its queues and watches served by ``loop``.

    Without a ``loop`` the adapter makes one of its own (one worker), stopped by :meth:`close`.
    Queue-to-worker placement is asked of ``device.worker_for_queue`` here, once per queue, and
    a wrong answer raises ValueError before any front-end request is handled.
    """

    def __init__(self, device: Device, loop: QueueLoop | None = None) -> None:
        self.device = device
        self.name = type(device).__name__
        self.num_queues = device.num_queues
        self.max_queue_size = device.queue_size
        self.features = device.features
        self.protocol_features = device.protocol_features
        self.mem: GuestMemory | None = None
        self._owns_loop = loop is None
        self.loop: QueueLoop = EventLoop(workers=1, name=self.name) if loop is None else loop
        self._workers = [self._worker_for(index) for index in range(self.num_queues)]
        attach(device, self)

    def _worker_for(self, index: int) -> int:
        workers = self.loop.workers
        chosen = self.device.worker_for_queue(index, workers)
        if type(chosen) is not int or not 0 <= chosen < workers:
            raise ValueError(
                f"{self.name}.worker_for_queue({index}, {workers}) returned {chosen!r}: "
                f"not a worker index (0..{workers - 1})"
            )
        return chosen

    def close(self) -> None:
        """The connection is over: the device's watches leave the loop; an own loop stops."""
        detach(self.device, self)
        if self._owns_loop:
            self.loop.stop()

    # -- protocol hooks (the handler calls these) -----------------------------------------------

    def get_config(self, offset: int, size: int) -> bytes:
        data = self.device.config_bytes()
        if offset < 0 or size < 0 or offset + size > len(data):
            raise ProtocolError(
                f"offset {offset} + size {size} is beyond the {len(data)}-byte config space",
                request="GET_CONFIG",
                field="size",
            )
        return bytes(data[offset : offset + size])

    def set_config(self, offset: int, data: bytes, flags: int) -> None:
        space = len(self.device.config_bytes())
        if offset < 0 or offset + len(data) > space:
            raise ProtocolError(
                f"offset {offset} + size {len(data)} is beyond the {space}-byte config space",
                request="SET_CONFIG",
                field="size",
            )
        self.device.config_written(offset, bytes(data))

    def set_status(self, status: int) -> None:
        self.status = status
        self.device.status_changed(status)

    def reset(self) -> None:
        self.loop.remove_device(self)
        if self._owns_loop:
            self.loop.idle()
        self.acked_features = 0
        self.status = 0
        self.device.on_reset()

    def memory_changed(self, mem: GuestMemory) -> None:
        self.mem = mem
        self.device.memory_changed(mem)

    def queue_started(self, index: int, queue: DeviceQueue, notifier: VringNotifier) -> None:
        mem = self.mem
        if mem is None:
            raise ProtocolError(f"vring {index} started before any memory table")
        self.loop.add_queue(self, index, queue, notifier, mem, worker=self._workers[index])

    def queue_stopped(self, index: int) -> int | None:
        return self.loop.remove_queue(self, index)

    def queue_enabled(self, index: int, enabled: bool) -> None:
        self.loop.set_enabled(self, index, enabled)
        self.device.queue_enabled(index, enabled)

    def send_rarp(self, mac: bytes) -> None:
        self.device.send_rarp(mac)

    def net_set_mtu(self, mtu: int) -> None:
        self.device.net_set_mtu(mtu)

    # -- the loop's side (QueueOwner) ------------------------------------------------------------

    def handle_queue(self, index: int, queue: DeviceQueue, mem: GuestMemory) -> bool | None:
        return self.device.handle_queue(index, queue, mem)

    # -- the device's side (DeviceHost) -----------------------------------------------------------

    def notify(self, index: int) -> None:
        self.loop.notify(self, index)

    def schedule(self, index: int) -> None:
        self.loop.schedule(self, index)

    def add_watch(self, fd: int, callback: WatchCallback, queue: int) -> None:
        self.loop.add_watch(
            self, fd, callback, worker=self._workers[queue], on_error=self.device.unwatch
        )

    def remove_watch(self, fd: int) -> None:
        self.loop.remove_watch(self, fd)
