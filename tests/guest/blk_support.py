"""Helpers for the vhost-user-blk guest tests: ``pyvhost serve blk`` with a debug log, what that
log says was negotiated, and a look into a running back-end's inflight region.

The inflight layout is read here from the vhost-user spec ("Inflight I/O tracking"), not from
pyvhost, so the tests do not take the code under test's word for it.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import re
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from peers.qemu import PeerProcess

SECTOR = 512
RING_PACKED_BIT = 34

_SET_FEATURES = re.compile(r"<- SET_FEATURES u64=(0x[0-9a-f]+)")
_INFLIGHT_REPLY = re.compile(
    r"-> GET_INFLIGHT_FD reply mmap_size=(0x[0-9a-f]+) .*num_queues=(\d+) queue_size=(\d+)"
)
_STOPPED = re.compile(r"vring (\d+) stopped at base (0x[0-9a-f]+)")
_MEM_REGION = re.compile(
    r"gpa=(0x[0-9a-f]+) size=(0x[0-9a-f]+) uaddr=(0x[0-9a-f]+) offset=(0x[0-9a-f]+)"
)
_VRING_ADDR = re.compile(
    r"<- SET_VRING_ADDR index=(\d+) flags=\S+ desc=(0x[0-9a-f]+) used=(0x[0-9a-f]+)"
)
GUEST_RAM_MEMFD = "/memfd:memory-backend-memfd"
"""How QEMU's ``memory-backend-memfd`` guest RAM shows in a back-end's /proc/PID/maps."""
DESC_F_AVAIL = 1 << 7
DESC_F_USED = 1 << 15


def serve_blk(
    workdir: Path, name: str, sock: Path, image: Path, *args: str, client: bool = False
) -> PeerProcess:
    """Start ``pyvhost -vv serve blk`` (every vhost-user message logged) and, in server mode,
    wait for its socket."""
    argv = [sys.executable, "-m", "pyvhost", "-vv", "serve", "blk", "--socket", str(sock)]
    argv += ["--image", str(image), *args]
    if client:
        argv.append("--client")
    proc = PeerProcess(argv, workdir, name=name, timeout_s=150, socket=None if client else sock)
    return proc.start()


def split_region_size(queue_size: int) -> int:
    """Bytes of one queue's split-format inflight region: 16-byte header, 16 bytes a descriptor,
    padded to 64."""
    return -(-(16 + 16 * queue_size) // 64) * 64


def packed_region_size(queue_size: int) -> int:
    """Bytes of one queue's packed-format inflight region: 32-byte header, 32 bytes a descriptor,
    padded to 64."""
    return -(-(32 + 32 * queue_size) // 64) * 64


def features_set(log: str) -> list[int]:
    """Every SET_FEATURES value the back-end received, in order."""
    return [int(m.group(1), 16) for m in _SET_FEATURES.finditer(log)]


def inflight_replies(log: str) -> list[tuple[int, int, int, int]]:
    """(features last set before it, mmap_size, num_queues, queue_size) per GET_INFLIGHT_FD."""
    out = []
    for m in _INFLIGHT_REPLY.finditer(log):
        before = features_set(log[: m.start()])
        feats = before[-1] if before else 0
        out.append((feats, int(m.group(1), 16), int(m.group(2)), int(m.group(3))))
    return out


def stopped_bases(log: str) -> dict[int, int]:
    """The last ``vring N stopped at base B`` the back-end logged, per vring."""
    return {int(m.group(1)): int(m.group(2), 16) for m in _STOPPED.finditer(log)}


def guest_feature_bit(features: str, bit: int) -> bool:
    """A bit of /sys/bus/virtio/devices/*/features (one '0' or '1' character per bit, bit 0
    first)."""
    return features[bit] == "1"


def problems(log: str) -> list[str]:
    """WARNING, ERROR and traceback lines of a serve log."""
    return [
        line
        for line in log.splitlines()
        if " WARNING " in line or " ERROR " in line or line.startswith("Traceback")
    ]


def _children(pid: int) -> list[int]:
    """The child processes of ``pid`` (all its threads')."""
    found: list[int] = []
    with contextlib.suppress(OSError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(OSError):
                found += [int(c) for c in (task / "children").read_text().split()]
    return found


def main_pid(proc: PeerProcess) -> int:
    """The pid of the program `PeerProcess` runs under `timeout` (its only child)."""
    assert proc.pid is not None
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
        if children:
            return int(children[0])
        time.sleep(0.01)
    raise AssertionError(f"{proc.name}: no child under timeout (pid {proc.pid})")


def inflight_mappings(pid: int) -> list[Path]:
    """/proc/PID/map_files paths of the inflight memfds process `pid` has mapped (named by
    pyvhost's GET_INFLIGHT_FD); the mapping stays while the back-end uses the region."""
    found = []
    for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[5].startswith("/memfd:pyvhost-inflight"):
            found.append(Path(f"/proc/{pid}/map_files/{fields[0]}"))
    return found


class RingReader(Protocol):
    """What `to_resubmit` needs to know of the rings in guest memory."""

    def split_used_idx(self, queue: int) -> int: ...

    def packed_desc_flags(self, queue: int, slot: int) -> int: ...


class GuestRings:
    """A back-end's vrings in guest RAM, read through its mapping of QEMU's memfd; the ring and
    region addresses are those its ``-vv`` log shows it received on the current connection."""

    def __init__(self, pid: int, log: str) -> None:
        session = log.rsplit("front-end connected", 1)[-1]
        self.regions = [
            (int(uaddr, 16), int(size, 16), int(offset, 16))
            for _, size, uaddr, offset in _MEM_REGION.findall(session)
        ]
        self.rings = {
            int(index): (int(desc, 16), int(used, 16))
            for index, desc, used in _VRING_ADDR.findall(session)
        }
        self.ram: Path | None = None
        for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
            fields = line.split(maxsplit=5)
            if len(fields) == 6 and fields[5].startswith(GUEST_RAM_MEMFD):
                self.ram = Path(f"/proc/{pid}/map_files/{fields[0]}")
        if self.ram is None or not self.regions or not self.rings:
            raise AssertionError(
                f"pid {pid}: guest RAM not found (mapping {self.ram}, {len(self.regions)} "
                f"regions, vrings {sorted(self.rings)} in the log)"
            )

    def read(self, uaddr: int, length: int) -> bytes:
        """`length` bytes at front-end address `uaddr`."""
        assert self.ram is not None
        for start, size, offset in self.regions:
            if start <= uaddr and uaddr + length <= start + size:
                with open(self.ram, "rb") as f:
                    return os.pread(f.fileno(), length, offset + uaddr - start)
        raise AssertionError(f"address {uaddr:#x} is in no memory region {self.regions}")

    def split_used_idx(self, queue: int) -> int:
        """``idx`` of a split queue's used ring (after its 16-bit ``flags``)."""
        return int.from_bytes(self.read(self.rings[queue][1] + 2, 2), "little")

    def packed_desc_flags(self, queue: int, slot: int) -> int:
        """``flags`` of a packed ring's descriptor `slot` (addr u64, len u32, id u16, flags u16)."""
        return int.from_bytes(self.read(self.rings[queue][0] + 16 * slot + 14, 2), "little")


def in_flight(region: bytes, queue_size: int, packed: bool) -> int:
    """Descriptors marked in flight in an inflight region (all queues): the first byte of every
    descriptor entry is its ``inflight`` flag. 0 for a region of the other format's size."""
    header, entry = (32, 32) if packed else (16, 16)
    per_queue = packed_region_size(queue_size) if packed else split_region_size(queue_size)
    if len(region) % per_queue:
        return 0
    count = 0
    for base in range(0, len(region), per_queue):
        for i in range(queue_size):
            count += region[base + header + entry * i] != 0
    return count


def to_resubmit(region: bytes, queue_size: int, packed: bool, rings: RingReader) -> int:
    """Descriptors a back-end taking this region over must resubmit (all queues), after the
    spec's reconnect steps: a batch the dead back-end had already published to the driver (or a
    chain it had not finished recording) is not in flight even though its flag is still set."""
    per_queue = packed_region_size(queue_size) if packed else split_region_size(queue_size)
    if len(region) % per_queue:
        return 0
    still_flagged = _packed_still_flagged if packed else _split_still_flagged
    return sum(
        still_flagged(region[base : base + per_queue], queue, queue_size, rings)
        for queue, base in enumerate(range(0, len(region), per_queue))
    )


def _packed_still_flagged(part: bytes, queue: int, queue_size: int, rings: RingReader) -> int:
    """Entries of one packed queue's region still in flight after the reconnect steps."""
    flags = [part[32 + 32 * i] for i in range(queue_size)]
    free_head, old_free_head = _u16(part, 12), _u16(part, 14)
    used = (_u16(part, 16), part[20])
    old_used = (_u16(part, 18), part[21])
    if used != old_used:
        still = DESC_F_AVAIL if old_used[1] else DESC_F_USED
        ring = rings.packed_desc_flags(queue, old_used[0] % queue_size)
        if ring & (DESC_F_AVAIL | DESC_F_USED) != still:
            old_free_head = free_head
    i = old_free_head
    for _ in range(queue_size):
        if i >= queue_size:
            break
        flags[i] = 0
        i = _u16(part, 32 + 32 * i + 2)
    return sum(1 for f in flags if f)


def _split_still_flagged(part: bytes, queue: int, queue_size: int, rings: RingReader) -> int:
    """Entries of one split queue's region still in flight after the reconnect steps."""
    flags = [part[16 + 16 * i] for i in range(queue_size)]
    ring_idx = rings.split_used_idx(queue)
    i = _u16(part, 12)
    for _ in range(min((ring_idx - _u16(part, 14)) & 0xFFFF, queue_size)):
        if i >= queue_size:
            break
        flags[i] = 0
        i = _u16(part, 16 + 16 * i + 6)
    return sum(1 for f in flags if f)


def _u16(part: bytes, off: int) -> int:
    """The little-endian u16 at ``off``."""
    return int.from_bytes(part[off : off + 2], "little")


def _wait_stopped(pid: int, timeout: float = 5) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        states = []
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(OSError):
                states.append(task.joinpath("stat").read_text().rsplit(")", 1)[1].split()[0])
        if all(s in "tT" for s in states):
            return
        time.sleep(0.001)
    raise AssertionError(f"pid {pid} did not stop within {timeout} s")


def wait_started(proc: PeerProcess, timeout: float = 30) -> None:
    """Wait until the back-end's latest front-end connection has started vring 0."""
    deadline = time.monotonic() + timeout
    while "vring 0 started" not in proc.stderr.rsplit("front-end connected", 1)[-1]:
        if proc.returncode is not None:
            raise AssertionError(
                f"{proc.name} exited with {proc.returncode} before vring 0 started:\n"
                f"{proc.stderr[-3000:]}"
            )
        if time.monotonic() > deadline:
            raise AssertionError(f"{proc.name}: no vring started within {timeout:g} s")
        time.sleep(0.01)


def kill_at(
    proc: PeerProcess,
    *,
    want_in_flight: bool,
    queue_size: int,
    packed: bool,
    within: float = 20,
    describe: Callable[[], str] | None = None,
    workers_only: bool = False,
) -> int:
    """SIGKILL the back-end at a moment its inflight region shows requests in flight (or none).

    In flight: what a successor must resubmit (`to_resubmit`); none: no ``inflight`` flag set at
    all. The process is frozen with SIGSTOP, its region read through /proc, and either killed
    there or let go (SIGCONT) for a few milliseconds before the next look. Returns the in-flight
    count it was killed with; raises AssertionError if no such moment came within `within`
    seconds of looking, with what `describe` says (e.g. what the guest was doing) appended.
    With ``workers_only`` only its worker processes (``--worker-mode process``) are killed and
    the daemon goes on.
    """
    pid = main_pid(proc)
    assert proc.pid is not None
    wait_started(proc)
    rings = GuestRings(pid, proc.stderr)
    started = time.monotonic()
    looks = regions = most = 0
    while looks == 0 or time.monotonic() - started < within:
        looks += 1
        frozen = [pid, *_children(pid)]  # worker processes (--worker-mode process) too
        for p in frozen:
            with contextlib.suppress(ProcessLookupError):
                os.kill(p, signal.SIGSTOP)
        _wait_stopped(pid)
        for p in frozen[1:]:  # a worker that is ending may never stop: it is gone soon
            with contextlib.suppress(AssertionError):
                _wait_stopped(p, 0.5)
        marked, pending = [], []
        for path in inflight_mappings(pid):
            with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as m:
                region = bytes(m)
            marked.append(in_flight(region, queue_size, packed))
            pending.append(to_resubmit(region, queue_size, packed, rings))
        regions = len(marked)
        most = max([most, *pending])
        if marked and (max(pending) > 0 if want_in_flight else max(marked) == 0):
            if workers_only:
                assert len(frozen) > 1, f"{proc.name} has no worker process"
                for p in frozen[1:]:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(p, signal.SIGKILL)
                os.kill(pid, signal.SIGCONT)
                print(f"{proc.name}: workers {frozen[1:]} killed after {looks} looks with "
                      f"{max(pending)} in flight ({max(marked)} marked)")  # fmt: skip
                return max(pending)
            os.killpg(proc.pid, signal.SIGKILL)
            proc.stop()
            print(
                f"{proc.name}: killed after {looks} looks with {max(pending)} in flight "
                f"({max(marked)} marked)"
            )
            return max(pending)
        for p in frozen:
            with contextlib.suppress(ProcessLookupError):
                os.kill(p, signal.SIGCONT)
        time.sleep(0.001 + 0.001 * (looks % 5))
    raise AssertionError(
        f"{proc.name}: never saw {'a request' if want_in_flight else 'no request'} in flight "
        f"in {looks} looks over {within:g} s ({regions} inflight regions mapped at the last "
        f"look, at most {most} requests to resubmit at any look)"
        + (f"; {describe()}" if describe else "")
    )
