"""The byte streams ``exercise vsock`` sends each way, and one direction's progress through them.

Each direction has its own 64 KiB block of pseudo-random bytes, repeated: a lost, repeated or
reordered piece shows at its offset. The guest-side helper of the real-guest tests makes the
same bytes (tests/guest/vsock_tool.c).
"""

from __future__ import annotations

from collections.abc import Callable

__all__ = ["BLOCK", "GUEST_TO_HOST", "HOST_TO_GUEST", "Stream", "stream"]

BLOCK = 65536
HOST_TO_GUEST = 1
GUEST_TO_HOST = 2

_BLOCKS: dict[int, bytes] = {}


def _block(direction: int) -> bytes:
    if direction not in _BLOCKS:
        x = 0x9E3779B9 * direction & 0xFFFFFFFF
        out = bytearray(BLOCK)
        for i in range(BLOCK):
            x = (x * 1103515245 + 12345) & 0x7FFFFFFF
            out[i] = x >> 16 & 0xFF
        _BLOCKS[direction] = bytes(out)
    return _BLOCKS[direction]


def stream(direction: int, offset: int, n: int) -> bytes:
    """``n`` bytes of a direction's stream from ``offset``."""
    block = _block(direction)
    start = offset % BLOCK
    reps = (start + n) // BLOCK + 1
    return (block * reps)[start : start + n]


class Stream:
    """One direction: how much was sent and how much arrived intact; a mismatch is reported
    once through ``error`` and ends the comparison."""

    def __init__(self, direction: int, total: int, name: str, error: Callable[[str], None]):
        self.direction = direction
        self.total = total
        self.name = name
        self.error = error
        self.sent = 0
        self.received = 0
        self.broken = False

    def next_chunk(self, limit: int = 16384) -> bytes:
        return stream(self.direction, self.sent, min(limit, self.total - self.sent))

    def arrived(self, data: bytes) -> None:
        if self.broken or not data:
            return
        want = stream(self.direction, self.received, len(data))
        if data != want or self.received + len(data) > self.total:
            first = next((i for i, (a, b) in enumerate(zip(data, want, strict=False)) if a != b), 0)
            self.error(
                f"{self.name}: bytes at offset {self.received + first} differ from what was sent"
            )
            self.broken = True
        self.received += len(data)

    @property
    def done(self) -> bool:
        return self.received >= self.total or self.broken
