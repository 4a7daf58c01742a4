"""``unpop``: a device gives back the last chains it popped and waits for the driver to add more.

Both ring layouts, with and without EVENT_IDX: the same chains come out of the next pops, the
driver is asked to kick for the entry after those it had made available (and only then), a chain
already added past them is reported, and misuse is refused without moving the ring.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

import pytest

from pyvhost.daemon.loop import ResumedQueue
from pyvhost.virtio.chain import DescriptorChain
from pyvhost.virtio.memory import GuestMemory
from pyvhost.virtio.packed import PackedDriver, PackedQueue, packed_layout
from pyvhost.virtio.queue import DeviceQueue
from pyvhost.virtio.split import SplitDriver, SplitQueue, split_layout

SIZE = 8
DATA = 0x10000


class Driver(Protocol):
    def add(self, readable: list[tuple[int, int]], writable: list[tuple[int, int]]) -> int: ...
    def publish(self) -> None: ...
    def should_kick(self) -> bool: ...
    def get_used(self) -> list[tuple[int, int]]: ...


@dataclass
class Ring:
    drv: Driver
    dev: SplitQueue | PackedQueue

    def offer(self, n: int) -> list[int]:
        """The driver adds ``n`` one-descriptor receive buffers; their ids."""
        ids = [self.drv.add([], [(DATA + 0x100 * k, 0x100)]) for k in range(n)]
        self.drv.publish()
        return ids

    def pop_all(self) -> list[DescriptorChain]:
        out = []
        while (chain := self.dev.pop()) is not None:
            out.append(chain)
        return out


@pytest.fixture(params=["split", "packed"])
def layout(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(params=[False, True], ids=["no-event-idx", "event-idx"])
def ring(layout: str, request: pytest.FixtureRequest) -> Iterator[Ring]:
    event_idx = bool(request.param)
    with GuestMemory.anonymous(1 << 20) as mem:
        drv: SplitDriver | PackedDriver
        dev: SplitQueue | PackedQueue
        if layout == "split":
            desc, avail, used, _ = split_layout(SIZE, 0)
            drv = SplitDriver(mem, SIZE, desc, avail, used, event_idx=event_idx)
            dev = SplitQueue(mem, SIZE, desc, avail, used, event_idx=event_idx)
        else:
            lay = packed_layout(SIZE, 0x1000)
            args = (mem, SIZE, lay.desc_gpa, lay.driver_event_gpa, lay.device_event_gpa)
            drv = PackedDriver(*args, event_idx=event_idx)
            dev = PackedQueue(*args, event_idx=event_idx)
        yield Ring(drv, dev)
        dev.close()
        drv.close()
        gc.collect()


def test_given_back_chains_are_popped_again_and_more_draws_a_kick(ring: Ring) -> None:
    ids = ring.offer(3)
    dev = ring.dev
    dev.disable_notifications()  # the daemon's loop does this before the device runs
    first = dev.pop()
    assert first is not None
    taken = ring.pop_all()
    assert [c.head for c in taken] == ids[1:]
    assert dev.in_flight == 3
    assert dev.unpop(taken) is False  # nothing past them yet
    assert dev.in_flight == 1
    assert dev.has_available()
    ring.offer(1)
    assert ring.drv.should_kick(), "the driver was not asked to kick for the entry after"
    again = ring.pop_all()
    assert [c.head for c in again] == [c.head for c in taken] + [again[-1].head]
    dev.push_batch([(c.head, 0) for c in [first, *again]])
    assert sorted(h for h, _ in ring.drv.get_used()) == sorted(c.head for c in [first, *again])


def test_an_entry_added_before_the_kick_was_armed_is_reported(ring: Ring) -> None:
    ring.offer(2)
    ring.dev.disable_notifications()
    taken = ring.pop_all()
    ring.offer(1)  # lands while notifications are off: no kick
    assert not ring.drv.should_kick()
    assert ring.dev.unpop(taken) is True
    assert len(ring.pop_all()) == 3


def test_giving_back_wraps_around_the_ring(ring: Ring) -> None:
    ring.dev.disable_notifications()
    for _ in range(3):  # six entries used: the five below start two before the ring's end
        ring.offer(2)
        chains = ring.pop_all()
        ring.dev.push_batch([(c.head, 0) for c in chains])
        ring.drv.get_used()
    ring.offer(5)
    taken = ring.pop_all()
    assert ring.dev.unpop(taken[1:]) is False  # back across the end (packed: the wrap counter)
    assert [c.head for c in ring.pop_all()] == [c.head for c in taken[1:]]


def test_misuse_is_refused_and_the_ring_stays(ring: Ring) -> None:
    ring.offer(2)
    taken = ring.pop_all()
    with pytest.raises(ValueError, match="unpop"):
        ring.dev.unpop([*taken, *taken])
    assert ring.dev.in_flight == 2
    ring.dev.push(taken[0].head, 0)
    if isinstance(ring.dev, PackedQueue):
        with pytest.raises(ValueError, match="not all distinct and in flight"):
            ring.dev.unpop(taken)
    assert ring.dev.in_flight == 1
    assert ring.dev.unpop([]) is False


def test_resumed_queue_gives_back_only_once_recovered_chains_are_done(ring: Ring) -> None:
    ring.offer(2)
    dev = ring.dev
    chains = ring.pop_all()
    resumed = ResumedQueue(dev, [chains[0]])
    queue: DeviceQueue = resumed
    with pytest.raises(ValueError, match="pending"):
        queue.unpop(chains[1:])
    assert queue.pop() is chains[0]
    assert queue.unpop(chains) is False
    assert [c.head for c in ring.pop_all()] == [c.head for c in chains]
