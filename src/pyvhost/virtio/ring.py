"""What the split and packed rings share: descriptor flags, ring views, a device queue's state.

Both layouts use the same 16-byte descriptor size, the same NEXT / WRITE / INDIRECT bits, the
same limits on a chain and on indirect tables, and the same rule that a queue a driver broke stays
broken: :class:`RingQueue` holds that state and the indirect-table checks for
:class:`~pyvhost.virtio.split.SplitQueue` and :class:`~pyvhost.virtio.packed.PackedQueue`. Their
slow paths map buffers with :func:`map_buffer` and gather a chain in :class:`ChainParts`.
"""

from __future__ import annotations

from bisect import bisect_right
from dataclasses import dataclass

from pyvhost.errors import GuestMemoryError, VirtqueueError
from pyvhost.virtio.chain import EMPTY, MAX_INDIRECT_DESCRIPTORS, DescriptorChain
from pyvhost.virtio.memory import GuestMemory

FastTable = tuple[list[int], list[int], list[memoryview]]
"""Region starts, sizes and views, as :meth:`GuestMemory.fast_table` gives them."""

__all__ = [
    "DESC_F_INDIRECT",
    "DESC_F_NEXT",
    "DESC_F_WRITE",
    "DESC_SIZE",
    "MAX_QUEUE_SIZE",
    "U32_LIMIT",
    "ChainParts",
    "FastTable",
    "RingAddresses",
    "RingQueue",
    "map_buffer",
    "ring_view",
    "single_chain",
]

DESC_F_NEXT = 1
DESC_F_WRITE = 2
DESC_F_INDIRECT = 4

DESC_SIZE = 16
MAX_QUEUE_SIZE = 1 << 15
U32_LIMIT = 1 << 32

_new = object.__new__


def ring_view(mem: GuestMemory, what: str, gpa: int, length: int, align: int) -> memoryview:
    """A view of one ring part, which must be aligned and lie within one memory region."""
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


def map_buffer(mem: GuestMemory, table: FastTable, addr: int, length: int) -> list[memoryview]:
    """Views of ``[addr, addr + length)``: one slice when it lies in one region, else translated
    (adjacent regions give one view each; anything else raises GuestMemoryError)."""
    starts, sizes, views = table
    r = bisect_right(starts, addr) - 1
    if r >= 0:
        off = addr - starts[r]
        if off + length <= sizes[r]:
            return [views[r][off : off + length]]
    return mem.translate(addr, length)


def single_chain(
    table: FastTable, head: int, addr: int, length: int, flags: int
) -> DescriptorChain | None:
    """The chain of one direct, non-empty descriptor that lies in one region, else None.

    The usual shape of small requests, built without a walk or ``__init__`` call; the absent
    side is :data:`EMPTY`.
    """
    starts, sizes, views = table
    r = bisect_right(starts, addr) - 1
    if r < 0 or not length:
        return None
    off = addr - starts[r]
    if off + length > sizes[r]:
        return None
    c = _new(DescriptorChain)
    c.head = head
    if flags & DESC_F_WRITE:
        c.readable = EMPTY
        c.writable = [views[r][off : off + length]]
        c.read_len = 0
        c.write_len = length
        c.writable_gpas = [(addr, length)]
    else:
        c.readable = [views[r][off : off + length]]
        c.writable = EMPTY
        c.read_len = length
        c.write_len = 0
        c.writable_gpas = EMPTY
    c.desc_count = 1
    return c


class ChainParts:
    """The buffers of a chain as a slow path walks it: views in order, lengths, writable gpas."""

    __slots__ = ("gpas", "read_len", "readable", "seen_write", "writable", "write_len")

    def __init__(self) -> None:
        self.readable: list[memoryview] = []
        self.writable: list[memoryview] = []
        self.gpas: list[tuple[int, int]] = []
        self.read_len = 0
        self.write_len = 0
        self.seen_write = False

    def add(self, views: list[memoryview], addr: int, length: int, flags: int) -> None:
        """Append one descriptor's ``views`` to the side ``flags`` says."""
        if flags & DESC_F_WRITE:
            self.writable.extend(views)
            self.gpas.append((addr, length))
            self.write_len += length
        else:
            self.readable.extend(views)
            self.read_len += length

    @property
    def total(self) -> int:
        """Bytes of the chain so far, both directions."""
        return self.read_len + self.write_len

    def chain(self, head: int, desc_count: int) -> DescriptorChain:
        """The finished chain, ``desc_count`` ring descriptors long."""
        return DescriptorChain(
            head,
            self.readable,
            self.writable,
            self.read_len,
            self.write_len,
            self.gpas,
            desc_count,
        )


@dataclass(frozen=True)
class RingAddresses:
    """Where a ring's three areas are, as guest-physical addresses (virtio 1.x names).

    Split rings: descriptor table, available ring (driver area), used ring (device area).
    Packed rings: descriptor ring, driver event suppression, device event suppression.
    ``log``: writes to the device area are logged in the dirty log (LOG_ALL).
    """

    desc: int
    driver: int
    device: int
    log: bool = False


class RingQueue:
    """State every device-side queue has whatever its layout: limits and the broken flag.

    A driver that breaks the rules breaks its queue for good: :meth:`_fail` records why, and every
    later pop raises again (:meth:`_check_broken`) instead of reading a ring in an unknown state.
    """

    def __init__(
        self,
        mem: GuestMemory,
        size: int,
        *,
        event_idx: bool,
        indirect: bool,
        queue_index: int,
        max_chain_len: int | None,
        areas: RingAddresses,
    ) -> None:
        self.size = size
        self.areas = areas
        """The ring's areas in guest memory (what a kernel data path is handed)."""
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
        self._broken: str | None = None

    @property
    def broken(self) -> str | None:
        """Why the queue stopped (the driver broke the rules), or None."""
        return self._broken

    def _release(self, *views: memoryview) -> None:
        """Close the queue: mark it unusable and release ``views`` so memory can be unmapped."""
        self._broken = self._broken or "queue closed"
        for view in views:
            view.release()

    def _fail(self, reason: str) -> VirtqueueError:
        self._broken = reason
        return VirtqueueError(reason, queue=self.queue_index)

    def _check_broken(self) -> None:
        if self._broken is not None:
            raise VirtqueueError(f"queue is broken: {self._broken}", queue=self.queue_index)

    def _indirect_table(self, where: str, addr: int, length: int, flags: int) -> memoryview | bytes:
        """The indirect table a descriptor names, after the spec's checks on it.

        ``where`` names the descriptor in errors. One view when the table lies in one region (a
        table crossing regions is joined into bytes).
        """
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
            pieces = self._mem.translate(addr, length)
        except GuestMemoryError as exc:
            raise self._fail(f"{where}: indirect table: {exc}") from exc
        return pieces[0] if len(pieces) == 1 else b"".join(pieces)
