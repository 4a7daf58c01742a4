"""The packed virtqueue (virtio 1.1+ section "Packed Virtqueues"), device side and driver side.

One ring of 16-byte descriptors ``{le64 addr, le32 len, le16 id, le16 flags}`` (align 16) carries
both directions, followed here by two 4-byte event-suppression structures ``{le16 off_wrap,
le16 flags}`` (align 4): the driver area (written by the driver, governs used-buffer
notifications) and the device area (written by the device, governs kicks).

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
before reading the other side's event-suppression structure, a full barrier. Flags words and
event structures are loaded and stored through native ``memoryview.cast`` items (single 16- or
32-bit accesses, no tearing), so the host must be little-endian (checked).

Hostile drivers: every chain is validated and bounded; a violation raises
:class:`~pyvhost.errors.VirtqueueError` and marks the queue broken (further pops raise again).
Zero-length descriptors are accepted and add no view, as in :mod:`pyvhost.virtio.split`; a
zero-length indirect table is rejected.
"""

from __future__ import annotations

import struct
import sys
from bisect import bisect_right
from collections.abc import Sequence
from typing import NamedTuple

from pyvhost.errors import GuestMemoryError, VirtqueueError
from pyvhost.virtio.barrier import RW_BARRIERS_NEEDED, full_barrier, read_barrier, write_barrier
from pyvhost.virtio.chain import EMPTY, MAX_INDIRECT_DESCRIPTORS, DescriptorChain
from pyvhost.virtio.inflight import PackedInflightHooks, PackedInflightQueue
from pyvhost.virtio.memory import GuestMemory

__all__ = [
    "DESC_F_AVAIL",
    "DESC_F_INDIRECT",
    "DESC_F_NEXT",
    "DESC_F_USED",
    "DESC_F_WRITE",
    "RING_EVENT_FLAGS_DESC",
    "RING_EVENT_FLAGS_DISABLE",
    "RING_EVENT_FLAGS_ENABLE",
    "PackedDriver",
    "PackedInflightHooks",
    "PackedLayout",
    "PackedQueue",
    "decode_packed_base",
    "encode_packed_base",
    "packed_layout",
]

DESC_F_NEXT = 1
DESC_F_WRITE = 2
DESC_F_INDIRECT = 4
DESC_F_AVAIL = 1 << 7
DESC_F_USED = 1 << 15

RING_EVENT_FLAGS_ENABLE = 0
RING_EVENT_FLAGS_DISABLE = 1
RING_EVENT_FLAGS_DESC = 2
EVENT_WRAP_SHIFT = 15

DESC_SIZE = 16
EVENT_SIZE = 4
MAX_QUEUE_SIZE = 1 << 15
_U32_LIMIT = 1 << 32

_DESC = struct.Struct("<QIHH")  # addr, len, id, flags
_DESC_BODY = struct.Struct("<QIH")  # addr, len, id: all but the flags
_USED_BODY = struct.Struct("<IH")  # len, id, at offset 8 of a used descriptor
_FLAGS = 7  # index of a descriptor's flags in the ring cast to u16
_BOTH = DESC_F_AVAIL | DESC_F_USED
_new = object.__new__

if sys.byteorder != "little":  # pragma: no cover - no big-endian CI machine
    raise ImportError("pyvhost.virtio.packed needs a little-endian host (native flags access)")


def _need_event(event: int, new: int, old: int) -> bool:
    """virtio's vring_need_event: did moving from ``old`` to ``new`` pass ``event``? (mod 2^16)."""
    return ((new - event - 1) & 0xFFFF) < ((new - old) & 0xFFFF)


def _event_crossed(off_wrap: int, size: int, wrap: bool, new: int, count: int) -> bool:
    """Whether the ``count`` descriptors just before ring position ``new`` include ``off_wrap``.

    ``off_wrap`` is a ring offset (bits 0-14) plus the wrap counter it refers to (bit 15); an
    offset with the other wrap value lies one lap back and is moved ``size`` below zero, as in
    Linux's ``virtqueue_kick_prepare_packed`` and QEMU's ``vring_packed_need_event``.
    """
    if count <= 0:
        return False
    if count >= size:
        return True
    event = off_wrap & 0x7FFF
    if bool(off_wrap >> EVENT_WRAP_SHIFT) != wrap:
        event -= size
    return _need_event(event & 0xFFFF, new, (new - count) & 0xFFFF)


def encode_packed_base(
    last_avail_idx: int, avail_wrap: bool, used_idx: int, used_wrap: bool
) -> int:
    """GET_VRING_BASE value of a packed ring.

    Bits 0-14 avail index, bit 15 avail wrap counter, bits 16-30 used index, bit 31 used wrap.
    """
    for name, value in (("last_avail_idx", last_avail_idx), ("used_idx", used_idx)):
        if not 0 <= value <= 0x7FFF:
            raise ValueError(f"packed vring base: {name} {value} does not fit in 15 bits")
    return last_avail_idx | int(avail_wrap) << 15 | used_idx << 16 | int(used_wrap) << 31


def decode_packed_base(value: int) -> tuple[int, bool, int, bool]:
    """SET_VRING_BASE value -> ``(last_avail_idx, avail_wrap, used_idx, used_wrap)``."""
    if not 0 <= value <= 0xFFFFFFFF:
        raise ValueError(f"packed vring base {value:#x} does not fit in 32 bits")
    return value & 0x7FFF, bool(value >> 15 & 1), value >> 16 & 0x7FFF, bool(value >> 31 & 1)


class PackedLayout(NamedTuple):
    """Where the three parts of a packed ring go, and how many bytes they span in all."""

    desc_gpa: int
    driver_event_gpa: int
    device_event_gpa: int
    size_bytes: int


def packed_layout(size: int, base_gpa: int) -> PackedLayout:
    """Place a packed ring at ``base_gpa`` (16-aligned): ring, then driver and device areas."""
    if not 1 <= size <= MAX_QUEUE_SIZE:
        raise ValueError(f"packed queue size {size} out of range (1..{MAX_QUEUE_SIZE})")
    if base_gpa % 16:
        raise ValueError(f"descriptor ring at {base_gpa:#x} must be 16-byte aligned")
    driver = base_gpa + DESC_SIZE * size
    return PackedLayout(base_gpa, driver, driver + EVENT_SIZE, DESC_SIZE * size + 2 * EVENT_SIZE)


def _ring_view(mem: GuestMemory, what: str, gpa: int, length: int, align: int) -> memoryview:
    if gpa % align:
        raise ValueError(f"{what} at {gpa:#x} is not {align}-byte aligned")
    try:
        return mem.view(gpa, length)
    except GuestMemoryError as exc:
        raise GuestMemoryError(
            f"{what} ({length:#x} bytes at {gpa:#x}) must lie within one memory region: {exc}",
            address=gpa,
            length=length,
        ) from exc


def _advance(pos: int, wrap: bool, count: int, size: int) -> tuple[int, bool]:
    pos += count
    while pos >= size:
        pos -= size
        wrap = not wrap
    return pos, wrap


class PackedQueue:
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
        if not 1 <= size <= MAX_QUEUE_SIZE:
            raise ValueError(f"packed queue size {size} out of range (1..{MAX_QUEUE_SIZE})")
        for name, value in (("last_avail_idx", last_avail_idx), ("used_idx", used_idx)):
            if not 0 <= value < size:
                raise ValueError(f"{name} {value} out of range (queue size {size})")
        self.size = size
        self.queue_index = queue_index
        self.event_idx = event_idx
        self.indirect = indirect
        self._mem = mem
        self._max_chain = size if max_chain_len is None else min(size, max_chain_len)
        if self._max_chain < 1:
            raise ValueError(f"max_chain_len {max_chain_len} must be at least 1")
        self._max_indirect = min(
            MAX_INDIRECT_DESCRIPTORS, max_chain_len or MAX_INDIRECT_DESCRIPTORS
        )
        self._ring = _ring_view(mem, "descriptor ring", desc_gpa, DESC_SIZE * size, 16)
        self._ring16 = self._ring.cast("H")
        self._driver_event = _ring_view(mem, "driver area", driver_event_gpa, EVENT_SIZE, 4)
        self._driver_event32 = self._driver_event.cast("I")
        device_event = _ring_view(mem, "device area", device_event_gpa, EVENT_SIZE, 4)
        self._device_event16 = device_event.cast("H")
        self._device_event32 = device_event.cast("I")
        self._device_event_gpa = device_event_gpa
        self._avail = last_avail_idx
        self._avail_wrap = bool(avail_wrap)
        self._used = used_idx
        self._used_wrap = bool(used_wrap)
        self._log_used = log_used
        self._desc_gpa = desc_gpa
        self._inflight = inflight
        # buffer id -> (ring descriptors it occupies, writable (gpa, len) pieces)
        self._outstanding: dict[int, tuple[int, list[tuple[int, int]]]] = {}
        self._notify_enabled = True
        self._used_since_signal = 0
        self._signalled_valid = False
        self._broken: str | None = None
        self._recover_pending = inflight is not None and inflight.begin(used_idx, bool(used_wrap))

    def close(self) -> None:
        """Release the ring views so the memory can be unmapped now (the queue is unusable)."""
        self._broken = self._broken or "queue closed"
        for view in (
            self._ring16,
            self._ring,
            self._driver_event32,
            self._driver_event,
            self._device_event16,
            self._device_event32,
        ):
            view.release()

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

    @property
    def broken(self) -> str | None:
        """Why the queue stopped (the driver broke the rules), or None."""
        return self._broken

    def get_base(self) -> int:
        """GET_VRING_BASE: both positions and wrap counters (see :func:`encode_packed_base`)."""
        return encode_packed_base(self._avail, self._avail_wrap, self._used, self._used_wrap)

    def _fail(self, reason: str) -> VirtqueueError:
        self._broken = reason
        return VirtqueueError(reason, queue=self.queue_index)

    def _check_broken(self) -> None:
        if self._broken is not None:
            raise VirtqueueError(f"queue is broken: {self._broken}", queue=self.queue_index)

    # -- pop ------------------------------------------------------------------------------------

    def has_available(self) -> bool:
        """Whether the driver made the descriptor at :attr:`last_avail_idx` available."""
        self._check_broken()
        flags = self._ring16[(self._avail << 3) + _FLAGS]
        return (flags & _BOTH) == (DESC_F_AVAIL if self._avail_wrap else DESC_F_USED)

    def pop(self) -> DescriptorChain | None:
        """The next available chain, or None."""
        self._check_broken()
        pos = self._avail
        wrap = self._avail_wrap
        expect = DESC_F_AVAIL if wrap else DESC_F_USED
        if (self._ring16[(pos << 3) + _FLAGS] & _BOTH) != expect:
            return None
        if RW_BARRIERS_NEEDED:
            read_barrier()  # the descriptor body only after its flags said "available"
        ring = self._ring
        size = self.size
        unpack = _DESC.unpack_from
        desc = unpack(ring, pos << 4)
        if not desc[3] & (DESC_F_NEXT | DESC_F_INDIRECT):
            descs = [desc]
            pos += 1
            if pos == size:
                pos = 0
                wrap = not wrap
        else:
            descs = []
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
                    break
                if len(descs) >= self._max_chain:
                    raise self._fail(
                        f"chain at ring position {self._avail} is longer than the limit of "
                        f"{self._max_chain} descriptors (queue size {size})"
                    )
                desc = unpack(ring, pos << 4)
                if (desc[3] & _BOTH) != expect:
                    raise self._fail(
                        f"chain at ring position {self._avail}: descriptor {pos} follows a NEXT "
                        "flag but is not marked available"
                    )
        chain, writable_gpas = self._build(descs, f"chain at ring position {self._avail}")
        buf_id = chain.head
        if buf_id in self._outstanding:
            raise self._fail(
                f"chain at ring position {self._avail}: buffer id {buf_id} is already in flight"
            )
        if self._inflight is not None:
            self._inflight.on_pop(descs, self._used, self._used_wrap)
        self._outstanding[buf_id] = (len(descs), writable_gpas)
        self._avail = pos
        self._avail_wrap = wrap
        if self.event_idx and self._notify_enabled:
            self._set_device_event(pos | wrap << EVENT_WRAP_SHIFT, RING_EVENT_FLAGS_DESC)
        return chain

    def pop_batch(self, max_n: int) -> list[DescriptorChain]:
        """Up to ``max_n`` available chains.

        One-descriptor chains inside a one-region memory are built inline (a bare instance, the
        shared :data:`EMPTY` list for the absent side), as the split ring does; any other shape
        goes through :meth:`pop`, which validates it in full.

        Chains taken before a malformed one are returned (they are in flight and must be
        completed); the queue is then broken and the next pop raises the error.
        """
        self._check_broken()
        out: list[DescriptorChain] = []
        starts, sizes, views = self._mem.fast_table()
        if len(starts) != 1:
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
        base, extent, view = starts[0], sizes[0], views[0]
        ring = self._ring
        ring16 = self._ring16
        unpack = _DESC.unpack_from
        outstanding = self._outstanding
        inflight = self._inflight
        size = self.size
        new = _new
        cls = DescriptorChain
        empty = EMPTY
        append = out.append
        pos = self._avail
        wrap = self._avail_wrap
        taken = 0
        try:
            while len(out) < max_n:
                first = ring16[(pos << 3) + _FLAGS]
                if (first & _BOTH) != (DESC_F_AVAIL if wrap else DESC_F_USED):
                    break
                simple = not first & (DESC_F_NEXT | DESC_F_INDIRECT)
                if simple:  # one descriptor: read it; a longer chain is left to pop()
                    if RW_BARRIERS_NEEDED:
                        read_barrier()
                    desc = unpack(ring, pos << 4)
                    addr, length, buf_id, flags = desc
                    off = addr - base
                    simple = (
                        not flags & (DESC_F_NEXT | DESC_F_INDIRECT)
                        and length > 0
                        and off >= 0
                        and off + length <= extent
                        and buf_id < size
                        and buf_id not in outstanding
                    )
                if not simple:
                    self._avail, self._avail_wrap = pos, wrap
                    chain = self.pop()  # the full checks, and the precise error if there is one
                    if chain is None:  # pragma: no cover - the flags said available just now
                        break
                    append(chain)
                    pos, wrap = self._avail, self._avail_wrap
                    continue
                c = new(cls)
                c.head = buf_id
                if flags & DESC_F_WRITE:
                    gpas = [(addr, length)]
                    c.readable = empty
                    c.writable = [view[off : off + length]]
                    c.read_len = 0
                    c.write_len = length
                else:
                    gpas = empty
                    c.readable = [view[off : off + length]]
                    c.writable = empty
                    c.read_len = length
                    c.write_len = 0
                c.writable_gpas = gpas
                c.desc_count = 1
                if inflight is not None:
                    inflight.on_pop([desc], self._used, self._used_wrap)
                outstanding[buf_id] = (1, gpas)
                append(c)
                taken += 1
                pos += 1
                if pos == size:
                    pos = 0
                    wrap = not wrap
        except (VirtqueueError, GuestMemoryError):
            if not out:
                raise
        finally:
            self._avail, self._avail_wrap = pos, wrap
        if taken and self.event_idx and self._notify_enabled:
            self._set_device_event(pos | wrap << EVENT_WRAP_SHIFT, RING_EVENT_FLAGS_DESC)
        return out

    def resubmit(self, descriptors: Sequence[tuple[int, int, int, int]]) -> DescriptorChain:
        """Rebuild a chain from saved ring descriptors ``(addr, len, id, flags)``, now in flight.

        For inflight recovery: the ring slots may have been reused since, but the descriptors
        (and an indirect table they name, which the driver keeps until the buffer is used)
        still describe the buffer.
        """
        self._check_broken()
        if not descriptors:
            raise self._fail("resubmitted chain has no descriptors")
        chain, writable_gpas = self._build(list(descriptors), "resubmitted chain")
        if chain.head in self._outstanding:
            raise self._fail(f"resubmitted chain: buffer id {chain.head} is already in flight")
        self._outstanding[chain.head] = (len(descriptors), writable_gpas)
        return chain

    def resume_inflight(self) -> list[DescriptorChain]:
        """At start: chains to redo first if the inflight region holds a previous back-end's.

        Only once per region, and only for a region that was in use (version 1): then the ring
        position always comes from the region (after a crash no index in guest memory tells it,
        as DPDK does). A fresh region was initialised at this queue's position when it was built.
        """
        if not self._recover_pending:
            return []
        self._recover_pending = False
        return self.recover_inflight()

    def recover_inflight(self) -> list[DescriptorChain]:
        """After a reconnect: run the inflight recovery and return the chains to redo, in pop order.

        Needs ``inflight`` to be a :class:`~pyvhost.virtio.inflight.PackedInflightQueue` over the
        adopted region. The used position and wrap counter are taken from the region, the avail
        position placed past the descriptors still in flight (the constructor's are overridden).
        """
        tracker = self._inflight
        if not isinstance(tracker, PackedInflightQueue):
            raise TypeError("recover_inflight needs a PackedInflightQueue as the queue's inflight")
        if self._outstanding:
            raise ValueError(f"queue {self.queue_index}: recover_inflight with chains in flight")
        ring16 = self._ring16
        entries = tracker.recover(lambda i: ring16[(i << 3) + _FLAGS])
        self._used, self._used_wrap = tracker.used_idx, tracker.used_wrap
        held = sum(len(e.descriptors) for e in entries)
        self._avail, self._avail_wrap = _advance(self._used, self._used_wrap, held, self.size)
        self._signalled_valid = False
        return [self.resubmit(e.descriptors) for e in entries]

    def _build(
        self, descs: list[tuple[int, int, int, int]], where: str
    ) -> tuple[DescriptorChain, list[tuple[int, int]]]:
        """Validate the ring descriptors of one chain and map its buffers."""
        size = self.size
        buf_id = descs[-1][2]
        if buf_id >= size:
            raise self._fail(f"{where}: buffer id {buf_id} >= queue size {size}")
        starts, sizes, views = self._mem.fast_table()
        addr, length, _, flags = descs[0]
        # Fast path: one direct descriptor in one region, the usual shape of small requests.
        if len(descs) == 1 and not flags & DESC_F_INDIRECT and length:
            r = bisect_right(starts, addr) - 1
            if r >= 0:
                off = addr - starts[r]
                if off + length <= sizes[r]:
                    piece = views[r][off : off + length]
                    if flags & DESC_F_WRITE:
                        gpas = [(addr, length)]
                        return DescriptorChain(buf_id, [], [piece], 0, length, gpas, 1), gpas
                    return DescriptorChain(buf_id, [piece], [], length, 0, [], 1), []
        elements: Sequence[tuple[int, int, int, int]] = descs
        what = "descriptor"
        if flags & DESC_F_INDIRECT:
            if len(descs) > 1:
                raise self._fail(f"{where}: descriptor 0 has INDIRECT and is followed by NEXT")
            elements = self._read_indirect(where, addr, length, flags)
            what = "indirect descriptor"
        readable: list[memoryview] = []
        writable: list[memoryview] = []
        writable_gpas: list[tuple[int, int]] = []
        read_len = write_len = 0
        seen_write = False
        one_region = len(starts) == 1
        base, extent = (starts[0], sizes[0]) if one_region else (0, 0)
        for k, (addr, length, _, flags) in enumerate(elements):
            if flags & DESC_F_INDIRECT:
                if what == "descriptor":
                    raise self._fail(f"{where}: descriptor {k} inside a NEXT chain has INDIRECT")
                raise self._fail(f"{where}: {what} {k}: INDIRECT inside an indirect table")
            if flags & DESC_F_WRITE:
                seen_write = True
            elif seen_write:
                raise self._fail(
                    f"{where}: {what} {k} is device-readable but follows a device-writable one"
                )
            if not length:
                continue
            if one_region:  # the usual case: no bisect, no one-item list per descriptor
                off = addr - base
                if off >= 0 and off + length <= extent:
                    if flags & DESC_F_WRITE:
                        writable.append(views[0][off : off + length])
                        writable_gpas.append((addr, length))
                        write_len += length
                    else:
                        readable.append(views[0][off : off + length])
                        read_len += length
                    continue
            r = bisect_right(starts, addr) - 1
            off = addr - starts[r] if r >= 0 else -1
            if r >= 0 and off + length <= sizes[r]:
                mapped = [views[r][off : off + length]]
            else:
                try:
                    mapped = self._mem.translate(addr, length)
                except GuestMemoryError as exc:
                    raise self._fail(
                        f"{where}: {what} {k} buffer {addr:#x}+{length:#x}: {exc}"
                    ) from exc
            if flags & DESC_F_WRITE:
                writable.extend(mapped)
                writable_gpas.append((addr, length))
                write_len += length
            else:
                readable.extend(mapped)
                read_len += length
        if read_len + write_len > _U32_LIMIT:
            raise self._fail(f"{where}: {read_len + write_len} bytes long, more than 2^32")
        chain = DescriptorChain(
            buf_id, readable, writable, read_len, write_len, writable_gpas, len(descs)
        )
        return chain, writable_gpas

    def _read_indirect(
        self, where: str, addr: int, length: int, flags: int
    ) -> list[tuple[int, int, int, int]]:
        if not self.indirect:
            raise self._fail(
                f"{where}: INDIRECT flag but VIRTIO_F_INDIRECT_DESC was not negotiated"
            )
        if flags & DESC_F_NEXT:
            raise self._fail(f"{where}: INDIRECT together with NEXT")
        if length == 0 or length % DESC_SIZE:
            raise self._fail(
                f"{where}: indirect table length {length} is not a positive multiple of 16"
            )
        entries = length // DESC_SIZE
        if entries > self._max_indirect:
            raise self._fail(
                f"{where}: indirect table has {entries} descriptors, more than the limit of "
                f"{self._max_indirect}"
            )
        try:
            table = self._mem.read(addr, length)
        except GuestMemoryError as exc:
            raise self._fail(f"{where}: indirect table: {exc}") from exc
        return list(_DESC.iter_unpack(table))

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
            if not 0 <= written < _U32_LIMIT:
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
            or not 0 <= written < _U32_LIMIT
        ):
            self.push_batch(((head, written),))
            return
        del self._outstanding[head]
        count, pieces = entry
        if written and self._mem.logging:
            self._mem.log_pieces(pieces, written)
        used = self._used
        wrap = self._used_wrap
        _USED_BODY.pack_into(self._ring, (used << 4) + 8, written, head)
        if RW_BARRIERS_NEEDED:
            write_barrier()
        self._ring16[(used << 3) + _FLAGS] = (_BOTH if wrap else 0) | (
            DESC_F_WRITE if written else 0
        )
        used += count
        if used >= self.size:
            used -= self.size
            self._used_wrap = not wrap
        self._used = used
        self._used_since_signal += count

    def push_batch(self, items: Sequence[tuple[int, int]]) -> None:
        """Mark several ``(head, written)`` used; the first entry's flags are stored last.

        Every entry is validated before any is written, so a bad one leaves the ring untouched.
        """
        if not items:
            return
        self._check_items(items)
        outstanding = self._outstanding
        mem = self._mem
        counts = []
        for head, written in items:
            count, pieces = outstanding.pop(head)
            counts.append(count)
            if written and mem.logging:
                mem.log_pieces(pieces, written)
        size = self.size
        inflight = self._inflight
        if inflight is not None:
            end, end_wrap = _advance(self._used, self._used_wrap, sum(counts), size)
            inflight.before_publish([h for h, _ in items], end, end_wrap)
        ring = self._ring
        ring16 = self._ring16
        pack = _USED_BODY.pack_into
        used, wrap = self._used, self._used_wrap
        first = used
        first_flags = 0
        logged: list[int] = []
        for k, ((head, written), count) in enumerate(zip(items, counts, strict=True)):
            pack(ring, (used << 4) + 8, written, head)
            flags = (_BOTH if wrap else 0) | (DESC_F_WRITE if written else 0)
            if k:
                ring16[(used << 3) + _FLAGS] = flags
            else:
                first_flags = flags
            if self._log_used:
                logged.append(used)
            used += count
            if used >= size:
                used -= size
                wrap = not wrap
        if RW_BARRIERS_NEEDED:
            write_barrier()  # every entry of the batch is complete before the first is handed over
        ring16[(first << 3) + _FLAGS] = first_flags
        self._used, self._used_wrap = used, wrap
        self._used_since_signal += sum(counts)
        if inflight is not None:
            inflight.after_publish()
        if logged and self._mem.logging:
            for pos in logged:
                self._mem.log_write(self._desc_gpa + (pos << 4), DESC_SIZE)

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
        return _event_crossed(event & 0xFFFF, self.size, self._used_wrap, self._used, count)

    def _set_device_event(self, off_wrap: int, flags: int) -> None:
        self._device_event32[0] = off_wrap | flags << 16
        if self._log_used:
            self._mem.log_write(self._device_event_gpa, EVENT_SIZE)

    def disable_notifications(self) -> None:
        """Ask the driver not to kick (device area flags DISABLE)."""
        self._notify_enabled = False
        self._device_event16[1] = RING_EVENT_FLAGS_DISABLE
        if self._log_used:
            self._mem.log_write(self._device_event_gpa + 2, 2)

    def enable_notifications(self) -> bool:
        """Ask the driver to kick again; True if a chain is available (process it first).

        With EVENT_IDX: a kick for the descriptor at :attr:`last_avail_idx` (flags DESC),
        which :meth:`pop` keeps moving forward while notifications are enabled.
        """
        self._check_broken()
        self._notify_enabled = True
        if self.event_idx:
            off_wrap = self._avail | self._avail_wrap << EVENT_WRAP_SHIFT
            self._set_device_event(off_wrap, RING_EVENT_FLAGS_DESC)
        else:
            self._device_event16[1] = RING_EVENT_FLAGS_ENABLE
            if self._log_used:
                self._mem.log_write(self._device_event_gpa + 2, 2)
        full_barrier()  # the driver sees kicks enabled before we look at the ring again
        return self.has_available()


class PackedDriver:
    """Driver side of a packed ring: what a guest does, so back-ends can be exercised without a VM.

    Initialises the ring and both event areas to zero like a freshly reset queue. The device side
    is untrusted here too: a used descriptor naming a buffer not in flight raises VirtqueueError.
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
        queue_index: int = 0,
    ) -> None:
        if not 1 <= size <= MAX_QUEUE_SIZE:
            raise ValueError(f"packed queue size {size} out of range (1..{MAX_QUEUE_SIZE})")
        self.size = size
        self.event_idx = event_idx
        self.queue_index = queue_index
        self._mem = mem
        self._ring = _ring_view(mem, "descriptor ring", desc_gpa, DESC_SIZE * size, 16)
        self._ring16 = self._ring.cast("H")
        driver_event = _ring_view(mem, "driver area", driver_event_gpa, EVENT_SIZE, 4)
        self._driver_event16 = driver_event.cast("H")
        self._driver_event32 = driver_event.cast("I")
        self._device_event32 = _ring_view(mem, "device area", device_event_gpa, EVENT_SIZE, 4).cast(
            "I"
        )
        self._ring[:] = bytes(DESC_SIZE * size)
        self._driver_event32[0] = 0
        self._device_event32[0] = 0
        self._next_avail = 0
        self._avail_wrap = True
        self._next_used = 0
        self._used_wrap = True
        self._free_ids = list(range(size - 1, -1, -1))
        self._id_count: dict[int, int] = {}
        self.num_free = size
        self._held: list[tuple[int, int]] = []  # (ring position, flags) of unpublished heads
        self._held_count = 0
        self._num_added = 0
        self._interrupts = True

    def close(self) -> None:
        """Release the ring views so the memory can be unmapped now (the driver is unusable)."""
        for view in (
            self._ring16,
            self._ring,
            self._driver_event16,
            self._driver_event32,
            self._device_event32,
        ):
            view.release()

    @property
    def next_avail(self) -> int:
        """Ring position where the next added descriptor goes."""
        return self._next_avail

    @property
    def next_used(self) -> int:
        """Ring position of the next used descriptor to collect."""
        return self._next_used

    def add(
        self,
        readable: Sequence[tuple[int, int]],
        writable: Sequence[tuple[int, int]],
        *,
        indirect_gpa: int | None = None,
    ) -> int:
        """Place a buffer of ``(gpa, len)`` elements; return its id. Visible after :meth:`publish`.

        With ``indirect_gpa`` the elements go to an indirect table written there (the caller owns
        that memory, ``16 * n`` bytes) and one ring descriptor refers to it.
        """
        elements = [(a, n, 0) for a, n in readable] + [(a, n, DESC_F_WRITE) for a, n in writable]
        if not elements:
            raise ValueError("add: a buffer needs at least one element")
        if len(elements) > self.size:
            raise ValueError(f"add: {len(elements)} elements exceed the queue size {self.size}")
        if indirect_gpa is not None:
            table = b"".join(_DESC.pack(a, n, 0, f) for a, n, f in elements)
            ring_elements = [(indirect_gpa, len(table), DESC_F_INDIRECT)]
        else:
            ring_elements = elements
        count = len(ring_elements)
        if count > self.num_free:
            raise VirtqueueError(
                f"add: buffer needs {count} descriptors, only {self.num_free} free",
                queue=self.queue_index,
            )
        if indirect_gpa is not None:
            self._mem.write(indirect_gpa, table)
        buf_id = self._free_ids.pop()
        ring = self._ring
        head_pos = self._next_avail
        head_flags = 0
        pos, wrap = head_pos, self._avail_wrap
        for k, (addr, length, kind) in enumerate(ring_elements):
            flags = kind | (DESC_F_AVAIL if wrap else DESC_F_USED)
            if k < count - 1:
                flags |= DESC_F_NEXT
            if k == 0:
                _DESC_BODY.pack_into(ring, pos << 4, addr, length, buf_id)
                head_flags = flags
            else:
                _DESC.pack_into(ring, pos << 4, addr, length, buf_id, flags)
            pos += 1
            if pos == self.size:
                pos = 0
                wrap = not wrap
        self._next_avail, self._avail_wrap = pos, wrap
        self._held.append((head_pos, head_flags))
        self._held_count += count
        self._id_count[buf_id] = count
        self.num_free -= count
        return buf_id

    def publish(self) -> None:
        """Hand every added buffer to the device: write barrier, then the head flags (last first)"""
        if RW_BARRIERS_NEEDED:
            write_barrier()
        ring16 = self._ring16
        for pos, flags in reversed(self._held):
            ring16[(pos << 3) + _FLAGS] = flags
        self._held.clear()
        self._num_added += self._held_count
        self._held_count = 0

    def should_kick(self) -> bool:
        """After :meth:`publish`: whether the device area asks for a notification."""
        added, self._num_added = self._num_added, 0
        if added == 0:
            return False
        full_barrier()
        event = self._device_event32[0]
        flags = event >> 16
        if flags != RING_EVENT_FLAGS_DESC or not self.event_idx:
            return flags != RING_EVENT_FLAGS_DISABLE
        return _event_crossed(event & 0xFFFF, self.size, self._avail_wrap, self._next_avail, added)

    def has_used(self) -> bool:
        """Whether the device marked the descriptor at :attr:`next_used` used."""
        flags = self._ring16[(self._next_used << 3) + _FLAGS]
        return (flags & _BOTH) == (_BOTH if self._used_wrap else 0)

    def get_used(self) -> list[tuple[int, int]]:
        """Collect ``(id, written_len)`` of every used buffer, in the device's order."""
        out: list[tuple[int, int]] = []
        ring = self._ring
        while self.has_used():
            if RW_BARRIERS_NEEDED:
                read_barrier()
            _, length, buf_id, flags = _DESC.unpack_from(ring, self._next_used << 4)
            count = self._id_count.pop(buf_id, None)
            if count is None:
                raise VirtqueueError(
                    f"used descriptor {self._next_used}: id {buf_id} is not a buffer in flight",
                    queue=self.queue_index,
                )
            out.append((buf_id, length if flags & DESC_F_WRITE else 0))
            self._next_used, self._used_wrap = _advance(
                self._next_used, self._used_wrap, count, self.size
            )
            self._free_ids.append(buf_id)
            self.num_free += count
        if out and self.event_idx and self._interrupts:
            self._set_interrupt_event()
        return out

    def _set_interrupt_event(self) -> None:
        off_wrap = self._next_used | self._used_wrap << EVENT_WRAP_SHIFT
        self._driver_event32[0] = off_wrap | RING_EVENT_FLAGS_DESC << 16

    def enable_interrupts(self) -> bool:
        """Ask for used-buffer notifications; True if used buffers are already waiting.

        With EVENT_IDX: for the descriptor at :attr:`next_used` (flags DESC), moved forward by
        :meth:`get_used` while interrupts are enabled.
        """
        self._interrupts = True
        if self.event_idx:
            self._set_interrupt_event()
        else:
            self._driver_event16[1] = RING_EVENT_FLAGS_ENABLE
        full_barrier()
        return self.has_used()

    def disable_interrupts(self) -> None:
        """Tell the device notifications are not needed (driver area flags DISABLE)."""
        self._interrupts = False
        self._driver_event16[1] = RING_EVENT_FLAGS_DISABLE
