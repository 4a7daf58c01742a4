"""The BackendDevice hooks a device with its own data path needs (the kernel's vhost-net is one):
the ring's base reported by the device, call/err eventfd changes on a running ring, and the
dirty log handed on when logging starts and stops."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator

import pytest

from pyvhost.control import RingAddresses, start_ring
from pyvhost.testing import ConfigOnlyDevice
from pyvhost.user.backend import BackendHandler
from pyvhost.user.connection import socketpair
from pyvhost.user.device import VringNotifier
from pyvhost.user.frontend import Frontend
from pyvhost.virtio import features as vf
from pyvhost.virtio.memory import DirtyLog, GuestMemory
from pyvhost.virtio.queue import DeviceQueue

FEATURES = vf.bit_mask(vf.F_VERSION_1)


class OwnDataPath(ConfigOnlyDevice):
    """Reports its own ring base and records the hooks."""

    def __init__(self) -> None:
        super().__init__(num_queues=2, features=FEATURES)
        self.hooks: list[tuple[str, object]] = []
        self.areas: dict[int, RingAddresses] = {}

    def queue_started(self, index: int, queue: DeviceQueue, notifier: VringNotifier) -> None:
        super().queue_started(index, queue, notifier)
        self.areas[index] = queue.areas

    def queue_stopped(self, index: int) -> int | None:  # type: ignore[override]
        super().queue_stopped(index)
        return 1234

    def queue_notifier_changed(self, index: int, notifier: VringNotifier) -> None:
        self.hooks.append(("notifier", (index, notifier.call_fd is not None)))

    def dirty_log_changed(self, log: DirtyLog | None) -> None:
        self.hooks.append(("log", None if log is None else log.size))


@pytest.fixture
def pair() -> Iterator[tuple[Frontend, OwnDataPath]]:
    a, b = socketpair()
    device = OwnDataPath()
    handler = BackendHandler(device, b, name="hooks")
    thread = threading.Thread(target=handler.serve, daemon=True)
    thread.start()
    fe = Frontend(a, reply_timeout=5)
    yield fe, device
    fe.close()
    thread.join(5)


def test_hooks(pair: tuple[Frontend, OwnDataPath]) -> None:
    fe, device = pair
    result = fe.negotiate()
    fe.set_features(result.features & ~(1 << vf.F_LOG_ALL))
    kick, call = os.eventfd(0), os.eventfd(0)
    try:
        with GuestMemory.anonymous(1 << 20) as mem:
            fe.set_memory(mem)
            ring = RingAddresses(0x1000, 0x2000, 0x3000)
            start_ring(fe, 0, 64, ring, 0, kick, call)
            assert device.areas[0] == ring, "the queue carries its areas as guest-physical"

            fe.set_vring_call(0, call)
            fe.set_vring_err(0, call)
            assert device.hooks == [("notifier", (0, True)), ("notifier", (0, True))]

            log, fd = DirtyLog.anonymous(4096)
            try:
                fe.set_log_base(4096, 0, fd)
                fe.set_features(result.features)
                fe.set_features(result.features & ~(1 << vf.F_LOG_ALL))
            finally:
                log.close()
                os.close(fd)
            assert device.hooks[2:] == [("log", 4096), ("log", None)]

            assert fe.get_vring_base(0) == 1234, "the device's own base is the answer"
    finally:
        os.close(kick)
        os.close(call)
