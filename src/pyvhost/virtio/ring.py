"""What the split and packed rings share: descriptor flags, ring views and a device queue's state.

Both layouts use the same 16-byte descriptor size, the same NEXT / WRITE / INDIRECT bits, the
same limits on a chain and on indirect tables, and the same rule that a queue a driver broke stays
broken: :class:`RingQueue` holds that state for :class:`~pyvhost.virtio.split.SplitQueue` and
:class:`~pyvhost.virtio.packed.PackedQueue`.
"""

from __future__ import annotations

from pyvhost.errors import GuestMemoryError, VirtqueueError
from pyvhost.virtio.chain import MAX_INDIRECT_DESCRIPTORS
from pyvhost.virtio.memory import GuestMemory

__all__ = [
    "DESC_F_INDIRECT",
    "DESC_F_NEXT",
    "DESC_F_WRITE",
    "DESC_SIZE",
    "MAX_QUEUE_SIZE",
    "U32_LIMIT",
    "RingQueue",
    "ring_view",
]

DESC_F_NEXT = 1
DESC_F_WRITE = 2
DESC_F_INDIRECT = 4

DESC_SIZE = 16
MAX_QUEUE_SIZE = 1 << 15
U32_LIMIT = 1 << 32


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
    ) -> None:
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
