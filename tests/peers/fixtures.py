"""pytest fixtures for real peers.

Load them with `pytest_plugins = ["peers.fixtures"]` in tests/conftest.py.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from .guest import GuestAssets, GuestUnavailableError, ensure_guest
from .qemu import QemuStorageDaemon, QemuVM, make_raw_image, require, short_tmpdir

QSD_IMAGE_SIZE = 64 << 20
KEEP_ENV = "PYVHOST_KEEP_PEER_DIRS"
"""Set (to anything) to keep each test's peer directory (logs, images) after the test."""


@pytest.fixture
def peer_dir() -> Iterator[Path]:
    """A fresh short directory under /tmp for sockets and logs (AF_UNIX paths stay < 107 bytes);
    removed afterwards unless $PYVHOST_KEEP_PEER_DIRS is set."""
    path = short_tmpdir()
    yield path
    if not os.environ.get(KEEP_ENV):
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def qsd_image(peer_dir: Path) -> Path:
    """A zero-filled 64 MiB raw image."""
    return make_raw_image(peer_dir / "disk.img", QSD_IMAGE_SIZE)


@pytest.fixture
def qsd(peer_dir: Path, qsd_image: Path) -> Iterator[QemuStorageDaemon]:
    """qemu-storage-daemon serving `qsd_image` over vhost-user-blk at `qsd.socket` (1 queue, rw)."""
    require("qemu-storage-daemon")
    with QemuStorageDaemon(qsd_image, peer_dir / "qsd.sock") as daemon:
        yield daemon


@pytest.fixture(scope="session")
def guest_assets() -> GuestAssets:
    """Guest kernel and initramfs from the cache (built on first use); skips when unobtainable."""
    require("qemu-system-x86_64")
    try:
        return ensure_guest()
    except GuestUnavailableError as e:
        pytest.skip(f"guest kernel/initramfs unavailable: {e}")


@pytest.fixture
def guest_vm(peer_dir: Path, guest_assets: GuestAssets) -> Iterator[QemuVM]:
    """A QemuVM set up for the test guest; add devices, then call `boot_guest(vm, script)`."""
    vm = QemuVM(peer_dir / "vm", kernel=guest_assets.kernel, initrd=guest_assets.initrd)
    yield vm
    vm.stop()
