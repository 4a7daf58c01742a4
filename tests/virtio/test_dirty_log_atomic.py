"""The dirty log is shared with other processes: bits are set with an atomic OR on the mapping."""

from __future__ import annotations

import gc
import logging
import multiprocessing
import os
from multiprocessing.synchronize import Barrier

import pytest

from pyvhost.errors import GuestMemoryError
from pyvhost.virtio import atomic
from pyvhost.virtio import memory as memory_mod
from pyvhost.virtio.memory import PAGE_SIZE, DirtyLog

ATOMIC_IMPLS = [impl for impl in atomic.IMPLS[:-1] if atomic.or_byte(impl) is not None]
ALL_IMPLS = [*ATOMIC_IMPLS, atomic.LOCKED]

_fork = multiprocessing.get_context("fork")


@pytest.fixture(params=ALL_IMPLS)
def impl(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def _bits(data: bytes) -> int:
    return sum(bin(b).count("1") for b in data)


def test_libatomic_is_preferred_where_installed() -> None:
    if atomic.or_byte(atomic.LIBATOMIC) is None:
        pytest.skip("libatomic.so.1 not installed here")
    assert atomic.default_impl() == atomic.LIBATOMIC
    log, fd = DirtyLog.anonymous(8)
    try:
        assert log.atomic_impl == atomic.LIBATOMIC
    finally:
        log.close()
        os.close(fd)


def test_unknown_or_unavailable_impl_is_refused(no_fd_leak: None) -> None:
    with pytest.raises(ValueError, match="unknown atomic OR implementation 'cas'"):
        atomic.or_byte("cas")
    fd = os.memfd_create("log", os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, 8)
        for name in set(atomic.IMPLS) - set(ALL_IMPLS):
            with pytest.raises(GuestMemoryError, match="not available here"):
                DirtyLog(fd, 8, atomic_impl=name)
    finally:
        os.close(fd)


def test_no_atomic_warns_once_what_it_gives_up(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(atomic, "or_byte", lambda impl: None)
    with caplog.at_level(logging.WARNING, logger="pyvhost.virtio.atomic"):
        assert atomic.default_impl.__wrapped__() == atomic.LOCKED
    (record,) = caplog.records
    assert "no atomic OR available" in record.getMessage()
    assert "can be lost" in record.getMessage()


@pytest.mark.parametrize(
    ("gpa", "length", "expected"),
    [
        (9 * PAGE_SIZE, 1, [0, 0b10, 0, 0, 0]),  # one page
        (3 * PAGE_SIZE, 20 * PAGE_SIZE, [0xF8, 0xFF, 0x7F, 0, 0]),  # partial, full, partial
        (8 * PAGE_SIZE, 8 * PAGE_SIZE, [0, 0xFF, 0, 0, 0]),  # one whole byte
        (8 * PAGE_SIZE, 24 * PAGE_SIZE, [0, 0xFF, 0xFF, 0xFF, 0]),  # whole bytes only
        (8 * PAGE_SIZE - 1, 2, [0x80, 0x01, 0, 0, 0]),  # straddles two bytes, no full one
        (10 * PAGE_SIZE, 14 * PAGE_SIZE, [0, 0xFC, 0xFF, 0, 0]),  # partial then full
        (8 * PAGE_SIZE, 12 * PAGE_SIZE, [0, 0xFF, 0x0F, 0, 0]),  # full then partial
    ],
)
def test_bit_layout(
    impl: str, gpa: int, length: int, expected: list[int], no_fd_leak: None
) -> None:
    log, fd = DirtyLog.anonymous(5, atomic_impl=impl)
    try:
        os.pwrite(fd, b"\0\0\0\0\x5a", 0)  # someone else's bits, left alone
        log.mark(gpa, length)
        assert list(os.pread(fd, 5, 0)) == [*expected[:4], 0x5A]
        assert log.atomic_impl == impl
    finally:
        log.close()
        os.close(fd)


class NoPythonLoads:
    """A log view that fails any byte load: the atomic paths must never read through Python."""

    def __init__(self, view: memoryview) -> None:
        self.view = view

    def __getitem__(self, index: int) -> int:
        raise AssertionError(f"byte {index} of the log loaded through Python")

    def __setitem__(self, index: slice, value: bytes) -> None:
        assert isinstance(index, slice)
        assert set(value) == {0xFF}  # only whole bytes are stored plainly
        self.view[index] = value


@pytest.mark.parametrize("name", ATOMIC_IMPLS)
def test_atomic_paths_do_no_load_then_store(name: str, no_fd_leak: None) -> None:
    log, fd = DirtyLog.anonymous(8, atomic_impl=name)
    real = log._view
    log._view = NoPythonLoads(real)  # type: ignore[assignment]
    try:
        log.mark(PAGE_SIZE, 1)
        log.mark(3 * PAGE_SIZE, 30 * PAGE_SIZE)
        assert os.pread(fd, 5, 0) == bytes([0xFA, 0xFF, 0xFF, 0xFF, 0x01])
    finally:
        log._view = real
        log.close()
        os.close(fd)


def test_close_while_a_mark_holds_the_mapping_defers_the_unmap(no_fd_leak: None) -> None:
    if not ATOMIC_IMPLS:
        pytest.skip("no atomic OR here")
    log, fd = DirtyLog.anonymous(8, atomic_impl=ATOMIC_IMPLS[0])
    os.close(fd)
    gc.collect()
    before = memory_mod.deferred_unmaps()
    in_flight = log._bytes  # what a mark() running on another thread holds
    log.close()
    assert memory_mod.deferred_unmaps() == before + 1
    assert in_flight is not None
    in_flight[0] |= 1  # still mapped: no crash
    with pytest.raises(GuestMemoryError, match="log was closed"):
        log.mark(0, 1)
    del in_flight, log
    gc.collect()
    assert memory_mod.deferred_unmaps() == before


def test_closed_locked_log_refuses_marks(no_fd_leak: None) -> None:
    log, fd = DirtyLog.anonymous(8, atomic_impl=atomic.LOCKED)
    os.close(fd)
    log.close()
    with pytest.raises(GuestMemoryError, match="log was closed"):
        log.mark(PAGE_SIZE, 1)


# -- several processes sharing one log ------------------------------------------------------------
# (No no_fd_leak here: multiprocessing keeps the /dev/shm arena behind its Barrier for reuse.)

PROCESSES = 4
"""Process p owns bits p and p + 4 of every byte: every byte is shared by all of them."""
ROUNDS = 400
BYTES_PER_ROUND = 16


def _hammer(fd: int, size: int, impl: str, p: int, barrier: Barrier) -> None:
    """Child: map the log on its own and set its bits, byte after byte, in lockstep rounds."""
    log = DirtyLog(fd, size, atomic_impl=impl)
    pages = [(byte << 3) + bit for byte in range(size) for bit in (p, p + PROCESSES)]
    per_round = 2 * BYTES_PER_ROUND
    for start in range(0, len(pages), per_round):
        barrier.wait(timeout=30)
        for page in pages[start : start + per_round]:
            log.mark(page * PAGE_SIZE, 1)
    log.close()


def run_processes(impl: str) -> bytes:
    """Let PROCESSES processes set their bits in one memfd-backed log; return the log's bytes."""
    size = ROUNDS * BYTES_PER_ROUND
    fd = os.memfd_create("pyvhost-test-shared-log", os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, size)
        barrier = _fork.Barrier(PROCESSES)
        children = [
            _fork.Process(target=_hammer, args=(fd, size, impl, p, barrier), daemon=True)
            for p in range(PROCESSES)
        ]
        for child in children:
            child.start()
        for child in children:
            child.join(60)
        assert [c.exitcode for c in children] == [0] * PROCESSES
        return os.pread(fd, size, 0)
    finally:
        os.close(fd)


@pytest.mark.parametrize("name", ATOMIC_IMPLS)
def test_processes_setting_bits_in_the_same_bytes_lose_none(name: str) -> None:
    data = run_processes(name)
    assert _bits(data) == 8 * len(data), f"{8 * len(data) - _bits(data)} bits lost"


class InterleavedView:
    """A log view whose byte loads wait until every process has loaded, before any stores.

    That is the interleaving the lock cannot prevent across processes: all load the old byte,
    then each stores it back with only its own bit added.
    """

    def __init__(self, view: memoryview, barrier: Barrier) -> None:
        self.view = view
        self.barrier = barrier

    def __getitem__(self, index: int) -> int:
        value = int(self.view[index])
        self.barrier.wait(timeout=30)
        return value

    def __setitem__(self, index: int, value: int) -> None:
        self.view[index] = value


def _interleave(fd: int, bit: int, barrier: Barrier, rounds: int) -> None:
    log = DirtyLog(fd, rounds, atomic_impl=atomic.LOCKED)
    real = log._view
    log._view = InterleavedView(real, barrier)  # type: ignore[assignment]
    for byte in range(rounds):
        log.mark(((byte << 3) + bit) * PAGE_SIZE, 1)
    log._view = real
    log.close()


def test_locked_fallback_loses_bits_across_processes() -> None:
    """Why the ``locked`` path warns: two back-ends' load/store on one byte lose a bit."""
    rounds = 8
    fd = os.memfd_create("pyvhost-test-shared-log", os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, rounds)
        barrier = _fork.Barrier(2)
        children = [
            _fork.Process(target=_interleave, args=(fd, bit, barrier, rounds), daemon=True)
            for bit in (0, 1)
        ]
        for child in children:
            child.start()
        for child in children:
            child.join(60)
        assert [c.exitcode for c in children] == [0, 0]
        data = os.pread(fd, rounds, 0)
    finally:
        os.close(fd)
    assert all(byte in (0b01, 0b10) for byte in data), data  # one of the two bits, never both
