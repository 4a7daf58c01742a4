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
from pathlib import Path

from peers.qemu import PeerProcess

SECTOR = 512
RING_PACKED_BIT = 34

_SET_FEATURES = re.compile(r"<- SET_FEATURES u64=(0x[0-9a-f]+)")
_INFLIGHT_REPLY = re.compile(
    r"-> GET_INFLIGHT_FD reply mmap_size=(0x[0-9a-f]+) .*num_queues=(\d+) queue_size=(\d+)"
)
_STOPPED = re.compile(r"vring (\d+) stopped at base (0x[0-9a-f]+)")


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


def kill_at(
    proc: PeerProcess,
    *,
    want_in_flight: bool,
    queue_size: int,
    packed: bool,
    attempts: int = 1500,
) -> int:
    """SIGKILL the back-end at a moment its inflight region shows requests in flight (or none).

    The process is frozen with SIGSTOP, its region read through /proc, and either killed there or
    let go (SIGCONT) for a few milliseconds before the next look. Returns the in-flight count it
    was killed with; raises AssertionError if no such moment came in `attempts` looks.
    """
    pid = main_pid(proc)
    assert proc.pid is not None
    deadline = time.monotonic() + 30
    while "vring 0 started" not in proc.stderr.rsplit("front-end connected", 1)[-1]:
        if time.monotonic() > deadline:
            raise AssertionError(f"{proc.name}: no vring started within 30 s")
        time.sleep(0.01)
    regions = 0
    for attempt in range(attempts):
        os.kill(pid, signal.SIGSTOP)
        _wait_stopped(pid)
        counts = []
        for path in inflight_mappings(pid):
            with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as m:
                counts.append(in_flight(bytes(m), queue_size, packed))
        if counts and (max(counts) > 0) == want_in_flight:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.stop()
            print(f"{proc.name}: killed after {attempt + 1} looks with {max(counts)} in flight")
            return max(counts)
        os.kill(pid, signal.SIGCONT)
        time.sleep(0.001 + 0.001 * (attempt % 5))
    os.kill(pid, signal.SIGCONT)
    raise AssertionError(
        f"{proc.name}: never saw {'a request' if want_in_flight else 'no request'} in flight "
        f"in {attempts} looks ({regions} inflight regions mapped)"
    )
