"""The packed ring's batched pop agrees with pop() one chain at a time, whatever the ring holds."""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterator
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
    DESC_F_WRITE,
    PackedQueue,
    packed_layout,
)

SIZE = 8
MEM = 1 << 20
DATA = 0x10000
_DESC = struct.Struct("<QIHH")


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


def outcome(
    queue: PackedQueue, batch: int, pop: Callable[[PackedQueue, int], list[DescriptorChain]]
) -> list[Any]:
    """Chains popped ``batch`` at a time until none; then the error, if any, and the position."""
    out: list[Any] = []
    try:
        while True:
            chains = pop(queue, batch)
            if not chains:
                break
            for c in chains:
                out.append(
                    (
                        c.head,
                        [bytes(v) for v in c.readable],
                        [len(v) for v in c.writable],
                        c.read_len,
                        c.write_len,
                        list(c.writable_gpas),
                        c.desc_count,
                    )
                )
    except VirtqueueError as exc:
        out.append(("error", str(exc)))
    return [*out, (queue.last_avail_idx, queue.avail_wrap, queue.in_flight)]


descriptor = st.tuples(
    st.sampled_from([DATA, DATA + 8, MEM - 4, MEM, 1 << 40]),
    st.sampled_from([0, 4, 8, 64, 1 << 31]),
    st.integers(0, SIZE + 1),  # buffer id
    st.sampled_from([0, DESC_F_WRITE, DESC_F_NEXT, DESC_F_NEXT | DESC_F_WRITE, DESC_F_INDIRECT]),
)


@settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(descs=st.lists(descriptor, min_size=1, max_size=SIZE), batch=st.sampled_from([1, 3, SIZE]))
def test_pop_batch_matches_pop(
    memory: GuestMemory, descs: list[tuple[int, int, int, int]], batch: int
) -> None:
    lay = packed_layout(SIZE, 0)
    memory.write(0, bytes(lay[3]))
    for i, (addr, length, buf_id, flags) in enumerate(descs):
        memory.write(16 * i, _DESC.pack(addr, length, buf_id, flags | DESC_F_AVAIL))
    queues = [PackedQueue(memory, SIZE, *lay[:3], max_chain_len=4) for _ in range(2)]
    assert outcome(queues[0], batch, PackedQueue.pop_batch) == outcome(queues[1], batch, pop_loop)


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
