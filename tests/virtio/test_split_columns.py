"""The split ring's columns (``pop_columns`` / ``push_heads``) against its chains (``pop_batch`` /
``push_batch``): the same heads in the same order, the same bytes, the same used ring, avail
event, dirty pages and inflight calls afterwards, the same error on a hostile ring.

``pop_columns`` takes a batch only when every chain of it is one device-readable descriptor
inside the one memory region (checked in bulk); otherwise it returns None and the chain path pops
the same batch. Both are driven to exhaustion here over two copies of the same guest memory and
compared.
"""

from __future__ import annotations

import os
import random
import struct
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from typing import Any

import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

from pyvhost.errors import GuestMemoryError, VirtqueueError
from pyvhost.virtio.chain import EMPTY, DescriptorChain
from pyvhost.virtio.columns import ReadColumns, gather
from pyvhost.virtio.memory import PAGE_SIZE, DirtyLog, GuestMemory
from pyvhost.virtio.split import (
    VRING_DESC_F_INDIRECT,
    VRING_DESC_F_NEXT,
    VRING_DESC_F_WRITE,
    SplitQueue,
    split_layout,
)

SIZE = 16
MEM = 1 << 20
DATA = 0x10000
NEXT, WRITE, INDIRECT = VRING_DESC_F_NEXT, VRING_DESC_F_WRITE, VRING_DESC_F_INDIRECT
_DESC = struct.Struct("<QIHH")

BASES = {
    "at 0": 0,
    "inside a 4 GiB window": 0x1_0033_8000,  # DPDK's virtio-user region: offsets from low words
    "across 4 GiB": (1 << 32) - MEM // 2,  # high words differ: offsets from 64-bit addresses
}


class Hooks:
    """Inflight hooks that record what the queue told them (pops, published heads, used.idx)."""

    def __init__(self) -> None:
        self.popped: list[int] = []
        self.published: list[int] = []
        self.before: list[int] = []
        self.used_idx = 0

    def begin(self, used_idx: int) -> bool:
        return False

    def on_pop(self, head: int) -> None:
        self.popped.append(head)

    def before_publish(self, heads: Sequence[int]) -> None:
        self.before += heads

    def after_publish(self, heads: Sequence[int], used_idx: int) -> None:
        assert list(heads) == self.before[len(self.published) :]
        self.published += heads
        self.used_idx = used_idx

    def recover(self, used_ring_idx: int) -> list[int]:
        return []


class Ring:
    """One guest memory with a split ring at its first address, a dirty log and a queue."""

    def __init__(
        self, base: int, *, regions: int = 1, used_log_gpa: int = 0x80000, **kwargs: Any
    ) -> None:
        self.base = base
        self.mem = GuestMemory.anonymous(MEM, base)
        if regions == 2:
            self.mem.add_anonymous(MEM, base + 4 * MEM)
        self.desc, self.avail, self.used, _ = split_layout(SIZE, base)
        self.mem.write(self.desc, bytes(self.used + 6 + 8 * SIZE - self.desc))
        self.mem.write(base + DATA, bytes(range(256)) * 64)
        self.log, fd = DirtyLog.anonymous((base + 8 * MEM) // (8 * PAGE_SIZE) + 1)
        os.close(fd)
        self.mem.set_log(self.log)
        self.hooks = Hooks()
        self.queue = SplitQueue(
            self.mem,
            SIZE,
            self.desc,
            self.avail,
            self.used,
            log_used=True,
            used_log_gpa=used_log_gpa,
            inflight=self.hooks,
            **kwargs,
        )

    def close(self) -> None:
        self.queue.close()
        self.mem.close()

    def write(self, descs: Sequence[tuple[int, int, int, int]], heads: Sequence[int]) -> None:
        for i, d in enumerate(descs):
            self.mem.write(self.desc + 16 * i, _DESC.pack(*d))
        for k, head in enumerate(heads):
            self.mem.write(self.avail + 4 + 2 * (k % SIZE), struct.pack("<H", head))
        self.mem.write(self.avail + 2, struct.pack("<H", len(heads)))

    def state(self) -> tuple[Any, ...]:
        """Everything the two ways of popping must leave alike."""
        q = self.queue
        return (
            self.mem.read(self.used, 6 + 8 * SIZE),
            q.last_avail_idx,
            q.used_idx,
            q.in_flight,
            q.broken,
            self.log.dirty_pages(),
            self.hooks.popped,
            self.hooks.published,
            self.hooks.used_idx,
        )


@contextmanager
def rings(base: int, **kwargs: Any) -> Iterator[tuple[Ring, Ring]]:
    with ExitStack() as stack:
        pair = (Ring(base, **kwargs), Ring(base, **kwargs))
        for ring in pair:
            stack.callback(ring.close)
        yield pair


def shape(chain: DescriptorChain) -> tuple[Any, ...]:
    return (
        chain.head,
        [bytes(v) for v in chain.readable],
        [(len(v), bytes(v[:4])) for v in chain.writable],
        chain.read_len,
        chain.write_len,
        list(chain.writable_gpas),
        chain.desc_count,
    )


def by_chains(queue: SplitQueue, max_n: int) -> list[Any]:
    """Pop everything with ``pop_batch``, push it back with ``push_batch``; shapes, then error."""
    out: list[Any] = []
    try:
        while chains := queue.pop_batch(max_n):
            out += [shape(c) for c in chains]
            queue.push_batch([(c.head, 0) for c in chains])
    except VirtqueueError as exc:
        out.append(("error", str(exc)))
    return out


def by_columns(queue: SplitQueue, max_n: int, taken: list[int] | None = None) -> list[Any]:
    """Pop with ``pop_columns`` (``pop_batch`` where it says None), push with ``push_heads``;
    ``taken`` collects how many chains each columns call took."""
    out: list[Any] = []
    try:
        while True:
            columns = queue.pop_columns(max_n)
            if columns is None:
                chains = queue.pop_batch(max_n)
                assert chains, "None from pop_columns means a chain is waiting"
                out += [shape(c) for c in chains]
                queue.push_batch([(c.head, 0) for c in chains])
                continue
            if not columns.heads:
                break
            assert_consistent(columns)
            if taken is not None:
                taken.append(len(columns))
            out += [shape(c) for c in columns.chains()]
            queue.push_heads(columns.heads)
    except VirtqueueError as exc:
        out.append(("error", str(exc)))
    return out


def assert_consistent(columns: ReadColumns) -> None:
    """The columns describe what they say: lengths, bounds, views, chains."""
    n = len(columns)
    assert n == len(columns.offsets) == len(columns.lengths) > 0
    assert (columns.min_len, columns.max_len) == (min(columns.lengths), max(columns.lengths))
    assert columns.min_len > 0
    assert max(o + k for o, k in zip(columns.offsets, columns.lengths, strict=True)) <= len(
        columns.region
    )
    assert [[bytes(v) for v in b] for b in columns.buffers()] == [
        [bytes(c.readable[0])] for c in columns.chains()
    ]
    for c in columns.chains():
        assert c.writable is EMPTY and c.writable_gpas is EMPTY and c.desc_count == 1


# -- hostile and ordinary tables, every base ------------------------------------------------------


def _addresses(base: int) -> st.SearchStrategy[int]:
    inside = [DATA, DATA + 1, DATA + 100, DATA + 0x3000, MEM - 64, MEM - 8]
    outside = [MEM - 1, MEM, MEM + 0x1000, -16, -(1 << 32)]
    return st.one_of(
        st.sampled_from([base + a for a in inside]),
        st.sampled_from([(base + a) & (1 << 64) - 1 for a in outside] + [1 << 63, 0]),
    )


lengths = st.one_of(st.sampled_from([8, 16, 60, 64, 1500]), st.sampled_from([0, 1, 9, 1 << 31]))
flag_sets = st.one_of(
    st.just(0),
    st.sampled_from([NEXT, WRITE, INDIRECT, NEXT | WRITE, INDIRECT | NEXT, 8, 0x8000 | WRITE]),
)


@st.composite
def tables(draw: st.DrawFn, base: int) -> list[tuple[int, int, int, int]]:
    """Mostly one-descriptor readable chains (runs the columns take), with hostile ones among
    them: NEXT chains (some looping, some out of the table), writable, indirect, unknown flags,
    addresses outside the region, empty and huge lengths."""
    simple = draw(st.booleans())
    out = []
    for i in range(SIZE):
        if simple and draw(st.integers(0, 9)):
            out.append((base + DATA + 0x400 * i, draw(st.sampled_from([14, 60, 64])), 0, 0))
            continue
        nxt = draw(st.one_of(st.just(i + 1), st.integers(0, SIZE + 1)))
        out.append((draw(_addresses(base)), draw(lengths), draw(flag_sets), nxt))
    return out


@settings(max_examples=200, deadline=None)
@given(
    data=st.data(),
    where=st.sampled_from(sorted(BASES)),
    max_n=st.sampled_from([1, 3, SIZE]),
    event_idx=st.booleans(),
    regions=st.sampled_from([1, 1, 1, 2]),
)
def test_columns_equal_chains(
    data: st.DataObject, where: str, max_n: int, event_idx: bool, regions: int
) -> None:
    """Random, often hostile tables: same chains and bytes, same error, same ring state."""
    base = BASES[where]
    descs = data.draw(tables(base), "descs")
    heads = data.draw(
        st.one_of(
            st.lists(st.integers(0, SIZE - 1), min_size=1, max_size=SIZE),
            st.permutations(range(SIZE)),
            st.lists(st.integers(0, SIZE + 2), min_size=1, max_size=SIZE),
        ),
        "heads",
    )
    with rings(base, regions=regions, event_idx=event_idx) as (cols, chains):
        for ring in (cols, chains):
            ring.write(descs, heads)
            ring.log.clear()
        taken: list[int] = []
        assert by_columns(cols.queue, max_n, taken) == by_chains(chains.queue, max_n)
        assert cols.state() == chains.state()
        share = "none" if not taken else "all" if sum(taken) == len(heads) else "some"
        event(f"chains taken as columns: {share}")


@pytest.mark.parametrize("where", sorted(BASES))
@pytest.mark.parametrize("order", ["in order", "wrapping", "shuffled"])
def test_plain_runs_are_taken_whole(where: str, order: str) -> None:
    """A ring of ordinary one-descriptor packets: one columns call takes all of them."""
    base = BASES[where]
    heads = list(range(SIZE))
    if order == "wrapping":
        heads = heads[5:] + heads[:5]
    elif order == "shuffled":
        random.Random(7).shuffle(heads)
    descs = [(base + DATA + 0x400 * i + i, 60 + i, 0, 0) for i in range(SIZE)]
    with rings(base) as (cols, chains):
        for ring in (cols, chains):
            ring.write(descs, heads)
        taken: list[int] = []
        assert by_columns(cols.queue, SIZE, taken) == by_chains(chains.queue, SIZE)
        assert taken == [SIZE]
        assert cols.state() == chains.state()


@pytest.mark.parametrize("where", sorted(BASES))
@pytest.mark.parametrize(
    ("bad", "taken"),
    [
        ((DATA, 16, NEXT, 9), [4, 4, 4]),  # a two-descriptor chain
        ((DATA, 16, WRITE, 0), [4, 4, 4]),
        ((DATA, 16, INDIRECT, 0), [4]),  # its table is no table: the queue breaks
        ((DATA, 0, 0, 0), [4, 4, 4]),  # empty: a chain with no views
        ((MEM - 8, 16, 0, 0), [4]),  # beyond the region's end: the queue breaks
        ((MEM - 59, 60, 0, 0), [4]),  # one byte beyond it
        ((-1, 60, 0, 0), [4]),  # one byte before the region
        ((DATA, 16, 8, 0), [4, 4, 4, 4]),  # an unknown flag: a readable chain all the same
        ((MEM - 60, 60, 0, 0), [4, 4, 4, 4]),  # ends where the region ends: taken
    ],
)
def test_a_batch_with_one_chain_columns_cannot_take_goes_to_the_chain_path(
    where: str, bad: tuple[int, int, int, int], taken: list[int]
) -> None:
    """Sixteen chains in batches of four, the sixth odd: the second batch is popped as chains
    (and the queue breaks there if the chain path says so), the others as columns."""
    base = BASES[where]
    descs = [(base + DATA + 0x400 * i, 60, 0, 0) for i in range(SIZE)]
    descs[5] = ((base + bad[0]) % (1 << 64), *bad[1:])
    with rings(base) as (cols, chains):
        for ring in (cols, chains):
            ring.write(descs, range(SIZE))
        runs: list[int] = []
        assert by_columns(cols.queue, 4, runs) == by_chains(chains.queue, 4)
        assert runs == taken
        assert cols.state() == chains.state()


def test_several_regions_leave_everything_to_the_chain_path() -> None:
    with rings(0, regions=2) as (cols, chains):
        for ring in (cols, chains):
            ring.write([(DATA + 0x400 * i, 60, 0, 0) for i in range(SIZE)], range(SIZE))
        assert cols.queue.pop_columns(SIZE) is None
        assert by_columns(cols.queue, SIZE) == by_chains(chains.queue, SIZE)
        assert cols.state() == chains.state()


def test_nothing_available_gives_empty_columns() -> None:
    with rings(0) as (ring, _):
        columns = ring.queue.pop_columns(SIZE)
        assert columns is not None and len(columns) == 0
        assert ring.queue.last_avail_idx == 0


def test_a_broken_queue_raises_as_pop_batch_does() -> None:
    with rings(0) as (ring, _):
        ring.write([], [])
        ring.mem.write(ring.avail + 2, struct.pack("<H", SIZE + 1))  # avail.idx too far ahead
        with pytest.raises(VirtqueueError, match="entries ahead") as first:
            ring.queue.pop_columns(SIZE)
        with pytest.raises(VirtqueueError, match="queue is broken") as second:
            ring.queue.pop_columns(SIZE)
        with pytest.raises(VirtqueueError) as third:
            ring.queue.pop_batch(SIZE)
        assert str(third.value) == str(second.value) != str(first.value)


def test_region_removed_during_pop_is_not_the_guests_fault(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A pop racing with a memory-table change: the same error as ``pop_batch`` gives."""
    with rings(0) as (ring, _):
        ring.write([(DATA, 60, 0, 0)], [0])
        ring.mem.add_anonymous(MEM, 4 * MEM)
        starts, sizes, views = ring.mem.fast_table()
        stale = ([starts[1]], [sizes[1]], [views[1]])
        ring.mem.remove_region(4 * MEM, MEM, ring.mem.regions[1].userspace_addr)
        monkeypatch.setattr(ring.mem, "fast_table", lambda: stale)
        with pytest.raises(GuestMemoryError, match="removed while popping"):
            ring.queue.pop_columns(SIZE)
        assert ring.queue.broken is None and ring.queue.last_avail_idx == 0


def test_columns_keep_their_memory_mapped() -> None:
    """Like a chain's views, the columns' region view outlives the memory table it came from."""
    with rings(0) as (ring, _):
        ring.write([(DATA, 60, 0, 0)], [0])
        columns = ring.queue.pop_columns(SIZE)
        assert columns is not None
        expected = bytes(columns.buffers()[0][0])
        ring.mem.regions[0].view.release()  # what removing the region does to the table's view
        assert bytes(columns.region[DATA : DATA + 60]) == expected


# -- push_heads ----------------------------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(
    heads=st.one_of(
        st.lists(st.integers(0, SIZE - 1), max_size=SIZE),
        st.integers(0, SIZE - 1).flatmap(
            lambda first: st.integers(0, SIZE).map(lambda n: [(first + k) % SIZE for k in range(n)])
        ),
        st.lists(st.integers(-2, SIZE + 2), max_size=SIZE + 2),
        st.lists(st.sampled_from([0, 1 << 32, 1 << 40]), max_size=3),
    ),
    used_idx=st.sampled_from([0, 5, SIZE - 1, 0xFFFF]),
)
def test_push_heads_equals_push_batch(heads: list[int], used_idx: int) -> None:
    """Any heads (consecutive, wrapping, out of range, too many): same ring or same error."""
    with rings(0, used_idx=used_idx) as (cols, chains):
        outcomes: list[tuple[type[Exception], str] | None] = []
        for ring, push in ((cols, "heads"), (chains, "batch")):
            ring.log.clear()
            try:
                if push == "heads":
                    ring.queue.push_heads(heads)
                else:
                    ring.queue.push_batch([(h, 0) for h in heads])
                outcomes.append(None)
            except (VirtqueueError, OverflowError) as exc:
                outcomes.append((type(exc), str(exc)))
        assert outcomes[0] == outcomes[1]
        assert cols.state() == chains.state()


@pytest.mark.parametrize("heads", [[3, 4, 5, 6], [4, 2, 9, 1]])
@pytest.mark.parametrize(
    ("log_gpa", "pages"),
    [
        (0x80000 - 4, [0x7F, 0x80]),  # used.idx ends a page, the elements fill the next
        (0x80000 - 4 - 8 * SIZE, [0x7F]),  # the ring's end is a page's end
    ],
)
def test_push_heads_logs_the_used_elements_it_wrote(
    heads: list[int], log_gpa: int, pages: list[int]
) -> None:
    """Dirty logging where the elements wrap, with the used ring's log address placed so that
    leaving the elements out, or marking past the ring's end, marks other pages."""
    with rings(0, used_idx=SIZE - 2, used_log_gpa=log_gpa) as (ring, _):
        ring.log.clear()
        ring.queue.push_heads(heads)
        assert ring.log.dirty_pages() == pages
        tail = struct.unpack("<4I", ring.mem.read(ring.used + 4 + 8 * (SIZE - 2), 16))
        wrapped = struct.unpack("<4I", ring.mem.read(ring.used + 4, 16))
        assert tail == (heads[0], 0, heads[1], 0) and wrapped == (heads[2], 0, heads[3], 0)


def test_gather_returns_tuples_for_one_index_too() -> None:
    assert gather([2])([5, 6, 7]) == (7,)
    assert gather([2, 0])([5, 6, 7]) == (7, 5)
    assert gather([1])(memoryview(b"ab")) == (ord("b"),)
