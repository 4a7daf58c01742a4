"""A Linux guest reads /dev/hwrng through QEMU's vhost-user-rng-pci and ``pyvhost serve rng``."""

from __future__ import annotations

from pathlib import Path

import pytest

from peers.guest import GuestAssets, boot_guest
from peers.qemu import QemuVM

from .conftest import Serve

pytestmark = [pytest.mark.qemu, pytest.mark.guest]


def test_guest_reads_hwrng_through_pyvhost(
    peer_dir: Path, guest_vm: QemuVM, guest_assets: GuestAssets, serve: Serve
) -> None:
    sock = peer_dir / "rng.sock"
    daemon = serve("rng", sock)
    guest_vm.add_vhost_user_rng(sock)  # EVENT_IDX and INDIRECT_DESC on, as QEMU defaults
    script = """set -e
echo "current $(cat /sys/class/misc/hw_random/rng_current)"
timeout 30 dd if=/dev/hwrng of=/tmp/a bs=64 count=32 2>/dev/null
timeout 30 dd if=/dev/hwrng of=/tmp/b bs=64 count=32 2>/dev/null
echo "bytes $(cat /tmp/a /tmp/b | wc -c)"
echo "distinct $(od -An -v -tx1 /tmp/a | tr -s ' ' '\\n' | grep . | sort -u | wc -l)"
if cmp -s /tmp/a /tmp/b; then echo "same"; else echo "different"; fi
"""
    result = boot_guest(guest_vm, script, timeout=60, assets=guest_assets).check()
    lines = dict(line.partition(" ")[::2] for line in result.output.splitlines())
    assert lines["current"].startswith("virtio_rng")
    assert lines["bytes"] == str(2 * 64 * 32)
    assert int(lines["distinct"]) > 200  # 2 KiB of random bytes cover almost every byte value
    assert "different" in lines
    assert daemon.returncode is None
    assert "vring 0 started" in daemon.stderr
