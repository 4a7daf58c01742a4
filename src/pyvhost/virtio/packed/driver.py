"""Driver side of the packed virtqueue: what a guest does, so back-ends can run without a VM."""

from __future__ import annotations

from collections.abc import Sequence

from pyvhost.errors import VirtqueueError
from pyvhost.virtio.barrier import RW_BARRIERS_NEEDED, full_barrier, read_barrier, write_barrier
from pyvhost.virtio.memory import GuestMemory
from pyvhost.virtio.packed.layout import (
    BOTH,
    DESC,
    DESC_BODY,
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
    advance,
    check_size,
    event_crossed,
)
from pyvhost.virtio.ring import ring_view

__all__ = ["PackedDriver"]


class PackedDriver:
    """Driver side of a packed ring: what a guest does, so back-ends can be exercised without a VM.

    Initialises the ring and both event areas to zero like a freshly reset queue; with ``start``
    (a position and wrap counter, :attr:`position` of a driver with nothing in flight) it takes
    over a running ring there instead, its descriptors left as they are. The device side is
    untrusted here too: a used descriptor naming a buffer not in flight raises VirtqueueError.
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
        start: tuple[int, bool] | None = None,
    ) -> None:
        check_size(size)
        if start is not None and not 0 <= start[0] < size:
            raise ValueError(f"start position {start[0]} is outside a ring of {size}")
        self.size = size
        self.event_idx = event_idx
        self.queue_index = queue_index
        self._mem = mem
        self._ring = ring_view(mem, "descriptor ring", desc_gpa, DESC_SIZE * size, 16)
        self._ring16 = self._ring.cast("H")
        driver_event = ring_view(mem, "driver area", driver_event_gpa, EVENT_SIZE, 4)
        self._driver_event16 = driver_event.cast("H")
        self._driver_event32 = driver_event.cast("I")
        self._device_event32 = ring_view(mem, "device area", device_event_gpa, EVENT_SIZE, 4).cast(
            "I"
        )
        self._driver_event32[0] = 0
        if start is None:
            self._ring[:] = bytes(DESC_SIZE * size)
            self._device_event32[0] = 0
            start = (0, True)
        self._next_avail, self._avail_wrap = start
        self._next_used, self._used_wrap = start
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
    def position(self) -> tuple[int, bool]:
        """Where the next descriptor goes and the wrap counter there: a takeover's ``start``."""
        return self._next_avail, self._avail_wrap

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
            table = b"".join(DESC.pack(a, n, 0, f) for a, n, f in elements)
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
                DESC_BODY.pack_into(ring, pos << 4, addr, length, buf_id)
                head_flags = flags
            else:
                DESC.pack_into(ring, pos << 4, addr, length, buf_id, flags)
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
            ring16[(pos << 3) + FLAGS] = flags
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
        return event_crossed(event & 0xFFFF, self.size, self._avail_wrap, self._next_avail, added)

    def has_used(self) -> bool:
        """Whether the device marked the descriptor at :attr:`next_used` used."""
        flags = self._ring16[(self._next_used << 3) + FLAGS]
        return (flags & BOTH) == (BOTH if self._used_wrap else 0)

    def get_used(self) -> list[tuple[int, int]]:
        """Collect ``(id, written_len)`` of every used buffer, in the device's order."""
        out: list[tuple[int, int]] = []
        ring = self._ring
        while self.has_used():
            if RW_BARRIERS_NEEDED:
                read_barrier()
            _, length, buf_id, flags = DESC.unpack_from(ring, self._next_used << 4)
            count = self._id_count.pop(buf_id, None)
            if count is None:
                raise VirtqueueError(
                    f"used descriptor {self._next_used}: id {buf_id} is not a buffer in flight",
                    queue=self.queue_index,
                )
            out.append((buf_id, length if flags & DESC_F_WRITE else 0))
            self._next_used, self._used_wrap = advance(
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
