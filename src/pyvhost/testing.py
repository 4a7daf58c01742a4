"""Test doubles for code that drives a vhost-user back-end: not for serving real guests.

:class:`ConfigOnlyDevice` is a :class:`~pyvhost.user.device.BackendDevice` that negotiates
completely and processes nothing: what the protocol tests, the fuzzers and the negotiation
benchmark serve when the rings themselves are not the subject.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pyvhost.errors import ProtocolError
from pyvhost.user.device import BackendDevice, VringNotifier, unsupported
from pyvhost.user.protocol import BASE_PROTOCOL_FEATURES, ProtocolFeature
from pyvhost.virtio.features import F_VERSION_1

if TYPE_CHECKING:
    from pyvhost.user.channel import Channel
    from pyvhost.virtio.memory import GuestMemory
    from pyvhost.virtio.queue import DeviceQueue

__all__ = ["ConfigOnlyDevice"]


class ConfigOnlyDevice(BackendDevice):
    """A device that serves a fixed config space and records ring events, processing nothing.

    Enough for a front-end to negotiate completely (QEMU probing a vhost-user-blk disk);
    used by tests and benchmarks. ``events`` records every hook call in order.
    """

    def __init__(
        self,
        config: bytes = b"",
        *,
        features: int = 1 << F_VERSION_1,
        num_queues: int = 1,
        max_queue_size: int = 1024,
        protocol_features: int = BASE_PROTOCOL_FEATURES | 1 << ProtocolFeature.CONFIG,
        writable_config: bool = False,
    ) -> None:
        self.config = bytearray(config)
        self.features = features
        self.num_queues = num_queues
        self.max_queue_size = max_queue_size
        self.protocol_features = protocol_features
        self.writable_config = writable_config
        self.queues: dict[int, tuple[DeviceQueue, VringNotifier]] = {}
        self.enabled: dict[int, bool] = {}
        self.acked_features = 0
        self.status = 0
        self.events: list[tuple[str, object]] = []

    def get_config(self, offset: int, size: int) -> bytes:
        if offset + size > len(self.config):
            raise ProtocolError(
                f"offset {offset} + size {size} is beyond the {len(self.config)}-byte config space",
                request="GET_CONFIG",
                field="size",
            )
        return bytes(self.config[offset : offset + size])

    def set_config(self, offset: int, data: bytes, flags: int) -> None:
        if not self.writable_config:
            raise unsupported("SET_CONFIG (config space is read-only)")
        if offset + len(data) > len(self.config):
            raise ProtocolError(
                f"offset {offset} + size {len(data)} is beyond the {len(self.config)}-byte "
                "config space",
                request="SET_CONFIG",
                field="size",
            )
        self.config[offset : offset + len(data)] = data
        self.events.append(("set_config", (offset, bytes(data), flags)))

    def set_features(self, features: int) -> None:
        self.acked_features = features
        self.events.append(("set_features", features))

    def set_status(self, status: int) -> None:
        self.status = status
        self.events.append(("set_status", status))

    def reset(self) -> None:
        self.queues.clear()
        self.acked_features = 0
        self.status = 0
        self.events.append(("reset", None))

    def memory_changed(self, mem: GuestMemory) -> None:
        self.events.append(("memory_changed", len(mem)))

    def queue_started(self, index: int, queue: DeviceQueue, notifier: VringNotifier) -> None:
        self.queues[index] = (queue, notifier)
        self.events.append(("queue_started", index))

    def queue_stopped(self, index: int) -> None:
        self.queues.pop(index, None)
        self.events.append(("queue_stopped", index))

    def queue_enabled(self, index: int, enabled: bool) -> None:
        self.enabled[index] = enabled
        self.events.append(("queue_enabled", (index, enabled)))

    def set_channel(self, channel: Channel | None) -> None:
        super().set_channel(channel)
        self.events.append(("set_channel", channel is not None))
