"""A Linux guest drives ``pyvhost serve blk`` over packed rings, with several queues, read-only,
and with QEMU listening (``serve --client``).

That the ring really was packed is checked on both sides: bit 34 (VIRTIO_F_RING_PACKED) in the
guest's /sys/bus/virtio/devices/*/features, and in the SET_FEATURES the back-end logged before
QEMU asked for the inflight region, whose size must then be the packed format's.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from peers.guest import GuestAssets, boot_guest
from peers.qemu import QemuVM, make_raw_image

from .blk_support import (
    RING_PACKED_BIT,
    SECTOR,
    features_set,
    guest_feature_bit,
    inflight_replies,
    packed_region_size,
    problems,
    serve_blk,
    split_region_size,
    stopped_bases,
)
from .test_guest_blk import AWK_PATTERN, sector_pattern

pytestmark = [pytest.mark.qemu, pytest.mark.guest]

IMAGE_SIZE = 16 << 20
PATTERN_OFFSET = 1 << 20
PATTERN_SIZE = 2 << 20


def _script(queues: int) -> str:
    """Features line, then one writer per queue pinned to its own CPU, flush, read back."""
    sectors = PATTERN_SIZE // SECTOR
    per = PATTERN_SIZE // 65536 // queues
    writers = "\n".join(
        f"taskset -c {q % 2} dd if=/tmp/pattern of=/dev/vda bs=64k skip={q * per} "
        f"seek={16 + q * per} count={per} oflag=direct 2>/dev/null & p{q}=$!"
        for q in range(queues)
    )
    waits = "\n".join(f"wait $p{q}" for q in range(queues))
    return f"""set -e
echo "features $(cat /sys/bus/virtio/devices/virtio0/features)"
echo "queues $(ls /sys/block/vda/mq | wc -l)"
echo "ro $(cat /sys/block/vda/ro)"
{AWK_PATTERN.replace("COUNT", str(sectors))} >/tmp/pattern
{writers}
{waits}
sync
echo 3 >/proc/sys/vm/drop_caches
echo "readback $(dd if=/dev/vda bs=64k skip=16 count={PATTERN_SIZE // 65536} iflag=direct \\
    2>/dev/null | sha256sum)"
"""


def _lines(output: str) -> dict[str, str]:
    return dict(line.split(" ", 1) for line in output.splitlines() if " " in line)


def _check_packed_negotiation(log: str, queues: int) -> None:
    """The driver's SET_FEATURES has RING_PACKED, and the inflight region QEMU asked for after
    it is packed-format sized (GET_INFLIGHT_FD is answered per the features then set)."""
    assert features_set(log)[-1] >> RING_PACKED_BIT & 1
    feats, size, nq, qsize = inflight_replies(log)[-1]
    assert feats >> RING_PACKED_BIT & 1
    assert nq == queues
    assert size == queues * packed_region_size(qsize) != queues * split_region_size(qsize)


@pytest.mark.parametrize(
    "setup",
    [(1, 1, False), (2, 2, False), (4, 2, False), (2, 2, True)],
    ids=["1q", "2q", "4q-2cpu", "2q-client"],
)
def test_guest_drives_packed_rings(
    peer_dir: Path, guest_vm: QemuVM, guest_assets: GuestAssets, setup: tuple[int, int, bool]
) -> None:
    queues, cpus, client = setup
    image = make_raw_image(peer_dir / "disk.img", IMAGE_SIZE)
    sock = peer_dir / "blk.sock"
    daemon = serve_blk(peer_dir, "serve", sock, image, "--queues", str(queues), client=client)
    guest_vm.cpus = cpus
    guest_vm.add_vhost_user_blk(sock, num_queues=queues, packed=True, server=client)
    used = min(queues, cpus)  # Linux gives virtio-blk at most one queue per CPU
    result = boot_guest(guest_vm, _script(used), timeout=90, assets=guest_assets).check()
    daemon.stop()

    lines = _lines(result.output)
    assert guest_feature_bit(lines["features"], RING_PACKED_BIT)
    assert lines["queues"] == str(used)
    assert lines["ro"] == "0"
    expected = sector_pattern(PATTERN_SIZE // SECTOR)
    assert lines["readback"].split()[0] == hashlib.sha256(expected).hexdigest()
    data = image.read_bytes()
    assert data[PATTERN_OFFSET : PATTERN_OFFSET + PATTERN_SIZE] == expected
    assert data[:PATTERN_OFFSET].count(0) == PATTERN_OFFSET
    assert data[PATTERN_OFFSET + PATTERN_SIZE :].count(0) == IMAGE_SIZE - 3 * PATTERN_OFFSET

    log = daemon.stderr
    _check_packed_negotiation(log, queues)
    assert not problems(log), problems(log)
    bases = stopped_bases(log)
    for q in range(used):  # each queue the guest used moved off the packed start (0, wrap 1)
        assert bases[q] != 0x8000_8000, (q, bases)
    assert ("listening on" in log) != client


def test_guest_sees_a_readonly_packed_disk(
    peer_dir: Path, guest_vm: QemuVM, guest_assets: GuestAssets
) -> None:
    image = make_raw_image(peer_dir / "ro.img", 8 << 20)
    image.write_bytes(b"\x5a" * (8 << 20))
    sock = peer_dir / "ro.sock"
    daemon = serve_blk(peer_dir, "serve", sock, image, "--readonly")
    guest_vm.add_vhost_user_blk(sock, packed=True)
    script = """echo "features $(cat /sys/bus/virtio/devices/virtio0/features)"
echo "ro $(cat /sys/block/vda/ro)"
echo "first $(dd if=/dev/vda bs=512 count=1 iflag=direct 2>/dev/null | od -An -tx1 | head -1)"
if echo x | dd of=/dev/vda oflag=direct conv=fsync 2>/dev/null; then echo "write ok"
else echo "write refused"; fi
"""
    result = boot_guest(guest_vm, script, timeout=60, assets=guest_assets).check()
    daemon.stop()
    lines = _lines(result.output)
    assert guest_feature_bit(lines["features"], RING_PACKED_BIT)
    assert lines["ro"] == "1"
    assert lines["first"].split() == ["5a"] * 16
    assert lines["write"] == "refused"
    assert image.read_bytes() == b"\x5a" * (8 << 20)
    _check_packed_negotiation(daemon.stderr, 1)
