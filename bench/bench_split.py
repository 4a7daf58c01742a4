"""Split virtqueue throughput: ``python bench/bench_split.py [seconds-per-case]``.

Device side: the ring is filled once with chains of fixed descriptors; each round the benchmark
only advances avail.idx by a ring's worth (one 16-bit store), so the time measured is the
device's pop + push and nothing of the driver. Driver side: add + publish + get_used against the
real device side in the same process (the round trip), and the driver's share derived from it by
subtracting the device-only time of the same shape.

Rates are per CPU-second of this process (``time.process_time``), so other load on the machine
slows them less; the first line calibrates the interpreter (one ``x += i`` loop iteration), to
compare runs on different machines. The "floor" line is the cost of the work every popped chain
needs whatever the ring code does: one descriptor read, one memoryview slice in a one-item list
and one DescriptorChain object; the ``pop_columns`` lines need none of them (columns of heads,
offsets and lengths, what a net transmit queue uses), with heads in table order and shuffled.
The "gc off" line repeats the batch case with the cyclic garbage collector disabled: the
chains, lists and views are container objects, so the collector runs every few hundred chains,
and that line shows what it costs.
"""

from __future__ import annotations

import gc
import random
import struct
import sys
import time
from collections.abc import Callable

from pyvhost.virtio.chain import EMPTY, DescriptorChain
from pyvhost.virtio.memory import GuestMemory
from pyvhost.virtio.split import SplitDriver, SplitQueue, split_layout

SIZE = 256
DATA = 0x100000


def make(descs_per_chain: int) -> tuple[GuestMemory, SplitDriver, SplitQueue, int]:
    mem = GuestMemory.anonymous(8 << 20)
    desc, avail, used, _ = split_layout(SIZE, 0)
    drv = SplitDriver(mem, SIZE, desc, avail, used)
    dev = SplitQueue(mem, SIZE, desc, avail, used)
    return mem, drv, dev, SIZE // descs_per_chain


def shape(k: int, descs_per_chain: int) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    base = DATA + k * 0x1000
    bufs = [(base + 0x100 * j, 64) for j in range(descs_per_chain)]
    n_read = (descs_per_chain + 1) // 2
    return bufs[:n_read], bufs[n_read:]


def run_for(seconds: float, step: Callable[[], int], repeats: int = 5) -> float:
    """Best chains/s over ``repeats`` runs of ``step`` (returns chains done) lasting ``seconds``.

    Best-of, as timeit does: on a shared machine slower runs measure the neighbours, not us.
    """
    best = 0.0
    for _ in range(repeats):
        done = 0
        start = time.process_time()
        deadline = start + seconds / repeats
        while True:
            done += step()
            now = time.process_time()
            if now >= deadline:
                break
        best = max(best, done / (now - start))
    return best


def calibrate() -> float:
    """Nanoseconds per iteration of a trivial Python loop."""
    n = 1_000_000
    best = float("inf")
    for _ in range(5):
        x = 0
        start = time.process_time()
        for i in range(n):
            x += i
        best = min(best, time.process_time() - start)
    return best / n * 1e9


def floor(seconds: float) -> float:
    """Chains/s if popping cost only what every chain needs: read, slice, list, chain object.

    The descriptor table read once per batch into address and length lists (as the ring does
    for big batches), then per chain one memoryview slice, its one-item list and a bare
    DescriptorChain filled as the ring's fast path fills it: no ring, no checks, no push.
    """
    table = memoryview(bytearray(16 * SIZE))
    for h in range(SIZE):
        struct.pack_into("<QIHH", table, h << 4, 0x1000 + 64 * h, 64, 0, 0)
    view = memoryview(bytearray(1 << 20))
    heads = list(range(SIZE))
    new = object.__new__

    def step() -> int:
        out = []
        addrs = table.cast("Q")[0::2].tolist()
        lens = table.cast("I")[2::4].tolist()
        for h in heads:
            a = addrs[h]
            n = lens[h]
            c = new(DescriptorChain)
            c.head = h
            c.readable = [view[a : a + n]]
            c.writable = EMPTY
            c.read_len = n
            c.write_len = 0
            c.writable_gpas = EMPTY
            c.desc_count = 1
            out.append(c)
        return len(out)

    return run_for(seconds, step)


def device_only(descs_per_chain: int, batch: bool, seconds: float) -> float:
    mem, drv, dev, n = make(descs_per_chain)
    for k in range(n):
        drv.add(*shape(k, descs_per_chain))
    avail_idx = dev._avail  # the bench plays driver by bumping avail.idx only
    state = [n]

    def step_batch() -> int:
        avail_idx[1] = state[0]
        state[0] = (state[0] + n) & 0xFFFF
        chains = dev.pop_batch(n)
        dev.push_batch([(c.head, 0) for c in chains])
        return len(chains)

    def step_single() -> int:
        avail_idx[1] = state[0]
        state[0] = (state[0] + n) & 0xFFFF
        pop, push = dev.pop, dev.push
        for _ in range(n):
            c = pop()
            assert c is not None
            push(c.head, 0)
        return n

    rate = run_for(seconds, step_batch if batch else step_single)
    drv.close()
    dev.close()
    mem.close()
    return rate


def device_columns(seconds: float, shuffled: bool) -> float:
    """One-descriptor readable chains through ``pop_columns`` + ``push_heads`` (no chain
    objects, no views: what a net transmit queue into a sink does with the ring). Heads in
    table order (a driver recycling descriptors in order, as DPDK's virtio does), or
    ``shuffled`` (the general gather)."""
    mem, drv, dev, n = make(1)
    for k in range(n):
        drv.add([(DATA + 0x800 * k, 64)], [])
    if shuffled:  # the driver's heads were 0..n-1 in order: make them a fixed permutation
        order = list(range(n))
        random.Random(1).shuffle(order)
        avail = dev._avail
        for slot, head in enumerate(order):
            avail[2 + slot] = head
    avail_idx = dev._avail
    state = [n]

    def step() -> int:
        avail_idx[1] = state[0]
        state[0] = (state[0] + n) & 0xFFFF
        columns = dev.pop_columns(n)
        assert columns is not None
        dev.push_heads(columns.heads)
        return len(columns)

    rate = run_for(seconds, step)
    drv.close()
    dev.close()
    mem.close()
    return rate


def round_trip(descs_per_chain: int, seconds: float) -> float:
    mem, drv, dev, n = make(descs_per_chain)
    shapes = [shape(k, descs_per_chain) for k in range(n)]

    def step() -> int:
        add = drv.add
        for readable, writable in shapes:
            add(readable, writable)
        drv.publish()
        drv.should_kick()
        chains = dev.pop_batch(n)
        dev.push_batch([(c.head, 0) for c in chains])
        dev.needs_notification()
        return len(drv.get_used())

    rate = run_for(seconds, step)
    drv.close()
    dev.close()
    mem.close()
    return rate


def main() -> None:
    seconds = float(sys.argv[1]) if len(sys.argv) > 1 else 2.0
    print(
        f"split virtqueue, queue size {SIZE}, {seconds:g} CPU-s per case, "
        f"Python {sys.version.split()[0]}; interpreter: {calibrate():.0f} ns per loop iteration"
    )
    print(f"floor (read + slice + list + chain only)  {floor(seconds):10,.0f} chains/s")
    print("1-descriptor readable chains, pop_columns+push_heads (no chain objects):")
    for shuffled in (False, True):
        rate = device_columns(seconds, shuffled)
        heads = "shuffled heads" if shuffled else "heads in order"
        print(f"  {heads:<28} {rate:10,.0f} chains/s")
    for descs in (1, 4):
        single = device_only(descs, False, seconds)
        batch = device_only(descs, True, seconds)
        gc.disable()
        try:
            batch_nogc = device_only(descs, True, seconds)
        finally:
            gc.enable()
        both = round_trip(descs, seconds)
        driver = 1 / (1 / both - 1 / batch)
        print(f"{descs}-descriptor chains:")
        print(f"  device pop+push              {single:10,.0f} chains/s")
        print(f"  device pop_batch+push_batch  {batch:10,.0f} chains/s")
        print(f"    the same with gc off       {batch_nogc:10,.0f} chains/s")
        print(f"  driver+device round trip     {both:10,.0f} chains/s")
        print(f"  driver add+publish+get_used  {driver:10,.0f} chains/s (derived)")


if __name__ == "__main__":
    main()
