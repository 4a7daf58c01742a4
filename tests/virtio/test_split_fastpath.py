"""The split ring's fast paths (batch columns, per-head unpack, pop) agree with the full walk.

``pop_batch`` builds chains of direct descriptors in one memory region without the general
``_parse`` walk; whatever a hostile driver puts in the table, every path must return the same
chain or raise the same error as the general walk does.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pyvhost.errors import VirtqueueError
from pyvhost.virtio.chain import EMPTY, DescriptorChain
from pyvhost.virtio.memory import GuestMemory
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
_DESC = struct.Struct("<QIHH")


class ReferenceQueue(SplitQueue):
    """A split queue with the fast paths switched off: every chain goes through ``_parse``."""

    def _pop_single_region(self, heads: Any, table: Any, out: Any) -> None:
        out.extend(self._parse(head, table) for head in heads)

    def _direct_one_region(self, *args: Any) -> None:
        return None


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


def outcome(queue: SplitQueue, how: str) -> list[Any]:
    """Pop everything available with ``how``; the chains' shapes, then the error if one came."""
    out: list[Any] = []
    try:
        while True:
            if how == "pop":
                chain = queue.pop()
                if chain is None:
                    break
                out.append(shape(chain))
            else:  # SIZE: whole-table columns (n * 8 >= size); 1: per-head unpack
                chains = queue.pop_batch(SIZE if how == "batch" else 1)
                if not chains:
                    break
                out.extend(shape(c) for c in chains)
    except VirtqueueError as exc:
        out.append(("error", str(exc)))
    return out


@pytest.fixture
def memory() -> Iterator[GuestMemory]:
    with GuestMemory.anonymous(MEM) as mem:
        mem.write(DATA, bytes(range(256)) * 64)
        yield mem


def _ring(mem: GuestMemory, descs: list[tuple[int, int, int, int]], heads: list[int]) -> None:
    desc, avail, used, _ = split_layout(SIZE, 0)
    mem.write(0, bytes(used + 6 + 8 * SIZE))
    for i, d in enumerate(descs):
        mem.write(desc + 16 * i, _DESC.pack(*d))
    for k, head in enumerate(heads):
        mem.write(avail + 4 + 2 * k, struct.pack("<H", head))
    mem.write(avail + 2, struct.pack("<H", len(heads)))


def _queues(mem: GuestMemory, cls: type[SplitQueue], **kwargs: Any) -> dict[str, SplitQueue]:
    """One fresh queue over the same ring per way of popping."""
    lay = split_layout(SIZE, 0)[:3]
    return {how: cls(mem, SIZE, *lay, **kwargs) for how in ("batch", "single", "pop")}


addresses = st.sampled_from([DATA, DATA, DATA + 100, MEM - 8, MEM - 1, MEM, MEM + 0x1000, 1 << 63])
lengths = st.sampled_from([0, 1, 8, 8, 16, 100, 4096, 1 << 31])
flag_sets = st.sampled_from(
    [
        0,
        VRING_DESC_F_NEXT,
        VRING_DESC_F_WRITE,
        VRING_DESC_F_NEXT | VRING_DESC_F_WRITE,
        VRING_DESC_F_NEXT,
        VRING_DESC_F_NEXT | VRING_DESC_F_WRITE,
        VRING_DESC_F_INDIRECT,
        VRING_DESC_F_INDIRECT | VRING_DESC_F_NEXT,
    ]
)


@st.composite
def descriptors(draw: st.DrawFn) -> list[tuple[int, int, int, int]]:
    """A table whose ``next`` fields mostly link descriptor i to i + 1 (long valid chains)."""
    out = []
    for i in range(SIZE):
        nxt = draw(st.one_of(st.just(i + 1), st.just(i + 1), st.integers(0, SIZE + 1)))
        out.append((draw(addresses), draw(lengths), draw(flag_sets), nxt))
    return out


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    descs=descriptors(),
    heads=st.lists(st.integers(0, SIZE + 2), min_size=1, max_size=SIZE),
    max_chain=st.sampled_from([None, None, 2, 3]),
)
def test_every_path_matches_the_full_walk(
    memory: GuestMemory,
    descs: list[tuple[int, int, int, int]],
    heads: list[int],
    max_chain: int | None,
) -> None:
    """Random (mostly hostile) tables: same chains, same error, whichever path pops them."""
    _ring(memory, descs, heads)
    for how, queue in _queues(memory, SplitQueue, max_chain_len=max_chain).items():
        reference = _queues(memory, ReferenceQueue, max_chain_len=max_chain)[how]
        assert outcome(queue, how) == outcome(reference, how), how


def test_blk_shaped_chains_through_the_fast_path(memory: GuestMemory) -> None:
    """Header + data + status chains (what virtio-blk sends) come out whole from every path."""
    hdr, data = DATA, DATA + 0x1000
    descs = [
        (hdr, 16, VRING_DESC_F_NEXT, 1),
        (data, 4096, VRING_DESC_F_NEXT | VRING_DESC_F_WRITE, 2),
        (hdr + 16, 1, VRING_DESC_F_WRITE, 0),
        (hdr + 32, 16, VRING_DESC_F_NEXT, 4),
        (data + 4096, 512, VRING_DESC_F_NEXT, 5),
        (hdr + 48, 1, VRING_DESC_F_WRITE, 0),
    ]
    _ring(memory, descs, [0, 3, 0])
    for how, queue in _queues(memory, SplitQueue).items():
        chains = outcome(queue, how)
        assert [c[0] for c in chains] == [0, 3, 0], how
        assert chains[0][3:] == (16, 4097, [(data, 4096), (hdr + 16, 1)], 3), how
        assert chains[1][3:] == (528, 1, [(hdr + 48, 1)], 3), how
        assert chains[1][1] == [memory.read(hdr + 32, 16), memory.read(data + 4096, 512)]


def test_one_descriptor_chains_share_the_read_only_empty_list(memory: GuestMemory) -> None:
    """The absent side of a one-descriptor chain is EMPTY: equal to [], refusing changes."""
    _ring(memory, [(DATA, 8, 0, 0), (DATA + 8, 8, VRING_DESC_F_WRITE, 0)], [0, 1])
    queue = _queues(memory, SplitQueue)["batch"]
    readable, writable = queue.pop_batch(SIZE)
    assert readable.writable is EMPTY and readable.writable_gpas is EMPTY
    assert writable.readable is EMPTY and writable.writable_gpas == [(DATA + 8, 8)]
    assert readable.writable == [] and readable.read_all() == memory.read(DATA, 8)
    with pytest.raises(TypeError, match="read-only"):
        readable.writable.append(memoryview(b"x"))
    with pytest.raises(TypeError, match="read-only"):
        writable.readable += [memoryview(b"x")]
    assert EMPTY == []


def test_descriptor_chain_keeps_its_dataclass_behaviour() -> None:
    """Constructor defaults, keyword arguments, value equality, repr, unhashable, match args."""
    a = DescriptorChain(3, readable=[memoryview(b"ab")], read_len=2)
    b = DescriptorChain(3, [memoryview(b"ab")], [], 2, 0, [], 1)
    assert a == b and a != DescriptorChain(4)
    assert DescriptorChain(0).readable is not DescriptorChain(0).readable
    assert repr(DescriptorChain(1)) == (
        "DescriptorChain(head=1, readable=[], writable=[], read_len=0, write_len=0, "
        "writable_gpas=[], desc_count=1)"
    )
    with pytest.raises(TypeError):
        hash(a)
    match a:
        case DescriptorChain(head, readable):
            assert (head, readable[0].tobytes()) == (3, b"ab")


@pytest.mark.parametrize(
    ("links", "max_chain", "error"),
    [
        ([1, 2, 3], 4, None),  # four descriptors, limit four: taken
        ([1, 2, 3], 3, "longer than the limit of 3 descriptors"),
        ([1, 2, 0], None, "loops"),
        ([1, 2, SIZE], None, "next 16 >= queue size 16"),
    ],
)
def test_chain_limits_on_every_path(
    memory: GuestMemory, links: list[int], max_chain: int | None, error: str | None
) -> None:
    """Length limit, loops and bad next indices: the fast paths defer to the full walk."""
    descs = [(DATA + 16 * i, 16, VRING_DESC_F_NEXT, nxt) for i, nxt in enumerate(links)]
    descs.append((DATA + 64, 16, 0, 0))
    _ring(memory, descs + [(0, 0, 0, 0)] * (SIZE - len(descs)), [0])
    for how, queue in _queues(memory, SplitQueue, max_chain_len=max_chain).items():
        got = outcome(queue, how)
        if error is None:
            assert [c[3:] for c in got] == [(64, 0, [], 4)], how
        else:
            assert len(got) == 1 and got[0][0] == "error" and error in got[0][1], (how, got)
