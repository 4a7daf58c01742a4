"""The packed ring's batch fast paths agree with the exact ones, whatever the ring holds.

``pop_batch`` (descriptors read as columns, chains built inline) is held to ``pop()`` one chain
at a time, and ``push_batch`` (checked and stored as columns) to ``_push_exact``: the same chains,
the same errors with the same messages, the same ring bytes and queue state after, on random mixes
of chain lengths, indirect tables, start positions (so chains and batches wrap around the ring),
batch sizes and hostile descriptors.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterator
from itertools import pairwise
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pyvhost.errors import VirtqueueError
from pyvhost.virtio.chain import EMPTY, DescriptorChain
from pyvhost.virtio.memory import GuestMemory
from pyvhost.virtio.packed import (
    DESC_F_AVAIL,
    DESC_F_INDIRECT,
    DESC_F_NEXT,
    DESC_F_USED,
    DESC_F_WRITE,
    PackedQueue,
    packed_layout,
)

SIZE = 8
MEM = 1 << 20
DATA = 0x10000
TABLES = 0x20000  # indirect table k at TABLES + 0x400 * k
_DESC = struct.Struct("<QIHH")
_SETTINGS = settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@pytest.fixture
def memory() -> Iterator[GuestMemory]:
    with GuestMemory.anonymous(MEM) as mem:
        mem.write(DATA, bytes(range(256)) * 16)
        yield mem


def pop_loop(queue: PackedQueue, max_n: int) -> list[DescriptorChain]:
    """The reference batch: pop() until ``max_n`` chains or none; an error ends the batch and
    is raised only when no chain was taken (the queue stays broken, so the next pop raises)."""
    out: list[DescriptorChain] = []
    try:
        while len(out) < max_n:
            chain = queue.pop()
            if chain is None:
                break
            out.append(chain)
    except VirtqueueError:
        if not out:
            raise
    return out


def describe(c: DescriptorChain) -> tuple[Any, ...]:
    return (
        c.head,
        [bytes(v) for v in c.readable],
        [len(v) for v in c.writable],
        c.read_len,
        c.write_len,
        list(c.writable_gpas),
        c.desc_count,
    )


def outcome(
    queue: PackedQueue,
    mem: GuestMemory,
    batches: list[int],
    pop: Callable[[PackedQueue, int], list[DescriptorChain]],
) -> list[Any]:
    """Chains popped in ``batches`` (the last size repeats) until none; then the error, if any,
    the position and the device event area."""
    out: list[Any] = []
    k = 0
    try:
        while True:
            chains = pop(queue, batches[min(k, len(batches) - 1)])
            k += 1
            if not chains:
                break
            out.append([describe(c) for c in chains])
    except VirtqueueError as exc:
        out.append(("error", str(exc)))
    event = mem.read(queue.areas.device, 4)
    return [*out, (queue.last_avail_idx, queue.avail_wrap, queue.in_flight, event)]


# -- ring contents -------------------------------------------------------------------------------

# mostly valid, so that long chains the fast path takes are common; sometimes not
address = st.sampled_from([DATA, DATA, DATA + 8, DATA + 100, DATA + 100, MEM - 4, MEM, 1 << 40])
length = st.sampled_from([4, 8, 8, 64, 64, 0, 1 << 31])
element = st.tuples(address, length, st.booleans())  # (addr, len, device-writable)
elements = st.integers(1, 5).flatmap(lambda n: st.lists(element, min_size=n, max_size=n))
ordered = elements.map(lambda body: sorted(body, key=lambda e: e[2]))  # readable first

direct = st.tuples(st.just("direct"), st.one_of(ordered, ordered, elements), st.integers(0, SIZE))
indirect = st.tuples(
    st.just("indirect"),
    st.lists(
        st.tuples(
            address, length, st.sampled_from([0, DESC_F_WRITE, DESC_F_NEXT, DESC_F_INDIRECT])
        ),
        min_size=0,
        max_size=5,
    ),
    st.integers(0, SIZE + 1),
)
raw = st.tuples(
    st.just("raw"),
    st.tuples(
        address,
        length,
        st.sampled_from(
            [DESC_F_WRITE, DESC_F_NEXT, DESC_F_INDIRECT, DESC_F_NEXT | DESC_F_INDIRECT]
        ),
    ),
    st.integers(0, SIZE + 1),
)
chain_spec = st.one_of(direct, direct, direct, direct, indirect, raw)
# hostile touches: (ring slot, what) applied after the chains are written
touch = st.tuples(
    st.integers(0, SIZE - 1),
    st.sampled_from(["unavail", "indirect_len", "next", "id"]),
)


def ring_descriptors(mem: GuestMemory, chains: list[tuple[Any, ...]]) -> list[list[int]]:
    """The ring descriptors ``[addr, len, id, flags]`` of ``chains`` (indirect tables written to
    memory), as many whole chains as fit in the ring."""
    slots: list[list[int]] = []
    for k, (kind, body, buf_id) in enumerate(chains):
        if kind == "direct":
            ring = [[a, n, buf_id, (DESC_F_WRITE if w else 0) | DESC_F_NEXT] for a, n, w in body]
            ring[-1][3] &= ~DESC_F_NEXT
        elif kind == "indirect":
            table = b"".join(_DESC.pack(a, n, 0, f) for a, n, f in body)
            mem.write(TABLES + 0x400 * k, table)
            ring = [[TABLES + 0x400 * k, len(table), buf_id, DESC_F_INDIRECT]]
        else:
            ring = [[*body[:2], buf_id, body[2]]]
        if len(slots) + len(ring) > SIZE:
            break
        slots.extend(ring)
    return slots


_OTHER_LAP = 1 << 14  # marks a descriptor to be written with the other lap's AVAIL/USED bits


def hostile(slots: list[list[int]], touches: list[tuple[int, str]]) -> None:
    """Spoil some descriptors: not available, a bad indirect table, a NEXT flag flipped, an id
    beyond the ring."""
    for slot, what in touches:
        if slot < len(slots):
            desc = slots[slot]
            if what == "unavail":
                desc[3] |= _OTHER_LAP
            elif what == "indirect_len":
                desc[3] |= DESC_F_INDIRECT
                desc[1] |= 8
            elif what == "next":
                desc[3] ^= DESC_F_NEXT
            else:
                desc[2] = SIZE + 3


def write_ring(
    mem: GuestMemory,
    start: int,
    wrap: bool,
    chains: list[tuple[Any, ...]],
    touches: list[tuple[int, str]],
) -> None:
    """Lay ``chains`` out in the ring from ``start`` as a driver on lap ``wrap`` would (wrapping
    at the end), up to a ring's worth of descriptors; then apply the hostile ``touches``."""
    lay = packed_layout(SIZE, 0)
    mem.write(0, bytes(lay.size_bytes))
    slots = ring_descriptors(mem, chains)
    hostile(slots, touches)
    pos, lap = start, wrap
    for a, n, i, f in slots:
        bits = DESC_F_AVAIL if lap else DESC_F_USED
        if f & _OTHER_LAP:
            bits ^= DESC_F_AVAIL | DESC_F_USED
        mem.write(16 * pos, _DESC.pack(a, n, i, (f & ~_OTHER_LAP) | bits))
        pos += 1
        if pos == SIZE:
            pos, lap = 0, not lap


def make_queue(mem: GuestMemory, start: int, wrap: bool, **kwargs: Any) -> PackedQueue:
    lay = packed_layout(SIZE, 0)
    return PackedQueue(
        mem,
        SIZE,
        *lay[:3],
        last_avail_idx=start,
        avail_wrap=wrap,
        used_idx=start,
        used_wrap=wrap,
        **kwargs,
    )


@_SETTINGS
@given(
    chains=st.lists(chain_spec, min_size=1, max_size=SIZE),
    touches=st.lists(touch, max_size=2),
    start=st.integers(0, SIZE - 1),
    wrap=st.booleans(),
    batches=st.lists(st.sampled_from([1, 2, 3, 5, SIZE, 64]), min_size=1, max_size=3),
    max_chain_len=st.sampled_from([None, 2, 4]),
    event_idx=st.booleans(),
    use_indirect=st.sampled_from([True, True, False]),
)
def test_pop_batch_matches_pop(  # noqa: PLR0917 (hypothesis draws each argument)
    memory: GuestMemory,
    chains: list[tuple[Any, ...]],
    touches: list[tuple[int, str]],
    start: int,
    wrap: bool,
    batches: list[int],
    max_chain_len: int | None,
    event_idx: bool,
    use_indirect: bool,
) -> None:
    write_ring(memory, start, wrap, chains, touches)
    results = []
    for pop in (PackedQueue.pop_batch, pop_loop):
        memory.write(packed_layout(SIZE, 0).device_event_gpa, bytes(4))
        queue = make_queue(
            memory,
            start,
            wrap,
            max_chain_len=max_chain_len,
            event_idx=event_idx,
            indirect=use_indirect,
        )
        results.append(outcome(queue, memory, batches, pop))
    assert results[0] == results[1]


_GOOD: tuple[Any, ...] = ("direct", [(DATA, 8, False)], 0)
_CASES: dict[str, list[tuple[Any, ...]]] = {
    "long chain": [("direct", [(DATA, 8, False)] * 3, 1)],
    "readable after writable": [("direct", [(DATA, 8, True), (DATA, 8, False)], 1)],
    "empty readable after writable": [("direct", [(DATA, 8, True), (DATA, 0, False)], 1)],
    "outside memory": [("direct", [(DATA, 8, False), (MEM - 4, 8, True)], 1)],
    "id out of range": [("direct", [(DATA, 8, False)], SIZE)],
    "id twice": [("direct", [(DATA, 8, False)], 0)],
    "zero length": [("direct", [(DATA, 0, False)], 1)],
    "indirect ok": [("indirect", [(DATA, 8, 0), (DATA, 8, DESC_F_WRITE | DESC_F_NEXT)], 1)],
    "indirect nested": [("indirect", [(DATA, 8, 0), (DATA, 16, DESC_F_INDIRECT)], 1)],
    "indirect order": [("indirect", [(DATA, 8, DESC_F_WRITE), (DATA, 8, 0)], 1)],
    "indirect empty": [("indirect", [], 1)],
    "indirect outside": [("indirect", [(MEM - 4, 8, 0)], 1)],
    "indirect with next": [("raw", (TABLES, 16, DESC_F_INDIRECT | DESC_F_NEXT), 1)],
    "indirect too long": [("raw", (TABLES, 16 * 2048, DESC_F_INDIRECT), 1)],
}


@pytest.mark.parametrize("case", sorted(_CASES))
@pytest.mark.parametrize("indirect", [True, False])
def test_hostile_chain_after_a_good_one(memory: GuestMemory, case: str, indirect: bool) -> None:
    """Each kind of bad (or unusual) chain, after a good one, ring wrapping under the second."""
    write_ring(memory, SIZE - 1, False, [_GOOD, *_CASES[case]], [])
    for batch in (1, SIZE):
        fast, exact = (
            outcome(
                make_queue(memory, SIZE - 1, False, max_chain_len=2, indirect=indirect),
                memory,
                [batch],
                pop,
            )
            for pop in (PackedQueue.pop_batch, pop_loop)
        )
        assert fast == exact


def _good_ring(mem: GuestMemory, start: int, wrap: bool, lengths: list[int]) -> None:
    """Valid chains of the given ring lengths (0: an indirect table), ids 0, 1, ..."""
    chains: list[tuple[Any, ...]] = []
    for k, n in enumerate(lengths):
        if n:
            body = [(DATA + 64 * j, 8, j == n - 1) for j in range(n)]
            chains.append(("direct", body, k))
        else:
            chains.append(("indirect", [(DATA, 8, 0), (DATA + 8, 8, DESC_F_WRITE)], k))
    write_ring(mem, start, wrap, chains, [])


@_SETTINGS
@given(
    lengths=st.lists(st.sampled_from([0, 1, 1, 2, 3]), min_size=1, max_size=SIZE),
    start=st.integers(0, SIZE - 1),
    wrap=st.booleans(),
    order=st.permutations(range(SIZE)),
    cuts=st.lists(st.integers(0, SIZE), max_size=3),
    written=st.lists(st.sampled_from([0, 0, 5, 8]), min_size=SIZE, max_size=SIZE),
    spoil=st.lists(
        st.tuples(st.integers(0, 3), st.sampled_from(["bogus", "twice", "negative", "huge"])),
        max_size=1,
    ),
)
def test_push_batch_matches_exact(  # noqa: PLR0917 (hypothesis draws each argument)
    lengths: list[int],
    start: int,
    wrap: bool,
    order: list[int],
    cuts: list[int],
    written: list[int],
    spoil: list[tuple[int, str]],
) -> None:
    results = []
    for fast in (True, False):
        with GuestMemory.anonymous(MEM) as mem:
            _good_ring(mem, start, wrap, lengths)
            queue = make_queue(mem, start, wrap)
            heads = [c.head for c in pop_loop(queue, SIZE)]
            items = [(heads[i], written[i]) for i in order if i < len(heads)]
            bounds = [0, *sorted(cuts), len(items)]
            batches = [items[lo:hi] for lo, hi in pairwise(bounds)]
            for k, what in spoil:
                if k < len(batches):
                    head = batches[k][0][0] if batches[k] else 0
                    bad = {"bogus": (SIZE + 5, 0), "twice": (head, 0)}.get(what)
                    bad = bad or (head, -1 if what == "negative" else 1 << 32)
                    batches[k] = [*batches[k], bad]
            trace: list[Any] = [heads]
            for batch in batches:
                try:
                    if fast:
                        queue.push_batch(batch)
                    elif batch:
                        queue._push_exact(batch)
                    trace.append("ok")
                except VirtqueueError as exc:
                    trace.append(("error", str(exc)))
                trace.append(
                    (queue.used_idx, queue.used_wrap, queue.in_flight, queue.needs_notification())
                )
            trace.append(mem.read(0, 16 * SIZE))
            queue.close()
            results.append(trace)
    assert results[0] == results[1]


def test_batched_chains_use_the_shared_empty_list(memory: GuestMemory) -> None:
    lay = packed_layout(SIZE, 0)
    memory.write(0, _DESC.pack(DATA, 8, 0, DESC_F_AVAIL))
    memory.write(16, _DESC.pack(DATA + 8, 8, 1, DESC_F_AVAIL | DESC_F_WRITE))
    queue = PackedQueue(memory, SIZE, *lay[:3])
    readable, writable = queue.pop_batch(SIZE)
    assert readable.writable is EMPTY and readable.read_all() == memory.read(DATA, 8)
    assert writable.readable is EMPTY and writable.writable_gpas == [(DATA + 8, 8)]
    queue.push_batch([(1, 8), (0, 0)])
    assert queue.in_flight == 0


def test_queue_attributes_stay_inline(memory: GuestMemory) -> None:
    """CPython 3.11 keeps an instance's attributes inline (fast attribute access) only up to 30
    of them; past that every attribute load of the queue got ~9 % slower (measured)."""
    queue = PackedQueue(memory, SIZE, *packed_layout(SIZE, 0)[:3])
    assert len(vars(queue)) <= 30
