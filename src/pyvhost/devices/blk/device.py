"""virtio-blk as a :class:`pyvhost.daemon.Device`: :class:`BlkDevice`, queues served by a
:class:`~pyvhost.devices.blk.request.BlkBackend`."""

from __future__ import annotations

import dataclasses
import os

from pyvhost.daemon.device import BATCH, DEFAULT_RING_FEATURES, Device, DeviceSpec
from pyvhost.devices.blk.config import BlkLimits
from pyvhost.devices.blk.request import BlkBackend
from pyvhost.virtio import features as vf
from pyvhost.virtio.chain import DescriptorChain
from pyvhost.virtio.memory import GuestMemory
from pyvhost.virtio.queue import DeviceQueue

__all__ = ["COMPLETE_BYTES", "BlkDevice"]

COMPLETE_BYTES = 64 << 10
"""Data bytes after which :meth:`BlkDevice.handle_queue` publishes what it completed so far."""


class BlkDevice(Device):
    """virtio-blk as a :class:`pyvhost.daemon.Device`: queues served by a :class:`BlkBackend`.

    Uses inflight tracking, so a back-end restarted under a running guest redoes what was in
    flight (harmless for block requests, see :mod:`pyvhost.devices.blk.request`).
    """

    device_id = 2
    uses_inflight = True
    ring_features = DEFAULT_RING_FEATURES | 1 << vf.F_RING_PACKED

    def __init__(self, backend: BlkBackend, *, num_queues: int = 1, queue_size: int = 256) -> None:
        if not 1 <= num_queues <= 0xFFFF:
            raise ValueError(f"num_queues {num_queues} must be between 1 and 65535")
        if queue_size < 4 or queue_size & (queue_size - 1) or queue_size > 32768:
            raise ValueError(f"queue_size {queue_size} must be a power of 2 between 4 and 32768")
        self.backend = backend
        self.num_queues = num_queues
        self.queue_size = queue_size
        self.device_features = backend.features(num_queues)
        self._config = backend.config(num_queues)

    @classmethod
    def from_args(
        cls,
        image: str | os.PathLike[str],
        readonly: bool = False,
        queues: int = 1,
        serial: str | None = None,
        queue_size: int = 256,
    ) -> BlkDevice:
        """The device ``pyvhost serve blk`` builds from its command line."""
        backend = BlkBackend.open(image, readonly=readonly, serial=serial)
        try:
            return cls(backend, num_queues=queues, queue_size=queue_size)
        except BaseException:
            backend.close()
            raise

    @classmethod
    def from_spec(
        cls,
        *,
        image: str,
        readonly: bool,
        serial_hex: str,
        queues: int,
        queue_size: int,
        limits: dict[str, int],
    ) -> BlkDevice:
        """The twin a worker process builds from :meth:`process_spec` (it opens the image)."""
        backend = BlkBackend.open(
            image, readonly=readonly, serial=bytes.fromhex(serial_hex), limits=BlkLimits(**limits)
        )
        try:
            return cls(backend, num_queues=queues, queue_size=queue_size)
        except BaseException:
            backend.close()
            raise

    def process_spec(self) -> DeviceSpec | None:
        """Worker processes can serve this device when its backend was opened from a path."""
        backend = self.backend
        if backend.path is None or type(self).handle_chain is not BlkDevice.handle_chain:
            return None
        cls = type(self)
        return DeviceSpec(
            f"{cls.__module__}:{cls.__qualname__}.from_spec",
            {
                "image": backend.path,
                "readonly": backend.readonly,
                "serial_hex": backend.serial.hex(),
                "queues": self.num_queues,
                "queue_size": self.queue_size,
                "limits": dataclasses.asdict(backend.limits),
            },
        )

    def config_bytes(self) -> bytes:
        return self._config

    def handle_chain(self, index: int, chain: DescriptorChain, mem: GuestMemory) -> int:
        return self.backend.handle(chain, index)

    def handle_queue(self, index: int, queue: DeviceQueue, mem: GuestMemory) -> None:
        """Every available request: batches popped, straight to the backend, pushed early.

        Completions are pushed (and the driver notified, if its suppression rules ask for it)
        every :data:`COMPLETE_BYTES` of data rather than once per batch, so that the driver
        works on the first completions while the rest of a deep batch is served. A subclass
        that overrides ``handle_chain`` gets the framework's loop instead.
        """
        if type(self).handle_chain is not BlkDevice.handle_chain:
            super().handle_queue(index, queue, mem)
            return
        handle = self.backend.handle
        pop_batch = queue.pop_batch
        push_batch = queue.push_batch
        while chains := pop_batch(BATCH):
            done: list[tuple[int, int]] = []
            moved = 0
            for chain in chains:
                done.append((chain.head, handle(chain, index)))
                moved += chain.read_len + chain.write_len
                if moved >= COMPLETE_BYTES:
                    push_batch(done)
                    if queue.needs_notification():
                        self.notify(index)
                    done = []
                    moved = 0
            if done:
                push_batch(done)

    def close(self) -> None:
        """Close the image."""
        self.backend.close()
