"""Property: after any pop/complete history and a crash at any publish point, recovery returns
exactly the chains still pending, in pop order, for split and packed queues."""

from __future__ import annotations

import gc
import itertools
import os
import random
from collections.abc import Callable, Iterator, Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pyvhost.virtio.inflight import (
    InflightRegion,
    PackedInflightEntry,
    PackedInflightQueue,
    SplitInflightQueue,
)
from pyvhost.virtio.memory import GuestMemory
from pyvhost.virtio.packed import PackedDriver, PackedQueue, packed_layout
from pyvhost.virtio.split import SplitDriver, SplitQueue, split_layout

MiB = 1 << 20
RING = 0x1000
DATA = 0x20000


class CrashError(Exception):
    """Stands for the back-end process dying at this point."""


class SplitHooks:
    """The split tracker's hooks, raising :class:`CrashError` after publishing when ``crash``."""

    def __init__(self, tracker: SplitInflightQueue) -> None:
        self.tracker = tracker
        self.crash = False

    def begin(self, used_idx: int) -> bool:
        return self.tracker.begin(used_idx)

    def on_pop(self, head: int) -> None:
        self.tracker.on_pop(head)

    def before_publish(self, heads: Sequence[int]) -> None:
        self.tracker.before_publish(heads)

    def after_publish(self, heads: Sequence[int], used_idx: int) -> None:
        if self.crash:
            raise CrashError
        self.tracker.after_publish(heads, used_idx)

    def recover(self, used_ring_idx: int) -> list[int]:
        return self.tracker.recover(used_ring_idx)


class PackedHooks:
    """The packed tracker's hooks, raising :class:`CrashError` at the ``crash`` publish point."""

    def __init__(self, tracker: PackedInflightQueue) -> None:
        self.tracker = tracker
        self.crash: str | None = None

    def begin(self, used_idx: int, used_wrap: bool) -> bool:
        return self.tracker.begin(used_idx, used_wrap)

    def on_pop(
        self, descriptors: Sequence[tuple[int, int, int, int]], used_idx: int, used_wrap: bool
    ) -> None:
        self.tracker.on_pop(descriptors, used_idx, used_wrap)

    def before_publish(self, ids: Sequence[int], used_idx: int, used_wrap: bool) -> None:
        self.tracker.before_publish(ids, used_idx, used_wrap)
        if self.crash == "before":
            raise CrashError

    def after_publish(self) -> None:
        if self.crash == "after":
            raise CrashError
        self.tracker.after_publish()

    def recover(self, ring_flags: Callable[[int], int]) -> list[PackedInflightEntry]:
        return self.tracker.recover(ring_flags)

    @property
    def used_idx(self) -> int:
        return self.tracker.used_idx

    @property
    def used_wrap(self) -> bool:
        return self.tracker.used_wrap


def run_history(
    packed: bool, size: int, seed: int, steps: int, crash: str
) -> tuple[list[int], list[int]]:
    """Drive a queue at random, crash, recover; return (recovered heads, expected heads)."""
    rng = random.Random(seed)
    mem = GuestMemory.anonymous(MiB)
    region, fd, mmap_size = InflightRegion.create(1, size, packed)
    front_end_fd = os.dup(fd)
    drv: SplitDriver | PackedDriver
    dev: SplitQueue | PackedQueue
    hooks: SplitHooks | PackedHooks
    if packed:
        layout: tuple[int, ...] = tuple(packed_layout(size, RING)[:3])
        drv = PackedDriver(mem, size, *layout)
        hooks = PackedHooks(region.packed_queue(0))
        dev = PackedQueue(mem, size, *layout, inflight=hooks)
    else:
        layout = split_layout(size, RING)[:3]
        drv = SplitDriver(mem, size, *layout)
        hooks = SplitHooks(region.split_queue(0))
        dev = SplitQueue(mem, size, *layout, inflight=hooks)
    pending: dict[int, int] = {}  # head -> pop sequence number
    order = itertools.count()
    try:
        for _ in range(steps):
            _random_step(rng, drv, dev, pending, order)
        if pending and crash != "clean":
            _crash_mid_push(rng, dev, hooks, pending, crash)
        expected = [h for h, _ in sorted(pending.items(), key=lambda kv: kv[1])]
        used_ring_idx = dev.used_idx
        dev.close()
        region.close()
        region = InflightRegion.adopt(front_end_fd, mmap_size, 0, 1, size, packed)
        if packed:
            recovered = _recover_packed(mem, layout, region, drv)
        else:
            recovered = region.split_queue(0).recover(used_ring_idx)
        return recovered, expected
    finally:
        drv.close()
        region.close()
        gc.collect()
        mem.close()


def _random_step(
    rng: random.Random,
    drv: SplitDriver | PackedDriver,
    dev: SplitQueue | PackedQueue,
    pending: dict[int, int],
    order: Iterator[int],
) -> None:
    """One random move: the driver adds, the device pops or pushes, or the driver collects."""
    action = rng.random()
    if action < 0.35:
        for _ in range(rng.randint(1, 3)):
            n = rng.randint(1, min(3, dev.size))
            if n > drv.num_free:
                break
            drv.add([(DATA + 64 * k, 8) for k in range(n)], [])
        drv.publish()
    elif action < 0.65:
        for chain in dev.pop_batch(rng.randint(1, dev.size)):
            pending[chain.head] = next(order)
    elif action < 0.9 and pending:
        done = rng.sample(sorted(pending), rng.randint(1, len(pending)))
        dev.push_batch([(h, 0) for h in done])
        for h in done:
            del pending[h]
    else:
        drv.get_used()


def _crash_mid_push(
    rng: random.Random,
    dev: SplitQueue | PackedQueue,
    hooks: SplitHooks | PackedHooks,
    pending: dict[int, int],
    crash: str,
) -> None:
    """Push some pending chains and die at ``crash``; forget those whose used entries landed."""
    done = rng.sample(sorted(pending), rng.randint(1, len(pending)))
    if isinstance(hooks, PackedHooks):
        hooks.crash = crash
    else:
        hooks.crash = True
    with pytest.raises(CrashError):
        dev.push_batch([(h, 0) for h in done])
    if crash == "after":  # the used entries reached the ring: those chains are done
        for h in done:
            del pending[h]


def _recover_packed(
    mem: GuestMemory,
    layout: tuple[int, ...],
    region: InflightRegion,
    drv: SplitDriver | PackedDriver,
) -> list[int]:
    """A new packed queue recovers; everything recovered plus everything not yet popped still
    completes exactly once."""
    size = region.queue_size
    new = PackedQueue(mem, size, *layout, inflight=region.packed_queue(0))
    recovered = [c.head for c in new.recover_inflight()]
    for h in recovered:
        new.push(h, 0)
    while chains := new.pop_batch(size):
        new.push_batch([(c.head, 0) for c in chains])
    drv.get_used()
    assert drv.num_free == size
    new.close()
    return recovered


@settings(max_examples=150, deadline=None)
@given(
    size=st.sampled_from([1, 2, 4, 8, 16]),
    seed=st.integers(0, 2**32 - 1),
    steps=st.integers(0, 40),
    crash=st.sampled_from(["clean", "after"]),
)
def test_split_recovery_is_the_pending_set_in_pop_order(
    size: int, seed: int, steps: int, crash: str
) -> None:
    recovered, expected = run_history(False, size, seed, steps, crash)
    assert recovered == expected


@settings(max_examples=150, deadline=None)
@given(
    size=st.sampled_from([1, 2, 3, 4, 7, 8, 16]),
    seed=st.integers(0, 2**32 - 1),
    steps=st.integers(0, 40),
    crash=st.sampled_from(["clean", "before", "after"]),
)
def test_packed_recovery_is_the_pending_set_in_pop_order(
    size: int, seed: int, steps: int, crash: str
) -> None:
    recovered, expected = run_history(True, size, seed, steps, crash)
    assert recovered == expected
