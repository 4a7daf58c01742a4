"""Fuzzing the device side of split and packed rings over guest memory full of random bytes.

Contract under test: pop / pop_batch / push / the notification calls raise nothing but
VirtqueueError or GuestMemoryError, always return within a bounded time, and every memoryview a
chain hands out lies inside the mapped region it came from (checked by address).
"""

from __future__ import annotations

import ctypes
import signal
import struct
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import FrameType

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from pyvhost.errors import GuestMemoryError, VirtqueueError
from pyvhost.virtio.chain import DescriptorChain
from pyvhost.virtio.memory import GuestMemory
from pyvhost.virtio.packed import PackedQueue, packed_layout
from pyvhost.virtio.split import SplitQueue, split_layout

REGION_SIZE = 0x2000
OP_LIMIT = 2.0
"""Seconds any one ring operation may take (a loop in chain walking would blow it)."""

FUZZ = settings(
    max_examples=400,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

RING_ERRORS = (VirtqueueError, GuestMemoryError)


@contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    """Raise TimeoutError in the main thread if the body runs longer than ``seconds``."""

    def expire(signum: int, frame: FrameType | None) -> None:
        raise TimeoutError(f"ring operation still running after {seconds} s")

    old = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def _address(view: memoryview) -> int:
    holder = ctypes.c_char.from_buffer(view)
    try:
        return ctypes.addressof(holder)
    finally:
        del holder


def check_chain(mem: GuestMemory, chain: DescriptorChain) -> None:
    """Every view of ``chain`` lies inside one mapped region, and the lengths add up."""
    bounds = [(r.view.obj, _address(r.view), r.size) for r in mem.regions]
    for view in (*chain.readable, *chain.writable):
        assert len(view) > 0, "zero-length pieces add no view"
        start = _address(view)
        inside = [
            obj
            for obj, base, size in bounds
            if view.obj is obj and base <= start and start + len(view) <= base + size
        ]
        assert inside, f"view {start:#x}+{len(view):#x} lies outside every mapped region"
    assert chain.read_len == sum(len(v) for v in chain.readable)
    assert chain.write_len == sum(len(v) for v in chain.writable)
    for gpa, length in chain.writable_gpas:
        assert mem.translate(gpa, length)


def make_memory(fill: bytes, two_regions: bool, tame: bool, split: bool, size: int) -> GuestMemory:
    """One (or two adjacent) regions of random bytes: rings, tables and buffers all hostile.

    ``tame``: read every 16 bytes as a descriptor (``split`` or packed layout) and pull its
    address near the mapped memory, its length below 1 KiB, its next index into the ring, and
    clear most INDIRECT flags, so that chains get built (and walked deep) instead of failing at
    the first wild field.
    """
    mem = GuestMemory.anonymous(REGION_SIZE)
    if two_regions:
        mem.add_anonymous(REGION_SIZE, REGION_SIZE)
    total = REGION_SIZE * len(mem)
    data = bytearray((fill * (total // len(fill) + 1))[:total])
    if tame:
        for off in range(0, total, 16):
            addr, length, a, b = struct.unpack_from("<QIHH", data, off)
            addr, length = addr % (total + 64), length % 0x400
            if split:  # a: flags, b: next
                a = a & 0x7 if a & 0x700 == 0x700 else a & 0x3
                b %= size + 1
            else:  # a: id, b: flags
                b = b if b & 0x700 == 0x700 else b & ~0x4
            struct.pack_into("<QIHH", data, off, addr, length, a, b)
    mem.write(0, data)
    return mem


def tame_split(mem: GuestMemory, size: int, avail_gpa: int, last_avail: int, ahead: int) -> None:
    """avail.idx ``ahead`` entries past ``last_avail`` (may exceed size), heads mostly in range."""
    ring = bytearray(mem.read(avail_gpa, 4 + 2 * size))
    struct.pack_into("<H", ring, 2, (last_avail + ahead) & 0xFFFF)
    for i in range(size):
        (head,) = struct.unpack_from("<H", ring, 4 + 2 * i)
        struct.pack_into("<H", ring, 4 + 2 * i, head % (size + 1))
    mem.write(avail_gpa, ring)


def tame_packed(mem: GuestMemory, size: int, desc_gpa: int, avail_wrap: bool) -> None:
    """Mark most ring descriptors available for ``avail_wrap``, buffer ids mostly in range."""
    ring = bytearray(mem.read(desc_gpa, 16 * size))
    mark = 0x80 if avail_wrap else 0x8000
    for i in range(size):
        buf_id, flags = struct.unpack_from("<HH", ring, 16 * i + 12)
        if flags & 0x10:  # leave some descriptors as the random bytes made them
            flags = (flags & ~0x8080) | mark
        struct.pack_into("<HH", ring, 16 * i + 12, buf_id % (size + 1), flags)
    mem.write(desc_gpa, ring)


Op = tuple[str, int, int]
OPS = st.lists(
    st.tuples(
        st.sampled_from(
            [
                "pop",
                "pop",
                "batch",
                "push",
                "push_popped",
                "push_batch",
                "enable",
                "disable",
                "needs",
            ]
        ),
        st.integers(0, 70000),
        st.sampled_from([0, 1, 16, 0xFFFF_FFFF, 1 << 32, -1]) | st.integers(0, 4096),
    ),
    max_size=20,
)
SIZES = st.sampled_from([1, 2, 4, 8, 16, 64])
FILL = st.binary(min_size=1, max_size=256)


def drive(mem: GuestMemory, queue: SplitQueue | PackedQueue, ops: list[Op]) -> None:
    """Run ``ops`` against ``queue``; only ring errors may come out, each op in bounded time."""
    popped: list[DescriptorChain] = []
    actions: dict[str, Callable[[int, int], object]] = {
        "pop": lambda a, b: queue.pop(),
        "batch": lambda a, b: queue.pop_batch(1 + a % 8),
        "push": lambda a, b: queue.push(a % 70000, b),
        "push_popped": lambda a, b: (
            queue.push(popped.pop(a % len(popped)).head, b) if popped else None
        ),
        "push_batch": lambda a, b: queue.push_batch([(c.head, b) for c in popped[: a % 4]]),
        "enable": lambda a, b: queue.enable_notifications(),
        "disable": lambda a, b: queue.disable_notifications(),
        "needs": lambda a, b: queue.needs_notification(),
    }
    for name, a, b in ops:
        started = time.monotonic()
        try:
            with time_limit(OP_LIMIT):
                result = actions[name](a, b)
        except RING_ERRORS as exc:
            assert str(exc)
            continue
        assert time.monotonic() - started < OP_LIMIT
        chains = result if isinstance(result, list) else [result]
        for chain in chains:
            if isinstance(chain, DescriptorChain):
                event("chain popped")
                check_chain(mem, chain)
                popped.append(chain)
        if name == "push_batch":
            del popped[: a % 4]


@FUZZ
@given(
    fill=FILL,
    two_regions=st.booleans(),
    size=SIZES,
    ring_at=st.integers(0, 0x3F).map(lambda v: v * 0x80),
    event_idx=st.booleans(),
    indirect=st.booleans(),
    last_avail=st.integers(0, 0xFFFF),
    tame=st.integers(0, 0x40),
    ops=OPS,
)
def test_split_queue_over_random_memory(
    *,
    fill: bytes,
    two_regions: bool,
    size: int,
    ring_at: int,
    event_idx: bool,
    indirect: bool,
    last_avail: int,
    tame: int,
    ops: list[Op],
) -> None:
    """``tame`` > 0: tamed descriptors and avail.idx ``tame`` % (size + 2) entries ahead."""
    mem = make_memory(fill, two_regions, bool(tame), True, size)
    try:
        desc, avail, used, _ = split_layout(size, ring_at)
        if tame and avail + 4 + 2 * size <= REGION_SIZE * len(mem):
            tame_split(mem, size, avail, last_avail, tame % (size + 2))
        try:
            queue = SplitQueue(
                mem,
                size,
                desc,
                avail,
                used,
                event_idx=event_idx,
                indirect=indirect,
                last_avail_idx=last_avail,
            )
        except GuestMemoryError:
            return  # the ring itself does not fit in one region: refused up front
        drive(mem, queue, ops)
        queue.close()
    finally:
        mem.close()


@FUZZ
@given(
    fill=FILL,
    two_regions=st.booleans(),
    size=SIZES | st.sampled_from([3, 5, 7]),
    ring_at=st.integers(0, 0x3F).map(lambda v: v * 0x80),
    event_idx=st.booleans(),
    indirect=st.booleans(),
    positions=st.tuples(
        st.integers(0, 0x7FFF), st.booleans(), st.integers(0, 0x7FFF), st.booleans()
    ),
    tame=st.booleans(),
    ops=OPS,
)
def test_packed_queue_over_random_memory(
    *,
    fill: bytes,
    two_regions: bool,
    size: int,
    ring_at: int,
    event_idx: bool,
    indirect: bool,
    positions: tuple[int, bool, int, bool],
    tame: bool,
    ops: list[Op],
) -> None:
    mem = make_memory(fill, two_regions, tame, False, size)
    try:
        layout = packed_layout(size, ring_at)
        avail, avail_wrap, used, used_wrap = positions
        if tame and layout.desc_gpa + 16 * size <= REGION_SIZE * len(mem):
            tame_packed(mem, size, layout.desc_gpa, avail_wrap)
        try:
            queue = PackedQueue(
                mem,
                size,
                layout.desc_gpa,
                layout.driver_event_gpa,
                layout.device_event_gpa,
                event_idx=event_idx,
                indirect=indirect,
                last_avail_idx=avail % size,
                avail_wrap=avail_wrap,
                used_idx=used % size,
                used_wrap=used_wrap,
            )
        except GuestMemoryError:
            return
        drive(mem, queue, ops)
        queue.close()
    finally:
        mem.close()


@pytest.mark.parametrize("kind", ["split", "packed"])
def test_views_are_checked_by_address(kind: str) -> None:
    """The address check itself: a view of another mapping is reported as outside."""
    mem = GuestMemory.anonymous(REGION_SIZE)
    other = GuestMemory.anonymous(REGION_SIZE)
    try:
        chain = DescriptorChain(0, [other.view(0, 16)], [], 16, 0)
        with pytest.raises(AssertionError, match="outside every mapped region"):
            check_chain(mem, chain)
        check_chain(mem, DescriptorChain(0, [mem.view(REGION_SIZE - 16, 16)], [], 16, 0))
    finally:
        mem.close()
        other.close()
