"""BlkDevice.handle_queue: completions published as they are done, not once per batch."""

from __future__ import annotations

import struct
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from pyvhost.devices.blk import (
    COMPLETE_BYTES,
    VIRTIO_BLK_S_OK,
    VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT,
    BlkDevice,
)
from pyvhost.virtio.chain import DescriptorChain
from pyvhost.virtio.memory import GuestMemory
from pyvhost.virtio.ring import RingAddresses

HEADER = struct.Struct("<IIQ")


class RecordingQueue:
    """A DeviceQueue over prepared chains that records what the device does, in order."""

    def __init__(self, chains: list[DescriptorChain], *, notify: bool) -> None:
        self.chains = chains
        self.events: list[str] = []
        self.pushes: list[list[int]] = []
        self.notify = notify
        self.size = 256
        self.areas = RingAddresses(0, 0, 0)

    def pop(self) -> DescriptorChain | None:
        return self.chains.pop(0) if self.chains else None

    def pop_batch(self, max_n: int) -> list[DescriptorChain]:
        out, self.chains = self.chains[:max_n], self.chains[max_n:]
        self.events.append("pop")
        return out

    def push(self, head: int, written: int) -> None:
        self.push_batch([(head, written)])

    def push_batch(self, items: Sequence[tuple[int, int]]) -> None:
        self.events.append("push")
        self.pushes.append([h for h, _ in items])

    def needs_notification(self) -> bool:
        self.events.append("needs_notification")
        return self.notify

    def enable_notifications(self) -> bool:
        return bool(self.chains)

    def disable_notifications(self) -> None:
        pass

    def get_base(self) -> int:
        return 0

    def unpop(self, chains: Sequence[DescriptorChain]) -> bool:
        raise AssertionError("a block device never gives chains back")

    def has_available(self) -> bool:
        return bool(self.chains)

    @property
    def in_flight(self) -> int:
        return 0

    def recover_inflight(self) -> list[DescriptorChain]:
        return []


@pytest.fixture
def device(tmp_path: Path) -> Iterator[BlkDevice]:
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(range(256)) * 4096)  # 1 MiB
    dev = BlkDevice.from_args(image)
    yield dev
    dev.close()


def request(head: int, rtype: int, sector: int, size: int) -> DescriptorChain:
    """A virtio-blk chain over private buffers: header, data, status byte."""
    header = memoryview(bytearray(HEADER.pack(rtype, 0, sector)))
    data = memoryview(bytearray(size))
    status = memoryview(bytearray(b"\xff"))
    if rtype == VIRTIO_BLK_T_IN:
        return DescriptorChain(head, [header], [data, status], 16, size + 1)
    return DescriptorChain(head, [header, data], [status], 16 + size, 1)


@pytest.mark.parametrize("notify", [True, False])
def test_large_requests_are_pushed_one_by_one(
    device: BlkDevice, notify: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """64 KiB requests: each is published (and notification asked about) as soon as done."""
    chains = [request(h, VIRTIO_BLK_T_IN, 128 * h, COMPLETE_BYTES) for h in range(4)]
    queue = RecordingQueue(list(chains), notify=notify)
    notified: list[int] = []
    monkeypatch.setattr(device, "notify", notified.append)
    with GuestMemory.anonymous(1 << 20) as mem:
        device.handle_queue(0, queue, mem)
    assert queue.pushes == [[0], [1], [2], [3]]
    assert queue.events[1:] == ["push", "needs_notification"] * 4 + ["pop"]
    assert notified == ([0] * 4 if notify else [])
    assert all(c.writable[-1][0] == VIRTIO_BLK_S_OK for c in chains)
    assert chains[1].writable[0].tobytes() == (bytes(range(256)) * 256)[:COMPLETE_BYTES]


def test_small_requests_are_grouped(device: BlkDevice) -> None:
    """4 KiB requests: published in groups of COMPLETE_BYTES of data, the rest at the end."""
    n = COMPLETE_BYTES // 4096 + 3
    chains = [request(h, VIRTIO_BLK_T_OUT, 8 * h, 4096) for h in range(n)]
    queue = RecordingQueue(chains, notify=False)
    with GuestMemory.anonymous(1 << 20) as mem:
        device.handle_queue(0, queue, mem)
    pushes = queue.pushes
    full = COMPLETE_BYTES // (4096 + 17) + 1  # header and status bytes count too
    assert [len(p) for p in pushes] == [full, n - full]
    assert [h for p in pushes for h in p] == list(range(n))


def test_a_subclass_handle_chain_is_still_used(tmp_path: Path) -> None:
    """Overriding handle_chain keeps working: the batched shortcut steps aside."""
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(1 << 16))
    seen: list[int] = []

    class Counting(BlkDevice):
        def handle_chain(self, index: int, chain: DescriptorChain, mem: GuestMemory) -> int:
            seen.append(chain.head)
            return super().handle_chain(index, chain, mem)

    dev = Counting.from_args(image)
    try:
        queue = RecordingQueue(
            [request(h, VIRTIO_BLK_T_IN, h, 512) for h in range(3)], notify=False
        )
        with GuestMemory.anonymous(1 << 20) as mem:
            dev.handle_queue(0, queue, mem)
    finally:
        dev.close()
    assert seen == [0, 1, 2]
    assert queue.pushes == [[0, 1, 2]]
