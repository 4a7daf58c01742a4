"""Where a depth-1 block request's microseconds go: ``python bench/bench_request.py [--n N]``.

One 4 KiB request at a time, everything in this one thread (no sleeping, no wake-ups), each stage
adding one layer of what ``pyvhost serve blk`` does per request at queue depth 1:

1. ``ring``: the driver adds a three-descriptor chain (header, data, status) and publishes it;
   the device pops it and pushes it back; the driver collects it. Ring code of both sides only.
2. ``+ blk``: the device side runs :class:`~pyvhost.devices.blk.request.BlkBackend` on the chain:
   header parsed, ``os.pwritev`` / ``os.preadv`` between guest memory and an image in the page
   cache, status written. Writes and reads alternate, as in ``exercise blk``.
3. ``+ loop``: the device side is the event loop's own pass (``disable_notifications``,
   ``BlkDevice.handle_queue``, ``needs_notification``, ``enable_notifications``).
4. ``+ notify``: the system calls a woken round trip adds on both sides, made here without
   anyone sleeping: the driver's kick (eventfd write), the worker's ``epoll.poll`` and eventfd
   read, the device's call (eventfd write) and the driver's read of it.

Per-request CPU microseconds of this process (``time.process_time``, best of ``--reps``). The
difference between stage 4 and the per-request time of a real depth-1 run (``exercise blk
--queue-depth 1`` against ``serve blk``, 1 / IOPS: printed last when ``--socket`` names a running
``serve blk``) is what sleeping and being woken costs: the part ``serve --poll-us`` removes.
"""

from __future__ import annotations

import argparse
import json
import os
import select
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable

from pyvhost.devices.blk import BlkDevice
from pyvhost.devices.blk.request import VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT, BlkBackend
from pyvhost.virtio.memory import GuestMemory
from pyvhost.virtio.split import SplitDriver, SplitQueue, split_layout

SIZE = 128
"""QEMU's default ring size."""
HEADER = 0x100000
DATA = 0x200000
STATUS = 0x300000
BLOCK = 4096


class Rig:
    """One ring, one image, the eventfds and the epoll set of a real round trip."""

    def __init__(self, image: str) -> None:
        self.mem = GuestMemory.anonymous(8 << 20)
        desc, avail, used, _ = split_layout(SIZE, 0)
        self.drv = SplitDriver(self.mem, SIZE, desc, avail, used, event_idx=True)
        self.dev = SplitQueue(self.mem, SIZE, desc, avail, used, event_idx=True)
        self.backend = BlkBackend.open(image)
        self.device = BlkDevice(self.backend)
        self.kick = os.eventfd(0, os.EFD_NONBLOCK)
        self.call = os.eventfd(0, os.EFD_NONBLOCK)
        self.epoll = select.epoll()
        self.epoll.register(self.kick, select.EPOLLIN)
        self.n = 0
        for typ, at in ((VIRTIO_BLK_T_OUT, HEADER), (VIRTIO_BLK_T_IN, HEADER + 16)):
            self.mem.write(at, typ.to_bytes(4, "little") + bytes(4) + (8).to_bytes(8, "little"))

    def close(self) -> None:
        self.epoll.close()
        os.close(self.kick)
        os.close(self.call)
        self.backend.close()
        self.mem.close()

    def add(self) -> None:
        """Driver: the next request (a write, then a read of it) made available."""
        self.n += 1
        if self.n & 1:
            self.drv.add([(HEADER, 16), (DATA, BLOCK)], [(STATUS, 1)])
        else:
            self.drv.add([(HEADER + 16, 16)], [(DATA, BLOCK), (STATUS, 1)])
        self.drv.publish()

    def ring(self) -> None:
        self.add()
        dev = self.dev
        chains = dev.pop_batch(32)
        dev.push_batch([(c.head, 1) for c in chains])
        self.drv.get_used()

    def blk(self) -> None:
        self.add()
        dev, handle = self.dev, self.backend.handle
        chains = dev.pop_batch(32)
        dev.push_batch([(c.head, handle(c, 0)) for c in chains])
        self.drv.get_used()

    def loop(self) -> None:
        self.add()
        dev = self.dev
        dev.disable_notifications()
        self.device.handle_queue(0, dev, self.mem)
        dev.needs_notification()
        dev.enable_notifications()
        self.drv.get_used()

    def notify(self) -> None:
        self.add()
        if self.drv.should_kick():
            os.eventfd_write(self.kick, 1)
        self.epoll.poll(0)
        os.read(self.kick, 8)
        dev = self.dev
        dev.disable_notifications()
        self.device.handle_queue(0, dev, self.mem)
        if dev.needs_notification():
            os.eventfd_write(self.call, 1)
        dev.enable_notifications()
        self.drv.enable_interrupts()
        os.read(self.call, 8)
        self.drv.get_used()


def per_request_us(step: Callable[[], None], n: int, reps: int) -> float:
    best = float("inf")
    for _ in range(reps):
        start = time.process_time()
        for _ in range(n):
            step()
        best = min(best, (time.process_time() - start) / n * 1e6)
    return best


def real_run(socket: str, seconds: float) -> float:
    """Microseconds per request of ``exercise blk --queue-depth 1`` against ``socket``."""
    argv = [sys.executable, "-m", "pyvhost", "exercise", "blk", "--socket", socket, "--json"]
    argv += ["--quiet", "--queue-depth", "1", "--seconds", str(seconds)]
    out = subprocess.run(argv, capture_output=True, text=True, check=True).stdout
    return 1e6 / float(json.loads(out)["iops"])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=20000, help="requests per repetition")
    parser.add_argument("--reps", type=int, default=5, help="repetitions (best is kept)")
    parser.add_argument("--socket", help="a running `serve blk` to time a real depth-1 run")
    parser.add_argument("--seconds", type=float, default=3.0, help="length of that run")
    args = parser.parse_args()
    with tempfile.NamedTemporaryFile(prefix="pvh-req-", dir="/tmp") as image:
        image.truncate(1 << 20)
        rig = Rig(image.name)
        try:
            stages = [("ring", rig.ring), ("+ blk", rig.blk), ("+ loop", rig.loop)]
            stages.append(("+ notify", rig.notify))
            print(f"depth-1 4 KiB request, split ring of {SIZE}, EVENT_IDX, one thread")
            print(f"{'stage':<10} {'us/request':>10} {'added':>8}")
            previous = 0.0
            for name, step in stages:
                us = per_request_us(step, args.n, args.reps)
                print(f"{name:<10} {us:>10.2f} {us - previous:>8.2f}")
                previous = us
        finally:
            rig.close()
    if args.socket:
        real = real_run(args.socket, args.seconds)
        print(
            f"{'real':<10} {real:>10.2f} {real - previous:>8.2f}  (1 / IOPS of exercise blk -d 1)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
