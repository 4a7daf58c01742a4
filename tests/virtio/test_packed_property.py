"""Property test: PackedDriver and PackedQueue agree byte for byte over a memfd-backed memory.

Random chain shapes (direct and indirect), EVENT_IDX on or off, out-of-order completion and small
rings that wrap many times. The device runs only when kicked and completes held chains later (as
asynchronous I/O would); the driver collects used buffers only when interrupted. A wrong
suppression decision therefore strands a buffer and fails the final check.
"""

from __future__ import annotations

import gc
import random
from dataclasses import dataclass, field

from hypothesis import given, settings
from hypothesis import strategies as st

from pyvhost.virtio.chain import DescriptorChain
from pyvhost.virtio.memory import GuestMemory
from pyvhost.virtio.packed import PackedDriver, PackedQueue, packed_layout

MiB = 1 << 20
WINDOW_START = 64 * 1024
WINDOW_END = 2 * MiB


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
    drv: PackedDriver
    dev: PackedQueue
    rng: random.Random
    alloc_at: int = WINDOW_START
    in_flight: dict[int, Request] = field(default_factory=dict)
    published: list[int] = field(default_factory=list)  # ids in the order the device must see
    held: list[DescriptorChain] = field(default_factory=list)
    pushed: list[tuple[int, int]] = field(default_factory=list)  # not yet collected
    kicked: bool = True
    irq: bool = False
    completed: int = 0

    def alloc(self, length: int, align: int = 1) -> int:
        at = (self.alloc_at + align - 1) // align * align
        if at + length > WINDOW_END:
            at = WINDOW_START
        self.alloc_at = at + length
        return at

    # -- driver ---------------------------------------------------------------------------------
    def submit(self) -> None:
        rng = self.rng
        for _ in range(rng.randint(0, 4)):
            n_read = rng.randint(0, min(3, self.drv.size))
            n_write = rng.randint(0 if n_read else 1, min(3, self.drv.size - n_read))
            readable = [(self.alloc(n), n) for n in (rng.randint(0, 40) for _ in range(n_read))]
            writable = [(self.alloc(n), n) for n in (rng.randint(0, 40) for _ in range(n_write))]
            use_indirect = rng.random() < 0.3
            if not use_indirect and n_read + n_write > self.drv.num_free:
                use_indirect = True
            if self.drv.num_free == 0:
                break
            payload = rng.randbytes(sum(n for _, n in readable))
            pos = 0
            for gpa, n in readable:
                self.mem.write(gpa, payload[pos : pos + n])
                pos += n
            for gpa, n in writable:
                self.mem.write(gpa, b"\xee" * n)
            table = self.alloc(16 * (n_read + n_write), 16) if use_indirect else None
            buf_id = self.drv.add(readable, writable, indirect_gpa=table)
            assert buf_id not in self.in_flight
            self.in_flight[buf_id] = Request(readable, writable, payload)
            self.published.append(buf_id)
        self.drv.publish()
        if self.drv.should_kick():
            self.kicked = True

    def interrupt(self) -> None:
        if not self.irq:
            return
        self.irq = False
        self.drv.disable_interrupts()
        while True:
            used = self.drv.get_used()
            assert used == self.pushed[: len(used)]
            del self.pushed[: len(used)]
            for buf_id, length in used:
                req = self.in_flight.pop(buf_id)
                assert length == req.written
                got = b"".join(self.mem.read(gpa, n) for gpa, n in req.writable)
                assert got[: req.written] == req.reply
                assert got[req.written :] == b"\xee" * (len(got) - req.written)
                self.completed += 1
            if not self.drv.enable_interrupts():
                break

    # -- device ---------------------------------------------------------------------------------
    def complete(self, chains: list[DescriptorChain]) -> None:
        if not chains:
            return
        items = []
        for chain in chains:
            req = self.in_flight[chain.head]
            req.written = self.rng.randint(0, chain.write_len)
            req.reply = self.rng.randbytes(req.written)
            assert chain.write_at(0, req.reply) == req.written
            items.append((chain.head, req.written))
        if len(items) > 1 and self.rng.random() < 0.5:
            self.dev.push_batch(items)
        else:
            for item in items:
                self.dev.push(*item)
        self.pushed.extend(items)
        if self.dev.needs_notification():
            self.irq = True

    def run_device(self) -> None:
        rng = self.rng
        if self.held and rng.random() < 0.5:  # asynchronous completions, in any order
            rng.shuffle(self.held)
            k = rng.randint(1, len(self.held))
            done, self.held = self.held[:k], self.held[k:]
            self.complete(done)
        if not self.kicked:
            return
        self.kicked = False
        while True:
            self.dev.disable_notifications()
            while chains := self.dev.pop_batch(rng.randint(1, 4)):
                for chain in chains:
                    assert chain.head == self.published.pop(0)
                    req = self.in_flight[chain.head]
                    assert chain.read_all() == req.payload
                    assert chain.write_len == sum(n for _, n in req.writable)
                now = [c for c in chains if rng.random() < 0.6]
                self.held.extend(c for c in chains if c not in now)
                rng.shuffle(now)
                self.complete(now)
            if not self.dev.enable_notifications():
                break


@settings(max_examples=120, deadline=None)
@given(
    size=st.sampled_from([1, 2, 3, 4, 7, 8, 16]),
    event_idx=st.booleans(),
    seed=st.integers(0, 2**32 - 1),
    steps=st.integers(1, 60),
)
def test_driver_and_device_agree(size: int, event_idx: bool, seed: int, steps: int) -> None:
    mem = GuestMemory.anonymous(WINDOW_END)
    lay = packed_layout(size, 0x1000)
    drv = PackedDriver(mem, size, *lay[:3], event_idx=event_idx)
    dev = PackedQueue(mem, size, *lay[:3], event_idx=event_idx)
    sim = Sim(mem, drv, dev, random.Random(seed))
    try:
        for _ in range(steps):
            sim.submit()
            sim.run_device()
            sim.interrupt()
        for _ in range(50):  # drain: no new requests, held chains complete eventually
            if not sim.in_flight:
                break
            sim.run_device()
            sim.interrupt()
        assert not sim.in_flight, f"stranded buffers {sorted(sim.in_flight)}"
        assert drv.num_free == size
        assert (dev.last_avail_idx, dev.avail_wrap) == (drv.next_avail, dev.used_wrap)
        assert dev.used_idx == drv.next_used == drv.next_avail
    finally:
        sim.held.clear()
        drv.close()
        dev.close()
        del sim
        gc.collect()
        mem.close()
