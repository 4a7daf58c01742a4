"""Full start-up negotiations per second: Frontend against BackendHandler, and against
qemu-storage-daemon (when installed), with the ratio of the two.

One negotiation is QEMU 7.2's start-up sequence for a block device (see GUEST.md): features,
protocol features, queue number, memory slots, back-end channel, owner, call / err fds,
config, SET_FEATURES, ADD_MEM_REG of a memfd, per queue NUM / BASE / ADDR / KICK / ENABLE,
then GET_VRING_BASE per queue, and hang up.

Run as ``python bench/bench_negotiation.py [--seconds 3] [--queues 1]``.
"""

from __future__ import annotations

import argparse
import logging
import multiprocessing
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

from pyvhost.daemon import Daemon
from pyvhost.testing import ConfigOnlyDevice
from pyvhost.user.backend import BackendHandler
from pyvhost.user.connection import socketpair
from pyvhost.user.frontend import Frontend
from pyvhost.user.messages import MemoryRegion, VringAddr
from pyvhost.user.protocol import ProtocolFeature
from pyvhost.virtio import features as vf
from pyvhost.virtio.memory import GuestMemory
from pyvhost.virtio.split import split_layout

QEMU_BLK_PROTOCOL = sum(
    1 << b
    for b in (
        ProtocolFeature.MQ,
        ProtocolFeature.LOG_SHMFD,
        ProtocolFeature.REPLY_ACK,
        ProtocolFeature.BACKEND_REQ,
        ProtocolFeature.CONFIG,
        ProtocolFeature.BACKEND_SEND_FD,
        ProtocolFeature.CONFIGURE_MEM_SLOTS,
    )
)
BLK_FEATURES = sum(
    1 << b for b in (vf.F_VERSION_1, vf.BLK_F_SEG_MAX, vf.BLK_F_BLK_SIZE, vf.BLK_F_MQ)
)
QUEUE_SIZE = 128
MEM_SIZE = 1 << 20


def blk_config(num_queues: int) -> bytes:
    cfg = bytearray(60)
    struct.pack_into("<QII", cfg, 0, 2048, 0, 126)
    struct.pack_into("<I", cfg, 20, 512)
    struct.pack_into("<H", cfg, 34, num_queues)
    return bytes(cfg)


def negotiate(fe: Frontend, mem: GuestMemory, num_queues: int) -> None:
    """QEMU's start-up and stop sequence for a vhost-user-blk device."""
    result = fe.negotiate(protocol_mask=QEMU_BLK_PROTOCOL)
    fe.get_features()
    region = mem.regions[0]
    assert region.fd is not None
    call = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
    kick = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
    try:
        for i in range(num_queues):
            fe.set_vring_call(i, call)
            fe.set_vring_err(i, call)
        fe.get_config(0, 57, exact=False)
        fe.set_features(result.features & (BLK_FEATURES | 1 << 30))
        wire = MemoryRegion(region.guest_phys_addr, region.size, region.userspace_addr, 0)
        fe.setup_memory([(wire, region.fd)])
        for i in range(num_queues):
            desc, avail, used, _ = split_layout(QUEUE_SIZE, 0x10000 * (i + 1))
            uva = region.userspace_addr
            addr = VringAddr(i, 0, uva + desc, uva + used, uva + avail, 0)
            fe.start_vring(i, QUEUE_SIZE, addr, 0, kick, call)
        for i in range(num_queues):
            fe.get_vring_base(i)
    finally:
        os.close(call)
        os.close(kick)


def rate(run_once: Callable[[], None], seconds: float) -> float:
    run_once()  # warm up
    done = 0
    start = time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds:
        run_once()
        done += 1
    return done / elapsed


def _device(num_queues: int) -> ConfigOnlyDevice:
    return ConfigOnlyDevice(
        blk_config(num_queues),
        features=BLK_FEATURES,
        num_queues=num_queues,
        protocol_features=QEMU_BLK_PROTOCOL,
    )


def ours_in_thread(mem: GuestMemory, num_queues: int) -> None:
    """Handler in a thread of this process: both ends share one GIL."""
    a, b = socketpair()
    handler = BackendHandler(_device(num_queues), b)
    thread = threading.Thread(target=handler.serve)
    thread.start()
    with Frontend(a) as fe:
        negotiate(fe, mem, num_queues)
    thread.join()


def _serve(path: str, num_queues: int) -> None:
    logging.disable(logging.CRITICAL)
    Daemon(lambda: _device(num_queues), path).run()


def ours_in_process(mem: GuestMemory, num_queues: int, seconds: float) -> float:
    """A Daemon in its own process on a Unix socket: measured exactly as qemu-storage-daemon is."""
    workdir = Path(tempfile.mkdtemp(prefix="pvh-bn-", dir="/tmp"))
    sock = workdir / "pyvhost.sock"
    child = multiprocessing.get_context("fork").Process(target=_serve, args=(str(sock), num_queues))
    child.start()
    try:
        deadline = time.monotonic() + 30
        while not sock.exists():
            if not child.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the pyvhost back-end process did not start")
            time.sleep(0.02)

        def once() -> None:
            with Frontend.connect(sock) as fe:
                negotiate(fe, mem, num_queues)

        return rate(once, seconds)
    finally:
        child.terminate()
        child.join(10)
        shutil.rmtree(workdir, ignore_errors=True)


def storage_daemon(
    mem: GuestMemory, num_queues: int, seconds: float
) -> tuple[float | None, str | None]:
    binary = shutil.which("qemu-storage-daemon")
    timeout = shutil.which("timeout")
    if binary is None or timeout is None:
        return None, "qemu-storage-daemon not installed"
    workdir = Path(tempfile.mkdtemp(prefix="pvh-bn-", dir="/tmp"))
    image = workdir / "disk.img"
    with open(image, "wb") as f:
        f.truncate(1 << 20)
    sock = workdir / "qsd.sock"
    export = (
        f"type=vhost-user-blk,id=exp0,node-name=disk0,addr.type=unix,addr.path={sock},"
        f"writable=on,num-queues={num_queues}"
    )
    argv = [
        timeout,
        "-k",
        "5",
        str(int(seconds * 3 + 30)),
        binary,
        "--blockdev",
        f"driver=file,node-name=file0,filename={image}",
        "--blockdev",
        "driver=raw,node-name=disk0,file=file0",
        "--export",
        export,
    ]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 30
        while not sock.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                err = proc.stderr.read().decode() if proc.stderr else ""
                return None, f"qemu-storage-daemon did not start: {err.strip()}"
            time.sleep(0.02)

        def once() -> None:
            with Frontend.connect(sock) as fe:
                negotiate(fe, mem, num_queues)

        return rate(once, seconds), None
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stderr is not None:
            proc.stderr.close()
        shutil.rmtree(workdir, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--queues", type=int, default=1)
    args = parser.parse_args(argv)
    with GuestMemory.anonymous(MEM_SIZE) as mem:
        threaded = rate(lambda: ours_in_thread(mem, args.queues), args.seconds)
        print(f"BackendHandler (socketpair, same process) {threaded:>8,.1f} negotiations/s")
        mine = ours_in_process(mem, args.queues, args.seconds)
        print(f"pyvhost Daemon (unix socket, own process) {mine:>8,.1f} negotiations/s")
        theirs, why = storage_daemon(mem, args.queues, args.seconds)
    if theirs is None:
        print(f"qemu-storage-daemon: skipped ({why})")
        return 0
    print(f"qemu-storage-daemon (unix socket)         {theirs:>8,.1f} negotiations/s")
    print(f"ratio pyvhost Daemon / qemu-storage-daemon: {mine / theirs:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
