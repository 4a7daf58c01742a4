"""The vhost-user inflight I/O tracking region (``GET_INFLIGHT_FD`` / ``SET_INFLIGHT_FD``).

A back-end records in memory shared with the front-end which buffers it took from each ring and
has not given back, so that a new back-end process can resubmit them after a crash even where the
ring no longer holds them (with out-of-order completion the driver reuses those entries).

Layout, from QEMU's ``docs/interop/vhost-user.rst`` ("Inflight I/O tracking"), checked against
QEMU's ``subprojects/libvhost-user/libvhost-user.{c,h}`` (``VuDescStateSplit``,
``VuVirtqInflight``, ``vu_inflight_queue_size``) and DPDK's ``lib/vhost/vhost_user.c``
(``get_pervq_shm_size_split`` / ``get_pervq_shm_size_packed``, ``vhost_user_get_inflight_fd``)::

    region = queue 0 region | queue 1 region | ... ; each padded to a multiple of 64 bytes
    split  header 16 bytes {u64 features, u16 version, u16 desc_num, u16 last_batch_head,
                            u16 used_idx}
           desc   16 bytes {u8 inflight, u8 padding[5], u16 next, u64 counter}
    packed header 32 bytes {u64 features, u16 version, u16 desc_num, u16 free_head,
                            u16 old_free_head, u16 used_idx, u16 old_used_idx,
                            u8 used_wrap_counter, u8 old_used_wrap_counter, u8 padding[7]}
                           (29 bytes of fields; desc[] holds u64s, so it starts at 32)
           desc   32 bytes {u8 inflight, u8 padding, u16 next, u16 last, u16 num, u64 counter,
                            u16 id, u16 flags, u32 len, u64 addr}

Sizes: libvhost-user computes a split queue region as ``ALIGN_UP(16 * queue_size + 2, 64)`` and
DPDK as ``ALIGN_UP(16 * queue_size + 16, 64)``; both equal ``ALIGN_UP(16 + 16 * queue_size, 64)``
because no multiple of 64 lies in between. DPDK's packed ``ALIGN_UP(32 * n + 29, 64)`` likewise
equals ``ALIGN_UP(32 + 32 * n, 64)``. libvhost-user only implements the split format. The fields
are in host byte order (the region never leaves the host) and are read and written through native
``memoryview.cast`` items, one load or store each, so a back-end killed mid-update never leaves a
torn field behind.

Versions: a queue region whose ``version`` is 0 is fresh (GET_INFLIGHT_FD made it, or a front-end
such as QEMU after a migration handed over a new one): the queue keeps the position SET_VRING_BASE
gave it and the region is initialised from that position, then marked version 1, when the queue
starts (:meth:`SplitInflightQueue.begin`, :meth:`PackedInflightQueue.begin`). Only a region that
already says version 1 holds a previous back-end's state to recover. This is libvhost-user's and
DPDK's convention (``vu_check_queue_inflights``, ``vhost_check_queue_inflights_*``).

The resubmission ``counter`` is per queue, as in libvhost-user (``vq->counter``) and DPDK
(``vq->global_counter``); after recovery it continues from one past the largest counter in flight.
"""

from __future__ import annotations

import contextlib
import fcntl
import mmap
import os
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from pyvhost.closing import Closing
from pyvhost.errors import InflightError

__all__ = [
    "INFLIGHT_VERSION",
    "InflightRegion",
    "PackedInflightEntry",
    "PackedInflightHooks",
    "PackedInflightQueue",
    "SplitInflightQueue",
    "inflight_mmap_size",
    "queue_region_size",
]

INFLIGHT_VERSION = 1
INFLIGHT_ALIGNMENT = 64
MAX_QUEUE_SIZE = 32768

SPLIT_HEADER_SIZE = 16
SPLIT_DESC_SIZE = 16
PACKED_HEADER_SIZE = 32
PACKED_DESC_SIZE = 32

_DESC_F_AVAIL = 1 << 7
_DESC_F_USED = 1 << 15

# Header fields common to both formats, as u16 indices.
_H_VERSION = 4
_H_DESC_NUM = 5
# Split header (u16 indices) and descriptor state (u8 / u16 / u64 index = base + stride * i).
_S_LAST_BATCH_HEAD = 6
_S_USED_IDX = 7
_SD_INFLIGHT_B = 16  # + 16 * i
_SD_NEXT_H = 8 + 3  # + 8 * i
_SD_COUNTER_Q = 2 + 1  # + 2 * i
# Packed header (u16 / u8 indices).
_P_FREE_HEAD = 6
_P_OLD_FREE_HEAD = 7
_P_USED_IDX = 8
_P_OLD_USED_IDX = 9
_P_USED_WRAP_B = 20
_P_OLD_USED_WRAP_B = 21
# Packed descriptor state: byte offset 32 + 32 * i; u8 / u16 / u32 / u64 indices.
_PD_INFLIGHT_B = 32  # + 32 * i
_PD_NEXT_H = 16 + 1  # + 16 * i
_PD_LAST_H = 16 + 2
_PD_NUM_H = 16 + 3
_PD_COUNTER_Q = 4 + 1  # + 4 * i
_PD_ID_H = 16 + 8
_PD_FLAGS_H = 16 + 9
_PD_LEN_I = 8 + 5  # + 8 * i
_PD_ADDR_Q = 4 + 3  # + 4 * i

_PACKED_DESC = struct.Struct("=BxHHHQHHIQ")


def _align_up(value: int, alignment: int) -> int:
    return (value + alignment - 1) // alignment * alignment


def queue_region_size(queue_size: int, packed: bool) -> int:
    """Bytes one queue occupies in the region (header and descriptor states, 64-aligned)."""
    if packed:
        return _align_up(PACKED_HEADER_SIZE + PACKED_DESC_SIZE * queue_size, INFLIGHT_ALIGNMENT)
    return _align_up(SPLIT_HEADER_SIZE + SPLIT_DESC_SIZE * queue_size, INFLIGHT_ALIGNMENT)


def inflight_mmap_size(num_queues: int, queue_size: int, packed: bool) -> int:
    """Size of the whole region: ``num_queues`` queue regions of ``queue_size`` descriptors."""
    return num_queues * queue_region_size(queue_size, packed)


def _check_geometry(request: str, num_queues: int, queue_size: int) -> None:
    if not 1 <= num_queues <= 0xFFFF:
        raise InflightError(f"{request}: num_queues {num_queues} out of range (1..65535)")
    if not 1 <= queue_size <= MAX_QUEUE_SIZE:
        raise InflightError(
            f"{request}: queue_size {queue_size} out of range (1..{MAX_QUEUE_SIZE})"
        )


class _QueueViews:
    """Typed views of one queue region (u8, u16, u32, u64 items at their natural alignment)."""

    def __init__(self, buf: mmap.mmap, base: int, length: int, queue_size: int, index: int) -> None:
        self.queue_size = queue_size
        self.index = index
        self._raw = memoryview(buf)[base : base + length]
        self._u8 = self._raw.cast("B")
        self._u16 = self._raw.cast("H")
        self._u32 = self._raw.cast("I")
        self._u64 = self._raw.cast("Q")

    _begun = False

    @property
    def fresh(self) -> bool:
        """Whether the region is version 0: never used by a back-end, nothing to recover."""
        return self._u16[_H_VERSION] == 0

    def _claim(self) -> bool:
        """True the first time a queue starts on this tracker (later restarts replay nothing)."""
        first, self._begun = not self._begun, True
        return first

    def _mark_initialised(self) -> None:
        """Write ``desc_num``, then ``version`` last: a crash before it leaves the region fresh."""
        self._u16[_H_DESC_NUM] = self.queue_size
        self._u16[_H_VERSION] = INFLIGHT_VERSION

    def release(self) -> None:
        """Drop the views so the region can be unmapped."""
        for view in (self._u8, self._u16, self._u32, self._u64, self._raw):
            view.release()

    def _error(self, message: str) -> InflightError:
        return InflightError(f"inflight queue {self.index}: {message}")


class SplitInflightQueue(_QueueViews):
    """Inflight tracking for one split queue; the ``SplitInflightHooks`` a ``SplitQueue`` calls.

    The hooks follow the spec's steps in order: at pop, ``counter`` then ``inflight = 1``; before
    used.idx moves, link the batch through ``next`` / ``last_batch_head``; after it moved, clear
    ``inflight`` of the batch, then copy used.idx into ``used_idx``.
    """

    def __init__(self, buf: mmap.mmap, base: int, length: int, queue_size: int, index: int) -> None:
        super().__init__(buf, base, length, queue_size, index)
        self._counter = self._next_counter()

    def _next_counter(self) -> int:
        u8, u64 = self._u8, self._u64
        best = -1
        for i in range(self.queue_size):
            if u8[_SD_INFLIGHT_B + 16 * i] and u64[_SD_COUNTER_Q + 2 * i] > best:
                best = u64[_SD_COUNTER_Q + 2 * i]
        return best + 1

    @property
    def used_idx(self) -> int:
        """used.idx as recorded after the last completed publish."""
        return self._u16[_S_USED_IDX]

    @property
    def last_batch_head(self) -> int:
        """Head of the list of the most recently published batch."""
        return self._u16[_S_LAST_BATCH_HEAD]

    def inflight_heads(self) -> list[int]:
        """Heads now marked in flight, in pop order (by counter)."""
        u8, u64 = self._u8, self._u64
        found = []
        for i in range(self.queue_size):
            flag = u8[_SD_INFLIGHT_B + 16 * i]
            if flag:
                if flag != 1:
                    raise self._error(f"descriptor state {i} has inflight={flag} (expected 0 or 1)")
                found.append((u64[_SD_COUNTER_Q + 2 * i], i))
        found.sort()
        return [head for _, head in found]

    # -- SplitInflightHooks ---------------------------------------------------------------------

    def begin(self, used_idx: int) -> bool:
        """A queue starts on this tracker with used.idx ``used_idx``; True if it must recover.

        A fresh region is initialised at ``used_idx`` (so a crash before the first completion is
        recovered from the right place) and nothing is recovered; a version-1 region is
        recovered the first time only.
        """
        if not self._claim():
            return False
        if not self.fresh:
            return True
        u8, u16 = self._u8, self._u16
        for i in range(self.queue_size):
            u8[_SD_INFLIGHT_B + 16 * i] = 0
        u16[_S_LAST_BATCH_HEAD] = 0
        u16[_S_USED_IDX] = used_idx & 0xFFFF
        self._counter = 0
        self._mark_initialised()
        return False

    def on_pop(self, head: int) -> None:
        """A chain with this head was taken from the available ring."""
        self._u64[_SD_COUNTER_Q + 2 * head] = self._counter
        self._counter += 1
        self._u8[_SD_INFLIGHT_B + 16 * head] = 1

    def before_publish(self, heads: Sequence[int]) -> None:
        """Link the batch about to be published into the last-batch list (used.idx not moved)."""
        u16 = self._u16
        last = u16[_S_LAST_BATCH_HEAD]
        for head in heads:
            u16[_SD_NEXT_H + 8 * head] = last
            last = head
            u16[_S_LAST_BATCH_HEAD] = last

    def after_publish(self, heads: Sequence[int], used_idx: int) -> None:
        """used.idx now reads ``used_idx``: clear the batch's inflight flags, record the index."""
        u8 = self._u8
        for head in heads:
            u8[_SD_INFLIGHT_B + 16 * head] = 0
        self._u16[_S_USED_IDX] = used_idx & 0xFFFF

    # -- reconnection ---------------------------------------------------------------------------

    def recover(self, used_ring_idx: int) -> list[int]:
        """Reconnect: finish an interrupted last batch, return the heads to resubmit in pop order.

        ``used_ring_idx`` is the ``idx`` field of the used ring in guest memory now. If it differs
        from the recorded ``used_idx``, the back-end died between publishing a batch and clearing
        it: the ``used_ring_idx - used_idx`` entries of the last-batch list are cleared. The
        back-end then resumes popping at ``used_ring_idx + len(heads)``.
        """
        used_ring_idx &= 0xFFFF
        recorded = self.used_idx
        if recorded != used_ring_idx:
            batch = (used_ring_idx - recorded) & 0xFFFF
            if batch > self.queue_size:
                raise self._error(
                    f"used ring idx {used_ring_idx} is {batch} entries past the recorded "
                    f"used_idx {recorded} (queue size {self.queue_size})"
                )
            head = self.last_batch_head
            for _ in range(batch):
                if head >= self.queue_size:
                    raise self._error(
                        f"last-batch list reaches descriptor {head} (queue size {self.queue_size})"
                    )
                self._u8[_SD_INFLIGHT_B + 16 * head] = 0
                head = self._u16[_SD_NEXT_H + 8 * head]
            self._u16[_S_USED_IDX] = used_ring_idx
        heads = self.inflight_heads()
        self._counter = self._next_counter()
        return heads


@dataclass(frozen=True, slots=True)
class PackedInflightEntry:
    """A buffer to resubmit after a reconnect: its id and copies of its ring descriptors.

    ``descriptors`` are ``(addr, len, id, flags)`` first to last, as they were in the ring; they
    remain valid after the driver reused those ring slots.
    """

    head: int
    id: int
    counter: int
    descriptors: tuple[tuple[int, int, int, int], ...]


class PackedInflightHooks(Protocol):
    """What a packed queue calls so that its in-flight buffers survive a back-end crash."""

    def begin(self, used_idx: int, used_wrap: bool) -> bool:
        """The queue starts at this used position; True if a previous back-end's state is to
        be recovered (see :meth:`PackedInflightQueue.begin`)."""
        ...

    def on_pop(
        self, descriptors: Sequence[tuple[int, int, int, int]], used_idx: int, used_wrap: bool
    ) -> None:
        """A chain was taken: its ring descriptors ``(addr, len, id, flags)``, first to last.

        ``used_idx`` / ``used_wrap``: the queue's next used position (recorded while nothing is
        in flight, so a region created before SET_VRING_BASE starts from the right place).
        """
        ...

    def before_publish(self, ids: Sequence[int], used_idx: int, used_wrap: bool) -> None:
        """These buffer ids are about to be marked used; the used position after the batch."""
        ...

    def after_publish(self) -> None:
        """The batch's first used descriptor is stored: commit the batch."""
        ...

    def recover(self, ring_flags: Callable[[int], int]) -> list[PackedInflightEntry]:
        """After a reconnect: the buffers to resubmit, in pop order (see
        :meth:`PackedInflightQueue.recover`); ``ring_flags(i)`` reads ring descriptor i's flags."""
        ...

    @property
    def used_idx(self) -> int:
        """After :meth:`recover`: the ring position of the next used descriptor."""
        ...

    @property
    def used_wrap(self) -> bool:
        """After :meth:`recover`: the device wrap counter at :attr:`used_idx`."""
        ...


class PackedInflightQueue(_QueueViews):
    """Inflight tracking for one packed queue: the spec's free list and ``old_*`` shadow fields.

    At pop each ring descriptor of the chain is copied into an entry taken from the free list;
    the head entry gets ``counter``, ``inflight``, ``num`` and ``last``; ``old_free_head`` moves
    once the whole chain is recorded. At push the chain's entries go back on the free list and the
    used position moves (``before_publish``); once the driver can see the used descriptor the
    batch's ``inflight`` flags are cleared and the ``old_*`` fields catch up (``after_publish``).
    """

    def __init__(self, buf: mmap.mmap, base: int, length: int, queue_size: int, index: int) -> None:
        super().__init__(buf, base, length, queue_size, index)
        self._free_head = self._u16[_P_FREE_HEAD]
        self._by_id: dict[int, int] = {}
        self._pending: list[int] = []
        self._counter = 0
        self._load()

    @property
    def used_idx(self) -> int:
        """Next used position as recorded in the region."""
        return self._u16[_P_USED_IDX]

    @property
    def used_wrap(self) -> bool:
        """Device wrap counter as recorded in the region."""
        return bool(self._u8[_P_USED_WRAP_B])

    @property
    def in_flight(self) -> int:
        """Buffers this tracker holds as in flight."""
        return len(self._by_id)

    def _entries(self) -> list[PackedInflightEntry]:
        """Head entries marked in flight with their descriptor copies, sorted by counter."""
        n = self.queue_size
        raw = self._raw
        entries = []
        for i in range(n):
            off = PACKED_HEADER_SIZE + PACKED_DESC_SIZE * i
            flag, _, last, num, counter, _, _, _, _ = _PACKED_DESC.unpack_from(raw, off)
            if flag == 0:
                continue
            if flag != 1:
                raise self._error(f"descriptor state {i} has inflight={flag} (expected 0 or 1)")
            if not 1 <= num <= n:
                raise self._error(f"descriptor state {i} has num={num} (queue size {n})")
            descs = []
            j = i
            for k in range(num):
                if j >= n:
                    raise self._error(f"descriptor list of head {i} reaches entry {j} (size {n})")
                _, nxt, _, _, _, did, dflags, dlen, daddr = _PACKED_DESC.unpack_from(
                    raw, PACKED_HEADER_SIZE + PACKED_DESC_SIZE * j
                )
                descs.append((daddr, dlen, did, dflags))
                if k < num - 1:
                    j = nxt
            if j != last:
                raise self._error(f"descriptor list of head {i} ends at {j}, not at last={last}")
            entries.append(PackedInflightEntry(i, descs[-1][2], counter, tuple(descs)))
        entries.sort(key=lambda e: e.counter)
        return entries

    def _load(self) -> None:
        """Rebuild the in-process state (id map, counter) from the region."""
        entries = self._entries()
        by_id: dict[int, int] = {}
        for e in entries:
            if e.id in by_id:
                raise self._error(f"buffer id {e.id} is in flight twice")
            by_id[e.id] = e.head
        self._by_id = by_id
        self._counter = entries[-1].counter + 1 if entries else 0
        self._free_head = self._u16[_P_FREE_HEAD]

    # -- PackedInflightHooks --------------------------------------------------------------------

    def begin(self, used_idx: int, used_wrap: bool) -> bool:
        """A queue starts on this tracker at this used position; True if it must recover.

        A fresh region gets an empty free list over every entry and the queue's position (the
        one SET_VRING_BASE gave); a version-1 region is recovered the first time only.
        """
        if not self._claim():
            return False
        if not self.fresh:
            return True
        u8, u16 = self._u8, self._u16
        for j in range(self.queue_size):
            u8[_PD_INFLIGHT_B + 32 * j] = 0
            u16[_PD_NEXT_H + 16 * j] = j + 1
        u16[_P_FREE_HEAD] = 0
        u16[_P_OLD_FREE_HEAD] = 0
        u8[_P_USED_WRAP_B] = int(used_wrap)
        u8[_P_OLD_USED_WRAP_B] = int(used_wrap)
        u16[_P_USED_IDX] = used_idx
        u16[_P_OLD_USED_IDX] = used_idx
        self._pending.clear()
        self._load()
        self._mark_initialised()
        return False

    def on_pop(
        self, descriptors: Sequence[tuple[int, int, int, int]], used_idx: int, used_wrap: bool
    ) -> None:
        """Record a chain just taken from the ring (the spec's steps, per ring descriptor)."""
        u8, u16, u32, u64 = self._u8, self._u16, self._u32, self._u64
        n = self.queue_size
        if (
            not self._by_id
            and not self._pending
            and (u16[_P_USED_IDX] != used_idx or bool(u8[_P_USED_WRAP_B]) != used_wrap)
        ):
            u8[_P_USED_WRAP_B] = int(used_wrap)
            u16[_P_USED_IDX] = used_idx
            u8[_P_OLD_USED_WRAP_B] = int(used_wrap)
            u16[_P_OLD_USED_IDX] = used_idx
        head = u16[_P_OLD_FREE_HEAD]
        free = self._free_head
        if head >= n or free != head:
            raise self._error(
                f"free list corrupt at pop: old_free_head {head}, free_head {free} (size {n})"
            )
        u16[_PD_NUM_H + 16 * head] = 0
        u64[_PD_COUNTER_Q + 4 * head] = self._counter
        self._counter += 1
        u8[_PD_INFLIGHT_B + 32 * head] = 1
        last_k = len(descriptors) - 1
        for k, (addr, length, buf_id, flags) in enumerate(descriptors):
            if free >= n:
                raise self._error(f"free list exhausted at pop (entry {free}, size {n})")
            if k == last_k:
                u16[_PD_LAST_H + 16 * head] = free
            u16[_PD_NUM_H + 16 * head] = k + 1
            u16[_PD_ID_H + 16 * free] = buf_id
            u16[_PD_FLAGS_H + 16 * free] = flags
            u32[_PD_LEN_I + 8 * free] = length
            u64[_PD_ADDR_Q + 4 * free] = addr
            free = u16[_PD_NEXT_H + 16 * free]
            u16[_P_FREE_HEAD] = free
        u16[_P_OLD_FREE_HEAD] = free
        self._free_head = free
        self._by_id[descriptors[-1][2]] = head

    def before_publish(self, ids: Sequence[int], used_idx: int, used_wrap: bool) -> None:
        """Return the batch's entries to the free list and move the used position."""
        u8, u16 = self._u8, self._u16
        free = self._free_head
        for buf_id in ids:
            head = self._by_id.pop(buf_id, None)
            if head is None:
                raise self._error(f"buffer id {buf_id} is not recorded as in flight")
            u16[_PD_NEXT_H + 16 * u16[_PD_LAST_H + 16 * head]] = free
            free = head
            u16[_P_FREE_HEAD] = free
            self._pending.append(head)
        self._free_head = free
        u8[_P_USED_WRAP_B] = int(used_wrap)
        u16[_P_USED_IDX] = used_idx

    def after_publish(self) -> None:
        """The first used descriptor is visible: clear ``inflight``, copy state into ``old_*``.

        ``old_used_wrap_counter`` is stored before ``old_used_idx``: if the back-end dies between
        the two, recovery still sees a mismatch and finds the batch published.
        """
        u8, u16 = self._u8, self._u16
        for head in self._pending:
            u8[_PD_INFLIGHT_B + 32 * head] = 0
        self._pending.clear()
        u16[_P_OLD_FREE_HEAD] = self._free_head
        u8[_P_OLD_USED_WRAP_B] = u8[_P_USED_WRAP_B]
        u16[_P_OLD_USED_IDX] = u16[_P_USED_IDX]

    # -- reconnection ---------------------------------------------------------------------------

    def recover(self, ring_flags: Callable[[int], int]) -> list[PackedInflightEntry]:
        """Reconnect procedure; returns the buffers to resubmit, in pop order.

        ``ring_flags(i)`` reads the flags of ring descriptor ``i`` in guest memory. If the back-end
        died mid-publish, the descriptor at ``old_used_idx`` tells whether the used descriptor
        reached the ring (commit the update) or not (roll it back). Afterwards :attr:`used_idx`
        and :attr:`used_wrap` say where the device resumes writing used descriptors.
        """
        u8, u16 = self._u8, self._u16
        n = self.queue_size
        used_idx, old_used_idx = u16[_P_USED_IDX], u16[_P_OLD_USED_IDX]
        used_wrap, old_used_wrap = u8[_P_USED_WRAP_B], u8[_P_OLD_USED_WRAP_B]
        free_head, old_free_head = u16[_P_FREE_HEAD], u16[_P_OLD_FREE_HEAD]
        if (used_idx, used_wrap) != (old_used_idx, old_used_wrap):
            if old_used_idx >= n:
                raise self._error(f"old_used_idx {old_used_idx} out of range (size {n})")
            still_available = _DESC_F_AVAIL if old_used_wrap else _DESC_F_USED
            if ring_flags(old_used_idx) & (_DESC_F_AVAIL | _DESC_F_USED) != still_available:
                old_free_head, old_used_idx, old_used_wrap = free_head, used_idx, used_wrap
                u16[_P_OLD_FREE_HEAD] = old_free_head
                u8[_P_OLD_USED_WRAP_B] = old_used_wrap
                u16[_P_OLD_USED_IDX] = old_used_idx
        u16[_P_FREE_HEAD] = old_free_head
        u8[_P_USED_WRAP_B] = old_used_wrap
        u16[_P_USED_IDX] = old_used_idx
        self._pending.clear()
        i = old_free_head
        for _ in range(n):
            if i >= n:
                break
            u8[_PD_INFLIGHT_B + 32 * i] = 0
            i = u16[_PD_NEXT_H + 16 * i]
        self._load()
        return self._entries()


class InflightRegion(Closing):
    """The whole shared region (an ``mmap`` of a memfd) and one tracker per queue."""

    def __init__(
        self,
        fd: int,
        buf: mmap.mmap,
        *,
        mmap_size: int,
        num_queues: int,
        queue_size: int,
        packed: bool,
        mmap_offset: int = 0,
    ) -> None:
        self.fd = fd
        self.mmap_size = mmap_size
        self.mmap_offset = mmap_offset
        self.num_queues = num_queues
        self.queue_size = queue_size
        self.packed = packed
        self.queue_region_size = queue_region_size(queue_size, packed)
        self._buf: mmap.mmap | None = buf
        self._split: dict[int, SplitInflightQueue] = {}
        self._packed: dict[int, PackedInflightQueue] = {}

    @classmethod
    def create(
        cls, num_queues: int, queue_size: int, packed: bool
    ) -> tuple[InflightRegion, int, int]:
        """GET_INFLIGHT_FD: a zeroed, sealed memfd region; returns ``(region, fd, mmap_size)``.

        Every queue region stays version 0 (fresh) until its queue starts: see the module
        docstring. The region owns ``fd`` (closed by :meth:`close`); sending it with SCM_RIGHTS
        hands the front-end a duplicate.
        """
        _check_geometry("GET_INFLIGHT_FD", num_queues, queue_size)
        size = inflight_mmap_size(num_queues, queue_size, packed)
        fd = os.memfd_create("pyvhost-inflight", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.ftruncate(fd, size)
            seals = fcntl.F_SEAL_GROW | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_SEAL
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, seals)
            buf = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            os.close(fd)
            raise
        region = cls(
            fd, buf, mmap_size=size, num_queues=num_queues, queue_size=queue_size, packed=packed
        )
        return region, fd, size

    @classmethod
    def adopt(  # noqa: PLR0917  (the SET_INFLIGHT_FD fields, in message order)
        cls,
        fd: int,
        mmap_size: int,
        mmap_offset: int,
        num_queues: int,
        queue_size: int,
        packed: bool,
    ) -> InflightRegion:
        """SET_INFLIGHT_FD: map the region the front-end kept; takes ownership of ``fd``.

        The size must be exactly what :meth:`create` makes for this geometry and every queue
        header must carry version 0 (fresh) or version 1 with ``desc_num == queue_size``;
        otherwise :class:`InflightError` (and ``fd`` is closed).
        """
        try:
            _check_geometry("SET_INFLIGHT_FD", num_queues, queue_size)
            expected = inflight_mmap_size(num_queues, queue_size, packed)
            if mmap_size != expected:
                raise InflightError(
                    f"SET_INFLIGHT_FD: mmap_size {mmap_size} does not match {expected} for "
                    f"{num_queues} {'packed' if packed else 'split'} queues of size {queue_size}"
                )
            if mmap_offset < 0 or mmap_offset % mmap.ALLOCATIONGRANULARITY:
                raise InflightError(
                    f"SET_INFLIGHT_FD: mmap_offset {mmap_offset:#x} is not a multiple of the "
                    f"page size {mmap.ALLOCATIONGRANULARITY:#x}"
                )
            file_size = os.fstat(fd).st_size
            if mmap_offset + mmap_size > file_size:
                raise InflightError(
                    f"SET_INFLIGHT_FD: mmap_offset {mmap_offset:#x} + mmap_size {mmap_size:#x} "
                    f"runs past the end of the file ({file_size:#x} bytes)"
                )
            buf = mmap.mmap(
                fd,
                mmap_size,
                mmap.MAP_SHARED,
                mmap.PROT_READ | mmap.PROT_WRITE,
                offset=mmap_offset,
            )
        except BaseException:
            os.close(fd)
            raise
        region = cls(
            fd,
            buf,
            mmap_size=mmap_size,
            num_queues=num_queues,
            queue_size=queue_size,
            packed=packed,
            mmap_offset=mmap_offset,
        )
        try:
            for i in range(num_queues):
                region._validate_queue(i)
        except BaseException:
            region.close()
            raise
        return region

    @property
    def buffer(self) -> mmap.mmap:
        """The mapping (for tests and tools)."""
        if self._buf is None:
            raise InflightError("inflight region is closed")
        return self._buf

    def _header(self, i: int) -> memoryview:
        base = i * self.queue_region_size
        return memoryview(self.buffer)[base : base + 16].cast("H")

    def _validate_queue(self, i: int) -> None:
        header = self._header(i)
        try:
            version, desc_num = header[_H_VERSION], header[_H_DESC_NUM]
        finally:
            header.release()
        if version == 0:
            return
        if version != INFLIGHT_VERSION:
            raise InflightError(
                f"SET_INFLIGHT_FD: queue {i} region has version {version} "
                f"(expected {INFLIGHT_VERSION})"
            )
        if desc_num != self.queue_size:
            raise InflightError(
                f"SET_INFLIGHT_FD: queue {i} region has desc_num {desc_num} "
                f"but queue_size is {self.queue_size}"
            )

    def queue(self, i: int) -> SplitInflightQueue | PackedInflightQueue:
        """The tracker of queue ``i`` (one object per queue, reused)."""
        return self.packed_queue(i) if self.packed else self.split_queue(i)

    def split_queue(self, i: int) -> SplitInflightQueue:
        """The tracker of split queue ``i``."""
        self._check_queue(i, packed=False)
        tracker = self._split.get(i)
        if tracker is None:
            tracker = self._split[i] = SplitInflightQueue(*self._queue_area(i), self.queue_size, i)
        return tracker

    def packed_queue(self, i: int) -> PackedInflightQueue:
        """The tracker of packed queue ``i``."""
        self._check_queue(i, packed=True)
        tracker = self._packed.get(i)
        if tracker is None:
            tracker = self._packed[i] = PackedInflightQueue(
                *self._queue_area(i), self.queue_size, i
            )
        return tracker

    def _check_queue(self, i: int, *, packed: bool) -> None:
        if not 0 <= i < self.num_queues:
            raise InflightError(f"inflight queue {i} out of range (region has {self.num_queues})")
        if packed != self.packed:
            fmt = "packed" if self.packed else "split"
            raise InflightError(f"inflight queue {i}: the region is in {fmt} format")

    def _queue_area(self, i: int) -> tuple[mmap.mmap, int, int]:
        """The mapping, offset and length of queue ``i``'s part of the region."""
        return self.buffer, i * self.queue_region_size, self.queue_region_size

    @property
    def closed(self) -> bool:
        return self._buf is None

    def close(self) -> None:
        """Unmap the region and close its fd (idempotent)."""
        buf, self._buf = self._buf, None
        if buf is None:
            return
        for tracker in (*self._split.values(), *self._packed.values()):
            tracker.release()
        self._split.clear()
        self._packed.clear()
        with contextlib.suppress(BufferError):
            buf.close()
        os.close(self.fd)
