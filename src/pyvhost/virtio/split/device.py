"""Device side of the split virtqueue: pop the chains a driver made available, push them back.

Memory ordering follows :mod:`pyvhost.virtio.barrier`.

Hostile drivers: every descriptor is validated, every chain bounded, and a violation raises
:class:`~pyvhost.errors.VirtqueueError` and marks the queue broken (further pops raise again).

Zero-length descriptors: the spec's driver requirements for the descriptor table (2.7.5.1) only
forbid chains longer than 2^32 bytes in total and loops; nothing forbids a zero-length data
descriptor, and Linux's vhost accepts them (QEMU rejects them). We accept them and they add no
view. A zero-length *indirect table* is rejected: section 2.7.5.3 sizes the table as
``len / 16`` descriptors and requires a valid first descriptor, so 0 describes no chain.
"""

from __future__ import annotations

import logging
from array import array
from collections.abc import Callable, Sequence
from itertools import chain as chain_items
from itertools import repeat
from operator import sub

from pyvhost.errors import GuestMemoryError, VirtqueueError
from pyvhost.virtio.barrier import RW_BARRIERS_NEEDED, full_barrier, read_barrier, write_barrier
from pyvhost.virtio.chain import EMPTY, DescriptorChain
from pyvhost.virtio.columns import ReadColumns, gather
from pyvhost.virtio.memory import GuestMemory
from pyvhost.virtio.queue import SplitInflightHooks
from pyvhost.virtio.ring import (
    U32_LIMIT,
    ChainParts,
    FastTable,
    RingAddresses,
    RingQueue,
    map_buffer,
    ring_view,
    single_chain,
)
from pyvhost.virtio.split.layout import (
    DESC,
    DESC_SIZE,
    VRING_AVAIL_F_NO_INTERRUPT,
    VRING_DESC_F_INDIRECT,
    VRING_DESC_F_NEXT,
    VRING_DESC_F_WRITE,
    VRING_USED_F_NO_NOTIFY,
    check_size,
    vring_need_event,
)

__all__ = ["SplitQueue"]

log = logging.getLogger(__name__)

_new = object.__new__


_Columns = tuple[list[int], list[int], list[int], list[int]]
_NO_COLUMNS: _Columns = ([], [], [], [])
_Run = tuple[Sequence[int], Sequence[int], int, int]
"""What :meth:`SplitQueue.pop_columns` takes: offsets, lengths, shortest, longest."""
_SIMPLE_FLAGS = VRING_DESC_F_NEXT | VRING_DESC_F_WRITE | VRING_DESC_F_INDIRECT
"""Flags a descriptor :meth:`SplitQueue.pop_columns` takes has none of (other bits are ignored,
as the chain path ignores them)."""


def _where(in_indirect: bool, index: int, head: int) -> str:
    """How errors name a descriptor: its table, its index, the chain it belongs to."""
    return f"{'indirect descriptor' if in_indirect else 'descriptor'} {index} (chain head {head})"


def _table_changed(queue: int) -> GuestMemoryError:
    return GuestMemoryError(
        f"queue {queue}: a memory region was removed while popping; the chain was not taken"
    )


class SplitQueue(RingQueue):
    """Device side of a split virtqueue: pop chains the driver made available, push them back.

    The ring views are taken once at construction; after the memory table changes (SET_MEM_TABLE,
    REM_MEM_REG) build a new queue with ``last_avail_idx=old.get_base()``. ``used_idx`` defaults
    to the value found in the used ring, as a back-end resuming a queue does.

    Not thread-safe: one thread drives a queue. Chains popped hold views into guest memory that
    keep their regions mapped until released, even across a memory table change.
    """

    def __init__(
        self,
        mem: GuestMemory,
        size: int,
        desc_gpa: int,
        avail_gpa: int,
        used_gpa: int,
        *,
        event_idx: bool = False,
        indirect: bool = True,
        last_avail_idx: int = 0,
        used_idx: int | None = None,
        queue_index: int = 0,
        log_used: bool = False,
        used_log_gpa: int | None = None,
        inflight: SplitInflightHooks | None = None,
        max_chain_len: int | None = None,
    ) -> None:
        check_size(size)
        super().__init__(
            mem,
            size,
            event_idx=event_idx,
            indirect=indirect,
            queue_index=queue_index,
            max_chain_len=max_chain_len,
            areas=RingAddresses(desc_gpa, avail_gpa, used_gpa, log_used),
        )
        self._mask = size - 1
        self._desc = ring_view(mem, "descriptor table", desc_gpa, DESC_SIZE * size, 16)
        words = self._desc.cast("I")
        self._addr_col = self._desc.cast("Q")[0::2]
        self._lo_col = words[0::4]
        self._hi_col = words[1::4]
        self._len_col = words[2::4]
        self._flags_col = self._desc.cast("H")[6::8]
        """Strided views of each descriptor field, for :meth:`pop_columns`'s gathers."""
        self._zero_used = array("I", bytes(8 * size))
        self._sequence: list[int] = []
        """0 .. size - 1 twice (made on first use): heads taken in table order compare equal to
        a slice of it, which is what a driver recycling descriptors in order makes available."""
        self._sequence_used = array("I")
        """The used elements ``(i, 0)`` for :attr:`_sequence`, to copy for such heads."""
        self._avail = ring_view(mem, "available ring", avail_gpa, 6 + 2 * size, 2).cast("H")
        used = ring_view(mem, "used ring", used_gpa, 6 + 8 * size, 4)
        self._used = used.cast("H")
        self._used_ring = used[4 : 4 + 8 * size]
        self._used_ring32 = self._used_ring.cast("I")
        self._used_event_index = 2 + size
        self._avail_event_index = 2 + 4 * size
        self._last_avail = last_avail_idx & 0xFFFF
        self._shadow_avail = self._last_avail
        self._used_idx = self._used[1] if used_idx is None else used_idx & 0xFFFF
        self._signalled_used = self._used_idx
        self._signalled_valid = False
        self._notify_enabled = True
        self._log_used = log_used
        self._used_log_gpa = used_gpa if used_log_gpa is None else used_log_gpa
        self._inflight = inflight
        self._recover_pending = inflight is not None and inflight.begin(self._used_idx)

    def close(self) -> None:
        """Release the ring views so the memory can be unmapped now (the queue is unusable)."""
        self._release(
            self._addr_col,
            self._lo_col,
            self._hi_col,
            self._len_col,
            self._flags_col,
            self._avail,
            self._used,
            self._used_ring32,
            self._used_ring,
            self._desc,
        )

    # -- state ----------------------------------------------------------------------------------

    @property
    def last_avail_idx(self) -> int:
        """Free-running index of the next available-ring entry to pop."""
        return self._last_avail

    @property
    def used_idx(self) -> int:
        """Free-running used index the device has published."""
        return self._used_idx

    @property
    def used_log_gpa(self) -> int:
        """Where the dirty log marks used-ring writes (the front-end's ``log_guest_addr``)."""
        return self._used_log_gpa

    @property
    def inflight(self) -> SplitInflightHooks | None:
        """The inflight-tracking hooks this queue reports to, if any."""
        return self._inflight

    def get_base(self) -> int:
        """GET_VRING_BASE: the next available index the device would process."""
        return self._last_avail

    @property
    def in_flight(self) -> int:
        """Chains popped and not yet pushed back."""
        return (self._last_avail - self._used_idx) & 0xFFFF

    def recover_inflight(self) -> list[DescriptorChain]:
        """At start: the chains a previous back-end popped and never completed, in pop order.

        Only once per region, and only for a region that was in use (version 1): a fresh region
        was initialised at this queue's position when it was built. As libvhost-user does, the
        queue then resumes at ``used.idx + len(chains)``; when nothing is in flight the position
        SET_VRING_BASE gave stands.
        """
        tracker = self._inflight
        if tracker is None or not self._recover_pending:
            return []
        self._recover_pending = False
        heads = tracker.recover(self._used_idx)
        if heads:
            self._last_avail = self._shadow_avail = (self._used_idx + len(heads)) & 0xFFFF
        table = self._mem.fast_table()
        return [self._parse(head, table) for head in heads]

    def _avail_entries(self) -> int:
        """Load avail.idx, validate it, and return how many entries are ready to pop."""
        avail_idx = self._avail[1]
        pending = (avail_idx - self._last_avail) & 0xFFFF
        if pending > self.size:
            raise self._fail(
                f"avail.idx {avail_idx} is {pending} entries ahead of last_avail_idx "
                f"{self._last_avail} (queue size {self.size})"
            )
        self._shadow_avail = avail_idx
        if RW_BARRIERS_NEEDED and pending:
            read_barrier()
        return pending

    def has_available(self) -> bool:
        """Whether the driver has made a chain available that was not popped yet."""
        self._check_broken()
        return self._shadow_avail != self._last_avail or self._avail_entries() > 0

    # -- pop ------------------------------------------------------------------------------------

    def pop(self) -> DescriptorChain | None:
        """The next available chain, or None."""
        if self._broken is not None:
            self._check_broken()
        last = self._last_avail
        if last == self._shadow_avail and self._avail_entries() == 0:
            return None
        head = self._avail[2 + (last & self._mask)]
        try:
            chain = self._parse(head, self._mem.fast_table())
        except ValueError:  # a region view was released: the memory table changed under us
            raise _table_changed(self.queue_index) from None
        self._last_avail = last = (last + 1) & 0xFFFF
        if self.event_idx and self._notify_enabled:
            self._set_avail_event(last)
        if self._inflight is not None:
            self._inflight.on_pop(head)
        return chain

    def pop_batch(self, max_n: int) -> list[DescriptorChain]:
        """Up to ``max_n`` available chains.

        The hot path: heads are read with one slice of the available ring, and chains of direct
        descriptors inside one region are built by :meth:`_pop_single_region`; anything else goes
        to ``_parse``. Chains taken before a malformed one are returned (they are in flight and
        must be completed); the queue is then broken and the next pop raises the error.
        """
        if self._broken is not None:
            self._check_broken()
        last = self._last_avail
        ready = (self._shadow_avail - last) & 0xFFFF
        if ready < max_n:
            ready = self._avail_entries()
        n = ready if ready < max_n else max_n
        if n <= 0:
            return []
        heads = self._avail_heads(last, n)
        table = self._mem.fast_table()
        out: list[DescriptorChain] = []
        try:
            if len(table[0]) == 1:
                self._pop_single_region(heads, table, out)
            else:
                parse = self._parse
                out.extend(parse(head, table) for head in heads)
        except ValueError:  # a region view was released: the memory table changed under us
            if not out:
                raise _table_changed(self.queue_index) from None
        except (VirtqueueError, GuestMemoryError):
            if not out:
                raise
        finally:
            self._taken(heads, len(out))
        if self.event_idx and self._notify_enabled:
            self._set_avail_event(self._last_avail)
        return out

    def _avail_heads(self, last: int, n: int) -> list[int]:
        """The ``n`` heads of the available ring from free-running index ``last`` (one slice, two
        where the ring wraps)."""
        avail = self._avail
        start = 2 + (last & self._mask)
        end = start + n
        limit = 2 + self.size
        if end <= limit:
            return avail[start:end].tolist()
        return avail[start:limit].tolist() + avail[2 : end - limit + 2].tolist()

    def _taken(self, heads: list[int], n: int) -> None:
        """The first ``n`` of ``heads`` were popped: move last_avail_idx, tell inflight tracking."""
        self._last_avail = (self._last_avail + n) & 0xFFFF
        inflight = self._inflight
        if inflight is not None:
            for head in heads[:n]:
                inflight.on_pop(head)

    def pop_columns(self, max_n: int) -> ReadColumns | None:
        """The chains :meth:`pop_batch` would take (up to ``max_n``) as :class:`ReadColumns`
        (heads, offsets, lengths; no object per chain) when every one of them is one
        device-readable descriptor inside the one memory region. None, with nothing taken,
        when any is anything else or guest memory has several regions: then pop the same chains
        with :meth:`pop_batch`, which validates them and names what is wrong (all or nothing, so
        a hostile ring meets exactly the chain path's batches and errors). Empty columns:
        nothing is available.

        Per batch, not per chain: the descriptor fields of all heads are gathered with one C loop
        each and checked in bulk (no flags, one 4 GiB window, lengths, the range of offsets);
        only when a bulk check fails is each head looked at. The ring state after it
        (last_avail_idx, avail_event, inflight tracking) is what :meth:`pop_batch` leaves for
        the same chains.
        """
        if self._broken is not None:
            self._check_broken()
        last = self._last_avail
        ready = (self._shadow_avail - last) & 0xFFFF
        if ready < max_n:
            ready = self._avail_entries()
        n = ready if ready < max_n else max_n
        if n <= 0:
            return ReadColumns([], (), (), memoryview(b""))
        starts, sizes, views = self._mem.fast_table()
        if len(starts) != 1:
            return None
        try:
            region = views[0][:]  # a view of our own keeps the mapping, as a chain's views do
        except ValueError:  # released: the memory table changed under us
            raise _table_changed(self.queue_index) from None
        heads = self._avail_heads(last, n)
        run = self._bulk_run(heads, starts[0], sizes[0]) or self._readable_run(
            heads, starts[0], sizes[0]
        )
        if run is None:
            return None
        offsets, lengths, shortest, longest = run
        self._taken(heads, n)
        if self.event_idx and self._notify_enabled:
            self._set_avail_event(self._last_avail)
        return ReadColumns(heads, offsets, lengths, region, (shortest, longest))

    def _bulk_run(self, heads: list[int], base: int, extent: int) -> _Run | None:
        """Offsets, lengths and their bounds if every one of ``heads`` is a non-empty
        device-readable descriptor (neither NEXT, WRITE nor INDIRECT) inside the region
        ``[base, base + extent)``, else None: checked in bulk (one C loop per descriptor field
        and per check, none per head). Stricter than :meth:`_readable_run`, never more lenient."""
        n = len(heads)
        get = self._getter(heads)
        try:
            flags = get(self._flags_col)
        except IndexError:  # a head beyond the table
            return None
        if flags.count(0) != n:
            return None
        lengths = get(self._len_col)
        shortest = min(lengths)
        longest = max(lengths)
        low_base = base & 0xFFFFFFFF
        offsets: Sequence[int]
        if get(self._hi_col).count(base >> 32) == n:  # one 4 GiB window: the low words
            offsets = get(self._lo_col)
            if low_base:
                offsets = list(map(sub, offsets, repeat(low_base)))
        else:
            offsets = list(map(sub, get(self._addr_col), repeat(base)))
            low_base = 1  # offsets may be negative: check the low end
        if (
            shortest > 0
            and (not low_base or min(offsets) >= 0)
            and max(offsets) + longest <= extent
        ):
            return offsets, lengths, shortest, longest
        return None

    def _in_sequence(self, heads: Sequence[int]) -> bool:
        """Whether ``heads`` are consecutive descriptors of the table (wrapping at its end)."""
        sequence = self._sequence
        if not sequence:
            sequence = self._sequence = list(range(self.size)) * 2
            self._sequence_used = array("I", bytes(16 * self.size))
            self._sequence_used[0::2] = array("I", sequence)
        first = heads[0]
        return 0 <= first < self.size and heads == sequence[first : first + len(heads)]

    def _getter(self, heads: list[int]) -> Callable[[memoryview], Sequence[int]]:
        """A function taking the values of ``heads`` from a column view of the table: one
        gather, or one or two slices when the heads are consecutive (cheaper per value)."""
        if not self._in_sequence(heads):
            return gather(heads)
        first = heads[0]
        end = first + len(heads)
        size = self.size
        if end <= size:
            return lambda column: column[first:end].tolist()
        wrap = end - size
        return lambda column: column[first:].tolist() + column[:wrap].tolist()

    def _readable_run(self, heads: list[int], base: int, extent: int) -> _Run | None:
        """What :meth:`_bulk_run` returns, found by looking at each head in turn (exact where
        the bulk checks are only sufficient: unknown flag bits, a buffer at the region's end)."""
        desc = self._desc
        unpack = DESC.unpack_from
        size = self.size
        offsets: list[int] = []
        lengths: list[int] = []
        for head in heads:
            if head >= size:
                return None
            addr, length, flags, _ = unpack(desc, head << 4)
            off = addr - base
            if flags & _SIMPLE_FLAGS or not length or off < 0 or off + length > extent:
                return None
            offsets.append(off)
            lengths.append(length)
        return offsets, lengths, min(lengths), max(lengths)

    def _descriptor_columns(self) -> _Columns:
        """The whole descriptor table as four lists: addr, len, flags, next (one read each).

        Cheaper than one struct unpack per descriptor once a batch covers a good part of the
        ring; the values are a snapshot taken after avail.idx was read, as per-head reads are.
        """
        desc = self._desc
        return (
            desc.cast("Q")[0::2].tolist(),
            desc.cast("I")[2::4].tolist(),
            desc.cast("H")[6::8].tolist(),
            desc.cast("H")[7::8].tolist(),
        )

    def _pop_single_region(  # noqa: C901, PLR0912, PLR0915  (inlined hot path; see docstring)
        self, heads: list[int], table: FastTable, out: list[DescriptorChain]
    ) -> None:
        """Append the chains of ``heads`` to ``out``, one-region memory (the common case).

        The per-chain cost is Python object churn, so this path makes as few objects as it can:
        descriptors come from one read of the whole table when the batch is large (else one
        unpack each), chains are filled into a bare instance (no ``__init__`` call), and the
        absent side of a one-descriptor chain is the shared :data:`EMPTY` list. Anything but
        direct descriptors inside the region goes to ``_parse``. The one-descriptor chain is
        built inline in both loops on purpose: a helper call per chain costs more than the rest
        of it, and one loop for both reads costs more in garbage collection (measured).
        ``tests/virtio/test_split_fastpath.py`` holds this path to ``_parse``'s results.
        """
        base = table[0][0]
        extent = table[1][0]
        view = table[2][0]
        size = self.size
        parse = self._parse
        direct = self._direct_one_region
        cls = DescriptorChain
        new = _new
        empty = EMPTY
        append = out.append
        if len(heads) * 8 >= size:
            columns = self._descriptor_columns()
            addrs, lens, flagss, _ = columns
            for head in heads:
                if head < size:
                    flags = flagss[head]
                    if not flags & 5:  # neither NEXT nor INDIRECT
                        length = lens[head]
                        addr = addrs[head]
                        off = addr - base
                        if length and off >= 0 and off + length <= extent:
                            c = new(cls)
                            c.head = head
                            if flags & VRING_DESC_F_WRITE:
                                c.readable = empty
                                c.writable = [view[off : off + length]]
                                c.read_len = 0
                                c.write_len = length
                                c.writable_gpas = [(addr, length)]
                            else:
                                c.readable = [view[off : off + length]]
                                c.writable = empty
                                c.read_len = length
                                c.write_len = 0
                                c.writable_gpas = empty
                            c.desc_count = 1
                            append(c)
                            continue
                    elif not flags & VRING_DESC_F_INDIRECT:
                        chain = direct(head, base, extent, view, columns)
                        if chain is not None:
                            append(chain)
                            continue
                append(parse(head, table))
            return
        desc = self._desc
        unpack = DESC.unpack_from
        for head in heads:
            if head < size:
                addr, length, flags, _ = unpack(desc, head << 4)
                off = addr - base
                if flags & 5:  # NEXT or INDIRECT
                    if not flags & VRING_DESC_F_INDIRECT:
                        chain = direct(head, base, extent, view, None)
                        if chain is not None:
                            append(chain)
                            continue
                elif length and off >= 0 and off + length <= extent:
                    c = new(cls)
                    c.head = head
                    if flags & VRING_DESC_F_WRITE:
                        c.readable = empty
                        c.writable = [view[off : off + length]]
                        c.read_len = 0
                        c.write_len = length
                        c.writable_gpas = [(addr, length)]
                    else:
                        c.readable = [view[off : off + length]]
                        c.writable = empty
                        c.read_len = length
                        c.write_len = 0
                        c.writable_gpas = empty
                    c.desc_count = 1
                    append(c)
                    continue
            append(parse(head, table))

    def _direct_one_region(
        self,
        head: int,
        base: int,
        extent: int,
        view: memoryview,
        columns: _Columns | None,
    ) -> DescriptorChain | None:
        """The chain at ``head`` if it is direct descriptors within the one region, else None.

        Reads the ``columns`` of :meth:`_descriptor_columns`, or the table itself when None.
        Never raises for a bad chain: anything unusual (indirect, outside the region, a loop,
        readable after writable, too long) returns None and ``_parse`` walks the chain again,
        raising the precise error. (A ``while`` loop: a ``range`` per chain costs more.)
        """
        addrs, lens, flagss, nexts = columns or _NO_COLUMNS
        desc = self._desc
        unpack = DESC.unpack_from
        size = self.size
        limit = self._max_chain
        readable: list[memoryview] = []
        writable: list[memoryview] = []
        gpas: list[tuple[int, int]] = []
        read_len = write_len = 0
        seen_write = False
        count = 1
        index = head
        while True:
            if columns is None:
                addr, length, flags, nxt = unpack(desc, index << 4)
            else:
                addr = addrs[index]
                length = lens[index]
                flags = flagss[index]
                nxt = nexts[index]
            off = addr - base
            if flags & VRING_DESC_F_INDIRECT or (length and (off < 0 or off + length > extent)):
                return None
            if flags & VRING_DESC_F_WRITE:
                seen_write = True
                if length:
                    writable.append(view[off : off + length])
                    gpas.append((addr, length))
                    write_len += length
            elif seen_write:
                return None
            elif length:
                readable.append(view[off : off + length])
                read_len += length
            if not flags & VRING_DESC_F_NEXT:
                c = _new(DescriptorChain)
                c.head = head
                c.readable = readable
                c.writable = writable
                c.read_len = read_len
                c.write_len = write_len
                c.writable_gpas = gpas
                c.desc_count = count
                return c if read_len + write_len <= U32_LIMIT else None
            index = nxt
            count += 1
            if index >= size or count > limit:
                return None

    def _parse(self, head: int, table: FastTable) -> DescriptorChain:
        """Walk and validate the chain starting at descriptor ``head``."""
        size = self.size
        if head >= size:
            raise self._fail(f"available ring entry: head descriptor {head} >= queue size {size}")
        addr, length, flags, _ = DESC.unpack_from(self._desc, head << 4)
        chain = None
        if not flags & (VRING_DESC_F_NEXT | VRING_DESC_F_INDIRECT):
            chain = single_chain(table, head, addr, length, flags)
        elif len(table[0]) == 1 and not flags & VRING_DESC_F_INDIRECT:
            chain = self._direct_one_region(head, table[0][0], table[1][0], table[2][0], None)
        return chain if chain is not None else self._walk(head, table)

    def _walk(self, head: int, table: FastTable) -> DescriptorChain:
        """The full walk: every descriptor checked, the first fault named precisely."""
        parts = ChainParts()
        ring_count, indirect = self._walk_table(parts, head, self._desc, head, table)
        if indirect is not None:
            index, addr, length, flags = indirect
            entries = self._indirect_table(_where(False, index, head), addr, length, flags)
            _, nested = self._walk_table(parts, head, entries, 0, table)
            if nested is not None:
                raise self._fail(
                    f"{_where(True, nested[0], head)}: INDIRECT inside an indirect table"
                )
        if parts.total > U32_LIMIT:
            raise self._fail(f"chain at head {head} is {parts.total} bytes long, more than 2^32")
        return parts.chain(head, ring_count)

    def _walk_table(
        self,
        parts: ChainParts,
        head: int,
        desc: memoryview | bytes,
        index: int,
        table: FastTable,
    ) -> tuple[int, tuple[int, int, int, int] | None]:
        """Follow NEXT from ``index`` in the ring (``desc`` is the descriptor table) or in an
        indirect table; ``(descriptors walked, (index, addr, len, flags) of an INDIRECT one)``."""
        in_indirect = desc is not self._desc
        table_len = len(desc) // DESC_SIZE if in_indirect else self.size
        limit = self._max_indirect if in_indirect else self._max_chain
        count = 0
        while True:
            count += 1
            if count > table_len:
                raise self._fail(
                    f"chain at head {head} loops (more than {table_len} descriptors in the "
                    f"{'indirect table' if in_indirect else 'descriptor table'})"
                )
            if count > limit:
                raise self._fail(
                    f"chain at head {head} is longer than the limit of {limit} descriptors"
                )
            addr, length, flags, nxt = DESC.unpack_from(desc, index << 4)
            if flags & VRING_DESC_F_INDIRECT:
                return count, (index, addr, length, flags)
            name = (in_indirect, index, head)
            self._take(parts, addr, length, flags, table, name=name)
            if not flags & VRING_DESC_F_NEXT:
                return count, None
            if nxt >= table_len:
                raise self._fail(
                    f"{_where(*name)}: next {nxt} >= "
                    f"{'indirect table size' if in_indirect else 'queue size'} {table_len}"
                )
            index = nxt

    def _take(
        self,
        parts: ChainParts,
        addr: int,
        length: int,
        flags: int,
        table: FastTable,
        *,
        name: tuple[bool, int, int],
    ) -> None:
        """Map one data descriptor into ``parts``; ``name`` is :func:`_where`'s, for errors."""
        views = None
        if length:
            try:
                views = map_buffer(self._mem, table, addr, length)
            except GuestMemoryError as exc:
                raise self._fail(f"{_where(*name)}: buffer {addr:#x}+{length:#x}: {exc}") from exc
        if flags & VRING_DESC_F_WRITE:
            parts.seen_write = True
        elif parts.seen_write:
            raise self._fail(
                f"{_where(*name)}: device-readable descriptor after a device-writable one"
            )
        if views is not None:
            parts.add(views, addr, length, flags)

    def unpop(self, chains: Sequence[DescriptorChain]) -> bool:
        """Give back the last ``chains`` popped and ask for a kick past the entries seen so far.

        last_avail_idx goes back by ``len(chains)``; the kick is armed for the driver's next
        entry after the avail.idx this queue last read (avail_event there, or NO_NOTIFY cleared)
        and that index is read again behind a full barrier, the usual race-free re-check.
        """
        self._check_broken()
        n = len(chains)
        if n > self.in_flight:
            raise ValueError(f"unpop: {n} chains given back but only {self.in_flight} in flight")
        if n and self._inflight is not None:
            raise ValueError("unpop: chains cannot be given back under inflight tracking")
        self._last_avail = (self._last_avail - n) & 0xFFFF
        seen = self._shadow_avail
        self._notify_enabled = False
        self._arm_kick(seen)
        full_barrier()
        return bool(self._avail[1] != seen)

    # -- push -----------------------------------------------------------------------------------

    def _check_head(self, head: int, written: int) -> None:
        if not 0 <= head < self.size:
            raise VirtqueueError(
                f"push: head {head} out of range (queue size {self.size})", queue=self.queue_index
            )
        if not 0 <= written < U32_LIMIT:
            raise VirtqueueError(
                f"push: written length {written} for head {head} does not fit in 32 bits",
                queue=self.queue_index,
            )

    def _log_chain(self, head: int, written: int) -> None:
        """Mark the guest pages a device write of ``written`` bytes into chain ``head`` touched.

        Re-walks the descriptors (as libvhost-user does) so that no per-chain state is kept for
        the case where logging is off; a descriptor the driver changed meanwhile is its problem.
        """
        saved = self._broken
        try:
            chain = self._parse(head, self._mem.fast_table())
        except VirtqueueError as exc:
            self._broken = saved
            log.warning("queue %d: cannot log writes of chain %d: %s", self.queue_index, head, exc)
            return
        self._mem.log_pieces(chain.writable_gpas, written)

    def push(self, head: int, written: int) -> None:
        """Put chain ``head`` in the used ring with ``written`` bytes and publish used.idx."""
        if not (0 <= head < self.size and 0 <= written < U32_LIMIT):
            self._check_head(head, written)
        idx = self._used_idx
        slot = idx & self._mask
        ring = self._used_ring32
        ring[2 * slot] = head
        ring[2 * slot + 1] = written
        mem = self._mem
        if mem.logging:
            if written:
                self._log_chain(head, written)
            if self._log_used:
                mem.log_write(self._used_log_gpa + 4 + (slot << 3), 8)
        inflight = self._inflight
        if inflight is not None:
            inflight.before_publish((head,))
        if RW_BARRIERS_NEEDED:
            write_barrier()
        idx = (idx + 1) & 0xFFFF
        self._used[1] = idx
        self._used_idx = idx
        if self._log_used:
            mem.log_write(self._used_log_gpa + 2, 2)
        if inflight is not None:
            inflight.after_publish((head,), idx)

    def push_batch(self, items: Sequence[tuple[int, int]]) -> None:
        """Put several ``(head, written)`` in the used ring; one used.idx store for all."""
        n = len(items)
        if not n:
            return
        elems = self._used_elements(items)
        inflight = self._inflight
        self._publish(elems, n, [h for h, _ in items] if inflight is not None else (), items=items)

    def push_heads(self, heads: Sequence[int]) -> None:
        """Put chains ``heads`` in the used ring with nothing written (``push_batch`` of
        ``(head, 0)`` each, the same checks and ring state after): the used elements made with
        one array conversion, written with one store, published with one used.idx store."""
        n = len(heads)
        if not n:
            return
        if n <= self.size and self._in_sequence(heads):
            first = heads[0]
            elems = self._sequence_used[2 * first : 2 * (first + n)]
        else:
            try:
                ids = array("I", heads)
            except OverflowError:
                ids = None
            if ids is None or n > self.size or max(ids) >= self.size:
                self.push_batch([(h, 0) for h in heads])  # raises push_batch's error
                return
            elems = self._zero_used[: 2 * n]
            elems[0::2] = ids
        self._publish(elems, n, heads, items=None)

    def _publish(
        self,
        elems: array[int],
        n: int,
        heads: Sequence[int],
        *,
        items: Sequence[tuple[int, int]] | None,
    ) -> None:
        """Write ``n`` used elements (``elems``: id, len, ...) and publish them with one
        used.idx store: dirty logging of the chains' writes (``items``, None: nothing written)
        and of the used ring, inflight hooks around the store (``heads``)."""
        size = self.size
        ring = self._used_ring32
        slot = self._used_idx & self._mask
        end = slot + n
        if end <= size:
            ring[2 * slot : 2 * end] = elems
        else:
            split = 2 * (size - slot)
            ring[2 * slot :] = elems[:split]
            ring[: 2 * (end - size)] = elems[split:]
        idx = self._used_idx + n
        mem = self._mem
        if mem.logging:
            if items is not None:
                self._log_batch(items)
            elif self._log_used:
                self._log_used_slots(slot, n)
        inflight = self._inflight
        if inflight is not None:
            inflight.before_publish(heads)
        if RW_BARRIERS_NEEDED:
            write_barrier()
        idx &= 0xFFFF
        self._used[1] = idx
        self._used_idx = idx
        if self._log_used:
            mem.log_write(self._used_log_gpa + 2, 2)
        if inflight is not None:
            inflight.after_publish(heads, idx)

    def _log_used_slots(self, slot: int, n: int) -> None:
        """Dirty-log ``n`` used elements written from ``slot`` on (two ranges where they wrap)."""
        mem = self._mem
        first = min(n, self.size - slot)
        mem.log_write(self._used_log_gpa + 4 + (slot << 3), first << 3)
        if n > first:
            mem.log_write(self._used_log_gpa + 4, (n - first) << 3)

    def _used_elements(self, items: Sequence[tuple[int, int]]) -> array[int]:
        """``items`` as used-ring words ``id, len, id, len ...``, every one checked first."""
        n = len(items)
        size = self.size
        try:
            elems = array(
                "I", chain_items.from_iterable(items)
            )  # rejects negatives and values >= 2^32
        except OverflowError:
            elems = None
        if elems is None or max(items)[0] >= size or n > size:
            for head, written in items:
                self._check_head(head, written)
            if n > size:
                raise VirtqueueError(
                    f"push_batch: {n} elements exceed the queue size {size}",
                    queue=self.queue_index,
                )
        assert elems is not None
        return elems

    def _log_batch(self, items: Sequence[tuple[int, int]]) -> None:
        """Dirty-log what a batch of pushes wrote: the chains' buffers and the used elements."""
        mem = self._mem
        start = self._used_idx
        for k, (head, written) in enumerate(items):
            if written:
                self._log_chain(head, written)
            if self._log_used:
                mem.log_write(self._used_log_gpa + 4 + (((start + k) & self._mask) << 3), 8)

    # -- notifications --------------------------------------------------------------------------

    def needs_notification(self) -> bool:
        """After pushes: whether to signal the call eventfd (NO_INTERRUPT / used_event rule)."""
        new = self._used_idx
        if new == self._signalled_used:
            return False  # nothing pushed since the last decision
        full_barrier()
        if self.event_idx:
            old = self._signalled_used
            valid = self._signalled_valid
            self._signalled_used = new
            self._signalled_valid = True
            if not valid:
                return True
            return vring_need_event(self._avail[self._used_event_index], new, old)
        self._signalled_used = new
        self._signalled_valid = True
        return not self._avail[0] & VRING_AVAIL_F_NO_INTERRUPT

    def _set_avail_event(self, value: int) -> None:
        self._used[self._avail_event_index] = value
        if self._log_used:
            self._mem.log_write(self._used_log_gpa + 4 + 8 * self.size, 2)

    def _set_used_flags(self, flags: int) -> None:
        self._used[0] = flags
        if self._log_used:
            self._mem.log_write(self._used_log_gpa, 2)

    def disable_notifications(self) -> None:
        """Ask the driver not to kick: NO_NOTIFY, or with EVENT_IDX an avail_event one behind
        the next entry, which the driver's index will not cross again before it wraps (leaving
        it where :meth:`enable_notifications` put it would still draw one kick)."""
        self._notify_enabled = False
        if self.event_idx:
            self._set_avail_event((self._last_avail - 1) & 0xFFFF)
        else:
            self._set_used_flags(self._used[0] | VRING_USED_F_NO_NOTIFY)

    def enable_notifications(self) -> bool:
        """Ask the driver to kick again; True if chains are available (process them first)."""
        self._check_broken()
        self._notify_enabled = True
        self._arm_kick(self._last_avail)
        full_barrier()
        return self._avail_entries() > 0

    def _arm_kick(self, index: int) -> None:
        """Ask the driver to kick: once its avail.idx passes ``index`` (avail_event) with
        EVENT_IDX, for any entry (NO_NOTIFY cleared) without."""
        if self.event_idx:
            self._set_avail_event(index)
        else:
            self._set_used_flags(self._used[0] & ~VRING_USED_F_NO_NOTIFY)
