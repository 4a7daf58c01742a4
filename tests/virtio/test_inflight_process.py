"""A real back-end process is SIGKILLed with chains in flight; a new one recovers them in order."""

from __future__ import annotations

import gc
import os
import random
import signal
import subprocess
import sys
import time

import pytest

from pyvhost.virtio.inflight import InflightRegion
from pyvhost.virtio.memory import GuestMemory
from pyvhost.virtio.packed import PackedDriver, PackedQueue, packed_layout
from pyvhost.virtio.split import SplitDriver, SplitQueue, split_layout

MiB = 1 << 20
SIZE = 16
RING = 0x1000
DATA = 0x20000

CHILD = r"""
import os, random, sys, time
from pyvhost.virtio.inflight import InflightRegion
from pyvhost.virtio.memory import GuestMemory, RegionSpec
from pyvhost.virtio.packed import PackedQueue, packed_layout
from pyvhost.virtio.split import SplitQueue, split_layout

fmt, mode = sys.argv[1], sys.argv[2]
size, mem_fd, mem_size, inflight_fd, mmap_size, seed, ring = map(int, sys.argv[3:])
packed = fmt == "packed"
mem = GuestMemory([RegionSpec(mem_fd, 0, mem_size, 0, 0x7F0000000000)])
region = InflightRegion.adopt(inflight_fd, mmap_size, 0, 1, size, packed)
if packed:
    dev = PackedQueue(mem, size, *packed_layout(size, ring)[:3], inflight=region.packed_queue(0))
else:
    dev = SplitQueue(mem, size, *split_layout(size, ring)[:3], inflight=region.split_queue(0))
if mode == "fixed":
    ids = [c.head for c in dev.pop_batch(size)]
    dev.push(ids[1], 0)
    dev.push_batch([(ids[4], 0), (ids[0], 0)])
    print(os.getpid(), flush=True)
    time.sleep(60)
rng = random.Random(seed)
print(os.getpid(), flush=True)
held = []
while True:
    held += dev.pop_batch(rng.randint(1, 3))
    if held and rng.random() < 0.6:
        rng.shuffle(held)
        k = rng.randint(1, len(held))
        done, held = held[:k], held[k:]
        dev.push_batch([(c.head, 0) for c in done])
    time.sleep(0.003)
"""


def run_and_kill(fmt: str, mode: str, seed: int) -> tuple[list[int], list[int], list[int]]:
    """Fill a ring, let a child back-end work on it, SIGKILL it, recover in this process.

    Returns (ids in the order the driver added them, ids the driver collected as used,
    ids recovered followed by the ids the new back-end popped from the ring afterwards).
    """
    packed = fmt == "packed"
    mem = GuestMemory.anonymous(MiB)
    drv: SplitDriver | PackedDriver
    if packed:
        layout: tuple[int, ...] = tuple(packed_layout(SIZE, RING)[:3])
        drv = PackedDriver(mem, SIZE, *layout)
    else:
        layout = split_layout(SIZE, RING)[:3]
        drv = SplitDriver(mem, SIZE, *layout)
    added = [drv.add([(DATA + 64 * k, 8)], []) for k in range(SIZE)]
    drv.publish()
    region, fd, mmap_size = InflightRegion.create(1, SIZE, packed)
    front_end_fd = os.dup(fd)
    child_fd = os.dup(fd)
    region.close()
    mem_fd = mem.regions[0].fd
    assert mem_fd is not None
    args = [fmt, mode, SIZE, mem_fd, MiB, child_fd, mmap_size, seed, RING]
    _run_child_and_kill(args, (mem_fd, child_fd), mode, seed)
    collected = [i for i, _ in drv.get_used()]
    region = InflightRegion.adopt(front_end_fd, mmap_size, 0, 1, SIZE, packed)
    try:
        return added, collected, _resume(mem, layout, region)
    finally:
        region.close()
        drv.close()
        gc.collect()
        mem.close()


def _run_child_and_kill(args: list[object], fds: tuple[int, int], mode: str, seed: int) -> None:
    """Start the child back-end (it takes the second fd over), SIGKILL it once it is working."""
    proc = subprocess.Popen(
        ["timeout", "60", sys.executable, "-c", CHILD, *map(str, args)],
        pass_fds=fds,
        stdout=subprocess.PIPE,
    )
    os.close(fds[1])
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line, "child back-end died before it was ready"
        if mode == "random":
            time.sleep(random.Random(seed).uniform(0.002, 0.02))
        os.kill(int(line), signal.SIGKILL)
        assert proc.wait(timeout=20) in (-signal.SIGKILL, 128 + signal.SIGKILL)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        assert proc.stdout is not None
        proc.stdout.close()


def _resume(mem: GuestMemory, layout: tuple[int, ...], region: InflightRegion) -> list[int]:
    """A new back-end on the adopted region: the ids recovered, then those it pops."""
    if region.packed:
        pdev = PackedQueue(mem, SIZE, *layout, inflight=region.packed_queue(0))
        resumed = [c.head for c in pdev.recover_inflight()]
        resumed += [c.head for c in pdev.pop_batch(SIZE)]
        pdev.close()
        return resumed
    probe = SplitQueue(mem, SIZE, *layout)
    used_ring_idx = probe.used_idx
    probe.close()
    heads = region.split_queue(0).recover(used_ring_idx)
    sdev = SplitQueue(mem, SIZE, *layout, last_avail_idx=used_ring_idx + len(heads))
    resumed = heads + [c.head for c in sdev.pop_batch(SIZE)]
    sdev.close()
    return resumed


@pytest.mark.timeout(120)
@pytest.mark.parametrize("fmt", ["split", "packed"])
def test_killed_back_end_chains_are_recovered_in_pop_order(fmt: str, no_fd_leak: None) -> None:
    added, collected, resumed = run_and_kill(fmt, "fixed", 0)
    assert sorted(collected) == sorted([added[1], added[4], added[0]])
    assert resumed == [i for i in added if i not in collected]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("fmt", ["split", "packed"])
@pytest.mark.parametrize("seed", range(4))
def test_back_end_killed_at_a_random_moment(fmt: str, seed: int, no_fd_leak: None) -> None:
    added, collected, resumed = run_and_kill(fmt, "random", seed)
    assert len(set(collected)) == len(collected)
    assert resumed == [i for i in added if i not in collected]
