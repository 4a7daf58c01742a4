"""Split virtqueue: device side against the driver side, notifications, logging, hostile guests."""

from __future__ import annotations

import gc
import os
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import pytest

from pyvhost.errors import GuestMemoryError, VirtqueueError
from pyvhost.virtio.chain import MAX_INDIRECT_DESCRIPTORS
from pyvhost.virtio.memory import PAGE_SIZE, DirtyLog, GuestMemory
from pyvhost.virtio.queue import DeviceQueue
from pyvhost.virtio.split import (
    VRING_AVAIL_F_NO_INTERRUPT,
    VRING_DESC_F_INDIRECT,
    VRING_DESC_F_NEXT,
    VRING_DESC_F_WRITE,
    VRING_USED_F_NO_NOTIFY,
    SplitDriver,
    SplitQueue,
    split_layout,
    vring_need_event,
)

MiB = 1 << 20
SIZE = 8
DATA = 0x10000  # buffers live from here on
NEXT, WRITE, INDIRECT = VRING_DESC_F_NEXT, VRING_DESC_F_WRITE, VRING_DESC_F_INDIRECT
_DESC = struct.Struct("<QIHH")


@dataclass
class Rig:
    """Guest memory with a split ring at gpa 0, its driver, and raw descriptor writers."""

    mem: GuestMemory
    desc: int
    avail: int
    used: int
    drv: SplitDriver

    def queue(self, **kwargs: object) -> SplitQueue:
        return SplitQueue(self.mem, SIZE, self.desc, self.avail, self.used, **kwargs)  # type: ignore[arg-type]

    def raw_desc(self, index: int, addr: int, length: int, flags: int = 0, nxt: int = 0) -> None:
        self.mem.write(self.desc + 16 * index, _DESC.pack(addr, length, flags, nxt))

    def raw_avail(self, *heads: int, idx: int | None = None) -> None:
        """Append ``heads`` to the available ring after the driver's own entries; set avail.idx."""
        base = struct.unpack("<H", self.mem.read(self.avail + 2, 2))[0]
        for k, head in enumerate(heads):
            slot = (base + k) % SIZE
            self.mem.write(self.avail + 4 + 2 * slot, struct.pack("<H", head))
        new = (base + len(heads)) & 0xFFFF if idx is None else idx
        self.mem.write(self.avail + 2, struct.pack("<H", new))


@pytest.fixture
def rig(no_fd_leak: None) -> Iterator[Rig]:
    with GuestMemory.anonymous(MiB) as mem:
        desc, avail, used, _ = split_layout(SIZE, 0)
        r = Rig(mem, desc, avail, used, SplitDriver(mem, SIZE, desc, avail, used))
        yield r
        r.drv.close()
        gc.collect()


def test_split_layout_alignment() -> None:
    assert split_layout(256, 0x1000) == (0x1000, 0x2000, 0x2208, 0x2208 + 6 + 8 * 256 - 0x1000)
    _desc, avail, used, total = split_layout(256, 0, used_align=4096)
    assert (avail, used) == (4096, 8192)
    assert total == 8192 + 6 + 8 * 256
    with pytest.raises(ValueError, match="power of 2"):
        split_layout(100, 0)


def test_queue_satisfies_protocol(rig: Rig) -> None:
    assert isinstance(rig.queue(), DeviceQueue)


def test_round_trip_direct_and_indirect(rig: Rig) -> None:
    mem, drv = rig.mem, rig.drv
    dev = rig.queue()
    mem.write(DATA, b"header")
    mem.write(DATA + 0x100, b"payload!")
    h1 = drv.add([(DATA, 6), (DATA + 0x100, 8)], [(DATA + 0x200, 4), (DATA + 0x300, 16)])
    h2 = drv.add([(DATA, 6)], [(DATA + 0x400, 8)], indirect_gpa=DATA + 0x1000)
    assert drv.num_free == SIZE - 5
    assert dev.pop() is None  # not published yet
    drv.publish()
    assert dev.has_available()
    c1, c2 = dev.pop(), dev.pop()
    assert c1 is not None and c2 is not None
    assert dev.pop() is None
    assert (c1.head, c1.read_all(), c1.read_len, c1.write_len, c1.desc_count) == (
        h1,
        b"headerpayload!",
        14,
        20,
        4,
    )
    assert c1.writable_gpas == [(DATA + 0x200, 4), (DATA + 0x300, 16)]
    assert (c2.head, c2.read_all(), c2.write_len, c2.desc_count) == (h2, b"header", 8, 1)
    assert c1.write_at(2, b"abcdefgh") == 8
    assert c2.write_at(0, b"0123456789") == 8  # only 8 writable bytes
    dev.push_batch([(c2.head, 8), (c1.head, 10)])
    assert dev.used_idx == 2
    assert drv.get_used() == [(h2, 8), (h1, 10)]
    assert drv.num_free == SIZE
    assert mem.read(DATA + 0x200, 4) == b"\0\0ab"
    assert mem.read(DATA + 0x300, 6) == b"cdefgh"
    assert mem.read(DATA + 0x400, 8) == b"01234567"


def test_chain_helpers(rig: Rig) -> None:
    rig.mem.write(DATA, b"abc")
    rig.mem.write(DATA + 0x100, b"defgh")
    rig.drv.add([(DATA, 3), (DATA + 0x100, 5)], [])
    rig.drv.publish()
    chain = rig.queue().pop()
    assert chain is not None
    assert bytes(chain.readable_view_at(1, 2)) == b"bc"
    assert bytes(chain.readable_view_at(2, 3)) == b"cde"  # crosses pieces: a copy
    assert chain.read_at(4, 100) == b"efgh"
    with pytest.raises(ValueError, match="outside"):
        chain.readable_view_at(6, 3)
    with pytest.raises(ValueError, match="negative"):
        chain.read_at(-1, 2)
    assert [bytes(v) for v in chain.iter_readable()] == [b"abc", b"defgh"]
    assert list(chain.iter_writable()) == []
    assert chain.write_at(0, b"x") == 0  # nothing writable


def test_pop_batch_and_get_base(rig: Rig) -> None:
    for k in range(5):
        rig.drv.add([(DATA + k, 1)], [])
    rig.drv.publish()
    dev = rig.queue()
    assert [c.head for c in dev.pop_batch(3)] == [0, 1, 2]
    assert dev.get_base() == 3
    assert len(dev.pop_batch(10)) == 2
    assert dev.pop_batch(10) == []
    # A new queue object resuming from GET_VRING_BASE sees nothing pending.
    assert rig.queue(last_avail_idx=dev.get_base()).pop() is None


def test_used_idx_resumes_from_ring(rig: Rig) -> None:
    rig.drv.add([(DATA, 1)], [])
    rig.drv.publish()
    dev = rig.queue()
    chain = dev.pop()
    assert chain is not None
    dev.push(chain.head, 0)
    assert rig.queue(last_avail_idx=1).used_idx == 1


def test_push_rejects_bad_head(rig: Rig) -> None:
    dev = rig.queue(queue_index=3)
    with pytest.raises(VirtqueueError, match=r"queue 3: push: head 8 out of range"):
        dev.push(SIZE, 0)
    with pytest.raises(VirtqueueError, match="32 bits"):
        dev.push_batch([(0, 1 << 32)])


def test_rings_must_lie_in_one_region_and_be_aligned(no_fd_leak: None) -> None:
    with GuestMemory.anonymous(PAGE_SIZE) as mem:
        mem.add_anonymous(PAGE_SIZE, PAGE_SIZE)
        with pytest.raises(GuestMemoryError, match=r"descriptor table .* within one memory region"):
            SplitQueue(mem, 8, PAGE_SIZE - 64, 2 * PAGE_SIZE - 512, PAGE_SIZE + 256)
        with pytest.raises(ValueError, match="used ring at 0x102 is not 4-byte aligned"):
            SplitQueue(mem, 8, 0, 0x80, 0x102)
        with pytest.raises(ValueError, match="power of 2"):
            SplitQueue(mem, 6, 0, 0x80, 0x100)
        gc.collect()


# -- notifications --------------------------------------------------------------------------------


def test_vring_need_event_wraps() -> None:
    assert vring_need_event(5, 6, 5)
    assert not vring_need_event(6, 6, 5)
    assert vring_need_event(0xFFFF, 1, 0xFFFE)  # crossed 0xffff while wrapping
    assert not vring_need_event(2, 1, 0xFFFE)


def test_flags_suppression(rig: Rig) -> None:
    dev, drv = rig.queue(), rig.drv
    drv.add([(DATA, 1)], [])
    drv.publish()
    assert drv.should_kick()
    dev.disable_notifications()
    assert rig.mem.read(rig.used, 2) == struct.pack("<H", VRING_USED_F_NO_NOTIFY)
    drv.add([(DATA, 1)], [])
    drv.publish()
    assert not drv.should_kick()
    assert dev.enable_notifications()  # work is pending: process it before sleeping
    assert rig.mem.read(rig.used, 2) == b"\0\0"
    chains = dev.pop_batch(8)
    assert not dev.enable_notifications()
    assert not dev.needs_notification()  # nothing pushed yet
    dev.push(chains[0].head, 0)
    assert dev.needs_notification()
    drv.disable_interrupts()
    assert rig.mem.read(rig.avail, 2) == struct.pack("<H", VRING_AVAIL_F_NO_INTERRUPT)
    dev.push(chains[1].head, 0)
    assert not dev.needs_notification()
    assert drv.enable_interrupts()  # used elements are waiting
    assert len(drv.get_used()) == 2


def test_event_idx_suppression(rig: Rig) -> None:
    mem, desc, avail, used = rig.mem, rig.desc, rig.avail, rig.used
    drv = SplitDriver(mem, SIZE, desc, avail, used, event_idx=True)
    dev = SplitQueue(mem, SIZE, desc, avail, used, event_idx=True)
    drv.add([(DATA, 1)], [])
    drv.publish()
    assert drv.should_kick()  # avail_event 0 crossed
    chain = dev.pop()
    assert chain is not None
    # pop with notifications enabled advanced avail_event to 1: next add crosses it.
    drv.add([(DATA, 1)], [])
    drv.publish()
    assert drv.should_kick()
    dev.disable_notifications()
    assert dev.pop() is not None
    drv.add([(DATA, 1)], [])
    drv.publish()
    assert not drv.should_kick()  # avail_event stayed at 1
    assert dev.enable_notifications()
    assert dev.pop() is not None
    assert not dev.enable_notifications()
    # used_event: the driver wants an interrupt once used.idx passes 0.
    dev.push(chain.head, 0)
    assert dev.needs_notification()  # first decision always notifies
    dev.push(1, 0)
    assert not dev.needs_notification()  # used_event still 0, already signalled past it
    assert len(drv.get_used()) == 2  # moves used_event to 2
    dev.push(2, 0)
    assert dev.needs_notification()


def test_event_idx_disable_after_enable_draws_no_kick(rig: Rig) -> None:
    """A device polling its ring (notifications disabled after an enable) is not kicked at all;
    enabling again asks for the very next entry."""
    mem, desc, avail, used = rig.mem, rig.desc, rig.avail, rig.used
    drv = SplitDriver(mem, SIZE, desc, avail, used, event_idx=True)
    dev = SplitQueue(mem, SIZE, desc, avail, used, event_idx=True)
    assert not dev.enable_notifications()
    dev.disable_notifications()
    for _ in range(3):
        drv.add([(DATA, 1)], [])
        drv.publish()
        assert not drv.should_kick()
        assert dev.pop() is not None
    assert not dev.enable_notifications()
    drv.add([(DATA, 1)], [])
    drv.publish()
    assert drv.should_kick()


def test_event_idx_driver_disable_after_enable_draws_no_call(rig: Rig) -> None:
    """A driver polling its used ring (interrupts disabled after an enable) gets no call."""
    mem, desc, avail, used = rig.mem, rig.desc, rig.avail, rig.used
    drv = SplitDriver(mem, SIZE, desc, avail, used, event_idx=True)
    dev = SplitQueue(mem, SIZE, desc, avail, used, event_idx=True)
    drv.add([(DATA, 1)], [])
    drv.publish()
    [chain] = dev.pop_batch(8)
    dev.push(chain.head, 0)
    assert dev.needs_notification()  # the first decision always notifies
    assert len(drv.get_used()) == 1
    for _ in range(3):
        drv.add([(DATA, 1)], [])
    drv.publish()
    chains = dev.pop_batch(8)
    assert not drv.enable_interrupts()
    drv.disable_interrupts()
    for chain in chains:
        dev.push(chain.head, 0)
        assert not dev.needs_notification()
    assert len(drv.get_used()) == 3
    assert not drv.enable_interrupts()
    drv.add([(DATA, 1)], [])
    drv.publish()
    [chain] = dev.pop_batch(8)
    dev.push(chain.head, 0)
    assert dev.needs_notification()


# -- dirty logging ---------------------------------------------------------------------------------


def test_used_ring_and_written_buffers_are_logged(rig: Rig) -> None:
    log, fd = DirtyLog.anonymous(64)
    os.close(fd)
    rig.mem.set_log(log)
    used_log_gpa = 0x80000  # a distinct GPA so the used-ring marks are recognisable
    dev = rig.queue(log_used=True, used_log_gpa=used_log_gpa)
    rig.drv.add([(DATA, 1)], [(DATA + 3 * PAGE_SIZE - 2, 4), (DATA + 8 * PAGE_SIZE, 100)])
    rig.drv.publish()
    log.clear()
    chain = dev.pop()
    assert chain is not None
    chain.write_at(0, b"xxxx")
    dev.push(chain.head, 4)
    page = DATA // PAGE_SIZE
    assert log.dirty_pages() == [page + 2, page + 3, used_log_gpa // PAGE_SIZE]


# -- hostile guests: each breaks the queue with a precise error ------------------------------------


def expect_broken(dev: SplitQueue, match: str) -> None:
    with pytest.raises(VirtqueueError, match=match) as info:
        dev.pop()
    assert info.value.queue == dev.queue_index
    assert dev.broken is not None
    with pytest.raises(VirtqueueError, match="queue is broken"):
        dev.pop()
    with pytest.raises(VirtqueueError, match="queue is broken"):
        dev.pop_batch(4)


def test_hostile_descriptor_loop(rig: Rig) -> None:
    rig.raw_desc(0, DATA, 4, NEXT, 1)
    rig.raw_desc(1, DATA, 4, NEXT, 0)
    rig.raw_avail(0)
    expect_broken(rig.queue(queue_index=2), r"queue 2: chain at head 0 loops")


def test_hostile_chain_longer_than_max_chain_len(rig: Rig) -> None:
    for i in range(4):
        rig.raw_desc(i, DATA, 4, NEXT, i + 1)
    rig.raw_desc(4, DATA, 4)
    rig.raw_avail(0)
    expect_broken(rig.queue(max_chain_len=4), "longer than the limit of 4")


def test_hostile_head_out_of_range(rig: Rig) -> None:
    rig.raw_avail(SIZE)
    expect_broken(rig.queue(), "head descriptor 8 >= queue size 8")


def test_hostile_next_out_of_range(rig: Rig) -> None:
    rig.raw_desc(0, DATA, 4, NEXT, 200)
    rig.raw_avail(0)
    expect_broken(rig.queue(), "descriptor 0 .*next 200 >= queue size 8")


def test_hostile_buffer_outside_memory(rig: Rig) -> None:
    rig.raw_desc(0, 2 * MiB, 4)
    rig.raw_avail(0)
    expect_broken(rig.queue(), r"buffer 0x200000\+0x4: .*not in any memory region")


def test_hostile_buffer_running_past_region(rig: Rig) -> None:
    rig.raw_desc(0, MiB - 2, 4, WRITE)
    rig.raw_avail(0)
    expect_broken(rig.queue(), "runs past the end")


def test_hostile_buffer_overflowing_64_bits(rig: Rig) -> None:
    rig.raw_desc(0, (1 << 64) - 2, 0x10)
    rig.raw_avail(0)
    expect_broken(rig.queue(), "overflows 64 bits")


def test_hostile_indirect_inside_indirect(rig: Rig) -> None:
    rig.mem.write(DATA, _DESC.pack(DATA + 0x100, 16, INDIRECT, 0))
    rig.raw_desc(0, DATA, 16, INDIRECT)
    rig.raw_avail(0)
    expect_broken(rig.queue(), "INDIRECT inside an indirect table")


def test_hostile_indirect_with_next(rig: Rig) -> None:
    rig.mem.write(DATA, _DESC.pack(DATA + 0x100, 16, 0, 0))
    rig.raw_desc(0, DATA, 16, INDIRECT | NEXT, 1)
    rig.raw_avail(0)
    expect_broken(rig.queue(), "INDIRECT together with NEXT")


@pytest.mark.parametrize("length", [0, 24])
def test_hostile_indirect_table_length(rig: Rig, length: int) -> None:
    rig.raw_desc(0, DATA, length, INDIRECT)
    rig.raw_avail(0)
    expect_broken(rig.queue(), f"indirect table length {length} is not a positive multiple of 16")


def test_indirect_table_longer_than_the_ring_is_accepted(rig: Rig) -> None:
    """Linux sizes indirect tables from seg_max, not the ring: 183 entries on a 128 ring seen."""
    entries = 183
    table = b"".join(
        _DESC.pack(DATA + 0x4000 + 512 * k, 512, NEXT | (WRITE if k >= entries - 2 else 0), k + 1)
        for k in range(entries - 1)
    ) + _DESC.pack(DATA + 0x4000 + 512 * (entries - 1), 1, WRITE, 0)
    rig.mem.write(DATA, table)
    rig.raw_desc(0, DATA, len(table), INDIRECT)
    rig.raw_avail(0)
    chain = rig.queue().pop()
    assert chain is not None
    assert (len(chain.readable), len(chain.writable)) == (entries - 2, 2)
    assert (chain.read_len, chain.write_len) == (512 * (entries - 2), 513)


def test_hostile_indirect_table_beyond_the_fixed_limit(rig: Rig) -> None:
    rig.raw_desc(0, DATA, 16 * (MAX_INDIRECT_DESCRIPTORS + 1), INDIRECT)
    rig.raw_avail(0)
    expect_broken(
        rig.queue(),
        f"indirect table has {MAX_INDIRECT_DESCRIPTORS + 1} descriptors, more than the limit of "
        f"{MAX_INDIRECT_DESCRIPTORS}",
    )


def test_hostile_indirect_loop(rig: Rig) -> None:
    rig.mem.write(DATA, _DESC.pack(DATA, 4, NEXT, 1) + _DESC.pack(DATA, 4, NEXT, 0))
    rig.raw_desc(0, DATA, 32, INDIRECT)
    rig.raw_avail(0)
    expect_broken(rig.queue(), "loops .* indirect table")


def test_hostile_indirect_next_out_of_range(rig: Rig) -> None:
    rig.mem.write(DATA, _DESC.pack(DATA, 4, NEXT, 2) + _DESC.pack(DATA, 4, 0, 0))
    rig.raw_desc(0, DATA, 32, INDIRECT)
    rig.raw_avail(0)
    expect_broken(rig.queue(), "indirect descriptor 0 .*next 2 >= indirect table size 2")


def test_hostile_indirect_table_outside_memory(rig: Rig) -> None:
    rig.raw_desc(0, MiB - 16, 32, INDIRECT)
    rig.raw_avail(0)
    expect_broken(rig.queue(), "indirect table: .*runs past the end")


def test_hostile_indirect_without_feature(rig: Rig) -> None:
    rig.mem.write(DATA, _DESC.pack(DATA, 4, 0, 0))
    rig.raw_desc(0, DATA, 16, INDIRECT)
    rig.raw_avail(0)
    expect_broken(rig.queue(indirect=False), "VIRTIO_F_INDIRECT_DESC was not negotiated")


def test_hostile_avail_idx_too_far_ahead(rig: Rig) -> None:
    rig.raw_avail(idx=SIZE + 1)
    expect_broken(rig.queue(), "avail.idx 9 is 9 entries ahead of last_avail_idx 0")


def test_hostile_readable_after_writable(rig: Rig) -> None:
    rig.raw_desc(0, DATA, 4, WRITE | NEXT, 1)
    rig.raw_desc(1, DATA, 4)
    rig.raw_avail(0)
    expect_broken(rig.queue(), "descriptor 1 .*device-readable descriptor after a device-writable")


def test_hostile_readable_after_writable_in_indirect(rig: Rig) -> None:
    rig.mem.write(DATA, _DESC.pack(DATA, 4, WRITE | NEXT, 1) + _DESC.pack(DATA, 0, 0, 0))
    rig.raw_desc(0, DATA, 32, INDIRECT)
    rig.raw_avail(0)
    expect_broken(rig.queue(), "indirect descriptor 1 .*device-readable descriptor after")


def test_zero_length_data_descriptor_is_accepted_and_skipped(rig: Rig) -> None:
    # Spec 2.7.5.1 forbids loops and chains over 2^32 bytes, not zero-length buffers.
    rig.raw_desc(0, 0xDEAD_0000_0000, 0, NEXT, 1)  # address irrelevant for length 0
    rig.raw_desc(1, DATA, 4, WRITE)
    rig.raw_avail(0)
    chain = rig.queue().pop()
    assert chain is not None
    assert (chain.readable, chain.read_len, chain.write_len, chain.desc_count) == ([], 0, 4, 2)


def test_direct_chain_then_indirect_is_valid(rig: Rig) -> None:
    # Spec 2.7.5.3.2: zero or more chained descriptors followed by one indirect descriptor.
    rig.mem.write(DATA + 0x10, b"abcd")
    rig.mem.write(DATA, _DESC.pack(DATA + 0x20, 3, WRITE, 0))
    rig.raw_desc(0, DATA + 0x10, 4, NEXT, 1)
    rig.raw_desc(1, DATA, 16, INDIRECT)
    rig.raw_avail(0)
    chain = rig.queue().pop()
    assert chain is not None
    assert (chain.read_all(), chain.write_len, chain.desc_count) == (b"abcd", 3, 2)


def test_broken_queue_leaves_other_queues_working(no_fd_leak: None) -> None:
    with GuestMemory.anonymous(MiB) as mem:
        d0, a0, u0, total = split_layout(SIZE, 0)
        d1, a1, u1, _ = split_layout(SIZE, (total + 15) // 16 * 16)
        drv0 = SplitDriver(mem, SIZE, d0, a0, u0)
        drv1 = SplitDriver(mem, SIZE, d1, a1, u1)
        q0 = SplitQueue(mem, SIZE, d0, a0, u0, queue_index=0)
        q1 = SplitQueue(mem, SIZE, d1, a1, u1, queue_index=1)
        drv0.add([(5 * MiB, 4)], [])
        drv0.publish()
        drv1.add([(DATA, 4)], [])
        drv1.publish()
        with pytest.raises(VirtqueueError, match="queue 0:"):
            q0.pop()
        chain = q1.pop()
        assert chain is not None
        q1.push(chain.head, 0)
        assert drv1.get_used() == [(0, 0)]
        del chain
        gc.collect()


def test_hostile_device_is_caught_by_the_driver(rig: Rig) -> None:
    rig.drv.add([(DATA, 1)], [])
    rig.drv.publish()
    dev = rig.queue()
    dev.push(5, 0)  # the device returns a head the driver never made available
    with pytest.raises(VirtqueueError, match="id 5 is not a chain the driver made available"):
        rig.drv.get_used()
    rig.mem.write(rig.used + 2, struct.pack("<H", 7))
    with pytest.raises(VirtqueueError, match=r"used\.idx 7 is 7 entries ahead"):
        rig.drv.get_used()


def test_driver_runs_out_of_descriptors(rig: Rig) -> None:
    rig.drv.add([(DATA, 1)] * 6, [])
    with pytest.raises(VirtqueueError, match="needs 3 descriptors, only 2 free"):
        rig.drv.add([(DATA, 1)] * 3, [])
    rig.drv.add([(DATA, 1)] * 3, [], indirect_gpa=DATA + 0x100)  # one ring descriptor
    assert rig.drv.num_free == 1


def test_indirect_table_and_buffers_straddling_two_regions(no_fd_leak: None) -> None:
    with GuestMemory.anonymous(MiB) as mem:
        mem.add_anonymous(MiB, MiB)  # adjacent: boundaries at 1 MiB and 2 MiB
        mem.add_anonymous(MiB, 2 * MiB)
        desc, avail, used, _ = split_layout(SIZE, 0)
        drv = SplitDriver(mem, SIZE, desc, avail, used)
        dev = SplitQueue(mem, SIZE, desc, avail, used)
        mem.write(MiB - 3, b"abcdef")
        drv.add([(MiB - 3, 6)], [(MiB - 2, 4)], indirect_gpa=2 * MiB - 16)
        drv.publish()
        chain = dev.pop()
        assert chain is not None
        assert [len(v) for v in chain.readable] == [3, 3]
        assert chain.read_all() == b"abcdef"
        assert chain.writable_gpas == [(MiB - 2, 4)]
        assert chain.write_at(0, b"WXYZ") == 4
        dev.push(chain.head, 4)
        assert drv.get_used() == [(chain.head, 4)]
        assert mem.read(MiB - 3, 6) == b"aWXYZf"
        del chain
        drv.close()
        dev.close()


class RecordingHooks:
    """A SplitInflightHooks that records calls and what the used ring showed at each."""

    def __init__(self, mem: GuestMemory, used_gpa: int) -> None:
        self.mem = mem
        self.used_gpa = used_gpa
        self.calls: list[tuple[str, object, int]] = []

    def _used_idx(self) -> int:
        return int(struct.unpack("<H", self.mem.read(self.used_gpa + 2, 2))[0])

    def begin(self, used_idx: int) -> bool:
        return False

    def on_pop(self, head: int) -> None:
        self.calls.append(("on_pop", head, self._used_idx()))

    def before_publish(self, heads: Sequence[int]) -> None:
        self.calls.append(("before_publish", list(heads), self._used_idx()))

    def after_publish(self, heads: Sequence[int], used_idx: int) -> None:
        assert used_idx == self._used_idx()
        self.calls.append(("after_publish", list(heads), self._used_idx()))


def test_inflight_hooks_bracket_the_used_idx_store(rig: Rig) -> None:
    hooks = RecordingHooks(rig.mem, rig.used)
    dev = rig.queue(inflight=hooks)
    for k in range(3):
        rig.drv.add([(DATA + k, 1)], [])
    rig.drv.publish()
    a = dev.pop()
    rest = dev.pop_batch(8)
    assert a is not None
    dev.push(a.head, 0)
    dev.push_batch([(c.head, 0) for c in rest])
    assert hooks.calls == [
        ("on_pop", 0, 0),
        ("on_pop", 1, 0),
        ("on_pop", 2, 0),
        ("before_publish", [0], 0),
        ("after_publish", [0], 1),
        ("before_publish", [1, 2], 1),
        ("after_publish", [1, 2], 3),
    ]


def test_push_batch_logs_used_ring_and_buffers(rig: Rig) -> None:
    log, fd = DirtyLog.anonymous(64)
    os.close(fd)
    rig.mem.set_log(log)
    dev = rig.queue(log_used=True)
    rig.drv.add([], [(DATA + 5 * PAGE_SIZE, 10)])
    rig.drv.add([(DATA, 1)], [(DATA + 9 * PAGE_SIZE, 10)], indirect_gpa=DATA + 0x800)
    rig.drv.publish()
    log.clear()
    chains = dev.pop_batch(2)
    dev.push_batch([(chains[0].head, 0), (chains[1].head, 1)])
    page = DATA // PAGE_SIZE
    assert log.dirty_pages() == [rig.used // PAGE_SIZE, page + 9]


@pytest.mark.parametrize("batch", [False, True])
def test_region_removed_during_pop_is_not_the_guests_fault(
    rig: Rig, monkeypatch: pytest.MonkeyPatch, batch: bool
) -> None:
    rig.mem.add_anonymous(MiB, 4 * MiB)
    rig.drv.add([(4 * MiB, 4)], [])
    rig.drv.publish()
    dev = rig.queue()
    stale = rig.mem.fast_table()  # what a pop that raced with the removal would have seen
    rig.mem.remove_region(4 * MiB, MiB, rig.mem.regions[1].userspace_addr)
    monkeypatch.setattr(rig.mem, "fast_table", lambda: stale)
    with pytest.raises(GuestMemoryError, match="removed while popping"):
        dev.pop_batch(4) if batch else dev.pop()
    assert dev.broken is None
    assert dev.last_avail_idx == 0


@pytest.mark.parametrize("regions", [1, 2])
def test_pop_batch_returns_the_chains_before_a_malformed_one(regions: int) -> None:
    """They were taken from the ring and must be completed; the error comes on the next pop."""
    with GuestMemory.anonymous(MiB) as mem:
        if regions == 2:
            mem.add_anonymous(MiB, guest_phys_addr=0x1000_0000)
        desc, avail, used, _ = split_layout(SIZE, 0)
        rig = Rig(mem, desc, avail, used, SplitDriver(mem, SIZE, desc, avail, used))
        rig.raw_desc(0, DATA, 16)
        rig.raw_desc(1, DATA + 16, 16, NEXT, 2)
        rig.raw_desc(2, DATA + 32, 16)
        rig.raw_desc(3, DATA, 16, NEXT, 3)  # loops onto itself
        rig.raw_avail(0, 1, 3)
        dev = rig.queue()
        chains = dev.pop_batch(8)
        assert [c.head for c in chains] == [0, 1]
        assert dev.last_avail_idx == 2
        with pytest.raises(VirtqueueError, match="loops"):
            dev.pop_batch(8)
        dev.push_batch([(c.head, 0) for c in chains])
        assert dev.used_idx == 2
        del chains
        dev.close()
        rig.drv.close()
