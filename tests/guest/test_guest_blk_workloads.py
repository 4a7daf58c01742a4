"""A Linux guest's ordinary I/O on a disk served by ``pyvhost serve blk``: page-cache writes and
an ext4 file system, over split and packed rings of QEMU's default size (128) on one queue, and
of 256 on two queues served by worker processes.

Unlike O_DIRECT from one buffer, page-cache writeback gathers many scattered pages into one
request, so the guest sends indirect tables as long as the device's ``seg_max`` allows — longer
than a 128-entry ring (issue 7: such a table stopped the queue and hung the guest). Every byte is
checked twice: in the guest after dropping its caches, and on the host in the image file
(``e2fsck`` and ``debugfs`` read the file system there). In process mode the same workload also
runs while the test kills the worker processes with requests in flight.
"""

from __future__ import annotations

import hashlib
import re
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from peers.guest import GuestError, boot_guest
from peers.qemu import PeerProcess, QemuVM, make_raw_image, require

from .blk_support import (
    RING_PACKED_BIT,
    SECTOR,
    guest_feature_bit,
    kill_at,
    problems,
    serve_blk,
)

pytestmark = [pytest.mark.qemu, pytest.mark.guest]

MIB = 1 << 20
IMAGE_SIZE = 160 * MIB
FS_SIZE = 96 * MIB
"""ext4 takes the start of the disk; the raw writes go after it."""
RAW_OFFSET = FS_SIZE
RAW_SIZE = 40 * MIB
ODD_BS = 3000
ODD_SEEK = 49_000
ODD_OFFSET = ODD_BS * ODD_SEEK
"""147,000,000: not a multiple of 512, past the raw region."""
ODD_SIZE = 1_234_567
BIG_SIZE = 24 * MIB
SMALL_DIRS = 10
SMALL_PER_DIR = 20
SMALL_STEP = 97
"""Small file k (1-based) holds its name line and the first k * 97 bytes of the big file."""
INDIRECT_DESC_BIT = 28
GUEST_TIMEOUT = 120

# Each 512-byte sector starts with its label and number, so a misplaced sector changes the
# checksum; `labelled_sectors` builds the same bytes on the host.
AWK_SECTORS = r"""awk -v n=COUNT -v label='LABEL' 'BEGIN {
    fill = ""; for (i = 0; i < 20; i++) fill = fill "abcdefghijklmnopqrstuvwxyz"
    for (s = 0; s < n; s++) {
        h = sprintf("%s %07d\n", label, s)
        printf "%s%s", h, substr(fill, 1, 512 - length(h))
    }
}'"""
RAW_LABEL = "pyvhost raw sector"
BIG_LABEL = "pyvhost ext4 sector"
RAW_HOLES_MIB = 48
FS_HOLES_MIB = 32
GUEST_MEMORY = "384M"

# A freshly booted guest's free memory is a few large blocks, so its page cache is physically
# contiguous and a 1 MiB request is a handful of segments. `fragment DIR MIB LABEL` writes MIB
# MiB each to DIR/keep and DIR/free a page at a time, in turn, and removes DIR/free: free memory
# is then single pages, and the next page cache is as scattered as on a guest that has run a
# while. On ramfs the holes are unmovable memory, which block devices' page cache takes; on
# tmpfs movable, which regular files' takes. It prints the free single pages after.
FRAGMENT = r"""fragment() {
    awk -v n=$(($2 * 256)) -v keep="$1/keep" -v free="$1/free" 'BEGIN {
        page = "0123456789abcdef"; for (i = 0; i < 8; i++) page = page page
        for (i = 0; i < n; i++) { printf "%s", page > keep; printf "%s", page > free }
    }'
    rm "$1/free"
    echo "holes-$3 $(awk '{ s += $5 } END { print s }' /proc/buddyinfo)"
}"""
_VRING_NUM = re.compile(r"<- SET_VRING_NUM index=0 num=(\d+)")
_QUEUE_STOPPED = re.compile(r"queue \d+ stopped:")


def labelled_sectors(label: str, count: int) -> bytes:
    fill = b"abcdefghijklmnopqrstuvwxyz" * 20
    parts = []
    for s in range(count):
        head = f"{label} {s:07d}\n".encode()
        parts.append(head + fill[: SECTOR - len(head)])
    return b"".join(parts)


def awk_sectors(label: str, count: int) -> str:
    return AWK_SECTORS.replace("COUNT", str(count)).replace("LABEL", label)


def small_files(big: bytes) -> dict[str, bytes]:
    """Path under the mount point -> contents, as the guest script writes them."""
    files = {}
    for k in range(1, SMALL_DIRS * SMALL_PER_DIR + 1):
        d, j = divmod(k - 1, SMALL_PER_DIR)
        files[f"small/d{d}/f{j + 1}"] = f"pyvhost small file {k}\n".encode() + big[: k * SMALL_STEP]
    return files


def guest_script() -> str:
    """Data first (tmpfs); then (a) buffered raw writes, one of them unaligned and odd-sized,
    read back after dropping caches; (b) mkfs.ext4, a big file and many small ones, umount,
    fsck, remount, verify. Memory is fragmented before each part (see FRAGMENT)."""
    return f"""set -e
echo "features $(cat /sys/bus/virtio/devices/virtio0/features)"
echo "size $(cat /sys/block/vda/size)"
echo "max_segments $(cat /sys/block/vda/queue/max_segments)"
{FRAGMENT}
{awk_sectors(RAW_LABEL, RAW_SIZE // SECTOR)} >/tmp/pattern
tail -c {ODD_SIZE} /tmp/pattern >/tmp/odd
echo "raw-src $(sha256sum </tmp/pattern)"
echo "odd-src $(sha256sum </tmp/odd)"
mkdir -p /tmp/tree /mnt /ram
{awk_sectors(BIG_LABEL, BIG_SIZE // SECTOR)} >/tmp/tree/big
k=0
for d in $(seq 0 {SMALL_DIRS - 1}); do
    mkdir -p /tmp/tree/small/d$d
    for j in $(seq 1 {SMALL_PER_DIR}); do
        k=$((k + 1))
        {{ echo "pyvhost small file $k"; head -c $((k * {SMALL_STEP})) /tmp/tree/big; }} \\
            >/tmp/tree/small/d$d/f$j
    done
done
(cd /tmp/tree && find . -type f | sort | xargs sha256sum) >/tmp/manifest
echo "files $(wc -l </tmp/manifest)"

mount -t ramfs ramfs /ram
fragment /ram {RAW_HOLES_MIB} raw
dd if=/tmp/pattern of=/dev/vda bs=1M seek={RAW_OFFSET // MIB} conv=notrunc 2>/dev/null
dd if=/tmp/odd of=/dev/vda bs={ODD_BS} seek={ODD_SEEK} conv=notrunc 2>/dev/null
sync
echo 3 >/proc/sys/vm/drop_caches
echo "raw $(dd if=/dev/vda bs=1M skip={RAW_OFFSET // MIB} count={RAW_SIZE // MIB} 2>/dev/null \\
    | sha256sum)"
echo "odd $(dd if=/dev/vda bs={ODD_BS} skip={ODD_SEEK} count={-(-ODD_SIZE // ODD_BS)} \\
    2>/dev/null | head -c {ODD_SIZE} | sha256sum)"

mkdir /tmp/frag
fragment /tmp/frag {FS_HOLES_MIB} fs
mkfs.ext4 -q -F /dev/vda {FS_SIZE // MIB}M
mount -t ext4 /dev/vda /mnt
cp -a /tmp/tree/. /mnt/
umount /mnt
echo 3 >/proc/sys/vm/drop_caches
rc=0; fsck.ext4 -n -f /dev/vda >/tmp/fsck.log 2>&1 || rc=$?
echo "fsck $rc"
[ $rc = 0 ] || cat /tmp/fsck.log
echo 3 >/proc/sys/vm/drop_caches
mount -t ext4 /dev/vda /mnt
rc=0; (cd /mnt && sha256sum -c /tmp/manifest) >/tmp/verify.log 2>&1 || rc=$?
echo "verify $rc"
[ $rc = 0 ] || grep -v ': OK$' /tmp/verify.log
echo "mounted $(find /mnt -type f | wc -l)"
umount /mnt
"""


def _lines(output: str) -> dict[str, str]:
    return dict(line.split(" ", 1) for line in output.splitlines() if " " in line)


def _host_tool(argv: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)


@pytest.fixture
def blk_daemon(peer_dir: Path) -> Iterator[tuple[PeerProcess, Path]]:
    """``pyvhost -vv serve blk`` on a fresh zero-filled image; stopped after the test."""
    image = make_raw_image(peer_dir / "disk.img", IMAGE_SIZE)
    daemon = serve_blk(peer_dir, "serve", peer_dir / "blk.sock", image)
    yield daemon, image
    daemon.stop()


def _check_serve_log(daemon: PeerProcess, queue_size: int, *, killed: bool = False) -> None:
    """The back-end is still running, served a ring of ``queue_size`` and logged no fault (but
    the deaths of the workers the test ``killed``)."""
    log = daemon.stderr
    assert daemon.returncode is None, log[-3000:]
    faults = [p for p in problems(log) if not (killed and "died (killed by SIGKILL)" in p)]
    assert not faults, faults
    assert not _QUEUE_STOPPED.search(log)
    assert "broken" not in log
    assert _VRING_NUM.findall(log)[-1] == str(queue_size)


@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
def test_guest_page_cache_and_ext4_workload(
    peer_dir: Path, guest_vm: QemuVM, blk_daemon: tuple[PeerProcess, Path], packed: bool
) -> None:
    """One queue of QEMU's default 128 entries, served by a thread (256: the next tests)."""
    _workload(peer_dir, guest_vm, blk_daemon, 128, packed)


@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
def test_guest_workload_on_two_queues_served_by_worker_processes(
    peer_dir: Path, guest_vm: QemuVM, packed: bool
) -> None:
    """The same workload on two queues (two guest CPUs), each served by a worker process of
    ``serve blk --workers 2 --worker-mode process``."""
    image = make_raw_image(peer_dir / "disk.img", IMAGE_SIZE)
    args = ("--queues", "2", "--workers", "2", "--worker-mode", "process")
    daemon = serve_blk(peer_dir, "serve", peer_dir / "blk.sock", image, *args)
    try:
        guest_vm.cpus = 2  # Linux gives virtio-blk at most one queue per CPU
        _workload(peer_dir, guest_vm, (daemon, image), 256, packed, queues=2)
        log = daemon.stderr
        assert "worker0[" in log and "worker1[" in log, log[-2000:]
        assert "died" not in log
    finally:
        daemon.stop()


def test_guest_workload_with_its_worker_processes_killed(peer_dir: Path, guest_vm: QemuVM) -> None:
    """The two-queue process-mode workload while the test SIGKILLs both worker processes, twice,
    at moments their inflight region shows requests in flight: the daemon replaces them on the
    same connection each time, the new workers redo those requests, and every byte of the page
    cache writes and the ext4 file system checks out."""
    image = make_raw_image(peer_dir / "disk.img", IMAGE_SIZE)
    args = ("--queues", "2", "--workers", "2", "--worker-mode", "process")
    daemon = serve_blk(peer_dir, "serve", peer_dir / "blk.sock", image, *args)
    kills: list[int | BaseException] = []

    def killer() -> None:
        for n in range(1, 3):
            try:
                deadline = time.monotonic() + GUEST_TIMEOUT
                while "vring 1 started" not in daemon.stderr:  # Linux's driver, not the BIOS's
                    assert time.monotonic() < deadline, "the guest's driver never started"
                    time.sleep(0.05)
                kills.append(kill_at(daemon, want_in_flight=True, queue_size=256, packed=False,
                                     workers_only=True, within=60))  # fmt: skip
                deadline = time.monotonic() + 20
                while daemon.stderr.count("resume where their rings stopped") < 2 * n:
                    assert time.monotonic() < deadline, "workers not replaced"
                    time.sleep(0.05)
            except BaseException as exc:  # handed to the test thread
                kills.append(exc)
                return

    thread = threading.Thread(target=killer, name="killer")
    try:
        guest_vm.cpus = 2
        thread.start()
        _workload(peer_dir, guest_vm, (daemon, image), 256, False, queues=2, killed=True)
        thread.join(30)
        for k in kills:
            if isinstance(k, BaseException):
                raise k
        counts = [k for k in kills if isinstance(k, int)]
        assert len(counts) == 2 and min(counts) > 0, kills
        log = daemon.stderr
        assert log.count("died (killed by SIGKILL)") == 4, log[-3000:]
        assert log.count("in-flight requests recovered") >= 2, log[-3000:]
        assert log.count("front-end connected") == 1 and "not replaced" not in log
    finally:
        daemon.stop()
        thread.join(5)


def _workload(
    peer_dir: Path,
    guest_vm: QemuVM,
    blk_daemon: tuple[PeerProcess, Path],
    queue_size: int,
    packed: bool,
    *,
    queues: int = 1,
    killed: bool = False,
) -> None:
    e2fsck = require("e2fsck")
    debugfs = require("debugfs")
    require("mke2fs")  # the guest's mkfs.ext4 is the host's, copied into the initramfs
    daemon, image = blk_daemon
    assert daemon.socket is not None
    guest_vm.memory = GUEST_MEMORY
    guest_vm.add_vhost_user_blk(
        daemon.socket, packed=packed, queue_size=queue_size, num_queues=queues
    )
    try:
        result = boot_guest(guest_vm, guest_script(), timeout=GUEST_TIMEOUT)
    except GuestError as e:
        log = daemon.stderr
        pytest.fail(
            f"{e}\nserve {'running' if daemon.returncode is None else 'exited'}; "
            f"its problems: {problems(log)}\nserve log (tail):\n{log[-2000:]}"
        )
    result.check()

    _check_serve_log(daemon, queue_size, killed=killed)

    lines = _lines(result.output)
    assert guest_feature_bit(lines["features"], RING_PACKED_BIT) == packed
    assert guest_feature_bit(lines["features"], INDIRECT_DESC_BIT)
    assert lines["size"] == str(IMAGE_SIZE // SECTOR)
    # the page cache really had single pages to take (a loose bound: some holes merge)
    assert int(lines["holes-raw"]) >= RAW_HOLES_MIB * 256 // 2, lines["holes-raw"]
    assert int(lines["holes-fs"]) >= FS_HOLES_MIB * 256 // 2, lines["holes-fs"]

    # (a) raw page-cache writes, as read back by the guest and as they are in the image
    raw = labelled_sectors(RAW_LABEL, RAW_SIZE // SECTOR)
    odd = raw[-ODD_SIZE:]
    digest = hashlib.sha256
    assert lines["raw-src"].split()[0] == digest(raw).hexdigest()
    assert lines["odd-src"].split()[0] == digest(odd).hexdigest()
    assert lines["raw"].split()[0] == digest(raw).hexdigest()
    assert lines["odd"].split()[0] == digest(odd).hexdigest()
    data = image.read_bytes()
    assert data[RAW_OFFSET : RAW_OFFSET + RAW_SIZE] == raw
    assert data[ODD_OFFSET : ODD_OFFSET + ODD_SIZE] == odd
    gap = data[RAW_OFFSET + RAW_SIZE : ODD_OFFSET] + data[ODD_OFFSET + ODD_SIZE :]
    assert gap.count(0) == len(gap)

    # (b) ext4: the guest's fsck and read-back, then the host's own look at the image
    big = labelled_sectors(BIG_LABEL, BIG_SIZE // SECTOR)
    expected = {"big": big, **small_files(big)}
    assert lines["files"] == str(len(expected))
    assert lines["fsck"] == "0", result.output
    assert lines["verify"] == "0", result.output
    assert lines["mounted"] == str(len(expected))
    fsck = _host_tool([e2fsck, "-n", "-f", str(image)])
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    out = peer_dir / "extracted"
    out.mkdir()
    dump = _host_tool([debugfs, "-R", f"rdump / {out}", str(image)])
    found = {
        str(p.relative_to(out)): p.read_bytes()
        for p in out.rglob("*")
        if p.is_file() and "lost+found" not in p.parts
    }
    assert sorted(found) == sorted(expected), dump.stderr
    for name, contents in expected.items():
        assert found[name] == contents, name
