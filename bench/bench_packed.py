"""Packed virtqueue throughput: device-side pop+push and driver-side add/publish/collect, chains/s.

Run: ``python bench/bench_packed.py``. Chains of 1 and 4 descriptors, and of one indirect table
of 4. The split ring does the same work in the same run as the reference; the last column is
packed / split. Times are CPU time of this process (``time.process_time``), so other load on the
machine disturbs them less; best of 3.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable
from functools import partial

from pyvhost.virtio.memory import GuestMemory
from pyvhost.virtio.packed import PackedDriver, PackedQueue, packed_layout
from pyvhost.virtio.split import SplitDriver, SplitQueue, split_layout

SIZE = 256
RING = 0x1000
DATA = 0x100000
TABLES = 0x200000
ROUNDS = 120
BATCH = 32

Driver = PackedDriver | SplitDriver
Device = PackedQueue | SplitQueue


def make(kind: str, mem: GuestMemory) -> tuple[Driver, Device]:
    if kind == "packed":
        lay = packed_layout(SIZE, RING)[:3]
        return PackedDriver(mem, SIZE, *lay), PackedQueue(mem, SIZE, *lay)
    lay3 = split_layout(SIZE, RING)[:3]
    return SplitDriver(mem, SIZE, *lay3), SplitQueue(mem, SIZE, *lay3)


def fill(drv: Driver, descs: int | str) -> int:
    """Make as many chains of ``descs`` descriptors available as fit; return how many.

    ``"indirect"``: four descriptors in an indirect table, one ring descriptor each.
    """
    indirect = descs == "indirect"
    count = 4 if indirect else int(descs)
    n = 0
    readable = [(DATA + 512 * k, 64) for k in range(count - 1)]
    writable = [(DATA + 0x10000, 64)]
    while drv.num_free >= (1 if indirect else count):
        drv.add(readable, writable, indirect_gpa=TABLES + 0x100 * n if indirect else None)
        n += 1
    drv.publish()
    return n


def device_rate(kind: str, descs: int | str, batch: bool) -> float:
    """Chains per second for the device taking and returning chains (driver time excluded)."""
    with GuestMemory.anonymous(4 << 20) as mem:
        drv, dev = make(kind, mem)
        spent = 0.0
        done = 0
        for _ in range(ROUNDS):
            n = fill(drv, descs)
            start = time.process_time()
            if batch:
                while chains := dev.pop_batch(BATCH):
                    dev.push_batch([(c.head, 0) for c in chains])
            else:
                while (chain := dev.pop()) is not None:
                    dev.push(chain.head, 0)
            dev.needs_notification()
            spent += time.process_time() - start
            done += n
            drv.get_used()
        dev.close()
        drv.close()
        gc.collect()
    return done / spent


def driver_rate(kind: str, descs: int | str) -> float:
    """Chains per second for the driver adding, publishing and collecting (device excluded)."""
    with GuestMemory.anonymous(4 << 20) as mem:
        drv, dev = make(kind, mem)
        spent = 0.0
        done = 0
        for _ in range(ROUNDS):
            start = time.process_time()
            n = fill(drv, descs)
            drv.should_kick()
            spent += time.process_time() - start
            while chains := dev.pop_batch(BATCH):
                dev.push_batch([(c.head, 0) for c in chains])
            start = time.process_time()
            drv.get_used()
            spent += time.process_time() - start
            done += n
        dev.close()
        drv.close()
        gc.collect()
    return done / spent


def best(fn: Callable[[], float], repeat: int = 3) -> float:
    return max(fn() for _ in range(repeat))


def main() -> None:
    print(f"queue size {SIZE}, {ROUNDS} fills of the ring, batch {BATCH}")
    print(f"{'case':<34}{'packed chains/s':>16}{'split chains/s':>16}{'ratio':>8}")
    cases: list[tuple[str, Callable[[str], float]]] = []
    for descs in (1, 4, "indirect"):
        cases.append(
            (f"device pop+push, {descs} desc", partial(device_rate, descs=descs, batch=False))
        )
        cases.append((f"device batch, {descs} desc", partial(device_rate, descs=descs, batch=True)))
        cases.append(
            (f"driver add+publish+collect, {descs} desc", partial(driver_rate, descs=descs))
        )
    for name, fn in cases:
        packed = best(partial(fn, "packed"))
        split = best(partial(fn, "split"))
        print(f"{name:<34}{packed:>16,.0f}{split:>16,.0f}{packed / split:>8.2f}")


if __name__ == "__main__":
    main()
