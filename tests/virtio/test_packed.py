"""Packed virtqueue: device side against the driver side, notifications, logging, hostile guests."""

from __future__ import annotations

import gc
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from pyvhost.errors import VirtqueueError
from pyvhost.virtio.chain import MAX_INDIRECT_DESCRIPTORS
from pyvhost.virtio.memory import PAGE_SIZE, DirtyLog, GuestMemory
from pyvhost.virtio.packed import (
    DESC_F_AVAIL,
    DESC_F_INDIRECT,
    DESC_F_NEXT,
    DESC_F_USED,
    DESC_F_WRITE,
    RING_EVENT_FLAGS_DESC,
    RING_EVENT_FLAGS_DISABLE,
    PackedDriver,
    PackedQueue,
    decode_packed_base,
    encode_packed_base,
    packed_layout,
)
from pyvhost.virtio.queue import DeviceQueue

MiB = 1 << 20
SIZE = 8
RING = 0x1000
DATA = 0x10000
NEXT, WRITE, INDIRECT = DESC_F_NEXT, DESC_F_WRITE, DESC_F_INDIRECT
_DESC = struct.Struct("<QIHH")
FLAGS_WORD = 7  # a descriptor's flags in the ring as u16 words


@dataclass
class Rig:
    """Guest memory with a packed ring at RING, its driver, and raw descriptor writers."""

    mem: GuestMemory
    desc: int
    driver_event: int
    device_event: int
    drv: PackedDriver
    size: int = SIZE

    def queue(self, **kwargs: object) -> PackedQueue:
        return PackedQueue(
            self.mem,
            self.size,
            self.desc,
            self.driver_event,
            self.device_event,
            **kwargs,  # type: ignore[arg-type]
        )

    def raw_desc(
        self, pos: int, addr: int, length: int, *, buf_id: int, flags: int = 0, wrap: bool = True
    ) -> None:
        """Write one descriptor marked available for ``wrap`` (flags included)."""
        flags |= DESC_F_AVAIL if wrap else DESC_F_USED
        self.mem.write(self.desc + 16 * pos, _DESC.pack(addr, length, buf_id, flags))

    def close(self) -> None:
        self.drv.close()
        gc.collect()  # queues and chains of the test still hold views into the memory
        self.mem.close()

    def flags_at(self, pos: int) -> int:
        value: int = struct.unpack("<H", self.mem.read(self.desc + 16 * pos + 14, 2))[0]
        return value


def make_rig(size: int = SIZE, event_idx: bool = False) -> Rig:
    mem = GuestMemory.anonymous(MiB)
    lay = packed_layout(size, RING)
    drv = PackedDriver(
        mem, size, lay.desc_gpa, lay.driver_event_gpa, lay.device_event_gpa, event_idx=event_idx
    )
    return Rig(mem, lay.desc_gpa, lay.driver_event_gpa, lay.device_event_gpa, drv, size)


@pytest.fixture
def rig(no_fd_leak: None) -> Iterator[Rig]:
    r = make_rig()
    yield r
    r.close()


def test_layout_and_base_encoding() -> None:
    lay = packed_layout(256, 0x4000)
    assert lay == (0x4000, 0x4000 + 4096, 0x4000 + 4100, 4104)
    with pytest.raises(ValueError, match="16-byte aligned"):
        packed_layout(8, 0x1008)
    value = encode_packed_base(5, True, 0x7FFF, False)
    assert value == 5 | 1 << 15 | 0x7FFF << 16
    assert decode_packed_base(value) == (5, True, 0x7FFF, False)
    assert decode_packed_base(encode_packed_base(0x1234, False, 3, True)) == (
        0x1234,
        False,
        3,
        True,
    )
    assert encode_packed_base(0, False, 0, True) == 1 << 31
    with pytest.raises(ValueError, match="15 bits"):
        encode_packed_base(1 << 15, True, 0, True)


def test_queue_satisfies_protocol(rig: Rig) -> None:
    assert isinstance(rig.queue(), DeviceQueue)


def test_round_trip_direct_and_indirect(rig: Rig) -> None:
    dev = rig.queue()
    rig.mem.write(DATA, b"request header")
    direct = rig.drv.add([(DATA, 7), (DATA + 7, 7)], [(DATA + 0x100, 6), (DATA + 0x200, 10)])
    rig.mem.write(DATA + 0x1000, b"indirect!")
    indirect = rig.drv.add([(DATA + 0x1000, 9)], [(DATA + 0x1100, 3)], indirect_gpa=DATA + 0x2000)
    assert rig.drv.num_free == SIZE - 5
    assert dev.pop() is None  # nothing published yet
    rig.drv.publish()
    assert rig.drv.should_kick()
    a, b = dev.pop_batch(8)
    assert (a.head, a.desc_count, a.read_all(), a.write_len) == (direct, 4, b"request header", 16)
    assert (b.head, b.desc_count, b.read_all(), b.write_len) == (indirect, 1, b"indirect!", 3)
    assert a.write_at(0, b"0123456789ABCDEF") == 16
    b.write_at(0, b"xyz")
    assert dev.in_flight == 2
    dev.push_batch([(indirect, 3), (direct, 16)])
    assert rig.drv.get_used() == [(indirect, 3), (direct, 16)]
    assert rig.mem.read(DATA + 0x100, 6) + rig.mem.read(DATA + 0x200, 10) == b"0123456789ABCDEF"
    assert rig.mem.read(DATA + 0x1100, 3) == b"xyz"
    assert rig.drv.num_free == SIZE


def test_head_is_the_id_of_the_last_descriptor(rig: Rig) -> None:
    dev = rig.queue()
    rig.raw_desc(1, DATA, 4, buf_id=7, flags=NEXT)
    rig.raw_desc(2, DATA + 4, 4, buf_id=3, flags=WRITE)
    rig.raw_desc(0, DATA + 8, 4, buf_id=6, flags=NEXT)  # first descriptor made available last
    chain = dev.pop()
    assert chain is not None and (chain.head, chain.desc_count) == (3, 3)
    assert (chain.read_len, chain.write_len) == (8, 4)


def test_out_of_order_completion_advances_by_descriptor_count(rig: Rig) -> None:
    dev = rig.queue()
    ids = [
        rig.drv.add([(DATA, 1)], []),
        rig.drv.add([(DATA, 1), (DATA + 1, 1)], [(DATA + 0x100, 8)]),
        rig.drv.add([], [(DATA + 0x200, 8), (DATA + 0x300, 8)]),
    ]
    rig.drv.publish()
    chains = dev.pop_batch(8)
    assert [c.desc_count for c in chains] == [1, 3, 2]
    dev.push(ids[2], 5)
    assert dev.used_idx == 2  # the used entry went to slot 0, then skipped the 2 slots of id 2
    assert rig.flags_at(0) == DESC_F_AVAIL | DESC_F_USED | WRITE
    dev.push(ids[0], 0)
    assert rig.flags_at(2) == DESC_F_AVAIL | DESC_F_USED  # no WRITE: nothing written
    dev.push(ids[1], 8)
    assert dev.used_idx == 6 == dev.last_avail_idx
    assert rig.drv.get_used() == [(ids[2], 5), (ids[0], 0), (ids[1], 8)]


def test_many_wraps_and_resume_from_base(rig: Rig) -> None:
    dev = rig.queue()
    for round_ in range(40):
        payload = round_
        n = 1 + round_ % 3
        rig.mem.write(DATA, bytes([payload]) * n)
        buf = rig.drv.add([(DATA + k, 1) for k in range(n)], [(DATA + 0x100, 2)])
        rig.drv.publish()
        chain = dev.pop()
        assert chain is not None and chain.head == buf
        assert chain.read_all() == bytes([payload]) * n
        chain.write_at(0, b"ok")
        dev.push(buf, 2)
        assert rig.drv.get_used() == [(buf, 2)]
        if round_ % 7 == 6:  # a new back-end resumes from GET_VRING_BASE
            avail, awrap, used, uwrap = decode_packed_base(dev.get_base())
            dev = rig.queue(last_avail_idx=avail, avail_wrap=awrap, used_idx=used, used_wrap=uwrap)
    avail, awrap, used, uwrap = decode_packed_base(dev.get_base())
    total = sum(1 + r % 3 + 1 for r in range(40))  # descriptors consumed
    assert avail == used == total % SIZE
    assert awrap == uwrap == (total // SIZE % 2 == 0)


def test_a_second_driver_takes_over_the_ring_where_the_first_stopped(rig: Rig) -> None:
    """``PackedDriver(start=drv.position)`` (exercise blk --jobs on packed rings): the ring is
    not reset, and the device goes on across wraps with the same queue and its wrap counter."""
    dev = rig.queue()
    drivers = [rig.drv]
    for round_ in range(30):
        drv = drivers[-1]
        if round_ in (5, 13, 22):  # odd descriptor counts: taken over at either wrap counter
            drivers.append(
                PackedDriver(
                    rig.mem, SIZE, rig.desc, rig.driver_event, rig.device_event,
                    start=drv.position,
                )
            )  # fmt: skip
            drv = drivers[-1]
        n = 1 + round_ % 2
        rig.mem.write(DATA, bytes([round_]) * n)
        buf = drv.add([(DATA + k, 1) for k in range(n)], [(DATA + 0x100, 1)])
        drv.publish()
        chain = dev.pop()
        assert chain is not None and chain.head == buf, round_
        assert chain.read_all() == bytes([round_]) * n
        dev.push(buf, 1)
        assert drv.get_used() == [(buf, 1)]
    assert {d.position[1] for d in drivers} == {True, False}
    assert drivers[-1].position == decode_packed_base(dev.get_base())[:2]
    for drv in drivers[1:]:
        drv.close()
    with pytest.raises(ValueError, match="start position 8 is outside a ring of 8"):
        PackedDriver(rig.mem, SIZE, rig.desc, rig.driver_event, rig.device_event, start=(8, True))


def test_chain_crossing_the_end_of_the_ring(rig: Rig) -> None:
    dev = rig.queue()
    for _ in range(6):  # move both sides to position 6
        rig.drv.add([(DATA, 1)], [])
    rig.drv.publish()
    dev.push_batch([(c.head, 0) for c in dev.pop_batch(8)])
    rig.drv.get_used()
    rig.mem.write(DATA, b"abcd")
    buf = rig.drv.add([(DATA, 1), (DATA + 1, 1), (DATA + 2, 1), (DATA + 3, 1)], [])
    rig.drv.publish()
    chain = dev.pop()
    assert chain is not None and chain.read_all() == b"abcd" and chain.desc_count == 4
    assert (dev.last_avail_idx, dev.avail_wrap) == (2, False)
    dev.push(buf, 0)
    assert (dev.used_idx, dev.used_wrap) == (2, False)
    assert rig.drv.get_used() == [(buf, 0)]


class _FlagRecorder:
    """Stands in for the queue's u16 ring view and records the order of flags stores (by ring
    position; a strided slice store records each flags word it covers, in order)."""

    def __init__(self, view: memoryview) -> None:
        self.view = view
        self.stores: list[int] = []

    def __getitem__(self, i: int) -> int:
        value: int = self.view[i]
        return value

    def __setitem__(self, i: int | slice, value: Any) -> None:
        indices = range(*i.indices(len(self.view))) if isinstance(i, slice) else [i]
        self.stores.extend(k // 8 for k in indices if k % 8 == FLAGS_WORD)
        self.view[i] = value


def test_batch_stores_the_first_flags_last(rig: Rig) -> None:
    dev = rig.queue()
    ids = [rig.drv.add([(DATA, 1)], []) for _ in range(4)]
    rig.drv.publish()
    dev.pop_batch(8)
    recorder = _FlagRecorder(dev._ring16)
    dev._ring16 = recorder  # type: ignore[assignment]
    dev.push_batch([(ids[1], 0), (ids[0], 0), (ids[3], 0)])
    assert recorder.stores == [1, 2, 0]
    assert rig.drv.get_used() == [(ids[1], 0), (ids[0], 0), (ids[3], 0)]


def test_driver_publishes_first_descriptor_last(rig: Rig) -> None:
    dev = rig.queue()
    rig.drv.add([(DATA, 1), (DATA + 1, 1)], [(DATA + 2, 1)])
    assert rig.flags_at(0) == 0  # head not yet available ...
    assert rig.flags_at(1) & DESC_F_AVAIL and rig.flags_at(2) & DESC_F_AVAIL  # ... the rest is
    assert not dev.has_available()
    rig.drv.publish()
    assert rig.flags_at(0) == DESC_F_AVAIL | NEXT
    assert dev.has_available()


def test_flags_suppression(rig: Rig) -> None:
    dev = rig.queue()
    dev.disable_notifications()
    rig.drv.add([(DATA, 1)], [])
    rig.drv.publish()
    assert not rig.drv.should_kick()
    assert dev.enable_notifications()  # a buffer arrived while kicks were off
    rig.drv.add([(DATA, 1)], [])
    rig.drv.publish()
    assert rig.drv.should_kick()
    chains = dev.pop_batch(8)
    rig.drv.disable_interrupts()
    dev.push(chains[0].head, 0)
    assert not dev.needs_notification()
    assert rig.drv.enable_interrupts()  # a used buffer is already waiting
    dev.push(chains[1].head, 0)
    assert dev.needs_notification()
    assert not dev.needs_notification()  # nothing new since


def test_event_idx_suppression(no_fd_leak: None) -> None:
    r = make_rig(size=4, event_idx=True)
    try:
        dev = r.queue(event_idx=True)
        drv = r.drv
        for lap in range(6):  # several laps so both wrap values are exercised
            assert not dev.enable_notifications()  # kick wanted for the next descriptor
            a = drv.add([(DATA, 1)], [])
            drv.publish()
            assert drv.should_kick()
            b = drv.add([(DATA, 1)], [])
            drv.publish()
            assert not drv.should_kick()  # the device has not caught up: no second kick
            chains = dev.pop_batch(4)
            assert [c.head for c in chains] == [a, b]
            assert not drv.enable_interrupts()
            dev.push(a, 0)
            assert dev.needs_notification(), lap
            dev.push(b, 0)
            assert not dev.needs_notification()  # the driver has not collected the first yet
            assert drv.get_used() == [(a, 0), (b, 0)]
        dev.disable_notifications()
        drv.add([(DATA, 1)], [])
        drv.publish()
        assert not drv.should_kick()
        event = struct.unpack("<HH", r.mem.read(r.device_event, 4))
        assert event[1] == RING_EVENT_FLAGS_DISABLE
        dev.pop()
        assert dev.enable_notifications() is False
        off_wrap, flags = struct.unpack("<HH", r.mem.read(r.device_event, 4))
        assert flags == RING_EVENT_FLAGS_DESC
        assert off_wrap == dev.last_avail_idx | dev.avail_wrap << 15
    finally:
        r.close()


def test_event_idx_wrap_bit_of_the_event_offset(no_fd_leak: None) -> None:
    """The event's wrap bit says which lap its offset belongs to (QEMU / Linux arithmetic)."""
    r = make_rig(size=4, event_idx=True)
    try:
        dev = r.queue(event_idx=True)
        r.drv.disable_interrupts()  # so the driver leaves the driver area to this test
        ids = [r.drv.add([(DATA, 1)], []) for _ in range(3)]
        r.drv.publish()
        dev.pop_batch(4)
        dev.push_batch([(i, 0) for i in ids])
        dev.needs_notification()
        r.drv.get_used()
        more = [r.drv.add([(DATA, 1)], []) for _ in range(3)]  # ring positions 3, 0, 1
        r.drv.publish()
        dev.pop_batch(4)

        def event(off: int, wrap: int) -> None:
            r.mem.write(r.driver_event, struct.pack("<HH", off | wrap << 15, RING_EVENT_FLAGS_DESC))

        event(3, 1)  # position 3 of the lap with wrap counter 1: used by the next push
        dev.push(more[0], 0)  # used position 3 -> 0, device wrap counter 1 -> 0
        assert dev.needs_notification()
        event(3, 0)  # position 3 of the next lap: not reached by the following push
        dev.push(more[1], 0)  # used position 0 -> 1
        assert not dev.needs_notification()
        event(1, 1)  # position 1 one lap back: long passed, no notification
        dev.push(more[2], 0)  # used position 1 -> 2
        assert not dev.needs_notification()
    finally:
        r.close()


def test_used_descriptors_and_written_buffers_are_logged(rig: Rig) -> None:
    dirty_log, fd = DirtyLog.anonymous(64)
    os.close(fd)
    rig.mem.set_log(dirty_log)
    dev = rig.queue(log_used=True)
    buf = rig.drv.add([(DATA, 4)], [(DATA + 3 * PAGE_SIZE, 100), (DATA + 5 * PAGE_SIZE, 100)])
    rig.drv.publish()
    dev.pop()
    dev.push(buf, 150)
    pages = set(dirty_log.dirty_pages())
    assert pages == {RING // PAGE_SIZE, DATA // PAGE_SIZE + 3, DATA // PAGE_SIZE + 5}
    rig.mem.set_log(None)


# -- hostile guests -------------------------------------------------------------------------------


def expect_broken(dev: PackedQueue, match: str) -> None:
    with pytest.raises(VirtqueueError, match=match) as info:
        dev.pop()
    assert info.value.queue == 3
    assert dev.broken is not None
    with pytest.raises(VirtqueueError, match="broken"):
        dev.pop()


def test_hostile_ring_full_of_next(rig: Rig) -> None:
    for pos in range(SIZE):
        rig.raw_desc(pos, DATA, 4, buf_id=0, flags=NEXT)
    expect_broken(rig.queue(queue_index=3), "longer than the limit of 8")


def test_hostile_chain_longer_than_max_chain_len(rig: Rig) -> None:
    for pos in range(4):
        rig.raw_desc(pos, DATA, 4, buf_id=0, flags=NEXT if pos < 3 else 0)
    expect_broken(rig.queue(queue_index=3, max_chain_len=3), "longer than the limit of 3")


def test_hostile_next_into_unavailable_descriptor(rig: Rig) -> None:
    rig.raw_desc(0, DATA, 4, buf_id=0, flags=NEXT)
    expect_broken(rig.queue(queue_index=3), "not marked available")


def test_hostile_buffer_outside_memory(rig: Rig) -> None:
    rig.raw_desc(0, 4 * MiB, 4, buf_id=0)
    expect_broken(rig.queue(queue_index=3), "not in any memory region")


def test_hostile_buffer_running_past_region(rig: Rig) -> None:
    rig.raw_desc(0, MiB - 2, 4, buf_id=0)
    expect_broken(rig.queue(queue_index=3), "runs past the end")


def test_hostile_buffer_overflowing_64_bits(rig: Rig) -> None:
    rig.raw_desc(0, (1 << 64) - 2, 4, buf_id=0)
    expect_broken(rig.queue(queue_index=3), "overflows 64 bits")


def test_hostile_indirect_inside_indirect(rig: Rig) -> None:
    rig.mem.write(DATA + 0x100, _DESC.pack(DATA + 0x200, 16, 0, INDIRECT))
    rig.raw_desc(0, DATA + 0x100, 16, buf_id=0, flags=INDIRECT)
    expect_broken(rig.queue(queue_index=3), "INDIRECT inside an indirect table")


def test_hostile_indirect_with_next(rig: Rig) -> None:
    rig.mem.write(DATA + 0x100, _DESC.pack(DATA, 4, 0, 0))
    rig.raw_desc(1, DATA, 4, buf_id=0)
    rig.raw_desc(0, DATA + 0x100, 16, buf_id=0, flags=INDIRECT | NEXT)
    expect_broken(rig.queue(queue_index=3), "INDIRECT together with NEXT")


def test_hostile_indirect_in_the_middle_of_a_chain(rig: Rig) -> None:
    rig.mem.write(DATA + 0x100, _DESC.pack(DATA, 4, 0, 0))
    rig.raw_desc(1, DATA + 0x100, 16, buf_id=0, flags=INDIRECT)
    rig.raw_desc(0, DATA, 4, buf_id=0, flags=NEXT)
    expect_broken(rig.queue(queue_index=3), "inside a NEXT chain has INDIRECT")


@pytest.mark.parametrize("length", [0, 24])
def test_hostile_indirect_table_length(rig: Rig, length: int) -> None:
    rig.raw_desc(0, DATA + 0x100, length, buf_id=0, flags=INDIRECT)
    expect_broken(rig.queue(queue_index=3), "not a positive multiple of 16")


def test_indirect_table_longer_than_the_ring_is_accepted(rig: Rig) -> None:
    """Linux sizes indirect tables from seg_max, not the ring: 183 entries on a 128 ring seen."""
    entries = 183
    table = b"".join(
        _DESC.pack(DATA + 0x4000 + 512 * k, 512, 0, WRITE if k >= entries - 2 else 0)
        for k in range(entries)
    )
    rig.mem.write(DATA + 0x100, table)
    rig.raw_desc(0, DATA + 0x100, len(table), buf_id=5, flags=INDIRECT)
    chain = rig.queue().pop()
    assert chain is not None
    assert chain.head == 5
    assert (len(chain.readable), len(chain.writable)) == (entries - 2, 2)


def test_hostile_indirect_table_beyond_the_fixed_limit(rig: Rig) -> None:
    rig.raw_desc(0, DATA + 0x100, 16 * (MAX_INDIRECT_DESCRIPTORS + 1), buf_id=0, flags=INDIRECT)
    expect_broken(rig.queue(queue_index=3), f"more than the limit of {MAX_INDIRECT_DESCRIPTORS}")


def test_hostile_indirect_table_outside_memory(rig: Rig) -> None:
    rig.raw_desc(0, MiB - 16, 32, buf_id=0, flags=INDIRECT)
    expect_broken(rig.queue(queue_index=3), "indirect table")


def test_hostile_indirect_without_feature(rig: Rig) -> None:
    rig.mem.write(DATA + 0x100, _DESC.pack(DATA, 4, 0, 0))
    rig.raw_desc(0, DATA + 0x100, 16, buf_id=0, flags=INDIRECT)
    expect_broken(rig.queue(queue_index=3, indirect=False), "VIRTIO_F_INDIRECT_DESC")


def test_hostile_readable_after_writable(rig: Rig) -> None:
    rig.raw_desc(1, DATA, 4, buf_id=0)
    rig.raw_desc(0, DATA + 4, 4, buf_id=0, flags=WRITE | NEXT)
    expect_broken(rig.queue(queue_index=3), "device-readable but follows a device-writable")


def test_hostile_readable_after_writable_in_indirect(rig: Rig) -> None:
    table = _DESC.pack(DATA, 4, 0, WRITE) + _DESC.pack(DATA + 4, 4, 0, 0)
    rig.mem.write(DATA + 0x100, table)
    rig.raw_desc(0, DATA + 0x100, 32, buf_id=0, flags=INDIRECT)
    expect_broken(rig.queue(queue_index=3), "indirect descriptor 1 is device-readable")


def test_hostile_buffer_id_out_of_range(rig: Rig) -> None:
    rig.raw_desc(0, DATA, 4, buf_id=SIZE)
    expect_broken(rig.queue(queue_index=3), "buffer id 8 >= queue size 8")


def test_hostile_buffer_id_already_in_flight(rig: Rig) -> None:
    rig.raw_desc(0, DATA, 4, buf_id=5)
    rig.raw_desc(1, DATA, 4, buf_id=5)
    dev = rig.queue(queue_index=3)
    assert dev.pop() is not None
    expect_broken(dev, "buffer id 5 is already in flight")


def test_zero_length_buffers_are_accepted_and_skipped(rig: Rig) -> None:
    """Same policy as the split ring: a zero-length element adds no view."""
    rig.raw_desc(1, DATA, 0, buf_id=0, flags=WRITE)
    rig.raw_desc(0, DATA + 8, 0, buf_id=0, flags=NEXT)
    chain = rig.queue().pop()
    assert chain is not None
    assert (chain.readable, chain.writable, chain.read_len, chain.write_len) == ([], [], 0, 0)
    assert chain.desc_count == 2


def test_push_rejects_unknown_or_repeated_ids(rig: Rig) -> None:
    dev = rig.queue(queue_index=2)
    buf = rig.drv.add([(DATA, 1)], [])
    rig.drv.publish()
    dev.pop()
    with pytest.raises(VirtqueueError, match="buffer id 7 is not in flight"):
        dev.push(7, 0)
    with pytest.raises(VirtqueueError, match="given twice"):
        dev.push_batch([(buf, 0), (buf, 0)])
    with pytest.raises(VirtqueueError, match="32 bits"):
        dev.push(buf, 1 << 32)
    assert rig.flags_at(0) == DESC_F_AVAIL  # nothing was written by the rejected pushes
    dev.push(buf, 0)
    assert rig.drv.get_used() == [(buf, 0)]


def test_hostile_device_is_caught_by_the_driver(rig: Rig) -> None:
    rig.drv.add([(DATA, 1)], [])
    rig.drv.publish()
    rig.mem.write(RING, _DESC.pack(0, 0, 6, DESC_F_AVAIL | DESC_F_USED))
    with pytest.raises(VirtqueueError, match="id 6 is not a buffer in flight"):
        rig.drv.get_used()


def test_driver_runs_out_of_descriptors(rig: Rig) -> None:
    rig.drv.add([(DATA, 1)] * 6, [])
    with pytest.raises(VirtqueueError, match="needs 3 descriptors, only 2 free"):
        rig.drv.add([(DATA, 1)] * 3, [])
    rig.drv.add([(DATA, 1)] * 3, [], indirect_gpa=DATA + 0x100)  # one ring slot suffices


def test_rings_must_be_aligned_and_mapped(no_fd_leak: None) -> None:
    with GuestMemory.anonymous(MiB) as mem:
        with pytest.raises(ValueError, match="16-byte aligned"):
            PackedQueue(mem, 8, 0x1008, 0x2000, 0x2004)
        with pytest.raises(ValueError, match="4-byte aligned"):
            PackedQueue(mem, 8, 0x1000, 0x2002, 0x2004)
        with pytest.raises(Exception, match="within one memory region"):
            PackedQueue(mem, 8, MiB - 64, 0x2000, 0x2004)
        with pytest.raises(ValueError, match="used_idx 8 out of range"):
            PackedQueue(mem, 8, 0x1000, 0x2000, 0x2004, used_idx=8)


@pytest.mark.parametrize("regions", [1, 2])
def test_pop_batch_returns_the_chains_before_a_malformed_one(regions: int) -> None:
    """They were taken from the ring and must be completed; the error comes on the next pop."""
    r = make_rig()
    try:
        if regions == 2:
            r.mem.add_anonymous(MiB, guest_phys_addr=0x1000_0000)
        r.raw_desc(0, DATA, 16, buf_id=0)
        r.raw_desc(1, DATA + 16, 16, buf_id=1, flags=WRITE)
        r.raw_desc(2, DATA, 16, buf_id=SIZE)  # buffer id beyond the ring
        dev = r.queue()
        chains = dev.pop_batch(8)
        assert [c.head for c in chains] == [0, 1]
        with pytest.raises(VirtqueueError, match="buffer id 8 >= queue size"):
            dev.pop_batch(8)
        dev.push_batch([(c.head, 0) for c in chains])
        assert dev.in_flight == 0
        del chains
        dev.close()
    finally:
        r.close()
