"""Property test: the split driver and device sides agree byte for byte, notifications included.

One process, one memfd-backed guest memory of two adjacent regions (buffers and indirect tables
may straddle the boundary). The device runs only when the driver kicks it, and the driver collects
used buffers only when the device interrupts it, so a wrong suppression decision strands a chain
and fails the final check.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from hypothesis import given, settings
from hypothesis import strategies as st

from pyvhost.virtio.chain import DescriptorChain
from pyvhost.virtio.memory import GuestMemory
from pyvhost.virtio.split import SplitDriver, SplitQueue, split_layout

MiB = 1 << 20
WINDOW_START = 256 * 1024
WINDOW_END = 4 * MiB


@dataclass
class Request:
    readable: list[tuple[int, int]]
    writable: list[tuple[int, int]]
    payload: bytes
    written: int = -1
    reply: bytes = b""


@dataclass
class Sim:
    mem: GuestMemory
    drv: SplitDriver
    dev: SplitQueue
    rng: random.Random
    alloc_at: int = WINDOW_START
    in_flight: dict[int, Request] = field(default_factory=dict)
    held: list[DescriptorChain] = field(default_factory=list)
    completed: int = 0
    submitted: int = 0

    def alloc(self, length: int, align: int = 1) -> int:
        at = (self.alloc_at + align - 1) // align * align
        if at + length > WINDOW_END:
            at = WINDOW_START
        self.alloc_at = at + length
        return at

    # -- device: runs on a kick -------------------------------------------------------------------

    def kick(self, batch: int, hold_back: bool) -> None:
        dev = self.dev
        interrupt = False
        to_push = self.held
        self.held = []
        while True:
            dev.disable_notifications()
            while chains := (dev.pop_batch(batch) if batch > 1 else _one(dev.pop())):
                for chain in chains:
                    self.serve(chain)
                to_push.extend(chains)
            if hold_back and len(to_push) > 1:
                self.held, to_push = to_push[-1:], to_push[:-1]
            self.rng.shuffle(to_push)  # complete out of order
            while to_push:
                n = self.rng.randint(1, len(to_push))
                group, to_push = to_push[:n], to_push[n:]
                items = [(c.head, self.in_flight[c.head].written) for c in group]
                if len(items) == 1 and self.rng.random() < 0.5:
                    dev.push(*items[0])
                else:
                    dev.push_batch(items)
                interrupt |= dev.needs_notification()
            if not dev.enable_notifications():
                break
        if interrupt:
            self.interrupt()

    def serve(self, chain: DescriptorChain) -> None:
        req = self.in_flight[chain.head]
        assert chain.read_all() == req.payload
        assert chain.read_len == sum(n for _, n in req.readable)
        assert chain.write_len == sum(n for _, n in req.writable)
        written = self.rng.randint(0, chain.write_len)
        req.reply = self.rng.randbytes(written)
        assert chain.write_at(0, req.reply) == written
        req.written = written

    # -- driver: runs on an interrupt -------------------------------------------------------------

    def interrupt(self) -> None:
        drv = self.drv
        while True:
            drv.disable_interrupts()
            for head, length in drv.get_used():
                req = self.in_flight.pop(head)
                assert length == req.written
                got = b"".join(self.mem.read(gpa, n) for gpa, n in req.writable)[:length]
                assert got == req.reply
                self.completed += 1
            if not drv.enable_interrupts():
                break

    def submit(self, n_read: int, n_write: int, lengths: list[int], indirect: bool) -> bool:
        needed = 1 if indirect else n_read + n_write
        if self.drv.num_free < needed:
            return False
        bufs = [(self.alloc(n), n) for n in lengths[: n_read + n_write]]
        readable, writable = bufs[:n_read], bufs[n_read:]
        payload = b""
        for gpa, n in readable:
            data = self.rng.randbytes(n)
            self.mem.write(gpa, data)
            payload += data
        table = self.alloc(16 * len(bufs), 16) if indirect else None
        head = self.drv.add(readable, writable, indirect_gpa=table)
        assert head not in self.in_flight
        self.in_flight[head] = Request(readable, writable, payload)
        self.submitted += 1
        return True


def _one(chain: DescriptorChain | None) -> list[DescriptorChain]:
    return [] if chain is None else [chain]


chain_shape = st.tuples(
    st.integers(1, 4),  # readable buffers
    st.integers(0, 4),  # writable buffers
    st.lists(st.integers(1, 300), min_size=8, max_size=8),
    st.booleans(),  # indirect
)


@settings(max_examples=80, deadline=None)
@given(
    size=st.sampled_from([4, 8, 16, 256]),
    start=st.one_of(st.just(0), st.integers(0xFFF0, 0xFFFF), st.integers(0, 0xFFFF)),
    event_idx=st.booleans(),
    seed=st.integers(0, 2**32 - 1),
    rounds=st.lists(
        st.tuples(
            st.lists(chain_shape, min_size=1, max_size=12),
            st.integers(1, 8),  # device pop batch size (1 = pop())
            st.booleans(),  # device holds one chain back until the next kick
        ),
        min_size=1,
        max_size=12,
    ),
)
def test_driver_and_device_agree(
    size: int,
    start: int,
    event_idx: bool,
    seed: int,
    rounds: list[tuple[list[tuple[int, int, list[int], bool]], int, bool]],
) -> None:
    with GuestMemory.anonymous(2 * MiB, 0) as mem:
        mem.add_anonymous(2 * MiB, 2 * MiB)  # adjacent: buffers may cross the boundary
        desc, avail, used, _ = split_layout(size, 0)
        drv = SplitDriver(mem, size, desc, avail, used, event_idx=event_idx, start_idx=start)
        dev = SplitQueue(mem, size, desc, avail, used, event_idx=event_idx, last_avail_idx=start)
        sim = Sim(mem, drv, dev, random.Random(seed))
        sim.alloc_at = 2 * MiB - sim.rng.randint(0, 3000)  # soon straddle the region boundary
        for shapes, batch, hold_back in rounds:
            added = 0
            for n_read, n_write, lengths, indirect in shapes:
                if sim.submit(n_read, n_write, lengths, indirect and n_read + n_write <= size):
                    added += 1
            drv.publish()
            kicked = drv.should_kick()
            # The device is idle with notifications enabled: new work must always kick it.
            assert kicked == (added > 0)
            if kicked:
                sim.kick(batch, hold_back)
        sim.kick(1, hold_back=False)  # a last kick flushes held-back chains
        assert sim.in_flight == {}, f"stranded chains: {sorted(sim.in_flight)}"
        assert sim.completed == sim.submitted
        assert drv.num_free == size
        assert dev.used_idx == drv.last_used_idx == (start + sim.submitted) & 0xFFFF
        assert dev.last_avail_idx == drv.avail_idx
        drv.close()
        dev.close()
