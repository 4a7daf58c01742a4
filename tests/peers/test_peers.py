"""Tests of the peer harness itself, against programs nobody here wrote (QEMU, qsd)."""

from __future__ import annotations

import hashlib
import signal
import socket
import struct
import sys
from pathlib import Path

import pytest

from .guest import GuestAssets, boot_guest, parse_result
from .qemu import PeerError, PeerProcess, QemuStorageDaemon, QemuVM, make_raw_image, require

HEADER = struct.Struct("<III")
GET_FEATURES = 1
GET_PROTOCOL_FEATURES = 15
FLAGS_VERSION_1 = 0x1
FLAGS_REPLY = 0x4
F_PROTOCOL_FEATURES = 1 << 30
F_VERSION_1 = 1 << 32
PROTOCOL_F_CONFIG = 1 << 9

SECTOR = 512
PATTERN_OFFSET = 1 << 20
PATTERN_SIZE = 4 << 20

# Prints a 4 MiB pattern: each 512-byte sector starts with its own number, so a misplaced
# sector changes the checksum. `sector_pattern` below builds the same bytes on the host.
AWK_PATTERN = r"""awk 'BEGIN {
    fill = ""; for (i = 0; i < 20; i++) fill = fill "abcdefghijklmnopqrstuvwxyz"
    for (s = 0; s < COUNT; s++) {
        h = sprintf("pyvhost sector %06d\n", s)
        printf "%s%s", h, substr(fill, 1, 512 - length(h))
    }
}'"""


def sector_pattern(count: int) -> bytes:
    fill = b"abcdefghijklmnopqrstuvwxyz" * 20
    parts = []
    for s in range(count):
        head = f"pyvhost sector {s:06d}\n".encode()
        parts.append(head + fill[: SECTOR - len(head)])
    return b"".join(parts)


def recv_exact(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise ConnectionError(f"peer closed after {len(data)} of {size} bytes")
        data += chunk
    return data


def ask_u64(path: Path, request: int) -> int:
    """Send one payload-less vhost-user request on a fresh connection; return the u64 reply."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(str(path))
        sock.sendall(HEADER.pack(request, FLAGS_VERSION_1, 0))
        req, flags, size = HEADER.unpack(recv_exact(sock, HEADER.size))
        assert (req, flags, size) == (request, FLAGS_VERSION_1 | FLAGS_REPLY, 8)
        (value,) = struct.unpack("<Q", recv_exact(sock, 8))
        return int(value)


def test_parse_result_needs_both_markers_and_exit_code() -> None:
    text = (
        "noise\r\nPYVHOST-RESULT-BEGIN\r\nline 1\r\nlast"
        "PYVHOST-RESULT-END\r\nPYVHOST-EXIT-CODE=7\r\n"
    )
    assert parse_result(text) == (7, "line 1\nlast")
    assert parse_result("PYVHOST-RESULT-BEGIN\nhalf way") is None
    assert parse_result("PYVHOST-RESULT-BEGIN\nx\nPYVHOST-RESULT-END\n") is None


def test_a_peer_that_ignores_sigterm_is_described_then_killed(
    peer_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """stop() says what a stuck peer was doing (kernel state and Python stacks), then kills it."""
    script = (
        "import signal, sys, time\n"
        "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        "print('ready', file=sys.stderr, flush=True)\n"
        "def stuck_here():\n    time.sleep(60)\n"
        "stuck_here()\n"
    )
    with PeerProcess([sys.executable, "-c", script], peer_dir, name="stuck") as peer:
        while "ready" not in peer.stderr:
            assert peer.returncode is None
        assert peer.stop(grace=0.5) in (-signal.SIGABRT, -signal.SIGKILL)
    said = capsys.readouterr().err
    assert "stuck: not gone 0.5 s after SIGTERM" in said
    assert "state S wchan hrtimer_nanosleep" in said
    assert "in stuck_here" in said  # faulthandler's dump of the Python stack


def test_vm_command_line_for_vhost_user_devices(tmp_path: Path) -> None:
    vm = QemuVM(tmp_path, binary="/usr/bin/qemu-system-x86_64")
    vm.add_vhost_user_blk(Path("/tmp/b.sock"), num_queues=2, server=True, packed=True)
    vm.add_vhost_user_net(Path("/tmp/n.sock"))
    args = " ".join(vm.command())
    assert "memory-backend-memfd,id=mem,size=512M,share=on" in args
    assert "-chardev socket,id=chr1,path=/tmp/b.sock,server=on,wait=on" in args
    assert "-device vhost-user-blk-pci,id=dev2,chardev=chr1,num-queues=2,packed=on" in args
    assert "-chardev socket,id=chr3,path=/tmp/n.sock " in args
    assert "virtio-net-pci,id=dev5,netdev=net4,vectors=0" in args
    with pytest.raises(ValueError, match="longer than 107"):
        vm.add_vhost_user_rng(Path("/tmp/" + "x" * 120))


@pytest.mark.qemu
def test_qsd_answers_get_features_and_accepts_again(qsd: QemuStorageDaemon) -> None:
    assert qsd.socket is not None
    features = ask_u64(qsd.socket, GET_FEATURES)
    assert features & F_PROTOCOL_FEATURES
    assert features & F_VERSION_1
    # qsd serves one front-end at a time and accepts the next one once the first has left.
    protocol = ask_u64(qsd.socket, GET_PROTOCOL_FEATURES)
    assert protocol & PROTOCOL_F_CONFIG
    assert qsd.returncode is None


@pytest.mark.qemu
def test_qsd_start_failure_reports_its_stderr(peer_dir: Path) -> None:
    require("qemu-storage-daemon")
    daemon = QemuStorageDaemon(peer_dir / "missing.img", peer_dir / "qsd.sock")
    with pytest.raises(PeerError, match=r"(?s)exited with status 1 before.*missing\.img"), daemon:
        pass


@pytest.mark.qemu
def test_qemu_as_server_sends_get_features_first(peer_dir: Path) -> None:
    require("qemu-system-x86_64")
    sock_path = peer_dir / "vm.sock"
    vm = QemuVM(peer_dir / "vm", timeout_s=60)
    vm.add_vhost_user_blk(sock_path, server=True)
    with vm:
        assert vm.process is not None
        vm.process.wait_for_socket(sock_path)
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(20)
            sock.connect(str(sock_path))
            assert HEADER.unpack(recv_exact(sock, HEADER.size)) == (GET_FEATURES, 1, 0)


@pytest.mark.qemu
@pytest.mark.guest
def test_guest_writes_and_reads_back_through_qsd(
    qsd: QemuStorageDaemon, qsd_image: Path, guest_vm: QemuVM
) -> None:
    assert qsd.socket is not None
    guest_vm.add_vhost_user_blk(qsd.socket)
    sectors = PATTERN_SIZE // SECTOR
    script = f"""set -e
echo "size $(cat /sys/block/vda/size)"
{AWK_PATTERN.replace("COUNT", str(sectors))} >/tmp/pattern
echo "pattern $(sha256sum </tmp/pattern)"
dd if=/tmp/pattern of=/dev/vda bs=1M seek=1 count=4 oflag=direct conv=fsync 2>/dev/null
echo 3 >/proc/sys/vm/drop_caches
echo "readback $(dd if=/dev/vda bs=1M skip=1 count=4 iflag=direct 2>/dev/null | sha256sum)"
"""
    result = boot_guest(guest_vm, script, timeout=90).check()

    expected = sector_pattern(sectors)
    digest = hashlib.sha256(expected).hexdigest()
    lines = dict(line.split(" ", 1) for line in result.output.splitlines())
    assert lines["size"] == str(qsd_image.stat().st_size // SECTOR)
    assert lines["pattern"].split()[0] == digest
    assert lines["readback"].split()[0] == digest
    image = qsd_image.read_bytes()
    assert image[PATTERN_OFFSET : PATTERN_OFFSET + PATTERN_SIZE] == expected
    assert image[:PATTERN_OFFSET].count(0) == PATTERN_OFFSET
    assert (
        image[PATTERN_OFFSET + PATTERN_SIZE :].count(0)
        == len(image) - PATTERN_OFFSET - PATTERN_SIZE
    )


@pytest.mark.qemu
@pytest.mark.guest
def test_guest_sees_readonly_multiqueue_disk_and_script_status(
    peer_dir: Path, guest_vm: QemuVM, guest_assets: GuestAssets
) -> None:
    require("qemu-storage-daemon")
    image = make_raw_image(peer_dir / "ro.img", 8 << 20)
    with QemuStorageDaemon(image, peer_dir / "ro.sock", num_queues=2, writable=False) as daemon:
        assert daemon.socket is not None
        guest_vm.cpus = 2  # Linux gives virtio-blk at most one queue per CPU
        guest_vm.add_vhost_user_blk(daemon.socket, num_queues=2)
        script = """echo "ro $(cat /sys/block/vda/ro)"
echo "queues $(ls /sys/block/vda/mq | wc -l)"
if echo x | dd of=/dev/vda conv=fsync 2>/dev/null; then echo "write ok"
else echo "write refused"; fi
exit 3
"""
        result = boot_guest(guest_vm, script, timeout=90, assets=guest_assets)
    assert result.exit_code == 3
    assert result.output.splitlines() == ["ro 1", "queues 2", "write refused"]
    assert image.read_bytes().count(0) == 8 << 20
