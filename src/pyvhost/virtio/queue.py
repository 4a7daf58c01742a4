"""The device-side virtqueue interface that the split and packed layouts both implement.

A back-end worker drives a queue like this (the re-check after enabling closes the race where the
driver adds a buffer just before notifications are turned back on)::

    while True:
        queue.disable_notifications()
        while (chains := queue.pop_batch(64)):
            queue.push_batch([(c.head, handle(c)) for c in chains])
            if queue.needs_notification():
                call_eventfd.write(1)
        if not queue.enable_notifications():
            break           # nothing new: sleep until the next kick
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

from pyvhost.virtio.chain import DescriptorChain
from pyvhost.virtio.ring import RingAddresses

__all__ = ["DeviceQueue", "SplitInflightHooks"]


@runtime_checkable
class DeviceQueue(Protocol):
    """What a device needs from a virtqueue, whatever its ring layout."""

    @property
    def size(self) -> int:
        """Number of descriptors (queue size)."""
        ...

    @property
    def areas(self) -> RingAddresses:
        """The ring's areas in guest memory, and whether device-area writes are logged."""
        ...

    def pop(self) -> DescriptorChain | None:
        """The next available chain, or None if the driver has made none available."""
        ...

    def pop_batch(self, max_n: int) -> list[DescriptorChain]:
        """Up to ``max_n`` available chains (possibly none)."""
        ...

    def push(self, head: int, written: int) -> None:
        """Return one chain to the driver, saying how many bytes the device wrote into it."""
        ...

    def push_batch(self, items: Sequence[tuple[int, int]]) -> None:
        """Return several ``(head, written)`` chains, published to the driver at once."""
        ...

    def needs_notification(self) -> bool:
        """After pushes: whether the driver wants a used-buffer notification (call eventfd)."""
        ...

    def enable_notifications(self) -> bool:
        """Ask the driver to kick again; return True if work arrived meanwhile (keep going)."""
        ...

    def disable_notifications(self) -> None:
        """Tell the driver kicks are not needed while the device is polling."""
        ...

    def unpop(self, chains: Sequence[DescriptorChain]) -> bool:
        """Give back ``chains``, the last ones popped (none pushed, in pop order); wait for more.

        The next pops return them again, and the driver is asked to kick once it makes an entry
        available past them; True if it already has (pop again now). For a device that took
        buffers it cannot fill yet: a packet that needs more receive buffers than there are.
        """
        ...

    def get_base(self) -> int:
        """The ring state to return for GET_VRING_BASE (split: last_avail_idx)."""
        ...

    def has_available(self) -> bool:
        """Whether at least one chain is available to pop."""
        ...

    @property
    def in_flight(self) -> int:
        """Chains popped and not yet pushed back (a stop waits for them)."""
        ...

    def recover_inflight(self) -> list[DescriptorChain]:
        """Chains a previous back-end left in flight, to redo first when the queue starts.

        Each layout reads its own inflight format and repositions itself; once per region, and
        empty without an inflight region that holds a previous back-end's state.
        """
        ...


class SplitInflightHooks(Protocol):
    """Inflight-I/O tracking for a split queue (vhost-user ``inflight`` section ordering).

    The queue calls ``on_pop`` for each chain it hands out, ``before_publish`` with the heads of a
    batch before storing used.idx (link the batch so a crash in between can be replayed), and
    ``after_publish`` after the store (clear those entries and record the new used_idx).
    """

    def begin(self, used_idx: int) -> bool:
        """The queue starts with this used.idx; True if a previous back-end's state is to be
        recovered (a fresh region is initialised instead)."""
        ...

    def on_pop(self, head: int) -> None:
        """Mark descriptor ``head`` inflight."""
        ...

    def before_publish(self, heads: Sequence[int]) -> None:
        """Record the batch about to be published in the used ring."""
        ...

    def after_publish(self, heads: Sequence[int], used_idx: int) -> None:
        """The batch is visible in the used ring with used.idx == ``used_idx``: clear it."""
        ...

    def recover(self, used_ring_idx: int) -> list[int]:
        """After a reconnect: the heads still inflight, in the order they were popped."""
        ...
