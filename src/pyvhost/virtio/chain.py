"""DescriptorChain: one request taken from a virtqueue, as memoryviews into guest memory.

The same type serves split and packed rings. The views alias guest memory (zero copy): the
device reads the readable pieces and fills the writable ones, then gives ``head`` and the number
of bytes it wrote back to the queue's ``push``.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

__all__ = ["DescriptorChain"]


@dataclass(slots=True)
class DescriptorChain:
    """A popped descriptor chain.

    ``head`` is the split ring's head descriptor index or the packed ring's buffer id: the value to
    give back to ``push``. ``readable`` / ``writable`` are the device-readable and device-writable
    buffers in chain order (a descriptor crossing two adjacent memory regions yields two views).
    ``writable_gpas`` holds ``(gpa, len)`` of each writable descriptor, for dirty logging.
    ``desc_count`` is the number of ring descriptors the chain consumed (an indirect table counts
    as one), which a packed ring needs to advance.
    """

    head: int
    readable: list[memoryview] = field(default_factory=list)
    writable: list[memoryview] = field(default_factory=list)
    read_len: int = 0
    write_len: int = 0
    writable_gpas: list[tuple[int, int]] = field(default_factory=list)
    desc_count: int = 1

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
