"""GuestMemory: mapping, translation, run-time region changes and the dirty log."""

from __future__ import annotations

import gc
import os
import threading
import time
from collections.abc import Iterator

import pytest

from pyvhost.errors import GuestMemoryError
from pyvhost.virtio import atomic
from pyvhost.virtio import memory as memory_mod
from pyvhost.virtio.chain import DescriptorChain
from pyvhost.virtio.memory import PAGE_SIZE, DirtyLog, GuestMemory, RegionSpec

MiB = 1 << 20


def memfd(size: int, fill: bytes = b"") -> int:
    fd = os.memfd_create("test", os.MFD_CLOEXEC)
    os.ftruncate(fd, size)
    if fill:
        os.pwrite(fd, fill, 0)
    return fd


@pytest.fixture
def two_regions(no_fd_leak: None) -> Iterator[GuestMemory]:
    """Two adjacent 1 MiB regions at gpa 0 and 1 MiB, plus one far away at 16 MiB."""
    mem = GuestMemory.anonymous(MiB, 0, userspace_addr=0x10_0000_0000)
    mem.add_anonymous(MiB, MiB, userspace_addr=0x20_0000_0000)
    mem.add_anonymous(MiB, 16 * MiB, userspace_addr=0x30_0000_0000)
    with mem:
        yield mem
        gc.collect()  # pytest.raises tracebacks keep test frames (and their views) in cycles


def test_anonymous_region_shares_memory_through_its_fd(no_fd_leak: None) -> None:
    with GuestMemory.anonymous(MiB, 0x4000_0000) as driver:
        region = driver.regions[0]
        assert region.fd is not None
        spec = region.spec()
        with GuestMemory([spec]) as backend:
            driver.write(0x4000_0100, b"ping")
            assert backend.read(0x4000_0100, 4) == b"ping"
            backend.write(0x4000_0200, b"pong")
            assert driver.read(0x4000_0200, 4) == b"pong"


def test_mapping_survives_closing_the_fd_and_honours_unaligned_offset(no_fd_leak: None) -> None:
    content = bytes(range(256)) * 64
    fd = memfd(4 * PAGE_SIZE, content)
    offset = PAGE_SIZE + 123
    with GuestMemory() as mem:
        mem.add_region(fd, offset, 2 * PAGE_SIZE, 0x1000, 0x9000)
        os.close(fd)
        assert mem.read(0x1000, 16) == content[offset : offset + 16]
        assert mem.read(0x1000 + 2 * PAGE_SIZE - 4, 4) == content[offset + 2 * PAGE_SIZE - 4 :][:4]


def test_translate_crosses_adjacent_regions(two_regions: GuestMemory) -> None:
    mem = two_regions
    mem.write(MiB - 3, b"abcdef")
    views = mem.translate(MiB - 3, 6)
    assert [len(v) for v in views] == [3, 3]
    assert b"".join(views) == b"abcdef"
    assert mem.read(MiB - 3, 6) == b"abcdef"
    with pytest.raises(GuestMemoryError, match="adjacent region") as info:
        mem.view(MiB - 3, 6)
    assert info.value.address == MiB - 3
    assert info.value.length == 6


def test_translate_misses_say_where_and_why(two_regions: GuestMemory) -> None:
    mem = two_regions
    with pytest.raises(GuestMemoryError, match="not in any memory region") as info:
        mem.translate(3 * MiB, 1)
    assert (info.value.address, info.value.length) == (3 * MiB, 1)
    with pytest.raises(GuestMemoryError, match="runs past the end"):
        mem.translate(2 * MiB - 1, 2)  # second region ends, nothing adjacent
    with pytest.raises(GuestMemoryError, match="runs past the end"):
        mem.translate(17 * MiB - 8, 16)
    with pytest.raises(GuestMemoryError, match="overflows 64 bits"):
        mem.translate((1 << 64) - 4, 8)
    with pytest.raises(GuestMemoryError, match="overflows 64 bits"):
        mem.view((1 << 64) - 4, 8)
    with pytest.raises(GuestMemoryError, match="negative"):
        mem.translate(-1, 4)


def test_zero_length_is_valid(two_regions: GuestMemory) -> None:
    assert two_regions.translate(0x1234, 0) == []
    assert two_regions.translate(50 * MiB, 0) == []
    assert two_regions.read(0x1234, 0) == b""


def test_uva_to_gpa(two_regions: GuestMemory) -> None:
    mem = two_regions
    assert mem.uva_to_gpa(0x20_0000_0010) == MiB + 0x10
    assert mem.uva_to_gpa(0x30_0000_0000 + MiB - 8, 8) == 17 * MiB - 8
    with pytest.raises(GuestMemoryError, match="userspace address"):
        mem.uva_to_gpa(0x30_0000_0000 + MiB - 8, 9)
    with pytest.raises(GuestMemoryError, match="userspace address"):
        mem.uva_to_gpa(0x5)


def test_add_and_remove_at_run_time_leave_others_alone(no_fd_leak: None) -> None:
    with GuestMemory.anonymous(MiB, 0) as mem:
        mem.write(0x100, b"first")
        fd = memfd(MiB)
        mem.add_region(fd, 0, MiB, 8 * MiB, 0x50_0000_0000)
        os.close(fd)
        mem.write(8 * MiB + 5, b"second")
        assert len(mem) == 2
        mem.remove_region(8 * MiB, MiB, 0x50_0000_0000)
        assert len(mem) == 1
        assert mem.read(0x100, 5) == b"first"
        with pytest.raises(GuestMemoryError, match="not in any memory region"):
            mem.read(8 * MiB + 5, 6)
        with pytest.raises(GuestMemoryError, match=r"no memory region with gpa 0x800000"):
            mem.remove_region(8 * MiB, MiB, 0x50_0000_0000)
        with pytest.raises(GuestMemoryError, match="no memory region"):
            mem.remove_region(0, MiB, 0x1234)  # right gpa and size, wrong userspace_addr


def test_overlapping_regions_are_rejected(no_fd_leak: None) -> None:
    with GuestMemory.anonymous(MiB, MiB, userspace_addr=0x10_0000_0000) as mem:
        fd = memfd(MiB)
        try:
            with pytest.raises(GuestMemoryError, match=r"gpa 0x180000 .* overlaps region gpa"):
                mem.add_region(fd, 0, MiB, MiB + MiB // 2, 0x90_0000_0000)
            with pytest.raises(GuestMemoryError, match=r"userspace_addr .* overlaps"):
                mem.add_region(fd, 0, MiB, 4 * MiB, 0x10_0000_0000 + 4096)
            with pytest.raises(GuestMemoryError, match="overlaps"):
                mem.replace(
                    [RegionSpec(fd, 0, MiB, 0, 0x1000_0000), RegionSpec(fd, 0, MiB, 0, 0x9000_0000)]
                )
            assert len(mem) == 1  # failed replace left the table alone
        finally:
            os.close(fd)


def test_replace_and_clear(no_fd_leak: None) -> None:
    fd = memfd(2 * MiB)
    try:
        with GuestMemory([RegionSpec(fd, 0, MiB, 0, 0x1_0000_0000)]) as mem:
            mem.write(0, b"x")
            mem.replace([RegionSpec(fd, MiB, MiB, 0, 0x1_0000_0000)])
            assert mem.read(0, 1) == b"\0"  # now backed by the second MiB of the file
            mem.clear()
            assert len(mem) == 0
            with pytest.raises(GuestMemoryError):
                mem.read(0, 1)
    finally:
        os.close(fd)


def test_bad_fd_or_size_is_a_guest_memory_error(no_fd_leak: None) -> None:
    fd = memfd(PAGE_SIZE)
    try:
        with GuestMemory() as mem:
            with pytest.raises(GuestMemoryError, match="cannot mmap"):
                mem.add_region(fd, 0, 4 * PAGE_SIZE, 0, 0x1000)  # file too small
            with pytest.raises(GuestMemoryError, match="must be positive"):
                mem.add_region(fd, 0, 0, 0, 0x1000)
            with pytest.raises(GuestMemoryError, match="overflows 64 bits"):
                mem.add_region(fd, 0, PAGE_SIZE, (1 << 64) - 16, 0x1000)
    finally:
        os.close(fd)


def test_close_with_live_views_defers_the_unmap(no_fd_leak: None) -> None:
    mem = GuestMemory.anonymous(MiB)
    mem.write(0, b"still here")
    held = mem.view(0, 10)
    gc.collect()
    before = memory_mod.deferred_unmaps()
    mem.close()  # must not raise BufferError
    assert memory_mod.deferred_unmaps() == before + 1
    assert bytes(held) == b"still here"  # the mapping is still valid behind the view
    del held
    assert memory_mod.deferred_unmaps() == before


def test_remove_region_with_live_views(no_fd_leak: None) -> None:
    with GuestMemory.anonymous(MiB) as mem:
        mem.add_anonymous(MiB, 4 * MiB)
        chain = DescriptorChain(0, readable=mem.translate(4 * MiB, 8))
        mem.remove_region(4 * MiB, MiB, mem.regions[1].userspace_addr)
        assert chain.read_all() == bytes(8)


# -- dirty log ------------------------------------------------------------------------------------


@pytest.fixture
def logged(no_fd_leak: None) -> Iterator[tuple[GuestMemory, DirtyLog]]:
    with GuestMemory.anonymous(4 * MiB) as mem:
        log, fd = DirtyLog.anonymous((4 * MiB // PAGE_SIZE) // 8)
        os.close(fd)
        mem.set_log(log)
        yield mem, log
        gc.collect()


def test_log_marks_exactly_the_pages_written(logged: tuple[GuestMemory, DirtyLog]) -> None:
    mem, log = logged
    mem.write(PAGE_SIZE - 1, b"ab")  # straddles pages 0 and 1
    mem.write(10 * PAGE_SIZE, b"x")
    mem.write(20 * PAGE_SIZE + 5, bytes(3 * PAGE_SIZE))  # pages 20..23
    mem.log_write(100 * PAGE_SIZE, PAGE_SIZE)  # exactly page 100
    mem.log_write(200 * PAGE_SIZE, 0)  # nothing
    assert log.dirty_pages() == [0, 1, 10, 20, 21, 22, 23, 100]


def test_log_bit_layout(no_fd_leak: None) -> None:
    log, fd = DirtyLog.anonymous(8)
    try:
        log.mark(9 * PAGE_SIZE, 1)
        assert os.pread(fd, 8, 0) == bytes([0, 0b10, 0, 0, 0, 0, 0, 0])
        log.mark(3 * PAGE_SIZE, 20 * PAGE_SIZE)  # pages 3..22: partial, full, partial bytes
        assert os.pread(fd, 3, 0) == bytes([0xF8, 0xFF, 0x7F])
    finally:
        log.close()
        os.close(fd)


def test_log_from_fd_with_offset(no_fd_leak: None) -> None:
    fd = memfd(2 * PAGE_SIZE)
    try:
        log = DirtyLog(fd, 16, offset=PAGE_SIZE + 8)
        log.mark(0, 1)
        assert os.pread(fd, 1, PAGE_SIZE + 8) == b"\x01"
        log.close()
    finally:
        os.close(fd)


def test_log_beyond_its_size_is_refused(logged: tuple[GuestMemory, DirtyLog]) -> None:
    _mem, log = logged
    with pytest.raises(GuestMemoryError, match="beyond the log"):
        log.mark(log.max_address - 1, 2)
    log.mark(log.max_address - 1, 1)
    assert log.dirty_pages() == [log.max_address // PAGE_SIZE - 1]


def test_write_without_log_marks_nothing(no_fd_leak: None) -> None:
    with GuestMemory.anonymous(MiB) as mem:
        log, fd = DirtyLog.anonymous(32)
        os.close(fd)
        mem.write(0, b"before")
        mem.set_log(log)
        mem.set_log(None)
        mem.write(PAGE_SIZE, b"after")
        log2, fd2 = DirtyLog.anonymous(32)
        os.close(fd2)
        mem.set_log(log2)
        assert log2.dirty_pages() == []


def test_log_pieces_marks_only_up_to_written(logged: tuple[GuestMemory, DirtyLog]) -> None:
    mem, log = logged
    mem.log_pieces([(5 * PAGE_SIZE, 10), (30 * PAGE_SIZE, 3 * PAGE_SIZE), (60 * PAGE_SIZE, 5)], 12)
    assert log.dirty_pages() == [5, 30]


class YieldingView:
    """Wraps the log's view and gives the GIL away between each load and store of a byte.

    Under CPython 3.11 a ``view[i] |= bit`` never switches threads half-way, so without this a
    missing lock could not show; with it, an unlocked read-modify-write loses bits at once.
    """

    def __init__(self, view: memoryview) -> None:
        self.view = view

    def __getitem__(self, index: int) -> int:
        value = self.view[index]
        time.sleep(0)
        return int(value)

    def __setitem__(self, index: int | slice, value: int | bytes) -> None:
        self.view[index] = value  # type: ignore[index,assignment]


@pytest.mark.parametrize(
    "impl", [i for i in atomic.IMPLS[:-1] if atomic.or_byte(i) is not None] + [atomic.LOCKED]
)
def test_concurrent_marks_lose_no_bits(impl: str, no_fd_leak: None) -> None:
    n_threads = 8
    pages = 512
    log, fd = DirtyLog.anonymous(pages // 8, atomic_impl=impl)
    real_view = log._view
    log._view = YieldingView(real_view)  # type: ignore[assignment]
    # Thread t marks pages p with p % n_threads == t: every byte is shared by all threads.
    barrier = threading.Barrier(n_threads)

    def work(t: int) -> None:
        barrier.wait()
        for page in range(t, pages, n_threads):
            log.mark(page * PAGE_SIZE, 1)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(n_threads)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    try:
        assert os.pread(fd, pages // 8, 0) == b"\xff" * (pages // 8)
    finally:
        log._view = real_view
        log.close()
        os.close(fd)
