"""Run inside the test guest by test_kernel_guest.py: drive pyvhost.kernel against the real
/dev/vhost-net, -vsock and -scsi, run ``pyvhost probe --kernel`` on them, and print as one JSON
object what each step returned or raised and how the process's open-fd count changed across it.
The host side asserts on that record; this script only records.
"""

from __future__ import annotations

import ctypes
import fcntl
import functools
import json
import mmap
import os
import signal
import socket
import struct
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from pyvhost.errors import VhostError
from pyvhost.kernel import (
    IotlbMessage,
    IotlbType,
    MemoryRegion,
    Tap,
    VhostKernelDevice,
    VhostNet,
    VhostScsi,
    VhostVsock,
)
from pyvhost.kernel.tap import IFF_NO_PI, TUNSETIFF

Step = dict[str, Any]

VERSION_1 = 1 << 32
ACCESS_PLATFORM = 1 << 33
MRG_RXBUF = 1 << 15
RING = 256
DESC, AVAIL, USED = 0x0, 0x1000, 0x2000
"""Ring layout at the start of the memory (offsets; sizes fit a 256-entry split ring)."""
UNMAPPED = 0x1000_0000
"""An address below the PIE binary, the heap and the mmap area: nothing is mapped there."""
KERNEL_HALF = 0xFFFF_8000_0000_0000
IFF_TUN = 0x0001
PERM_RW = 3


def fd_count() -> int:
    """Open fds of this process (the listing's own fd is counted both times, so it cancels)."""
    return len(os.listdir("/proc/self/fd"))


def attempt(action: Callable[[], object]) -> Step:
    """Run one step: its value or what it raised, and the change in open fds across it."""
    before = fd_count()
    step: Step
    try:
        value = action()
    except Exception as exc:
        code = getattr(exc, "errno", None)
        step = {
            "raised": type(exc).__name__,
            "vhost_error": isinstance(exc, VhostError),
            "message": str(exc),
            "errno": code if isinstance(code, int) else None,
        }
    else:
        step = {"value": value}
    step["fds"] = fd_count() - before
    return step


class Memory:
    """Anonymous memory standing in for guest RAM, guest-physical 0 at its start."""

    def __init__(self, size: int = 0x10000) -> None:
        self.map = mmap.mmap(-1, size)
        self._anchor = ctypes.c_char.from_buffer(self.map)
        self.address = ctypes.addressof(self._anchor)
        self.size = size

    def region(self) -> MemoryRegion:
        """The whole memory as one region of the memory table."""
        return MemoryRegion(0, self.size, self.address)

    def close(self) -> None:
        """Drop the ctypes view first: a mapping with an exported buffer cannot close."""
        del self._anchor
        self.map.close()


def set_ring(dev: VhostKernelDevice, index: int, base: int) -> None:
    """Size and addresses of ring ``index`` laid out at ``base``."""
    dev.set_vring_num(index, RING)
    dev.set_vring_addr(index, desc=base + DESC, avail=base + AVAIL, used=base + USED)


def open_tun(name: str) -> int:
    """A TUN (layer 3, not TAP) interface's fd, made with TUNSETIFF directly."""
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
    fcntl.ioctl(fd, TUNSETIFF, struct.pack("=16sH22x", name.encode(), IFF_TUN | IFF_NO_PI))
    return fd


class BlockedError(Exception):
    """A read that did not return in time (not an OSError, so pyvhost does not wrap it)."""


@contextmanager
def alarm(seconds: int) -> Iterator[None]:
    """Turn a blocking read that never returns into BlockedError."""

    def expire(signum: int, frame: object) -> None:
        raise BlockedError(f"blocked for {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def read_iotlb(dev: VhostKernelDevice) -> dict[str, object]:
    """The next message the device sends (within 3 s), with its type by name."""
    with alarm(3):
        message = dev.read_iotlb()
    fields = ("iova", "size", "perm", "asid")
    return {"type": message.type.name} | {name: getattr(message, name) for name in fields}


# --- steps shared by both devices ---------------------------------------------------------------


def owner_and_features(dev: VhostKernelDevice, unoffered: int) -> dict[str, Step]:
    """Features, backend features, owner twice, reset and owner again, an unoffered bit."""
    out = {
        "features": attempt(dev.get_features),
        "backend_features": attempt(dev.get_backend_features),
        "set_backend_features": attempt(lambda: dev.set_backend_features(0x2)),
        "backend_features_after": attempt(dev.get_backend_features),
        "set_backend_features_unoffered": attempt(lambda: dev.set_backend_features(0x4)),
        "set_features_unoffered": attempt(lambda: dev.set_features(unoffered)),
        "ring_before_owner": attempt(lambda: dev.set_vring_num(0, RING)),
        "set_owner": attempt(dev.set_owner),
        "set_owner_again": attempt(dev.set_owner),
        "reset_owner": attempt(dev.reset_owner),
    }
    out["set_owner_after_reset"] = attempt(dev.set_owner)
    return out


def ring_state(dev: VhostKernelDevice, rings: int) -> dict[str, Step]:
    """Ring size, base, endianness and busy-loop requests on a stopped ring."""
    return {
        "num_out_of_range": attempt(lambda: dev.set_vring_num(rings, RING)),
        "num_not_power_of_two": attempt(lambda: dev.set_vring_num(0, 100)),
        "num_zero": attempt(lambda: dev.set_vring_num(0, 0)),
        "num_too_large": attempt(lambda: dev.set_vring_num(0, 0x10000)),
        "set_base": attempt(lambda: dev.set_vring_base(0, 1234)),
        "get_base": attempt(lambda: dev.get_vring_base(0)),
        "set_base_too_large": attempt(lambda: dev.set_vring_base(0, 0x10000)),
        "get_base_out_of_range": attempt(lambda: dev.get_vring_base(rings)),
        "set_endian": attempt(lambda: dev.set_vring_endian(0, True)),
        "get_endian": attempt(lambda: dev.get_vring_endian(0)),
        "set_busyloop": attempt(lambda: dev.set_vring_busyloop_timeout(1, 50)),
        "get_busyloop": attempt(lambda: dev.get_vring_busyloop_timeout(1)),
        "new_worker": attempt(dev.new_worker),
        "free_worker": attempt(lambda: dev.free_worker(0)),
        "free_worker_7": attempt(lambda: dev.free_worker(7)),
        "attach_vring_worker": attempt(lambda: dev.attach_vring_worker(0, 0)),
        "get_vring_worker": attempt(lambda: dev.get_vring_worker(0)),
    }


def addresses(dev: VhostKernelDevice, mem: Memory) -> dict[str, Step]:
    """Memory tables the kernel refuses, and ring addresses it checks for alignment."""
    base = mem.address
    many = [MemoryRegion(i << 20, 0x1000, base) for i in range(65)]
    return {
        "mem_table": attempt(lambda: dev.set_mem_table([mem.region()])),
        "mem_table_kernel_address": attempt(
            lambda: dev.set_mem_table([MemoryRegion(0, 0x1000, KERNEL_HALF)])
        ),
        "mem_table_65_regions": attempt(lambda: dev.set_mem_table(many)),
        "addr_used_misaligned": attempt(
            lambda: dev.set_vring_addr(0, desc=base, avail=base + AVAIL, used=base + USED + 2)
        ),
        "addr_avail_misaligned": attempt(
            lambda: dev.set_vring_addr(0, desc=base, avail=base + AVAIL + 1, used=base + USED)
        ),
        "addr_desc_misaligned": attempt(
            lambda: dev.set_vring_addr(0, desc=base + 8, avail=base + AVAIL, used=base + USED)
        ),
        "addr_log_misaligned": attempt(
            lambda: dev.set_vring_addr(
                0, desc=base, avail=base + AVAIL, used=base + USED, log=True, log_guest_addr=2
            )
        ),
        "addr_kernel_half": attempt(lambda: set_ring(dev, 0, KERNEL_HALF)),
        "mem_table_restored": attempt(lambda: dev.set_mem_table([mem.region()])),
    }


# --- vhost-net --------------------------------------------------------------------------------


def net_backends(net: VhostNet, mem: Memory, tap: Tap) -> dict[str, Step]:
    """NET_SET_BACKEND with a TAP before and after the ring is set, non-TAP fds, a TUN, detach."""
    read_end, write_end = os.pipe()
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    tun = open_tun("pyvtun0")
    try:
        out = {
            "tap_before_rings": attempt(lambda: net.set_backend(1, tap.fd)),
            "out_of_range": attempt(lambda: net.set_backend(2, tap.fd)),
            "pipe": attempt(lambda: net.set_backend(1, read_end)),
            "udp_socket": attempt(lambda: net.set_backend(1, udp.fileno())),
            "closed_fd": attempt(lambda: net.set_backend(1, 999)),
            "rings": attempt(lambda: set_ring(net, 0, mem.address)),
            "tap": attempt(lambda: net.set_backend(0, tap.fd)),
            "num_while_running": attempt(lambda: net.set_vring_num(0, RING)),
            "base_while_running": attempt(lambda: net.set_vring_base(0, 0)),
            "addr_kernel_half_running": attempt(
                lambda: net.set_vring_addr(
                    0, desc=KERNEL_HALF, avail=KERNEL_HALF + AVAIL, used=KERNEL_HALF + USED
                )
            ),
            "mem_table_kernel_address_running": attempt(
                lambda: net.set_mem_table([MemoryRegion(0, 0x1000, KERNEL_HALF)])
            ),
            "detach": attempt(lambda: net.set_backend(0, None)),
            "tun": attempt(lambda: net.set_backend(0, tun)),
            "tun_detach": attempt(lambda: net.set_backend(0, None)),
            "get_base_after_detach": attempt(lambda: net.get_vring_base(0)),
        }
    finally:
        for fd in (read_end, write_end, tun):
            os.close(fd)
        udp.close()
    return out


def net_unmapped(tap: Tap) -> dict[str, Step]:
    """A memory table and rings at an address nothing is mapped at: what the kernel accepts."""
    with open("/proc/self/maps") as maps:
        spans = [line.split()[0].split("-") for line in maps]
    mapped = any(int(start, 16) <= UNMAPPED < int(end, 16) for start, end in spans)
    with VhostNet() as net:
        net.set_owner()
        net.set_features(VERSION_1)
        return {
            "really_unmapped": {"value": not mapped, "fds": 0},
            "backend_without_mem_table": attempt(lambda: net.set_backend(0, tap.fd)),
            "mem_table": attempt(lambda: net.set_mem_table([MemoryRegion(0, 0x10000, UNMAPPED)])),
            "num": attempt(lambda: net.set_vring_num(0, RING)),
            "addr": attempt(
                lambda: net.set_vring_addr(
                    0, desc=UNMAPPED, avail=UNMAPPED + AVAIL, used=UNMAPPED + USED
                )
            ),
            "backend": attempt(lambda: net.set_backend(0, tap.fd)),
        }


def net(tap: Tap) -> dict[str, object]:
    """Every vhost-net step, on one device (open to close) and one with unmapped memory."""
    before = fd_count()
    mem = Memory()
    dev = VhostNet()
    out: dict[str, object] = {"open_fds": fd_count() - before}
    out.update(owner_and_features(dev, unoffered=1 << 0))
    out["set_features"] = attempt(lambda: dev.set_features(VERSION_1 | MRG_RXBUF))
    out["rings"] = ring_state(dev, rings=2)
    out["addresses"] = addresses(dev, mem)
    out["backends"] = net_backends(dev, mem, tap)
    dev.close()
    out["after_close"] = attempt(dev.get_features)
    out["unmapped"] = net_unmapped(tap)
    mem.close()
    out["leaked_fds"] = fd_count() - before
    return out


# --- IOTLB messages ---------------------------------------------------------------------------


def iotlb_without_platform(mem: Memory) -> dict[str, Step]:
    """IOTLB_MSG_V2 acked but not ACCESS_PLATFORM: the device has no IOTLB."""
    with VhostNet() as dev:
        dev.set_backend_features(0x2)
        dev.set_owner()
        dev.set_features(VERSION_1)
        update = IotlbMessage(IotlbType.UPDATE, 0, 0x3000, mem.address, PERM_RW)
        return {
            "update": attempt(lambda: dev.write_iotlb(update)),
            "invalidate": attempt(
                lambda: dev.write_iotlb(IotlbMessage(IotlbType.INVALIDATE, 0, 0x3000))
            ),
            "read": attempt(lambda: read_iotlb(dev)),
        }


def iotlb_with_platform(mem: Memory, tap: Tap) -> dict[str, Step]:
    """ACCESS_PLATFORM acked: ring addresses are IOVAs; an unmapped one is a MISS to read."""
    kick = os.eventfd(0, os.EFD_CLOEXEC)
    try:
        with VhostNet() as dev:
            dev.set_backend_features(0x2)
            dev.set_owner()
            dev.set_features(VERSION_1 | ACCESS_PLATFORM)
            dev.set_mem_table([mem.region()])
            set_ring(dev, 1, 0)
            dev.set_vring_kick(1, kick)
            used_only = IotlbMessage(IotlbType.UPDATE, USED, 0x1000, mem.address + USED, PERM_RW)
            everything = IotlbMessage(IotlbType.UPDATE, 0, 0x3000, mem.address, PERM_RW)
            out = {
                "backend_unmapped": attempt(lambda: dev.set_backend(1, tap.fd)),
                "miss_after_backend": attempt(lambda: read_iotlb(dev)),
                "update_used": attempt(lambda: dev.write_iotlb(used_only)),
                "backend": attempt(lambda: dev.set_backend(1, tap.fd)),
                "kick": attempt(lambda: os.eventfd_write(kick, 1)),
                "miss": attempt(lambda: read_iotlb(dev)),
                "update_all": attempt(lambda: dev.write_iotlb(everything)),
                "update_empty": attempt(
                    lambda: dev.write_iotlb(IotlbMessage(IotlbType.UPDATE, 0x8000, 0, 0, 3))
                ),
                "detach": attempt(lambda: dev.set_backend(1, None)),
            }
    finally:
        os.close(kick)
    return out


def iotlb(tap: Tap) -> dict[str, object]:
    """IOTLB messages on two vhost-net devices, without and with ACCESS_PLATFORM acked."""
    before = fd_count()
    mem = Memory()
    out: dict[str, object] = {
        "without_platform": iotlb_without_platform(mem),
        "with_platform": iotlb_with_platform(mem, tap),
    }
    mem.close()
    out["leaked_fds"] = fd_count() - before
    return out


# --- vhost-vsock ------------------------------------------------------------------------------


def vsock_cids(dev: VhostVsock) -> dict[str, Step]:
    """Reserved and oversized CIDs, and one CID on two devices."""
    out = {"cid_3": attempt(lambda: dev.set_guest_cid(3))}
    for cid in (2, 0, 1, 0xFFFFFFFF, 1 << 32):
        out[f"cid_{cid:#x}"] = attempt(functools.partial(dev.set_guest_cid, cid))
    out["cid_3_again"] = attempt(lambda: dev.set_guest_cid(3))
    with VhostVsock() as other:
        out["cid_3_other"] = attempt(lambda: other.set_guest_cid(3))
        out["cid_4_other"] = attempt(lambda: other.set_guest_cid(4))
        out["running_not_owner"] = attempt(lambda: other.set_running(True))
    return out


def vsock() -> dict[str, object]:
    """Every vhost-vsock step, then the rings set up one by one until it runs."""
    before = fd_count()
    mem = Memory()
    dev = VhostVsock()
    out: dict[str, object] = {"open_fds": fd_count() - before}
    out.update(owner_and_features(dev, unoffered=1 << 0))
    out["set_features"] = attempt(lambda: dev.set_features(VERSION_1))
    out["rings"] = ring_state(dev, rings=2)
    out["cids"] = vsock_cids(dev)
    out["running_before_rings"] = attempt(lambda: dev.set_running(True))
    out["mem_table"] = attempt(lambda: dev.set_mem_table([mem.region()]))
    out["rings_set"] = attempt(lambda: set_ring(dev, 0, mem.address))
    out["running_one_ring"] = attempt(lambda: dev.set_running(True))
    out["rings_set_1"] = attempt(lambda: set_ring(dev, 1, mem.address + 0x4000))
    out["running"] = attempt(lambda: dev.set_running(True))
    out["stopped"] = attempt(lambda: dev.set_running(False))
    dev.close()
    mem.close()
    out["leaked_fds"] = fd_count() - before
    return out


# --- vhost-scsi (what the probe needs) ---------------------------------------------------------


def scsi() -> dict[str, object]:
    """What vhost-scsi answers without and with an owner (the probe asks without)."""
    before = fd_count()
    with VhostScsi() as dev:
        out: dict[str, object] = {
            "abi_version": attempt(dev.get_abi_version),
            "backend_features": attempt(dev.get_backend_features),
            "set_owner": attempt(dev.set_owner),
            "backend_features_owner": attempt(dev.get_backend_features),
            "reset_owner": attempt(dev.reset_owner),
        }
    out["leaked_fds"] = fd_count() - before
    return out


# --- pyvhost probe ----------------------------------------------------------------------------


def probe(path: str) -> dict[str, object]:
    """Run the CLI as a user would, in a fresh interpreter."""
    proc = subprocess.run(
        [sys.executable, "-m", "pyvhost", "probe", "--kernel", path, "--json"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    return {"returncode": proc.returncode, "stdout": proc.stdout, "stderr": proc.stderr}


def probes() -> dict[str, object]:
    """``pyvhost probe --kernel`` of each device; vhost-vdpa, which this kernel lacks, too."""
    vdpa = subprocess.run(["modprobe", "vhost_vdpa"], capture_output=True, text=True, check=False)
    out: dict[str, object] = {
        path: probe(path) for path in ("/dev/vhost-net", "/dev/vhost-vsock", "/dev/vhost-scsi")
    }
    out["modprobe vhost_vdpa"] = {"returncode": vdpa.returncode, "stderr": vdpa.stderr}
    out["/dev/vhost-vdpa-0"] = probe("/dev/vhost-vdpa-0")
    return out


def main() -> None:
    with Tap.open("pyvtap0") as tap:
        result = {
            "kernel": os.uname().release,
            "net": net(tap),
            "iotlb": iotlb(tap),
            "vsock": vsock(),
            "scsi": scsi(),
            "probe": probes(),
        }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
