"""DescriptorChain: one request taken from a virtqueue, as memoryviews into guest memory.

The same type serves split and packed rings. The views alias guest memory (zero copy): the
device reads the readable pieces and fills the writable ones, then gives ``head`` and the number
of bytes it wrote back to the queue's ``push``.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

__all__ = ["EMPTY", "MAX_INDIRECT_DESCRIPTORS", "DescriptorChain"]

MAX_INDIRECT_DESCRIPTORS = 1024
"""Most descriptors one indirect table may hold, whatever the ring size.

Linux sizes a request's scatter list from the device's ``seg_max``, not from the ring, and puts it
in an indirect table: a 128-entry ring legitimately carries tables longer than 128. libvhost-user
bounds tables only by their byte length and rust-vmm by u16; we take QEMU's own cap on the
elements of one request (``VIRTQUEUE_MAX_SIZE``, 1024), which its emulated devices already impose
on every guest, and which keeps the views one hostile chain can make us hold bounded.
"""


class _SharedEmptyList(list):  # type: ignore[type-arg]
    """An empty list that refuses to grow: the absent side of chains built on the hot path.

    Sharing one object saves two list allocations per chain and the garbage collector's work on
    them: about a third of the instructions of building a one-descriptor chain (callgrind).
    """

    __slots__ = ()

    def __init__(self) -> None:
        super().__init__()

    def _refuse(self, *args: object, **kwargs: object) -> Any:
        raise TypeError(
            "this DescriptorChain list is a shared empty list and read-only; copy it first"
        )

    append = extend = insert = pop = remove = clear = sort = reverse = _refuse
    __setitem__ = __delitem__ = __iadd__ = __imul__ = _refuse


EMPTY: list[Any] = _SharedEmptyList()
"""The shared, read-only empty list a ring may use for a chain's absent readable / writable side."""


class DescriptorChain:
    """A popped descriptor chain.

    ``head`` is the split ring's head descriptor index or the packed ring's buffer id: the value to
    give back to ``push``. ``readable`` / ``writable`` are the device-readable and device-writable
    buffers in chain order (a descriptor crossing two adjacent memory regions yields two views).
    ``writable_gpas`` holds ``(gpa, len)`` of each writable descriptor, for dirty logging.
    ``desc_count`` is the number of ring descriptors the chain consumed (an indirect table counts
    as one), which a packed ring needs to advance.

    Treat the lists as read-only: a ring may give the absent side of a chain as the shared
    :data:`EMPTY` list, which raises TypeError when changed.

    A plain class with slots rather than a dataclass: the rings build one per request, and the
    hot paths fill a bare ``object.__new__`` instance to skip ``__init__`` (see ``split.py``).
    Equality and repr are those of the dataclass it replaces.
    """

    __slots__ = (
        "desc_count",
        "head",
        "read_len",
        "readable",
        "writable",
        "writable_gpas",
        "write_len",
    )
    __match_args__ = (
        "head",
        "readable",
        "writable",
        "read_len",
        "write_len",
        "writable_gpas",
        "desc_count",
    )
    __hash__ = None  # type: ignore[assignment]  # mutable, compared by value

    head: int
    readable: list[memoryview]
    writable: list[memoryview]
    read_len: int
    write_len: int
    writable_gpas: list[tuple[int, int]]
    desc_count: int

    def __init__(  # noqa: PLR0917 (the dataclass's positional signature, kept)
        self,
        head: int,
        readable: list[memoryview] | None = None,
        writable: list[memoryview] | None = None,
        read_len: int = 0,
        write_len: int = 0,
        writable_gpas: list[tuple[int, int]] | None = None,
        desc_count: int = 1,
    ) -> None:
        self.head = head
        self.readable = [] if readable is None else readable
        self.writable = [] if writable is None else writable
        self.read_len = read_len
        self.write_len = write_len
        self.writable_gpas = [] if writable_gpas is None else writable_gpas
        self.desc_count = desc_count

    def _fields(self) -> tuple[Any, ...]:
        return (
            self.head,
            self.readable,
            self.writable,
            self.read_len,
            self.write_len,
            self.writable_gpas,
            self.desc_count,
        )

    def __eq__(self, other: object) -> bool:
        if other.__class__ is not self.__class__:
            return NotImplemented
        assert isinstance(other, DescriptorChain)
        return self._fields() == other._fields()

    def __repr__(self) -> str:
        pairs = zip(self.__match_args__, self._fields(), strict=True)
        inner = ", ".join(f"{name}={value!r}" for name, value in pairs)
        return f"{type(self).__qualname__}({inner})"

    def read_all(self) -> bytes:
        """Copy every readable byte (for tests and small headers)."""
        if len(self.readable) == 1:
            return self.readable[0].tobytes()
        return b"".join(self.readable)

    def read_at(self, offset: int, length: int) -> bytes:
        """Copy ``length`` readable bytes starting at ``offset`` (fewer if the chain is shorter)."""
        if offset < 0 or length < 0:
            raise ValueError(f"read_at: negative offset {offset} or length {length}")
        out: list[memoryview] = []
        for piece in self.readable:
            n = len(piece)
            if offset >= n:
                offset -= n
                continue
            take = min(n - offset, length)
            out.append(piece[offset : offset + take])
            length -= take
            offset = 0
            if length <= 0:
                break
        return b"".join(out)

    def readable_view_at(self, offset: int, length: int) -> memoryview:
        """``length`` readable bytes at ``offset``: zero-copy if they lie in one piece, else a copy.

        Raises ValueError if the readable part is shorter than ``offset + length``.
        """
        if offset < 0 or length < 0 or offset + length > self.read_len:
            raise ValueError(
                f"readable range {offset}+{length} is outside the chain's {self.read_len} "
                "readable bytes"
            )
        pos = offset
        for piece in self.readable:
            n = len(piece)
            if pos < n:
                if pos + length <= n:
                    return piece[pos : pos + length]
                break
            pos -= n
        return memoryview(self.read_at(offset, length))

    def write_at(self, offset: int, data: bytes | bytearray | memoryview) -> int:
        """Gather ``data`` into the writable pieces from ``offset``; return the bytes written.

        Writes as much as fits (like write(2)): the return value is less than ``len(data)`` when
        the writable part ends first.
        """
        if offset < 0:
            raise ValueError(f"write_at: negative offset {offset}")
        src = memoryview(data).cast("B")
        total = len(src)
        done = 0
        for piece in self.writable:
            if done >= total:
                break
            n = len(piece)
            if offset >= n:
                offset -= n
                continue
            take = min(n - offset, total - done)
            piece[offset : offset + take] = src[done : done + take]
            done += take
            offset = 0
        return done

    def iter_writable(self) -> Iterator[memoryview]:
        """The writable pieces in order (e.g. for ``os.preadv`` / ``socket.recvmsg_into``)."""
        return iter(self.writable)

    def iter_readable(self) -> Iterator[memoryview]:
        """The readable pieces in order (e.g. for ``os.pwritev`` / ``socket.sendmsg``)."""
        return iter(self.readable)
