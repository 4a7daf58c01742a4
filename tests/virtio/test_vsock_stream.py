"""Two endpoints back to back, a guest (CID 3) and a host (CID 2), stream several MiB both ways
through 4 KiB buffers: random write and read sizes, a few packets delivered at a time, packets cut
to random ring-buffer sizes. Every byte arrives in order, no window is ever overrun, and a clean
close leaves both endpoints empty."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import pytest

from pyvhost.virtio.vsock import ConnectionState, Op, VsockConnection
from pyvhost.virtio.vsock.wire import U32_MASK

from .vsock_link import HOST_CID, Link

MiB = 1 << 20
SIZE = 3 * MiB
BUF_ALLOC = 4096
STALL_LIMIT = 1000


@dataclass
class Stream:
    """One direction's application: the bytes to write, how far it got, what the reader read."""

    writer: VsockConnection
    reader: VsockConnection
    data: bytes
    written: int = 0
    read: bytearray = field(default_factory=bytearray)

    def write(self, rng: random.Random) -> int:
        chunk = memoryview(self.data)[self.written : self.written + rng.randint(1, 12000)]
        accepted = self.writer.send(chunk) if chunk else 0
        self.written += accepted
        return accepted

    def drain(self, rng: random.Random) -> int:
        got = self.reader.receive(rng.randint(1, 7000))
        self.read += got
        return len(got)

    def check_window(self) -> None:
        outstanding = (self.writer.tx_cnt - self.reader.fwd_cnt) & U32_MASK
        assert outstanding == self.written - len(self.read)
        assert outstanding <= self.reader.buf_alloc

    @property
    def done(self) -> bool:
        return len(self.read) == len(self.data)


def step(link: Link, streams: list[Stream], rng: random.Random) -> int:
    """One round of writing, delivering and reading in random amounts; the bytes it moved."""
    moved = 0
    for stream in streams:
        moved += stream.write(rng)
    for source in (link.guest, link.host):
        link.carry(source, rng.randint(1, 8), rng.choice([None, 512, 1000, 4096]))
    for stream in streams:
        if rng.random() < 0.8:
            moved += stream.drain(rng)
        stream.check_window()
    return moved


@pytest.mark.parametrize("seed", [1, 2])
def test_several_mib_both_ways_through_4_kib_buffers(seed: int) -> None:
    rng = random.Random(seed)
    link = Link.make(buf_alloc=BUF_ALLOC)
    link.host.listen(5000)
    g = link.guest.connect(HOST_CID, 5000)
    link.settle()
    h = link.host.accept()
    assert h is not None
    streams = [Stream(g, h, rng.randbytes(SIZE)), Stream(h, g, rng.randbytes(SIZE))]

    idle = 0
    while not all(stream.done for stream in streams):
        idle = 0 if step(link, streams, rng) else idle + 1
        assert idle < STALL_LIMIT, "stalled"
        assert g.state is h.state is ConnectionState.CONNECTED, (g.reason, h.reason)
    for stream in streams:
        assert stream.read == stream.data

    g.close()
    link.settle()
    assert (g.reason, h.reason) == ("closed", "closed by the peer")
    assert link.guest.connections == link.host.connections == {}


def test_each_packet_respects_the_ring_buffer_size() -> None:
    link = Link.make(buf_alloc=BUF_ALLOC)
    link.host.listen(5000)
    g = link.guest.connect(HOST_CID, 5000)
    link.settle()
    h = link.host.accept()
    assert h is not None
    assert g.send(bytes(BUF_ALLOC)) == BUF_ALLOC
    packets = link.carry(link.guest, max_payload=1000)
    assert [(p.header.op, len(p.payload)) for p in packets] == [(Op.RW, 1000)] * 4 + [(Op.RW, 96)]
    assert h.readable == BUF_ALLOC
