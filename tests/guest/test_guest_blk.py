"""A Linux guest's disk served by ``pyvhost serve blk`` through QEMU's vhost-user-blk-pci."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from peers.guest import GuestAssets, boot_guest
from peers.qemu import QemuVM, make_raw_image

from .conftest import Serve

pytestmark = [pytest.mark.qemu, pytest.mark.guest]

SECTOR = 512
IMAGE_SIZE = 64 << 20
PATTERN_OFFSET = 1 << 20
PATTERN_SIZE = 4 << 20

# Each 512-byte sector starts with its own number, so a misplaced sector changes the checksum;
# `sector_pattern` builds the same bytes on the host.
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


def _lines(output: str) -> dict[str, str]:
    return dict(line.split(" ", 1) for line in output.splitlines() if " " in line)


@pytest.mark.parametrize("queues", [1, 2])
def test_guest_writes_flushes_and_reads_back(
    peer_dir: Path, guest_vm: QemuVM, guest_assets: GuestAssets, serve: Serve, queues: int
) -> None:
    image = make_raw_image(peer_dir / "disk.img", IMAGE_SIZE)
    sock = peer_dir / "blk.sock"
    daemon = serve(
        "blk", sock, "--image", str(image), "--queues", str(queues), "--serial", "pyvhost-disk"
    )
    guest_vm.cpus = queues  # Linux gives virtio-blk at most one queue per CPU
    guest_vm.add_vhost_user_blk(sock, num_queues=queues)
    sectors = PATTERN_SIZE // SECTOR
    script = f"""set -e
echo "size $(cat /sys/block/vda/size)"
echo "queues $(ls /sys/block/vda/mq | wc -l)"
echo "ro $(cat /sys/block/vda/ro)"
echo "serial $(cat /sys/block/vda/serial)"
{AWK_PATTERN.replace("COUNT", str(sectors))} >/tmp/pattern
echo "pattern $(sha256sum </tmp/pattern)"
dd if=/tmp/pattern of=/dev/vda bs=64k seek=16 count=64 oflag=direct conv=fsync 2>/dev/null
sync
echo 3 >/proc/sys/vm/drop_caches
echo "readback $(dd if=/dev/vda bs=64k skip=16 count=64 iflag=direct 2>/dev/null | sha256sum)"
"""
    result = boot_guest(guest_vm, script, timeout=90, assets=guest_assets).check()

    expected = sector_pattern(sectors)
    digest = hashlib.sha256(expected).hexdigest()
    lines = _lines(result.output)
    assert lines["size"] == str(IMAGE_SIZE // SECTOR)
    assert lines["queues"] == str(queues)
    assert lines["ro"] == "0"
    assert lines["serial"] == "pyvhost-disk"
    assert lines["pattern"].split()[0] == digest
    assert lines["readback"].split()[0] == digest
    data = image.read_bytes()
    assert data[PATTERN_OFFSET : PATTERN_OFFSET + PATTERN_SIZE] == expected
    assert data[:PATTERN_OFFSET].count(0) == PATTERN_OFFSET
    tail = data[PATTERN_OFFSET + PATTERN_SIZE :]
    assert tail.count(0) == len(tail)
    assert daemon.returncode is None
    for q in range(queues):
        assert f"vring {q} started" in daemon.stderr


def test_guest_sees_a_readonly_disk(
    peer_dir: Path, guest_vm: QemuVM, guest_assets: GuestAssets, serve: Serve
) -> None:
    image = make_raw_image(peer_dir / "ro.img", 8 << 20)
    image.write_bytes(b"\xa5" * (8 << 20))
    sock = peer_dir / "ro.sock"
    serve("blk", sock, "--image", str(image), "--readonly")
    guest_vm.add_vhost_user_blk(sock)
    script = """echo "ro $(cat /sys/block/vda/ro)"
echo "first $(dd if=/dev/vda bs=512 count=1 iflag=direct 2>/dev/null | od -An -tx1 | head -1)"
if echo x | dd of=/dev/vda oflag=direct conv=fsync 2>/dev/null; then echo "write ok"
else echo "write refused"; fi
"""
    result = boot_guest(guest_vm, script, timeout=60, assets=guest_assets).check()
    lines = result.output.splitlines()
    assert lines[0] == "ro 1"
    assert lines[1].split()[1:] == ["a5"] * 16
    assert lines[2] == "write refused"
    assert image.read_bytes() == b"\xa5" * (8 << 20)
