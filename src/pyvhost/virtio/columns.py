"""ReadColumns: a run of one-descriptor, device-readable chains popped as columns, not objects.

A device that only reads its requests (a net transmit queue) pays, per chain popped through
``pop_batch``, for a :class:`~pyvhost.virtio.chain.DescriptorChain`, a one-item list and a
memoryview. :meth:`SplitQueue.pop_columns <pyvhost.virtio.split.SplitQueue.pop_columns>` hands
the common case over as columns instead: the heads, each buffer's offset and length in the one
memory region, and a view of that region, so the device slices a buffer only when it needs it.
:meth:`ReadColumns.chains` rebuilds exactly the chains ``pop_batch`` would have returned, for the
device's own slow path.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from operator import itemgetter
from typing import Any

from pyvhost.virtio.chain import EMPTY, DescriptorChain

__all__ = ["ReadColumns", "gather"]

_new = object.__new__


def gather(indices: Sequence[int]) -> Callable[[Any], tuple[int, ...]]:
    """A function returning the items of a sequence at ``indices`` as a tuple: the C loop of
    ``operator.itemgetter`` (which returns a bare item for one index, hence the special case)."""
    if len(indices) == 1:
        index = indices[0]
        return lambda seq: (seq[index],)
    getter: Callable[[Any], tuple[int, ...]] = itemgetter(*indices)
    return getter


class ReadColumns:
    """Chains popped from a ring, each one device-readable descriptor inside one memory region.

    ``heads[k]``'s buffer is ``region[offsets[k] : offsets[k] + lengths[k]]`` (every length is
    at least 1 and every buffer lies inside ``region``); ``min_len`` / ``max_len`` bound the
    lengths (``bounds``, when the caller has them already). ``region`` is a view of its own, so
    like a chain's views it keeps the memory mapped across a memory-table change until the
    columns are dropped. Treat everything as read-only.
    """

    __slots__ = ("heads", "lengths", "max_len", "min_len", "offsets", "region")

    def __init__(
        self,
        heads: list[int],
        offsets: Sequence[int],
        lengths: Sequence[int],
        region: memoryview,
        bounds: tuple[int, int] | None = None,
    ) -> None:
        self.heads = heads
        self.offsets = offsets
        self.lengths = lengths
        self.region = region
        if bounds is None:
            bounds = (min(lengths, default=0), max(lengths, default=0))
        self.min_len, self.max_len = bounds

    def __len__(self) -> int:
        return len(self.heads)

    def buffers(self) -> list[list[memoryview]]:
        """Each chain's readable pieces (one view each), as ``chain.readable`` would be."""
        region = self.region
        return [[region[o : o + n]] for o, n in zip(self.offsets, self.lengths, strict=True)]

    def chains(self) -> list[DescriptorChain]:
        """The chains ``pop_batch`` would have returned for these heads, equal field by field."""
        out: list[DescriptorChain] = []
        region = self.region
        empty = EMPTY
        for head, off, n in zip(self.heads, self.offsets, self.lengths, strict=True):
            c = _new(DescriptorChain)
            c.head = head
            c.readable = [region[off : off + n]]
            c.writable = empty
            c.read_len = n
            c.write_len = 0
            c.writable_gpas = empty
            c.desc_count = 1
            out.append(c)
        return out
