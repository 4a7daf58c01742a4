"""Device side of the packed virtqueue: take the chains a driver made available, mark them used.

The driver marks a descriptor available by setting ``AVAIL`` (bit 7) to its wrap counter and
``USED`` (bit 15) to the inverse; the device marks one used by setting both to its own wrap
counter. Both counters start at 1 and flip each time the index passes the end of the ring. A chain
is consecutive descriptors linked by ``NEXT`` with the buffer id in the last one. The device
writes one used descriptor per chain, at its used index, and advances that index by the number
of ring descriptors the chain took; chains may complete in any order, and used descriptors are
written in completion order.

Memory ordering follows :mod:`pyvhost.virtio.barrier`, as in the split ring: whoever hands
descriptors over writes their bodies, then a write barrier, then the flags word (the driver the
flags of a chain's *first* descriptor, the device the flags of a batch's first used descriptor);
whoever takes them reads the flags, then a read barrier, then the bodies; after publishing and
before reading the other side's event-suppression structure, a full barrier.

Hostile drivers: every chain is validated and bounded; a violation raises
:class:`~pyvhost.errors.VirtqueueError` and marks the queue broken (further pops raise again).
Zero-length descriptors are accepted and add no view, as in :mod:`pyvhost.virtio.split`; a
zero-length indirect table is rejected.
"""

from __future__ import annotations

from array import array
from collections.abc import Sequence
from operator import itemgetter

from pyvhost.errors import GuestMemoryError, VirtqueueError
from pyvhost.virtio.barrier import RW_BARRIERS_NEEDED, full_barrier, read_barrier, write_barrier
from pyvhost.virtio.chain import EMPTY, DescriptorChain
from pyvhost.virtio.inflight import PackedInflightHooks
from pyvhost.virtio.memory import GuestMemory
from pyvhost.virtio.packed.layout import (
    BOTH,
    DESC,
    DESC_F_AVAIL,
    DESC_F_INDIRECT,
    DESC_F_NEXT,
    DESC_F_USED,
    DESC_F_WRITE,
    DESC_SIZE,
    EVENT_SIZE,
    EVENT_WRAP_SHIFT,
    FLAGS,
    RING_EVENT_FLAGS_DESC,
    RING_EVENT_FLAGS_DISABLE,
    RING_EVENT_FLAGS_ENABLE,
    USED_BODY,
    advance,
    check_size,
    encode_packed_base,
    event_crossed,
)
from pyvhost.virtio.ring import (
    U32_LIMIT,
    FastTable,
    RingAddresses,
    RingQueue,
    map_buffer,
    ring_view,
    single_chain,
)

__all__ = ["PackedQueue"]

_new = object.__new__

_Columns = tuple[list[int], list[int], list[int], list[int]]
_ONE_READ: tuple[int, list[tuple[int, int]]] = (1, EMPTY)
"""What a one-descriptor, device-readable chain leaves in flight (one shared tuple)."""
_count_of = itemgetter(0)


def _used_flags(written: tuple[int, ...], flags: int, nothing: bool) -> array[int]:
    """Flags words of used descriptors with these written lengths: ``flags``, plus WRITE where
    something was written (``nothing``: no length is nonzero)."""
    if nothing:
        return array("H", [flags]) * len(written)
    return array("H", [flags | DESC_F_WRITE if w else flags for w in written])


class PackedQueue(RingQueue):
    """Device side of a packed virtqueue; a :class:`~pyvhost.virtio.queue.DeviceQueue`.

    The ``head`` of the chains it returns, and that :meth:`push` takes, is the buffer id. Ring
    views are taken once at construction; after the memory table changes build a new queue from
    :meth:`get_base` (:func:`decode_packed_base`). ``log_used`` logs every ring write at the
    guest address it lands on: used descriptors in the descriptor ring, event-suppression writes in
    the device area. (The front-end's ``log_guest_addr`` names the device area for a packed ring,
    QEMU's ``used_phys``; logging descriptors relative to it would mark the wrong pages.)
    """

    def __init__(
        self,
        mem: GuestMemory,
        size: int,
        desc_gpa: int,
        driver_event_gpa: int,
        device_event_gpa: int,
        *,
        event_idx: bool = False,
        indirect: bool = True,
        last_avail_idx: int = 0,
        avail_wrap: bool = True,
        used_idx: int = 0,
        used_wrap: bool = True,
        queue_index: int = 0,
        log_used: bool = False,
        inflight: PackedInflightHooks | None = None,
        max_chain_len: int | None = None,
    ) -> None:
        check_size(size)
        for name, value in (("last_avail_idx", last_avail_idx), ("used_idx", used_idx)):
            if not 0 <= value < size:
                raise ValueError(f"{name} {value} out of range (queue size {size})")
        super().__init__(
            mem,
            size,
            event_idx=event_idx,
            indirect=indirect,
            queue_index=queue_index,
            max_chain_len=max_chain_len,
            areas=RingAddresses(desc_gpa, driver_event_gpa, device_event_gpa, log_used),
        )
        self._ring = ring_view(mem, "descriptor ring", desc_gpa, DESC_SIZE * size, 16)
        self._ring16 = self._ring.cast("H")
        self._ring32 = self._ring.cast("I")
        self._ring64 = self._ring.cast("Q")
        driver_event = ring_view(mem, "driver area", driver_event_gpa, EVENT_SIZE, 4)
        self._driver_event32 = driver_event.cast("I")
        device_event = ring_view(mem, "device area", device_event_gpa, EVENT_SIZE, 4)
        self._device_event16 = device_event.cast("H")
        self._device_event32 = device_event.cast("I")
        self._avail = last_avail_idx
        self._avail_wrap = bool(avail_wrap)
        self._used = used_idx
        self._used_wrap = bool(used_wrap)
        self._log_used = log_used
        self._inflight = inflight
        # buffer id -> (ring descriptors it occupies, writable (gpa, len) pieces)
        self._outstanding: dict[int, tuple[int, list[tuple[int, int]]]] = {}
        self._notify_enabled = True
        self._per_chain = 1  # ring descriptors per chain lately: how far pop_batch reads ahead
        self._used_since_signal = 0
        self._signalled_valid = False
        self._recover_pending = inflight is not None and inflight.begin(used_idx, bool(used_wrap))

    def close(self) -> None:
        """Release the ring views so the memory can be unmapped now (the queue is unusable)."""
        self._release(
            self._ring16,
            self._ring32,
            self._ring64,
            self._ring,
            self._driver_event32,
            self._device_event16,
            self._device_event32,
        )

    # -- state ----------------------------------------------------------------------------------

    @property
    def last_avail_idx(self) -> int:
        """Ring position of the next descriptor to take."""
        return self._avail

    @property
    def avail_wrap(self) -> bool:
        """The driver wrap counter value expected at :attr:`last_avail_idx`."""
        return self._avail_wrap

    @property
    def used_idx(self) -> int:
        """Ring position where the next used descriptor goes."""
        return self._used

    @property
    def used_wrap(self) -> bool:
        """The device wrap counter (value of AVAIL and USED in the next used descriptor)."""
        return self._used_wrap

    @property
    def in_flight(self) -> int:
        """Chains popped and not yet pushed."""
        return len(self._outstanding)

    @property
    def inflight(self) -> PackedInflightHooks | None:
        """The inflight-tracking hooks this queue reports to, if any."""
        return self._inflight

    def get_base(self) -> int:
        """GET_VRING_BASE: both positions and wrap counters (see :func:`encode_packed_base`)."""
        return encode_packed_base(self._avail, self._avail_wrap, self._used, self._used_wrap)

    # -- pop ------------------------------------------------------------------------------------

    def has_available(self) -> bool:
        """Whether the driver made the descriptor at :attr:`last_avail_idx` available."""
        self._check_broken()
        return self._available_at(self._avail, self._avail_wrap)

    def _available_at(self, pos: int, wrap: bool) -> bool:
        """Whether the descriptor at ring position ``pos`` is available under wrap ``wrap``."""
        flags = self._ring16[(pos << 3) + FLAGS]
        return (flags & BOTH) == (DESC_F_AVAIL if wrap else DESC_F_USED)

    def pop(self) -> DescriptorChain | None:
        """The next available chain, or None."""
        self._check_broken()
        pos = self._avail
        wrap = self._avail_wrap
        if (self._ring16[(pos << 3) + FLAGS] & BOTH) != (DESC_F_AVAIL if wrap else DESC_F_USED):
            return None
        if RW_BARRIERS_NEEDED:
            read_barrier()  # the descriptor body only after its flags said "available"
        descs, pos, wrap = self._gather(pos, wrap)
        chain = self._build(descs, f"chain at ring position {self._avail}")
        buf_id = chain.head
        if buf_id in self._outstanding:
            raise self._fail(
                f"chain at ring position {self._avail}: buffer id {buf_id} is already in flight"
            )
        if self._inflight is not None:
            self._inflight.on_pop(descs, self._used, self._used_wrap)
        self._outstanding[buf_id] = (len(descs), chain.writable_gpas)
        self._avail = pos
        self._avail_wrap = wrap
        if self.event_idx and self._notify_enabled:
            self._set_device_event(pos | wrap << EVENT_WRAP_SHIFT, RING_EVENT_FLAGS_DESC)
        return chain

    def _gather(self, pos: int, wrap: bool) -> tuple[list[tuple[int, int, int, int]], int, bool]:
        """The ring descriptors of the chain at ``pos`` (its flags said available) and the ring
        position and wrap counter after it."""
        size = self.size
        ring = self._ring
        unpack = DESC.unpack_from
        desc = unpack(ring, pos << 4)
        if not desc[3] & (DESC_F_NEXT | DESC_F_INDIRECT):
            pos, wrap = (0, not wrap) if pos + 1 == size else (pos + 1, wrap)
            return [desc], pos, wrap
        descs = []
        expect = DESC_F_AVAIL if wrap else DESC_F_USED
        while True:
            if desc[3] & DESC_F_INDIRECT and desc[3] & DESC_F_NEXT:
                raise self._fail(
                    f"chain at ring position {self._avail}: descriptor {pos} has INDIRECT "
                    "together with NEXT"
                )
            descs.append(desc)
            pos += 1
            if pos == size:
                pos = 0
                wrap = not wrap
                expect = DESC_F_AVAIL if wrap else DESC_F_USED
            if not desc[3] & DESC_F_NEXT:
                return descs, pos, wrap
            if len(descs) >= self._max_chain:
                raise self._fail(
                    f"chain at ring position {self._avail} is longer than the limit of "
                    f"{self._max_chain} descriptors (queue size {size})"
                )
            desc = unpack(ring, pos << 4)
            if (desc[3] & BOTH) != expect:
                raise self._fail(
                    f"chain at ring position {self._avail}: descriptor {pos} follows a NEXT "
                    "flag but is not marked available"
                )

    def _pop_each(self, max_n: int) -> list[DescriptorChain]:
        """Up to ``max_n`` chains through :meth:`pop` (memory of several regions)."""
        out: list[DescriptorChain] = []
        pop = self.pop
        try:
            while len(out) < max_n:
                chain = pop()
                if chain is None:
                    break
                out.append(chain)
        except (VirtqueueError, GuestMemoryError):
            if not out:
                raise
        return out

    def pop_batch(self, max_n: int) -> list[DescriptorChain]:
        """Up to ``max_n`` available chains.

        Inside a one-region memory the chains are built by :meth:`_pop_one_region` (descriptors
        read as columns, no call per chain); otherwise, and for anything unusual, through
        :meth:`pop`, which validates in full. Chains taken before a malformed one are returned
        (they are in flight and must be completed); the queue is then broken and the next pop
        raises the error.
        """
        self._check_broken()
        table = self._mem.fast_table()
        if len(table[0]) != 1:
            return self._pop_each(max_n)
        out: list[DescriptorChain] = []
        if max_n <= 0:
            return out
        try:
            self._pop_one_region(max_n, table, out)
        except (VirtqueueError, GuestMemoryError):
            if not out:
                raise
        if out and self.event_idx and self._notify_enabled:
            self._set_device_event(
                self._avail | self._avail_wrap << EVENT_WRAP_SHIFT, RING_EVENT_FLAGS_DESC
            )
        return out

    def _columns(self, start: int, end: int, expect: int) -> _Columns | None:
        """Ring descriptors ``[start, end)`` as lists ``(flags, addr, len, id)``, or None when
        the first is not available (its ``AVAIL`` / ``USED`` bits differ from ``expect``).

        The flags are read first and the bodies after them (with a read barrier where one is
        needed): a descriptor's body is only used once its flags said available, as in :meth:`pop`.
        """
        flags = self._ring16[(start << 3) + FLAGS : end << 3 : 8].tolist()
        if (flags[0] & BOTH) != expect:
            return None
        if RW_BARRIERS_NEEDED:
            read_barrier()
        return (
            flags,
            self._ring64[start << 1 : end << 1 : 2].tolist(),
            self._ring32[(start << 2) + 2 : end << 2 : 4].tolist(),
            self._ring16[(start << 3) + 6 : end << 3 : 8].tolist(),
        )

    def _pop_one_region(  # noqa: C901, PLR0912, PLR0915  (inlined hot path, see docstring)
        self, max_n: int, table: FastTable, out: list[DescriptorChain]
    ) -> None:
        """Append up to ``max_n`` available chains to ``out``, memory of one region.

        A run of ring descriptors is read as columns (:meth:`_columns`, about as many as the
        batch needs at the chain length seen so far), and chains of direct descriptors or one
        indirect table, lying in the region, are built inline into bare instances (the shared
        :data:`EMPTY` list for the absent side of a one-descriptor chain). Anything else (a bad
        or unusual descriptor, a chain running past the end of the ring) goes to :meth:`pop`,
        which takes it or raises the precise error; this path never raises for a bad chain
        itself. Inline on purpose: a call per chain costs more than the rest of a short one.
        ``tests/virtio/test_packed_fastpath.py`` holds it to :meth:`pop`'s results.
        """
        base = table[0][0]
        # flag bits as locals: a module global costs a dictionary-backed load per use
        both, link, indirect_flag = BOTH, DESC_F_NEXT | DESC_F_INDIRECT, DESC_F_INDIRECT
        next_flag, write_flag, u32_limit = DESC_F_NEXT, DESC_F_WRITE, U32_LIMIT
        extent = table[1][0]
        view = table[2][0]
        size = self.size
        outstanding = self._outstanding
        inflight = self._inflight
        max_chain = self._max_chain
        indirect_limit = (self._max_indirect << 4) if self.indirect else 0
        unpack_table = DESC.iter_unpack
        new = _new
        cls = DescriptorChain
        empty = EMPTY
        one_read = _ONE_READ
        append = out.append
        pos = self._avail
        wrap = self._avail_wrap
        left = max_n
        per = self._per_chain
        moved = taken = 0
        try:
            while left:
                expect = DESC_F_AVAIL if wrap else DESC_F_USED
                end = pos + left * per
                columns = self._columns(pos, end if end < size else size, expect)
                if columns is None:
                    break
                flagss, addrs, lens, ids = columns
                clen = len(flagss)
                j = 0
                status = 0  # 0 chunk used up, 1 stop, 2 chain runs past the chunk, 3 slow path
                while j < clen:
                    f = flagss[j]
                    if (f & both) != expect:
                        status = 1
                        break
                    if not f & link:  # one descriptor
                        length = lens[j]
                        addr = addrs[j]
                        buf_id = ids[j]
                        off = addr - base
                        if not (
                            length
                            and off >= 0
                            and off + length <= extent
                            and buf_id < size
                            and buf_id not in outstanding
                        ):
                            status = 3
                            break
                        c = new(cls)
                        c.head = buf_id
                        if f & write_flag:
                            gpas = [(addr, length)]
                            c.readable = empty
                            c.writable = [view[off : off + length]]
                            c.read_len = 0
                            c.write_len = length
                            c.writable_gpas = gpas
                            outstanding[buf_id] = (1, gpas)
                        else:
                            c.readable = [view[off : off + length]]
                            c.writable = empty
                            c.read_len = length
                            c.write_len = 0
                            c.writable_gpas = empty
                            outstanding[buf_id] = one_read
                        c.desc_count = 1
                        if inflight is not None:
                            inflight.on_pop(
                                [(addr, length, buf_id, f)], self._used, self._used_wrap
                            )
                        append(c)
                        j += 1
                        left -= 1
                        if not left:
                            status = 1
                            break
                        continue
                    readable: list[memoryview] = []
                    writable: list[memoryview] = []
                    gpas = []
                    read_len = write_len = 0
                    if not f & indirect_flag:  # direct descriptors linked by NEXT
                        seen_write = False
                        k = j
                        while True:
                            length = lens[k]
                            if f & write_flag:
                                seen_write = True
                                if length:
                                    addr = addrs[k]
                                    off = addr - base
                                    if off < 0 or off + length > extent:
                                        status = 3
                                        break
                                    writable.append(view[off : off + length])
                                    gpas.append((addr, length))
                                    write_len += length
                            elif seen_write:
                                status = 3
                                break
                            elif length:
                                off = addrs[k] - base
                                if off < 0 or off + length > extent:
                                    status = 3
                                    break
                                readable.append(view[off : off + length])
                                read_len += length
                            k += 1
                            if not f & next_flag:
                                break
                            if k - j >= max_chain:
                                status = 3
                                break
                            if k == clen:
                                status = 2 if pos + clen < size else 3
                                break
                            f = flagss[k]
                            if (f & both) != expect or f & indirect_flag:
                                status = 3
                                break
                        if status:
                            break
                        buf_id = ids[k - 1]
                        count = k - j
                    else:  # one indirect table
                        length = lens[j]
                        off = addrs[j] - base
                        buf_id = ids[j]
                        if (
                            f & next_flag
                            or not length
                            or length & 15
                            or length > indirect_limit
                            or off < 0
                            or off + length > extent
                        ):
                            status = 3
                            break
                        seen_write = False
                        for addr, piece, _, flags in unpack_table(view[off : off + length]):
                            if flags & indirect_flag:
                                status = 3
                                break
                            if flags & write_flag:
                                seen_write = True
                                if piece:
                                    off = addr - base
                                    if off < 0 or off + piece > extent:
                                        status = 3
                                        break
                                    writable.append(view[off : off + piece])
                                    gpas.append((addr, piece))
                                    write_len += piece
                            elif seen_write:
                                status = 3
                                break
                            elif piece:
                                off = addr - base
                                if off < 0 or off + piece > extent:
                                    status = 3
                                    break
                                readable.append(view[off : off + piece])
                                read_len += piece
                        if status:
                            break
                        k = j + 1
                        count = 1
                    if buf_id >= size or buf_id in outstanding or read_len + write_len > u32_limit:
                        status = 3
                        break
                    c = new(cls)
                    c.head = buf_id
                    c.readable = readable
                    c.writable = writable
                    c.read_len = read_len
                    c.write_len = write_len
                    c.writable_gpas = gpas
                    c.desc_count = count
                    if inflight is not None:
                        descs = [(addrs[i], lens[i], ids[i], flagss[i]) for i in range(j, k)]
                        inflight.on_pop(descs, self._used, self._used_wrap)
                    outstanding[buf_id] = (count, gpas)
                    append(c)
                    j = k
                    left -= 1
                    if not left:
                        status = 1
                        break
                moved += j
                taken = max_n - left
                pos += j
                if pos == size:
                    pos = 0
                    wrap = not wrap
                if status == 1:
                    break
                if status == 2:  # read again from this chain's head, twice as far
                    per = max(per, -(-2 * (clen - j) // left))
                elif status == 3:  # pop() takes it, or raises the precise error
                    self._avail, self._avail_wrap = pos, wrap
                    chain = self.pop()
                    if chain is None:  # pragma: no cover - the flags said available just now
                        break
                    append(chain)
                    left -= 1
                    pos, wrap = self._avail, self._avail_wrap
                elif taken:
                    per = -(-moved // taken) or 1
        finally:
            self._avail, self._avail_wrap = pos, wrap
            if taken:
                self._per_chain = -(-moved // taken) or 1

    def resubmit(self, descriptors: Sequence[tuple[int, int, int, int]]) -> DescriptorChain:
        """Rebuild a chain from saved ring descriptors ``(addr, len, id, flags)``, now in flight.

        For inflight recovery: the ring slots may have been reused since, but the descriptors
        (and an indirect table they name, which the driver keeps until the buffer is used)
        still describe the buffer.
        """
        self._check_broken()
        if not descriptors:
            raise self._fail("resubmitted chain has no descriptors")
        chain = self._build(list(descriptors), "resubmitted chain")
        if chain.head in self._outstanding:
            raise self._fail(f"resubmitted chain: buffer id {chain.head} is already in flight")
        self._outstanding[chain.head] = (len(descriptors), chain.writable_gpas)
        return chain

    def recover_inflight(self) -> list[DescriptorChain]:
        """At start: the chains a previous back-end took and never completed, in pop order.

        Only once per region, and only for a region that was in use (version 1): then the ring
        position always comes from the region (after a crash no index in guest memory tells it,
        as DPDK does): the used position and wrap counter are the region's, the avail position is
        placed past the descriptors still in flight. A fresh region was initialised at this
        queue's position when it was built.
        """
        tracker = self._inflight
        if tracker is None or not self._recover_pending:
            return []
        self._recover_pending = False
        if self._outstanding:
            raise ValueError(f"queue {self.queue_index}: recover_inflight with chains in flight")
        ring16 = self._ring16
        entries = tracker.recover(lambda i: ring16[(i << 3) + FLAGS])
        self._used, self._used_wrap = tracker.used_idx, tracker.used_wrap
        held = sum(len(e.descriptors) for e in entries)
        self._avail, self._avail_wrap = advance(self._used, self._used_wrap, held, self.size)
        self._signalled_valid = False
        return [self.resubmit(e.descriptors) for e in entries]

    def unpop(self, chains: Sequence[DescriptorChain]) -> bool:
        """Give back the last ``chains`` popped and ask for a kick for the descriptor after them.

        The avail position goes back by the ring descriptors they occupied (flipping the wrap
        counter across the end); the kick is armed at the position they reached (flags DESC with
        EVENT_IDX, ENABLE without) and that descriptor is looked at again behind a full barrier.
        """
        self._check_broken()
        outstanding = self._outstanding
        heads = [c.head for c in chains]
        if len(set(heads)) != len(heads) or any(h not in outstanding for h in heads):
            raise ValueError(f"unpop: buffers {heads} are not all distinct and in flight")
        if heads and self._inflight is not None:
            raise ValueError("unpop: chains cannot be given back under inflight tracking")
        reached, reached_wrap = self._avail, self._avail_wrap
        pos = reached - sum(outstanding.pop(h)[0] for h in heads)
        wrap = reached_wrap
        if pos < 0:
            pos += self.size
            wrap = not wrap
        self._avail, self._avail_wrap = pos, wrap
        self._notify_enabled = False
        self._arm_kick(reached, reached_wrap)
        full_barrier()
        return self._available_at(reached, reached_wrap)

    def _build(self, descs: list[tuple[int, int, int, int]], where: str) -> DescriptorChain:
        """Validate the ring descriptors of one chain and map its buffers."""
        size = self.size
        buf_id = descs[-1][2]
        if buf_id >= size:
            raise self._fail(f"{where}: buffer id {buf_id} >= queue size {size}")
        table = self._mem.fast_table()
        addr, length, _, flags = descs[0]
        if len(descs) == 1 and not flags & DESC_F_INDIRECT:
            chain = single_chain(table, buf_id, addr, length, flags)
            if chain is not None:
                return chain
        elements: Sequence[tuple[int, int, int, int]] = descs
        what = "descriptor"
        if flags & DESC_F_INDIRECT:
            if len(descs) > 1:
                raise self._fail(f"{where}: descriptor 0 has INDIRECT and is followed by NEXT")
            entries = self._indirect_table(where, addr, length, flags)
            elements = list(DESC.iter_unpack(entries))
            what = "indirect descriptor"
        readable, writable, gpas, read_len, write_len = self._collect(elements, where, what, table)
        if read_len + write_len > U32_LIMIT:
            raise self._fail(f"{where}: {read_len + write_len} bytes long, more than 2^32")
        return DescriptorChain(buf_id, readable, writable, read_len, write_len, gpas, len(descs))

    def _collect(
        self,
        elements: Sequence[tuple[int, int, int, int]],
        where: str,
        what: str,
        table: FastTable,
    ) -> tuple[list[memoryview], list[memoryview], list[tuple[int, int]], int, int]:
        """Check the direct descriptors of a chain (``what`` names them) and map their buffers:
        ``(readable, writable, writable gpas, read_len, write_len)``.

        Inside a one-region memory a buffer is sliced here, without a call per descriptor.
        """
        readable: list[memoryview] = []
        writable: list[memoryview] = []
        gpas: list[tuple[int, int]] = []
        starts, sizes, views = table
        one_region = len(starts) == 1
        base, extent, view = (starts[0], sizes[0], views[0]) if one_region else (0, 0, None)
        read_len = write_len = 0
        seen_write = False
        for k, (addr, length, _, flags) in enumerate(elements):
            if flags & DESC_F_INDIRECT:
                raise self._nested_indirect(where, what, k)
            if flags & DESC_F_WRITE:
                seen_write = True
            elif seen_write:
                raise self._fail(
                    f"{where}: {what} {k} is device-readable but follows a device-writable one"
                )
            if not length:
                continue
            if flags & DESC_F_WRITE:
                target = writable
                gpas.append((addr, length))
                write_len += length
            else:
                target = readable
                read_len += length
            off = addr - base
            if view is not None and off >= 0 and off + length <= extent:
                target.append(view[off : off + length])
            else:
                target.extend(self._map(f"{where}: {what} {k}", addr, length, table))
        return readable, writable, gpas, read_len, write_len

    def _nested_indirect(self, where: str, what: str, k: int) -> VirtqueueError:
        if what == "descriptor":
            return self._fail(f"{where}: descriptor {k} inside a NEXT chain has INDIRECT")
        return self._fail(f"{where}: {what} {k}: INDIRECT inside an indirect table")

    def _map(self, where: str, addr: int, length: int, table: FastTable) -> list[memoryview]:
        """Views of a buffer outside the one-region case; ``where`` names it in errors."""
        try:
            return map_buffer(self._mem, table, addr, length)
        except GuestMemoryError as exc:
            raise self._fail(f"{where} buffer {addr:#x}+{length:#x}: {exc}") from exc

    # -- push -----------------------------------------------------------------------------------

    def _check_items(self, items: Sequence[tuple[int, int]]) -> None:
        outstanding = self._outstanding
        seen: set[int] = set()
        for head, written in items:
            if head not in outstanding or head in seen:
                raise VirtqueueError(
                    f"push: buffer id {head} is not in flight"
                    + (" (given twice in one batch)" if head in seen else ""),
                    queue=self.queue_index,
                )
            if not 0 <= written < U32_LIMIT:
                raise VirtqueueError(
                    f"push: written length {written} for buffer id {head} does not fit in 32 bits",
                    queue=self.queue_index,
                )
            seen.add(head)

    def push(self, head: int, written: int) -> None:
        """Mark buffer ``head`` used with ``written`` bytes."""
        entry = self._outstanding.get(head)
        if (
            entry is None
            or self._inflight is not None
            or self._log_used
            or not 0 <= written < U32_LIMIT
        ):
            self.push_batch(((head, written),))
            return
        del self._outstanding[head]
        count, pieces = entry
        if written and self._mem.logging:
            self._mem.log_pieces(pieces, written)
        used = self._used
        wrap = self._used_wrap
        USED_BODY.pack_into(self._ring, (used << 4) + 8, written, head)
        if RW_BARRIERS_NEEDED:
            write_barrier()
        self._ring16[(used << 3) + FLAGS] = (BOTH if wrap else 0) | (DESC_F_WRITE if written else 0)
        used += count
        if used >= self.size:
            used -= self.size
            self._used_wrap = not wrap
        self._used = used
        self._used_since_signal += count

    def push_batch(self, items: Sequence[tuple[int, int]]) -> None:
        """Mark several ``(head, written)`` used; the first entry's flags are stored last.

        Every entry is validated before any is written, so a bad one leaves the ring untouched.
        Without inflight tracking or dirty logging the batch is checked and written as columns
        (one array per field, strided stores when every chain took one ring descriptor); the
        rest, and any batch that fails a check, goes through :meth:`_push_exact`.
        """
        n = len(items)
        if not n:
            return
        if self._inflight is not None or self._log_used or self._mem.logging:
            self._push_exact(items)
            return
        try:
            heads, written = zip(*items, strict=True)
            ids = array("H", heads)  # rejects ids < 0 or >= 2^16 (never in flight)
            lens = array("I", written)  # rejects lengths < 0 or >= 2^32
        except (ValueError, OverflowError, TypeError):
            self._push_exact(items)  # raises the precise error
            return
        outstanding = self._outstanding
        entries: list[tuple[int, list[tuple[int, int]]]] = []
        try:
            entries.extend(map(outstanding.pop, heads))
        except KeyError:  # an id not in flight, or given twice: put back what was taken, explain
            outstanding.update(zip(heads, entries, strict=False))  # the first k
            self._push_exact(items)
            return
        counts = list(map(_count_of, entries))
        count = counts[0]
        first = self._used
        if counts.count(count) == n:
            total = count * n
            first_flags = self._store_columns(ids, lens, written, count)
        else:
            total = sum(counts)
            first_flags = self._store_each(heads, written, counts)
        if RW_BARRIERS_NEEDED:
            write_barrier()  # every entry of the batch is complete before the first is handed over
        self._ring16[(first << 3) + FLAGS] = first_flags
        self._used_since_signal += total

    def _store_columns(
        self, ids: array[int], lens: array[int], written: tuple[int, ...], count: int
    ) -> int:
        """Write used descriptors of chains of ``count`` ring descriptors each, one strided store
        per field (two where the batch wraps), all but the first entry's flags; move the used
        position. Returns the first entry's flags, for the caller to store last."""
        n = len(ids)
        used, wrap = self._used, self._used_wrap
        size = self.size
        ring16 = self._ring16
        ring32 = self._ring32
        step = count << 3  # u16 words from one used descriptor to the next
        end = used + count * n
        nothing = written.count(0) == n
        flag = BOTH if wrap else 0
        if end <= size:
            stop = end << 3
            flags = _used_flags(written, flag, nothing)
            ring16[(used << 3) + 6 : stop : step] = ids
            ring32[(used << 2) + 2 : stop >> 1 : step >> 1] = lens
            ring16[(used << 3) + 7 + step : stop : step] = flags[1:]
            if end < size:
                self._used = end
            else:
                self._used, self._used_wrap = 0, not wrap
            return flags[0]
        cut = -(-(size - used) // count)  # entries that start before the end of the ring
        flags = _used_flags(written[:cut], flag, nothing)
        ring16[(used << 3) + 6 :: step] = ids[:cut]
        ring32[(used << 2) + 2 :: step >> 1] = lens[:cut]
        ring16[(used << 3) + 7 + step :: step] = flags[1:]
        restart = used + cut * count - size
        end -= size
        ring16[(restart << 3) + 6 : end << 3 : step] = ids[cut:]
        ring32[(restart << 2) + 2 : end << 2 : step >> 1] = lens[cut:]
        ring16[(restart << 3) + 7 : end << 3 : step] = _used_flags(
            written[cut:], flag ^ BOTH, nothing
        )
        self._used, self._used_wrap = end, not wrap
        return flags[0]

    def _store_each(
        self, heads: tuple[int, ...], written: tuple[int, ...], counts: list[int]
    ) -> int:
        """Write used descriptors of chains of mixed lengths one by one, all but the first
        entry's flags; move the used position. Returns the first entry's flags."""
        pack = USED_BODY.pack_into
        ring = self._ring
        ring16 = self._ring16
        size = self.size
        used, wrap = self._used, self._used_wrap
        first_flags = -1
        for head, length, count in zip(heads, written, counts, strict=True):
            pack(ring, (used << 4) + 8, length, head)
            flags = (BOTH if wrap else 0) | (DESC_F_WRITE if length else 0)
            if first_flags < 0:
                first_flags = flags
            else:
                ring16[(used << 3) + FLAGS] = flags
            used += count
            if used >= size:
                used -= size
                wrap = not wrap
        self._used, self._used_wrap = used, wrap
        return first_flags

    def _push_exact(self, items: Sequence[tuple[int, int]]) -> None:
        """:meth:`push_batch` item by item, with inflight tracking and dirty logging; the
        precise error for a bad batch."""
        self._check_items(items)
        counts = self._complete(items)
        size = self.size
        inflight = self._inflight
        if inflight is not None:
            end, end_wrap = advance(self._used, self._used_wrap, sum(counts), size)
            inflight.before_publish([h for h, _ in items], end, end_wrap)
        ring = self._ring
        ring16 = self._ring16
        pack = USED_BODY.pack_into
        used, wrap = self._used, self._used_wrap
        first = used
        first_flags = 0
        logged: list[int] = []
        for k, ((head, written), count) in enumerate(zip(items, counts, strict=True)):
            pack(ring, (used << 4) + 8, written, head)
            flags = (BOTH if wrap else 0) | (DESC_F_WRITE if written else 0)
            if k:
                ring16[(used << 3) + FLAGS] = flags
            else:
                first_flags = flags
            if self._log_used:
                logged.append(used)
            used, wrap = (
                (used + count - size, not wrap) if used + count >= size else (used + count, wrap)
            )
        if RW_BARRIERS_NEEDED:
            write_barrier()  # every entry of the batch is complete before the first is handed over
        ring16[(first << 3) + FLAGS] = first_flags
        self._used, self._used_wrap = used, wrap
        self._used_since_signal += sum(counts)
        if inflight is not None:
            inflight.after_publish()
        if logged and self._mem.logging:
            for pos in logged:
                self._mem.log_write(self.areas.desc + (pos << 4), DESC_SIZE)

    def _complete(self, items: Sequence[tuple[int, int]]) -> list[int]:
        """Take checked ``items`` out of flight, dirty-log what was written into them; the ring
        descriptors each one occupied."""
        outstanding = self._outstanding
        mem = self._mem
        counts = []
        for head, written in items:
            count, pieces = outstanding.pop(head)
            counts.append(count)
            if written and mem.logging:
                mem.log_pieces(pieces, written)
        return counts

    # -- notifications --------------------------------------------------------------------------

    def needs_notification(self) -> bool:
        """After pushes: whether the driver area asks for a used-buffer notification."""
        count, self._used_since_signal = self._used_since_signal, 0
        if count == 0 and self._signalled_valid:
            return False
        full_barrier()  # used descriptors are visible before the driver's suppression is read
        event = self._driver_event32[0]
        flags = event >> 16
        valid, self._signalled_valid = self._signalled_valid, True
        if flags == RING_EVENT_FLAGS_DISABLE:
            return False
        if not self.event_idx or flags != RING_EVENT_FLAGS_DESC or not valid:
            return True
        return event_crossed(event & 0xFFFF, self.size, self._used_wrap, self._used, count)

    def _set_device_event(self, off_wrap: int, flags: int) -> None:
        self._device_event32[0] = off_wrap | flags << 16
        if self._log_used:
            self._mem.log_write(self.areas.device, EVENT_SIZE)

    def disable_notifications(self) -> None:
        """Ask the driver not to kick (device area flags DISABLE)."""
        self._notify_enabled = False
        self._device_event16[1] = RING_EVENT_FLAGS_DISABLE
        if self._log_used:
            self._mem.log_write(self.areas.device + 2, 2)

    def enable_notifications(self) -> bool:
        """Ask the driver to kick again; True if a chain is available (process it first).

        With EVENT_IDX: a kick for the descriptor at :attr:`last_avail_idx` (flags DESC),
        which :meth:`pop` keeps moving forward while notifications are enabled.
        """
        self._check_broken()
        self._notify_enabled = True
        self._arm_kick(self._avail, self._avail_wrap)
        full_barrier()  # the driver sees kicks enabled before we look at the ring again
        return self._available_at(self._avail, self._avail_wrap)

    def _arm_kick(self, pos: int, wrap: bool) -> None:
        """Ask the driver to kick: for the descriptor at ``pos`` (flags DESC) with EVENT_IDX,
        for any (flags ENABLE) without."""
        if self.event_idx:
            self._set_device_event(pos | wrap << EVENT_WRAP_SHIFT, RING_EVENT_FLAGS_DESC)
        else:
            self._device_event16[1] = RING_EVENT_FLAGS_ENABLE
            if self._log_used:
                self._mem.log_write(self.areas.device + 2, 2)
