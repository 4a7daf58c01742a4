"""Inflight I/O tracking: region layout, GET/SET_INFLIGHT_FD, recovery after a back-end crash."""

from __future__ import annotations

import fcntl
import gc
import os
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import pytest

from pyvhost.errors import InflightError
from pyvhost.virtio.inflight import (
    InflightRegion,
    PackedInflightQueue,
    SplitInflightQueue,
    inflight_mmap_size,
    queue_region_size,
)
from pyvhost.virtio.memory import GuestMemory
from pyvhost.virtio.packed import PackedDriver, PackedQueue, decode_packed_base, packed_layout
from pyvhost.virtio.split import SplitDriver, SplitQueue, split_layout

MiB = 1 << 20
SIZE = 8
RING = 0x1000
DATA = 0x10000


class CrashError(Exception):
    """Stands for the back-end process dying at this point."""


# -- layout ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 64, 128, 255, 256, 1024, 32768])
def test_queue_region_sizes_match_libvhost_user_and_dpdk(n: int) -> None:
    def align64(v: int) -> int:
        return (v + 63) // 64 * 64

    assert queue_region_size(n, packed=False) == align64(16 * n + 2)  # libvhost-user
    assert queue_region_size(n, packed=False) == align64(16 * n + 8 + 2 * 4)  # DPDK split
    assert queue_region_size(n, packed=True) == align64(32 * n + 8 + 2 * 6 + 9)  # DPDK packed
    assert inflight_mmap_size(3, n, True) == 3 * queue_region_size(n, True)


def test_create_leaves_every_queue_fresh_until_it_starts(no_fd_leak: None) -> None:
    """Version 0 until the queue starts (libvhost-user / DPDK): SET_VRING_BASE then stands."""
    region, fd, size = InflightRegion.create(2, 128, packed=False)
    with region:
        assert size == 2 * 2112 == os.fstat(fd).st_size == region.mmap_size
        seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
        assert seals & fcntl.F_SEAL_GROW and seals & fcntl.F_SEAL_SHRINK
        buf = region.buffer
        assert not any(buf[:size])
        tracker = region.split_queue(1)
        assert tracker.fresh
        assert tracker.begin(used_idx=0x1234) is False  # fresh: nothing to recover
        assert not tracker.fresh
        features, version, desc_num, last_head, used = struct.unpack_from("=QHHHH", buf, 2112)
        assert (features, version, desc_num, last_head, used) == (0, 1, 128, 0, 0x1234)
        assert tracker.begin(used_idx=0) is False  # once per tracker
        assert not any(buf[:2112])  # queue 0 untouched
    region, fd, size = InflightRegion.create(1, 4, packed=True)
    with region:
        assert size == 192
        buf = region.buffer
        assert not any(buf[:size])
        packed = region.packed_queue(0)
        assert packed.begin(used_idx=3, used_wrap=False) is False
        fields = struct.unpack_from("=QHHHHHHBB", buf, 0)
        # features, version, desc_num, free_head, old_free_head, used_idx, old_used_idx, wraps
        assert fields == (0, 1, 4, 0, 0, 3, 3, 0, 0)
        nexts = [struct.unpack_from("=H", buf, 32 + 32 * j + 2)[0] for j in range(4)]
        assert nexts == [1, 2, 3, 4]
        assert (packed.used_idx, packed.used_wrap) == (3, False)
    with pytest.raises(InflightError, match="queue_size 0 out of range"):
        InflightRegion.create(1, 0, packed=False)


def test_a_region_in_use_is_recovered_once(no_fd_leak: None) -> None:
    region, _, _ = InflightRegion.create(1, 8, packed=False)
    with region:
        region.split_queue(0).begin(used_idx=5)
        with _adopt_copy(region) as copy:
            tracker = copy.split_queue(0)
            assert not tracker.fresh
            assert tracker.begin(used_idx=5) is True
            assert tracker.begin(used_idx=5) is False


def _adopt_copy(region: InflightRegion, **override: int) -> InflightRegion:
    args = {
        "mmap_size": region.mmap_size,
        "mmap_offset": 0,
        "num_queues": region.num_queues,
        "queue_size": region.queue_size,
    }
    args.update(override)
    return InflightRegion.adopt(os.dup(region.fd), packed=region.packed, **args)


def test_adopt_validates(no_fd_leak: None) -> None:
    region, _, _ = InflightRegion.create(2, 16, packed=True)
    with region:
        with pytest.raises(InflightError, match="mmap_size 100 does not match 1152"):
            _adopt_copy(region, mmap_size=100)
        with pytest.raises(InflightError, match="does not match"):
            _adopt_copy(region, num_queues=3)
        with pytest.raises(InflightError, match="not a multiple of the page size"):
            _adopt_copy(region, mmap_offset=64)
        with pytest.raises(InflightError, match="runs past the end of the file"):
            _adopt_copy(region, mmap_offset=4096)
        with pytest.raises(InflightError, match="num_queues 0"):
            _adopt_copy(region, num_queues=0)
        struct.pack_into("=HH", region.buffer, 576 + 8, 1, 8)  # queue 1: in use, desc_num 8
        with pytest.raises(InflightError, match="queue 1 region has desc_num 8"):
            _adopt_copy(region)
        struct.pack_into("=HH", region.buffer, 576 + 8, 7, 16)  # queue 1: version 7
        with pytest.raises(InflightError, match="queue 1 region has version 7"):
            _adopt_copy(region)
        region.buffer[576 : 2 * 576] = bytes(576)  # queue 1 never used: stays fresh
        with _adopt_copy(region) as copy:
            assert struct.unpack_from("=HH", copy.buffer, 576 + 8) == (0, 0)
            assert copy.packed_queue(1).fresh
            with pytest.raises(InflightError, match="region is in packed format"):
                copy.split_queue(0)
            with pytest.raises(InflightError, match="queue 2 out of range"):
                copy.queue(2)


# -- split: a back-end killed with chains in flight ------------------------------------------------


class CrashingSplitHooks:
    """Forwards to a SplitInflightQueue; can die between before_publish and after_publish."""

    def __init__(self, tracker: SplitInflightQueue) -> None:
        self.tracker = tracker
        self.crash_mid_publish = False

    def begin(self, used_idx: int) -> bool:
        return self.tracker.begin(used_idx)

    def on_pop(self, head: int) -> None:
        self.tracker.on_pop(head)

    def before_publish(self, heads: Sequence[int]) -> None:
        self.tracker.before_publish(heads)

    def after_publish(self, heads: Sequence[int], used_idx: int) -> None:
        if self.crash_mid_publish:
            raise CrashError
        self.tracker.after_publish(heads, used_idx)


@dataclass
class SplitRig:
    mem: GuestMemory
    drv: SplitDriver
    layout: tuple[int, int, int]

    def queue(self, **kwargs: object) -> SplitQueue:
        return SplitQueue(self.mem, SIZE, *self.layout, **kwargs)  # type: ignore[arg-type]

    def add(self, n: int) -> list[int]:
        heads = []
        for k in range(n):
            self.mem.write(DATA + 0x100 * k, bytes([k]) * 4)
            heads.append(self.drv.add([(DATA + 0x100 * k, 4)], []))
        self.drv.publish()
        return heads


@pytest.fixture
def split_rig(no_fd_leak: None) -> Iterator[SplitRig]:
    mem = GuestMemory.anonymous(MiB)
    desc, avail, used, _ = split_layout(SIZE, RING)
    rig = SplitRig(mem, SplitDriver(mem, SIZE, desc, avail, used), (desc, avail, used))
    yield rig
    rig.drv.close()
    gc.collect()
    mem.close()


def test_split_recovery_after_crash(split_rig: SplitRig) -> None:
    region, fd, size = InflightRegion.create(1, SIZE, packed=False)
    front_end_fd = os.dup(fd)  # what QEMU keeps across the back-end's death
    hooks = CrashingSplitHooks(region.split_queue(0))
    dev = split_rig.queue(inflight=hooks)
    h = split_rig.add(6)
    popped = [dev.pop(), *dev.pop_batch(5)]
    assert [c.head for c in popped if c] == h
    dev.push(h[1], 0)
    dev.push_batch([(h[4], 0), (h[0], 0)])
    hooks.crash_mid_publish = True
    with pytest.raises(CrashError):
        dev.push_batch([(h[3], 0), (h[2], 0)])  # used.idx stored, inflight not yet cleared
    dev.close()
    del popped
    region.close()

    region = InflightRegion.adopt(front_end_fd, size, 0, 1, SIZE, False)
    tracker = region.split_queue(0)
    probe = split_rig.queue()
    used_ring_idx = probe.used_idx
    probe.close()
    assert (used_ring_idx, tracker.used_idx) == (5, 3)
    assert tracker.recover(used_ring_idx) == [h[5]]
    assert tracker.used_idx == 5
    dev = split_rig.queue(last_avail_idx=used_ring_idx + 1, inflight=tracker)
    dev.push(h[5], 0)
    assert sorted(split_rig.drv.get_used()) == sorted((x, 0) for x in h)
    assert tracker.inflight_heads() == []
    more = split_rig.add(2)  # the resumed queue carries on normally, counters continue
    chains = dev.pop_batch(4)
    assert [c.head for c in chains] == more
    assert tracker.inflight_heads() == more
    dev.close()
    del chains
    region.close()


def test_split_recovery_orders_by_counter_not_index(split_rig: SplitRig) -> None:
    region, fd, size = InflightRegion.create(1, SIZE, packed=False)
    front_end_fd = os.dup(fd)
    tracker = region.split_queue(0)
    dev = split_rig.queue(inflight=tracker)
    first = split_rig.add(4)
    chains = dev.pop_batch(4)
    dev.push_batch([(first[0], 0), (first[2], 0)])
    split_rig.drv.get_used()
    later = split_rig.add(3)  # reuses descriptors 0 and 2 (lower indices than the older 1 and 3)
    chains += dev.pop_batch(4)
    expected = [first[1], first[3], *later]
    assert tracker.inflight_heads() == expected
    dev.close()
    del chains
    region.close()
    with InflightRegion.adopt(front_end_fd, size, 0, 1, SIZE, False) as region:
        assert region.split_queue(0).recover(dev.used_idx) == expected


# -- packed: a back-end killed with chains in flight -----------------------------------------------


class CrashingPackedHooks:
    """Forwards to a PackedInflightQueue; can die just before or just after the ring write."""

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
        if self.crash == "before ring write":
            raise CrashError

    def after_publish(self) -> None:
        if self.crash == "after ring write":
            raise CrashError
        self.tracker.after_publish()


@dataclass
class PackedRig:
    mem: GuestMemory
    drv: PackedDriver
    layout: tuple[int, int, int]
    payloads: dict[int, bytes]

    def queue(self, **kwargs: object) -> PackedQueue:
        return PackedQueue(self.mem, SIZE, *self.layout, **kwargs)  # type: ignore[arg-type]

    def add(self, n: int, start: int = 0) -> list[int]:
        ids = []
        for k in range(start, start + n):
            gpa = DATA + 0x100 * k
            payload = bytes([k]) * (k % 3 + 1)
            self.mem.write(gpa, payload)
            if k % 3 == 2:
                buf_id = self.drv.add(
                    [(gpa, len(payload))], [(gpa + 0x80, 4)], indirect_gpa=gpa + 0x40
                )
            elif k % 3 == 1:
                buf_id = self.drv.add([(gpa, 1), (gpa + 1, 1)], [(gpa + 0x80, 4)])
            else:
                buf_id = self.drv.add([(gpa, len(payload))], [])
            self.payloads[buf_id] = payload
            ids.append(buf_id)
        self.drv.publish()
        return ids


@pytest.fixture
def packed_rig(no_fd_leak: None) -> Iterator[PackedRig]:
    mem = GuestMemory.anonymous(MiB)
    lay = packed_layout(SIZE, RING)
    rig = PackedRig(mem, PackedDriver(mem, SIZE, *lay[:3]), tuple(lay[:3]), {})  # type: ignore[arg-type]
    yield rig
    rig.drv.close()
    gc.collect()
    mem.close()


@pytest.mark.parametrize("crash", ["before ring write", "after ring write"])
def test_packed_recovery_after_crash(packed_rig: PackedRig, crash: str) -> None:
    rig = packed_rig
    region, fd, size = InflightRegion.create(1, SIZE, packed=True)
    front_end_fd = os.dup(fd)
    hooks = CrashingPackedHooks(region.packed_queue(0))
    dev = rig.queue(inflight=hooks)
    ids = rig.add(4)  # 1 + 2 + 1 (indirect) + 1 descriptors
    chains = dev.pop_batch(8)
    dev.push(ids[1], 4)
    rig.drv.get_used()
    ids += rig.add(2, start=4)  # 2 + 1: the ring wraps
    chains += dev.pop_batch(8)
    dev.push_batch([(ids[4], 4), (ids[0], 0)])
    hooks.crash = crash
    with pytest.raises(CrashError):
        dev.push_batch([(ids[3], 0), (ids[5], 0)])
    dev.close()
    del chains
    region.close()

    region = InflightRegion.adopt(front_end_fd, size, 0, 1, SIZE, True)
    dev = rig.queue(inflight=region.packed_queue(0))
    recovered = dev.recover_inflight()
    expected = [ids[2], ids[3], ids[5]] if crash == "before ring write" else [ids[2]]
    assert [c.head for c in recovered] == expected
    for chain in recovered:
        assert chain.read_all() == rig.payloads[chain.head]
    for chain in recovered:
        dev.push(chain.head, 0)
    collected = [i for i, _ in rig.drv.get_used()]  # ids are reused: ids[4] took ids[1]'s
    assert sorted(collected) == sorted(ids[2:] + ids[:1])
    assert rig.drv.num_free == SIZE
    # The resumed queue carries on at the right ring positions.
    more = rig.add(3, start=6)
    chains = dev.pop_batch(8)
    assert [c.head for c in chains] == more
    assert [c.read_all() for c in chains] == [rig.payloads[i] for i in more]
    dev.push_batch([(i, 0) for i in reversed(more)])
    assert rig.drv.get_used() == [(i, 0) for i in reversed(more)]
    assert (dev.last_avail_idx, dev.used_idx) == (rig.drv.next_avail, rig.drv.next_used)
    dev.close()
    del chains, recovered
    region.close()


def test_packed_region_starts_from_the_queue_base(packed_rig: PackedRig) -> None:
    """A region created before SET_VRING_BASE picks up the queue's used position at first pop."""
    rig = packed_rig
    rig.add(4)
    plain = rig.queue()
    chains = plain.pop_batch(8)
    plain.push_batch([(c.head, 0) for c in chains])
    rig.drv.get_used()
    base = plain.get_base()
    plain.close()
    del chains
    region, fd, size = InflightRegion.create(1, SIZE, packed=True)
    front_end_fd = os.dup(fd)
    avail, awrap, used, uwrap = decode_packed_base(base)
    dev = rig.queue(
        inflight=region.packed_queue(0),
        last_avail_idx=avail,
        avail_wrap=awrap,
        used_idx=used,
        used_wrap=uwrap,
    )
    ids = rig.add(2, start=4)
    chains = dev.pop_batch(8)
    dev.close()
    del chains
    region.close()
    with InflightRegion.adopt(front_end_fd, size, 0, 1, SIZE, True) as region:
        dev = rig.queue(inflight=region.packed_queue(0))
        assert [c.head for c in dev.recover_inflight()] == ids
        assert (dev.used_idx, dev.used_wrap) == (used, uwrap)
        assert (dev.last_avail_idx, dev.avail_wrap) == (rig.drv.next_avail, False)  # 10 taken
        dev.close()
        gc.collect()
