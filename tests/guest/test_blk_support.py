"""`to_resubmit`, the restart test's reading of an inflight region, against hand-built regions
laid out as the vhost-user spec's "Inflight I/O tracking" describes."""

from __future__ import annotations

import struct

from .blk_support import (
    DESC_F_AVAIL,
    DESC_F_USED,
    in_flight,
    packed_region_size,
    split_region_size,
    to_resubmit,
)

SIZE = 4


class FakeRings:
    """Ring state in guest memory as the test sets it."""

    def __init__(self, used_idx: int = 0, desc_flags: int = 0) -> None:
        self.used_idx = used_idx
        self.desc_flags = desc_flags

    def split_used_idx(self, queue: int) -> int:
        return self.used_idx

    def packed_desc_flags(self, queue: int, slot: int) -> int:
        return self.desc_flags


def split_region(used_idx: int, last_batch_head: int, inflight: dict[int, int]) -> bytes:
    """One split queue: `inflight` maps a head to its ``next`` link (flag set)."""
    buf = bytearray(split_region_size(SIZE))
    struct.pack_into("<QHHHH", buf, 0, 0, 1, SIZE, last_batch_head, used_idx)
    for head, nxt in inflight.items():
        struct.pack_into("<B5xHQ", buf, 16 + 16 * head, 1, nxt, head)
    return bytes(buf)


def packed_region(
    *,
    free_head: int,
    old_free_head: int,
    used: tuple[int, int],
    old_used: tuple[int, int],
    flagged: set[int],
    next_of: dict[int, int],
) -> bytes:
    """One packed queue with the given header, ``inflight`` flags and free-list links."""
    buf = bytearray(packed_region_size(SIZE))
    header = (0, 1, SIZE, free_head, old_free_head, used[0], old_used[0], used[1], old_used[1])
    struct.pack_into("<QHHHHHHBB", buf, 0, *header)
    for i in range(SIZE):
        struct.pack_into("<BxHHH", buf, 32 + 32 * i, i in flagged, next_of.get(i, SIZE), i, 1)
    return bytes(buf)


def test_split_counts_flags_unless_their_batch_reached_the_used_ring() -> None:
    region = split_region(used_idx=5, last_batch_head=2, inflight={2: 0, 0: 0})
    assert in_flight(region, SIZE, packed=False) == 2
    assert to_resubmit(region, SIZE, False, FakeRings(used_idx=5)) == 2
    assert to_resubmit(region, SIZE, False, FakeRings(used_idx=6)) == 1
    assert to_resubmit(region, SIZE, False, FakeRings(used_idx=7)) == 0


def test_packed_ignores_a_chain_still_on_the_free_list() -> None:
    # entry 0 popped; entry 1 flagged but the pop never finished (old_free_head still 1)
    free_list = {1: 2, 2: 3}
    region = packed_region(
        free_head=2,
        old_free_head=1,
        used=(0, 1),
        old_used=(0, 1),
        flagged={0, 1},
        next_of=free_list,
    )
    assert in_flight(region, SIZE, packed=True) == 2
    assert to_resubmit(region, SIZE, True, FakeRings()) == 1


def test_packed_commits_or_rolls_back_a_publish_by_the_ring_flags() -> None:
    # entry 0 handed back (free_head 0 -> 1 -> 2 -> 3), used moved 0 -> 1, flag not cleared yet
    region = packed_region(
        free_head=0,
        old_free_head=1,
        used=(1, 1),
        old_used=(0, 1),
        flagged={0},
        next_of={0: 1, 1: 2, 2: 3},
    )
    used = FakeRings(desc_flags=DESC_F_AVAIL | DESC_F_USED)
    still_available = FakeRings(desc_flags=DESC_F_AVAIL)
    assert to_resubmit(region, SIZE, True, used) == 0
    assert to_resubmit(region, SIZE, True, still_available) == 1


def test_a_region_of_the_other_format_counts_nothing() -> None:
    region = split_region(used_idx=0, last_batch_head=0, inflight={1: 0})
    assert len(region) % packed_region_size(SIZE)
    assert to_resubmit(region, SIZE, True, FakeRings()) == 0
