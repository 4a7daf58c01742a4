"""Driver side of the split virtqueue: what a guest does, so back-ends can run without a VM."""

from __future__ import annotations

from collections.abc import Sequence

from pyvhost.errors import VirtqueueError
from pyvhost.virtio.barrier import RW_BARRIERS_NEEDED, full_barrier, read_barrier, write_barrier
from pyvhost.virtio.memory import GuestMemory
from pyvhost.virtio.ring import ring_view
from pyvhost.virtio.split.layout import (
    DESC,
    DESC_SIZE,
    USED_ELEM,
    VRING_AVAIL_F_NO_INTERRUPT,
    VRING_DESC_F_INDIRECT,
    VRING_DESC_F_NEXT,
    VRING_DESC_F_WRITE,
    VRING_USED_F_NO_NOTIFY,
    check_size,
    vring_need_event,
)

__all__ = ["SplitDriver"]


class SplitDriver:
    """Driver side of a split ring: what a guest does, so back-ends can be exercised without a VM.

    Initialises the ring like a freshly reset queue; ``start_idx`` starts avail.idx and used.idx
    elsewhere than 0 (pair it with ``SplitQueue(last_avail_idx=start_idx)`` to test wrap-around).
    The device side is untrusted here too: a bad used element raises VirtqueueError.
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
        start_idx: int = 0,
        queue_index: int = 0,
    ) -> None:
        check_size(size)
        self.size = size
        self.event_idx = event_idx
        self.queue_index = queue_index
        self._mem = mem
        self._mask = size - 1
        self._desc = ring_view(mem, "descriptor table", desc_gpa, DESC_SIZE * size, 16)
        self._avail = ring_view(mem, "available ring", avail_gpa, 6 + 2 * size, 2).cast("H")
        used = ring_view(mem, "used ring", used_gpa, 6 + 8 * size, 4)
        self._used = used.cast("H")
        self._used_ring = used[4 : 4 + 8 * size]
        self._used_event_index = 2 + size
        self._avail_event_index = 2 + 4 * size
        start = start_idx & 0xFFFF
        self._desc[:] = bytes(len(self._desc))
        self._avail[:] = memoryview(bytes(2 * len(self._avail))).cast("H")
        self._used[:] = memoryview(bytes(2 * len(self._used))).cast("H")
        self._avail[1] = start
        self._used[1] = start
        self._avail[self._used_event_index] = start
        self._used[self._avail_event_index] = start
        self._avail_idx = start
        self._kicked_at = start
        self._last_used = start
        self._free: list[int] = list(range(size - 1, -1, -1))
        self._owned: list[list[int] | None] = [None] * size
        self._interrupts = True

    def close(self) -> None:
        """Release the ring views so the memory can be unmapped now (the driver is unusable)."""
        for view in (self._avail, self._used, self._used_ring, self._desc):
            view.release()

    @property
    def num_free(self) -> int:
        """Descriptors not currently given to the device."""
        return len(self._free)

    @property
    def avail_idx(self) -> int:
        """Free-running avail index including chains added but not yet published."""
        return self._avail_idx

    @property
    def last_used_idx(self) -> int:
        """Free-running index of the next used element to collect."""
        return self._last_used

    def add(
        self,
        readable: Sequence[tuple[int, int]],
        writable: Sequence[tuple[int, int]],
        *,
        indirect_gpa: int | None = None,
    ) -> int:
        """Place a chain of ``(gpa, len)`` buffers; return its head. Visible after publish().

        With ``indirect_gpa`` the descriptors go to an indirect table written there (the caller
        owns that memory, ``16 * n`` bytes) and one ring descriptor refers to it.
        """
        n = len(readable) + len(writable)
        if n == 0:
            raise ValueError("add: a chain needs at least one buffer")
        free = self._free
        pack = DESC.pack_into
        if indirect_gpa is not None:
            if n > self.size:
                raise ValueError(f"add: {n} buffers exceed the queue size {self.size}")
            if not free:
                raise VirtqueueError("add: no free descriptor", queue=self.queue_index)
            table = bytearray(DESC_SIZE * n)
            last_k = n - 1
            for k, (gpa, length) in enumerate((*readable, *writable)):
                flags = VRING_DESC_F_WRITE if k >= len(readable) else 0
                if k < last_k:
                    flags |= VRING_DESC_F_NEXT
                pack(table, k << 4, gpa, length, flags, k + 1 if k < last_k else 0)
            self._mem.write(indirect_gpa, table)
            head = free.pop()
            pack(self._desc, head << 4, indirect_gpa, len(table), VRING_DESC_F_INDIRECT, 0)
            owned = [head]
        else:
            if n > len(free):
                raise VirtqueueError(
                    f"add: chain needs {n} descriptors, only {len(free)} free",
                    queue=self.queue_index,
                )
            owned = [free.pop() for _ in range(n)]
            desc = self._desc
            k = 0
            last_k = n - 1
            for gpa, length in readable:
                nxt = owned[k + 1] if k < last_k else 0
                pack(desc, owned[k] << 4, gpa, length, VRING_DESC_F_NEXT if k < last_k else 0, nxt)
                k += 1
            for gpa, length in writable:
                flags = VRING_DESC_F_WRITE | (VRING_DESC_F_NEXT if k < last_k else 0)
                pack(desc, owned[k] << 4, gpa, length, flags, owned[k + 1] if k < last_k else 0)
                k += 1
            head = owned[0]
        self._owned[head] = owned
        self._avail[2 + (self._avail_idx & self._mask)] = head
        self._avail_idx = (self._avail_idx + 1) & 0xFFFF
        return head

    def publish(self) -> None:
        """Make every added chain visible: write barrier, then store avail.idx."""
        if RW_BARRIERS_NEEDED:
            write_barrier()
        self._avail[1] = self._avail_idx

    def should_kick(self) -> bool:
        """After publish(): whether the device wants a notification (avail_event / NO_NOTIFY)."""
        new = self._avail_idx
        old = self._kicked_at
        if new == old:
            return False
        full_barrier()
        self._kicked_at = new
        if self.event_idx:
            return vring_need_event(self._used[self._avail_event_index], new, old)
        return not self._used[0] & VRING_USED_F_NO_NOTIFY

    def get_used(self) -> list[tuple[int, int]]:
        """Collect ``(head, len)`` of every used element since the last call; free their descs."""
        used_idx = self._used[1]
        last = self._last_used
        pending = (used_idx - last) & 0xFFFF
        if pending == 0:
            return []
        in_flight = (self._avail_idx - last) & 0xFFFF
        if pending > in_flight:
            raise VirtqueueError(
                f"used.idx {used_idx} is {pending} entries ahead of last used {last}, but only "
                f"{in_flight} chains were made available",
                queue=self.queue_index,
            )
        if RW_BARRIERS_NEEDED:
            read_barrier()
        out: list[tuple[int, int]] = []
        unpack = USED_ELEM.unpack_from
        ring = self._used_ring
        mask = self._mask
        owned = self._owned
        free = self._free
        for _ in range(pending):
            head, length = unpack(ring, (last & mask) << 3)
            descs = owned[head] if head < len(owned) else None
            if descs is None:
                self._last_used = last
                raise VirtqueueError(
                    f"used element {last}: id {head} is not a chain the driver made available",
                    queue=self.queue_index,
                )
            owned[head] = None
            free.extend(descs)
            out.append((head, length))
            last = (last + 1) & 0xFFFF
        self._last_used = last
        if self.event_idx and self._interrupts:
            self._avail[self._used_event_index] = last
        return out

    def enable_interrupts(self) -> bool:
        """Ask for used-buffer notifications again; True if used elements are already waiting."""
        self._interrupts = True
        if self.event_idx:
            self._avail[self._used_event_index] = self._last_used
        else:
            self._avail[0] = self._avail[0] & ~VRING_AVAIL_F_NO_INTERRUPT
        full_barrier()
        return self._used[1] != self._last_used

    def disable_interrupts(self) -> None:
        """Tell the device notifications are not needed: NO_INTERRUPT, or with EVENT_IDX a
        used_event one behind the next used entry (not crossed again before the index wraps)."""
        self._interrupts = False
        if self.event_idx:
            self._avail[self._used_event_index] = (self._last_used - 1) & 0xFFFF
        else:
            self._avail[0] = self._avail[0] | VRING_AVAIL_F_NO_INTERRUPT
